"""2-in-1 distillation: offline cached KD, then Self-Forcing DMD + progressive RpGAN (paper Sec. C, Eq. 12-14).

The student S2DiT (sandwich.py) becomes a few-step, block-causal streaming generator in two stages:

  1. Offline cached KD (Sec. C.1, Eq. 12): the MoE teacher (dit.MoETeacher, stand-in for Wan2.2)
     runs ONCE over the data and writes, per sample, the text embedding e and one diffusion tuple
     (t, n, v) per expert: n the noisy latent x_t, v the teacher's CFG-guided velocity (`teacher_tuples`;
     the shards on disk are kdcache.py). The student then regresses those velocities (`kd_loss`,
     `train_kd`); the teacher is never loaded while it trains.
  2. Self-Forcing DMD (Sec. C.2), started as Self-Forcing starts it, from an ODE-regression
     initialisation (CausVid, Yin et al. 2025): the real score's guided ODE is integrated from noise
     to a clip, and the few-step student learns to jump from the ODE's states at its own schedule
     straight to the ODE's end, chunk after chunk on the clean past (`ode_init`). Then the student
     generates a whole clip chunk after chunk with its own KV cache (backward simulation,
     streaming.rollout), and the DMD gradient (Yin et al. 2024, "One-step Diffusion with Distribution
     Matching Distillation"; normalised as in DMD2, Yin et al. 2024b) pulls its samples toward the
     real score (teacher + CFG) and away from a trainable fake score (the critic).
     Progressive adversarial fine-tuning (Eq. 13-14) adds an RpGAN whose "real" samples are the
     student's own many-step (T') outputs and whose "fake" are its few-step (T < T') outputs, with
     R1 + R2 penalties in the paper's finite-difference form. `DMDTrainer` holds the models and
     optimizers; one method per update (`critic_update`, `generator_update`), `train_dmd` is the loop.

The flow-matching pieces every stage shares (fm_loss, EMA, cfg_predict, optimizer_step) are flow.py's.

Legend: B batch, C latent channels, T latent frames (3 per chunk), h x w latent grid, N tokens,
D width, L text tokens. Flow time t in [0, 1], t = 0 data; x_t = (1-t) x0 + t eps; x0 = x_t - t v.

Demo: `python distill.py` -- DMD on 2-D Gaussians (known scores), then a 2-step tiny S2DiT pipeline
(cache -> KD -> DMD+GAN) for a few iterations.
"""
import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import dist
import dit
import flow
import safeio
import sandwich
from dit import StreamState
from flow import EMA, cfg_predict, chunk_frames, ema_result, fm_loss, optimizer_step
from resume import Checkpoint
from streaming import commit_chunk, rollout


@dataclass
class KDConfig:
    """Offline cached KD (Sec. C.1, Eq. 12)."""
    steps: int = 500              # student updates on the cache
    batch: int = 4                # samples per KD update
    lr: float = 1e-4              # KD lr (ASSUMPTION; AdamW betas (0.9, 0.999))
    weight_decay: float = 0.01    # AdamW weight decay (as DMD)
    clip: float = 10.0            # gradient-norm clip (ASSUMPTION)
    ema: float = 0.99             # EMA decay of the student (paper: 0.99)
    w_l: float = 0.5              # Eq. 12 weight of the low-noise expert's tuple
    w_h: float = 0.5              # Eq. 12 weight of the high-noise expert's tuple
    seed: int = 0


