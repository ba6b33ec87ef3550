"""Anchor benchmark: the official PyTorch Hita code on one GPU, random weights.

hita_jax copy of the workplace's shared/bench/official_bench.py (the official code is imported, never
copied). Added: any (mode, model, batch) as `MODE:MODEL:BATCH` arguments, e.g.
  ar_compiled:GPT-B:64  sample_compiled:GPT-XL:128  sample:GPT-XL:64  tok:16
so the throughput-versus-batch curves and largest batches can be measured, split over several calls.
The tokenizer records its 2 warm-up steps' seconds (torch.compile's compile time is in them).
The original's modes below are unchanged.

Measures what a user of the official code gets per GPU: AR training step throughput
(GPT-B/L/XL, bf16 autocast, fused AdamW, grad clip), tokenizer training step throughput
(Hita-V generator + PatchGAN discriminator step, LPIPS, bf16), and class-conditional
sampling throughput with CFG through the official KV-cache generate().
Usage (on a GPU machine with torch, torchvision, timm, einops, kornia, omegaconf):
  OFFICIAL_HITA=/path/to/CVMI-Lab/Hita/checkout LPIPS_LIN=/path/to/vgg.pth \
  python official_bench.py [ar] [ar_compiled] [ar_compiled_xl] [sample] [sample_compiled] [sample_compiled_all] [tok] [tok_compiled]
LPIPS_LIN is the 7 KB LPIPS linear-layer file (e.g. from the `lpips` wheel: lpips/weights/v0.1/vgg.pth).
Results go to $OUT/bench_official.json (or /tmp).
"""
import functools, json, os, sys, time, types

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL = os.environ["OFFICIAL_HITA"]
sys.path[:0] = [os.path.join(HERE, "stubs"), OFFICIAL]  # stubs: stand-ins for imports the model path never uses
import torch

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
import hita.modules.pretrained_enc.models_pretrained_enc as mpe
from hita.modules.pretrained_enc.dino_v2 import backbones as _bb

mpe.dinov2_vitl14_reg = functools.partial(_bb.dinov2_vitl14_reg, pretrained=False)
mpe.load_pretrained_dino_v2 = lambda model, path: model
from autoregressive.models.gpt import GPT_models
from autoregressive.models.generate import generate

dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
PEAK = 989e12  # H100/H200 SXM dense bf16 datasheet


WARM_S = {}  # last sync_time's warm-up seconds (holds torch.compile's compile time): hita_jax addition


