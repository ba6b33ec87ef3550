"""One module per task, named exactly as `config.task`; each has `run(config, workdir)` and reads top
to bottom: build, step, loop. `hita_jax.main` imports `hita_jax.tasks.<config.task>` by name."""
