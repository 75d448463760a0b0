"""The DiT backbone and the all-self-attention DiT (paper Sec. B; T_theta of Eq. 10; Tab. 1 baseline).

Everything the S2DiT sandwich shares with a plain video DiT lives here:

  * patchify / unpatchify with a (1, 2, 2) patch           latent (B,C,T,h,w) <-> tokens (B,N,D)
  * RoPE-3D from real sin/cos tables (no complex numbers: Core ML cannot take them)
  * LayerNorm with affine everywhere (Sec. B: LayerNorm, not RMSNorm), also as QK-norm
  * AdaLN-Zero modulation from a timestep *per latent frame* (so the chunks of one sequence can sit
    at different noise levels, which streaming needs), text cross-attention, FFN
  * softmax self-attention with a block-causal mask and a rolling KV cache of W chunks (+ sinks)
  * `DiT`: the all-self-attention DiT, and `MoETeacher`: two experts split at a boundary t, the
    stand-in for Wan2.2's high-noise / low-noise mixture of experts.

Shape legend: B batch, C latent channels, T latent frames, h x w latent grid, N tokens, D width,
H heads, d head dim, L text tokens. Tokens are ordered time-major: n = (t * h' + y) * w' + x.

Streaming protocol (used by lcha.py, ssa.py, sandwich.py, stream.py): a model called with a
`StreamState` receives ONE chunk; every attention module keeps its own memory in
`state.caches[module]`. With `state.commit = False` (a denoising step) the memory is only read;
with `state.commit = True` (re-encoding the clean chunk) the chunk is appended and the window rolls.

Run `python dit.py` for a demo: the KV-cached stream equals the full block-causal pass.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist
import safeio


@dataclass
class DiTConfig:
    in_channels: int = 8          # C: latent channels of our VAE (Wan2.1 VAE: 16)
    patch: tuple = (1, 2, 2)      # (pt, ph, pw) patch size, as Wan
    dim: int = 128                # D: width (paper student ~ 1.8B params; see sandwich.py `paper`)
    depth: int = 8                # blocks (the sandwich groups them in pairs: M = depth / 2)
    heads: int = 4                # H
    text_dim: int = 64            # width of the text encoder's token embeddings
    mlp_ratio: float = 4.0        # FFN hidden = mlp_ratio * D
    freq_dim: int = 64            # sinusoidal timestep features
    chunk: int = 3                # latent frames per chunk (paper: 3)
    window: int = 2               # KV window in chunks (paper: 2)
    sink: int = 0                 # sink chunks kept forever in the KV cache (0 = none; ASSUMPTION: whole chunks)
    rope_theta: float = 10000.0   # RoPE base
    abs_pos: bool = False         # add a fixed 2D sin-cos position of each token in the frame (below)


PRESETS = {
    "tiny": DiTConfig(in_channels=4, dim=32, depth=8, heads=2, text_dim=32, freq_dim=32),
    "small": DiTConfig(in_channels=8, dim=128, depth=8, heads=4, text_dim=64, freq_dim=64),
}


def get_config(name: str, **overrides) -> DiTConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "DiT", **overrides)


# ----------------------------------------------------------------------------------------------
# Patchify: (B, C, T, h, w) <-> (B, N, C*pt*ph*pw). One reshape order, used both ways.
# ----------------------------------------------------------------------------------------------
def patchify(z, patch=(1, 2, 2)):
    B, C, T, h, w = z.shape
    pt, ph, pw = patch
    if T % pt or h % ph or w % pw:
        raise ValueError(f"latent grid {(T, h, w)} is not divisible by the patch {patch}")
    z = z.reshape(B, C, T // pt, pt, h // ph, ph, w // pw, pw)      # split each axis into (grid, patch)
    z = z.permute(0, 2, 4, 6, 1, 3, 5, 7)                          # (B, T', h', w', C, pt, ph, pw)
    return z.reshape(B, (T // pt) * (h // ph) * (w // pw), C * pt * ph * pw)  # (B, N, C*pt*ph*pw)


def unpatchify(tokens, grid, channels, patch=(1, 2, 2)):
    B = tokens.shape[0]
    T, h, w = grid                                                  # token grid (T', h', w')
    pt, ph, pw = patch
    z = tokens.reshape(B, T, h, w, channels, pt, ph, pw)            # exact inverse of patchify's last reshape
    z = z.permute(0, 4, 1, 5, 2, 6, 3, 7)                           # (B, C, T', pt, h', ph, w', pw)
    return z.reshape(B, channels, T * pt, h * ph, w * pw)           # (B, C, T, h, w)


# ----------------------------------------------------------------------------------------------
# RoPE-3D with real tables. The head dimension d is split across (t, h, w) as in Wan:
# d_t = d - 4 (d // 6), d_h = d_w = 2 (d // 6). Rotation pairs are (i, i + d/2) ("rotate half").
# ----------------------------------------------------------------------------------------------
def rope_tables(grid, head_dim, t0=0, stride=1, theta=10000.0, device=None):
    """cos, sin of shape (N, head_dim // 2) for a token grid (T, h, w) starting at latent frame t0.

    `stride` > 1 places a strided (low-resolution) grid at the centres of the high-resolution
    patches it merges, so SSA tokens and LCHA tokens share one coordinate system.
    """
    T, h, w = grid
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw
    angles = []
    for n_axis, d_axis, offset, step in ((T, d_t, t0, 1.0), (h, d_hw, (stride - 1) / 2, stride),
                                         (w, d_hw, (stride - 1) / 2, stride)):
        freqs = theta ** (-torch.arange(0, d_axis, 2, dtype=torch.float64, device=device) / d_axis)
        pos = offset + step * torch.arange(n_axis, dtype=torch.float64, device=device)
        angles.append(pos[:, None] * freqs[None, :])                # (n_axis, d_axis/2)
    a_t, a_h, a_w = angles
    ang = torch.cat([a_t[:, None, None, :].expand(T, h, w, -1),     # time-major token order
                     a_h[None, :, None, :].expand(T, h, w, -1),
                     a_w[None, None, :, :].expand(T, h, w, -1)], dim=-1)
    ang = ang.reshape(T * h * w, head_dim // 2)                     # (N, d/2)
    return ang.cos().float(), ang.sin().float()


def spatial_position(grid, dim, device=None):
    """Fixed 2D sin-cos embedding of each token's (y, x) place in the frame, the same in every
    frame: (T' * h' * w', dim), time-major like the tokens. Half the channels encode y, half x.

    An option, off by default: RESULTS.md ('Prompt following') found that it leaves direction at
    chance, so the reasoning below is a hypothesis the curves did not bear out. Why it was tried:
    RoPE alone makes attention see only *relative* positions, so a DiT of attention blocks cannot
    tell the left of a frame from its right. In the toy world an object that "moves right" starts at
    the left edge; with RoPE alone the model put objects anywhere and moved them in a random
    direction. Wan relies on RoPE at 720p; at 16 x 16 latent pixels the absolute place seemed the
    cheapest handle on a motion word. Spatial only, so a stream of any length sees the same
    embedding in every chunk."""
    T, h, w = grid
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64, device=device) / q)  # (q,)
    ang_y = torch.arange(h, dtype=torch.float64, device=device)[:, None] * omega        # (h', q)
    ang_x = torch.arange(w, dtype=torch.float64, device=device)[:, None] * omega        # (w', q)
    ey = torch.cat([ang_y.sin(), ang_y.cos()], -1)[:, None].expand(h, w, 2 * q)        # (h', w', dim/2)
    ex = torch.cat([ang_x.sin(), ang_x.cos()], -1)[None].expand(h, w, 2 * q)           # (h', w', dim/2)
    e = torch.cat([ey, ex], -1).reshape(h * w, 4 * q)                                  # (h'w', dim)
    e = F.pad(e, (0, dim - 4 * q))                                                     # dim % 4 != 0
    return e.repeat(T, 1).float()                                                      # (N, dim)


def apply_rope(x, cos, sin):
    """Rotate (B, H, N, d) by angles (N, d/2): pairs (x1, x2) -> (x1 c - x2 s, x1 s + x2 c)."""
    x1, x2 = x.chunk(2, dim=-1)                                     # (B, H, N, d/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------------------------
# Masks and caches for streaming
# ----------------------------------------------------------------------------------------------
def block_causal_mask(T, tokens_per_frame, chunk, window=None, sink=0, device=None):
    """(N, N) bool, True = may attend. Query chunk i sees key chunk j iff i - window <= j <= i
    (or j < sink). Built explicitly: `is_causal=True` with fewer queries than keys would align
    the mask to the top-left and hide the newest keys (docs/design.md, pitfalls)."""
    c = torch.arange(T, device=device).repeat_interleave(tokens_per_frame) // chunk  # (N,) chunk id
    q, k = c[:, None], c[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & ((k >= q - window) | (k < sink))
    return allowed


class StreamState:
    """What a model remembers between chunks: per-module caches, the frame offset, the commit flag."""

    def __init__(self, window, sink=0):
        self.window = window          # chunks kept (paper: 2)
        self.sink = sink              # leading chunks never evicted
        self.frame0 = 0               # latent-frame index of the chunk being processed (RoPE)
        self.commit = False           # True while re-encoding the clean chunk into the caches
        self.caches = {}              # module -> its cache object
        self.text_kv = {}             # cross-attention module -> (K, V) of the prompt, computed once

    def cache(self, module, make):
        if module not in self.caches:
            self.caches[module] = make()
        return self.caches[module]

    def advance(self, frames):
        self.frame0 += frames


class ChunkWindow:
    """A rolling list of per-chunk tensors: the last `window` chunks plus `sink` leading ones.
    Shared by the KV cache (softmax attention) and the LCHA recurrent state."""

    def __init__(self, window, sink=0):
        self.window, self.sink = window, sink
        self.sinks, self.recent = [], []

    def append(self, item):
        if len(self.sinks) < self.sink:
            self.sinks.append(item)
            return
        self.recent.append(item)
        if len(self.recent) > self.window:
            self.recent.pop(0)                                      # roll: constant memory

    def items(self):
        return self.sinks + self.recent


def softmax_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + log mask) v.  q (B,H,Nq,d), k/v (B,H,Nk,d), mask (Nq,Nk) bool, True = may attend.

    Written out it is `(q @ k.T / sqrt(d)).masked_fill(~mask, -inf).softmax(-1) @ v`; we call torch's
    fused kernel for the same formula (a small DiT training step ran about 2x faster here), tested
    equal to the written-out form in tests/test_backbone.py.
    Core ML converts it to its own scaled_dot_product_attention op (iOS 18)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # (B, H, Nq, d)


class Attention(nn.Module):
    """Softmax self-attention with QK LayerNorm, RoPE-3D, block-causal mask and a rolling KV cache."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim)                   # QK-norm: LayerNorm with affine (Sec. B)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def heads_qkv(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B,H,N,d)
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # (B, H, N, d) each

    def forward(self, x, grid, rope, causal=True, chunk=3, window=None, state=None, sink=0):
        B, N, D = x.shape                                           # x: (B, N, D), N = T*h*w of `grid`
        q, k, v = self.heads_qkv(x, rope)                           # (B, H, N, d)
        if state is None:
            T, h, w = grid
            mask = block_causal_mask(T, h * w, chunk, window, sink, device=x.device) if causal else None
            y = softmax_attention(q, k, v, mask)                    # (B, H, N, d)
        else:
            # Streaming: x is one chunk; it sees itself and the cached window (all past chunks are
            # allowed by the block-causal mask, so no mask is needed inside this call).
            cache = state.cache(self, lambda: ChunkWindow(state.window, state.sink))
            past = cache.items()
            k_all = torch.cat([kv[0] for kv in past] + [k], dim=2)  # (B, H, N_past + N, d)
            v_all = torch.cat([kv[1] for kv in past] + [v], dim=2)
            y = softmax_attention(q, k_all, v_all)                  # (B, H, N, d)
            if state.commit:
                cache.append((k.detach(), v.detach()))
        return self.proj(y.transpose(1, 2).reshape(B, N, D))        # (B, N, D)


class CrossAttention(nn.Module):
    """Text cross-attention; in streaming the prompt's K/V are computed once and kept in the state."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text):
        B, L, D = text.shape
        k, v = self.kv(text).reshape(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B,H,L,d)
        return self.k_norm(k), v

    def forward(self, x, text, text_mask, state=None):
        B, N, D = x.shape
        if state is not None:
            if self not in state.text_kv:
                state.text_kv[self] = self.text_kv(text)
            k, v = state.text_kv[self]
        else:
            k, v = self.text_kv(text)                               # (B, H, L, d)
        q = self.q_norm(self.q(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2))  # (B,H,N,d)
        mask = text_mask[:, None, None, :]                          # (B, 1, 1, L)
        y = softmax_attention(q, k, v, mask)                        # (B, H, N, d)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))        # (B, N, D)


class FFN(nn.Module):
    def __init__(self, dim, ratio=4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x, grid=None, state=None):                    # grid/state: used by conv FFNs only
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))    # (B, N, D)


@dataclass
class Geometry:
    """Where a block's tokens sit and what each may attend to: everything a Block needs besides the
    tokens and their conditions. One object instead of seven loose arguments; the sandwich makes one
    per resolution (`at`), the same masking and cache on the high-resolution and the strided grid."""
    grid: tuple                   # token grid (T', h', w')
    rope: tuple                   # (cos, sin) RoPE tables of the grid's N tokens, (N, d/2) each
    causal: bool = True           # block-causal over chunks (False: bidirectional)
    chunk: int = 3                # latent frames per chunk
    window: int | None = None     # chunks of the past each chunk sees (None: all)
    sink: int = 0                 # leading chunks every chunk sees
    state: "StreamState | None" = None  # streaming: x is one chunk, the caches live here

    def at(self, grid, rope):
        """The same masking and stream on another grid (the strided grid of SSA)."""
        return replace(self, grid=grid, rope=rope)


class Block(nn.Module):
    """One DiT block around any self-attention module (softmax, LCHA, SSA's low-res softmax):

    x += g1 * Attn(LN(x)(1 + s1) + b1);  x += CrossAttn(LN(x), text);  x += g2 * FFN(LN(x)(1 + s2) + b2)
    with (b1, s1, g1, b2, s2, g2) = AdaLN(c_frame), zero-initialised so a fresh block is the identity.
    """

    def __init__(self, dim, heads, attn: nn.Module, ffn: nn.Module = None, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn if ffn is not None else FFN(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)                             # AdaLN-Zero (DiT): gates start at 0
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, text, text_mask, geo: Geometry):
        T, h, w = geo.grid                                          # x: (B, N, D), c: (B, T, D)
        mod = self.ada(F.silu(c)).repeat_interleave(h * w, dim=1)  # (B, N, 6D): one modulation per frame
        b1, s1, g1, b2, s2, g2 = mod.chunk(6, dim=-1)               # (B, N, D) each
        a = self.attn(self.norm1(x) * (1 + s1) + b1, geo.grid, geo.rope, causal=geo.causal, chunk=geo.chunk,
                      window=geo.window, state=geo.state, sink=geo.sink)  # (B, N, D)
        x = x + g1 * a
        x = x + self.cross(self.norm_cross(x), text, text_mask, geo.state)  # (B, N, D)
        f = self.ffn(self.norm2(x) * (1 + s2) + b2, geo.grid, geo.state)   # (B, N, D)
        return x + g2 * f


def timestep_features(t, dim):
    """Sinusoidal features of 1000 t, as DiT/Wan. t: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = 1000.0 * t.float()[..., None] * freqs                      # (..., dim/2)
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class Backbone(nn.Module):
    """Input and output ends shared by every DiT here: patch embedding, text and timestep conditioning,
    the final AdaLN + linear head. Subclasses implement `run_blocks` (the part that differs)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, pdim = cfg.dim, cfg.in_channels * math.prod(cfg.patch)
        self.patch_embed = nn.Linear(pdim, D)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_mlp = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        # ASSUMPTION: the pooled prompt joins the timestep in the AdaLN condition (as SD3's pooled CLIP
        # vector); the paper names only cross-attention. It helps a narrow toy model find the colour.
        self.text_pool = nn.Linear(D, D)
        self.norm_out = nn.LayerNorm(D)
        self.ada_out = nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, pdim)
        for m in (self.ada_out, self.head):                         # zero-init output: v = 0 at start (DiT)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def check_input(self, x, t, text, text_mask, state):
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected latent (B, {cfg.in_channels}, T, h, w), got {tuple(x.shape)}")
        B, C, T = x.shape[:3]
        if t.shape != (B, T):
            raise ValueError(f"expected one timestep per latent frame, t of shape {(B, T)}, got {tuple(t.shape)}")
        if text.dim() != 3 or text.shape[0] != B or text.shape[2] != cfg.text_dim or text_mask.shape != text.shape[:2]:
            raise ValueError(f"expected text (B, L, {cfg.text_dim}) and mask (B, L), got "
                             f"{tuple(text.shape)} and {tuple(text_mask.shape)}")
        if state is not None and T != cfg.chunk:
            raise ValueError(f"streaming takes one chunk of {cfg.chunk} latent frames, got T={T}")

    def forward(self, x, t, text, text_mask, causal=True, state=None, window=None):
        """x (B,C,T,h,w) noisy latents, t (B,T) flow time per frame, text (B,L,Dt), text_mask (B,L).
        Returns the velocity v = eps - x0, (B,C,T,h,w). With `state`, x is one chunk of a stream."""
        self.check_input(x, t, text, text_mask, state)
        cfg = self.cfg
        B, C, T, h, w = x.shape
        pt, ph, pw = cfg.patch
        grid = (T // pt, h // ph, w // pw)                          # token grid (T', h', w')
        tokens = self.patch_embed(patchify(x, cfg.patch))          # (B, N, D)
        if cfg.abs_pos:
            tokens = tokens + spatial_position(grid, cfg.dim, x.device)
        txt = self.text_proj(text)                                  # (B, L, D)
        m = text_mask.float()[..., None]                            # (B, L, 1)
        pooled = (txt * m).sum(1) / m.sum(1).clamp(min=1)           # (B, D)
        c = self.time_mlp(timestep_features(t[:, ::pt], cfg.freq_dim)) + self.text_pool(pooled)[:, None]  # (B, T', D)
        t0 = state.frame0 if state is not None else 0
        window = cfg.window if window is None else window
        y = self.run_blocks(tokens, c, grid, txt, text_mask, causal, t0, window, state)  # (B, N, D)
        shift, scale = self.ada_out(F.silu(c)).repeat_interleave(grid[1] * grid[2], dim=1).chunk(2, dim=-1)
        y = self.head(self.norm_out(y) * (1 + scale) + shift)       # (B, N, C*pt*ph*pw)
        return unpatchify(y, grid, C, cfg.patch)                    # (B, C, T, h, w)



class DiT(Backbone):
    """The all-self-attention DiT: T_theta of Eq. 10 and the baseline row of Tab. 1."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads, Attention(cfg.dim, cfg.heads), mlp_ratio=cfg.mlp_ratio)
                                     for _ in range(cfg.depth)])

    def run_blocks(self, tokens, c, grid, txt, text_mask, causal, t0, window, state):
        rope = rope_tables(grid, self.cfg.dim // self.cfg.heads, t0=t0, theta=self.cfg.rope_theta, device=tokens.device)
        geo = Geometry(grid, rope, causal, self.cfg.chunk, window, self.cfg.sink, state)
        for blk in self.blocks:
            tokens = blk(tokens, c, txt, text_mask, geo)
        return tokens


class MoETeacher(nn.Module):
    """Two-expert teacher (stand-in for Wan2.2's MoE): the high-noise expert handles t >= boundary, the
    low-noise expert t < boundary. ASSUMPTION: routing is per latent frame (chunks of one sequence may sit
    at different noise levels); an expert runs only on the samples that have a frame for it."""

    def __init__(self, cfg: DiTConfig, boundary=0.5):
        super().__init__()
        self.cfg, self.boundary = cfg, boundary
        self.high = DiT(cfg)                                        # expert for t >= boundary (layout, motion)
        self.low = DiT(cfg)                                         # expert for t < boundary (detail)

    def grow_from(self, base: DiT):
        """Start both experts from T_theta, each deepened to cfg.depth blocks.

        ASSUMPTION (toy scale): the paper's teacher is a pretrained Wan2.2-A14B; ours must be trained
        here, and a larger DiT trained from scratch in the CPU budget ends up *worse* than the
        student that inherited T_theta, which would turn KD upside down. So each expert is T_theta
        grown in depth: T_theta's blocks in their order, with fresh blocks spread between them that
        start as the identity (AdaLN-Zero gates are zero at init; we also zero the fresh blocks'
        cross-attention output). The grown expert computes exactly T_theta's function, then the
        `teacher` stage specialises each expert on its half of the noise levels.
        Returns {"inherited": block indices from T_theta, "fresh": new block indices} per expert."""
        if base.cfg.dim != self.cfg.dim or base.cfg.depth > self.cfg.depth:
            raise ValueError(f"can grow a teacher of width {self.cfg.dim} and depth >= {base.cfg.depth} "
                             f"from T_theta (width {base.cfg.dim}); got depth {self.cfg.depth}")
        n_old, n_new = base.cfg.depth, self.cfg.depth
        keep = [round(i * (n_new - 1) / max(n_old - 1, 1)) for i in range(n_old)]  # old block i -> slot keep[i]
        fresh = [j for j in range(n_new) if j not in keep]
        with torch.no_grad():
            for expert in (self.high, self.low):
                own = expert.state_dict()
                for name, tensor in base.state_dict().items():
                    if name.startswith("blocks."):
                        i, rest = name.split(".", 2)[1:]
                        name = f"blocks.{keep[int(i)]}.{rest}"
                    own[name].copy_(tensor)
                expert.load_state_dict(own)
                for j in fresh:
                    nn.init.zeros_(expert.blocks[j].cross.proj.weight)  # fresh block = identity
                    nn.init.zeros_(expert.blocks[j].cross.proj.bias)
        return {"inherited": keep, "fresh": fresh}

    def forward(self, x, t, text, text_mask, causal=True, state=None, window=None):
        if state is not None:
            raise ValueError("the teacher is evaluated on whole sequences, not streamed")
        use_high = t >= self.boundary                               # (B, T) which expert owns each frame
        v = torch.zeros_like(x)
        for expert, sel in ((self.high, use_high), (self.low, ~use_high)):
            rows = sel.any(dim=1).nonzero().flatten()               # samples with a frame for this expert
            if len(rows):                                           # run it on those samples only
                ve = expert(x[rows], t[rows], text[rows], text_mask[rows], causal=causal, window=window)
                v[rows] += ve * sel[rows][:, None, :, None, None].to(ve.dtype)  # keep its frames only
        return v


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    dist.demo_device("dit.py", "The DiT backbone: streamed chunk by chunk equals the block-causal forward")
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = DiT(cfg).eval()
    for p in model.parameters():                                    # non-zero output for the demo
        nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    B, T, h, w, L = 1, 9, 8, 8, 5
    x, t = torch.randn(B, cfg.in_channels, T, h, w), torch.rand(B, T)
    text, mask = torch.randn(B, L, cfg.text_dim), torch.ones(B, L, dtype=torch.bool)
    with torch.no_grad():
        full = model(x, t, text, mask, causal=True, window=10)
        state, outs = StreamState(window=10), []
        state.commit = True
        for i in range(0, T, cfg.chunk):
            outs.append(model(x[:, :, i:i + 3], t[:, i:i + 3], text, mask, state=state))
            state.advance(cfg.chunk)
    err = (torch.cat(outs, 2) - full).abs().max().item()
    print(f"DiT tiny: {count_params(model):,} params; streamed vs full block-causal max |diff| = {err:.2e}")
    assert err < 1e-4
