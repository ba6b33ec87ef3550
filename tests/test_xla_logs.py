"""XLA compile-log summaries (tools/xla_logs): pass timers and autotune logs, on log text in the
formats XLA 0.11's GPU compiler writes (lines copied from a 2026-12-06 H100 run)."""
import gzip
import json

import pytest

from hita_jax.errors import UserError
from hita_jax.tools import xla_logs

LOG = """\
I1206 18:49:50.013719   10943 hlo_pass_pipeline.cc:206] HLO pass: algsimp time: 6 us (6 us) (cumulative: 6 us, max: 6 us, #called: 1)
=== tok_compile: compile ship
I1206 18:50:01.000000   10943 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module jit_train_step: optimization
I1206 18:50:02.000000   10943 hlo_pass_pipeline.cc:206] HLO pass: algsimp time: 250 ms (250 ms) (cumulative: 1 s, max: 250 ms, #called: 9)
I1206 18:50:40.000000   10943 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 36.20 s (36200000 us) (cumulative: 40 s, max: 36.2 s, #called: 10)
I1206 18:51:00.000000   10943 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module cudnn-conv.327: autotune
I1206 18:51:00.100000   10943 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 60 ms (60 ms) (cumulative: 40 s, max: 36.2 s, #called: 11)
I1206 18:51:30.000000   10943 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 45.40 s (45400000 us) (cumulative: 86 s, max: 45.4 s, #called: 12)
I1206 18:52:37.660081   10943 gpu_compiler.cc:2345] GpuCompiler::RunHloPasses for jit_train_step time: 1.52 min (91115463 us) (cumulative: 2.18 min, max: 1.52 min, #called: 39)
I1206 18:52:47.379750   10943 gpu_compiler.cc:3017] GpuCompiler::RunBackend for jit_train_step time: 9.72 s (9719655 us) (cumulative: 24.3 s, max: 10.9 s, #called: 39)
"""

AUTOTUNE = """\
device: "699b92c0fb30cb16"
instruction_profiles {
  hlo_fingerprint: "a"
  config_profiles {
    config {
      backend: CUBLASLT
    }
    run_time {
      nanos: 9440
    }
  }
}
instruction_profiles {
  hlo_fingerprint: "b"
  config_profiles {
    config {
      backend: CUDNN
    }
    run_time {
      nanos: 62496
    }
  }
  config_profiles {
    config {
      backend: CUDNN
    }
    run_time {
      nanos: 50000
    }
  }
  config_profiles {
    config {
      backend: CUDNN
    }
  }
  config_profiles {
    config {
      backend: CUDNN
    }
    run_time {
      seconds: 1
      nanos: 1000000
    }
  }
}
"""


def test_pass_times_sum_by_pass_after_the_marker(tmp_path, capsys):
  path = tmp_path / 'err.gz'
  with gzip.open(path, 'wt') as f:
    f.write(LOG)
  res = xla_logs.pass_times(xla_logs._lines(str(path)), after='=== tok_compile: compile ship')
  assert res['passes']['algsimp'] == [pytest.approx(0.25), 1]  # the line before the marker is left out
  assert res['passes']['priority-fusion'] == [pytest.approx(36.26), 2]  # summed over modules
  assert res['passes']['config-assigner'][0] == pytest.approx(45.4)
  assert res['stages'][('RunHloPasses', 'jit_train_step')] == pytest.approx(91.2)  # '1.52 min'
  assert res['stages'][('RunBackend', 'jit_train_step')] == pytest.approx(9.72)
  xla_logs.main(['passes', str(path), '--after', '=== tok_compile'])
  out = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert out['passes_total_s'] == pytest.approx(0.25 + 36.26 + 45.4)
  with pytest.raises(UserError, match='no line of the log contains'):
    xla_logs.pass_times(LOG.splitlines(), after='=== never')


def test_autotune_summary_counts_configs_per_backend(tmp_path):
  res = xla_logs.autotune_summary(AUTOTUNE)
  assert res['CUBLASLT'] == {'instructions': 1, 'configs': 1, 'timed': 1, 'best_s': pytest.approx(9.44e-6),
                             'max_configs': 1, 'timed_s': pytest.approx(9.44e-6)}
  assert res['CUDNN'] == {'instructions': 1, 'configs': 4, 'timed': 3, 'best_s': pytest.approx(5e-5),
                          'max_configs': 4, 'timed_s': pytest.approx(1.001112496)}
  with pytest.raises(UserError, match='no instruction_profiles'):
    xla_logs.autotune_summary('device: "x"\n')


def test_bad_log_paths_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.txt not found'):
    list(xla_logs._lines(str(tmp_path / 'nope.txt')))
  bad = tmp_path / 'bad.gz'
  bad.write_bytes(b'not gzip at all')
  with pytest.raises(UserError, match='bad.gz could not be read'):
    list(xla_logs._lines(str(bad)))


