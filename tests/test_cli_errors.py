"""Every command line follows `main`'s error contract (hita_jax.cli): a missing file, a garbage file or
a wrong config file / key prints exactly one stderr line `error: ...` naming the thing and the
argument to fix, exits with status 2 and shows no traceback, unless `--verbosity` is given.
In-process (each tool's main through the same runner as its `__main__`), plus one real
`python -m` run."""
import ast
import contextlib
import glob
import io
import os
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest

from hita_jax import cli
from hita_jax.convert.torch_files import CheckpointFormatError
from hita_jax.errors import MissingEntryError, MissingPathError, UserError
from hita_jax.tools import convert, memory, parity, perf_suite, summary
from tests.conftest import ROOT

GPT_CFG = f'{ROOT}/configs/hita_b.py:tiny'
TOK_CFG = f'{ROOT}/configs/tokenizer_v.py:tiny'


def _status(runner, main, argv):
  """(exit status, stderr) of runner(main, argv), as `python -m` would run it."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
    runner(main, argv)
  return e.value.code, err.getvalue()


def _one_line(runner, main, argv, *needles):
  """Runs a command that must fail with one `error:` line holding every needle; returns the line."""
  code, err = _status(runner, main, argv)
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (code, err)
  assert 'Traceback' not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture
def garbage(tmp_path):
  """A factory: random bytes under a given name (never a valid file of any format)."""
  rng = np.random.default_rng(0)

  def make(name):
    path = tmp_path / name
    path.write_bytes(b'\x80\x00\xff' + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(path)
  return make


# -- the shared runner -----------------------------------------------------------------------------

def test_verbosity_flag_forms_are_recognised_and_stripped():
  for argv in (['--verbosity=1'], ['--verbosity', '1'], ['-v=0'], ['--verbosity']):
    assert cli.verbose(['x', *argv, '--out', 'y'])
    assert cli.strip_verbosity(['x', *argv, '--out', 'y']) == ['x', '--out', 'y']
  assert not cli.verbose(['--config=c.py', '--variant', 'v'])
  assert cli.strip_verbosity(['--verbosity', '--out', 'y']) == ['--out', 'y']


def test_bugs_keep_their_traceback_and_user_errors_their_type():
  def bug(argv):
    raise ZeroDivisionError('a bug')
  with pytest.raises(ZeroDivisionError):
    cli.run(bug, [])

  def user(argv):
    raise MissingEntryError('x.npz has no entry w (fix --key)')  # a KeyError: no repr quotes
  assert _one_line(cli.run, user, []) == 'error: x.npz has no entry w (fix --key)'


# -- convert ---------------------------------------------------------------------------------------

def test_convert_missing_checkpoint(tmp_path):
  missing = str(tmp_path / 'missing.pt')
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', GPT_CFG, '--checkpoint', missing,
                                    '--out', str(tmp_path / 'o')],
            'checkpoint not found', missing, '(fix --checkpoint)')


@pytest.mark.parametrize('suffix,why', [('.pt', 'cannot read as a torch checkpoint'),
                                        ('.safetensors', 'cannot read as safetensors'),
                                        ('.npz', 'corrupt zip archive')])
def test_convert_garbage_checkpoint(tmp_path, garbage, suffix, why):
  path = garbage(f'garbage{suffix}')
  line = _one_line(cli.run, convert.main, ['gpt', 'import', '--config', GPT_CFG, '--checkpoint', path,
                                           '--out', str(tmp_path / 'o')],
                   f'{path}: {why}', '(fix --checkpoint)')
  assert 'Weights only load failed' not in line  # torch's paragraph is cut to its cause


def test_blame_appends_the_argument_whose_path_the_message_names():
  flags = {'--checkpoint': '/w/x', '--dinov2': '/w/x.npz', '--out': None}
  with pytest.raises(CheckpointFormatError) as e, cli.blame(flags):  # longest path first
    raise CheckpointFormatError('/w/x.npz: corrupt zip archive')
  assert str(e.value) == '/w/x.npz: corrupt zip archive (fix --dinov2)'
  with pytest.raises(MissingEntryError) as e, cli.blame(flags):
    raise MissingEntryError('/w/x: no ema (fix --checkpoint=...)')  # already named: unchanged
  assert cli.message(e.value) == '/w/x: no ema (fix --checkpoint=...)'
  with pytest.raises(UserError) as e, cli.blame(flags):
    raise UserError('shapes differ')  # names no path: unchanged
  assert str(e.value) == 'shapes differ'


def test_convert_directory_that_is_not_an_export(tmp_path):
  d = tmp_path / 'not_an_export'
  d.mkdir()
  (d / 'notes.txt').write_text('hi')
  _one_line(cli.run, convert.main, ['gpt', 'export', '--config', GPT_CFG, '--params', str(d),
                                    '--out', str(tmp_path / 'o.npz')],
            str(d), '(fix --params)')
  (d / 'config.json').write_bytes(b'\xff\xfe garbage')
  _one_line(cli.run, convert.main, ['dinov2', 'export', '--params', str(d), '--out',
                                    str(tmp_path / 'o.npz')],
            f'{d}/config.json is not valid JSON', '(fix --params)')


def test_convert_wrong_config_file(tmp_path, garbage):
  args = ['--checkpoint', garbage('g.pt'), '--out', str(tmp_path / 'o')]
  nope = str(tmp_path / 'nope.py')
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', nope, *args],
            'config file not found', nope, 'fix --config')
  bad = garbage('bad_config.py')
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', bad, *args],
            f'{bad} is not a Python config file', 'fix --config')
  text = garbage('config.txt')
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', text, *args],
            f'{text} is not a Python config file', 'fix --config')


def test_convert_wrong_config_key_or_argument(tmp_path, garbage):
  args = ['--checkpoint', garbage('g.pt'), '--out', str(tmp_path / 'o')]
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', TOK_CFG, *args],
            TOK_CFG, 'has no gpt section', 'fix --config', 'configs/hita_b.py')
  _one_line(cli.run, convert.main, ['gpt', 'import', '--config', GPT_CFG + 'y', *args],
            f'{GPT_CFG}y', "unknown config argument 'tinyy'", "valid: ['runlocal', 'tiny', 'variant']")


def test_convert_verbosity_keeps_the_traceback(tmp_path, garbage):
  for flag in (['--verbosity=1'], ['--verbosity', '1']):
    with pytest.raises(CheckpointFormatError, match='cannot read as a torch checkpoint'):
      cli.run(convert.main, ['gpt', 'import', *flag, '--config', GPT_CFG, '--checkpoint',
                             garbage('g.pt'), '--out', str(tmp_path / 'o')])


def test_convert_real_command_line(tmp_path, garbage):
  """`python -m hita_jax.tools.convert` end to end: status 2, one line, no traceback (and it used
  to exit 0 after a traceback)."""
  path = garbage('garbage.pt')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'hita_jax.tools.convert', 'gpt', 'import', '--config',
                      GPT_CFG, '--checkpoint', path, '--out', str(tmp_path / 'o')],
                     capture_output=True, text=True, cwd=ROOT, env={**env, 'JAX_PLATFORMS': 'cpu'})
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
  assert lines[-1].startswith(f'error: {path}: cannot read as a torch checkpoint'), r.stderr
  assert lines[-1].endswith('(fix --checkpoint)')
  assert [ln for ln in lines if ln.startswith('error:')] == lines[-1:]


@pytest.mark.parametrize('module,argv,expect', [
    ('hita_jax.convert.gpt', ['import', '--config', 'c.py', '--checkpoint', 'x.pt'],
     'run: python -m hita_jax.tools.convert gpt import --config c.py --checkpoint x.pt'),
    ('hita_jax.convert.tokenizer', [], 'run: python -m hita_jax.tools.convert tokenizer ...'),
    ('hita_jax.convert.dinov2', ['--src=m.pth', '--out', 'o'],
     'run: python -m hita_jax.tools.convert dinov2 import --checkpoint=m.pth --out o'),
    ('hita_jax.convert', ['gpt'], 'run: python -m hita_jax.tools.convert gpt'),
])
def test_old_convert_paths_say_what_to_run(monkeypatch, module, argv, expect):
  monkeypatch.setattr(sys, 'argv', [module, *argv])

  def run_module(_, argv):
    with warnings.catch_warnings():  # "found in sys.modules": the module is run again as __main__
      warnings.simplefilter('ignore', RuntimeWarning)
      runpy.run_module(module, run_name='__main__', alter_sys=False)
  _one_line(run_module, None, [], f'python -m {module} is no longer a command line', expect)


# -- absl tools: summary, memory (and main, through the same runner) -------------------------------

@pytest.mark.parametrize('tool', [summary.main, memory.main], ids=['summary', 'memory'])
def test_absl_tools_config_errors(tmp_path, garbage, tool):
  nope = str(tmp_path / 'nope.py')
  _one_line(cli.run_absl, tool, ['prog', f'--config={nope}'], 'config file not found', nope,
            'fix --config')
  bad = garbage('bad.py')
  _one_line(cli.run_absl, tool, ['prog', '--config', bad], f'{bad} is not a Python config file')
  no_get = tmp_path / 'no_get.py'
  no_get.write_text('x = 1\n')
  _one_line(cli.run_absl, tool, ['prog', f'--config={no_get}'], f'{no_get} defines no get_config')
  _one_line(cli.run_absl, tool, ['prog', f'--config={GPT_CFG}', '--config.train_ar.lrr=1'],
            "--config.train_ar.lrr: ", "has no key 'train_ar.lrr'", 'did you mean train_ar.lr')
  _one_line(cli.run_absl, tool, ['prog', f'--config={GPT_CFG}x'], "unknown config argument 'tinyx'",
            '(fix --config)')
  with pytest.raises(MissingPathError):
    cli.run_absl(tool, ['prog', f'--config={nope}', '--verbosity=0'])


# -- parity ----------------------------------------------------------------------------------------

def _fixture_dir(tmp_path, dinov2_json: bytes, io_bytes: bytes | None = None):
  d = tmp_path / 'fx'
  d.mkdir(parents=True)
  (d / 'dinov2.json').write_bytes(dinov2_json)
  if io_bytes is None:
    np.savez(d / 'dinov2_io.npz', images=np.zeros((1, 3, 4, 4), np.float32))
  else:
    (d / 'dinov2_io.npz').write_bytes(io_bytes)
  return str(d)


def test_parity_missing_directory_and_file(tmp_path):
  nope = str(tmp_path / 'nope')
  _one_line(cli.run, parity.main, ['--fixtures', nope], 'fixture directory not found', nope,
            'fix --fixtures')
  d = _fixture_dir(tmp_path, b'{"embed_dim": 48, "depth": 1, "num_heads": 3, "img_size": 56}')
  _one_line(cli.run, parity.main, ['--fixtures', d], f'{d}/dinov2.safetensors', 'not found',
            '(fix --fixtures)')


def test_parity_garbage_files(tmp_path, garbage):
  d = _fixture_dir(tmp_path, b'{}', io_bytes=open(garbage('g.npz'), 'rb').read())
  _one_line(cli.run, parity.main, ['--fixtures', d], f'{d}/dinov2_io.npz: corrupt zip archive',
            '(fix --fixtures)')
  with pytest.raises(CheckpointFormatError):
    cli.run(parity.main, ['--fixtures', d, '--verbosity=1'])
  d2 = _fixture_dir(tmp_path / 'b', b'\x00\xff not json')
  _one_line(cli.run, parity.main, ['--fixtures', d2], f'{d2}/dinov2.json is not valid JSON')


def test_parity_fixture_json_without_an_entry(tmp_path):
  d = _fixture_dir(tmp_path, b'{"depth": 1}')
  _one_line(cli.run, parity.main, ['--fixtures', d], f'{d}/dinov2.json has no entry', "'embed_dim'")


# -- perf_suite ------------------------------------------------------------------------------------

def test_perf_suite_missing_and_garbage_inputs(tmp_path, garbage):
  nope = str(tmp_path / 'nope.jsonl')
  _one_line(cli.run, perf_suite.main, ['report', nope], f'{nope} not found', 'fix the report arguments')
  bad = garbage('suite.jsonl')
  _one_line(cli.run, perf_suite.main, ['report', bad], bad, 'fix the report arguments')
  lines = tmp_path / 'lines.jsonl'
  lines.write_text('{"side": "ours"}\nnot json\n')
  _one_line(cli.run, perf_suite.main, ['report', str(lines)], f'{lines}:2 is not a JSON line')
  doc = tmp_path / 'doc.md'
  doc.write_text('# no markers\n')
  lines.write_text('{"side": "ours"}\n')
  _one_line(cli.run, perf_suite.main, ['report', str(lines), '--write', str(doc)],
            f'{doc} has no', 'fix --write')
  with pytest.raises(MissingPathError):
    cli.run(perf_suite.main, ['report', nope, '--verbosity=1'])


def test_perf_suite_wrong_config_argument(tmp_path):
  out = ['--out', str(tmp_path)]
  _one_line(cli.run, perf_suite.main, ['run', 'ours', *out, '--only', 'ar_train:B:64',
                                       '--config-arg', 'tinyy'],
            "--config-arg 'tinyy'", "unknown config argument 'tinyy'")
  _one_line(cli.run, perf_suite.main, ['run', 'ours', *out, '--only', 'ar_train:Q:64'],
            "size 'Q'", 'hita_q.py', '--only')
  _one_line(cli.run, perf_suite.main, ['run', 'ours', *out, '--only', 'bogus'], '--only bogus',
            'KIND:SIZE:BATCH')
  _one_line(cli.run, perf_suite.main, ['run', 'official', *out, '--official', str(tmp_path / 'no')],
            'no CVMI-Lab/Hita checkout', 'fix --official')
  assert not os.path.exists(tmp_path / 'suite.jsonl')  # nothing ran


# -- every command line goes through the runner ----------------------------------------------------

def _main_block(path):
  tree = ast.parse(open(path).read())
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and getattr(node.test.left, 'id', None) == '__name__'):
      return ast.unparse(node)
  return None


def test_every_command_line_uses_the_runner():
  paths = (glob.glob(f'{ROOT}/hita_jax/tools/*.py') + glob.glob(f'{ROOT}/hita_jax/convert/*.py')
           + [f'{ROOT}/hita_jax/main.py'])
  blocks = {os.path.relpath(p, ROOT): _main_block(p) for p in paths}
  blocks = {p: b for p, b in blocks.items() if b}
  assert {'hita_jax/tools/convert.py', 'hita_jax/tools/parity.py', 'hita_jax/tools/bench.py',
          'hita_jax/convert/gpt.py', 'hita_jax/main.py'} <= set(blocks)
  for path, block in blocks.items():
    assert 'cli.run' in block or 'cli.moved' in block or 'cli()' in block, (path, block)
  assert 'run_absl' in open(f'{ROOT}/hita_jax/main.py').read()
  assert 'cli.moved' in open(f'{ROOT}/hita_jax/convert/__main__.py').read()
  assert UserError in CheckpointFormatError.__mro__
