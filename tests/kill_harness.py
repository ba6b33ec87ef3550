"""SIGKILL a task at random moments and restart it until it finishes (tests/test_kill_anywhere.py).

Kills are drawn three ways: alternately 1-3 steps (+ a random fraction of one) after the step the
restart resumes from and while an async Orbax save is in flight (its temporary directory exists),
and last while the params export is being written (`export/ema.writing` exists). Restarts are cheap: every process shares a
persistent compilation cache, so only the first one compiles."""
import glob
import json
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


def _newer(pattern, since):
  """Paths matching `pattern` created after `since` (a killed run's leftovers do not count)."""
  out = []
  for p in glob.glob(pattern):
    try:
      if os.path.getmtime(p) >= since:
        out.append(p)
    except OSError:  # renamed away meanwhile
      pass
  return bool(out)


def _saving(workdir, since):
  return _newer(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'), since)


def _exporting(workdir, since):
  return _newer(os.path.join(workdir, 'export', '*.writing'), since)


def _last_step(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
    return json.loads(lines[-1])['step'] if lines else 0
  except (OSError, ValueError, KeyError):
    return 0


def _checkpoint_step(workdir):
  d = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


def kill_repeatedly(cmd, workdir, cache_dir, kills: int, timeout: float = 300, seed: int = 0,
                    progress=_last_step, done=_checkpoint_step, random_only: bool = False):
  """Starts `cmd` `kills` times, each killed with SIGKILL; returns what each kill hit. A 'random'
  kill lands 1-3 steps after the resumed step plus a random fraction of a step (
  `progress`/`done`: for another task, how far it got / what a restart keeps, e.g. shards)."""
  rng = random.Random(seed)
  hits = []
  for i in range(kills):
    start = done(workdir)
    target, jitter = start + rng.randint(1, 3), rng.uniform(0.0, 0.3)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(cache_dir), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    # the export last: train_ar exports only at its end, after which a restart has nothing left to do
    kind = 'random' if random_only else 'export' if i == kills - 1 else ('random', 'save')[i % 2]
    launched = time.time()
    deadline, hit = launched + timeout, None
    while time.time() < deadline and p.poll() is None and hit is None:
      if kind == 'save' and _saving(workdir, launched):
        hit = 'save'
      elif kind == 'export' and _exporting(workdir, launched):
        hit = 'export'
      elif kind == 'random' and progress(workdir) >= target:
        time.sleep(jitter)
        hit = f'step {target - 1}-{target}'
      time.sleep(0.01)
    if p.poll() is not None:  # finished before the kill: the run is complete
      hits.append('finished')
      break
    p.send_signal(signal.SIGKILL)
    p.wait()
    hits.append(hit or 'timeout')
  return hits