@dataclass
class DMDConfig:
    """Self-Forcing DMD (Sec. C.2), its ODE-regression start and the progressive RpGAN (Eq. 13-14).
    The stream's geometry (chunk, KV window, sink) is the student's own: dit.DiTConfig."""
    # --- Self-Forcing DMD (Sec. C.2) ---
    steps: int = 200              # generator updates
    batch: int = 2                # clips per update (train.py's batch_fn_text draws this many prompts)
    n_chunks: int = 3             # chunks per rollout (3 x 3 = 9 latent frames = 33 pixel frames)
    latent_hw: tuple = (8, 8)     # latent grid h, w (tiny 8x8, small 16x16; docs/design.md, conventions)
    n_steps: int = 4              # student steps T (Tab. A1: 1, 2, 4; Self-Forcing: 4)
    shift: float = 3.0            # shift of the few-step schedule and of the DMD t (flow.FlowConfig.shift)
    t_ctx: float = 0.0            # noise level the clean chunk is re-encoded at (Self-Forcing: 0)
    critic_updates: int = 5       # critic (fake score) updates per generator update (DMD2 / Self-Forcing: 5)
    critic_warmup: int = 0        # critic updates on the initial generator's samples before the first
                                  # generator update (ASSUMPTION: the fake score starts as the KD model,
                                  # whose samples are not the ODE-initialised student's)
    lr_g: float = 1e-4            # generator lr (paper 1e-5; ASSUMPTION: x10 for the toy)
    lr_c: float = 2e-5            # critic lr (paper 2e-6): the paper's 5:1 generator:critic ratio
    betas: tuple = (0.0, 0.999)   # AdamW betas (paper / DMD2: beta1 = 0)
    weight_decay: float = 0.01    # AdamW weight decay (Self-Forcing: 0.01)
    clip: float = 10.0            # gradient-norm clip (ASSUMPTION)
    t_min: float = 0.02           # DMD / GAN t range before the shift (DMD2: [0.02, 0.98])
    t_max: float = 0.98
    ema: float = 0.99             # EMA decay of the generator (paper: 0.99)
    # --- ODE-regression initialisation (CausVid / Self-Forcing's starting point) ---
    # (train.py passes its own PipelineConfig.ode_pairs / ode_updates; these values serve this
    # module's demo and tests)
    ode_pairs: int = 128          # (ODE states, ODE end) clips from the real score (Self-Forcing: ~16k)
    ode_steps: int = 16           # Euler steps of the real score's ODE (a multiple of n_steps, so the
                                  # student's schedule lies on the Euler grid)
    ode_updates: int = 200        # regression updates before DMD (0 = start DMD from the KD student)
    ode_batch: int = 4
    ode_lr: float = 1e-4          # ASSUMPTION (AdamW betas (0.9, 0.999))
    # --- progressive RpGAN (Eq. 13-14) ---
    gan_start: int = 100          # generator update at which the GAN terms switch on (ASSUMPTION: half way)
    gan_weight: float = 0.1       # weight of L_G (and of L_D in the critic loss) (ASSUMPTION)
    gan_real_steps: int = 8       # T': student steps of the "real" samples, T' > n_steps
    r1_weight: float = 0.1        # R1 on real (ASSUMPTION)
    r2_weight: float = 0.1        # R2 on fake (ASSUMPTION)
    eps: float = 0.01             # finite-difference step of Eq. 13 (ASSUMPTION)
    exact_r1: bool = False        # True: exact ||grad_x D||^2 by double backward instead of Eq. 13
    seed: int = 0


KD_PRESETS = {"tiny": KDConfig(steps=40, batch=2), "small": KDConfig(steps=600), "paper": KDConfig()}
PRESETS = {
    "tiny": DMDConfig(steps=20, batch=1, n_steps=2, critic_updates=1, gan_start=10, gan_real_steps=4,
                      ode_pairs=8, ode_steps=4, ode_updates=10, ode_batch=2),
    # small: after the ODE initialisation DMD is a refinement (RESULTS.md: small learning rates and a
    # critic warm-up kept the ODE-initialised student's prompt following; larger ones lost it).
    # ASSUMPTION: 2-clip batches make each DMD gradient noisy, so the toy takes small steps with a
    # critic that starts on the student's samples.
    "small": DMDConfig(steps=300, batch=2, latent_hw=(16, 16), critic_updates=2, gan_start=150,
                       lr_g=2e-5, lr_c=2e-5, critic_warmup=40),
    "paper": DMDConfig(lr_g=1e-5, lr_c=2e-6, latent_hw=(36, 64), gan_real_steps=8),  # values the paper states
}

# Prompts are drawn by step from the caller's batch_fn_text; the ODE pairs and the critic warm-up take
# theirs at steps far past the DMD loop's, so no two phases see the same batch.
ODE_BATCHES, WARMUP_BATCHES = 10_000_000, 20_000_000
HEAD_SEED_OFFSET = 1               # the discriminator head is initialised from cfg.seed + 1


def get_config(name: str, **overrides) -> DMDConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "distill", **overrides)


def get_kd_config(name: str, **overrides) -> KDConfig:
    """A fresh copy of the named KD preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(KD_PRESETS, name, "KD", **overrides)


# ==============================================================================================
# Offline cached KD (Sec. C.1, Eq. 12)
# ==============================================================================================
KD_KEYS = ("text", "mask", "t_h", "n_h", "v_h", "t_l", "n_l", "v_l")


@torch.no_grad()
def teacher_tuples(teacher, x0, text, mask, null_text, null_mask, boundary, cfg_scale, generator=None):
    """The teacher's diffusion tuples for a batch: (t_h, n_h, v_h) with every t_h >= boundary (the
    high-noise expert answers) and (t_l, n_l, v_l) with every t_l < boundary (the low-noise expert).
    n = x_t = (1 - t) x0 + t eps, v = CFG-guided teacher velocity.
    # ASSUMPTION: t uniform per chunk inside the expert's interval ([boundary, 1) or [0, boundary))."""
    B, C, T = x0.shape[:3]
    u = lambda: flow.sample_t(B, T, chunk=chunk_frames(teacher), mode="uniform", generator=generator).to(x0)  # (B, T)
    out = {"text": text, "mask": mask}
    for side, t in (("h", boundary + (1 - boundary) * u()), ("l", boundary * u())):
        n = flow.add_noise(x0, torch.randn(x0.shape, generator=generator).to(x0), t)  # (B, C, T, h, w)
        v = cfg_predict(teacher, n, t, text, mask, null_text, null_mask, cfg_scale, causal=True)
        out.update({f"t_{side}": t, f"n_{side}": n, f"v_{side}": v})
    return out


