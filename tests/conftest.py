"""Test setup: 8 fake CPU devices (set before JAX starts), a compilation cache shared by the run,
parsed absl flags, fixture locations."""
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Most of a test's time is XLA compiling programs that other tests, the other xdist worker or a
# restarted subprocess (kill/resume tests, multi-process runs) compiled already: one persistent
# cache per pytest run, fresh each run (set here by the controller; workers and the task
# subprocesses inherit it). A user's JAX_COMPILATION_CACHE_DIR wins.
_OWN_CACHE = None
if 'PYTEST_XDIST_WORKER' not in os.environ and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='hita_jax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hita_jax  # noqa: E402,F401  (its CPU XLA defaults go in before the backend starts)
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


def _unrolled_threefry_on_cpu():
  """JAX lowers Threefry on the CPU as a rolled while loop (one per random draw), which XLA's CPU
  backend compiles as hundreds of small loop bodies: building a tiny tokenizer (one jitted init
  drawing ~400 parameters) spent ~11 of its ~16 s compiling them. The unrolled lowering, the one
  JAX uses on GPU and TPU, is the same integer arithmetic (so the same bits; test_dropout.py checks
  it against a fresh process) and compiles in about half the time. Tests only: a private JAX
  hook, left alone when this JAX lacks it."""
  if os.environ.get('HITA_TEST_ROLLED_THREEFRY') == '1':
    return
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as tf
    mlir.register_lowering(tf.threefry2x32_p, tf._threefry2x32_lowering_rule, platform='cpu')
  except (ImportError, AttributeError):
    pass


_unrolled_threefry_on_cpu()

import pytest  # noqa: E402
from absl import flags  # noqa: E402

try:  # grain and other absl users read flags; parse defaults once
  flags.FLAGS(sys.argv[:1])
except flags.Error:
  pass


def _shared_dir(*parts):
  env = os.environ.get('HITA_SHARED')
  base = env or os.path.join(os.path.dirname(ROOT), 'shared')
  return os.path.join(base, *parts)


OFFICIAL_FIXTURES = _shared_dir('fixtures', 'official')


@pytest.fixture(scope='session')
def official_fixtures():
  if not os.path.isdir(OFFICIAL_FIXTURES):
    pytest.skip(f'golden fixtures not found at {OFFICIAL_FIXTURES} (set HITA_SHARED)')
  return OFFICIAL_FIXTURES


@pytest.fixture(scope='session')
def torch():
  """PyTorch, for the tests that write .pt files or compare against it (the `test` extra)."""
  return pytest.importorskip('torch', reason='torch not installed (pip install -e .[test])')


@pytest.fixture
def quick_compile():
  """XLA's CPU optimisation passes dominate a tokenizer-step test's time: off, for tests that
  compare numbers run to run (both sides compiled the same way)."""
  old = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test, excluded from the default run')
  config.addinivalue_line('markers', 'demo_full: the whole CPU demo, run alone with -m demo_full')


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


_SKIPPED: list[str] = []  # 'nodeid: reason' of every skipped test


def pytest_runtest_logreport(report):
  if report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    _SKIPPED.append(f'{report.nodeid}: {reason}')


def pytest_collectreport(report):  # a module skipped as a whole (module-level importorskip;
  # the test modules import their required packages plainly, so under pytest-xdist, whose controller
  # never sees a worker's skipped collection, a missing package is a collection error instead)
  if report.skipped:
    _SKIPPED.append(f'{report.nodeid}: {report.longrepr}')


def pytest_sessionfinish(session, exitstatus):
  """With HITA_FAIL_ON_SKIP=1 (CI) a skipped test fails the run: nothing may pass by not running,
  e.g. for a package missing from the install."""
  if os.environ.get('HITA_FAIL_ON_SKIP') == '1' and _SKIPPED:
    print('\nHITA_FAIL_ON_SKIP: these tests were skipped, which CI does not accept:')
    for line in _SKIPPED:
      print(f'  {line}')
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
