"""Efficient video decoder: the paper's on-device replacement for the VAE decoder.

Paper: S2DiT (arXiv 2601.12719) Sec. D.1 and Tab. A2. The Wan2.1 VAE decoder is too heavy for a
phone, so the paper trains a lighter decoder on the frozen VAE encoder's latents: narrow 3-D
convolutions (causal in time), GroupNorm, Hardswish activations, trained with L1 + perceptual +
GAN losses. Tab. A2 compares it with the reference decoder (parameters, latency, PSNR, SSIM, FVD).

Here: `EfficientDecoder` has the same graph as vae.py's reference decoder at half the width
(so ~4x fewer parameters and FLOPs) with Hardswish, the same contract (normalised latents
(B,C,T,h,w) -> pixels (B,3,1+4(T-1),H,W)) and the same streaming API `decode_chunk(z, cache)`.
`fit_decoder` trains it; `compare_decoders` is Tab. A2 at toy scale.

Demo (seconds, CPU): `python decoder.py` builds both tiny decoders, prints their parameter counts
and checks that streaming decoding equals whole-clip decoding.
Table for a trained run: `python decoder.py --run runs/tiny --json`.
Side by side for a trained run: `python decoder.py --run runs/small --strip decoders.png` (per held-out
clip three rows: the clip, the reference VAE decoder's and the efficient decoder's reconstruction).
"""
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

import data
import dist
import evaluate
import safeio
import vae as vae_mod
from resume import Checkpoint
from safeio import load_checkpoint, save_checkpoint  # noqa: F401 (save_checkpoint re-exported)
from vae import CausalDecoder, psnr


@dataclass
class DecoderConfig:
    z_channels: int = 8          # C latent channels, must equal the VAE's
    widths: tuple = (16, 32)     # (c0, c1) at H/2 and H/4: half of the reference VAE decoder's
    num_res: int = 1             # ResBlocks per stage
    kt_high: int = 1             # temporal kernel at H/2 (1 = per-frame conv: cheapest where pixels are many)
    groups: int = 8              # GroupNorm groups
    perc_weight: float = 0.5     # weight of the (random-feature) perceptual loss
    gan_weight: float = 0.05     # weight of the generator's hinge GAN loss
    train_frames: int = 17       # training window (frames) of each clip
    train_crop: int = 0          # square crop (px) the decoder trains on, as vae.fit_vae; 0 = whole frames.
                                 # The decoder is convolutional: a 32-px crop of a 64-px clip costs 4x less
    motion_crop: float = 0.5     # share of crops placed where the clip moves most (vae.train_view)
    lr: float = 2e-3
    betas: tuple = (0.5, 0.9)    # Adam betas of the decoder (GAN-style by default)
    gan_start: float = 0.5       # share of the updates before the GAN term starts; >= 1: no GAN
    teacher_weight: float = 0.0  # weight of an L1 to the reference VAE decoder's output (its distillation)


PRESETS = {
    "tiny": DecoderConfig(z_channels=4, widths=(8, 16), groups=4),
    # DEVIATION (measured, RESULTS.md "Tab. A2"): the small decoder trains on 32-px crops (4x cheaper
    # steps), with Adam (0.9, 0.99), an L1 to the reference decoder's output as well as to the clip,
    # and no GAN: at toy scale the GAN costs PSNR and the budget goes further on plain updates.
    "small": DecoderConfig(z_channels=8, widths=(16, 32), groups=8, train_crop=32, betas=(0.9, 0.99),
                           gan_start=1.0, teacher_weight=1.0),
}


def get_config(name: str, **overrides) -> DecoderConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "decoder", **overrides)


