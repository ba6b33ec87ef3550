"""SIGKILL a task at random moments and restart it until it finishes (tests/test_kill_anywhere.py).

Kills are drawn three ways: alternately at a random time within the reference run's duration and
while an async Orbax save is in flight (its temporary directory exists), and last while the params
export is being written (`export/ema.writing` exists). Restarts are cheap: every process shares a
persistent compilation cache, so only the first one compiles."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT


def env(cache_dir):
  e = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  e.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
           JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return e


def command(config, workdir, *overrides):
  return [sys.executable, '-m', 'hita_jax.main', f'--config={config}', f'--workdir={workdir}', *overrides]


def run_to_end(cmd, cache_dir, timeout=600):
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, env=env(cache_dir), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r, time.time() - t0


def _saving(workdir):
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


def _exporting(workdir):
  return bool(glob.glob(os.path.join(workdir, 'export', '*.writing')))


def kill_repeatedly(cmd, workdir, cache_dir, kills: int, duration: float, seed: int = 0):
  """Starts `cmd` `kills` times, each killed with SIGKILL; returns what each kill hit."""
  rng = random.Random(seed)
  hits = []
  for i in range(kills):
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(cache_dir), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    # the export last: train_ar exports only at its end, after which a restart has nothing left to do
    kind = 'export' if i == kills - 1 else ('random', 'save')[i % 2]
    deadline = time.time() + (duration * 1.5 if kind != 'random' else rng.uniform(0.2, 1.0) * duration)
    hit = 'random'
    while time.time() < deadline and p.poll() is None:
      if kind == 'save' and _saving(workdir):
        hit = 'save'
        break
      if kind == 'export' and _exporting(workdir):
        hit = 'export'
        break
      time.sleep(0.01)
    if p.poll() is not None:  # finished before the kill: the run is complete
      hits.append('finished')
      break
    p.send_signal(signal.SIGKILL)
    p.wait()
    hits.append(hit)
  return hits
