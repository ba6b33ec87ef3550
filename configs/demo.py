"""Hita end to end on an idle 2-core CPU in about 12 minutes: a small tokenizer, code extraction, a
small AR model, class-conditional samples, the zero-shot tasks (`hita_jax/tasks/demo.py`).

Usage: python -m hita_jax.main --config=configs/demo.py --workdir=runs/demo
       --config=configs/demo.py:fast        a ~3-minute smoke run (pictures not yet recognisable;
                                            `tiny` / `runlocal` are the same)

Everything comes from the repository: the data are the embedded procedural shapes (10 classes,
32 px, flat colours), DINOv2 is a tiny randomly initialised (frozen) tower, and the loss is
2 x MSE + the VQ terms (no LPIPS/GAN: their weights are not needed and a few hundred CPU steps are
too few for them to help). The structure is Hita's: holistic tokens before patch tokens, two
codebooks, the causal fusion decoder with the k=4 readout; a Llama-style AR model with 2D RoPE.
Change `data` (tfds / an image folder), the model sizes or the mesh like in any other config.
"""
from hita_jax import config_lib

# The demo tokenizer: 32 px, 4x down-sampling -> 8x8 patch tokens + 8 holistic tokens.
# ch_mult (1, 2, 2) rather than (1, 2, 4): the 4x-down CNN's deepest level at 64 channels, not 128,
# trains faster (the stage 240 against 276 s) and reconstructs better within 600 steps (shapes
# classified 0.84 against 0.74; the thin checker / star / bars were the misses), which lifted the
# samples from 0.80 to 0.90 (docs/PERFORMANCE.md, 2026-12-03, session 10).
DEMO_TOKENIZER = dict(
    image_size=32, pos_grid=8, ch=32, ch_mult=(1, 2, 2), encoder_res_blocks=1, decoder_res_blocks=1,
    dim=64, codebook_size=256, num_holistic=8, depth=1, num_heads=4, head_dim=16, mlp_dim=128,
    vfm_grid=2, dinov2_input_size=28,
    # The official GroupNorm(32) at ch=32 is an instance norm per channel: the tokenizer then
    # reconstructed every shape in the palette's mean colour (docs/PERFORMANCE.md, 2026-11-30).
    norm_groups=8)
DEMO_GPT = dict(dim=128, n_layer=4, n_head=4)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, fast=False, tiny=False, runlocal=False, tokenizer_steps=0, ar_steps=0)
  a.fast = a.fast or a.tiny or a.runlocal  # the demo is CPU-sized already; tiny = the smoke run
  config = config_lib.hita_recipe('B', 'tiny')
  config.task = 'demo'
  config.tokenizer.update(DEMO_TOKENIZER)
  config.tokenizer.dinov2.img_size = 28
  config.gpt = config_lib.gpt_model_config('B', config.tokenizer, tiny=True, num_classes=10)
  config.gpt.update(DEMO_GPT)
  config.data.update(image_size=32, shapes_size=32, shapes_style='flat', num_records=20000)

  config.tokenizer_loss.update(perceptual_weight=0.0, disc_weight=0.0)
  # Without it the holistic codebook collapses (~7 of 256 codes, one per position whatever the
  # image): 64 patch codes reconstruct these images alone, so nothing makes the holistic vectors
  # depend on the image, and a code never chosen gets no gradient. The entropy term (official
  # `entropy_loss_ratio`) rewards a batch spread over many codes, each vector sure of its code.
  config.tokenizer.entropy_loss_ratio = 0.1
  config.train_tokenizer.update(
      global_batch_size=16, num_steps=a.tokenizer_steps or (60 if a.fast else 600), lr=1e-3,
      warmup_steps=50, ema_decay=0.99, log_every=50, image_every=200, ckpt_every=200)
  config.extract_codes.update(max_examples=400 if a.fast else 3000, batch_size=200,
                        examples_per_shard=2000, views='center')
  config.train_ar.update(
      global_batch_size=32, num_steps=a.ar_steps or (40 if a.fast else 1100), lr=1e-3,
      ema_decay=0.995, class_dropout_prob=0.1, token_dropout=0.0, log_every=100,
      ckpt_every=400, sample_every=0)
  config.sample.update(cfg_scale=3.0, temperature=1.0, top_k=0, seed=0)
  # Outputs: rows of samples per class, the shape classifier that scores them, picture scale.
  # The zero-shot tasks at the end: style transfer on `style_images` held-out images, in-painting
  # of `inpaint_images` held-out images per (r, variant), a linear probe trained on the features
  # of `probe_train_images` classifier-training images and tested on the held-out ones.
  config.demo = dict(samples_per_class=20, grid_columns=10, png_scale=4, style_images=5,
                     classifier_train_images=3000, classifier_test_images=500,
                     classifier_steps=400, inpaint_images=40 if a.fast else 100,
                     probe_train_images=1000)
  # In-painting: the masked area starts as the kept rows' median colour (mostly the background) and
  # two more rounds re-encode the kept pixels over the completion (tasks/inpaint.py): with a grey
  # fill, encoded once, the encoder's attention lets the grey shift the kept codes.
  config.inpaint.update(fill='median', refine=2)
  # MAE's LARS needs its 16k batch (lr 6.4); on 1000 features: SGD, 30 epochs of batch 125.
  config.linear_probe.update(optimizer='sgd', batch_size=125, base_lr=1.0, epochs=30,
                             warmup_epochs=3)
  return config
