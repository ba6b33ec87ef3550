"""Runs `python -m hita_jax.main` as one process or as several JAX processes on this machine
(loopback coordinator, gloo CPU collectives, `devices` fake CPU devices each)."""
import os
import socket
import subprocess
import sys

from tests.conftest import ROOT


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # Without the run's shared compilation cache (tests/conftest.py): each process compiles for
  # itself. The 2-process hang first blamed on the cache was eager decoding in train_tokenizer's
  # grid (now jitted); the multi-process tests have not yet been shown passing with the cache.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def run_main(args, *, processes: int = 1, devices: int = 8, timeout: int = 900) -> list[str]:
  """Runs the task on `processes` x `devices` CPU devices; returns each process's output and
  fails with the output of a process that failed."""
  base = [sys.executable, '-m', 'hita_jax.main', *args]
  if processes == 1:
    cmds = [base]
  else:
    addr = f'127.0.0.1:{free_port()}'
    cmds = [base + ['--distributed', f'--coordinator_address={addr}', f'--num_processes={processes}',
                    f'--process_id={i}'] for i in range(processes)]
  procs = [subprocess.Popen(c, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in cmds]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [p.communicate()[0][-2000:] for p in procs]  # what each got to, for the report
    raise AssertionError(f'{processes} process(es) still running after {timeout} s:\n' + '\n'.join(
        f'--- process {i}:\n{t}' for i, t in enumerate(tails))) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} of {processes} failed:\n{out[-4000:]}'
  return outs
