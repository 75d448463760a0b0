"""LinConv Hybrid Attention (LCHA): paper Eq. 11, Fig. A1, Tab. 3 and Tab. A5.

LCHA replaces softmax self-attention at the high (VAE-latent) resolution of the S2DiT sandwich. It
fuses two paths, both O(N) in the token count:

  * linear path (global): kernel linear attention with a learned per-head feature map phi and
    RoPE-3D in the numerator only (Eq. 11);
  * local path: a depthwise 3x3x3 conv on V laid out on the token grid (causal in time), then a
    linear channel mix;
  * a per-channel FusionGate alpha = sigmoid(g):  y = proj(alpha * y_linear + (1 - alpha) * y_local).

One module, three forms with the same weights and the same results (tests/test_lcha.py):
  1. bidirectional parallel (causal=False): one global state S = sum_j (R_j phi(k_j)) v_j^T;
  2. block-causal parallel (causal=True): per-chunk states S_c, summed over the visible chunks of
     dit.block_causal_mask (window, sink) -- the N x N matrix is never built;
  3. recurrent streaming (state = dit.StreamState, x = one chunk): a dit.ChunkWindow of per-chunk
     (S_c, z_c) plus the conv's last 2 input frames; constant memory per chunk.

Weight inheritance from dit.Attention (the all-attention DiT T_theta): `qkv`, `q_norm`, `k_norm`,
`proj` keep their names and shapes and load as they are. Fresh tensors: `phi.weight` (H, d, d) and
`phi.bias` (H, d) (identity init, so phi(x) = softplus(x) at the start), `conv` (depthwise 3D),
`mix` (Linear D -> D) and `gate` (D,) (zero init, alpha = 0.5).

Comparison variants: LCHA(use_linear=False) "local only" and LCHA(use_local=False) "linear only"
(Tab. 3); SanaAttention (ReLU kernel, no phi linear, no local path) + MixFFN for SANA-Video (Tab. A5).

Shape legend: B batch, T latent frames (token grid (T, h, w)), N = T*h*w tokens (time-major), D width,
H heads, d = D/H head dim, nc chunks, P tokens per chunk.
Run `python lcha.py` for a demo: parallel vs naive O(N^2) vs recurrent, and a timing at N = 4096.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist
import safeio
from dit import Attention, FFN, ChunkWindow, StreamState, apply_rope, block_causal_mask, rope_tables


@dataclass
class LCHAConfig:
    dim: int = 128              # D (the paper's high-resolution stream width)
    heads: int = 4              # H
    kernel: str = "softplus"    # phi: "softplus" = softplus(Linear_h(.)); "relu" = ReLU (SANA)  # ASSUMPTION
    use_linear: bool = True     # linear (global) path; False = "local only" row of Tab. 3
    use_local: bool = True      # local conv path; False = "linear only" row of Tab. 3
    eps: float = 1e-6           # eps in the denominator of Eq. 11  # ASSUMPTION


PRESETS = {"tiny": LCHAConfig(dim=32, heads=2), "small": LCHAConfig(dim=96, heads=4)}


def get_config(name: str, **overrides) -> LCHAConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "LCHA", **overrides)


class HeadLinear(nn.Module):
    """A separate d x d linear per head (the Linear_h inside phi), applied with one einsum."""

    def __init__(self, heads, head_dim):
        super().__init__()
        # ASSUMPTION: identity init, so a freshly inherited LCHA starts from phi(x) = softplus(x).
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))   # (H, d_out, d_in)
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))               # (H, d)

    def forward(self, x):                                                     # x: (B, H, N, d)
        return torch.einsum("bhnd,hed->bhne", x, self.weight) + self.bias[:, None]  # (B, H, N, d)


class LCHACache:
    """What one LCHA module remembers in a stream: per-chunk (S_c, z_c) and the conv's input tail."""

    def __init__(self, window, sink):
        self.states = ChunkWindow(window, sink)   # items (S_c (B,H,1,d,d), z_c (B,H,1,d)), detached
        self.tail = None                          # (B, D, 2, h, w): last 2 frames of the conv input V


