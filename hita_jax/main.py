"""Entry point: `python -m hita_jax.main --config=configs/<file>.py[:arg] --workdir=DIR`.

The config's `task` names the module that runs: `hita_jax/tasks/<config.task>.py`, whose
`run(config, workdir)` is called (as big_vision's `train.py` finds its models by name). Overrides:
`--config.key=value` (unknown keys are rejected by name). The resolved config is written to
`<workdir>/config.json`. Logging is at WARNING (progress lines are printed); `--verbosity=0` shows
the INFO logs of Orbax, CLU and absl.

Several processes (a TPU pod slice, GPU nodes): the same command on every host with `--distributed`
(plus `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` where JAX cannot detect
them). Each process reads its slice of the data; process 0 writes logs, images and JSON files.

Errors a user can cause (`hita_jax.errors.UserError`: a config key or value, a missing or unsafe
file, data that do not fit the model) print one line `error: ...` and exit with status 2; with
`--verbosity` given they keep their traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hita_jax import config_lib, tasks  # noqa: E402
from hita_jax import cli as hita_cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (path[:arg])', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for outputs, checkpoints and logs')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'one of several JAX processes: call jax.distributed.initialize()')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 (--distributed; auto-detected on TPU VMs '
                                   'and under SLURM)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (--distributed)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1 (--distributed)')


def initialize_distributed():
  """jax.distributed.initialize with the flags given; on CPU the collectives go through gloo
  (the setting only concerns the CPU client, so GPU/TPU runs are unaffected)."""
  given = {'--coordinator_address': _COORDINATOR.value, '--num_processes': _NUM_PROCESSES.value,
           '--process_id': _PROCESS_ID.value}
  if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    raise app.UsageError(f'--distributed: {", ".join(missing)} missing; give all three of '
                         '--coordinator_address, --num_processes, --process_id, or none (auto-detect)')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def cli(argv: list[str] | None = None):
  """`python -m hita_jax.main`: absl's app.run with the config file, its overrides and every user
  error shown as one line (hita_jax.cli)."""
  hita_cli.run_absl(main, sys.argv if argv is None else argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # quiet Orbax/CLU INFO lines; progress lines stay
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError('--config=configs/<file>.py[:arg] and --workdir=DIR are required')
  task = config.get('task')  # a config without `task` gets the error below
  if task not in tasks.available_tasks():
    raise app.UsageError(f'config.task={task!r} is not a task: there is no hita_jax/tasks/{task}.py; '
                         f'the tasks are {tasks.available_tasks()}')
  if _DISTRIBUTED.value:
    initialize_distributed()
  elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError('--coordinator_address/--num_processes/--process_id need --distributed')
  module = importlib.import_module(f'hita_jax.tasks.{task}')
  os.makedirs(workdir, exist_ok=True)
  cache = config_lib.setup_compilation_cache(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  logging.info('task %s, workdir %s, %d devices, compilation cache %s', task, workdir,
               jax.device_count(), cache)
  module.run(config, workdir)  # a UserError becomes one line in hita_cli.run_absl


if __name__ == '__main__':
  cli()
