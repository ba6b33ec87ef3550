"""The package's layer order (README, "Layout"): imports run downward only, and `convert/` is reached
only through the loading module. Checked on the source, every import statement (also those inside
functions)."""
import ast
import os

from tests.conftest import ROOT

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    {'sharding', 'errors'},                                 # mesh and logical axes; user errors
    {'models'},                                             # NNX modules, sampler, resize kernels
    {'convert', 'checkpoint', 'pretrained', 'config_lib',   # weights (files -> models) and config schema;
     'cli'},                                                # the command lines' error contract (reads configs)
    {'data', 'metrics'},                                    # pixels, sources, codes; FID/IS/PSNR/FLOPs
    {'training', 'staging', 'tasks'},                       # shared trainer plumbing, one module per task
    {'main'},                                               # the entry point
]
BESIDE = {'tools'}  # tools may use anything but main


def _unit(module: str) -> str:
  """'hita_jax.models.gpt' -> 'models'."""
  return module.split('.')[1] if module.count('.') else ''


def _imports(path: str):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('hita_jax'):
      if node.module == 'hita_jax':
        yield from (f'hita_jax.{a.name}' for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith('hita_jax.'))


def _modules():
  pkg = os.path.join(ROOT, 'hita_jax')
  for d, _, files in os.walk(pkg):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
        yield rel, os.path.join(d, f)


def _rank(unit: str) -> int | None:
  return next((i for i, layer in enumerate(LAYERS) if unit in layer), None)


def test_every_module_has_a_layer():
  units = {_unit(m) for m, _ in _modules()} - {'__init__', ''}
  assert units <= set().union(*LAYERS) | BESIDE, units - set().union(*LAYERS) - BESIDE


def test_imports_run_downward_only():
  bad = []
  for module, path in _modules():
    src = _unit(module)
    if src in ('__init__', ''):
      continue
    for target in _imports(path):
      dst = _unit(target)
      if src in BESIDE:
        ok = dst != 'main'
      else:
        ok = dst not in BESIDE and _rank(dst) is not None and _rank(dst) <= _rank(src)
      if not ok:
        bad.append(f'{module} imports {target}')
  assert not bad, bad


def test_convert_is_reached_only_through_the_loading_module():
  bad = [f'{m} imports {t}' for m, p in _modules() if _unit(m) in ('tasks', 'models', 'training')
         for t in _imports(p) if _unit(t) == 'convert']
  assert not bad, bad


def test_every_task_is_a_module_named_as_its_config_value():
  from hita_jax import tasks  # not hita_jax.main: its absl flags may clash with a tool's
  assert tasks.available_tasks() == ['demo', 'evaluate', 'extract_codes', 'fid', 'inpaint', 'linear_probe',
                                    'sample', 'style_transfer', 'train_ar', 'train_tokenizer']


def test_unknown_task_error_lists_the_task_modules(tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', '--config=configs/demo.py',
                      '--config.task=train_gan', f'--workdir={tmp_path}'], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert 'no hita_jax/tasks/train_gan.py' in r.stderr and "'evaluate', 'extract_codes'" in r.stderr
