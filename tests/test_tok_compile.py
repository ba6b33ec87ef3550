"""hita_jax.tools.tok_compile: the tokenizer trainer's first-step breakdown (build, trace, lower,
compile per XLA option set, steady step) on the CPU demo config."""
import json
import math
import re

import pytest

from hita_jax.tools import ab, tok_compile
from tests.conftest import ROOT


def test_option_sets_parse_and_bad_ones_name_the_fix():
  assert ab.parse_xla_option_set('default:') == ('default', {})
  assert ab.parse_xla_option_set('x:xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false') == (
      'x', {'xla_gpu_autotune_level': 0, 'xla_gpu_enable_triton_gemm': False})
  with pytest.raises(ValueError, match='NAME:xla_option=value'):
    ab.parse_xla_option_set('x:xla_gpu_autotune_level')


@pytest.mark.slow  # ~1.5 min: two compiles of the demo step for a device-side tool
def test_breakdown_on_the_demo_tokenizer(tmp_path, monkeypatch):
  """Build, trace, lower, compile per option set (an option XLA does not know is reported and
  skipped before the build), the optimized HLO's counts, a profile, and an exported step that a
  second run compiles without building."""
  monkeypatch.setenv('OUT', str(tmp_path))
  exp = tmp_path / 'step.exp'
  tok_compile.main(['--config', f'{ROOT}/configs/demo.py:fast', '--batch', '2', '--steps', '1',
                    '--options', 'no_fast_math:xla_cpu_enable_fast_math=false',
                    'bogus:xla_no_such_option_anywhere=1', '--save-hlo',
                    '--profile', str(tmp_path / 'trace'), '--export', str(exp)])
  recs = [json.loads(x) for x in open(tmp_path / 'tok_compile.jsonl')]
  assert recs[0]['stage'] == 'check_options' and recs[0]['options'] == 'bogus'
  assert 'xla_no_such_option_anywhere' in recs[0]['error']
  recs = recs[1:]
  assert [r['stage'] for r in recs] == ['build', 'trace', 'trace_cheap_probes', 'lower', 'export',
                                        'compile', 'profile']
  del recs[4]
  assert recs[4]['options'] == 'no_fast_math' and recs[4]['xla'] == {'xla_cpu_enable_fast_math': False}
  # the config's GPU-only options are not merged on this CPU backend, and the record says so
  assert all(r['config_xla'] == {} for r in recs)
  assert recs[3]['hlo_lines'] > 1000
  # the lowered ops by source: every op charged once, most to the model's own lines
  census = recs[3]
  assert census['stablehlo_ops'] > 1000
  assert sum(census['ops_by_file'].values()) == census['stablehlo_ops']
  assert census['ops_by_file'].get('?', 0) < census['stablehlo_ops'] / 4
  assert any(f.startswith('hita_jax/models/') for f in census['ops_by_file'])
  counts = [n for n, _ in census['ops_top_lines']]
  assert counts == sorted(counts, reverse=True) and len(counts) == 15
  assert recs[4]['s'] > 0 and recs[4]['images_s'] > 0 and math.isfinite(recs[4]['g_loss'])
  hlo = recs[4]['hlo']
  assert hlo['instructions'] > 100 and hlo['fusions'] > 10
  import gzip
  with gzip.open(tmp_path / 'tok_step_no_fast_math.hlo.txt.gz', 'rt') as f:
    assert tok_compile.hlo_stats(f.read()) == hlo
  assert recs[5]['options'] == 'no_fast_math' and recs[5]['kinds']
  # the exported step compiles in a run that builds nothing
  (tmp_path / 'tok_compile.jsonl').unlink()
  tok_compile.main(['--from-export', str(exp), '--steps', '1', '--options', 'default:',
                    '--profile', str(tmp_path / 'prof2')])
  recs = [json.loads(x) for x in open(tmp_path / 'tok_compile.jsonl')]
  assert [r['stage'] for r in recs] == ['lower', 'compile', 'profile']
  assert recs[2]['options'] == 'default' and recs[2]['kinds']
  assert recs[1]['s'] > 0 and recs[1]['step_s'] > 0 and recs[1]['hlo']['fusions'] > 10
  assert recs[1]['batch'] == 2  # read from the exported image input


def test_op_census_charges_each_lowered_op_to_its_innermost_line_of_ours():
  import jax
  import jax.numpy as jnp
  from hita_jax.models import layers
  x = jnp.ones((2, 4, 4, 8))
  lowered = jax.jit(lambda x, s, b: layers.group_norm(x, s, b, 4, 1e-6, True)).lower(
      x, jnp.ones(8), jnp.zeros(8))
  text = lowered.as_text(debug_info=True)
  census = tok_compile.op_census(text, top=3)
  body = [ln for ln in text.splitlines()
          if re.match(r'\s*%[\w#:]+ = "?(stablehlo|chlo)\.', ln)]  # every op here has a result
  assert census['stablehlo_ops'] == len(body) > 10
  # the forward's ops come from layers.py (the statistics, the normalisation, the swish), but for
  # the scalar constants (count, eps) JAX places at the custom VJP's call site, here this test
  assert set(census['ops_by_file']) <= {'hita_jax/models/layers.py', '?'}
  assert census['ops_by_file'].get('?', 0) <= 3 < census['ops_by_file']['hita_jax/models/layers.py']
  assert len(census['ops_top_lines']) == 3
  assert all(k.startswith('hita_jax/models/layers.py:') for _, k in census['ops_top_lines'])


