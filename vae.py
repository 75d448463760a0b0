"""Causal 3D video VAE: pixels (B,3,F,H,W) <-> latents (B,C,T,h,w).

Paper: S2DiT (arXiv 2601.12719) Sec. D.1 builds on the frozen Wan2.1 VAE; the DiT only ever sees
its latents, and the efficient decoder (decoder.py) is trained on its encoder's latents. This file
is that VAE at toy scale:

  * causal in time: every temporal convolution pads only the past, so frame f of the output
    depends on latent frames <= its own and latent t depends on pixel frames <= 4t;
  * 4x temporal, 4x spatial compression, F = 1 + 4k pixel frames <-> T = 1 + k latent frames, the
    first frame encoded alone (Wan-style);
  * chunked causal decoding with a temporal cache (`decode_chunk`): stream.py decodes 3 latent
    frames at a time (9 pixel frames for the first chunk, then 12) and gets exactly `decode(z)`.

Letters: B batch, F pixel frames, T latent frames, C channels, H,W pixel size, h,w latent size.
Core ML rules (docs/design.md, pitfalls): GroupNorm runs on 4-D views (time folded into batch), the
up-sampling is a causal conv + reshape (time) and a conv + pixel_shuffle (space), no
upsample_nearest3d, no tensor of rank > 5.

Demo (a few seconds on CPU): `python vae.py` trains the tiny VAE for a few steps on synthetic
moving blobs, prints the PSNR and checks chunked decoding against full decoding.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

import data
import dist
import evaluate
import safeio
from resume import Checkpoint
from safeio import Parser, load_checkpoint, read_json, run_cli, save_checkpoint  # noqa: F401 (save_checkpoint re-exported)


@dataclass
class VAEConfig:
    z_channels: int = 8          # C latent channels (Wan2.1: 16; toy: tiny 4, small 8)
    widths: tuple = (32, 64)     # (c0, c1): width at H/2 and at H/4 (Wan2.1: 96..384)
    num_res: int = 1             # ResBlocks per stage (Wan2.1: 2)
    kt_high: int = 1             # temporal kernel at H/2 (1 = per-frame 2-D conv, 3 = causal 3-D);
                                 # DEVIATION: Wan2.1 is 3-D everywhere; per-frame convs where the pixels
                                 # are many cut training cost ~3x, time is mixed at H/4 (kt = 3)
    groups: int = 8              # GroupNorm groups
    kl_weight: float = 0.0       # beta of the KL term (mean per latent element). DEVIATION: the SD/Wan
                                 # VAEs use a small KL; here 0 = a plain deterministic autoencoder (the
                                 # latent scale is fixed afterwards by set_latent_stats). Seen: with
                                 # the mean-per-element KL, even beta = 1e-4 (~2.4e-3 per pixel, 24 pixel
                                 # values per latent value) throttles the code: held-out PSNR ~19 dB and
                                 # falling as the KL pushes the posterior noise up
    train_frames: int = 17       # clip length fit_vae trains on (1+4k; a random window of the given
                                 # clip): 5 latent frames see the first-frame case and the steady state
    train_crop: int = 32         # fit_vae trains on crops of this side (multiple of 4, aligned to the
                                 # 4-px latent grid; >= the frame side = whole frames). The net is
                                 # convolutional, so 32-px crops cost 4x less per clip than 64-px frames
    motion_crop: float = 0.75    # ASSUMPTION: share of crops placed where the clip moves most (the rest
                                 # are uniform): a uniform 32-px crop of a 64-px frame misses the ~16-px
                                 # object more often than not, and the object is what is hard to learn
    motion_weight: float = 4.0   # ASSUMPTION: pixels that differ from the clip's static background (its
                                 # temporal median) weigh 1 + this in the loss. Objects are ~5% of the
                                 # pixels; unweighted, the AE first spends its steps on the background


# DEVIATION: Wan2.1 compresses 4x8x8 into 16 channels; a 32/64-px toy frame needs a moderately
# compressed latent (4x4x4) so the DiT still gets 8x8 / 16x16 tokens per frame.
# ASSUMPTION: both presets train as a plain AE (kl_weight 0) on 17-frame windows; 32-px crops
# only bite for small (tiny's 32-px frames are used whole).
PRESETS = {
    "tiny": VAEConfig(z_channels=4, widths=(16, 32), num_res=1),
    "small": VAEConfig(z_channels=8, widths=(32, 64), num_res=1, kl_weight=0.0, train_frames=17, train_crop=32),
}


def get_config(name: str, **overrides) -> VAEConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "VAE", **overrides)


# ----------------------------------------------------------------------------- building blocks
def to_frames(x):
    """(B, C, T, H, W) -> (B*T, C, H, W): fold time into batch (per-frame 2-D ops)."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def from_frames(x, B):
    """(B*T, C, H, W) -> (B, C, T, H, W)."""
    BT, C, H, W = x.shape
    return x.reshape(B, BT // B, C, H, W).transpose(1, 2)


class GroupNorm4d(nn.Module):
    """GroupNorm over each frame separately: statistics never mix frames, so the norm is causal
    in time (a 5-D GroupNorm would leak the future into the past), and the nn.GroupNorm inside
    only ever sees 4-D tensors (Core ML's rule)."""

    def __init__(self, groups, channels):
        super().__init__()
        self.gn = nn.GroupNorm(groups, channels)

    def forward(self, x):  # x (B, C, T, H, W)
        return from_frames(self.gn(to_frames(x)), x.shape[0])  # (B, C, T, H, W)


class CausalConv3d(nn.Module):
    """3-D conv padded only on the past side in time.

    ASSUMPTION: the past of the first frame is zeros (as Wan2.1's CausalConv3d). When streaming,
    `cache[self.key]` holds the last kt-1 input frames of the previous chunk instead, which makes
    chunked and whole-clip outputs identical.
    """

    def __init__(self, c_in, c_out, k=3, kt=3):
        super().__init__()
        self.kt = kt
        self.key = None  # set by the owning model (unique per conv) for the streaming cache
        self.conv = nn.Conv3d(c_in, c_out, (kt, k, k), padding=(0, k // 2, k // 2))

    def forward(self, x, cache=None):  # x (B, Cin, T, H, W)
        p = self.kt - 1
        if p == 0:
            return self.conv(x)  # (B, Cout, T, H, W): per-frame conv, nothing to cache
        past = None if cache is None else cache.get(self.key)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], p, x.shape[3], x.shape[4])  # (B, Cin, p, H, W)
        x = torch.cat([past, x], dim=2)  # (B, Cin, p+T, H, W)
        if cache is not None:
            cache[self.key] = x[:, :, -p:]  # last p input frames for the next chunk
        return self.conv(x)  # (B, Cout, T, H, W)


class ResBlock(nn.Module):
    """norm -> act -> causal conv, twice, plus a skip; the second conv is zero-initialised so
    each block starts as the identity (as DiT's zero-init gates) and training starts fast."""

    def __init__(self, c_in, c_out, kt=3, groups=8, act=nn.SiLU):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm4d(min(groups, c_in), c_in), CausalConv3d(c_in, c_out, 3, kt)
        self.norm2, self.conv2 = GroupNorm4d(min(groups, c_out), c_out), CausalConv3d(c_out, c_out, 3, kt)
        self.act = act()
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1)

    def forward(self, x, cache=None):  # x (B, Cin, T, H, W)
        h = self.conv1(self.act(self.norm1(x)), cache)  # (B, Cout, T, H, W)
        h = self.conv2(self.act(self.norm2(h)), cache)  # (B, Cout, T, H, W)
        return self.skip(x) + h  # (B, Cout, T, H, W)


