"""Rectified-flow matching: noising, velocity target, timestep shift, samplers.

Concept (Wan 2.1 / 2.2, the flow S2DiT is trained with; the S2DiT paper builds on Wan and
Self-Forcing and does not restate these equations, so they are taken from those works):

    x_t = (1 - t) x0 + t eps           t in [0, 1], t = 0 is data, t = 1 is noise
    v   = eps - x0                     the network predicts this velocity
    x0  = x_t - t v                    so any velocity prediction is also an x0 prediction
    t'  = s t / (1 + (s - 1) t)        timestep shift (s > 1 spends more steps near noise)

What lives here:
  * `add_noise`, `velocity_target`, `x0_from_v`, `shift_t`: the four equations above, with t
    per sample (B,) or per latent frame (B, T) broadcast onto a latent (B, C, T, h, w).
  * `sample_t`: training-time t, independent per chunk of 3 latent frames (diffusion forcing,
    so a streaming model learns to denoise a chunk next to cleaner / noisier context).
  * `sample_euler` + `cfg_velocity`: the many-step ODE sampler with classifier-free guidance
    used for the teacher and the pretrained models.
  * `few_step_schedule` + `sample_few_step`: Self-Forcing's warped [1000, 750, 500, 250]
    schedule and its predict-x0 / re-noise sampler, the one DMD students use (Tab. A1: 1, 2, 4).
  * `fm_loss` + `train_fm`: training a (block-causal) velocity model with these equations, t per
    chunk and CFG dropout, warm-up + cosine lr, an EMA, resumable, data-parallel under torchrun
    (dist.py) (train.py's base, teacher and pretrain stages); `cfg_predict`: a model's guided velocity.

Legend: B batch, C latent channels, T latent frames, h, w latent height and width.

Demo: `python flow.py`, the exact velocity field of a Gaussian is integrated by the Euler sampler
and the printed sample mean / variance match the data's (plus a sign-flipped control that fails).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dist
import safeio
from resume import Checkpoint


# ----------------------------------------------------------------------------- config
@dataclass
class FlowConfig:
    shift: float = 3.0            # inference timestep shift s for Euler and few-step samplers (Wan2.1 T2V / Self-Forcing: 5.0)
    train_shift: float = 1.0      # shift applied to training t (ASSUMPTION: 1.0 at toy resolution; few tokens need little shift)
    shared_t: float = 0.0         # share of training samples whose chunks all get one t (the rest: one t per chunk)
    cfg_scale: float = 3.0        # classifier-free guidance scale (Wan2.1 default 5.0; ASSUMPTION: 3.0 for the toy world)
    cfg_dropout: float = 0.1      # probability a caption is replaced by the null embedding in training (ASSUMPTION, common 0.1)
    boundary: float = 0.5         # MoE teacher: high-noise expert for t >= boundary (Wan2.2 T2V: 0.875; ASSUMPTION 0.5 so both toy experts see half the data)
    sample_steps: int = 20        # Euler steps for teacher / pretrained sampling (Wan: 50)
    few_steps: int = 4            # student steps (paper Tab. A1: 1, 2, 4; Self-Forcing: 4)


PRESETS = {
    "tiny": FlowConfig(),
    # train_shift 3 = the sampler's shift: training then sees the high-noise timesteps where the sampler
    # decides layout and direction as often as the sampler visits them (curves.py, recipe
    # first_chunk_shift3: held-out direction 0.71 after 2000 updates against 0.21 with train_shift 1)
    "small": FlowConfig(sample_steps=30, train_shift=3.0),
}


def get_config(name: str, **overrides) -> FlowConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "flow", **overrides)


# ----------------------------------------------------------------------------- the equations
def _t_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast t (B,) or (B, T) onto x (B, C, T, h, w): (B,1,1,1,1) or (B,1,T,1,1)."""
    if x.dim() != 5:
        raise ValueError(f"expected a latent of shape (B, C, T, h, w), got shape {tuple(x.shape)}")
    B, C, T = x.shape[:3]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and t.shape[0] == B:
        return t.view(B, 1, 1, 1, 1)                                    # one t per sample
    if t.dim() == 2 and t.shape == (B, T):
        return t.view(B, 1, T, 1, 1)                                    # one t per latent frame
    raise ValueError(f"expected t of shape ({B},) or ({B}, {T}) for a latent of shape "
                     f"{tuple(x.shape)}, got shape {tuple(t.shape)}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, the straight path from data (t = 0) to noise (t = 1)."""
    if eps.shape != x0.shape:
        raise ValueError(f"expected eps of shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    t = _t_like(t, x0)                                                  # (B,1,1|T,1,1)
    return (1 - t) * x0 + t * eps                                       # (B, C, T, h, w)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = d x_t / d t = eps - x0, the flow-matching regression target."""
    return eps - x0                                                     # (B, C, T, h, w)


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v: walk the straight line back from time t to time 0."""
    return x_t - _t_like(t, x_t) * v                                    # (B, C, T, h, w)


def shift_t(t, s: float):
    """Timestep shift t' = s t / (1 + (s - 1) t) (SD3 / Wan). Monotone, keeps 0 -> 0 and 1 -> 1;
    s > 1 pushes every t toward noise, where the coarse layout of the video is decided."""
    return s * t / (1 + (s - 1) * t)


# ----------------------------------------------------------------------------- training t
def sample_t(batch: int, frames: int, chunk: int = 3, mode: str = "logit_normal",
             shift: float = 1.0, per_chunk: bool = True, generator: torch.Generator | None = None,
             logit_mean: float = 0.0, logit_std: float = 1.0, shared: float = 0.0) -> torch.Tensor:
    """Training timesteps t of shape (B, T) for T = `frames` latent frames.

    per_chunk=True: one independent t per chunk of `chunk` latent frames, equal inside a chunk
    (diffusion forcing, as in CausVid / Self-Forcing): a block-causal student must learn to
    denoise the current chunk while its context chunks sit at other noise levels.
    per_chunk=False: one t per sample, repeated over all frames (plain bidirectional training).
    shared: with per_chunk, the probability that a sample's chunks all take its first chunk's t, as
    when the whole window is denoised at one t (the Euler sampler, the ODE pairs, DMD's real score).
    """
    if mode not in ("logit_normal", "uniform"):
        raise ValueError(f"unknown t mode {mode!r}; expected 'logit_normal' or 'uniform'")
    if batch < 1 or frames < 1 or chunk < 1:
        raise ValueError(f"expected batch, frames, chunk >= 1, got {batch}, {frames}, {chunk}")
    if not 0.0 <= shared <= 1.0:
        raise ValueError(f"shared is a probability, expected 0 <= shared <= 1, got {shared}")
    n = math.ceil(frames / chunk) if per_chunk else 1                   # independent draws per sample
    if mode == "logit_normal":
        # SD3: t = sigmoid(N(m, s^2)) concentrates training on mid-range t, where the loss is hardest
        z = torch.randn(batch, n, generator=generator) * logit_std + logit_mean   # (B, n)
        t = torch.sigmoid(z)                                            # (B, n)
    else:
        t = torch.rand(batch, n, generator=generator)                   # (B, n)
    if per_chunk and shared > 0:                                        # no extra draws when 0: old runs unchanged
        one = torch.rand(batch, 1, generator=generator) < shared        # (B, 1)
        t = torch.where(one, t[:, :1], t)                               # (B, n)
    t = shift_t(t, shift)                                               # (B, n)
    reps = chunk if per_chunk else frames
    return t.repeat_interleave(reps, dim=1)[:, :frames].contiguous()    # (B, T)


# ----------------------------------------------------------------------------- many-step sampler
def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + s (v_c - v_u); s = 1 is the plain conditional model."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_schedule(steps: int, shift: float) -> list[float]:
    """steps + 1 times from 1 (noise) to 0 (data), uniform grid warped by the shift."""
    if steps < 1:
        raise ValueError(f"expected steps >= 1, got {steps}")
    return [float(shift_t(1 - i / steps, shift)) for i in range(steps + 1)]


@torch.no_grad()
def sample_euler(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 noise: torch.Tensor, steps: int, shift: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (x = noise) down to t = 0 with Euler steps.

    velocity_fn(x (B, ...), t (B,)) -> v of x's shape; wrap the model with `cfg_velocity` for
    guidance. The ODE is deterministic: `generator` is unused and only kept so that both
    samplers share a signature.
    """
    ts = euler_schedule(steps, shift)
    x = noise                                                           # (B, C, T, h, w) at t = 1
    B = x.shape[0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        t_vec = torch.full((B,), t, dtype=x.dtype, device=x.device)     # (B,)
        v = velocity_fn(x, t_vec)                                       # (B, C, T, h, w)
        x = x + (t_next - t) * v                                        # t_next < t: a step toward data
    return x                                                            # (B, C, T, h, w) at t = 0


# ----------------------------------------------------------------------------- few-step sampler
def few_step_schedule(n_steps: int, shift: float) -> list[float]:
    """Self-Forcing's denoising list [1000, 750, 500, 250] / 1000 (n = 4), generalised to n steps
    as [1 - i/n for i < n] and warped by the shift: n=1 -> [1], n=2 -> [1, s(.5)], n=4 -> [1, s(.75),
    s(.5), s(.25)]. The first entry is always 1: the student starts from pure noise."""
    if n_steps < 1:
        raise ValueError(f"expected n_steps >= 1, got {n_steps}")
    return [float(shift_t(1 - i / n_steps, shift)) for i in range(n_steps)]


def sample_few_step(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    noise: torch.Tensor, ts: list[float],
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The DMD student's sampler (Self-Forcing / CausVid): at each t predict x0, then jump to the
    next t by re-noising that x0 with fresh noise, rather than following the ODE.

    denoise_fn(x_t, t (B,)) -> velocity v; x0 = x_t - t v. Returns the last x0 prediction.
    No torch.no_grad here: Self-Forcing backpropagates through the last step of this rollout.
    """
    if len(ts) == 0 or abs(ts[0] - 1.0) > 1e-6:
        raise ValueError(f"expected a schedule starting at t = 1 (pure noise), got {list(ts)}")
    if any(b >= a for a, b in zip(ts[:-1], ts[1:])) or ts[-1] <= 0:
        raise ValueError(f"expected strictly decreasing times in (0, 1], got {list(ts)}")
    x_t = noise                                                         # (B, C, T, h, w) at t = 1
    B = x_t.shape[0]
    for i, t in enumerate(ts):
        t_vec = torch.full((B,), t, dtype=x_t.dtype, device=x_t.device)  # (B,)
        v = denoise_fn(x_t, t_vec)                                      # (B, C, T, h, w)
        x0 = x_t - t * v                                                # (B, C, T, h, w) predicted data
        if i + 1 < len(ts):
            t_next = ts[i + 1]
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            x_t = (1 - t_next) * x0 + t_next * eps                      # (B, C, T, h, w) fresh noise at t'
    return x0


# ----------------------------------------------------------------------------- training a velocity model
def chunk_frames(model):
    """Latent frames per chunk of a model (its cfg.chunk; 3 for a model without a cfg)."""
    return getattr(getattr(model, "cfg", None), "chunk", 3)


def _batch_null(null, B):
    """A (1, L, D) or (1, L) null prompt expanded to batch B."""
    return null.expand(B, *null.shape[1:]) if null.shape[0] == 1 else null


def cfg_predict(model, x, t, text, mask, null_text, null_mask, scale, **kw):
    """Guided velocity of a model, v = v_u + s (v_c - v_u) (cfg_velocity); s = 1 skips the null pass."""
    v_c = model(x, t, text, mask, **kw)                                        # (B, C, T, h, w)
    if scale == 1.0:
        return v_c
    B = x.shape[0]
    v_u = model(x, t, _batch_null(null_text, B), _batch_null(null_mask, B), **kw)  # (B, C, T, h, w)
    return cfg_velocity(v_c, v_u, scale)


def fm_loss(model, x0, text, mask, null_text, null_mask, weight=None, p_uncond=0.1, generator=None, shift=1.0,
            boundary=None, rows=slice(None), shared_t=0.0):
    """Flow matching with per-chunk t (diffusion forcing) and CFG dropout:
        L = E || V(x_t, t, e) - (eps - x0) ||^2,   x_t = (1 - t) x0 + t eps,  t independent per chunk
    (for a share shared_t of the samples: one t for all their chunks; flow.sample_t).
    weight (B, 1, T, h, w), optional: a per-latent-pixel weight of the squared error, normalised by
    its mean so the loss keeps its scale (runs.PipelineConfig.object_weight).
    rows: the rows of the batch this process trains on (data-parallel training, dist.rows); the
    random numbers are drawn for the whole batch, so each row gets what it gets in one process.
    # DEVIATION: the paper's KD model is bidirectional; ours (teacher, T_theta, S2DiT-Pretrained) is
    # block-causal with per-chunk t from the start, so the same network can denoise a chunk next to
    # clean context (the DMD stage still starts with Self-Forcing's ODE regression, ode_init)."""
    B, C, T = x0.shape[:3]
    t = sample_t(B, T, chunk=chunk_frames(model), shift=shift, generator=generator, shared=shared_t).to(x0)  # (B, T)
    if boundary is not None:
        # MoE teacher: every chunk of a sample on one expert's side of the boundary (a coin per sample),
        # so each sample trains (and costs) one expert, as the experts are used in the cache and DMD.
        high = torch.rand(B, 1, generator=generator).to(x0) < 0.5                # (B, 1)
        t = torch.where(high, boundary + (1 - boundary) * t, boundary * t)      # (B, T)
    eps = torch.randn(x0.shape, generator=generator).to(x0)                     # (B, C, T, h, w)
    drop = torch.rand(B, generator=generator).to(x0.device) < p_uncond          # (B,) captions -> null
    norm = None if weight is None else weight.mean()                            # the whole batch's mean weight
    x0, t, eps, drop, text, mask = x0[rows], t[rows], eps[rows], drop[rows], text[rows], mask[rows]
    B = x0.shape[0]                                                             # B/N with N processes
    x_t = add_noise(x0, eps, t)                                            # (B, C, T, h, w)
    text = torch.where(drop[:, None, None], _batch_null(null_text, B), text)    # (B, L, Dt)
    mask = torch.where(drop[:, None], _batch_null(null_mask, B), mask)          # (B, L)
    v = model(x_t, t, text, mask, causal=True)                                  # (B, C, T, h, w)
    if weight is None:
        return F.mse_loss(v, velocity_target(x0, eps))
    return (weight[rows] * (v - velocity_target(x0, eps)) ** 2).mean() / norm


class EMA:
    """Exponential moving average of parameters: ema <- decay * ema + (1 - decay) * param."""

    def __init__(self, model, decay=0.99):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        for k, p in model.named_parameters():
            self.shadow[k].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model):
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])


def ema_result(model, ema):
    """The EMA weights in a copy of `model` (the model itself when no EMA was kept)."""
    if ema is None:
        return model
    out = copy.deepcopy(model)
    ema.copy_to(out)
    return out


def optimizer_step(opt, loss, params, clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def lr_factor(step, warmup, steps, decay):
    """Linear warm-up over `warmup` updates, then constant (decay="none") or a cosine down to 10 %
    of the peak at the last update (decay="cosine"; the usual schedule of DiT/SD3-style runs)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "cosine" and steps > warmup:
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0


def train_fm(model, batch_fn, steps, lr, p_uncond=0.1, shift=1.0, seed=0, betas=(0.9, 0.999),
             weight_decay=0.0, ema_decay=None, clip=1.0, progress=True, desc="fm", boundary=None, warmup=0,
             decay="none", ckpt=None, ckpt_every_s=180.0, hook=None, hook_every=0, shared_t=0.0):
    """Flow-matching loop. batch_fn(step) -> (x0, text, mask, null_text, null_mask).
    The learning rate follows lr_factor (warm-up, then constant or cosine).

    ckpt: a file this loop saves itself to every `ckpt_every_s` seconds (model, optimizer, EMA,
    the noise generator, the step) and resumes from when it exists: since batch_fn is a function of
    the step and the generator state is restored, a killed-and-resumed loop gives the same weights
    as an uninterrupted one, bit for bit. The file is removed when the loop ends.
    hook(step, ema_model) runs every `hook_every` updates (and after the last): learning curves.
    Returns (EMA copy of the model, or the model itself if ema_decay is None; metrics)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps, decay))
    ema = EMA(model, ema_decay) if ema_decay else None
    losses, run = [], None
    saver = Checkpoint(ckpt, ckpt_every_s)
    start, state = saver.load()
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        losses, run = state["losses"], state["run"]
        if ema:
            ema.shadow = {k: v.to(ema.shadow[k]) for k, v in state["ema"].items()}   # onto the model's device
    # Under torchrun the loss runs through DDP, which averages the gradients over the processes (dist.py)
    loss_fn = dist.data_parallel(lambda batch, rows: fm_loss(model, *batch, p_uncond=p_uncond, generator=g, shift=shift,
                                                             boundary=boundary, rows=rows, shared_t=shared_t),
                                 model, unused=boundary is not None)   # MoE: a shard may train one expert only
    bar = tqdm(range(start, steps), desc=desc, disable=not (progress and dist.is_main()), initial=start, total=steps)
    for step in bar:
        batch = batch_fn(step)                                        # the whole batch, in every process
        loss = loss_fn(batch, dist.rows(len(batch[0])))
        optimizer_step(opt, loss, list(model.parameters()), clip)
        sched.step()
        if ema:
            ema.update(model)
        losses.append(dist.mean(loss).item())                         # the whole batch's loss
        run = losses[-1] if run is None else 0.95 * run + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{run:.4f}")
        if hook and hook_every and ((step + 1) % hook_every == 0 or step + 1 == steps):
            hook(step + 1, ema_result(model, ema))
        saver.maybe_save(step + 1, lambda: {
            "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "generator": g.get_state(), "ema": ema.shadow if ema else {}, "losses": losses, "run": run})
    saver.finish()
    return ema_result(model, ema), {"loss_first": losses[0] if losses else None, "loss_last": run, "losses": losses}


# ----------------------------------------------------------------------------- a known answer
def gaussian_velocity(mu: float, sigma: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact velocity v*(x_t, t) = E[eps - x0 | x_t] for data x0 ~ N(mu, sigma^2) per dimension.

    x_t = (1-t) x0 + t eps is Gaussian with mean m_t = (1-t) mu and variance
    s_t^2 = (1-t)^2 sigma^2 + t^2; Cov(x0, x_t) = (1-t) sigma^2, Cov(eps, x_t) = t, hence
    E[x0 | x_t] = mu + (1-t) sigma^2 (x_t - m_t) / s_t^2 and E[eps | x_t] = t (x_t - m_t) / s_t^2.
    """
    def v_star(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1)))                          # (B, 1, ...)
        m_t = (1 - t) * mu
        s2_t = (1 - t) ** 2 * sigma ** 2 + t ** 2
        e_x0 = mu + (1 - t) * sigma ** 2 * (x - m_t) / s2_t
        e_eps = t * (x - m_t) / s2_t
        return e_eps - e_x0
    return v_star


def _demo() -> None:
    mu, sigma, shift = 2.0, 0.5, 1.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 4, 3, 4, 4, generator=g)                   # (B, C, T, h, w), 49k numbers
    v_star = gaussian_velocity(mu, sigma)
    print(f"data x0 ~ N({mu}, {sigma ** 2:.4f}); Euler with the exact velocity, shift {shift}:")
    for steps in (10, 50, 200):                                        # Euler is first order: var error ~ 1/steps
        x = sample_euler(v_star, noise, steps=steps, shift=shift)
        print(f"  {steps:4d} steps: mean {x.mean():.4f}  var {x.var():.4f}")
    flipped = sample_euler(lambda x, t: -v_star(x, t), noise, steps=200, shift=shift)
    print(f"  sign-flipped velocity (a bug): mean {flipped.mean():.4f}  var {flipped.var():.4f}")
    one = sample_few_step(v_star, noise, few_step_schedule(1, 3.0), generator=g)
    print(f"  1-step x0 = x_1 - v(x_1, 1) = E[x0] = mu exactly: max |x0 - mu| = {(one - mu).abs().max():.2e}")
    print("few-step schedules (shift 3.0):",
          {n: [round(t, 3) for t in few_step_schedule(n, 3.0)] for n in (1, 2, 4)})
    print("sample_t per chunk of 3, T = 9:\n", sample_t(2, 9, generator=g))
    assert abs(x.mean() - mu) < 0.01 and abs(x.var() - sigma ** 2) < 0.01, "Euler sampler is wrong"
    assert abs(flipped.mean() - mu) > 0.5, "sign-flipped control should fail"
    print("OK: Euler with the exact velocity recovers the data distribution")


if __name__ == "__main__":
    _demo()