FUSION_LOG = """\
I1206 23:59:50.000000   10943 priority_fusion.cc:170] Running full HLO cost analysis for main.7
I1206 23:59:58.000000   10943 priority_fusion.cc:900] Fusing %slice.4 = f32[8]{0} slice(%concatenate.1), slice={[0:8]}, metadata={op_name="jit(step)/slice" source_file="/x/hita_jax/training.py" source_line=88} into %add.5 = f32[8]{0} add(%slice.4, %p.2), metadata={op_name="jit(step)/add"}
I1206 23:59:58.500000   10943 priority_fusion.cc:900] Fusing %slice.9 = f32[8]{0} slice(%concatenate.1), slice={[8:16]}, metadata={op_name="jit(step)/slice" source_file="/x/hita_jax/training.py" source_line=88} into %add.6 = f32[8]{0} add(%slice.9, %p.3)
I1207 00:00:08.500000   10943 priority_fusion.cc:900] Fusing %multiply.12 = (f32[2]{0}, f32[2]{0}) multiply(%a.1, %b.1), metadata={op_name="jit(step)/jvp(conv)/mul_17"} into %fusion.2 = f32[2]{0} fusion(%multiply.12), kind=kLoop
I1207 00:00:09.000000   10943 priority_fusion.cc:900] Fusing %exponential.3 = f32[2]{0} exponential(%x.1) into %fusion.2 = f32[2]{0} fusion(%exponential.3), kind=kLoop
I1207 00:00:09.000000   10943 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 19 s
I1207 00:00:10.000000   10943 priority_fusion.cc:170] Running full HLO cost analysis for cudnn-conv.1
"""


def test_fusion_times_charge_each_gap_to_the_fused_producer(tmp_path, capsys):
  res = xla_logs.fusion_times(FUSION_LOG.splitlines())
  main, conv = res['computations']
  assert main['name'] == 'main.7' and main['fusions'] == 4
  assert main['initial_s'] == pytest.approx(8.0)  # cost analysis to the first fusion
  assert main['fusing_s'] == pytest.approx(11.0)  # across midnight
  assert conv == {'name': 'cudnn-conv.1', 'initial_s': 0.0, 'fusing_s': 0.0, 'fusions': 0}
  # 0.5 s after the first slice, 10 s after the second (the re-pricing), 0.5 s after the multiply
  assert res['by_source']['hita_jax/training.py:88'] == [pytest.approx(10.5), 2]
  assert res['by_source']['jit(step)/jvp(conv)/mul_#'] == [pytest.approx(0.5), 1]
  assert res['by_source']['(exponential, no metadata)'] == [0.0, 1]  # nothing after the last
  assert res['by_opcode']['slice'] == [pytest.approx(10.5), 2]
  assert res['by_opcode']['multiply'][1] == 1  # a tuple-shaped producer's opcode
  assert res['top'][0] == (pytest.approx(10.0), 'slice.9', 'hita_jax/training.py:88')
  path = tmp_path / 'err.txt'
  path.write_text(FUSION_LOG)
  xla_logs.main(['fusion', str(path)])
  out = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert out['computations'][0]['name'] == 'main.7'
  with pytest.raises(UserError, match='priority_fusion=2'):
    xla_logs.fusion_times(LOG.splitlines())


TIMELINE = """\
I1207 10:00:00.000000   100 config_assigner.cc:133] Finding configs for 2 unique instructions.
=== tok_compile: compile ship
I1207 10:00:01.000000   100 config_assigner.cc:133] Finding configs for 3 unique instructions.
I1207 10:00:01.000000   100 config_assigner.cc:341] Getting tuned config for HLO: %cudnn-conv.1 = (bf16[16,336,336,128]{3,2,1,0}, u8[0]{0}) custom-call(...)
I1207 10:00:01.500000   100 config_assigner.cc:341] Getting tuned config for HLO: %cudnn-conv.2 = (bf16[16,21,21,512]{3,2,1,0}, u8[0]{0}) custom-call(...)
I1207 10:00:01.700000   201 autotuner.cc:228] Using runner 0
I1207 10:00:01.800000   201 config_runner.cc:89] Validating outputs via clustering across 40 config(s).
I1207 10:00:02.000000   100 config_assigner.cc:341] Getting tuned config for HLO: %cudnn-conv.3 = (bf16[16,84,84,256]{3,2,1,0}, u8[0]{0}) custom-call(...)
I1207 10:00:02.100000   202 autotuner.cc:228] Using runner 0
I1207 10:00:03.790000   201 config_runner.cc:216] Output clustering formed 2 cluster(s); selected cluster 0 with 1 member(s), trusted=false
I1207 10:00:03.800000   201 autotuner.cc:253] {CUDNN :  duration: 2.1ms, scratch_bytes: 4194576}
I1207 10:00:03.800010   201 autotuner.cc:253] {CUDNN :  WRONG RESULTS: Output disagrees with winning cluster (member of cluster 1 of 2; winning cluster has 1 member(s), trusted=0).
I1207 10:00:03.900000   202 config_runner.cc:89] Validating outputs via clustering across 12 config(s).
I1207 10:00:04.400000   202 autotuner.cc:253] {CUDNN :  duration: 75.5ms, scratch_bytes: 0}
I1207 10:00:04.500000   203 autotuner.cc:187] Found only one supported config: cudnn : algorithm { algo_id: 0 }
"""