class EfficientDecoder(nn.Module):
    """Sec. D.1: narrow causal 3-D convs + GroupNorm (4-D views) + Hardswish.
    ASSUMPTION: the paper gives no layer table; we keep the reference decoder's topology and halve
    every width (params ~ width^2 -> ~4x fewer) and swap SiLU for Hardswish (piecewise-linear,
    cheap on mobile NPUs/GPUs). It reads normalised latents directly (no de-normalisation)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.net = CausalDecoder(cfg.z_channels, cfg.widths, cfg.num_res, cfg.kt_high, cfg.groups, nn.Hardswish)

    def decode_chunk(self, z_chunk, cache=None):
        """z_chunk (B, C, Tc, h, w) normalised; cache=None starts a clip.
        Returns (frames (B, 3, 4Tc-3 if first else 4Tc, 4h, 4w), cache)."""
        if z_chunk.dim() != 5 or z_chunk.shape[1] != self.cfg.z_channels:
            raise ValueError(f"expected latents (B, {self.cfg.z_channels}, T, h, w), got {tuple(z_chunk.shape)}")
        first = cache is None
        cache = {} if cache is None else dict(cache)  # never mutate the caller's dict
        return self.net(z_chunk, cache, first), cache

    def decode(self, z):
        """Normalised latents (B, C, T, h, w) -> video (B, 3, 1+4(T-1), 4h, 4w)."""
        return self.decode_chunk(z, None)[0]

    forward = decode


def load_decoder(path):
    return load_checkpoint(path, DecoderConfig, EfficientDecoder, "decoder")


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- training losses
class RandomFeaturePyramid(nn.Module):
    """Perceptual features from a frozen, randomly initialised (fixed seed) 2-D conv pyramid,
    applied per frame. ASSUMPTION / DEVIATION: the paper's perceptual loss uses a pretrained
    network (LPIPS/VGG), which cannot be downloaded here. Random conv filters are still a bank of
    local edge, colour-contrast and texture detectors at 3 scales; matching their responses
    penalises blur and misplaced edges that a per-pixel L1 averages away (random-weight networks
    are known to give usable image representations, He, Wang & Hopcroft 2016)."""

    def __init__(self, seed=1234, widths=(16, 32, 64)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            conv = nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (c_in * 9)))
                conv.bias.zero_()
            layers.append(conv)
            c_in = c
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, a, b):  # a, b (B, 3, F, H, W) -> scalar
        x, y = vae_mod.to_frames(a), vae_mod.to_frames(b)  # (B*F, 3, H, W)
        loss = 0.0
        for conv in self.layers:
            x, y = F_.relu(conv(x)), F_.relu(conv(y))  # (B*F, c, H', W')
            loss = loss + (x - y).abs().mean()
        return loss / len(self.layers)


class PatchDiscriminator(nn.Module):
    """Per-frame 2-D PatchGAN: one real/fake logit per ~10x10-pixel patch.
    ASSUMPTION: the paper names GAN training only; we use a per-frame PatchGAN with hinge loss
    and a fixed weight (no adaptive weight) - temporal consistency comes from L1 + the causal net."""

    def __init__(self, width=32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, video):  # video (B, 3, F, H, W)
        return self.net(vae_mod.to_frames(video))  # (B*F, 1, H/4, W/4) logits


def fit_decoder(decoder, vae, batch_fn, steps, lr=None, seed=0, gan_start=None, progress=True, ckpt=None,
                ckpt_every_s=180.0, batch=None):
    """Train on frozen VAE-encoder latents: L1 + perc_weight * perceptual + gan_weight * hinge GAN
    (+ teacher_weight * L1 to the reference decoder's output, when set). The GAN starts after
    `gan_start` steps (a warm-up so the discriminator never faces pure noise; default: the config's
    share of the steps, never when it is >= 1). batch_fn(step) -> video (B, 3, F, H, W) in [-1, 1].
    ckpt: saved every ckpt_every_s seconds and resumed from, bit-identically (resume.py).
    Data-parallel under torchrun (dist.py): batch_fn(step) returns this process's rows
    dist.rows(batch) of a batch of `batch` clips; decoder and discriminator train with DDP."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    cfg = decoder.cfg
    lr = cfg.lr if lr is None else lr
    gan_start = int(steps * cfg.gan_start) if gan_start is None else gan_start
    vae.eval().requires_grad_(False)
    device = next(decoder.parameters()).device
    perceptual, disc = RandomFeaturePyramid(seed=1234).to(device), PatchDiscriminator().to(device)
    opt_g = torch.optim.Adam(decoder.parameters(), lr=lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt_g, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    decoder.train()
    run, t0, first_loss = {}, time.time(), None
    saver = Checkpoint(ckpt, ckpt_every_s)
    start, state = saver.load()
    if state:
        decoder.load_state_dict(state["decoder"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        run, first_loss = state["run"], state["first_loss"]
    # DDP under torchrun: the decoder's and the discriminator's gradients averaged over the processes
    decode = dist.data_parallel(decoder.decode, decoder)
    judge = dist.data_parallel(lambda real, fake: (disc(real), disc(fake)), disc)
    bar = tqdm(range(start, steps), desc="decoder", disable=not (progress and dist.is_main()), mininterval=2.0,
               initial=start, total=steps)
    for step in bar:
        video = batch_fn(step)  # (B, 3, F, H, W)
        if cfg.train_crop:      # the step's own generator: a resumed run cuts the same crops
            video = vae_mod.train_view(video, cfg, torch.Generator().manual_seed(seed * 1_000_003 + step), batch)
        with torch.no_grad():
            z = vae.encode(video)  # (B, C, T, h, w), frozen encoder, normalised
            ref = vae.decode(z) if cfg.teacher_weight else None  # what the reference decoder makes of z
        rec = decode(z)  # (B, 3, F, H, W)
        l1, perc = (rec - video).abs().mean(), perceptual(rec, video)
        loss = l1 + cfg.perc_weight * perc
        if ref is not None:  # the clip alone under-determines a narrow decoder; the teacher's output is a smoother target
            loss = loss + cfg.teacher_weight * (rec - ref).abs().mean()
        use_gan = step >= gan_start
        if use_gan:
            g_adv = -disc(rec).mean()  # hinge generator loss
            loss = loss + cfg.gan_weight * g_adv
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_g.step()
        sched.step()
        d_loss = torch.zeros((), device=device)
        if use_gan:  # hinge discriminator loss: relu(1 - D(real)) + relu(1 + D(fake))
            d_real, d_fake = judge(video, rec.detach())
            d_loss = F_.relu(1 - d_real).mean() + F_.relu(1 + d_fake).mean()
            opt_d.zero_grad(set_to_none=True)  # also clears grads the G step left in D
            d_loss.backward()
            opt_d.step()
        # the whole batch's numbers: the processes' mean of their rows' means (one process: its own)
        loss_, l1_, perc_, d_ = (dist.mean(x).item() for x in (loss, l1, perc, d_loss))
        mse = dist.mean((rec.detach().float().clamp(-1, 1) - video.float().clamp(-1, 1)).pow(2).mean()).item()
        first_loss = loss_ if first_loss is None else first_loss
        for k, v in (("loss", loss_), ("l1", l1_), ("perc", perc_), ("d", d_),
                     ("psnr", 10 * math.log10(4.0 / max(mse, 1e-12)))):   # vae.psnr of the whole batch
            run[k] = v if k not in run else 0.95 * run[k] + 0.05 * v
        bar.set_postfix(loss=f"{run['loss']:.4f}", psnr=f"{run['psnr']:.1f}", d=f"{run['d']:.2f}", refresh=False)
        saver.maybe_save(step + 1, lambda: {
            "decoder": decoder.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(), "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "run": run, "first_loss": first_loss})
    saver.finish()
    decoder.eval()
    return {"steps": steps, "gan_start": gan_start, "first_loss": first_loss, **run, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- Tab. A2 at toy scale
def ssim(a, b, window=11, sigma=1.5):
    """Mean SSIM over frames of videos in [-1, 1] (computed in [0, 1]), Gaussian window."""
    x = (vae_mod.to_frames(a.float()).clamp(-1, 1) + 1) / 2  # (N, 3, H, W)
    y = (vae_mod.to_frames(b.float()).clamp(-1, 1) + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    r = torch.arange(window).float() - (window - 1) / 2
    g1 = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g1 = g1 / g1.sum()
    w = (g1[:, None] * g1[None, :]).expand(3, 1, window, window)  # depthwise Gaussian
    blur = lambda t: F_.conv2d(t, w, groups=3)  # valid padding
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean().item()


@torch.no_grad()
def chunk_latency_ms(decode_chunk, z, repeats=7):
    """Median wall time (ms) of decode_chunk on one steady-state 3-latent-frame chunk."""
    _, cache = decode_chunk(z[:, :, :3], None)  # first chunk fills the cache
    chunk = z[:, :, 3:6] if z.shape[2] >= 6 else z[:, :, :3]
    decode_chunk(chunk, cache)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        decode_chunk(chunk, cache)[0].cpu()     # .cpu(): waits for a GPU to finish (free on the CPU)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@torch.no_grad()
def compare_decoders(vae, decoder, videos, batch_size=4):
    """Tab. A2: reference VAE decoder vs efficient decoder on the same frozen-encoder latents."""
    vae.eval(), decoder.eval()
    z = torch.cat([vae.encode(videos[i:i + batch_size]) for i in range(0, videos.shape[0], batch_size)])
    rows, notes = {}, []
    recs = {}
    for name, dec, n in (("vae_decoder", vae, num_params(vae.decoder)), ("efficient_decoder", decoder, num_params(decoder))):
        rec = torch.cat([dec.decode(z[i:i + batch_size]) for i in range(0, z.shape[0], batch_size)]).clamp(-1, 1)
        recs[name] = rec
        rows[name] = {"params": n, "latency_ms_per_chunk": chunk_latency_ms(dec.decode_chunk, z[:1]),
                      "psnr": psnr(rec, videos), "ssim": ssim(rec, videos)}
    try:  # FVD-lite from evaluate.py
        net = evaluate.FeatureNet().to(videos.device)
        real = net(videos)
        for name, rec in recs.items():
            rows[name]["fvd_lite"] = float(evaluate.frechet_distance(real, net(rec)))
    except Exception as e:  # an API mismatch: report, don't fail the table
        notes.append(f"FVD-lite skipped ({type(e).__name__}: {e})")
    ratio = rows["vae_decoder"]["params"] / rows["efficient_decoder"]["params"]
    return {**rows, "param_ratio": ratio, "clips": int(videos.shape[0]),
            "frames": int(videos.shape[2]), "notes": notes}


def format_table(res):
    cols = ("params", "latency_ms_per_chunk", "psnr", "ssim", "fvd_lite")
    lines = ["| decoder | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in ("vae_decoder", "efficient_decoder"):
        vals = [res[name].get(c, float("nan")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(f"{v:,}" if isinstance(v, int) else f"{v:.3f}" for v in vals) + " |")
    lines.append(f"param ratio {res['param_ratio']:.2f}x; {res['clips']} clips x {res['frames']} frames")
    return "\n".join(lines + res["notes"])


# ----------------------------------------------------------------------------- CLI / demo
@torch.no_grad()
def streaming_max_diff(dec, z):
    full = dec.decode(z)
    parts, cache = [], None
    for t0 in range(0, z.shape[2], 3):
        frames, cache = dec.decode_chunk(z[:, :, t0:t0 + 3], cache)
        parts.append(frames)
    return (torch.cat(parts, 2) - full).abs().max().item()


@torch.no_grad()
def save_comparison_strip(path, vae, decoder, videos, every=4):
    """Per clip three rows, every `every`-th frame: the clip, the reference VAE decoder's and the
    efficient decoder's reconstruction from the same frozen-encoder latents, each labelled with its
    PSNR on that clip: where the efficient decoder blurs or rings, the picture shows it."""
    rows, labels = [], []
    for v in videos.split(1):                                     # (1, 3, F, H, W) each
        z = vae.encode(v)
        ref, eff = vae.decode(z).clamp(-1, 1), decoder.decode(z).clamp(-1, 1)
        rows += [v, ref, eff]
        labels += ["clip", f"VAE decoder {psnr(ref, v):.1f} dB", f"efficient decoder {psnr(eff, v):.1f} dB"]
    data.save_strip(path, torch.cat(rows).cpu(), labels, every=every)


def main(argv=None):
    ap = safeio.Parser(prog="decoder.py", description="Efficient decoder (Sec. D.1, Tab. A2)")
    ap.add_argument("--run", default=None, help="run dir with vae.pt and decoder.pt: print Tab. A2")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    ap.add_argument("--preset", default=None, help="data preset for held-out clips (default: from vae.pt)")
    ap.add_argument("--clips", type=int, default=8, help="held-out clips to evaluate")
    ap.add_argument("--strip", default=None, help="with --run: save the first 3 held-out clips and both "
                    "decoders' reconstructions side by side as this .png")
    dist.add_device_arg(ap)
    args = ap.parse_args(argv)
    device = dist.pick_device(args.device)
    if args.strip is not None:
        if args.run is None:
            raise safeio.UsageError("--strip needs --run (a run with vae.pt and decoder.pt)")
        if not args.strip.lower().endswith(".png"):
            raise safeio.UsageError(f"--strip must end in .png, got {args.strip}")
        safeio.check_writable_file(args.strip, "--strip")
    if args.clips < 1:
        raise safeio.UsageError(f"--clips must be >= 1, got {args.clips}")
    torch.manual_seed(0)
    if args.run:
        vae = vae_mod.load_vae(os.path.join(args.run, "vae.pt")).to(device)
        dec = load_decoder(os.path.join(args.run, "decoder.pt")).to(device)
        preset = args.preset or next((n for n, c in vae_mod.PRESETS.items() if asdict(c) == asdict(vae.cfg)), None)
        if preset is None:
            raise safeio.UsageError("vae.pt matches no VAE preset; pass --preset tiny|small")
        videos = data.make_batch(data.get_config(preset), args.clips, seed=0, split="eval")[0].to(device)
        res = compare_decoders(vae, dec, videos)
        print(json.dumps(res, indent=2) if args.json else format_table(res))
        if args.strip:
            save_comparison_strip(args.strip, vae, dec, videos[:3])
            print(f"wrote {args.strip}")
        return
    vae = vae_mod.VAE(vae_mod.get_config("tiny")).to(device)
    dec = EfficientDecoder(get_config("tiny")).to(device)
    n_ref, n_eff = num_params(vae.decoder), num_params(dec)
    print(f"reference VAE decoder: {n_ref:,} params; efficient decoder: {n_eff:,} params ({n_ref / n_eff:.2f}x fewer)")
    videos = vae_mod.blob_video(2, 33, 32, seed=0).to(device)
    with torch.no_grad():
        z = vae.encode(videos)  # (2, 4, 9, 8, 8): 3 chunks of 3 latent frames
    for name, d in (("vae", vae), ("efficient", dec)):
        diff = streaming_max_diff(d, z)
        print(f"{name}: streaming (3 chunks) vs whole-clip decode max|diff| = {diff:.2e}")
        assert diff < 1e-5
    print(format_table(compare_decoders(vae, dec, videos)))
    print("streaming decode == whole-clip decode: OK (untrained weights; train with train.py)")


if __name__ == "__main__":
    safeio.run_cli("decoder.py", main)