def test_config_overrides_set_typed_values_and_name_bad_keys():
  from hita_jax import config_lib
  from hita_jax.errors import UserError
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  assert tok_compile.apply_overrides(config, ['tokenizer.dinov2_scan=True',
                                              'train_tokenizer.lr=2e-4']) == {
      'tokenizer.dinov2_scan': True, 'train_tokenizer.lr': 2e-4}
  assert config.tokenizer.dinov2_scan is True and config.train_tokenizer.lr == 2e-4
  with pytest.raises(UserError, match="no key 'tokenizer.no_such_switch'"):
    tok_compile.apply_overrides(config, ['tokenizer.no_such_switch=1'])
  with pytest.raises(UserError, match='KEY=VALUE'):
    tok_compile.apply_overrides(config, ['tokenizer.dinov2_scan'])
  with pytest.raises(TypeError):  # the ConfigDict keeps a field's type
    tok_compile.apply_overrides(config, ['tokenizer.dinov2_scan=fast'])


def test_custom_call_targets_are_read_off_the_lowered_text():
  # the export allows exactly these (cuDNN attention is one on GPU; jax.export refuses it otherwise)
  text = ('%1 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%0) {api_version = 2 : i32}\n'
          '%2:4 = stablehlo.custom_call @__cudnn$fmhaSoftmaxBackward(%1) : (tensor<2xf32>)\n'
          '%3 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%2#0)\n'
          '%4 = stablehlo.add %3, %3 : tensor<2xf32>\n')
  assert tok_compile.custom_call_targets(text) == ['__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward']
  assert tok_compile.custom_call_targets('%4 = stablehlo.add %3, %3') == []


def test_layer_switches_split_from_config_overrides_and_are_checked(monkeypatch):
  """`--set layers.NAME=VALUE` (or training.NAME=VALUE) sets a module switch (read when the step is traced), the
  other items stay config overrides; an unknown switch or value is named."""
  from hita_jax.errors import UserError
  from hita_jax.models import layers
  from hita_jax.tools import ab
  rest, switches = ab.split_layer_switches(['tokenizer.dinov2_scan=True', 'layers.CONV_1X1=gemm'])
  assert rest == ['tokenizer.dinov2_scan=True'] and switches == {'layers.CONV_1X1': 'gemm'}
  monkeypatch.setattr(layers, 'CONV_1X1', 'conv')
  assert ab.trace_switch_values(switches) == {'layers.CONV_1X1': 'conv'}
  ab.set_layer_switches(switches)
  assert layers.CONV_1X1 == 'gemm'
  from hita_jax import training
  monkeypatch.setattr(training, 'FLAT_CONCAT_GROUP', 0)
  _, group = ab.split_layer_switches(['training.FLAT_CONCAT_GROUP=23'])
  ab.set_layer_switches(group)
  assert group == {'training.FLAT_CONCAT_GROUP': 23} and training.FLAT_CONCAT_GROUP == 23
  from hita_jax.models import lpips
  monkeypatch.setattr(lpips, 'TAP_NORM', 'split')
  _, tap = ab.split_layer_switches(['lpips.TAP_NORM=fused'])
  ab.set_layer_switches(tap)
  assert lpips.TAP_NORM == 'fused'
  with pytest.raises(UserError, match='lpips.TAP_NORM must be one of'):
    ab.split_layer_switches(['lpips.TAP_NORM=barrier'])
  with pytest.raises(UserError, match='layers.CONV_1X1 must be one of'):
    ab.split_layer_switches(['layers.CONV_1X1=cublas'])
  with pytest.raises(UserError, match='a trace switch is one of'):
    ab.split_layer_switches(['layers.NO_SUCH=1'])
  with pytest.raises(UserError, match='is a count >= 0'):
    ab.split_layer_switches(['training.FLAT_CONCAT_GROUP=-1'])


def test_cudnn_convs_counts_each_distinct_call_once():
  """The autotuner's unit: cuDNN convolutions with the same shapes, window and epilogue count once;
  a different epilogue (bias + ReLU) or operand shape is another call."""
  cfg = ('window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, '
         'custom_call_target="__cudnn$conv{kind}", backend_config={{"cudnn_conv_backend_config":'
         '{{"activation_mode":"{act}","conv_result_scale":1,"side_input_scale":0}}}}')
  text = '\n'.join([
      'ENTRY %main {',
      '  %p0 = bf16[2,8,8,4]{3,2,1,0} parameter(0)',
      '  %p1 = bf16[4,3,3,4]{3,2,1,0} parameter(1)',
      '  %p2 = bf16[4]{0} parameter(2)',
      '  %p3 = bf16[2,8,8,16]{3,2,1,0} parameter(3)',
      '  %w2 = bf16[4,3,3,16]{3,2,1,0} parameter(4)',
      '  %c0 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), '
      + cfg.format(kind='Forward', act='kNone'),
      '  %c1 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), '
      + cfg.format(kind='Forward', act='kNone'),
      '  %c2 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1, %p2), '
      + cfg.format(kind='BiasActivationForward', act='kRelu'),
      '  %c3 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1, %p2), '
      + cfg.format(kind='BiasActivationForward', act='kNone'),
      '  %c4 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%p3, %w2), '
      + cfg.format(kind='Forward', act='kNone'),
      '  %g = bf16[2,8,8,4]{3,2,1,0} custom-call(%p0), custom_call_target="__cublas$lt$matmul"',
      '}'])
  convs = tok_compile.cudnn_convs(text)
  assert {k: len(v) for k, v in convs.items()} == {'convForward': 2, 'convBiasActivationForward': 2}
  assert tok_compile.hlo_stats(text)['cudnn_convs'] == {'convBiasActivationForward': 2,
                                                        'convForward': 2}
  assert 'cudnn_convs' not in tok_compile.hlo_stats('ENTRY %main {\n}')