def kd_loss(student, batch, w_l=0.5, w_h=0.5):
    """Eq. 12:  L_KD = E[ w_l ||v_l - V_theta(t_l, n_l, e)||^2 + w_h ||v_h - V_theta(t_h, n_h, e)||^2 ]
    with a block-causal student forward.
    # ASSUMPTION: ||.||^2 is the mean over elements (MSE), so the loss does not scale with resolution."""
    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}                       # the cache's tensors are on the CPU
    e, m = batch["text"], batch["mask"]                                         # (B, L, Dt), (B, L)
    V_l = student(batch["n_l"], batch["t_l"], e, m, causal=True)                # (B, C, T, h, w)
    V_h = student(batch["n_h"], batch["t_h"], e, m, causal=True)                # (B, C, T, h, w)
    return w_l * F.mse_loss(V_l, batch["v_l"]) + w_h * F.mse_loss(V_h, batch["v_h"])


def train_kd(student, cache, cfg: KDConfig, progress=True, ckpt=None, ckpt_every_s=180.0):
    """Offline KD loop on a kdcache.CachedKD: the teacher is not needed. Returns (EMA student, metrics).
    ckpt: saved every ckpt_every_s seconds and resumed from, bit-identically (resume.py).
    Data-parallel under torchrun (dist.py): every process draws the whole batch's samples and trains
    on its own rows of them; DDP averages the gradients."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(student, cfg.ema)
    losses, run = [], None
    saver = Checkpoint(ckpt, ckpt_every_s)
    start, state = saver.load()
    if state:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        ema.shadow = {k: v.to(ema.shadow[k]) for k, v in state["ema"].items()}   # onto the student's device
        losses, run = state["losses"], state["run"]
    loss_fn = dist.data_parallel(lambda batch: kd_loss(student, batch, cfg.w_l, cfg.w_h), student)
    bar = tqdm(range(start, cfg.steps), desc="kd", disable=not (progress and dist.is_main()), initial=start,
               total=cfg.steps)
    for step in bar:
        idx = torch.randint(len(cache), (cfg.batch,), generator=g)             # the whole batch's samples
        loss = loss_fn(cache.collate(idx[dist.rows(cfg.batch)]))
        optimizer_step(opt, loss, list(student.parameters()), cfg.clip)
        ema.update(student)
        losses.append(dist.mean(loss).item())                                   # the whole batch's loss
        run = losses[-1] if run is None else 0.95 * run + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{run:.4f}")
        saver.maybe_save(step + 1, lambda: {"model": student.state_dict(), "opt": opt.state_dict(),
                                            "generator": g.get_state(), "ema": ema.shadow, "losses": losses, "run": run})
    saver.finish()
    return ema_result(student, ema), {"kd_loss_first": losses[0] if losses else None, "kd_loss_last": run,
                                       "kd_losses": losses, "cache_bytes": cache.nbytes}


# ==============================================================================================
# ODE-regression initialisation (Self-Forcing's starting point, from CausVid)
# ==============================================================================================
@torch.no_grad()
def ode_trajectories(real_score, text, mask, shape, n_frames, ts, ode_steps, shift, generator):
    """Integrate the real score's guided ODE dx/dt = v(x, t) from noise (t = 1) to a clip (t = 0),
    Euler on flow.euler_schedule(ode_steps, shift), every frame at the same t (the real score is
    block-causal, so chunk k never sees later chunks). Keeps the states at the student's times ts,
    which must lie on the Euler grid. shape = (C, h, w).
    Returns xs (B, len(ts), C, T, h, w) (xs[:, 0] = the noise, t = 1) and x0 (B, C, T, h, w)."""
    grid = flow.euler_schedule(ode_steps, shift)
    keep = []
    for t in ts:
        j = min(range(len(grid) - 1), key=lambda i: abs(grid[i] - t))
        if abs(grid[j] - t) > 1e-6:
            raise ValueError(f"student time {t:.4f} is not on the {ode_steps}-step Euler grid; "
                             f"ode_steps must be a multiple of the student's steps ({len(ts)})")
        keep.append(j)
    B = text.shape[0]
    x = torch.randn((B, shape[0], n_frames, *shape[1:]), generator=generator).to(text)  # (B, C, T, h, w)
    xs = {}
    for j, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if j in keep:
            xs[j] = x
        x = x + (t_next - t) * real_score(x, torch.full((B, n_frames), t).to(x), text, mask)
    return torch.stack([xs[j] for j in keep], dim=1), x


def ode_regression_loss(student, xs, x0, text, mask, ts):
    """CausVid's ODE regression, chunk by chunk as the student streams: from the ODE's state at each
    of its times t_i, the student's x0 = x_t - t v must land on the ODE's end; the past it reads is
    the ODE's clean chunks (teacher forcing), re-encoded with commit_chunk as at inference.
        L = mean_{k, i} || x_{t_i}^k - t_i V(x_{t_i}^k, t_i | clean chunks < k) - x0^k ||^2
    xs (B, n, C, T, h, w), x0 (B, C, T, h, w)."""
    B, chunk = x0.shape[0], chunk_frames(student)
    state, losses = StreamState(student.cfg.window, student.cfg.sink), []
    for f0 in range(0, x0.shape[2], chunk):
        target = x0[:, :, f0:f0 + chunk]                                         # (B, C, 3, h, w)
        state.commit = False
        for i, t in enumerate(ts):
            x_t = xs[:, i, :, f0:f0 + chunk]                                    # (B, C, 3, h, w)
            v = student(x_t, torch.full((B, chunk), t).to(x_t), text, mask, state=state)
            losses.append(F.mse_loss(x_t - t * v, target))
        commit_chunk(student, state, target, text, mask)
    return torch.stack(losses).mean()


def ode_init(student, real_score, batch_fn_text, cfg, generator, progress=True, ckpt=None, ckpt_every_s=180.0):
    """Self-Forcing's initialisation: cfg.ode_pairs ODE trajectories of the real score (prompts from
    batch_fn_text, drawn at steps past the DMD loop's), then cfg.ode_updates regression updates.
    Trains `student` in place; returns metrics.
    ckpt: a file both phases save themselves to every ckpt_every_s seconds (the pairs so far, then the
    student and its optimizer, with the noise generator) and resume from, bit-identically."""
    shape = (student.cfg.in_channels, *cfg.latent_hw)
    ts = flow.few_step_schedule(cfg.n_steps, cfg.shift)
    n_frames = cfg.n_chunks * chunk_frames(student)
    saver = Checkpoint(ckpt, ckpt_every_s)
    _, st = saver.load()
    st = st or {"pairs": [], "update": 0, "losses": [], "seconds": 0.0}
    if "generator" in st:
        generator.set_state(st["generator"])
    device = next(student.parameters()).device                          # a checkpoint loads onto the CPU
    pairs = [tuple(v.to(device) for v in p) for p in st["pairs"]]       # [(xs, x0, text, mask)] per batch
    t0 = time.time() - st["seconds"]
    save = lambda more: saver.maybe_save(len(pairs) + len(st["losses"]), lambda: {  # noqa: E731
        "pairs": pairs, "generator": generator.get_state(), "seconds": time.time() - t0, **more()})
    done = lambda: sum(len(p[1]) for p in pairs)                        # noqa: E731
    bar = tqdm(total=cfg.ode_pairs, initial=min(done(), cfg.ode_pairs), desc="ode pairs", disable=not progress)
    while done() < cfg.ode_pairs:
        text, mask = batch_fn_text(ODE_BATCHES + len(pairs))[:2]
        a, b = ode_trajectories(real_score, text, mask, shape, n_frames, ts, cfg.ode_steps, cfg.shift, generator)
        pairs.append((a, b, text, mask))
        bar.update(len(b))
        save(lambda: {"update": 0, "losses": []})
    bar.close()
    xs, x0, texts, masks = (torch.cat([p[k] for p in pairs])[:cfg.ode_pairs] for k in range(4))
    pair_seconds = st.get("pair_seconds", time.time() - t0)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.ode_lr, weight_decay=cfg.weight_decay)
    losses = st["losses"]
    if st["update"] > 0:                                                # resumed inside the regression
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["opt"])
    bar = tqdm(range(st["update"], cfg.ode_updates), desc="ode regression", disable=not progress,
               initial=st["update"], total=cfg.ode_updates)
    for u in bar:
        idx = torch.randint(len(x0), (cfg.ode_batch,), generator=generator)
        loss = ode_regression_loss(student, xs[idx], x0[idx], texts[idx], masks[idx], ts)
        optimizer_step(opt, loss, list(student.parameters()), cfg.clip)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        save(lambda: {"update": u + 1, "losses": losses, "student": student.state_dict(),   # built only when saved
                      "opt": opt.state_dict(), "pair_seconds": pair_seconds})
    saver.finish()
    return {"ode_pairs": len(x0), "ode_pair_seconds": pair_seconds, "ode_seconds": time.time() - t0,
            "ode_loss_first": losses[0] if losses else None,
            "ode_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


# ==============================================================================================
# DMD (Sec. C.2): real score, fake score (critic), the normalised DMD gradient
# ==============================================================================================
def make_real_score(model, null_text, null_mask, cfg_scale):
    """real_fn(x_t, t, text, mask) -> CFG-guided velocity of a FROZEN copy of `model`. Pass the
    teacher, or (Tab. A7, "without teacher") the student's own pretrained model."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def real_fn(x_t, t, text, mask):
        return cfg_predict(frozen, x_t, t, text, mask, null_text, null_mask, cfg_scale, causal=True)
    real_fn.model = frozen
    return real_fn


