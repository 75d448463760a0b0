"""Stride Self-Attention (SSA): softmax attention on a spatially strided, low-resolution token grid.

Paper: S2DiT's SSA "down-samples Q, K and V uniformly by a stride" so that global softmax attention
runs on s^2 times fewer tokens; the sandwich (sandwich.py, Alg. 1) keeps a whole run of SSA groups
on that low-resolution grid and returns to full resolution only at the next LCHA group.

This file holds the three pieces of that low-resolution stream:

  * `PatchMerge` (down_n): merge each s x s neighbourhood of tokens into one,  (B, T*h*w, D) -> (B, T*h/s*w/s, D)
  * `PixelShuffleUp` (up_n): one token back to s x s tokens,                   (B, T*h/s*w/s, D) -> (B, T*h*w, D)
  * `StrideSelfAttention`: the stand-alone module  up(Attn(down(x)))  with the block-causal mask and
    the KV cache of dit.Attention, RoPE placed at the centres of the merged patches.

Shape legend as in dit.py. Run `python ssa.py` for a demo: SSA with stride 1 equals plain softmax
attention, and SSA streamed with its KV cache equals its full block-causal pass.
"""
import torch
import torch.nn as nn

import dist
from dit import Attention, StreamState, rope_tables


def low_res_grid(grid, stride):
    T, h, w = grid
    if h % stride or w % stride:
        raise ValueError(f"token grid {(h, w)} is not divisible by the SSA stride {stride}")
    return (T, h // stride, w // stride)


class PatchMerge(nn.Module):
    """down_n: concatenate each s x s group of tokens and project, a strided patch merge (Swin-style).

    # ASSUMPTION: initialised to the average of the s^2 tokens, so blocks inherited from the
    # all-attention DiT first see tokens with the statistics they were trained on."""

    def __init__(self, dim, stride=2):
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(stride * stride * dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim).repeat(1, stride * stride) / stride ** 2)
            self.proj.bias.zero_()

    def forward(self, x, grid):
        B, N, D = x.shape
        T, h, w = grid
        s = self.stride
        x = x.reshape(B, T, h // s, s, w // s, s, D)               # split h and w into (grid, s)
        x = x.permute(0, 1, 2, 4, 3, 5, 6)                          # (B, T, h/s, w/s, s, s, D)
        x = x.reshape(B, T * (h // s) * (w // s), s * s * D)        # (B, N/s^2, s^2 D)
        return self.proj(x)                                         # (B, N/s^2, D)


class PixelShuffleUp(nn.Module):
    """up_n: linear to s^2 D channels, then pixel shuffle back onto the high-resolution grid.

    # ASSUMPTION: initialised as nearest-neighbour copy (each sub-position gets the token itself)."""

    def __init__(self, dim, stride=2):
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(dim, stride * stride * dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim).repeat(stride * stride, 1))
            self.proj.bias.zero_()

    def forward(self, x, grid):
        B = x.shape[0]
        T, h, w = grid                                              # the HIGH-resolution grid to return to
        s, D = self.stride, x.shape[-1]
        x = self.proj(x)                                            # (B, N/s^2, s^2 D)
        x = x.reshape(B, T, h // s, w // s, s, s, D)                # (B, T, h/s, w/s, s, s, D)
        x = x.permute(0, 1, 2, 4, 3, 5, 6)                          # (B, T, h/s, s, w/s, s, D)
        return x.reshape(B, T * h * w, D)                           # (B, N, D)


class StrideSelfAttention(nn.Module):
    """SSA as one attention module: x -> down -> softmax attention on the strided grid -> up.

    The attention itself is dit.Attention (same parameter names, so it inherits the all-attention DiT's
    q/k/v/out weights); block-causal masking and the rolling KV cache come with it. With stride 1 the
    merge and the shuffle are the identity and SSA is plain softmax attention."""

    def __init__(self, dim, heads, stride=2):
        super().__init__()
        self.stride, self.head_dim = stride, dim // heads
        self.down = PatchMerge(dim, stride)
        self.attn = Attention(dim, heads)
        self.up = PixelShuffleUp(dim, stride)

    def forward(self, x, grid, rope=None, causal=True, chunk=3, window=None, state=None, sink=0, t0=None):
        # x: (B, N, D) on the high-resolution grid; `rope` is ignored: SSA builds its own tables on
        # the strided grid (positions at patch centres), time offset from the stream state.
        lo = low_res_grid(grid, self.stride)                        # (T, h/s, w/s)
        t0 = (state.frame0 if state is not None else 0) if t0 is None else t0
        rope_lo = rope_tables(lo, self.head_dim, t0=t0, stride=self.stride, device=x.device)  # (N/s^2, d/2) x 2
        x_S = self.down(x, grid)                                    # (B, N/s^2, D)
        y_S = self.attn(x_S, lo, rope_lo, causal=causal, chunk=chunk, window=window, state=state, sink=sink)  # (B, N/s^2, D)
        return self.up(y_S, grid)                                   # (B, N, D)


if __name__ == "__main__":
    dist.demo_device("ssa.py", "SSA: stride 1 is softmax attention; streamed stride 2 equals block-causal")
    torch.manual_seed(0)
    D, H, grid = 32, 2, (6, 8, 8)
    x = torch.randn(2, 6 * 8 * 8, D)
    ssa1, plain = StrideSelfAttention(D, H, stride=1), Attention(D, H)
    plain.load_state_dict(ssa1.attn.state_dict())
    rope = rope_tables(grid, D // H)
    err1 = (ssa1(x, grid) - plain(x, grid, rope)).abs().max().item()
    ssa = StrideSelfAttention(D, H, stride=2)
    full = ssa(x, grid, causal=True)
    state = StreamState(window=4)
    state.commit = True
    outs = []
    for i in range(0, 6, 3):
        outs.append(ssa(x[:, i * 64:(i + 3) * 64], (3, 8, 8), state=state))
        state.advance(3)
    err2 = (torch.cat(outs, 1) - full).abs().max().item()
    print(f"SSA stride 1 vs softmax attention: max |diff| = {err1:.2e}")
    print(f"SSA stride 2 streamed vs block-causal: max |diff| = {err2:.2e}; tokens attended: {64} -> {16} per frame")
    assert err1 < 1e-5 and err2 < 1e-5