def sync_time(fn, warm, iters):
    t = time.perf_counter()
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    WARM_S["s"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def ar_train(name, bs, compile=False):
    torch.manual_seed(0)
    kw = dict(vocab_size=16384, block_size=441, num_classes=1000, cls_token_num=1, model_type="c2i", num_slots=128)
    m = GPT_models[name](**kw).to(dev).train()
    raw = m
    decay = [p for p in m.parameters() if p.dim() >= 2]
    nodecay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    q = torch.randint(0, 16384, (bs, 128), device=dev)
    z = torch.randint(0, 16384, (bs, 441), device=dev)
    y = torch.randint(0, 1000, (bs,), device=dev)
    if compile:  # what a user of the official code can add in one line (train_c2i.py has no flag)
        m = torch.compile(m)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, (l1, l2) = m(cond_idx=y, idx=(q, z[:, :-1]), targets=(q, z))
        (l1 + l2).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = sync_time(step, 3, 10)
    c = raw.config
    n_mm = sum(p.numel() for n, p in raw.named_parameters() if n.startswith("layers.") or n.startswith("output."))
    T = 569
    flops_tok = 6 * n_mm + 6 * 2 * c.n_layer * c.dim * T  # causal attention ~ half of 12*L*d*T
    tok_s = bs * T / dt
    r = dict(batch=bs, step_s=dt, images_s=bs / dt, tokens_s=tok_s, mfu_vs_989=tok_s * flops_tok / PEAK,
             peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
    del m, opt
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    return r


def ar_sample(name, bs, cfg=1.5, compile=False):
    torch.manual_seed(0)
    kw = dict(vocab_size=16384, block_size=441, num_classes=1000, cls_token_num=1, model_type="c2i", num_slots=128)
    m = GPT_models[name](**kw).eval()
    torch.nn.init.normal_(m.output.weight, std=0.02)
    m = m.to(device=dev, dtype=torch.bfloat16)  # as test_net.py --precision bf16
    if compile:  # as test_net.py --compile
        m = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    y = torch.randint(0, 1000, (bs,), device=dev)

    def run():
        with torch.inference_mode():
            generate(m, y, 569, cfg_scale=cfg, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)

    dt = sync_time(run, 1, 2)
    r = dict(batch=bs, cfg=cfg, seconds=dt, images_s=bs / dt, peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
    del m
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    return r


def tok_train(bs, compile=False):
    import torchvision
    from omegaconf import OmegaConf
    import hita.tokenizer.tokenizer_image.lpips as lp
    _vgg16 = torchvision.models.vgg16
    lp.models.vgg16 = lambda pretrained=True, **k: _vgg16(weights=None)
    lin = os.environ["LPIPS_LIN"]
    lp.get_ckpt_path = lambda name, root, check=False: lin
    import hita.tokenizer.tokenizer_image.vq_loss as vl
    from hita.tokenizer.tokenizer_image.vq_model import VQ_models
    torch.manual_seed(0)
    cfg = OmegaConf.load(os.path.join(OFFICIAL, "configs", "hita_vqgan.yaml"))
    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8, codebook_slots_embed_dim=12,
                             transformer_config=cfg, z_channels=512).to(dev).train()
    loss = vl.VQLoss(disc_start=20000, disc_weight=0.5, disc_type="patchgan", disc_loss="hinge",
                     gen_adv_loss="softplus_g_loss", image_size=336, perceptual_weight=1.0,
                     reconstruction_weight=1.0, reconstruction_loss="l2", codebook_weight=1.0).to(dev).train()
    opt = torch.optim.Adam(vq.parameters(), lr=1e-4, betas=(0.9, 0.95))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.rand(bs, 3, 336, 336, device=dev) * 2 - 1
    vq_run = torch.compile(vq) if compile else vq  # vq_train.py --compile

    def step():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rec, cb, _ = vq_run(x)
            lg, _ = loss(cb, x, rec, optimizer_idx=0, global_step=30000, last_layer=vq.decoder.last_layer, log_every=10**9)
        lg.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        opt_d.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ld = loss(cb, x, rec, optimizer_idx=1, global_step=30000, log_every=10**9)
        ld.backward()
        torch.nn.utils.clip_grad_norm_(loss.discriminator.parameters(), 1.0)
        opt_d.step()

    dt = sync_time(step, 2, 5)
    r = dict(batch=bs, step_s=dt, images_s=bs / dt, peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30,
             warmup_2_steps_s=WARM_S["s"])
    del vq, loss, opt, opt_d
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    return r


def guarded(key, fn, *a):
    try:
        res[key] = fn(*a)
    except Exception as e:  # record and go on
        res[key] = {"error": repr(e)[:400]}
    print(key, json.dumps(res[key]), flush=True)
    with open(os.path.join(OUT, "bench_official.json"), "w") as f:
        json.dump(res, f, indent=1)



def run_spec(spec):
  mode, *rest = spec.split(':')
  if mode in ('ar', 'ar_compiled'):
    name, bs = rest[0], int(rest[1])
    guarded(f"ar_train_{name}_bs{bs}" + ('_compiled' if mode == 'ar_compiled' else ''), ar_train, name, bs,
            mode == 'ar_compiled')
  elif mode in ('sample', 'sample_compiled'):
    name, bs = rest[0], int(rest[1])
    guarded(f"sample_{name}_bs{bs}_cfg1.5" + ('_compiled' if mode == 'sample_compiled' else ''), ar_sample,
            name, bs, 1.5, mode == 'sample_compiled')
  elif mode in ('tok', 'tok_compiled'):
    bs = int(rest[0])
    guarded(f"tok_train_HitaV_bs{bs}" + ('_compiled' if mode == 'tok_compiled' else ''), tok_train, bs,
            mode == 'tok_compiled')
  else:
    raise SystemExit(f'unknown spec {spec!r}: MODE:MODEL:BATCH with MODE in ar, ar_compiled, sample, '
                     'sample_compiled, or tok:BATCH / tok_compiled:BATCH')


if __name__ == "__main__":
    which = sys.argv[1:] or ["ar", "sample", "tok"]
    for spec in [w for w in which if ":" in w]:
        run_spec(spec)
    if "ar" in which:
        guarded("ar_train_GPT-B_bs64", ar_train, "GPT-B", 64)
        guarded("ar_train_GPT-L_bs64", ar_train, "GPT-L", 64)
        guarded("ar_train_GPT-XL_bs32", ar_train, "GPT-XL", 32)
    if "ar_compiled" in which:
        guarded("ar_train_GPT-B_bs64_compiled", ar_train, "GPT-B", 64, True)
        guarded("ar_train_GPT-L_bs64_compiled", ar_train, "GPT-L", 64, True)
    if "sample" in which:
        guarded("sample_GPT-B_bs64_cfg1.5", ar_sample, "GPT-B", 64)
        guarded("sample_GPT-XL_bs64_cfg1.5", ar_sample, "GPT-XL", 64)
    if "sample_compiled" in which:
        guarded("sample_GPT-B_bs64_cfg1.5_compiled", ar_sample, "GPT-B", 64, 1.5, True)
    if "sample_compiled_all" in which:  # the curve a user would pick the best point of
        guarded("sample_GPT-B_bs256_cfg1.5_compiled", ar_sample, "GPT-B", 256, 1.5, True)
        guarded("sample_GPT-XL_bs64_cfg1.5_compiled", ar_sample, "GPT-XL", 64, 1.5, True)
    if "ar_compiled_xl" in which:
        guarded("ar_train_GPT-XL_bs32_compiled", ar_train, "GPT-XL", 32, True)
    if "tok" in which:
        guarded("tok_train_HitaV_bs16", tok_train, 16)
    if "tok_compiled" in which:
        guarded("tok_train_HitaV_bs16_compiled", tok_train, 16, True)