def dmd_loss(x0, real_fn, fake_fn, t, eps):
    """DMD (Yin et al. 2024) with DMD2's normalisation. x0 (B, ...) generator samples with grad;
    real_fn / fake_fn(x_t, t) -> velocity; t (B,); eps noise like x0.
        x_t = (1 - t) sg(x0) + t eps,   x0_s = x_t - t v_s(x_t, t)   for s in {real, fake}
        grad = (x0_fake - x0_real) / mean(|x0 - x0_real|)            (per sample; the KL gradient
                                          s_fake - s_real is (1-t)/t^2 (x0_fake - x0_real) in x0 space)
        L = 0.5 || x0 - sg(x0 - grad) ||^2  so that dL/dx0 = grad / numel: descent moves the samples
                                          toward the real score's x0 and away from the fake one's."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))                                    # (B, 1, ...)
    with torch.no_grad():
        x_t = (1 - tb) * x0.detach() + tb * eps                                 # (B, ...)
        x0_real = x_t - tb * real_fn(x_t, t)
        x0_fake = x_t - tb * fake_fn(x_t, t)
        norm = (x0.detach() - x0_real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm.clamp_min(1e-8))
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def _dmd_t(B, cfg, generator):
    """t ~ shift(U(t_min, t_max)), one per sample.  # ASSUMPTION: shared by all frames of a clip."""
    return flow.shift_t(cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(B, generator=generator), cfg.shift)