def test_autotune_timeline_splits_enumeration_compiles_and_serial_timing(tmp_path, capsys):
  """The autotuner's phases from its VLOG timestamps: the compiling thread's enumeration gaps,
  the candidate compiles' completion times and the serial timing windows (from 'Validating' to
  the first profile line after it), relative to the first autotuner line after the marker."""
  res = xla_logs.autotune_timeline(TIMELINE.splitlines(), after='=== tok_compile: compile ship')
  assert res['instructions'] == 3
  assert res['enumerate'] == {'first_last_s': [0.0, 1.0], 'gaps_sum_s': 1.0, 'max_gap_s': 0.5}
  assert res['compiled'] == {'count': 2, 'first_last_s': [0.7, 1.1]}
  assert res['timed']['count'] == 2 and res['timed']['first_last_s'] == [0.8, 2.9]
  assert res['timed']['windows_sum_s'] == pytest.approx(2.0 + 0.5)
  assert res['timed']['max_window_s'] == pytest.approx(2.0)
  assert res['span_s'] == pytest.approx(3.4)  # to the last profile line ('Found only' is not one)
  # per configuration: two timed (2.1 ms, 75.5 ms), one rejected; the windows' 2.5 s beyond the runs
  k = res['configs']
  assert (k['timed'], k['wrong_results'], k['failed']) == (2, 1, 0)
  assert k['runs_s'] == pytest.approx(0.078, abs=1e-3) and k['slow_50ms'] == [1, pytest.approx(0.0755, abs=1e-3)]
  assert k['beyond_run_ms'] == pytest.approx(1e3 * (2.5 - 0.0776) / 3, abs=0.01)
  path = tmp_path / 'err'
  path.write_text(TIMELINE)
  xla_logs.main(['timeline', str(path)])
  out = capsys.readouterr().out.splitlines()
  assert json.loads(out[-1])['instructions'] == 3 and out[0].startswith('3 instructions')
  assert '2 timed' in out[4] and '1 wrong results' in out[4] and 'ms a configuration beyond its run' in out[4]
  xla_logs.main(['timeline', str(path), '--after', '=== tok_compile: compile ship'])
  xla_logs.main(['timeline', str(tmp_path / 'err'), '--after', 'Found only'])  # nothing after it
  assert 'no autotuner lines' in capsys.readouterr().out


def _instruction(target: str, configs) -> str:
  """One autotune-log instruction in XLA 0.11.2's textproto: cuDNN configs (engine, run ns[,
  knob 2's value])."""
  rows = ''.join(f"""  config_profiles {{
    config {{
      backend: CUDNN
      backend_config {{
        algorithm {{
          algo_id: {algo}
          tuning_knobs {{
            key: 2
            value: {knob[0] if knob else 3}
          }}
          tuning_knobs {{
            key: 13
            value: 1
          }}
        }}
      }}
    }}
    run_time {{
      {f'seconds: {ns // 10**9}' if ns >= 10**9 else ''}
      nanos: {ns % 10**9}
    }}
  }}
""" for algo, ns, *knob in configs)
  return (f'instruction_profiles {{\n  hlo_fingerprint: "x"\n{rows}'
          f'  hlo_text: "%cudnn-conv.1 = (bf16[16,84,84,128]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%a, %b), '
          f'custom_call_target=\\"__cudnn${target}\\", metadata={{}}"\n}}\n')


ERRATA_LOG = ('per_backend_versions {\n  key: "CUDNN"\n  value: "9.19.0"\n}\n'
              + _instruction('convForward', [(62, 100_000), (62, 140_000), (28, 1_400_000_000), (22, 160_000)])
              + _instruction('convForward', [(62, 200_000), (22, 900_000), (45, 250_000)])
              + _instruction('convBackwardFilter', [(65, 50_000), (28, 500_000)])
              # fused calls are left alone, however slow
              + _instruction('convBiasActivationForward', [(41, 10_000), (7, 9_000_000)]))


