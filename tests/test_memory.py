"""Mesh presets and the memory tool (#13): presets by GPT size and device count; GPT-2B's preset on
2, 4 and 8 devices lowers ahead of time (abstract arrays only: nothing is allocated) with its
parameters, AdamW state and EMA split over the devices; the same preset compiles at the CPU size."""
import pytest

from hita_jax import config_lib
from hita_jax.tools import memory
from tests.conftest import ROOT


def _config(size, arg=None):
  return config_lib.load_config(f'{ROOT}/configs/hita_{size.lower()}.py' + (f':{arg}' if arg else ''))


def test_presets_by_size_and_device_count():
  assert config_lib.mesh_spec(_config('B'), 8) == 'data=8,fsdp=1,tensor=1'
  assert config_lib.mesh_spec(_config('L'), 64) == 'data=64,fsdp=1,tensor=1'
  assert config_lib.mesh_spec(_config('XL'), 4) == 'data=1,fsdp=4,tensor=1'
  assert config_lib.mesh_spec(_config('XXL'), 32) == 'data=4,fsdp=8,tensor=1'
  assert config_lib.mesh_spec(_config('2B'), 8) == 'data=1,fsdp=8,tensor=1'
  assert config_lib.mesh_spec(_config('2B'), 64) == 'data=4,fsdp=8,tensor=2'
  config = _config('2B')
  config.mesh = 'data=2,fsdp=4,tensor=1'  # --config.mesh wins over the preset
  assert config_lib.mesh_spec(config, 8) == 'data=2,fsdp=4,tensor=1'
  with pytest.raises(ValueError, match='mesh preset'):
    config_lib.preset_mesh('zero3', 8)


def test_2b_preset_compiles_at_cpu_size():
  config = _config('2B', 'tiny')
  for n in (2, 4, 8):
    p = memory.plan(config, n)
    assert p['mesh'] == f'data=1,fsdp={n},tensor=1'
    assert p['activations'] > 0 and p['opt'] > p['params'] > 0
    assert p['total'] == p['params'] + p['opt'] + p['ema'] + p['activations']


@pytest.mark.slow
def test_gpt_2b_preset_lowers_on_2_4_8_devices_of_141gb():
  config = _config('2B')
  full = None
  for n in (2, 4, 8):
    p = memory.plan(config, n, compile_step=False)  # full size: lowered, not compiled, on CPU
    assert p['mesh'] == f'data=1,fsdp={n},tensor=1'
    full = full or p['params'] * n
    assert abs(p['params'] * n - full) / full < 0.01  # FSDP: each device holds ~1/n of the weights
    assert p['ema'] == p['params'] and abs(p['opt'] - 2 * p['params']) / p['opt'] < 0.01  # AdamW mu, nu
    assert p['params'] + p['opt'] + p['ema'] < memory.DEVICE_GB['gpu141'] * memory.HEADROOM * 1e9
  assert 7.5e9 < full < 9.5e9  # ~2.2B fp32 parameters
