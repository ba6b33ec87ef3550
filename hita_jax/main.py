"""Entry point: `python -m hita_jax.main --config=configs/<file>.py[:arg] --workdir=DIR`.

The config's `task` picks what runs. Overrides: `--config.key=value` (unknown keys are rejected
by name). The resolved config is written to `<workdir>/config.json`. Logging is at WARNING
(progress lines are printed); `--verbosity=0` shows the INFO logs of Orbax, CLU and absl.
"""
from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (path[:arg])', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for outputs, checkpoints and logs')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'call jax.distributed.initialize() (multi-process GPU/TPU runs)')

# Tasks and the issue that brings each one; implemented ones map to their runner.
TASKS = {
    'evaluate': 'hita_jax.evaluation',
    'train_tokenizer': 'hita_jax.trainers.tokenizer',
    'extract_codes': 'hita_jax.extract',
    'train_ar': 'hita_jax.trainers.ar',
    'sample': 'hita_jax.sampling',
    'demo': 'hita_jax.demo',
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # quiet Orbax/CLU INFO lines; progress lines stay
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError('--config=configs/<file>.py[:arg] and --workdir=DIR are required')
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  task = config.get('task')
  if task not in TASKS:
    raise app.UsageError(f'config.task={task!r} is not a task; valid: {sorted(TASKS)}')
  if TASKS[task] is None:
    raise app.UsageError(f"task {task!r} is not available in this version of hita_jax yet "
                         f"(available: {sorted(k for k, v in TASKS.items() if v)})")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  logging.info('task %s, workdir %s, %d devices', task, workdir, jax.device_count())
  import importlib
  importlib.import_module(TASKS[task]).run(config, workdir)


if __name__ == '__main__':
  app.run(main)
