"""Our DINOv2 equals transformers' FlaxDinov2Model (transformers 4.x) on a tiny random config without
registers, both loading the same Hugging Face-layout checkpoint that this test writes."""
import json
import os

import numpy as np
import pytest
from flax import nnx

import transformers  # a required dependency (requirements.txt)
if not hasattr(transformers, 'FlaxDinov2Model'):
  pytest.skip('this transformers version has no Flax classes (removed in 5.x)', allow_module_level=True)

from hita_jax.convert.dinov2 import load_dinov2, load_hf_dinov2_dir  # noqa: E402
from hita_jax.models.dinov2 import DinoV2  # noqa: E402


def _write_hf_checkpoint(path, rng):
  c, layers, heads, patch, img = 32, 2, 4, 14, 42
  cfg = transformers.Dinov2Config(hidden_size=c, num_hidden_layers=layers, num_attention_heads=heads,
                                  mlp_ratio=4, patch_size=patch, image_size=img, layerscale_value=1.0,
                                  qkv_bias=True, layer_norm_eps=1e-6, hidden_act='gelu')
  cfg.save_pretrained(path)
  n = (img // patch) ** 2
  w = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  sd = {'embeddings.cls_token': w(1, 1, c), 'embeddings.mask_token': w(1, c),
        'embeddings.position_embeddings': w(1, n + 1, c),
        'embeddings.patch_embeddings.projection.weight': w(c, 3, patch, patch),
        'embeddings.patch_embeddings.projection.bias': w(c),
        'layernorm.weight': 1 + w(c), 'layernorm.bias': w(c)}
  for i in range(layers):
    p = f'encoder.layer.{i}.'
    for name in ('attention.attention.query', 'attention.attention.key', 'attention.attention.value',
                 'attention.output.dense'):
      sd[p + name + '.weight'], sd[p + name + '.bias'] = w(c, c), w(c)
    sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'] = w(4 * c, c), w(4 * c)
    sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'] = w(c, 4 * c), w(c)
    for k in ('norm1', 'norm2'):
      sd[p + k + '.weight'], sd[p + k + '.bias'] = 1 + w(c), w(c)
    sd[p + 'layer_scale1.lambda1'], sd[p + 'layer_scale2.lambda1'] = 1 + w(c), 1 + w(c)
  from safetensors.numpy import save_file
  save_file(sd, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  return img


def test_dinov2_equals_flax_dinov2(tmp_path):
  rng = np.random.RandomState(0)
  img = _write_hf_checkpoint(str(tmp_path), rng)
  hf = transformers.FlaxDinov2Model.from_pretrained(str(tmp_path), from_pt=True)
  cfg, sd = load_hf_dinov2_dir(str(tmp_path))
  assert cfg.num_register_tokens == 0 and cfg.embed_dim == 32
  ours = DinoV2(cfg, rngs=nnx.Rngs(0))
  assert load_dinov2(ours, sd) == {'missing': [], 'unexpected': []}
  x = rng.normal(0, 1, (2, 3, img, img)).astype(np.float32)
  ref = np.asarray(hf(pixel_values=x).last_hidden_state)
  got = np.asarray(ours(x.transpose(0, 2, 3, 1)))
  assert got.shape == ref.shape == (2, 1 + (img // 14) ** 2, 32)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  # features() drops nothing when there are no registers
  np.testing.assert_allclose(np.asarray(ours.features(x.transpose(0, 2, 3, 1))), got, atol=1e-6)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['model_type'] == 'dinov2'
