"""The iPhone Core ML bundle (paper Sec. D.2): text encoder, DiT with its KV window, decoder.

    S2DiTResources/
      TextEncoder.mlpackage    ids (1,L) int32 + mask (1,L) int32 -> tokens (1,L,Dt)        CPU_AND_NE, fp16
      DiT.mlpackage            ONE multifunction package, weights shared, iOS 18 states:      CPU_AND_NE
                                 denoise(x, t, text, text_mask) -> x0      reads the window
                                 commit (x, t, text, text_mask) -> x0      appends the chunk, rolls the window
                               W4 (4-bit per-block) / W8 (sensitive layers) weights, A8 activations
      DiTStateless.mlpackage   the same step with the caches as explicit inputs and outputs (fallback)
      Decoder.mlpackage        decode_first(z) / decode(z, caches) -> frames, caches          CPU_AND_GPU, fp16
      vocab.json, s2dit_config.json, README.md

Static shapes. A chunk is 3 latent frames, the window 2 chunks. The export path (`ChunkStep`) is the
streaming forward of sandwich.S2DiT written with Python-int shapes and fixed-size caches, reusing the
model's own nn.Modules (tests/test_deploy.py holds it equal to dit.StreamState streaming):
  * softmax K/V of the SSA blocks per window slot + a `valid` slot mask (empty slots get -1e4);
  * LCHA per-chunk states S_c = sum (R phi(k)) v^T, z_c = sum phi(k) (empty slots are zeros, so the
    window sum needs no mask) and the local conv's 2-frame tail;
  * RoPE: every chunk is encoded at the same local frames; slot s of the window is re-placed by a
    CONSTANT rotation R(-(W - s) * 3 frames) when it is read. RoPE scores depend only on position
    differences, so this equals absolute positions exactly, and no frame-offset input is needed.
    # DEVIATION from a frame-offset input: (offset + t) * freq in fp16 on the Neural Engine loses
    # ~0.1 rad after a minute of video; relative slots keep every angle below W * 3 frames.
Quantization (Sec. D.2, "W8A8 / W4 mixed"): per-layer sensitivity = PSNR of the DiT output when only
that layer is 4-bit (fake-quant in PyTorch, as Apple's ml-stable-diffusion mixed-bit pre-analysis);
layers under `psnr_threshold` and the named sensitive layers get 8 bits, the rest 4. Activations
entering every Linear / conv are int8 (symmetric, per tensor) at ranges calibrated on latents,
timesteps and text embeddings captured from streaming runs; they become quantize/dequantize ops.

CLI:  python deploy.py --run runs/tiny --out runs/tiny/S2DiTResources      build (progress prints)
      python deploy.py --check runs/tiny/S2DiTResources --json             offline check, JSON last line
      python deploy.py --run-bundle BUNDLE --prompt "a red circle moves right"   macOS only
Legend: C latent channels, h x w latent grid, N tokens per chunk (hi-res), P tokens (lo-res), D width,
H heads, d head dim, W window chunks, L text tokens, nL / nS LCHA / SSA blocks.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import flow
from dit import apply_rope, timestep_features
from lcha import LCHA
from sandwich import switches


@dataclass
class DeployConfig:
    psnr_threshold: float = 30.0   # dB: a layer whose 4-bit PSNR is below this gets 8 bits  # ASSUMPTION
    block_size: int = 32           # int4 per-block granularity along the input axis (paper: unstated)
    calib_prompts: int = 4         # prompts streamed to capture calibration inputs
    calib_chunks: int = 3          # chunks per calibration stream (fills and rolls the window)
    eval_chunks: int = 3           # chunks for the float-vs-quantized PSNR per chunk
    sens_samples: int = 8          # calibration calls used by the per-layer sensitivity scan
    version: str = "1.0"           # bundle version written into metadata


PRESETS = {"tiny": DeployConfig(calib_prompts=2, calib_chunks=3), "small": DeployConfig()}
# Layers forced to 8 bits whatever their measured PSNR (paper: patch embedding, projections in and out,
# text embedding/projection, final layer). ASSUMPTION: "projections in and out" = time embedding, the
# pooled-text projection and the down_n / up_n projections into and out of the low-resolution stream.
SENSITIVE = ("patch_embed", "text_proj", "text_pool", "time_mlp", "ada_out", "head", "down.", "up.")
# Ops that public reports say do not run on the Neural Engine (they fall back to CPU/GPU).
# ASSUMPTION: not an Apple list; verify on a device with MLComputePlan. "conv3d" = conv on a rank-5 input.
NON_ANE_OPS = {"gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
               "cumsum", "topk", "argsort", "non_maximum_suppression", "while_loop", "cond", "random_normal",
               "random_uniform", "random_bernoulli", "random_categorical", "conv3d", "einsum"}
COMPUTE_UNITS = {"TextEncoder": "CPU_AND_NE", "DiT": "CPU_AND_NE", "DiTStateless": "CPU_AND_NE",
                 "Decoder": "CPU_AND_GPU"}


def get_config(name: str) -> DeployConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown deploy preset {name!r}; known presets: {sorted(PRESETS)}")
    return DeployConfig(**asdict(PRESETS[name]))


# ----------------------------------------------------------------------------------------------
# The DiT step with static shapes and explicit caches
# ----------------------------------------------------------------------------------------------
def slot_rotation(head_dim, window, chunk, theta):
    """cos, sin (W, d/2): slot s of the window sits (W - s) * chunk frames before the current chunk."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw
    freqs = theta ** (-torch.arange(0, d_t, 2, dtype=torch.float64) / d_t)          # (d_t/2,)
    ang = torch.zeros(window, head_dim // 2, dtype=torch.float64)
    ang[:, :d_t // 2] = -torch.tensor([(window - s) * chunk for s in range(window)], dtype=torch.float64)[:, None] * freqs
    return ang.cos().float(), ang.sin().float()


def rope_grid(grid, head_dim, t0, stride, theta):
    from dit import rope_tables
    return rope_tables(grid, head_dim, t0=t0, stride=stride, theta=theta)


class ChunkStep(nn.Module):
    """One chunk through sandwich.S2DiT with fixed-size caches. forward(x, t, text, mask, caches) ->
    (x0, new): x0 = x - t v, `new` = this chunk's cache entries (what `commit` appends).
    caches = (lcha_S (nL,W,H,d,d), lcha_z (nL,W,H,d), lcha_tail (nL,D,2,h',w'), ssa_K, ssa_V (nS,W,H,P,d),
    valid (W,)). Activation quant points: act_mode None | "calib" | "fake" | "export"."""

    def __init__(self, model, latent_hw):
        super().__init__()
        cfg = model.cfg
        self.model = model
        if cfg.sink:
            raise ValueError(f"deploy supports sink = 0 chunks, got {cfg.sink}")
        if getattr(model, "attn_kind", "lcha") != "lcha":
            raise ValueError(f"deploy supports the LCHA sandwich, got attention {model.attn_kind!r}")
        pt, ph, pw = cfg.patch
        if latent_hw % (ph * model.stride):
            raise ValueError(f"latent side {latent_hw} must be divisible by patch {ph} x SSA stride {model.stride}")
        self.C, self.T, self.hw, self.W = cfg.in_channels, cfg.chunk, latent_hw, cfg.window
        self.D, self.H, self.d = cfg.dim, cfg.heads, cfg.dim // cfg.heads
        self.grid = (cfg.chunk // pt, latent_hw // ph, latent_hw // pw)               # hi-res token grid
        self.lo = (self.grid[0], self.grid[1] // model.stride, self.grid[2] // model.stride)
        self.N, self.P = math.prod(self.grid), math.prod(self.lo)
        t0 = self.W * cfg.chunk                                                       # current chunk: local frames
        for name, (cos, sin) in (("hi", rope_grid(self.grid, self.d, t0, 1, cfg.rope_theta)),
                                 ("lo", rope_grid(self.lo, self.d, t0, model.stride, cfg.rope_theta)),
                                 ("slot", slot_rotation(self.d, self.W, cfg.chunk, cfg.rope_theta))):
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)
        self.nL = 2 * sum(model.layout)
        self.nS = 2 * len(model.layout) - self.nL
        self.names = {id(m): n for n, m in model.named_modules()}
        self.act_mode, self.act_absmax, self.act_scales = None, {}, {}

    def cache_shapes(self):
        W, H, d, D, (T, h, w) = self.W, self.H, self.d, self.D, self.grid
        return {"lcha_S": (self.nL, W, H, d, d), "lcha_z": (self.nL, W, H, d), "lcha_tail": (self.nL, D, 2, h, w),
                "ssa_K": (self.nS, W, H, self.P, d), "ssa_V": (self.nS, W, H, self.P, d), "valid": (W,)}

    def empty_caches(self, dtype=torch.float32):
        return tuple(torch.zeros(s, dtype=dtype) for s in self.cache_shapes().values())

    # --- activation quantization points: the input of every Linear / conv / phi --------------------
    def aq(self, mod, x):
        if self.act_mode is None:
            return x
        name = self.names[id(mod)]
        if self.act_mode == "calib":
            self.act_absmax[name] = max(self.act_absmax.get(name, 0.0), float(x.detach().abs().max()))
            return x
        s = self.act_scales[name]                                   # symmetric int8: s = absmax / 127
        if self.act_mode == "fake":
            return (x / s).round().clamp(-128, 127) * s
        return torch.quantize_per_tensor(x, s, 0, torch.qint8).dequantize()  # -> quantize/dequantize ops

    def lin(self, mod, x):
        return mod(self.aq(mod, x))

    # --- the pieces of one chunk -----------------------------------------------------------------
    def lcha(self, a: LCHA, x, l, S, z, tail):
        H, d, D, N, (T, h, w) = self.H, self.d, self.D, self.N, self.grid
        qkv = self.lin(a.qkv, x).reshape(1, N, 3, H, d)                    # (1, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (1, H, N, d) each
        phi = lambda u: F.softplus((a.phi.weight @ self.aq(a.phi, u).transpose(-1, -2)).transpose(-1, -2)
                                   + a.phi.bias[:, None])                  # phi_h(u) = softplus(W_h u + b_h)
        phi_q, phi_k = phi(a.q_norm(q)), phi(a.k_norm(k))                  # (1, H, N, d)
        rq, rk = apply_rope(phi_q, self.cos_hi, self.sin_hi), apply_rope(phi_k, self.cos_hi, self.sin_hi)
        S_c, z_c = rk.transpose(-1, -2) @ v, phi_k.sum(2)                  # (1, H, d, d), (1, H, d)
        S_l = S[l]                                                         # (W, H, d, d) window states
        cs, sn = self.cos_slot[:, None, :, None], self.sin_slot[:, None, :, None]   # (W, 1, d/2, 1)
        S_rot = torch.cat([S_l[:, :, :d // 2] * cs - S_l[:, :, d // 2:] * sn,
                           S_l[:, :, :d // 2] * sn + S_l[:, :, d // 2:] * cs], dim=2)  # rows rotated to now
        S_all, z_all = S_c + S_rot.sum(0)[None], z_c + z[l].sum(0)[None]   # Eq. 11 sums over the window
        num = rq @ S_all                                                   # (1, H, N, d)
        den = phi_q @ z_all[..., None]                                     # (1, H, N, 1)
        y_lin = (num / (den + a.eps)).transpose(1, 2).reshape(1, N, D)     # (1, N, D)
        vg = qkv[:, :, 2].reshape(1, N, D).transpose(1, 2).reshape(1, D, T, h, w)   # V on the token grid
        vt = torch.cat([tail[l][None], vg], dim=2)                         # (1, D, T + 2, h, w) causal in time
        y_loc = a.conv(F.pad(self.aq(a.conv, vt), (1, 1, 1, 1)))           # (1, D, T, h, w)
        y_loc = self.lin(a.mix, y_loc.reshape(1, D, N).transpose(1, 2))    # (1, N, D)
        alpha = torch.sigmoid(a.gate)                                      # FusionGate
        y = self.lin(a.proj, alpha * y_lin + (1 - alpha) * y_loc)          # (1, N, D)
        return y, (S_c[0], z_c[0], vt[0, :, -2:])

    def ssa(self, a, x, s, K, V, valid):
        H, d, D, P, W = self.H, self.d, self.D, self.P, self.W
        q, k, v = self.lin(a.qkv, x).reshape(1, P, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (1, H, P, d)
        q = apply_rope(a.q_norm(q), self.cos_lo, self.sin_lo)
        k = apply_rope(a.k_norm(k), self.cos_lo, self.sin_lo)
        Kw = apply_rope(K[s], self.cos_slot[:, None, None], self.sin_slot[:, None, None])  # (W, H, P, d)
        k_all = torch.cat([Kw.permute(1, 0, 2, 3).reshape(1, H, W * P, d), k], dim=2)      # (1, H, (W+1)P, d)
        v_all = torch.cat([V[s].permute(1, 0, 2, 3).reshape(1, H, W * P, d), v], dim=2)
        bias = torch.cat([((valid - 1) * 1e4)[:, None].expand(W, P).reshape(W * P),
                          torch.zeros(P)])                                 # empty slots masked out
        att = (q @ k_all.transpose(-1, -2) / math.sqrt(d) + bias).softmax(-1)  # (1, H, P, (W+1)P)
        y = self.lin(a.proj, (att @ v_all).transpose(1, 2).reshape(1, P, D))    # (1, P, D)
        return y, (k[0], v[0])

    def block(self, blk, x, Nx, c, txt, tbias, attn):
        D = self.D                                                         # Nx: tokens of this grid (int)
        b1, s1, g1, b2, s2, g2 = self.lin(blk.ada, F.silu(c)).chunk(6, dim=-1)  # (1, 1, D) each
        a, new = attn(blk.norm1(x) * (1 + s1) + b1)                        # (1, Nx, D)
        x = x + g1 * a
        cr, H, d = blk.cross, self.H, self.d                               # text cross-attention
        kv = self.lin(cr.kv, txt).reshape(1, -1, 2, H, d).permute(2, 0, 3, 1, 4)  # (2, 1, H, L, d)
        q = cr.q_norm(self.lin(cr.q, blk.norm_cross(x)).reshape(1, Nx, H, d).transpose(1, 2))
        att = (q @ cr.k_norm(kv[0]).transpose(-1, -2) / math.sqrt(d) + tbias).softmax(-1)  # (1, H, Nx, L)
        x = x + self.lin(cr.proj, (att @ kv[1]).transpose(1, 2).reshape(1, Nx, D))
        f = blk.ffn
        h = self.lin(f.fc2, F.gelu(self.lin(f.fc1, blk.norm2(x) * (1 + s2) + b2), approximate="tanh"))
        return x + g2 * h, new

    def forward(self, x, t, text, mask, S, z, tail, K, V, valid):
        m, C, D = self.model, self.C, self.D
        (T, h, w), s, hw = self.grid, m.stride, self.hw
        # patchify (1, 2, 2): (1, C, T, hw, hw) -> (1, N, 4C), the order of dit.patchify
        p = x.reshape(1, C, T, h, 2, w, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(1, self.N, 4 * C)
        tokens = self.lin(m.patch_embed, p)                                # (1, N, D)
        txt = self.lin(m.text_proj[2], F.gelu(self.lin(m.text_proj[0], text), approximate="tanh"))  # (1, L, D)
        mf = (mask > 0).float()                                            # (1, L)
        pooled = (txt * mf[..., None]).sum(1) / mf.sum(1).clamp(min=1)     # (1, D)
        tbias = ((mf - 1) * 1e4)[:, None, None, :]                         # (1, 1, 1, L)
        tf = timestep_features(t.reshape(1, 1), m.cfg.freq_dim)            # (1, 1, Ff): one t per chunk
        c = self.lin(m.time_mlp[2], F.silu(self.lin(m.time_mlp[0], tf))) + self.lin(m.text_pool, pooled)[:, None]
        new = {"S": [], "z": [], "tail": [], "K": [], "V": []}
        li = si = 0
        x_L, S_skip, x_S, S_down = tokens, tokens, None, None             # Alg. 1, line 1
        for n, (m_n, (d_n, u_n)) in enumerate(zip(m.layout, switches(m.layout))):
            if d_n:   # line 5: S <- x_L; x_S <- down_n(x_L)
                dn = m.down[str(n)]
                S_skip = x_L
                g = x_L.reshape(1, T, h // s, s, w // s, s, D).permute(0, 1, 2, 4, 3, 5, 6)
                x_S = S_down = self.lin(dn.proj, g.reshape(1, self.P, s * s * D))   # (1, P, D)
            if u_n:   # line 6: x_L <- S + up_n(x_S - S_down)
                u = self.lin(m.up[str(n)].proj, x_S - S_down).reshape(1, T, h // s, w // s, s, s, D)
                x_L = S_skip + u.permute(0, 1, 2, 4, 3, 5, 6).reshape(1, self.N, D)
            for blk in m.groups[n]:   # line 7
                if m_n:
                    x_L, e = self.block(blk, x_L, self.N, c, txt, tbias, lambda y, l=li: self.lcha(blk.attn, y, l, S, z, tail))
                    li += 1
                    for key, val in zip(("S", "z", "tail"), e):
                        new[key].append(val)
                else:
                    x_S, e = self.block(blk, x_S, self.P, c, txt, tbias, lambda y, j=si: self.ssa(blk.attn, y, j, K, V, valid))
                    si += 1
                    new["K"].append(e[0])
                    new["V"].append(e[1])
        shift, scale = self.lin(m.ada_out, F.silu(c)).chunk(2, dim=-1)   # (1, 1, D) each
        y = self.lin(m.head, m.norm_out(x_L) * (1 + scale) + shift)       # (1, N, 4C)
        v = y.reshape(1, T, h, w, C, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(1, C, T, hw, hw)
        x0 = x - t.reshape(1, 1, 1, 1, 1) * v                              # x0 = x_t - t v
        return x0, tuple(torch.stack(new[k]) if new[k] else torch.zeros(0) for k in ("S", "z", "tail", "K", "V"))


def roll(caches, new):
    """The caches after a commit (functional form): windowed entries drop the oldest slot and append
    this chunk's; the conv tail is replaced; the newest slot becomes valid."""
    out = []
    for name, c, e in zip(CACHE_NAMES[:5], caches[:5], new):
        if not c.numel():
            out.append(c)
        else:
            out.append(e if name == "lcha_tail" else torch.cat([c[:, 1:], e[:, None]], dim=1))
    valid = caches[5]
    return tuple(out) + (torch.cat([valid[1:], torch.ones(1, dtype=valid.dtype)]),)


CACHE_NAMES = ("lcha_S", "lcha_z", "lcha_tail", "ssa_K", "ssa_V", "valid")


class StatefulDiT(nn.Module):
    """The Core ML state version: caches are fp16 buffers (Core ML states are fp16); `commit` rolls them
    with constant-index slice updates (cache[:, :-1] = cache[:, 1:]; cache[:, -1:] = new)."""

    def __init__(self, step: ChunkStep, commit: bool):
        super().__init__()
        self.step, self.commit = step, commit
        for name, shape in step.cache_shapes().items():
            if math.prod(shape):
                self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))

    def forward(self, x, t, text, mask):
        caches = [getattr(self, n).float() if hasattr(self, n) else torch.zeros(0) for n in CACHE_NAMES]
        x0, new = self.step(x, t, text, mask, *caches)
        if self.commit:
            for name, e in zip(CACHE_NAMES[:5], new):
                if hasattr(self, name):
                    buf = getattr(self, name)
                    if name == "lcha_tail":                          # not windowed: replaced
                        buf[:] = e.half()
                    else:
                        buf[:, :-1] = buf[:, 1:].clone()
                        buf[:, -1:] = e[:, None].half()
            self.valid[:-1] = self.valid[1:].clone()
            self.valid[-1:] = torch.ones(1, dtype=torch.float16)
        return x0


class StatelessDiT(nn.Module):
    """Fallback: caches in, x0 and the caches rolled with this chunk out (keep them after a commit)."""

    def __init__(self, step: ChunkStep):
        super().__init__()
        self.step = step
        self.keep = [n for n, s in step.cache_shapes().items() if math.prod(s)]

    def forward(self, x, t, text, mask, *caches):
        full = dict(zip(self.keep, caches))
        cs = tuple(full.get(n, torch.zeros(0)) for n in CACHE_NAMES)
        x0, new = self.step(x, t, text, mask, *cs)
        rolled = dict(zip(CACHE_NAMES, roll(cs, new)))
        return (x0,) + tuple(rolled[n] for n in self.keep)


# ----------------------------------------------------------------------------------------------
# Calibration capture, per-layer sensitivity, the quantization plan, PyTorch emulation
# ----------------------------------------------------------------------------------------------
DEFAULT_PROMPTS = ["a red circle moves right", "a blue square moves up", "a green triangle moves left",
                   "a yellow circle moves down"]


@torch.no_grad()
def stream_latents(step, models, prompt, chunks, steps, seed=0, record=None):
    """stream.stream's loop (few-step denoise reading the window, commit at t_ctx, roll) through a
    ChunkStep; `record` (list) receives every call's inputs. Returns the clean chunks [(1, C, 3, h, w)]."""
    import text as text_mod
    ts = flow.few_step_schedule(steps, models["shift"])
    tok, _, mask = text_mod.encode_text(models["text"], models["tokenizer"], [prompt])
    mask = mask.int()
    g = torch.Generator().manual_seed(seed)
    caches, outs = step.empty_caches(), []
    for _ in range(chunks):
        x_t = torch.randn(1, step.C, step.T, step.hw, step.hw, generator=g)    # (1, C, 3, h, w)
        for i, t in enumerate(ts):
            args = (x_t, torch.tensor([t]), tok, mask)
            if record is not None:
                record.append(args + caches)
            x0, _ = step(*args, *caches)
            if i + 1 < len(ts):
                x_t = (1 - ts[i + 1]) * x0 + ts[i + 1] * torch.randn(x0.shape, generator=g)
        t_ctx = float(models["t_ctx"])
        x_c = (1 - t_ctx) * x0 + t_ctx * torch.randn(x0.shape, generator=g) if t_ctx > 0 else x0
        args = (x_c, torch.tensor([t_ctx]), tok, mask)
        if record is not None:
            record.append(args + caches)
        _, new = step(*args, *caches)
        caches = roll(caches, new)
        outs.append(x0)
    return outs


def capture_calibration(models, prompts, chunks, steps):
    """Inputs of every DiT call (denoise steps and commits) of streams of `prompts`."""
    step, record = ChunkStep(models["model"], models["latent_hw"]).eval(), []
    for i, p in enumerate(prompts):
        stream_latents(step, models, p, chunks, steps, seed=i, record=record)
    return record


@torch.no_grad()
def calibrate(step, calib):
    """Activation ranges: absmax of every quantized layer's input over the calibration calls."""
    step.act_mode, step.act_absmax = "calib", {}
    for args in calib:
        step(*args)
    step.act_mode = None
    return {k: max(v, 1e-8) / 127.0 for k, v in step.act_absmax.items()}


def quant_layers(model):
    """name -> module for every weight the bundle quantizes (Linear, conv, phi)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d)) or
            (hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.dim() == 3 and n.endswith("phi"))}


def granularity(mod, bits, block_size):
    w = mod.weight
    if bits == 4 and isinstance(mod, nn.Linear) and w.shape[1] % block_size == 0:
        return "per_block"
    return "per_channel"


def fake_quant_weight(w, bits, gran, block_size):
    """Symmetric linear quantization (coremltools "linear_symmetric"): per output channel, or per block
    of `block_size` inputs. Returns the dequantized weight."""
    qmax = 2 ** (bits - 1) - 1
    if gran == "per_block":
        wb = w.reshape(w.shape[0], -1, block_size)                         # (out, in/bs, bs)
        s = wb.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
        return ((wb / s).round().clamp(-qmax - 1, qmax) * s).reshape(w.shape)
    s = w.reshape(w.shape[0], -1).abs().amax(-1).clamp(min=1e-12) / qmax   # (out,)
    s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return (w / s).round().clamp(-qmax - 1, qmax) * s


def psnr(ref, x):
    """PSNR in dB with the reference's peak |value| as the signal peak."""
    mse = (ref - x).pow(2).mean().clamp(min=1e-20)
    return float(10 * torch.log10(ref.abs().max().pow(2) / mse))


@torch.no_grad()
def sensitivity(models, calib, cfg: DeployConfig):
    """PSNR of the DiT output x0 when only one layer's weights are 4-bit, every layer in turn."""
    step = ChunkStep(models["model"], models["latent_hw"]).eval()
    calib = calib[::max(1, len(calib) // cfg.sens_samples)][:cfg.sens_samples]  # a spread-out subset
    refs = [step(*a)[0] for a in calib]
    table = {}
    for name, mod in quant_layers(models["model"]).items():
        w = mod.weight.data.clone()
        mod.weight.data.copy_(fake_quant_weight(w, 4, granularity(mod, 4, cfg.block_size), cfg.block_size))
        out = torch.cat([step(*a)[0].flatten() for a in calib])
        mod.weight.data.copy_(w)
        table[name] = psnr(torch.cat([r.flatten() for r in refs]), out)
    return table


def make_plan(models, table, cfg: DeployConfig):
    """{layer: {"bits", "granularity", "psnr_w4", "why"}}: 8 bits for the named sensitive layers and
    for layers under the PSNR threshold, 4 bits elsewhere."""
    plan = {}
    for name, mod in quant_layers(models["model"]).items():
        forced = any(name == s or name.startswith(s if s.endswith(".") else s + ".") or name == s.rstrip(".")
                     or name.startswith(s) for s in SENSITIVE)
        low = table[name] < cfg.psnr_threshold
        bits = 8 if (forced or low) else 4
        plan[name] = {"bits": bits, "granularity": granularity(mod, bits, cfg.block_size), "psnr_w4": table[name],
                      "why": "sensitive layer" if forced else (f"PSNR < {cfg.psnr_threshold}" if low else "")}
    return plan


def print_plan(plan):
    print(f"{'layer':44s} {'PSNR(W4) dB':>12s} {'bits':>5s}  why")
    for name, p in plan.items():
        print(f"{name:44s} {p['psnr_w4']:12.1f} {p['bits']:5d}  {p['why']}")


def emulate_quantized(model, plan, calib, latent_hw=None, block_size=32):
    """PyTorch emulation of the quantized DiT: a copy of `model` with fake-quantized weights at the
    planned bits and a ChunkStep whose activation points fake-quantize to int8 at the ranges
    calibrated on `calib` (a list of ChunkStep inputs, or a precomputed {layer: scale})."""
    q = copy.deepcopy(model).eval()
    latent_hw = latent_hw if latent_hw is not None else calib[0][0].shape[-1]
    step = ChunkStep(q, latent_hw).eval()
    scales = calib if isinstance(calib, dict) else calibrate(ChunkStep(model, latent_hw).eval(), calib)
    with torch.no_grad():
        for name, mod in quant_layers(q).items():
            mod.weight.copy_(fake_quant_weight(mod.weight, plan[name]["bits"], plan[name]["granularity"], block_size))
    step.act_mode, step.act_scales = "fake", scales
    return step


@torch.no_grad()
def quality_report(models, qstep, prompts, chunks, steps):
    """PSNR of the denoised latents per chunk, quantized emulation vs float, same noise."""
    fstep = ChunkStep(models["model"], models["latent_hw"]).eval()
    per_chunk = []
    for i, p in enumerate(prompts):
        a = stream_latents(fstep, models, p, chunks, steps, seed=100 + i)
        b = stream_latents(qstep, models, p, chunks, steps, seed=100 + i)
        per_chunk.append([psnr(x, y) for x, y in zip(a, b)])
    return [sum(c[j] for c in per_chunk) / len(per_chunk) for j in range(chunks)]


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
def _ct():
    import coremltools as ct
    return ct


def _convert(module, example, inputs, outputs, states=None, export=False):
    """torch.jit.trace (default) or torch.export (`export=True`: shapes specialise to Python ints, for
    code that does x.shape arithmetic we may not edit, e.g. vae.py's GroupNorm4d) -> mlprogram, iOS 18."""
    ct = _ct()
    with torch.no_grad():
        if export:
            traced = torch.export.export(module.eval(), example).run_decompositions({})
        else:
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
    kw = {"states": states} if states else {}
    return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=n) for n in outputs],
                      minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16, **kw)


def _stage(name, fn):
    """Run one export; any failure names the model ("DiT export failed: ...")."""
    try:
        return fn()
    except Exception as e:
        raise RuntimeError(f"{name} export failed: {type(e).__name__}: {e}") from e


def const_name_map(mlmodel, names):
    """torch layer name -> name of the const op holding its weight in the converted program."""
    consts = [op.outputs[0].name for f in mlmodel._mil_program.functions.values()
              for op in f.operations if op.op_type == "const"]
    out = {}
    for n in names:
        key = "_" + n.replace(".", "_") + "_weight_to_fp16"
        hits = [c for c in consts if c.endswith(key)]
        if len(hits) != 1:
            raise ValueError(f"weight of layer {n} not found (or ambiguous) among the program's consts: {hits}")
        out[n] = hits[0]
    return out


def quantize_weights(mlmodel, plan, block_size):
    """W4/W8 per the plan, by const op name (weight_threshold=0: small weights are not silently skipped)."""
    import coremltools.optimize.coreml as cto
    names = const_name_map(mlmodel, plan)
    cfgs = {}
    for layer, p in plan.items():
        kw = {"block_size": block_size} if p["granularity"] == "per_block" else {}
        cfgs[names[layer]] = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{p['bits']}",
                                                          granularity=p["granularity"], weight_threshold=0, **kw)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=cfgs))


def set_metadata(path, role, description, version, extra=None):
    ct = _ct()
    m = ct.models.MLModel(path, skip_model_load=True)
    m.author = "S2DiT toy reimplementation (deploy.py)"
    m.short_description = description
    m.version = version
    m.user_defined_metadata.update({"role": role, "version": version,
                                    "intended_compute_units": COMPUTE_UNITS[role], **(extra or {})})
    tmp = path[:-len(".mlpackage")] + "_meta.mlpackage"
    m.save(tmp)
    shutil.rmtree(path)
    os.replace(tmp, path)


def save_multi(parts, path, default):
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    for fn, p in parts.items():
        desc.add_function(p, src_function_name="main", target_function_name=fn)
    desc.default_function_name = default
    ct.utils.save_multifunction(desc, path)


def dit_io(step):
    ct = _ct()
    L, Dt = step.L, step.model.cfg.text_dim
    x = ct.TensorType(name="x", shape=(1, step.C, step.T, step.hw, step.hw))
    return [x, ct.TensorType(name="t", shape=(1,)), ct.TensorType(name="text", shape=(1, L, Dt)),
            ct.TensorType(name="text_mask", shape=(1, L), dtype=np.int32)]


def dit_example(step):
    return (torch.randn(1, step.C, step.T, step.hw, step.hw), torch.rand(1),
            torch.randn(1, step.L, step.model.cfg.text_dim), torch.ones(1, step.L, dtype=torch.int32))


def export_dit(models, out_dir, plan=None, act_scales=None, block_size=32, tmp=None, stateless=True, fp16_dir=None):
    """DiT.mlpackage (stateful, denoise + commit) and DiTStateless.mlpackage; fp16 if plan is None.
    fp16_dir: also save the same stateful package before weight quantization (the size reference)."""
    def run():
        ct = _ct()
        step = ChunkStep(models["model"], models["latent_hw"]).eval()
        step.L = models["tokenizer"].max_len
        if act_scales is not None:
            step.act_mode, step.act_scales = "export", act_scales
        work = tmp or os.path.join(out_dir, ".work")
        os.makedirs(work, exist_ok=True)
        shapes = {n: s for n, s in step.cache_shapes().items() if math.prod(s)}
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=s, dtype=np.float16), name=n) for n, s in shapes.items()]
        parts, fp16_parts = {}, {}
        for fn in ("denoise", "commit"):
            ml = _convert(StatefulDiT(step, fn == "commit"), dit_example(step), dit_io(step), ["x0"], states)
            if fp16_dir is not None:
                fp16_parts[fn] = os.path.join(work, f"dit_{fn}_fp16.mlpackage")
                ml.save(fp16_parts[fn])
            if plan is not None:
                ml = quantize_weights(ml, plan, block_size)
            parts[fn] = os.path.join(work, f"dit_{fn}.mlpackage")
            ml.save(parts[fn])
        path = os.path.join(out_dir, "DiT.mlpackage")
        save_multi(parts, path, "denoise")
        res = {"DiT": path}
        if fp16_dir is not None:
            res["DiT_fp16"] = os.path.join(fp16_dir, "DiT_fp16.mlpackage")
            save_multi(fp16_parts, res["DiT_fp16"], "denoise")
        if stateless:
            cin = [ct.TensorType(name=n, shape=s) for n, s in shapes.items()]
            ex = dit_example(step) + tuple(torch.zeros(s) for s in shapes.values())
            ml = _convert(StatelessDiT(step), ex, dit_io(step) + cin, ["x0"] + [n + "_out" for n in shapes])
            if plan is not None:
                ml = quantize_weights(ml, plan, block_size)
            res["DiTStateless"] = os.path.join(out_dir, "DiTStateless.mlpackage")
            ml.save(res["DiTStateless"])
        shutil.rmtree(work, ignore_errors=True)
        return res
    return _stage("DiT", run)


class TextExport(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, ids, mask):                    # ids, mask (1, L) int32
        # TextEncoder.forward minus its input checks (a Python `if` on tensor values cannot be traced)
        e, m = self.enc, mask > 0
        L, D, H = e.cfg.max_len, e.cfg.dim, e.cfg.heads
        bias = ((m.float() - 1) * 1e4)[:, None, None, :]                    # (1, 1, 1, L): <pad> keys off
        x = e.tok_emb(ids.long()) + e.pos_emb[None]  # (1, L, Dt)
        for blk in e.blocks:                         # text.Block with Python-int shapes
            q, k, v = (u.reshape(1, L, H, D // H).transpose(1, 2) for u in blk.qkv(blk.ln1(x)).chunk(3, dim=-1))
            a = (q @ k.transpose(-2, -1) / math.sqrt(D // H) + bias).softmax(-1) @ v   # (1, H, L, D/H)
            x = x + blk.out(a.transpose(1, 2).reshape(1, L, D))
            x = x + blk.mlp(blk.ln2(x))              # (1, L, Dt)
        return e.ln_f(x) * m[..., None].float()      # (1, L, Dt) tokens for cross-attention, <pad> rows 0


def export_text(models, out_dir):
    def run():
        ct = _ct()
        L = models["tokenizer"].max_len
        ids = torch.ones(1, L, dtype=torch.int32)
        inputs = [ct.TensorType(name="ids", shape=(1, L), dtype=np.int32),
                  ct.TensorType(name="mask", shape=(1, L), dtype=np.int32)]
        ml = _convert(TextExport(models["text"]), (ids, torch.ones(1, L, dtype=torch.int32)), inputs, ["tokens"])
        path = os.path.join(out_dir, "TextEncoder.mlpackage")
        ml.save(path)
        return path
    return _stage("TextEncoder", run)


class DecoderExport(nn.Module):
    """One latent chunk -> frames with the decoder's temporal cache as explicit tensors. The first chunk
    of a clip differs (its first latent frame becomes ONE pixel frame: 9 frames instead of 12, and the
    shorter sequence changes every later causal conv), so it is its own function `decode_first`, whose
    past is the zeros a fresh cache holds; `decode` takes and returns the cache."""

    def __init__(self, dec, keys, shapes, first):
        super().__init__()
        self.net = dec.net if hasattr(dec, "net") else dec.decoder
        self.vae = None if hasattr(dec, "net") else dec               # the VAE decoder de-normalises first
        self.keys, self.first = keys, first
        for i, s in enumerate(shapes):
            self.register_buffer(f"zero{i}", torch.zeros(s), persistent=False)

    def forward(self, z, *caches):
        if self.vae is not None:
            m, s = self.vae._norm_shape()
            z = z * s + m
        past = [getattr(self, f"zero{i}") for i in range(len(self.keys))] if self.first else caches
        cache = dict(zip(self.keys, past))
        frames = self.net(z, cache, self.first)                        # (1, 3, 9 or 12, H, W)
        return (frames,) + tuple(cache[k] for k in self.keys)


def decoder_cache_layout(dec, C, hw, T):
    with torch.no_grad():
        _, cache = dec.decode_chunk(torch.zeros(1, C, T, hw, hw), None)
    keys = sorted(cache)
    return keys, [tuple(cache[k].shape) for k in keys]


def export_decoder(models, out_dir, tmp=None):
    def run():
        ct = _ct()
        dec, cfg, hw = models["decoder"].eval(), models["model"].cfg, models["latent_hw"]
        keys, shapes = decoder_cache_layout(dec, cfg.in_channels, hw, cfg.chunk)
        work = tmp or os.path.join(out_dir, ".work_dec")
        os.makedirs(work, exist_ok=True)
        z = ct.TensorType(name="z", shape=(1, cfg.in_channels, cfg.chunk, hw, hw))
        cin = [ct.TensorType(name=f"cache_{i}", shape=s) for i, s in enumerate(shapes)]
        outs = ["frames"] + [f"cache_{i}_out" for i in range(len(keys))]
        parts = {}
        for fn, first in (("decode_first", True), ("decode", False)):
            ex = (torch.randn(1, cfg.in_channels, cfg.chunk, hw, hw),) + (() if first else tuple(torch.zeros(s) for s in shapes))
            ml = _convert(DecoderExport(dec, keys, shapes, first), ex, [z] + ([] if first else cin), outs, export=True)
            parts[fn] = os.path.join(work, f"{fn}.mlpackage")
            ml.save(parts[fn])
        path = os.path.join(out_dir, "Decoder.mlpackage")
        save_multi(parts, path, "decode")
        shutil.rmtree(work, ignore_errors=True)
        return path, keys, shapes
    return _stage("Decoder", run)


# ----------------------------------------------------------------------------------------------
# The bundle
# ----------------------------------------------------------------------------------------------
def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def weight_bytes(path):
    w = os.path.join(path, "Data", "com.apple.CoreML", "weights")
    return dir_bytes(w) if os.path.isdir(w) else 0


def _atomic_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def vbench_drop(models, qstep, n_prompts=2, chunks=3, steps=2, seed=0):
    """VBench-lite (evaluate.score_videos) of float vs emulated-quantized streams on held-out prompts."""
    import data
    import evaluate
    prompts = [data.canonical_prompt(*a) for a in data.eval_prompts(n_prompts)]
    fstep = ChunkStep(models["model"], models["latent_hw"]).eval()
    scores = {}
    for name, st in (("float", fstep), ("quantized", qstep)):
        vids = []
        for i, p in enumerate(prompts):
            cache, frames = None, []
            for z in stream_latents(st, models, p, chunks, steps, seed=seed + i):
                f, cache = models["decoder"].decode_chunk(z, cache)
                frames.append(f[0].clamp(-1, 1))
            vids.append(torch.cat(frames, dim=1))
        scores[name] = evaluate.score_videos(torch.stack(vids), prompts, seed=seed)
    return scores


README = """# S2DiTResources: streaming text-to-video on the iPhone (Core ML, iOS 18)

Built by `deploy.py` (paper Sec. D.2). Shapes, tensor names, schedule: `s2dit_config.json`.

| package | load with `MLModelConfiguration.computeUnits` | what |
|---|---|---|
| TextEncoder.mlpackage | `.cpuAndNeuralEngine` | `ids`, `mask` (1,L) int32 -> `tokens` (1,L,Dt) |
| DiT.mlpackage | `.cpuAndNeuralEngine`, `functionName = "denoise"` / `"commit"` | one chunk step, caches are states |
| DiTStateless.mlpackage | `.cpuAndNeuralEngine` | the same step, caches as inputs/outputs (fallback) |
| Decoder.mlpackage | `.cpuAndGPU`, `functionName = "decode_first"` / `"decode"` | latent chunk -> RGB frames |

Tokenize with `vocab.json`: lower-case, punctuation -> spaces, split on spaces, one id per word
(`<unk>` = 1), pad with 0 to `max_len`; mask = 1 for real words.

## The streaming loop (Swift)
```swift
let cfgNE = MLModelConfiguration(); cfgNE.computeUnits = .cpuAndNeuralEngine
let text = try TextEncoder(configuration: cfgNE)                 // or MLModel(contentsOf:configuration:)
let dn = MLModelConfiguration(); dn.computeUnits = .cpuAndNeuralEngine; dn.functionName = "denoise"
let cm = MLModelConfiguration(); cm.computeUnits = .cpuAndNeuralEngine; cm.functionName = "commit"
let denoise = try MLModel(contentsOf: ditURL, configuration: dn)
let commit  = try MLModel(contentsOf: ditURL, configuration: cm)
let state = denoise.makeState()          // ONE state for the stream: K/V window, LCHA states, conv tails, valid
let dec1 = MLModelConfiguration(); dec1.computeUnits = .cpuAndGPU; dec1.functionName = "decode_first"
let decN = MLModelConfiguration(); decN.computeUnits = .cpuAndGPU; decN.functionName = "decode"
// 1. tokens = text.prediction(ids, mask)                             once per prompt
// 2. for each chunk i:
//      x = Gaussian noise (1,C,3,h,w)
//      for (j, t) in schedule.enumerated():                        // s2dit_config.json "schedule"
//          x0 = denoise.prediction(from: [x, t, text, text_mask], using: state)["x0"]
//          if j + 1 < schedule.count { x = (1 - t') * x0 + t' * noise }   // t' = schedule[j + 1]
//      xc = t_ctx > 0 ? (1 - t_ctx) * x0 + t_ctx * noise : x0
//      _ = commit.prediction(from: [xc, t_ctx, text, text_mask], using: state)   // appends, rolls the window
//      frames, caches = (i == 0 ? decode_first(z: x0) : decode(z: x0, cache_k: caches))  // keep caches
//      show frames (9 for chunk 0, then 12) at 16 FPS
```
Denoise outputs x0 (= x - t v), not v. A new prompt: re-run the text encoder, keep the state.
If an MLState made by the "denoise" function cannot be passed to the "commit" function on your OS
version, use DiTStateless: call it for every step and, after the commit call, feed its `*_out`
caches back as the next inputs (start from zeros).
"""


def build_bundle(models, out_dir, calib_prompts=None, progress=True, cfg=None):
    """Calibrate, pick bits per layer, export the three models, write the bundle. -> report dict."""
    t_start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)                      # conversion and the scans are tiny ops: 1 thread is faster
    say = (lambda *a: print(f"[{time.time() - t_start:6.1f} s]", *a, flush=True)) if progress else (lambda *a, **k: None)
    cfg = cfg or get_config(models.get("preset") if models.get("preset") in PRESETS else "small")
    steps = (models.get("steps") or [4])[-1]
    prompts = list(calib_prompts or DEFAULT_PROMPTS[:cfg.calib_prompts])
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        say(f"[deploy] capturing calibration inputs: {len(prompts)} prompts x {cfg.calib_chunks} chunks x {steps} steps")
        calib = _stage("DiT", lambda: capture_calibration(models, prompts, cfg.calib_chunks, steps))
        scales = calibrate(ChunkStep(models["model"], models["latent_hw"]).eval(), calib)
        say(f"[deploy] per-layer sensitivity (W4 of one layer at a time, {cfg.sens_samples} calls)")
        table = sensitivity(models, calib, cfg)
        plan = make_plan(models, table, cfg)
        if progress:
            print_plan(plan)
        qstep = emulate_quantized(models["model"], plan, scales, models["latent_hw"], cfg.block_size)
        per_chunk = quality_report(models, qstep, prompts[:2], cfg.eval_chunks, steps)
        say("[deploy] emulated W4/W8 + A8 vs float, PSNR of denoised latents per chunk: "
            + ", ".join(f"{p:.1f}" for p in per_chunk) + " dB")
        vb = None
        if models.get("run"):
            try:
                vb = vbench_drop(models, qstep, steps=steps)
            except Exception as e:              # evaluate.py absent or its API differs: report, don't fail
                vb = {"skipped": f"{type(e).__name__}: {e}"}
        say("[deploy] TextEncoder")
        export_text(models, tmp)
        say("[deploy] DiT (stateful denoise + commit, stateless fallback; W4/W8 + A8)")
        ref = os.path.join(tmp, ".fp16")
        os.makedirs(ref)
        dit_paths = export_dit(models, tmp, plan, scales, cfg.block_size, fp16_dir=ref)
        sizes_fp16 = {"package": dir_bytes(dit_paths["DiT_fp16"]), "weights": weight_bytes(dit_paths["DiT_fp16"])}
        shutil.rmtree(ref)
        say("[deploy] Decoder (decode_first + decode)")
        _, dkeys, dshapes = export_decoder(models, tmp)
        mcfg, L = models["model"].cfg, models["tokenizer"].max_len
        step = ChunkStep(models["model"], models["latent_hw"])
        roles = {"TextEncoder": "text token ids -> text embedding", "DiT": "one denoising step / commit of one chunk",
                 "DiTStateless": "one chunk step, caches as inputs/outputs", "Decoder": "latent chunk -> RGB frames"}
        for role, desc in roles.items():
            set_metadata(os.path.join(tmp, role + ".mlpackage"), role, desc, cfg.version,
                         {"model": str(models.get("name", "S2DiT")), "quantization":
                          "W4/W8 mixed + A8" if role.startswith("DiT") else "fp16"})
        models["tokenizer"].save_vocab(os.path.join(tmp, "vocab.json"))
        config = {
            "version": cfg.version, "model": str(models.get("name", "S2DiT")), "chunk_latent_frames": mcfg.chunk,
            "window_chunks": mcfg.window, "steps": steps, "shift": models["shift"],
            "schedule": flow.few_step_schedule(steps, models["shift"]), "t_ctx": float(models["t_ctx"]),
            "fps": models.get("fps", 16), "frames_per_chunk": {"first": 4 * mcfg.chunk - 3, "next": 4 * mcfg.chunk},
            "latent": [1, mcfg.in_channels, mcfg.chunk, models["latent_hw"], models["latent_hw"]],
            "text": {"max_len": L, "dim": mcfg.text_dim},
            "compute_units": COMPUTE_UNITS,
            "tensors": {"TextEncoder": {"inputs": ["ids", "mask"], "outputs": ["tokens"]},
                        "DiT": {"functions": ["denoise", "commit"], "inputs": ["x", "t", "text", "text_mask"],
                                "outputs": ["x0"], "states": {k: list(v) for k, v in step.cache_shapes().items() if math.prod(v)},
                                "denoise_output": "x0 = x - t * v"},
                        "DiTStateless": {"extra_outputs": "<cache>_out: the caches rolled with this chunk"},
                        "Decoder": {"functions": ["decode_first", "decode"], "inputs": ["z"] + [f"cache_{i}" for i in range(len(dkeys))],
                                    "outputs": ["frames"] + [f"cache_{i}_out" for i in range(len(dkeys))],
                                    "cache_shapes": [list(s) for s in dshapes]}},
            "rope": "relative window slots: no frame offset input (see deploy.py docstring)",
            "quantization": {"weights": {k: v["bits"] for k, v in plan.items()}, "activations": "int8 symmetric per tensor",
                             "psnr_threshold_db": cfg.psnr_threshold}}
        _atomic_json(os.path.join(tmp, "s2dit_config.json"), config)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(README)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    sizes = {n: dir_bytes(os.path.join(out_dir, n + ".mlpackage")) for n in roles}
    q = {"package": sizes["DiT"], "weights": weight_bytes(os.path.join(out_dir, "DiT.mlpackage"))}
    report = {"bundle": out_dir, "plan": plan, "sensitivity_psnr_w4": table, "act_scales": scales,
              "psnr_per_chunk_db": per_chunk, "vbench_lite": vb, "sizes_bytes": sizes,
              "dit_fp16": sizes_fp16, "dit_quantized": q,
              "dit_size_ratio": {k: q[k] / max(sizes_fp16[k], 1) for k in q}, "seconds": time.time() - t_start}
    say(f"[deploy] DiT fp16 {sizes_fp16['package']:,} B -> quantized {q['package']:,} B "
        f"(weights {sizes_fp16['weights']:,} -> {q['weights']:,} B); bundle at {out_dir} in {report['seconds']:.0f} s")
    return report


# ----------------------------------------------------------------------------------------------
# Offline check
# ----------------------------------------------------------------------------------------------
def _walk_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk_ops(b)


def _feature(f):
    t = f.type
    kind = t.WhichOneof("Type")
    if kind == "multiArrayType":
        from coremltools.proto import FeatureTypes_pb2 as ft
        return {"name": f.name, "shape": list(t.multiArrayType.shape),
                "dtype": ft.ArrayFeatureType.ArrayDataType.Name(t.multiArrayType.dataType)}
    if kind == "stateType":
        a = t.stateType.arrayType
        return {"name": f.name, "shape": list(a.shape), "dtype": "FLOAT16" if a.dataType == 65552 else str(a.dataType)}
    return {"name": f.name, "type": kind}


def inspect_package(path):
    """Functions, I/O, states, op census (+ ops flagged as not Neural-Engine), weight dtypes, sizes."""
    ct = _ct()
    from coremltools.proto import MIL_pb2
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    d = spec.description
    funcs = list(d.functions) or [d]
    names = [f.name for f in d.functions] or ["main"]
    out = {"functions": {}, "metadata": {"author": d.metadata.author, "short_description": d.metadata.shortDescription,
                                         "version": d.metadata.versionString, **dict(d.metadata.userDefined)},
           "size_bytes": dir_bytes(path), "weights_bytes": weight_bytes(path)}
    for name, f in zip(names, funcs):
        fn = spec.mlProgram.functions[name]
        census, weights, flagged = {}, {}, set()
        for op in _walk_ops(fn.block_specializations[fn.opset]):
            typ = op.type
            if typ == "conv" and len(op.outputs[0].type.tensorType.dimensions) == 5:
                typ = "conv3d"                                           # a 3-D conv: see NON_ANE_OPS
            census[typ] = census.get(typ, 0) + 1
            if typ in NON_ANE_OPS:
                flagged.add(typ)
            if typ.startswith("constexpr_"):
                arg = op.inputs["data"].arguments[0] if "data" in op.inputs else None
                dt = arg.value.type.tensorType.dataType if arg is not None and arg.HasField("value") else None
                weights[op.outputs[0].name] = MIL_pb2.DataType.Name(dt) if dt is not None else typ
            elif typ == "const" and "val" in op.attributes:
                tt = op.attributes["val"].type.tensorType
                if len(tt.dimensions) >= 2:
                    weights[op.outputs[0].name] = MIL_pb2.DataType.Name(tt.dataType)
        out["functions"][name] = {"inputs": [_feature(i) for i in f.input], "outputs": [_feature(o) for o in f.output],
                                  "states": [_feature(s) for s in f.state], "op_census": census,
                                  "non_ane_ops": sorted(flagged), "weights": weights}
    first = out["functions"][names[0]]
    out.update({k: first[k] for k in ("inputs", "outputs", "states")})
    out["weight_dtypes"] = {}
    for fn in out["functions"].values():
        for dt in fn["weights"].values():
            out["weight_dtypes"][dt] = out["weight_dtypes"].get(dt, 0) + 1
    return out


def check_bundle(path):
    """Validate a bundle offline (no prediction): every file, every model's I/O, states, functions, ops,
    weight dtypes, metadata. -> {"ok", "problems", "models": {...}, "config": ...}."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"bundle directory {path} not found; build one with `python deploy.py --run RUN --out {path}`")
    problems, models = [], {}
    for f in ("vocab.json", "s2dit_config.json", "README.md"):
        if not os.path.exists(os.path.join(path, f)):
            problems.append(f"missing {f}")
    expect = {"TextEncoder": ["main"], "DiT": ["denoise", "commit"], "DiTStateless": ["main"],
              "Decoder": ["decode_first", "decode"]}
    for name, fns in expect.items():
        p = os.path.join(path, name + ".mlpackage")
        if not os.path.isdir(p):
            problems.append(f"missing {name}.mlpackage")
            continue
        info = inspect_package(p)
        models[name] = info
        if sorted(info["functions"]) != sorted(fns):
            problems.append(f"{name}: functions {sorted(info['functions'])}, expected {fns}")
        if name == "DiT" and not all(info["functions"][f]["states"] for f in info["functions"]):
            problems.append("DiT: functions without states")
        if not info["metadata"].get("role") or not info["metadata"].get("intended_compute_units"):
            problems.append(f"{name}: metadata role / intended_compute_units missing")
    config = None
    if os.path.exists(os.path.join(path, "s2dit_config.json")):
        with open(os.path.join(path, "s2dit_config.json")) as f:
            config = json.load(f)
    return {"bundle": path, "ok": not problems, "problems": problems, "models": models, "config": config}


# ----------------------------------------------------------------------------------------------
# Streaming from the Core ML models (macOS only: prediction needs the Core ML framework)
# ----------------------------------------------------------------------------------------------
def run_bundle(bundle, prompt, chunks=4, seed=0, out=None):
    ct = _ct()
    import text as text_mod
    with open(os.path.join(bundle, "s2dit_config.json")) as f:
        cfg = json.load(f)
    cu = lambda role: getattr(ct.ComputeUnit, cfg["compute_units"][role])
    load = lambda name, fn=None: ct.models.MLModel(os.path.join(bundle, name + ".mlpackage"), compute_units=cu(name),
                                                   **({"function_name": fn} if fn else {}))
    tok = text_mod.Tokenizer.from_json(os.path.join(bundle, "vocab.json"))
    ids, mask = tok.encode([prompt])
    ids, mask = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
    tokens = load("TextEncoder").predict({"ids": ids, "mask": mask})["tokens"]
    denoise, commit = load("DiT", "denoise"), load("DiT", "commit")
    dec_first, dec = load("Decoder", "decode_first"), load("Decoder", "decode")
    state = denoise.make_state()                        # one state for the whole stream, shared by both functions
    rng, ts, t_ctx = np.random.default_rng(seed), cfg["schedule"], cfg["t_ctx"]
    n_cache = len(cfg["tensors"]["Decoder"]["cache_shapes"])
    caches, video, t0 = None, [], time.time()
    for i in range(chunks):
        x = rng.standard_normal(cfg["latent"]).astype(np.float32)
        for j, t in enumerate(ts):
            x0 = denoise.predict({"x": x, "t": np.array([t], np.float32), "text": tokens, "text_mask": mask}, state=state)["x0"]
            if j + 1 < len(ts):
                x = (1 - ts[j + 1]) * x0 + ts[j + 1] * rng.standard_normal(x0.shape).astype(np.float32)
        xc = (1 - t_ctx) * x0 + t_ctx * rng.standard_normal(x0.shape).astype(np.float32) if t_ctx > 0 else x0
        commit.predict({"x": xc, "t": np.array([t_ctx], np.float32), "text": tokens, "text_mask": mask}, state=state)
        inp = {"z": x0} if caches is None else {"z": x0, **{f"cache_{k}": caches[k] for k in range(n_cache)}}
        res = (dec_first if caches is None else dec).predict(inp)
        caches = [res[f"cache_{k}_out"] for k in range(n_cache)]
        video.append(torch.from_numpy(res["frames"][0]))
        print(f"chunk {i}: {res['frames'].shape[2]} frames, {time.time() - t0:.2f} s")
    video = torch.cat(video, dim=1).clamp(-1, 1)
    if out:
        import data
        data.save_video(out, video, cfg["fps"])
    return video


def main(argv=None):
    p = argparse.ArgumentParser(description="Build / check / run the S2DiT Core ML bundle (paper Sec. D.2).")
    p.add_argument("--run", help="train.py run directory to export (with --out)")
    p.add_argument("--out", help="bundle directory to write, e.g. runs/tiny/S2DiTResources")
    p.add_argument("--check", help="bundle directory to validate offline")
    p.add_argument("--json", action="store_true", help="with --check: print the report as one JSON line (last line)")
    p.add_argument("--run-bundle", help="bundle directory to stream from with Core ML (macOS only)")
    p.add_argument("--prompt", help="with --run-bundle: the text prompt")
    p.add_argument("--chunks", type=int, default=4, help="with --run-bundle: chunks to stream")
    p.add_argument("--video", default=None, help="with --run-bundle: write the frames to this .mp4/.gif")
    a = p.parse_args(argv)
    if a.check:
        res = check_bundle(a.check)
        if not a.json:
            for name, m in res["models"].items():
                print(f"{name:13s} {m['size_bytes']:>10,} B  functions {sorted(m['functions'])}  weights {m['weight_dtypes']}")
            print("OK" if res["ok"] else "PROBLEMS: " + "; ".join(res["problems"]))
        print(json.dumps(res) if a.json else "")
        return 0 if res["ok"] else 1
    if a.run_bundle:
        if sys.platform != "darwin":
            print("--run-bundle needs macOS (Core ML prediction runs only there); on Linux use "
                  "`python deploy.py --check BUNDLE` or stream.py for the PyTorch models.", file=sys.stderr)
            return 2
        if not a.prompt:
            p.error("--run-bundle needs --prompt")
        run_bundle(a.run_bundle, a.prompt, a.chunks, out=a.video)
        return 0
    if not (a.run and a.out):
        p.error("give --run RUN --out BUNDLE, --check BUNDLE, or --run-bundle BUNDLE --prompt TEXT")
    import train
    build_bundle(train.load_streaming(a.run), a.out, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
