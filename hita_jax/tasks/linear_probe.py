"""The `linear_probe` task (paper Tables 2 / 5 / 7): are the holistic tokens semantic?

Features come from the tokenizer's final causal transformer (the holistic encoder's output, before
the quantizer's projection), extracted once with the tokenizer frozen, the batch split over every
device. Feature sets (`linear_probe.features`), each pooled to the transformer width:
  `holistic`       mean of the S holistic tokens;
  `holistic_flat`  the S holistic tokens concatenated (S x D: 512 on the demo, 65536 at full size);
  `patch_mean`     mean of the patch tokens;
  `sequence_mean`  mean of the whole latent sequence (holistic + patch tokens).
The probe follows MAE's linear-probing protocol: BatchNorm without affine parameters (eps 1e-6)
before a linear layer (weights N(0, 0.01), truncated; bias 0), LARS (or SGD) with momentum 0.9,
lr = base_lr x batch / 256, linear warm-up then cosine decay to 0, no weight decay, cross-entropy;
top-1 on a held-out split (the images after the training ones in a fixed random order).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hita_jax import config_lib, pretrained, sharding
from hita_jax.data.images import to_unit
from hita_jax.data.sources import labelled_images
from hita_jax.training import classifier_step

FEATURE_SETS = ('holistic', 'holistic_flat', 'patch_mean', 'sequence_mean')


def _pooled(tok, images_u8):
  _, _, aux = tok.encode_pre_quant(to_unit(images_u8), return_intermediates=True)
  hol = aux['e_causal_holistic'].astype(jnp.float32)                      # (B, S, D)
  patch = aux['e_causal_patch'].astype(jnp.float32)
  patch = patch.reshape(patch.shape[0], -1, patch.shape[-1])               # (B, N, D)
  return {'holistic': hol.mean(1), 'holistic_flat': hol.reshape(hol.shape[0], -1),
          'patch_mean': patch.mean(1),
          'sequence_mean': jnp.concatenate([hol, patch], 1).mean(1)}


class FeatureExtractor:
  """images_u8 -> {feature set: (N, D) float32}: the tokenizer replicated, each batch split over the
  mesh's devices (all by default); compiled once (the last batch is padded)."""

  def __init__(self, tok, *, batch: int = 256, mesh=None):
    tok.eval()
    self.mesh = mesh or sharding.make_mesh([('data', -1)])
    n_dev = self.mesh.devices.size
    self.batch = max(n_dev, -(-batch // n_dev) * n_dev)
    self.in_sharding = sharding.batch_sharding(self.mesh, [('batch', ('data',))], 4)
    graph, state = nnx.split(tok)
    self.state = jax.device_put(state, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self._fn = jax.jit(lambda st, x: _pooled(nnx.merge(graph, st), x))

  def __call__(self, images_u8: np.ndarray) -> dict:
    b, outs = self.batch, []
    for i in range(0, len(images_u8), b):
      x = np.asarray(images_u8[i:i + b])
      real = len(x)
      if real < b:
        x = np.concatenate([x, np.zeros((b - real,) + x.shape[1:], x.dtype)])
      out = self._fn(self.state, jax.device_put(x, self.in_sharding))
      outs.append({k: np.asarray(v)[:real] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def extract_features(tok, images_u8: np.ndarray, *, batch: int = 256, mesh=None) -> dict:
  """{feature set: (N, D) float32} of `images_u8` (see FeatureExtractor)."""
  return FeatureExtractor(tok, batch=batch, mesh=mesh)(images_u8)


class LinearProbe(nnx.Module):
  """MAE's head: BatchNorm1d(affine=False, eps=1e-6) then Linear (trunc-normal std 0.01 weights)."""

  def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
    self.norm = nnx.BatchNorm(dim, use_bias=False, use_scale=False, epsilon=1e-6, momentum=0.9,
                              rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, kernel_init=nnx.initializers.truncated_normal(0.01),
                           rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(x))


def _optimizer(pc, steps_per_epoch: int):
  total = max(1, pc.epochs * steps_per_epoch)
  lr = pc.base_lr * pc.batch_size / 256
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(pc.warmup_epochs * steps_per_epoch, total - 1),
                                                total, end_value=0.0)
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  if pc.optimizer == 'lars':  # MAE: no weight decay / trust ratio on biases
    return optax.lars(schedule, weight_decay=pc.weight_decay, weight_decay_mask=matrices,
                      trust_ratio_mask=matrices, momentum=pc.momentum)
  if pc.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(pc.weight_decay, matrices),
                       optax.sgd(schedule, momentum=pc.momentum))
  raise ValueError(f"linear_probe.optimizer={pc.optimizer!r}: use 'lars' or 'sgd'")


def train_probe(x_train, y_train, x_test, y_test, num_classes: int, pc, *, seed: int = 0) -> dict:
  """Trains one probe (`pc`: the linear_probe section); returns train / test top-1."""
  n = len(x_train)
  bs = min(pc.batch_size, n)
  steps = n // bs
  model = LinearProbe(x_train.shape[1], num_classes, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, _optimizer(pc, steps), wrt=nnx.Param)

  @nnx.jit
  def predict(model, x):
    return jnp.argmax(model(x), -1)

  rng = np.random.default_rng(seed)
  xt, yt = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.int32)
  for _ in range(pc.epochs):
    order = jnp.asarray(rng.permutation(n)[:steps * bs].reshape(steps, bs))
    for idx in order:
      loss = classifier_step(model, opt, xt[idx], yt[idx])
  model.eval()
  top1 = lambda x, y: float(np.mean(np.asarray(predict(model, jnp.asarray(x, jnp.float32))) == y))  # noqa: E731
  return {'test_top1': top1(x_test, y_test), 'train_top1': top1(x_train, y_train),
          'final_loss': float(loss), 'steps': int(pc.epochs * steps)}


def probe_all(feats_train: dict, y_train, feats_test: dict, y_test, num_classes: int, pc,
              sets=FEATURE_SETS, seed: int = 0) -> dict:
  out = {}
  for name in sets:
    if name not in feats_train:
      raise ValueError(f'unknown linear-probe feature set {name!r}; valid: {FEATURE_SETS}')
    out[name] = train_probe(feats_train[name], y_train, feats_test[name], y_test, num_classes, pc,
                            seed=seed)
  return out


def run(config, workdir: str):
  pc = config.linear_probe
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                  dinov2=config.init.get('dinov2'))
  sets = [s.strip() for s in pc.features.split(',') if s.strip()]
  # images are decoded chunk by chunk (ImageNet does not fit in memory), features kept
  total, chunk = pc.train_images + pc.test_images, 16 * pc.extract_batch
  parts, labels = [], []
  extractor = FeatureExtractor(tok, batch=pc.extract_batch)
  for start in range(0, total, chunk):
    images, labs = labelled_images(config.data, tcfg.image_size, min(chunk, total - start),
                                   skip=start, seed=config.seed)
    parts.append(extractor(images))
    labels.append(labs)
    print(f'  features of {start + len(images)}/{total} images', flush=True)
  feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  labels = np.concatenate(labels)
  num_classes = int(config.gpt.num_classes) if 'gpt' in config else int(labels.max()) + 1
  k = pc.train_images
  report = probe_all({n: f[:k] for n, f in feats.items()}, labels[:k],
                     {n: f[k:] for n, f in feats.items()}, labels[k:], num_classes, pc, sets,
                     seed=config.seed)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'linear_probe.json'), 'w') as f:
    json.dump(report, f, indent=1)
  for name, r in report.items():
    print(f"linear probe {name}: top-1 {100 * r['test_top1']:.1f} % held out "
          f"({100 * r['train_top1']:.1f} % train)", flush=True)
  return report
