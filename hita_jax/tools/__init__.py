"""Command-line tools beside the tasks: `convert` (official weights <-> params exports), `parity`
(golden-fixture checker), `summary` (parameter tables), `bench` (GPU throughput), `fixtures`."""
