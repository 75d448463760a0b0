"""The three models in the traced form the phone runs (paper Sec. D.2): static shapes, explicit caches.

`ChunkStep` is the streaming forward of sandwich.S2DiT for ONE chunk of 3 latent frames, written with
Python-int shapes and fixed-size caches, reusing the model's own nn.Modules (no copy of the weights):
  * softmax K/V of the SSA blocks per window slot + a `valid` slot mask (empty slots get -1e4);
  * LCHA per-chunk states S_c = sum (R phi(k)) v^T, z_c = sum phi(k) (empty slots are zeros, so the
    window sum needs no mask) and the local conv's 2-frame tail;
  * RoPE: every chunk is encoded at the same local frames; slot s of the window is re-placed by a
    CONSTANT rotation R(-(W - s) * 3 frames) when it is read. RoPE scores depend only on position
    differences, so this equals absolute positions exactly, and no frame-offset input is needed.
    # DEVIATION: relative slots, not a frame-offset input: (offset + t) * freq in fp16 on the Neural
    # Engine loses ~0.1 rad after a minute of video; relative slots keep every angle below W * 3 frames.
`roll` is the commit as a function; `StatefulDiT` does it in place on fp16 buffers (they become Core ML
states, written by constant-index slice updates); `StatelessDiT` takes and returns the caches.
`stream_latents` is stream.py's loop through a ChunkStep (calibration and quality checks use it).
`TextExport` and `DecoderExport` are the text encoder and the decoder's chunk step in traceable form:
no Python `if` on tensor values, the decoder's temporal cache as explicit tensors.
Every linear / conv input is an activation-quantization point (`ChunkStep.aq`); quantize.py drives it.

Run `python chunk_step.py`: a random tiny S2DiT streamed through ChunkStep + roll and through
dit.StreamState, max |diff| per chunk (tests/test_deploy.py holds the same at 1e-4).
Legend: C latent channels, h x w latent grid, N tokens per chunk (hi-res), P tokens (lo-res), D width,
H heads, d head dim, W window chunks, L text tokens, nL / nS LCHA / SSA blocks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit
import flow
import sandwich
import text as text_mod
from dit import apply_rope, rope_tables, spatial_position, timestep_features
from lcha import LCHA
from sandwich import switches

CACHE_NAMES = ("lcha_S", "lcha_z", "lcha_tail", "ssa_K", "ssa_V", "valid")

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
        if pt != 1 or ph != pw:
            raise ValueError(f"deploy supports square spatial patches (1, p, p), got {cfg.patch}")
        if latent_hw % (ph * model.stride):
            raise ValueError(f"latent side {latent_hw} must be divisible by patch {ph} x SSA stride {model.stride}")
        self.C, self.T, self.hw, self.W, self.q = cfg.in_channels, cfg.chunk, latent_hw, cfg.window, ph
        self.D, self.H, self.d = cfg.dim, cfg.heads, cfg.dim // cfg.heads
        self.grid = (cfg.chunk // pt, latent_hw // ph, latent_hw // pw)               # hi-res token grid
        self.lo = (self.grid[0], self.grid[1] // model.stride, self.grid[2] // model.stride)
        self.N, self.P = math.prod(self.grid), math.prod(self.lo)
        t0 = self.W * cfg.chunk                                                       # current chunk: local frames
        for name, (cos, sin) in (("hi", rope_tables(self.grid, self.d, t0=t0, stride=1, theta=cfg.rope_theta)),
                                 ("lo", rope_tables(self.lo, self.d, t0=t0, stride=model.stride, theta=cfg.rope_theta)),
                                 ("slot", slot_rotation(self.d, self.W, cfg.chunk, cfg.rope_theta))):
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)
        # the model's fixed (y, x) token positions (dit.spatial_position), zero for a model without
        self.register_buffer("pos", spatial_position(self.grid, self.D) * float(cfg.abs_pos), persistent=False)
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
        # Alg. 1 as in sandwich.S2DiT.run_blocks, on explicit caches (that method says why it is
        # written out three times; tests/test_search.py holds them equal)
        m, C, D = self.model, self.C, self.D
        (T, h, w), s, hw = self.grid, m.stride, self.hw
        # patchify (1, q, q): (1, C, T, hw, hw) -> (1, N, q q C), the order of dit.patchify
        q = self.q
        p = x.reshape(1, C, T, h, q, w, q).permute(0, 2, 3, 5, 1, 4, 6).reshape(1, self.N, q * q * C)
        tokens = self.lin(m.patch_embed, p) + self.pos                     # (1, N, D)
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
        y = self.lin(m.head, m.norm_out(x_L) * (1 + scale) + shift)       # (1, N, q q C)
        v = y.reshape(1, T, h, w, C, 1, q, q).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(1, C, T, hw, hw)
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


@torch.no_grad()
def stream_latents(step, system, prompt, chunks, steps, seed=0, record=None):
    """stream.stream's loop (few-step denoise reading the window, commit at t_ctx, roll) through a
    ChunkStep; `record` (list) receives every call's inputs. Returns the clean chunks [(1, C, 3, h, w)]."""
    ts = flow.few_step_schedule(steps, system.shift)
    tok, _, mask = text_mod.encode_text(system.text, system.tokenizer, [prompt])
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
        t_ctx = float(system.t_ctx)
        x_c = (1 - t_ctx) * x0 + t_ctx * torch.randn(x0.shape, generator=g) if t_ctx > 0 else x0
        args = (x_c, torch.tensor([t_ctx]), tok, mask)
        if record is not None:
            record.append(args + caches)
        _, new = step(*args, *caches)
        caches = roll(caches, new)
        outs.append(x0)
    return outs


# ----------------------------------------------------------------------------------------------
# The text encoder and the decoder in traceable form
# ----------------------------------------------------------------------------------------------
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


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = dit.get_config("tiny")
    m = sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT["tiny"]).eval()
    with torch.no_grad():
        for p in m.parameters():              # random weights, perturbed off the zero-init gates and head
            p.add_(torch.randn_like(p) * 0.05)
    step = ChunkStep(m, 8).eval()
    txt, mask = torch.randn(1, 16, cfg.text_dim), torch.arange(16)[None] < 5       # (1, L, Dt), (1, L)
    state, caches = dit.StreamState(cfg.window), step.empty_caches()
    print("caches: " + ", ".join(f"{k} {tuple(v)}" for k, v in step.cache_shapes().items()))
    with torch.no_grad():
        for i in range(4):                    # 4 chunks: the window of 2 fills, then rolls twice
            x, t = torch.randn(1, cfg.in_channels, 3, 8, 8), 0.7
            v = m(x, torch.full((1, 3), t), txt, mask, state=state)                # reference: dit.StreamState
            x0, new = step(x, torch.tensor([t]), txt, mask.int(), *caches)         # static shapes
            print(f"chunk {i}: max |ChunkStep x0 - (x - t v)| = {(x0 - (x - t * v)).abs().max():.2e}")
            state.commit = True                                                    # commit this chunk
            m(x, torch.full((1, 3), t), txt, mask, state=state)
            state.commit = False
            state.advance(3)
            caches = roll(caches, new)
