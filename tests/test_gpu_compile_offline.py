"""hita_jax.tools.gpu_compile_offline: the tokenizer step lowered for CUDA on a CPU host (the GPU
code paths), and the target description fitted to this jaxlib. (The compile itself needs the CUDA
PJRT plugin's packages, which CI does not install; it was run by hand, docs/PERFORMANCE.md.)"""
import json

import jax
import pytest

from hita_jax.errors import UserError
from hita_jax.tools import gpu_compile_offline as gco

TARGET = '''gpu_device_info {
  core_count: 132
  cuda_compute_capability {
    major: 9
  }
  reserved_shared_memory_per_block: 1024
  new_block {
    inner {
      x: 1
    }
  }
  name: "NVIDIA H100 80GB HBM3"
}
platform_name: "CUDA"
'''


def test_unknown_target_fields_are_dropped_one_by_one_and_named():
  text = gco.drop_field(TARGET, 'new_block')
  assert 'new_block' not in text and 'inner' not in text and 'x: 1' not in text
  assert 'cuda_compute_capability {' in text and 'name: "NVIDIA H100 80GB HBM3"' in text
  assert text.count('{') == text.count('}')
  seen = []

  def error(t):  # what XLA logs for a field it does not know, until none is left
    seen.append(t)
    for field in ('reserved_shared_memory_per_block', 'new_block'):
      if f'{field}' in t:
        return f'E1207 text_format.cc:378] Error parsing: 12:3: Message type "x" has no field named "{field}".'
    return ''
  fitted, dropped = gco.fit_target(TARGET, error=error)
  assert dropped == ['reserved_shared_memory_per_block', 'new_block'] and len(seen) == 3
  assert 'reserved_shared' not in fitted and 'core_count: 132' in fitted
  with pytest.raises(UserError, match='jax-cuda12-plugin'):
    gco.fit_target(TARGET, error=lambda t: 'RuntimeError: no CUDA plugin')
  with pytest.raises(UserError, match='still unreadable'):
    gco.fit_target(TARGET, error=lambda t: 'has no field named "core_count"', tries=2)


def test_the_shipped_target_is_an_h100():
  with open(gco.DEFAULT_TARGET) as f:
    text = f.read()
  assert 'core_count: 132' in text and 'platform_name: "CUDA"' in text


@pytest.mark.slow  # ~1.5 min: builds the full-size Hita-V tokenizer and lowers its step for CUDA
def test_export_lowers_the_gpu_code_paths_on_a_cpu_host(tmp_path, capsys, monkeypatch):
  from hita_jax.models import lpips
  monkeypatch.setattr(lpips, 'TAP_NORM', 'split')  # --set changes it for the process
  out = tmp_path / 'step.exp'
  gco.main(['export', '--out', str(out), '--batch', '2', '--set', 'lpips.TAP_NORM=fused'])
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec['stage'] == 'export' and rec['batch'] == 2 and rec['set'] == {'lpips.TAP_NORM': 'fused'}
  assert rec['gpu_compiler_options'] == {'xla_gpu_enable_triton_gemm': False,
                                         'xla_gpu_experimental_enable_fusion_autotuner': False}
  assert jax.default_backend() == 'cpu'  # the trace-time patch is undone
  exported = jax.export.deserialize(bytearray(out.read_bytes()))
  assert exported.platforms == ('cuda',)
  # the platform choices a GPU trace makes: cuDNN attention where the config says 'auto'
  assert any(t.startswith('__cudnn$fmha') for t in rec['custom_calls']), rec['custom_calls']
  with pytest.raises(UserError, match='not CUDA'):
    cpu = tmp_path / 'cpu.exp'
    cpu.write_bytes(jax.export.export(jax.jit(lambda x: x + 1))(1.0).serialize())
    gco.compile_export(str(cpu), 'x', {})
