"""Tests for lcha.py: the three forms of LCHA (parallel, block-causal, recurrent) against a naive O(N^2)
evaluation of Eq. 11, the streaming cache protocol, the variants, and hosting in dit.Block."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import lcha  # noqa: E402

D, H = 16, 2
d = D // H


def _module(seed=0, **kw):
    """An LCHA in float64 with every fresh tensor moved off its init (phi != identity, gate != 0)."""
    torch.manual_seed(seed)
    m = lcha.LCHA(D, H, **kw).double()
    with torch.no_grad():
        if m.phi is not None:
            m.phi.weight.add_(0.3 * torch.randn_like(m.phi.weight))
            m.phi.bias.normal_(0, 0.3)
        if hasattr(m, "gate"):
            m.gate.normal_(0, 1.0)
        for norm in (m.q_norm, m.k_norm):
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
    return m


def _x(T, h, w, seed=1, B=2):
    return torch.randn(B, T * h * w, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _naive(m, x, grid, mask=None):
    """Eq. 11 and the local path written from the parameters, with explicit (N, N) matrices."""
    B, N, _ = x.shape
    T, h, w = grid
    cos, sin = dit.rope_tables(grid, d)
    q, k, v = m.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)            # (B, H, N, d)
    q = F.layer_norm(q, (d,), m.q_norm.weight, m.q_norm.bias)
    k = F.layer_norm(k, (d,), m.k_norm.weight, m.k_norm.bias)
    if m.phi is not None:
        pq = F.softplus(torch.einsum("hed,bhnd->bhne", m.phi.weight, q) + m.phi.bias[:, None])
        pk = F.softplus(torch.einsum("hed,bhnd->bhne", m.phi.weight, k) + m.phi.bias[:, None])
    else:
        pq, pk = q.relu(), k.relu()
    rot = lambda t: torch.cat([t[..., :d // 2] * cos - t[..., d // 2:] * sin,
                               t[..., :d // 2] * sin + t[..., d // 2:] * cos], -1)
    num = rot(pq) @ rot(pk).transpose(-1, -2)                                      # (B, H, N, N)
    den = pq @ pk.transpose(-1, -2)                                                # (B, H, N, N)
    if mask is not None:
        num, den = num * mask, den * mask
    y_lin = ((num @ v) / (den.sum(-1, keepdim=True) + m.eps)).transpose(1, 2).reshape(B, N, D)
    if not m.use_local:
        return m.proj(y_lin)
    # Causal conv, independently: symmetric time padding 2, keep the first T outputs (frame t sees t-2..t).
    vg = v.transpose(1, 2).reshape(B, N, D).transpose(1, 2).reshape(B, D, T, h, w)
    loc = F.conv3d(vg, m.conv.weight, m.conv.bias, padding=(2, 1, 1), groups=D)[:, :, :T]
    y_loc = m.mix(loc.flatten(2).transpose(1, 2))
    if not m.use_linear:
        return m.proj(y_loc)
    a = torch.sigmoid(m.gate)
    return m.proj(a * y_lin + (1 - a) * y_loc)


def _stream(m, x, grid, chunk=3, window=100, sink=0, state=None):
    """Run x chunk by chunk with a committing dit.StreamState; returns (B, N, D) and the state."""
    T, h, w = grid
    state = state or dit.StreamState(window, sink)
    state.commit = True
    outs = []
    for t0 in range(0, T, chunk):
        Tc = min(chunk, T - t0)
        rope = dit.rope_tables((Tc, h, w), d, t0=state.frame0)
        outs.append(m(x[:, t0 * h * w:(t0 + Tc) * h * w], (Tc, h, w), rope, state=state))
        state.advance(Tc)
    return torch.cat(outs, 1), state


def test_bidirectional_equals_naive():
    grid = (4, 3, 3)
    for kw in ({}, {"kernel": "relu"}, {"use_local": False}):
        m, x = _module(**kw), _x(*grid)
        with torch.no_grad():
            got = m(x, grid, dit.rope_tables(grid, d), causal=False)
            ref = _naive(m, x, grid)    # no mask: all tokens; the conv path stays causal in time
        torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("window", [None, 1])
@pytest.mark.parametrize("sink", [0, 1])
def test_block_causal_equals_naive_masked(window, sink):
    grid = (10, 2, 3)                       # 4 chunks, the last one partial (1 frame)
    m, x = _module(), _x(*grid)
    mask = dit.block_causal_mask(10, 6, 3, window, sink)
    with torch.no_grad():
        got = m(x, grid, dit.rope_tables(grid, d), causal=True, chunk=3, window=window, sink=sink)
        ref = _naive(m, x, grid, mask)
    torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-9)
    m.sink = sink                           # the module attribute is the default when sink is not passed
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid, dit.rope_tables(grid, d), chunk=3, window=window), got,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("window,sink", [(None, 0), (1, 0), (1, 1), (2, 1)])
def test_recurrent_equals_block_causal(window, sink):
    grid = (15, 2, 2)                       # 5 chunks
    m, x = _module(), _x(*grid)
    with torch.no_grad():
        par = m(x, grid, dit.rope_tables(grid, d), causal=True, chunk=3, window=window, sink=sink)
        rec, state = _stream(m, x, grid, window=100 if window is None else window, sink=sink)
    torch.testing.assert_close(rec, par, atol=1e-11, rtol=1e-9)
    cache = state.caches[m]
    n_kept = 5 if window is None else min(5, sink + window)
    assert len(cache.states.items()) == n_kept                          # constant memory with a window
    assert cache.tail.shape == (2, D, 2, 2, 2)


def test_windowed_state_equals_recomputation_over_window():
    grid, W, hw = (15, 2, 2), 2, 4
    m, x = _module(), _x(*grid)
    with torch.no_grad():
        rec, _ = _stream(m, x, grid, window=W)
        rec_all, _ = _stream(m, x, grid, window=100)
        # The last chunk (frames 12-14) sees chunks 2..4 only: recompute frames 6..14 alone, RoPE from
        # frame 6, no window. Its conv looks back to frames 10-11, also inside the recomputed span.
        again = m(x[:, 6 * hw:], (9, 2, 2), dit.rope_tables((9, 2, 2), d, t0=6), causal=True, chunk=3)
    torch.testing.assert_close(rec[:, 12 * hw:], again[:, 6 * hw:], atol=1e-11, rtol=1e-9)
    assert (rec[:, 12 * hw:] - rec_all[:, 12 * hw:]).abs().max() > 1e-6   # the window really drops state


def test_future_frames_never_change_past_outputs():
    grid = (9, 3, 3)
    m, x = _module(), _x(*grid)
    x2 = x.clone()
    x2[:, 4 * 9:] += torch.randn_like(x2[:, 4 * 9:])    # perturb from frame 4 (inside chunk 1) on
    rope = dit.rope_tables(grid, d)
    with torch.no_grad():
        for window in (None, 1):
            y, y2 = m(x, grid, rope, window=window), m(x2, grid, rope, window=window)
            assert torch.equal(y[:, :3 * 9], y2[:, :3 * 9])               # chunk 0 untouched, exactly
            assert (y[:, 3 * 9:] - y2[:, 3 * 9:]).abs().max() > 1e-3      # chunk 1 on: changed


def _snapshot(cache):
    return [t.clone() for item in cache.states.items() for t in item] + [cache.tail.clone()]


def test_read_only_passes_leave_cache_and_result_unchanged():
    grid, hw = (9, 2, 2), 4
    m, x = _module(), _x(*grid)
    P = 3 * hw
    with torch.no_grad():
        ref, _ = _stream(m, x, grid, window=1)            # commits only
        state = dit.StreamState(1)
        outs = []
        for i in range(3):
            rope = dit.rope_tables((3, 2, 2), d, t0=state.frame0)
            xc = x[:, i * P:(i + 1) * P]
            if i > 0:                                     # two denoising passes on noisy inputs first
                before = _snapshot(state.caches[m])
                state.commit = False
                for s in range(2):
                    m(xc + torch.randn_like(xc), (3, 2, 2), rope, state=state)
                after = _snapshot(state.caches[m])
                assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
            state.commit = True
            outs.append(m(xc, (3, 2, 2), rope, state=state))
            state.advance(3)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=0, rtol=0)


def test_variants_run_and_differ_and_inherit():
    grid = (6, 2, 2)
    full, x = _module(), _x(*grid)
    rope = dit.rope_tables(grid, d)
    with torch.no_grad():
        y = full(x, grid, rope)
        for kw, gone in (({"use_linear": False}, "phi.weight"), ({"use_local": False}, "conv.weight")):
            v = lcha.LCHA(D, H, **kw).double()
            v.load_state_dict(full.state_dict(), strict=False)
            assert gone not in dict(v.named_parameters())
            yv = v(x, grid, rope)
            assert yv.shape == y.shape and (yv - y).abs().max() > 1e-3
            torch.testing.assert_close(yv, _naive(v, x, grid, dit.block_causal_mask(6, 4, 3)), atol=1e-11, rtol=1e-9)
    # Weight inheritance from the softmax attention of the all-attention DiT: exactly the fresh tensors miss.
    res = lcha.LCHA(D, H).load_state_dict(dit.Attention(D, H).state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert sorted(res.missing_keys) == ["conv.bias", "conv.weight", "gate", "mix.bias", "mix.weight",
                                        "phi.bias", "phi.weight"]


def test_sana_attention_and_mixffn_stream_equals_parallel():
    grid, hw = (9, 3, 3), 9
    torch.manual_seed(0)
    attn, ffn = lcha.SanaAttention(D, H).double(), lcha.MixFFN(D, 2.0).double()
    with torch.no_grad():
        ffn.dw.weight.normal_(0, 0.3)                 # off the identity init
    x = _x(*grid)
    with torch.no_grad():
        par = ffn(attn(x, grid, dit.rope_tables(grid, d)), grid)
        torch.testing.assert_close(attn(x, grid, dit.rope_tables(grid, d), causal=False),
                                   _naive(attn, x, grid), atol=1e-11, rtol=1e-9)
        state, outs = dit.StreamState(2), []
        state.commit = True
        for t0 in range(0, 9, 3):
            xc = x[:, t0 * hw:(t0 + 3) * hw]
            outs.append(ffn(attn(xc, (3, 3, 3), dit.rope_tables((3, 3, 3), d, t0=t0), state=state), (3, 3, 3), state))
            state.advance(3)
        torch.testing.assert_close(torch.cat(outs, 1), par, atol=1e-11, rtol=1e-9)
        # MixFFN mixes space within a frame, never time: perturb one token of frame 4.
        x2 = x.clone()
        x2[:, 4 * hw + 4] += 1.0                      # centre token of frame 4
        diff = (ffn(x2, grid) - ffn(x, grid)).abs().amax(-1).reshape(2, 9, 3, 3)
        assert diff[:, 4].min() > 0 and diff[:, :4].max() == 0 and diff[:, 5:].max() == 0
        # A fresh MixFFN (identity dw) equals dit.FFN with the same fc1/fc2.
        fresh, plain = lcha.MixFFN(D, 2.0).double(), dit.FFN(D, 2.0).double()
        plain.load_state_dict(fresh.state_dict(), strict=False)
        torch.testing.assert_close(fresh(x, grid), plain(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="grid"):
        ffn(x)


def test_gradients_reach_fresh_tensors():
    grid = (6, 2, 2)
    m, x = _module(), _x(*grid)
    m(x, grid, dit.rope_tables(grid, d)).square().sum().backward()
    for name in ("phi.weight", "phi.bias", "conv.weight", "mix.weight", "gate", "qkv.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().max() > 0, name


def test_dit_block_hosts_lcha_forward_backward_and_stream():
    torch.manual_seed(0)
    blk = dit.Block(D, H, lcha.make_attention("lcha", D, H), lcha.make_ffn("sana", D, 2.0))
    with torch.no_grad():
        blk.ada.weight.normal_(0, 0.2)                # open the AdaLN-Zero gates
    grid, B, L = (6, 2, 2), 2, 3
    x, c = torch.randn(B, 24, D), torch.randn(B, 6, D)
    text, tmask = torch.randn(B, L, D), torch.ones(B, L, dtype=torch.bool)
    y = blk(x, c, text, tmask, dit.Geometry(grid, dit.rope_tables(grid, d), causal=True, chunk=3, window=1))
    assert y.shape == x.shape
    y.square().mean().backward()
    assert blk.attn.phi.weight.grad.abs().max() > 0 and blk.attn.gate.grad.abs().max() > 0
    with torch.no_grad():
        state, outs = dit.StreamState(1), []
        state.commit = True
        for i in range(2):
            sl = slice(i * 12, (i + 1) * 12)
            geo = dit.Geometry((3, 2, 2), dit.rope_tables((3, 2, 2), d, t0=3 * i), state=state)
            outs.append(blk(x[:, sl], c[:, 3 * i:3 * i + 3], text, tmask, geo))
            state.advance(3)
    torch.testing.assert_close(torch.cat(outs, 1), y.detach(), atol=1e-5, rtol=1e-5)


def test_factories_configs_and_errors():
    assert isinstance(lcha.make_attention("sana", D, H), lcha.SanaAttention)
    assert not lcha.make_attention("local", D, H).use_linear and not lcha.make_attention("linear", D, H).use_local
    assert isinstance(lcha.make_attention("softmax", D, H), dit.Attention)
    assert isinstance(lcha.make_ffn("lcha", D), dit.FFN) and isinstance(lcha.make_ffn("sana", D), lcha.MixFFN)
    with pytest.raises(ValueError, match="known"):
        lcha.make_attention("flash", D, H)
    with pytest.raises(ValueError, match="tiny"):
        lcha.get_config("huge")
    assert lcha.get_config("tiny", kernel="relu").kernel == "relu"
    m = lcha.LCHA(D, H)
    with pytest.raises(ValueError, match="expected x"):
        m(torch.randn(1, 10, D), (3, 2, 2), dit.rope_tables((3, 2, 2), d))
