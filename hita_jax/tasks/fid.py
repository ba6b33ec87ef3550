"""The `fid` task: FID-50k end to end as one command (`configs/fid.py`).

1. `sample` (the task itself: chunked, resumable, ADM `.npz`): class-conditional codes with CFG from
   the jitted KV-cache sampler, decoded by the tokenizer and resized to `sample.eval_size` (256).
2. `evaluate`'s generation metrics on that `.npz` against `evaluate.ref_npz`: Inception pool3 /
   spatial / logits, FID, sFID, IS, precision, recall, exactly as the ADM evaluator.

`<workdir>/fid_report.json` holds the metrics and the seconds of every stage (model loading,
sampler, decode, writing, reading, Inception on reference and samples, statistics, total), which
is what docs/PERFORMANCE.md compares with the official `test_net.py` + evaluator path.
"""
from __future__ import annotations

import json
import os
import time

import jax

from hita_jax import pretrained, sharding
from hita_jax.metrics.inception_features import InceptionRunner
from hita_jax.tasks import evaluate, sample


def validate(config):
  """Everything a user can get wrong, before any model is allocated."""
  init, ev = config.init, config.evaluate
  missing = [f'--config.{k}' for k, v in (('init.gpt', init.gpt), ('init.tokenizer', init.tokenizer),
                                          ('evaluate.ref_npz', ev.ref_npz)) if not v]
  if missing:
    raise ValueError(f"the fid task needs {', '.join(missing)} (GPT and tokenizer weights, and the "
                     'ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)')
  for name, path in (('init.gpt', init.gpt), ('init.tokenizer', init.tokenizer),
                     ('evaluate.ref_npz', ev.ref_npz)):
    if not os.path.exists(path):
      raise FileNotFoundError(f'--config.{name}={path}: no such file or directory')
  if config.sample.num_images < 2:
    raise ValueError('--config.sample.num_images must be at least 2 for FID statistics')


def run(config, workdir: str):
  validate(config)
  t_start = time.time()
  samples_npz = sample.run(config, workdir)
  t_sampled = time.time()
  timing_file = os.path.join(workdir, 'sample_timings.json')  # written by process 0
  stages, this_run = {}, {}
  if os.path.exists(timing_file):
    with open(timing_file) as f:
      timings = json.load(f)
    this_run = timings.pop('this_run', {})
    # summed over every run that sampled into this workdir (a resumed run adds to the first)
    stages = {f'sample_{k}': v for k, v in timings.items()}
  stages['sample_total_s'] = t_sampled - t_start
  # this run's loading of the weights, sharding and compiles: what its sampler loop did not spend
  stages['sample_setup_s'] = stages['sample_total_s'] - sum(
      this_run.get(k, 0.0) for k in ('generate_s', 'decode_s', 'write_s'))
  ev = config.evaluate
  runner = InceptionRunner(pretrained.load_inception(ev.inception_weights), batch_size=ev.batch_size)
  timings = {}
  results = evaluate.generation_metrics(runner, samples_npz, ev.ref_npz, ev.distance_dtype, timings)
  stages.update({f'evaluate_{k}': v for k, v in timings.items()})
  stages['evaluate_total_s'] = time.time() - t_sampled
  stages['total_s'] = time.time() - t_start
  report = {'metrics': results, 'stages_s': stages, 'num_images': int(config.sample.num_images),
            'cfg_scale': float(config.sample.cfg_scale), 'samples_npz': samples_npz,
            'ref_npz': ev.ref_npz, 'devices': jax.device_count(),
            'device_kind': jax.devices()[0].device_kind}
  if sharding.is_main_process():
    with open(os.path.join(workdir, 'fid_report.json'), 'w') as f:
      json.dump(report, f, indent=1)
  print(f"FID {results['fid']:.3f}  sFID {results['sfid']:.3f}  precision {results['precision']:.3f}  "
        f"recall {results['recall']:.3f}  in {stages['total_s']:.1f} s "
        f"(sampling+decode {stages['sample_total_s']:.1f} s, evaluation {stages['evaluate_total_s']:.1f} s)",
        flush=True)
  return report