class Down(nn.Module):
    """Encoder down-sampler: space-to-depth 2x2 (optional) and time pairs 2x, then a 1x1x1 conv.
    The first frame is duplicated before pairing, so it forms a pair with itself and is encoded
    alone (Wan-style): 1 + 2m frames -> 1 + m frames, causal (output j sees frames <= 2j).
    ASSUMPTION: pairing + 1x1x1 conv (a 2x2x2 strided conv) instead of Wan's 3-tap strided conv."""

    def __init__(self, c_in, c_out, space=True):
        super().__init__()
        self.space = space
        self.proj = nn.Conv3d(c_in * (4 if space else 1) * 2, c_out, 1)

    def forward(self, x):  # x (B, C, 1+2m, H, W)
        B = x.shape[0]
        if self.space:
            x = from_frames(F_.pixel_unshuffle(to_frames(x), 2), B)  # (B, 4C, 1+2m, H/2, W/2)
        x = torch.cat([x[:, :, :1], x], dim=2)  # (B, C', 2+2m, H', W'): first frame paired with itself
        _, C, T2, H, W = x.shape
        x = x.reshape(B, C, T2 // 2, 2, H * W).permute(0, 3, 1, 2, 4)  # (B, 2, C', 1+m, H'W')
        x = x.reshape(B, 2 * C, T2 // 2, H, W)  # (B, 2C', 1+m, H', W')
        return self.proj(x)  # (B, Cout, 1+m, H', W')


class TemporalUp(nn.Module):
    """Decoder temporal 2x up-sampler, the mirror of Down: a causal conv makes 2C channels per
    frame, a reshape turns them into 2 frames, and at the start of a clip the first output frame
    is dropped (the first latent frame stands for one pixel frame): 1 + k -> 1 + 2k frames."""

    def __init__(self, c, kt=3):
        super().__init__()
        self.conv = CausalConv3d(c, 2 * c, 3, kt)

    def forward(self, x, cache=None, first=True):  # x (B, C, T, H, W)
        B, C, T, H, W = x.shape
        y = self.conv(x, cache)  # (B, 2C, T, H, W)
        y = y.reshape(B, 2, C, T, H * W).permute(0, 2, 3, 1, 4)  # (B, C, T, 2, HW): rank <= 5
        y = y.reshape(B, C, 2 * T, H, W)  # (B, C, 2T, H, W), frame 2t+i from latent t
        return y[:, :, 1:] if first else y  # (B, C, 2T-1 or 2T, H, W)


class SpatialUp(nn.Module):
    """Per-frame conv to 4C' channels + pixel_shuffle: 2x in space without upsample_nearest."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)

    def forward(self, x):  # x (B, C, T, H, W)
        y = F_.pixel_shuffle(self.conv(to_frames(x)), 2)  # (B*T, Cout, 2H, 2W)
        return from_frames(y, x.shape[0])  # (B, Cout, T, 2H, 2W)


def name_caches(model):
    """Give every CausalConv3d of `model` a unique cache key."""
    for i, m in enumerate(model.modules()):
        if isinstance(m, CausalConv3d):
            m.key = f"conv{i}"


class CausalDecoder(nn.Module):
    """Latents (B, z, T, h, w) -> pixels (B, 3, 1+4(T-1), 4h, 4w), causal, streamable.
    Shared by the reference VAE decoder (SiLU) and decoder.py's efficient decoder (Hardswish)."""

    def __init__(self, z_channels, widths, num_res, kt_high=1, groups=8, act=nn.SiLU):
        super().__init__()
        c0, c1 = widths
        self.conv_in = CausalConv3d(z_channels, c1, 3, 3)
        self.res_t = nn.ModuleList([ResBlock(c1, c1, 3, groups, act) for _ in range(num_res)])
        self.up_t1 = TemporalUp(c1)
        self.res_t2 = nn.ModuleList([ResBlock(c1, c1, 3, groups, act) for _ in range(num_res)])
        self.up_t2, self.up_s = TemporalUp(c1), SpatialUp(c1, c0)
        self.res_f = nn.ModuleList([ResBlock(c0, c0, kt_high, groups, act) for _ in range(num_res)])
        self.norm_out, self.act = GroupNorm4d(min(groups, c0), c0), act()
        self.conv_out = CausalConv3d(c0, 12, 3, kt_high)  # 12 = 3 RGB x 2x2 pixel shuffle
        name_caches(self)

    def forward(self, z, cache=None, first=True):  # z (B, zc, T, h, w)
        x = self.conv_in(z, cache)  # (B, c1, T, h, w)
        for blk in self.res_t:
            x = blk(x, cache)  # (B, c1, T, h, w)
        x = self.up_t1(x, cache, first)  # (B, c1, 2T(-1), h, w)
        for blk in self.res_t2:
            x = blk(x, cache)  # (B, c1, 2T(-1), h, w)
        x = self.up_s(self.up_t2(x, cache, first))  # (B, c0, F', 2h, 2w), F' = 4T(-3)
        for blk in self.res_f:
            x = blk(x, cache)  # (B, c0, F', 2h, 2w)
        x = self.conv_out(self.act(self.norm_out(x)), cache)  # (B, 12, F', 2h, 2w)
        x = from_frames(F_.pixel_shuffle(to_frames(x), 2), z.shape[0])  # (B, 3, F', 4h, 4w)
        return x


def check_video(video):
    if video.dim() != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % 4 or video.shape[3] % 4 or video.shape[4] % 4:
        raise ValueError(f"expected video (B, 3, F=1+4k, H, W) with H, W divisible by 4, got {tuple(video.shape)}")


# ----------------------------------------------------------------------------- the VAE
class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c0, c1 = cfg.widths
        g, n = cfg.groups, cfg.num_res
        # encoder: 2x2 space-to-depth, H/2 stage, down (space+time), H/4 stage, down (time), H/4 stage
        self.enc_in = CausalConv3d(12, c0, 3, cfg.kt_high)
        self.enc_res0 = nn.ModuleList([ResBlock(c0, c0, cfg.kt_high, g) for _ in range(n)])
        self.down1 = Down(c0, c1, space=True)
        self.enc_res1 = nn.ModuleList([ResBlock(c1, c1, 3, g) for _ in range(n)])
        self.down2 = Down(c1, c1, space=False)
        self.enc_res2 = nn.ModuleList([ResBlock(c1, c1, 3, g) for _ in range(n)])
        self.enc_norm = GroupNorm4d(min(g, c1), c1)
        self.enc_out = CausalConv3d(c1, 2 * cfg.z_channels, 3, 3)  # posterior mean and log-variance
        # ASSUMPTION: start nearly deterministic (posterior std e^-4 ~ 0.02): with logvar ~ 0 at
        # init, unit noise would drown the latents and the short CPU budget is spent shrinking it.
        nn.init.constant_(self.enc_out.conv.bias[cfg.z_channels:], -8.0)
        name_caches(self)
        self.decoder = CausalDecoder(cfg.z_channels, cfg.widths, n, cfg.kt_high, g, nn.SiLU)
        # latent normalisation, stored with the weights: encode() returns (mu - mean) / std
        self.register_buffer("latent_mean", torch.zeros(cfg.z_channels))
        self.register_buffer("latent_std", torch.ones(cfg.z_channels))

    def posterior(self, video):  # video (B, 3, F, H, W) in [-1, 1]
        check_video(video)
        B = video.shape[0]
        x = from_frames(F_.pixel_unshuffle(to_frames(video), 2), B)  # (B, 12, F, H/2, W/2)
        x = self.enc_in(x)  # (B, c0, F, H/2, W/2)
        for blk in self.enc_res0:
            x = blk(x)  # (B, c0, F, H/2, W/2)
        x = self.down1(x)  # (B, c1, 1+2k, h, w)
        for blk in self.enc_res1:
            x = blk(x)  # (B, c1, 1+2k, h, w)
        x = self.down2(x)  # (B, c1, T, h, w)
        for blk in self.enc_res2:
            x = blk(x)  # (B, c1, T, h, w)
        x = self.enc_out(F_.silu(self.enc_norm(x)))  # (B, 2C, T, h, w)
        mu, logvar = x.chunk(2, dim=1)  # (B, C, T, h, w) each
        return mu, logvar.clamp(-30.0, 20.0)

    def _norm_shape(self):
        return self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode_raw(self, video):
        """Posterior mean, un-normalised: (B, C, T, h, w)."""
        return self.posterior(video)[0]

    @torch.no_grad()
    def encode(self, video):
        """Deterministic normalised latents (posterior mean): (B, C, T, h, w)."""
        m, s = self._norm_shape()
        return (self.encode_raw(video) - m) / s

    def decode_raw(self, z_raw, cache=None, first=True):
        return self.decoder(z_raw, cache, first)

    def decode(self, z):
        """Normalised latents (B, C, T, h, w) -> video (B, 3, 1+4(T-1), 4h, 4w)."""
        return self.decode_chunk(z, None)[0]

    def decode_chunk(self, z_chunk, cache=None):
        """Stream decoding: z_chunk (B, C, Tc, h, w) normalised; cache=None starts a clip (the first
        latent frame becomes one pixel frame). Returns (frames (B,3,4Tc or 4Tc-3,H,W), cache)."""
        if z_chunk.dim() != 5 or z_chunk.shape[1] != self.cfg.z_channels:
            raise ValueError(f"expected latents (B, {self.cfg.z_channels}, T, h, w), got {tuple(z_chunk.shape)}")
        first = cache is None
        cache = {} if cache is None else dict(cache)  # never mutate the caller's dict
        m, s = self._norm_shape()
        return self.decode_raw(z_chunk * s + m, cache, first), cache

    @torch.no_grad()
    def set_latent_stats(self, z_raw_samples):
        """Per-channel mean / std of raw latents (B, C, T, h, w) -> normalisation buffers."""
        z = z_raw_samples.transpose(0, 1).reshape(self.cfg.z_channels, -1)  # (C, N)
        self.latent_mean.copy_(z.mean(1))
        self.latent_std.copy_(z.std(1).clamp_min(1e-5))

    def forward(self, video, sample=True):
        """Training pass: (reconstruction (B,3,F,H,W), KL per latent element)."""
        mu, logvar = self.posterior(video)  # (B, C, T, h, w)
        # kl_weight = 0: a plain autoencoder, the (then unconstrained) posterior noise is not used
        noisy = sample and self.cfg.kl_weight > 0
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if noisy else mu  # (B, C, T, h, w)
        # KL(q(z|x) || N(0, I)), averaged over latent elements
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return self.decode_raw(z), kl


# ----------------------------------------------------------------------------- metrics & training
def psnr(a, b):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all elements."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct_psnr(vae, videos, batch_size=4):
    vae.eval()
    mses = []
    for i in range(0, videos.shape[0], batch_size):
        v = videos[i:i + batch_size]
        mses.append((vae.decode(vae.encode(v)).clamp(-1, 1) - v).pow(2).mean().item() * v.shape[0])
    return 10 * math.log10(4.0 / max(sum(mses) / videos.shape[0], 1e-12))


def train_view(video, cfg, gen, batch=None):
    """The piece of a clip fit_vae trains on: a random window of cfg.train_frames frames and, per
    clip, a cfg.train_crop square aligned to the 4-px latent grid: with probability cfg.motion_crop
    the square with the most motion (sum of the per-pixel temporal std), else a uniform one.
    (B,3,F,H,W) -> (B,3,F',S,S).
    batch: data-parallel training, `video` is this process's rows dist.rows(batch) of a batch of
    `batch` clips: every clip's crop is drawn, in order, and this process cuts its own."""
    _, _, Fr, H, W = video.shape
    B = batch or video.shape[0]
    mine = dist.rows(batch) if batch else slice(0, B)
    f = min(cfg.train_frames, Fr)
    f0 = int(torch.randint(0, Fr - f + 1, (1,), generator=gen))
    video = video[:, :, f0:f0 + f]  # (B, 3, F', H, W); the window's first frame becomes frame 0
    S = cfg.train_crop
    if S >= H or S >= W:
        return video
    motion = F_.avg_pool2d(video.std(dim=2).sum(1, keepdim=True), S, stride=4)  # (B, 1, nh, nw) per crop
    nh, nw = motion.shape[-2:]
    crops = []
    for b in range(B):
        at_motion = float(torch.rand(1, generator=gen)) < cfg.motion_crop
        if not at_motion:
            i = int(torch.randint(0, nh, (1,), generator=gen)) * 4
            j = int(torch.randint(0, nw, (1,), generator=gen)) * 4
        if not mine.start <= b < mine.stop:
            continue                                    # another process's clip: drawn, not cut
        r = b - mine.start                              # the clip's row in `video`
        if at_motion:
            k = int(motion[r].flatten().argmax())
            i, j = k // nw * 4, k % nw * 4
        crops.append(video[r:r + 1, :, :, i:i + S, j:j + S])  # (1, 3, F', S, S)
    return torch.cat(crops)  # (B, 3, F', S, S)


def motion_weights(video, weight):
    """Loss weight per pixel, (B,1,F,H,W): 1 + weight where the clip differs from its static
    background (temporal median; summed |difference| over RGB > 0.15), i.e. on moving objects."""
    background = video.median(dim=2, keepdim=True).values  # (B, 3, 1, H, W)
    return 1 + weight * ((video - background).abs().sum(1, keepdim=True) > 0.15).float()


def latent_motion_mask(video):
    """Which latent pixels see a moving object: (B, 3, F, H, W) -> (B, 1, T, H/4, W/4) bool.
    The pixel mask of motion_weights (the object, and the stretch of its path where it stays over
    half of the clip, which the temporal median takes for background), gathered the way the
    encoder compresses: latent frame 0 is pixel frame 0, latent frame k (k >= 1) pixel frames
    4k-3 .. 4k, each latent pixel a 4x4 square."""
    background = video.median(dim=2, keepdim=True).values                     # (B, 3, 1, H, W)
    m = ((video - background).abs().sum(1, keepdim=True) > 0.15).float()     # (B, 1, F, H, W)
    B, _, F, H, W = m.shape
    rest = m[:, :, 1:].reshape(B, 1, (F - 1) // 4, 4, H, W).amax(3)           # (B, 1, T - 1, H, W)
    m = torch.cat([m[:, :, :1], rest], 2)                                     # (B, 1, T, H, W)
    return F_.max_pool3d(m, (1, 4, 4)) > 0                                    # (B, 1, T, H/4, W/4)


def lr_factor(step, steps, warmup=30, floor=0.05):
    """Linear warm-up, then cosine decay to `floor` (not 0: the last steps still learn)."""
    frac = min(step, steps) / max(steps, 1)
    return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def fit_vae(vae, batch_fn, steps, lr=5e-4, seed=0, progress=True, stats_batches=4, ckpt=None, ckpt_every_s=180.0,
            batch=None):
    """Train with L1 + MSE (weighted towards moving pixels, motion_weights) + beta * KL (Adam, warm-up
    + cosine decay) on windows / crops of the clips (train_view); then set the latent statistics on
    whole clips.
    batch_fn(step) -> video (B, 3, F, H, W) in [-1, 1]. ckpt: a file the loop saves itself to every
    ckpt_every_s seconds and resumes from, bit-identically (resume.py).
    Data-parallel under torchrun (dist.py): batch_fn(step) returns this process's rows
    dist.rows(batch) of a batch of `batch` clips."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    run_loss, run_psnr, t0, first_loss = None, None, time.time(), None
    saver = Checkpoint(ckpt, ckpt_every_s)
    start, state = saver.load()
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])        # the posterior's samples draw from the global stream
        run_loss, run_psnr, first_loss = state["run_loss"], state["run_psnr"], state["first_loss"]
    net = dist.data_parallel(lambda video: vae(video), vae)      # DDP under torchrun: gradients averaged
    bar = tqdm(range(start, steps), desc="vae", disable=not (progress and dist.is_main()), mininterval=2.0,
               initial=start, total=steps)
    for step in bar:
        video = train_view(batch_fn(step), vae.cfg, gen, batch)  # (B, 3, F', S, S)
        rec, kl = net(video)  # (B, 3, F', S, S), scalar
        mse = dist.mean(F_.mse_loss(rec, video))
        w = motion_weights(video, vae.cfg.motion_weight)  # (B, 1, F', S, S)
        err = rec - video
        # normalised by the whole batch's mean weight (the processes' mean of their means)
        loss = ((err.abs() + err.pow(2)) * w).mean() / dist.mean(w.mean()) + vae.cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        p = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
        batch_loss = dist.mean(loss).item()
        first_loss = batch_loss if first_loss is None else first_loss
        run_loss = batch_loss if run_loss is None else 0.95 * run_loss + 0.05 * batch_loss
        run_psnr = p if run_psnr is None else 0.95 * run_psnr + 0.05 * p
        bar.set_postfix(loss=f"{run_loss:.4f}", psnr=f"{run_psnr:.1f}", refresh=False)
        saver.maybe_save(step + 1, lambda: {
            "model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "run_loss": run_loss,
            "run_psnr": run_psnr, "first_loss": first_loss})
    saver.finish()
    vae.eval()
    with torch.no_grad():
        z = torch.cat([dist.gather_rows(vae.encode_raw(batch_fn(steps + i))) for i in range(stats_batches)])
        vae.set_latent_stats(z)
    return {"steps": steps, "first_loss": first_loss, "loss": run_loss, "train_psnr": run_psnr,
            "seconds": time.time() - t0, "kl_weight": vae.cfg.kl_weight}


# ----------------------------------------------------------------------------- checkpoints
def load_vae(path):
    return load_checkpoint(path, VAEConfig, VAE, "vae")


# ----------------------------------------------------------------------------- demo
def blob_video(batch, frames, size, seed=0):
    """Synthetic clips: 1-2 coloured discs moving on a coloured background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    t = torch.arange(frames).float().view(-1, 1, 1)
    video = torch.empty(batch, 3, frames, size, size)
    for b in range(batch):
        bg = torch.rand(3, generator=g) * 0.6 - 0.8
        v = bg.view(3, 1, 1, 1).expand(3, frames, size, size).clone()
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            c = torch.rand(3, generator=g) * 1.6 - 0.6
            p0, vel = torch.rand(2, generator=g) * size, (torch.rand(2, generator=g) - 0.5) * size / 12
            r = size * (0.1 + 0.1 * float(torch.rand(1, generator=g)))
            cy, cx = p0[0] + vel[0] * t, p0[1] + vel[1] * t  # (F, 1, 1)
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).float()  # (F, H, W)
            v = v * (1 - m) + c.view(3, 1, 1, 1) * m
        video[b] = v
    return video


@torch.no_grad()
def judge_reconstructions(vae_path, preset, n=24, seed=5, device="cpu"):
    """What the VAE lets through: PSNR and VBench-lite (evaluate.py) of the reconstructions of n
    held-out single-object clips, beside the same clips unreconstructed. A DiT that draws perfect
    latents can score no higher than the reconstructions."""
    vae = load_vae(vae_path).eval().to(device)
    attrs = data.eval_prompts(n)
    video, _ = data.make_clips(data.get_config(preset), attrs, seed=seed, frames=33)  # (n, 3, 33, H, W)
    video = video.to(device)
    prompts = [data.canonical_prompt(*a) for a in attrs]
    rec = torch.cat([vae.decode(vae.encode(video[i:i + 4])).clamp(-1, 1) for i in range(0, n, 4)])
    keys = ("color_acc", "shape_acc", "direction_acc", "semantic", "total")
    out = {"psnr": psnr(rec, video), "n": n}
    for name, v in (("clips", video), ("reconstructions", rec)):
        res = evaluate.score_videos(v, prompts, seed=seed)
        out[name] = {k: round(res[k], 3) for k in keys}
    return out


def main(argv=None):
    ap = Parser(prog="vae.py", description="Causal 3D video VAE demo (tiny preset), or judge a trained VAE")
    ap.add_argument("--preset", default="tiny", help="VAE preset: tiny or small")
    ap.add_argument("--steps", type=int, default=40, help="training steps")
    ap.add_argument("--data", action="store_true", help="train on data.py clips instead of blobs")
    ap.add_argument("--run", default=None, help="a train.py run: PSNR and VBench-lite of its VAE's reconstructions")
    dist.add_device_arg(ap)
    args = ap.parse_args(argv)
    try:
        device = dist.pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.run:
        spec = os.path.join(args.run, "pipeline.json")
        if not os.path.exists(spec):
            ap.error(f"{spec} not found: {args.run} is not a train.py run")
        preset = read_json(spec, "run configuration").get("preset")
        if preset not in PRESETS:
            ap.error(f"{spec}: unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        print(json.dumps(judge_reconstructions(os.path.join(args.run, "vae.pt"), preset, device=device)))
        return
    torch.manual_seed(0)
    cfg = get_config(args.preset)
    size = 32 if args.preset == "tiny" else 64
    vae = VAE(cfg).to(device)
    if args.data:
        dcfg = data.get_config(args.preset)
        batch_fn = lambda s: data.make_batch(dcfg, 4, seed=s)[0].to(device)
        held = data.make_batch(dcfg, 4, seed=10_000, split="eval")[0].to(device)
    else:
        batch_fn = lambda s: blob_video(4, 9, size, seed=s).to(device)
        held = blob_video(2, 17, size, seed=10_000).to(device)  # 5 latent frames: chunks of 3 + 2
    print(f"VAE[{args.preset}] params: {sum(p.numel() for p in vae.parameters()):,}")
    print(f"held-out PSNR before: {reconstruct_psnr(vae, held):.2f} dB")
    m = fit_vae(vae, batch_fn, args.steps, lr=2e-3, seed=0)
    print(f"held-out PSNR after {args.steps} steps: {reconstruct_psnr(vae, held):.2f} dB ({m['seconds']:.1f}s)")
    z = vae.encode(held)  # (B, C, T, h, w)
    with torch.no_grad():
        full = vae.decode(z)
        parts, cache = [], None
        for t0 in range(0, z.shape[2], 3):
            frames, cache = vae.decode_chunk(z[:, :, t0:t0 + 3], cache)
            parts.append(frames)
    diff = (torch.cat(parts, 2) - full).abs().max().item()
    print(f"latents {tuple(z.shape)} -> video {tuple(full.shape)}; chunked vs full max|diff| = {diff:.2e}")
    assert diff < 1e-5, "chunked decoding must equal full decoding"
    print("chunked decode == full decode: OK")


if __name__ == "__main__":
    run_cli("vae.py", main)