class LCHA(nn.Module):
    def __init__(self, dim, heads, kernel="softplus", use_linear=True, use_local=True, eps=1e-6):
        super().__init__()
        if kernel not in ("softplus", "relu"):
            raise ValueError(f"unknown kernel {kernel!r}; expected 'softplus' or 'relu'")
        if not (use_linear or use_local):
            raise ValueError("LCHA needs at least one of use_linear / use_local")
        self.heads, self.head_dim, self.eps = heads, dim // heads, eps
        self.use_linear, self.use_local, self.sink = use_linear, use_local, 0  # sink: default for parallel calls
        # Inherited from dit.Attention (same names, same shapes).
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        # Fresh tensors.
        self.phi = HeadLinear(heads, self.head_dim) if (use_linear and kernel == "softplus") else None
        if use_local:
            # Depthwise 3x3x3; padding is done by hand (2 past frames, 1 each side spatially) so the
            # parallel form and the streaming tail share one definition of "causal in time".
            self.conv = nn.Conv3d(dim, dim, kernel_size=3, groups=dim)
            self.mix = nn.Linear(dim, dim)
        if use_linear and use_local:
            self.gate = nn.Parameter(torch.zeros(dim))   # g; alpha = sigmoid(g) = 0.5 at init

    def kernel(self, x):                                  # phi, per head: (B, H, N, d) -> (B, H, N, d)
        return F.softplus(self.phi(x)) if self.phi is not None else F.relu(x)

    def chunk_states(self, rk, phi_k, v):                 # each (B, H, nc, P, d)
        S_c = torch.einsum("bhcpd,bhcpe->bhcde", rk, v)   # (B, H, nc, d, d): sum_j (R_j phi(k_j)) v_j^T
        z_c = phi_k.sum(3)                                # (B, H, nc, d):    sum_j phi(k_j) (un-rotated)
        return S_c, z_c

    def read_out(self, rq, phi_q, S, z):                  # rq, phi_q (B,H,nc,P,d); S (B,H,nc,d,d); z (B,H,nc,d)
        # Eq. 11: y_i = [R_i phi(q_i)]^T S_i / (phi(q_i)^T z_i + eps)
        num = torch.einsum("bhcpd,bhcde->bhcpe", rq, S)  # (B, H, nc, P, d)
        den = torch.einsum("bhcpd,bhcd->bhcp", phi_q, z)  # (B, H, nc, P)
        return num / (den[..., None] + self.eps)          # (B, H, nc, P, d)

    def local_path(self, v, grid, tail):
        B, N, D = v.shape                                 # v: (B, N, D), heads merged
        T, h, w = grid
        vg = v.transpose(1, 2).reshape(B, D, T, h, w)     # (B, D, T, h, w) on the token grid
        if tail is None:                                  # first chunk / parallel form: zero past frames
            tail = vg.new_zeros(B, D, 2, h, w)
        vt = torch.cat([tail, vg], dim=2)                 # (B, D, T + 2, h, w): causal in time
        y = self.conv(F.pad(vt, (1, 1, 1, 1)))            # (B, D, T, h, w): 'same' in space
        y = y.flatten(2).transpose(1, 2)                  # (B, N, D), time-major
        return self.mix(y), vt[:, :, -2:]                 # (B, N, D), new tail (B, D, 2, h, w)

    def forward(self, x, grid, rope, causal=True, chunk=3, window=None, state=None, sink=None):
        B, N, D = x.shape                                 # x: (B, N, D) tokens of grid (T, h, w)
        T, h, w = grid
        H, d = self.heads, self.head_dim
        cos, sin = rope                                   # (N, d/2) each, time offset by the caller
        if D != H * d or N != T * h * w or cos.shape != (N, d // 2):
            raise ValueError(f"expected x (B, {T * h * w}, {H * d}) and rope (N, {d // 2}) for grid {grid}, "
                             f"got x {tuple(x.shape)} and rope {tuple(cos.shape)}")
        sink = self.sink if sink is None else sink
        cache = None if state is None else state.cache(self, lambda: LCHACache(state.window, state.sink))
        qkv = self.qkv(x).reshape(B, N, 3, H, d)          # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)              # (B, H, N, d) each
        v_tok = qkv[:, :, 2].reshape(B, N, D)             # (B, N, D): V for the local path
        ys = []
        if self.use_linear:
            phi_q = self.kernel(self.q_norm(q))           # (B, H, N, d): QK LayerNorm, then phi
            phi_k = self.kernel(self.k_norm(k))           # (B, H, N, d)
            rq, rk = apply_rope(phi_q, cos, sin), apply_rope(phi_k, cos, sin)  # (B, H, N, d): numerator only
            if state is None:
                # Parallel forms. Bidirectional = one chunk holding every frame; block-causal = chunks of
                # `chunk` frames, the last one zero-padded (zero phi(k), v add nothing to S_c, z_c).
                chunk = chunk if causal else T
                nc, P = -(-T // chunk), chunk * h * w     # chunks, tokens per chunk
                split = lambda t: F.pad(t, (0, 0, 0, nc * P - N)).unflatten(2, (nc, P))  # (B, H, nc, P, d)
                rq, rk, phi_q, phi_k, v = map(split, (rq, rk, phi_q, phi_k, v))
                S_c, z_c = self.chunk_states(rk, phi_k, v)  # (B,H,nc,d,d), (B,H,nc,d)
                # Chunk i sees chunk j iff dit.block_causal_mask says so (window, sink), at chunk level:
                # an (nc, nc) matrix, O(nc^2 d^2) -- never the (N, N) one.
                vis = block_causal_mask(nc, 1, 1, window, sink, device=x.device) if causal else \
                    torch.ones(1, 1, dtype=torch.bool, device=x.device)
                S = torch.einsum("ij,bhjde->bhide", vis.to(S_c.dtype), S_c)  # (B, H, nc, d, d): S_i
                z = torch.einsum("ij,bhjd->bhid", vis.to(z_c.dtype), z_c)    # (B, H, nc, d):    z_i
                y = self.read_out(rq, phi_q, S, z).flatten(2, 3)[:, :, :N]   # (B, H, N, d)
            else:
                # Recurrent form: x is one chunk; it sees the window's states plus its own chunk's.
                one = lambda t: t[:, :, None]             # (B, H, 1, N, d): the chunk is one block
                S_c, z_c = self.chunk_states(one(rk), one(phi_k), one(v))  # (B,H,1,d,d), (B,H,1,d)
                past = cache.states.items()
                S = S_c + sum(s for s, _ in past) if past else S_c         # (B, H, 1, d, d)
                z = z_c + sum(zz for _, zz in past) if past else z_c       # (B, H, 1, d)
                y = self.read_out(one(rq), one(phi_q), S, z)[:, :, 0]      # (B, H, N, d)
                if state.commit:                          # keys were rotated with absolute positions
                    cache.states.append((S_c.detach(), z_c.detach()))
            ys.append(y.transpose(1, 2).reshape(B, N, D))  # y_linear: (B, N, D)
        if self.use_local:
            y_loc, tail = self.local_path(v_tok, grid, None if cache is None else cache.tail)  # (B, N, D)
            if state is not None and state.commit:
                cache.tail = tail.detach()                # (B, D, 2, h, w)
            ys.append(y_loc)
        if len(ys) == 2:
            # FusionGate: per-channel alpha = sigmoid(g)  # ASSUMPTION: sigmoid gate, g = 0 at init
            alpha = torch.sigmoid(self.gate)              # (D,)
            y = alpha * ys[0] + (1 - alpha) * ys[1]       # (B, N, D)
        else:
            y = ys[0]                                     # (B, N, D)
        return self.proj(y)                               # (B, N, D)


class SanaAttention(LCHA):
    """SANA-Video-style linear attention (Tab. A5): ReLU kernel, no phi linear, RoPE in the numerator,
    no local path (SANA puts its locality in MixFFN instead).
    # ASSUMPTION: keeps QK LayerNorm so it inherits dit.Attention weights like LCHA does."""

    def __init__(self, dim, heads, eps=1e-6):
        super().__init__(dim, heads, kernel="relu", use_linear=True, use_local=False, eps=eps)


class MixFFN(nn.Module):
    """SANA's FFN with a depthwise conv inside: Linear expand -> depthwise 3x3 conv -> GELU -> Linear.
    # ASSUMPTION: spatial-only 3x3 conv per frame (no temporal extent, so streaming needs no state).
    # ASSUMPTION: GELU and two Linears named as dit.FFN (fc1, fc2) so FFN weights are inherited;
    # the depthwise conv `dw` is fresh, initialised to identity (a fresh MixFFN equals the FFN)."""

    def __init__(self, dim, ratio=4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        nn.init.zeros_(self.dw.weight)
        nn.init.zeros_(self.dw.bias)
        with torch.no_grad():
            self.dw.weight[:, 0, 1, 1] = 1.0              # centre tap = 1: identity
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, grid=None, state=None):          # state unused: the conv sees one frame only
        if grid is None:
            raise ValueError("MixFFN needs the token grid (T, h, w) for its spatial conv, got grid=None")
        B, N, D = x.shape                                 # x: (B, N, D)
        T, h, w = grid
        u = self.fc1(x)                                   # (B, N, Dh)
        Dh = u.shape[-1]
        u = u.reshape(B * T, h, w, Dh).permute(0, 3, 1, 2)  # (B*T, Dh, h, w): frames as a batch
        u = self.dw(u).permute(0, 2, 3, 1).reshape(B, N, Dh)  # (B, N, Dh)
        return self.fc2(F.gelu(u, approximate="tanh"))    # (B, N, D)


def make_attention(kind, dim, heads):
    """kind in {"lcha", "local", "linear", "sana", "softmax"} -> a self-attention module for dit.Block."""
    makers = {"lcha": lambda: LCHA(dim, heads), "local": lambda: LCHA(dim, heads, use_linear=False),
              "linear": lambda: LCHA(dim, heads, use_local=False), "sana": lambda: SanaAttention(dim, heads),
              "softmax": lambda: Attention(dim, heads)}
    if kind not in makers:
        raise ValueError(f"unknown attention kind {kind!r}; known: {sorted(makers)}")
    return makers[kind]()


def make_ffn(kind, dim, ratio=4.0):
    """MixFFN for "sana" (SANA-Video's block), dit.FFN for every other kind."""
    return MixFFN(dim, ratio) if kind == "sana" else FFN(dim, ratio)


def eq11_naive(m: LCHA, x, rope, mask=None):
    """The linear path of Eq. 11 the O(N^2) way, (N, N) matrices and all (for the demo). -> (B, H, N, d)"""
    B, N, D = x.shape
    q, k, v = m.qkv(x).reshape(B, N, 3, m.heads, m.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
    phi_q, phi_k = m.kernel(m.q_norm(q)), m.kernel(m.k_norm(k))                     # (B, H, N, d)
    num = apply_rope(phi_q, *rope) @ apply_rope(phi_k, *rope).transpose(-1, -2)   # (B, H, N, N)
    den = phi_q @ phi_k.transpose(-1, -2)                                           # (B, H, N, N)
    if mask is not None:
        num, den = num * mask, den * mask
    return (num @ v) / (den.sum(-1, keepdim=True) + m.eps)                         # (B, H, N, d)


if __name__ == "__main__":
    dist.demo_device("lcha.py", "LCHA: Eq. 11's three forms against each other, then one forward at 4096 tokens")
    torch.manual_seed(0)
    cfg = get_config("tiny")
    m = LCHA(cfg.dim, cfg.heads, use_local=False).double().eval()   # linear path alone vs its O(N^2) form
    T, h, w, chunk, W = 9, 4, 4, 3, 1
    x = torch.randn(1, T * h * w, cfg.dim, dtype=torch.float64)
    rope = rope_tables((T, h, w), cfg.dim // cfg.heads)
    mask = block_causal_mask(T, h * w, chunk, W)
    with torch.no_grad():
        par = m(x, (T, h, w), rope, causal=True, chunk=chunk, window=W)            # (1, N, D)
        naive = eq11_naive(m, x, rope, mask)                                       # (1, H, N, d)
        naive = m.proj(naive.transpose(1, 2).reshape(x.shape))
        state, outs = StreamState(window=W), []
        state.commit = True
        for t0 in range(0, T, chunk):
            xs = x[:, t0 * h * w:(t0 + chunk) * h * w]
            outs.append(m(xs, (chunk, h, w), rope_tables((chunk, h, w), cfg.dim // cfg.heads, t0=t0), state=state))
            state.advance(chunk)
        rec = torch.cat(outs, 1)
    print(f"Eq. 11 linear path, window {W}: max|parallel - naive| = {(par - naive).abs().max():.2e}, "
          f"max|recurrent - parallel| = {(rec - par).abs().max():.2e}")
    assert (par - naive).abs().max() < 1e-10 and (rec - par).abs().max() < 1e-10
    # One forward at N = 4096 tokens (grid 16 x 16 x 16): LCHA is O(N d^2), softmax O(N^2 d).
    D, H, grid = 64, 2, (16, 16, 16)
    x = torch.randn(1, math.prod(grid), D)
    rope = rope_tables(grid, D // H)
    for name, mod in (("LCHA", LCHA(D, H)), ("softmax", Attention(D, H))):
        with torch.no_grad():
            mod(x, grid, rope, causal=True)                                        # warm-up
            t = time.perf_counter()
            mod(x, grid, rope, causal=True)
        print(f"{name:8s} block-causal forward, N = {x.shape[1]}, D = {D}: {1e3 * (time.perf_counter() - t):.1f} ms")
