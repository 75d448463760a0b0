"""One chunk at a time: the streaming primitives that generation and Self-Forcing training share
(paper Sec. C.2, D.2).

A stream is a sequence of chunks of `chunk` latent frames (3). Each chunk is generated from noise
in a few denoising steps that READ the caches of the past (`denoise_chunk`, state.commit = False),
then the clean chunk is re-encoded once into them (`commit_chunk`, state.commit = True): K/V for the
softmax (SSA) blocks, the per-chunk states (sum phi(k) v^T, sum phi(k)) and conv tails for LCHA. The
caches keep the last `window` chunks (2) plus `sink` leading ones (0), so memory and time per chunk
are constant. The geometry (chunk, window, sink) is the model's own: dit.DiTConfig, saved with
every checkpoint.

    stream.py      prompt -> denoise_chunk / commit_chunk, chunk after chunk -> decoded frames
    distill.py     Self-Forcing: `rollout` generates whole clips the same way, with gradients at
                   one exit step, and DMD trains on them (the student learns from its own past)
    chunk_step.py  the same step with static shapes and fixed-size caches, for Core ML

Legend: B batch, C latent channels, T latent frames (= chunk), h x w latent grid.
Flow time t in [0, 1], t = 0 data; x_t = (1-t) x0 + t eps; x0 = x_t - t v.

Run `python streaming.py`: a tiny random S2DiT streamed chunk by chunk equals its block-causal
forward over the whole clip (each chunk denoised next to its clean past).
"""
import torch

import dit
import flow
import sandwich
from dit import StreamState


def denoise_chunk(model, state, noise, text, mask, ts, generator=None, grad_step=None):
    """Few-step denoising of one chunk (B, C, 3, h, w) from `noise` through the schedule ts
    (flow.few_step_schedule), reading the caches only (state.commit = False). At step i:
        v = V(x_{t_i}, t_i | cache),  x0 = x_{t_i} - t_i v,  x_{t_{i+1}} = (1 - t_{i+1}) x0 + t_{i+1} eps'.
    grad_step=None: all steps, no gradients (inference). grad_step=j: Self-Forcing's exit -- the chunk
    stops at step j, which is the only step run with gradients (steps < j run under no_grad).
    Returns the x0 predicted at the exit, (B, C, 3, h, w)."""
    exit_step = len(ts) - 1 if grad_step is None else grad_step
    if not 0 <= exit_step < len(ts):
        raise ValueError(f"grad_step {grad_step} outside the schedule of {len(ts)} steps")
    grad_on = grad_step is not None and torch.is_grad_enabled()
    state.commit = False
    B, T = noise.shape[0], noise.shape[2]
    x_t = noise                                                                  # (B, C, T, h, w) at t = 1
    for i, t in enumerate(ts[:exit_step + 1]):
        t_frames = torch.full((B, T), t, dtype=noise.dtype, device=noise.device)  # (B, T)
        if i == exit_step and grad_on:
            # The prompt's cross-attention K/V are cached in the state by the first (no-grad) call;
            # recompute them here so the gradient also reaches the cross-attention K/V weights.
            kept, state.text_kv = state.text_kv, {}
            v = model(x_t, t_frames, text, mask, state=state)                   # (B, C, T, h, w)
            state.text_kv = kept
        else:
            with torch.no_grad():
                v = model(x_t, t_frames, text, mask, state=state)               # (B, C, T, h, w)
        x0 = x_t - t * v                                                         # (B, C, T, h, w)
        if i < exit_step:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            x_t = (1 - ts[i + 1]) * x0 + ts[i + 1] * eps                        # fresh noise at the next t
    return x0


@torch.no_grad()
def commit_chunk(model, state, x0, text, mask, t_ctx=0.0, generator=None):
    """Re-encode the generated chunk into the caches (state.commit = True), at the context noise
    level t_ctx (x0 noised to t_ctx first if t_ctx > 0), then move the stream on by its frames."""
    B, T = x0.shape[0], x0.shape[2]
    x = x0
    if t_ctx > 0:
        x = flow.add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device),
                           torch.full((B,), t_ctx))
    state.commit = True
    try:
        model(x, torch.full((B, T), float(t_ctx), dtype=x0.dtype, device=x0.device), text, mask, state=state)
    finally:
        state.commit = False
    state.advance(T)


def rollout(model, text, mask, n_chunks, ts, latent_shape, generator, exit_step=None, t_ctx=0.0, window=None):
    """Self-Forcing backward simulation: chunk after chunk from noise with a fresh StreamState, each
    chunk denoised on top of the model's OWN cached past (never ground truth). latent_shape = (C, h, w);
    window: chunks kept (default: the model's own, cfg.window).
    exit_step=None samples one exit step uniformly per rollout, shared by all chunks (Self-Forcing's
    default `same_step_across_blocks`); only that step carries gradients, the cache re-encoding runs
    without them. Under torch.no_grad() nothing carries gradients.
    Returns the latents (B, C, 3 * n_chunks, h, w)."""
    C, h, w = latent_shape
    B, T = text.shape[0], model.cfg.chunk
    if exit_step is None:
        exit_step = int(torch.randint(len(ts), (1,), generator=generator))
    state, outs = StreamState(model.cfg.window if window is None else window, model.cfg.sink), []
    for _ in range(n_chunks):
        noise = torch.randn((B, C, T, h, w), generator=generator).to(text)      # (B, C, 3, h, w)
        x0 = denoise_chunk(model, state, noise, text, mask, ts, generator, grad_step=exit_step)
        commit_chunk(model, state, x0.detach(), text, mask, t_ctx, generator)
        outs.append(x0)
    return torch.cat(outs, dim=2)                                                # (B, C, 3 n_chunks, h, w)


def _demo():
    """Streaming one step per chunk == the block-causal forward over [clean past, noisy chunk]."""
    torch.manual_seed(0)
    cfg = dit.get_config("tiny")
    model = sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT["tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():                                   # off the zero-init gates and head
            p.add_(torch.randn_like(p) * 0.05)
    text, mask = torch.randn(1, 4, cfg.text_dim), torch.ones(1, 4, dtype=torch.bool)
    ts, g = [1.0], torch.Generator().manual_seed(0)
    with torch.no_grad():
        clip = rollout(model, text, mask, 3, ts, (cfg.in_channels, 8, 8), g, window=3)   # (1, C, 9, 8, 8)
        g = torch.Generator().manual_seed(0)
        int(torch.randint(len(ts), (1,), generator=g))                 # the rollout's exit-step draw
        done = []
        for k in range(3):
            x = torch.cat(done + [torch.randn((1, cfg.in_channels, cfg.chunk, 8, 8), generator=g)], 2)
            t = torch.zeros(1, x.shape[2])
            t[:, -cfg.chunk:] = 1.0                                    # past clean, this chunk at t = 1
            done.append(x[:, :, -cfg.chunk:] - model(x, t, text, mask, causal=True, window=3)[:, :, -cfg.chunk:])
    err = (clip - torch.cat(done, 2)).abs().max().item()
    print(f"3 chunks streamed vs block-causal forward over the clip: max |diff| = {err:.2e}")
    assert err < 1e-4


if __name__ == "__main__":
    _demo()