def test_errata_cut_engines_never_near_the_best_of_their_kind(tmp_path, capsys):
  """Per plain convolution kind, an engine stays if any configuration of it came within `within`
  x the best of some instruction; the others become cudnn-frontend rules (operation tag + engine,
  no version bounds); the fused kind is skipped."""
  res = xla_logs.cudnn_errata(ERRATA_LOG, within=1.5)
  rules = {(r['operation'], r['engine']) for r in res['errata']['rules']}
  # forward: 62 wins both; 45 is 1.25x of the second's best; 22 is 1.6x / 4.5x; 28 is never close.
  # backward filter: 28 is 10x. Fused 7 (900x) stays: its tags are not ConvFwd_engN_.
  assert rules == {('ConvFwd', 22), ('ConvFwd', 28), ('ConvBwdFilter', 28)}
  assert all(set(r) == {'rule_id', 'operation', 'engine'} for r in res['errata']['rules'])
  assert res['errata']['rules'][0]['rule_id'].startswith('hita_jax_cudnn91900_')
  k = res['summary']
  assert (k['cudnn_version'], k['plain_configs'], k['engines'], k['engines_cut'], k['configs_cut']) == \
      (91900, 9, 6, 3, 4)
  assert k['runs_cut_s'] == pytest.approx(1.4 + 160e-6 + 900e-6 + 500e-6, abs=1e-3)  # rounded to ms
  # a looser bound keeps 22 (1.6x of the first's best is within 2)
  assert ('ConvFwd', 22) not in {(r['operation'], r['engine'])
                                 for r in xla_logs.cudnn_errata(ERRATA_LOG, within=2.0)['errata']['rules']}
  log, out = tmp_path / 'autotune.txt', tmp_path / 'errata.json'
  log.write_text(ERRATA_LOG)
  xla_logs.main(['errata', str(log), '--out', str(out)])
  assert json.loads(out.read_text()) == res['errata']
  assert '3 of 6 engines cut' in capsys.readouterr().out
  assert res['summary']['knob_rules'] == 0  # engine rules only without --knobs
  with pytest.raises(UserError, match='within must be >= 1'):
    xla_logs.cudnn_errata(ERRATA_LOG, within=0.5)
  with pytest.raises(UserError, match='names no cuDNN version'):
    xla_logs.cudnn_errata(ERRATA_LOG.split('}\n', 1)[1])
  with pytest.raises(UserError, match='no instruction_profiles'):
    xla_logs.cudnn_errata('device: "x"\n')


def test_errata_knob_rules_cut_settings_and_never_a_kept_one():
  """With knobs, a kept engine's settings that never came near the best become rules listing
  their knobs ('_k2=30', as cudnn-frontend matches substrings of 'ConvFwd_eng62_k2=30_k13=1'),
  unless the rule would match a kept setting too ('_k2=3' is in '_k2=30')."""
  log = ('per_backend_versions {\n  key: "CUDNN"\n  value: "9.19.0"\n}\n'
         + _instruction('convForward', [(62, 100_000, 3), (62, 900_000, 30), (62, 800_000, 7)])
         + _instruction('convForward', [(62, 50_000, 30), (62, 400_000, 3), (62, 300_000, 5), (1, 9_000_000, 3)]))
  res = xla_logs.cudnn_errata(log, within=1.5, knobs=True)
  rules = res['errata']['rules']
  # engine 1 never close: an engine rule. Engine 62: k2=3 and k2=30 each won once (kept); k2=7
  # and k2=5 never did, and their rules match neither kept tag
  assert rules[0] == {'rule_id': 'hita_jax_cudnn91900_ConvFwd_eng1', 'operation': 'ConvFwd', 'engine': 1}
  assert sorted(r['knob'] for r in rules[1:]) == [['_k2=5', '_k13=1'], ['_k2=7', '_k13=1']]
  assert rules[1]['rule_id'] == 'hita_jax_cudnn91900_ConvFwd_eng62_k2=5_k13=1'
  k = res['summary']
  assert (k['engines_cut'], k['knob_rules'], k['knob_rules_dropped'], k['configs_cut'], k['plain_configs']) == \
      (1, 2, 0, 3, 7)
  # a never-close k2=3 beside a winning k2=30: its rule would block k2=30 too, so it is left out
  clash = ('per_backend_versions {\n  key: "CUDNN"\n  value: "9.19.0"\n}\n'
           + _instruction('convForward', [(62, 100_000, 30), (62, 900_000, 3)]))
  res = xla_logs.cudnn_errata(clash, within=1.5, knobs=True)
  assert res['errata']['rules'] == [] and res['summary']['knob_rules_dropped'] == 1