def critic_fm_loss(critic, x0, text, mask, generator, shift=1.0):
    """The fake score learns the generator's current distribution by flow matching on its (detached)
    samples, per-chunk t as every model here.  # ASSUMPTION: conditional only (no CFG dropout)."""
    return fm_loss(critic, x0.detach(), text, mask, text[:1], mask[:1], p_uncond=0.0, generator=generator, shift=shift)


# ==============================================================================================
# Progressive RpGAN + R1/R2 (Eq. 13-14): discriminator head on the critic's features
# ==============================================================================================
def feature_module(critic):
    """The block whose output tokens feed the discriminator: the end of the middle group (S2DiT:
    group (M-1)//2, the first SSA group of `L S S L`, low-res tokens; DiT: block (depth-1)//2).
    # ASSUMPTION: mid-network features, as DMD2's classifier on the fake score's bottleneck."""
    if hasattr(critic, "groups"):
        return critic.groups[(len(critic.groups) - 1) // 2][-1]
    if hasattr(critic, "blocks"):
        return critic.blocks[(len(critic.blocks) - 1) // 2]
    raise ValueError(f"cannot find the middle block of {type(critic).__name__}: expected .groups or .blocks")


def critic_features(critic, x_t, t, text, mask):
    """Tokens (B, N', D) after the critic's middle block, captured by a forward hook (the models are
    not edited). The hook keeps the autograd graph, so D trains the critic trunk too (as DMD2)."""
    store = {}
    hook = feature_module(critic).register_forward_hook(lambda mod, inp, out: store.__setitem__("y", out))
    try:
        critic(x_t, t, text, mask, causal=True)
    finally:
        hook.remove()
    return store["y"]


class DiscHead(nn.Module):
    """D = MLP(mean over tokens of the critic features) -> one logit per clip.  # ASSUMPTION: mean pool + 2-layer MLP."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens):
        return self.net(tokens.mean(dim=1))[:, 0]                               # (B, N', D) -> (B,)


def rpgan_losses(d_real, d_fake):
    """Eq. 14 (RpGAN, relativistic pairing): L_D = softplus(D(fake) - D(real)), L_G = softplus(D(real) - D(fake))."""
    return F.softplus(d_fake - d_real).mean(), F.softplus(d_real - d_fake).mean()


def r_penalty(D, x, eps=0.01, exact=False, noise=None, generator=None):
    """R1 (x real) / R2 (x fake), Eq. 13 finite-difference form, with n ~ N(0, I):
        R(x) = E_n[ (D(x + eps n) - D(x))^2 ] / eps^2  ->  ||grad_x D(x)||^2  as eps -> 0
    (E[(g . n)^2] = ||g||^2; one n per sample in training, more for a tighter estimate).
    exact=True: ||grad_x D(x)||^2 by autograd (double backward when the loss is minimised).
    D maps (B, ...) -> (B,); returns the batch mean."""
    x = x.detach()
    if exact:
        # the fused attention kernel has no double backward: record this graph with the math kernel
        with sdpa_kernel([SDPBackend.MATH]):
            x = x.requires_grad_(True)
            (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        return g.pow(2).flatten(1).sum(1).mean()
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if noise is None else noise
    return ((D(x + eps * n) - D(x)) ** 2).mean() / eps ** 2


def _gan_pair(x_real, x_fake, t, generator):
    """Re-noise real and fake clips to the same per-sample t (fresh noise each) for the critic."""
    tb = t.view(-1, 1, 1, 1, 1)
    noisy = lambda x: (1 - tb) * x + tb * torch.randn(x.shape, generator=generator).to(x)
    return noisy(x_real), noisy(x_fake)


# ==============================================================================================
# The DMD + RpGAN loop: one critic update, one generator update
# ==============================================================================================
class DMDTrainer:
    """Everything Self-Forcing DMD + progressive RpGAN trains and draws from: the student (generator),
    the critic (fake score) with its discriminator head, their optimizers, the student's EMA and one
    noise generator. real_score(x_t, t, text, mask) -> guided velocity (make_real_score)."""

    LOGS = ("dmd", "critic", "gan_d", "gan_g", "r1", "r2")

    def __init__(self, student, real_score, critic, cfg: DMDConfig):
        if cfg.gan_real_steps <= cfg.n_steps and cfg.gan_weight > 0:
            raise ValueError(f"progressive GAN needs T' = gan_real_steps > n_steps, got {cfg.gan_real_steps} <= {cfg.n_steps}")
        self.student, self.real_score, self.critic, self.cfg = student, real_score, critic, cfg
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.shape = (student.cfg.in_channels, *cfg.latent_hw)                  # (C, h, w)
        self.ts = flow.few_step_schedule(cfg.n_steps, cfg.shift)                # T steps (fake for the GAN)
        self.ts_real = flow.few_step_schedule(cfg.gan_real_steps, cfg.shift)    # T' steps (real for the GAN)
        # The head's initial weights come from cfg.seed, not from the global RNG: whatever ran earlier in
        # the process (other stages, or none after a resume), the same seed gives the same student.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + HEAD_SEED_OFFSET)
            self.head = DiscHead(critic.cfg.dim).to(next(critic.parameters()).device)
        self.opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr_g, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.c_params = list(critic.parameters()) + list(self.head.parameters())
        self.opt_c = torch.optim.AdamW(self.c_params, lr=cfg.lr_c, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = EMA(student, cfg.ema)
        self.log = {k: [] for k in self.LOGS}

    # --- the state a checkpoint holds (resume.py) ------------------------------------------------
    def state_dict(self):
        return {"student": self.student.state_dict(), "critic": self.critic.state_dict(),
                "head": self.head.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_c": self.opt_c.state_dict(),
                "ema": self.ema.shadow, "log": self.log, "generator": self.g.get_state()}

    def load_state_dict(self, state):
        for key in ("student", "critic", "head", "opt_g", "opt_c"):
            getattr(self, key).load_state_dict(state[key])
        self.ema.shadow = {k: v.to(self.ema.shadow[k]) for k, v in state["ema"].items()}   # onto the device
        self.log = state["log"]
        self.g.set_state(state["generator"])

    # --- pieces ----------------------------------------------------------------------------------
    def simulate(self, text, mask, ts, **kw):
        """The student's own clip, chunk after chunk on its own cache (Self-Forcing): (B, C, T, h, w)."""
        return rollout(self.student, text, mask, self.cfg.n_chunks, ts, self.shape, self.g, t_ctx=self.cfg.t_ctx, **kw)

    @torch.no_grad()
    def gan_real(self, text, mask):
        """The GAN's "real" clips: the student's own T'-step backward simulation, no gradients."""
        return self.simulate(text, mask, self.ts_real, exit_step=len(self.ts_real) - 1)

    def _frames(self, t):
        """One t per clip (B,) -> per latent frame (B, T)."""
        return t[:, None].expand(t.shape[0], self.cfg.n_chunks * chunk_frames(self.student))

    def D(self, x_t, t, text, mask):
        """Discriminator logit (B,) of noisy clips: the head on the critic's middle features."""
        return self.head(critic_features(self.critic, x_t, self._frames(t), text, mask))

    def gan_terms(self, x_real, x_fake, text, mask):
        """Eq. 14 on a fresh t, real and fake re-noised to it: (L_D, L_G, t, n_real, n_fake)."""
        t = _dmd_t(x_fake.shape[0], self.cfg, self.g).to(x_fake.device)         # (B,)
        n_real, n_fake = _gan_pair(x_real, x_fake, t, self.g)
        L_D, L_G = rpgan_losses(self.D(n_real, t, text, mask), self.D(n_fake, t, text, mask))
        return L_D, L_G, t, n_real, n_fake

    # --- the two updates -------------------------------------------------------------------------
    def critic_update(self, text, mask, x_real=None):
        """The fake score follows the generator: flow matching on a fresh sample of it; with the GAN
        on (x_real given), + gan_weight (L_D + r1_weight R1 + r2_weight R2), Eq. 13-14."""
        cfg = self.cfg
        with torch.no_grad():
            x_fake = self.simulate(text, mask, self.ts)                         # (B, C, T, h, w)
        loss = critic_fm_loss(self.critic, x_fake, text, mask, self.g)
        self.log["critic"].append(loss.item())
        if x_real is not None:
            L_D, _, t, n_real, n_fake = self.gan_terms(x_real, x_fake, text, mask)
            D = lambda x: self.D(x, t, text, mask)
            r1 = r_penalty(D, n_real, cfg.eps, cfg.exact_r1, generator=self.g)  # Eq. 13 on real
            r2 = r_penalty(D, n_fake, cfg.eps, cfg.exact_r1, generator=self.g)  # Eq. 13 on fake
            loss = loss + cfg.gan_weight * (L_D + cfg.r1_weight * r1 + cfg.r2_weight * r2)
            for k, v in (("gan_d", L_D), ("r1", r1), ("r2", r2)):
                self.log[k].append(v.item())
        optimizer_step(self.opt_c, loss, self.c_params, cfg.clip)

    def generator_update(self, text, mask, x_real=None):
        """L_DMD on the student's own clip (gradients at the rollout's exit step); with the GAN on,
        + gan_weight L_G (Eq. 14). The critic and head are frozen for it; then the EMA."""
        cfg = self.cfg
        self.critic.requires_grad_(False)
        self.head.requires_grad_(False)                                         # L_G trains the generator only
        x0 = self.simulate(text, mask, self.ts)                                 # (B, C, T, h, w), grad at exit steps
        loss = dmd_loss(x0, lambda x, t: self.real_score(x, self._frames(t), text, mask),
                        lambda x, t: self.critic(x, self._frames(t), text, mask, causal=True),
                        _dmd_t(x0.shape[0], cfg, self.g).to(x0.device), torch.randn(x0.shape, generator=self.g).to(x0))
        self.log["dmd"].append(loss.item())
        if x_real is not None:
            _, L_G, _, _, _ = self.gan_terms(x_real, x0, text, mask)
            loss = loss + cfg.gan_weight * L_G
            self.log["gan_g"].append(L_G.item())
        optimizer_step(self.opt_g, loss, list(self.student.parameters()), cfg.clip)
        self.critic.requires_grad_(True)
        self.head.requires_grad_(True)
        self.ema.update(self.student)

    def metrics(self):
        m = {f"{k}_last": (v[-1] if v else None) for k, v in self.log.items()}
        return {**m, "curves": self.log, "config": asdict(self.cfg)}


def train_dmd(student, real_score, critic, batch_fn_text, cfg: DMDConfig, progress=True, ckpt=None, ckpt_every_s=180.0):
    """Self-Forcing DMD with progressive RpGAN. batch_fn_text(step) -> (text, mask, null_text, null_mask)
    (the null prompt is baked into real_score, see make_real_score). critic: trainable copy of the
    student architecture (the fake score), initialised from the pretrained / KD student.
    `critic_warmup` critic updates first; then per step `critic_updates` critic updates and one
    generator update (DMDTrainer), the GAN on from step gan_start. Self-Forcing starts it from an
    ODE-initialised student: call ode_init(student, real_score, ...) first (train.py's dmd stage does).
    Returns (EMA student, metrics). ckpt: a file saved every ckpt_every_s seconds and resumed from,
    bit-identically (resume.py); one counter runs through the warm-up and then the DMD steps."""
    tr = DMDTrainer(student, real_score, critic, cfg)
    saver = Checkpoint(ckpt, ckpt_every_s)
    start, state = saver.load()                                                # start counts warm-up + DMD updates
    if state:
        tr.load_state_dict(state)
    for i in tqdm(range(min(start, cfg.critic_warmup), cfg.critic_warmup), desc="critic warm-up", disable=not progress):
        tr.critic_update(*batch_fn_text(WARMUP_BATCHES + i)[:2])
        saver.maybe_save(i + 1, tr.state_dict)
    first = max(0, start - cfg.critic_warmup)
    bar = tqdm(range(first, cfg.steps), desc="dmd", disable=not progress, initial=first, total=cfg.steps)
    for step in bar:
        text, mask = batch_fn_text(step)[:2]
        gan_on = cfg.gan_weight > 0 and step >= cfg.gan_start
        x_real = tr.gan_real(text, mask) if gan_on else None                    # (B, C, T, h, w)
        for _ in range(cfg.critic_updates):
            tr.critic_update(text, mask, x_real)
        tr.generator_update(text, mask, x_real)
        bar.set_postfix(dmd=f"{tr.log['dmd'][-1]:.4f}", critic=f"{tr.log['critic'][-1]:.4f}", gan=int(gan_on))
        saver.maybe_save(cfg.critic_warmup + step + 1, tr.state_dict)
    saver.finish()
    return ema_result(student, tr.ema), tr.metrics()


# ==============================================================================================
# Demo
# ==============================================================================================
def _demo():
    torch.manual_seed(0)
    torch.set_num_threads(1)                                         # tiny models: threads cost more than they give
    # 1. DMD on 2-D Gaussians: real N(mu_r, I), generator x = mu_g + z, fake score N(mu_g, I) exact.
    mu_r, mu_g = torch.tensor([1.0, -1.0]), torch.tensor([4.0, 2.0], requires_grad=True)
    opt, g = torch.optim.SGD([mu_g], lr=0.5), torch.Generator().manual_seed(0)
    d0 = (mu_g - mu_r).norm().item()
    for _ in range(200):
        x0 = mu_g + torch.randn(256, 2, generator=g)
        t = 0.02 + 0.96 * torch.rand(256, generator=g)
        loss = dmd_loss(x0, flow.gaussian_velocity(mu_r, 1.0), flow.gaussian_velocity(mu_g.detach(), 1.0),
                        t, torch.randn(256, 2, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    d1 = (mu_g - mu_r).norm().item()
    print(f"DMD on 2-D Gaussians: |mu_g - mu_r| {d0:.3f} -> {d1:.3f}")
    assert d1 < 0.2 * d0
    # 2. Tiny pipeline: teacher tuples -> KD (Eq. 12) -> DMD + GAN, 2 updates each (the tuples on
    #    disk, as the pipeline keeps them: kdcache.py).
    dcfg = dit.get_config("tiny", depth=6)
    teacher, student = dit.MoETeacher(dcfg), sandwich.S2DiT(dcfg, (1, 0, 1))
    for p in teacher.parameters():                                   # a fresh DiT outputs v = 0: give it a function
        nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    null_t, null_m = torch.zeros(1, 4, dcfg.text_dim), torch.ones(1, 4, dtype=torch.bool)
    data = lambda k: (torch.randn(2, 4, 9, 8, 8), torch.randn(2, 4, dcfg.text_dim), torch.ones(2, 4, dtype=torch.bool), null_t, null_m)
    scale, kcfg = flow.get_config("tiny").cfg_scale, get_kd_config("tiny")
    opt = torch.optim.AdamW(student.parameters(), lr=kcfg.lr, weight_decay=kcfg.weight_decay)
    for k in range(2):
        kd = kd_loss(student, teacher_tuples(teacher, *data(k), teacher.boundary, scale, g), kcfg.w_l, kcfg.w_h)
        optimizer_step(opt, kd, list(student.parameters()), kcfg.clip)
    cfg = get_config("tiny", steps=2, gan_start=1, n_chunks=2)
    real = make_real_score(teacher, null_t, null_m, scale)
    ar, m = train_dmd(student, real, copy.deepcopy(student), lambda s: data(s)[1:], cfg, progress=False)
    print(f"KD loss {kd.item():.4f}; DMD {m['dmd_last']:.4f}, "
          f"L_D {m['gan_d_last']:.4f}, L_G {m['gan_g_last']:.4f}, R1 {m['r1_last']:.4f}")
    with torch.no_grad():
        video = rollout(ar, torch.randn(1, 4, dcfg.text_dim), torch.ones(1, 4, dtype=torch.bool), 2,
                        flow.few_step_schedule(2, 3.0), (4, 8, 8), torch.Generator().manual_seed(0))
    print(f"rollout of the distilled student: {tuple(video.shape)}")
    assert video.shape == (1, 4, 6, 8, 8) and torch.isfinite(video).all()


if __name__ == "__main__":
    _demo()
