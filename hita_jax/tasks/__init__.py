"""One module per task, named exactly as `config.task`; each has `run(config, workdir)` and reads top
to bottom: build, step, loop. `hita_jax.main` imports `hita_jax.tasks.<config.task>` by name."""
import pkgutil


def available_tasks() -> list[str]:
  """The task modules present in this package (what `config.task` may name)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
