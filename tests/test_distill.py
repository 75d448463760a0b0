"""distill.py: Eq. 12 by hand, the KD cache (round trip, corruption, resume), DMD on Gaussians,
Eq. 13 finite differences, gradient routing in the Self-Forcing rollout, EMA, rollout determinism."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import dit
import distill
import flow
import kdcache
import runs
import sandwich
import streaming
import text as text_mod
import train


class Toy(nn.Module):
    """V(x, t, e) = a x + b t + c sum(e * mask): every output computable by hand."""

    class cfg:
        chunk = 3

    def __init__(self, a=0.5, b=-1.0, c=0.1):
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.tensor(v)) for v in (a, b, c))

    def forward(self, x, t, text, mask, causal=True, state=None, window=None):
        e = (text * mask[..., None]).sum((1, 2))                                 # (B,)
        return self.a * x + self.b * t[:, None, :, None, None] + self.c * e[:, None, None, None, None]


def toy_data(k, B=2, L=3, Dt=4):
    g = torch.Generator().manual_seed(100 + k)
    return (torch.randn(B, 2, 6, 2, 2, generator=g), torch.randn(B, L, Dt, generator=g),
            torch.ones(B, L, dtype=torch.bool), torch.zeros(1, L, Dt), torch.ones(1, L, dtype=torch.bool))


def tiny_s2dit(seed=0):
    cfg = dit.get_config("tiny", dim=16, depth=4, heads=2, text_dim=8, freq_dim=16)
    torch.manual_seed(seed)
    model = sandwich.S2DiT(cfg, (1, 1))
    for p in model.parameters():                                                 # non-trivial function
        if p.dim() > 1:
            nn.init.normal_(p, std=0.1)
    return model


def text_inputs(B=1, L=3, Dt=8):
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, L, Dt, generator=g), torch.ones(B, L, dtype=torch.bool)


# ---------------------------------------------------------------------------------------- Eq. 12
def test_kd_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, C, T = 2, 1, 3
    batch = {"text": torch.randn(B, 2, 3, generator=g), "mask": torch.tensor([[True, True], [True, False]])}
    for s in "lh":
        batch[f"t_{s}"] = torch.rand(B, T, generator=g)
        batch[f"n_{s}"] = torch.randn(B, C, T, 1, 1, generator=g)
        batch[f"v_{s}"] = torch.randn(B, C, T, 1, 1, generator=g)
    st = Toy(0.3, 0.7, -0.2)
    w_l, w_h = 0.25, 0.75
    got = distill.kd_loss(st, batch, w_l, w_h).item()
    total = 0.0
    for i in range(B):                                                          # plain Python floats
        e = sum(batch["text"][i, j].sum().item() for j in range(2) if batch["mask"][i, j])
        for s, w in (("l", w_l), ("h", w_h)):
            err = [(batch[f"v_{s}"][i, 0, f, 0, 0].item() - (0.3 * batch[f"n_{s}"][i, 0, f, 0, 0].item()
                    + 0.7 * batch[f"t_{s}"][i, f].item() - 0.2 * e)) ** 2 for f in range(T)]
            total += w * sum(err) / T
    assert got == pytest.approx(total / B, rel=1e-5)


# ---------------------------------------------------------------------------------------- the cache
def build(d, teacher=None, n=5, calls=None):
    teacher = teacher or Toy()
    def fn(k):
        if calls is not None:
            calls.append(k)
        return toy_data(k)
    return kdcache.build_cache(teacher, fn, n, str(d), shard_size=2, boundary=0.5, cfg_scale=2.0, seed=3, progress=False)


def test_cache_round_trip(tmp_path):
    teacher = Toy()
    info = build(tmp_path, teacher)
    assert info["shards"] == 3 and info["built"] == 3 and info["cache_bytes"] > 0
    cache = kdcache.CachedKD(str(tmp_path))
    assert len(cache) == 5
    with open(tmp_path / "index.json") as f:
        assert [s["count"] for s in json.load(f)["shards"]] == [2, 2, 1]
    b = cache.collate(range(5))
    raw = [torch.load(tmp_path / f"shard_{k:05d}.pt", weights_only=True) for k in range(3)]
    for key in distill.KD_KEYS:
        assert torch.equal(b[key], torch.cat([r[key] for r in raw]))
    assert (b["t_h"] >= 0.5).all() and (b["t_l"] < 0.5).all()                 # each expert's side
    assert torch.equal(b["t_h"][:, :3], b["t_h"][:, :1].expand(-1, 3))          # one t per chunk
    null, null_m = toy_data(0)[3:]
    for s in "hl":                                                              # v is the teacher's CFG velocity
        v = flow.cfg_predict(teacher, b[f"n_{s}"], b[f"t_{s}"], b["text"], b["mask"], null, null_m, 2.0)
        assert torch.allclose(v, b[f"v_{s}"], atol=1e-6)
    info2 = build(tmp_path / "again", teacher)                                  # same seed -> same bytes
    with open(tmp_path / "index.json") as f1, open(tmp_path / "again" / "index.json") as f2:
        assert [s["sha256"] for s in json.load(f1)["shards"]] == [s["sha256"] for s in json.load(f2)["shards"]]
    assert info2["cache_bytes"] == info["cache_bytes"]


def test_flipped_byte_is_detected(tmp_path):
    build(tmp_path)
    path = tmp_path / "shard_00001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = kdcache.CachedKD(str(tmp_path))
    cache[0]                                                                    # shard 0 is intact
    with pytest.raises(RuntimeError, match=r"shard_00001\.pt.*re-run the `cache` stage"):
        cache[2]


def test_truncated_shard_is_detected(tmp_path):
    build(tmp_path)
    path = tmp_path / "shard_00000.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"shard_00000\.pt.*(corrupt|truncated)"):
        kdcache.CachedKD(str(tmp_path)).verify_all()


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        kdcache.CachedKD(str(tmp_path))


def test_resume_skips_complete_shards(tmp_path):
    build(tmp_path)
    s0, s1 = tmp_path / "shard_00000.pt", tmp_path / "shard_00001.pt"
    mtime0, bytes1 = os.stat(s0).st_mtime_ns, s1.read_bytes()
    s1.unlink()                                                                 # an interrupted / lost shard
    calls = []
    info = build(tmp_path, calls=calls)
    assert calls == [1] and info["built"] == 1 and info["skipped"] == 2
    assert os.stat(s0).st_mtime_ns == mtime0                                    # untouched
    assert s1.read_bytes() == bytes1                                            # rebuilt bit for bit
    kdcache.CachedKD(str(tmp_path)).verify_all()


def test_kd_speed_comparison_reports_both(tmp_path):
    build(tmp_path)
    res = kdcache.kd_speed_comparison(Toy(), Toy(), kdcache.CachedKD(str(tmp_path)), toy_data, steps=2)
    for k in ("cached", "on_the_fly"):
        assert res[k]["steps_per_s"] > 0 and res[k]["peak_rss_delta_mb"] >= 0
    assert res["speedup"] > 0 and res["weights_ratio"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------- DMD
def run_gaussian_dmd(sign, steps=150):
    """Real N(mu_r, I); generator x = mu_g + z; fake score = exact score of N(mu_g, I)."""
    mu_r = torch.tensor([1.0, -1.0])
    mu_g = torch.tensor([4.0, 2.0], requires_grad=True)
    opt, g = torch.optim.SGD([mu_g], lr=0.5), torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0 = mu_g + torch.randn(128, 2, generator=g)
        t = 0.02 + 0.96 * torch.rand(128, generator=g)
        loss = distill.dmd_loss(x0, flow.gaussian_velocity(mu_r, 1.0), flow.gaussian_velocity(mu_g.detach(), 1.0),
                                t, torch.randn(128, 2, generator=g))
        opt.zero_grad()
        (sign * loss).backward()
        opt.step()
    return (mu_g - mu_r).norm().item()


def test_dmd_moves_generator_toward_real():
    d0 = (torch.tensor([4.0, 2.0]) - torch.tensor([1.0, -1.0])).norm().item()
    assert run_gaussian_dmd(+1) < 0.1 * d0
    assert run_gaussian_dmd(-1, steps=20) > 2 * d0                             # wrong sign runs away


def test_dmd_gradient_is_zero_when_fake_equals_real():
    x0 = torch.randn(4, 2, requires_grad=True)
    v = flow.gaussian_velocity(0.0, 1.0)
    distill.dmd_loss(x0, v, v, torch.full((4,), 0.5), torch.randn(4, 2)).backward()
    assert x0.grad.abs().max() == 0


# ---------------------------------------------------------------------------------------- Eq. 13
def test_finite_difference_r1_approaches_exact():
    torch.manual_seed(0)
    a = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    D = lambda x: (a * torch.tanh(x)).sum(-1)                                   # (B, 4) -> (B,)
    x = torch.tensor([[0.3, -0.7, 1.1, 0.2]], dtype=torch.float64)
    exact = (a * (1 - torch.tanh(x) ** 2)).pow(2).sum().item()                  # ||grad D||^2 by hand
    assert distill.r_penalty(D, x, exact=True).item() == pytest.approx(exact, rel=1e-12)
    M = 100_000                                                                 # E over directions n ~ N(0, I)
    xs = x.expand(M, 4)
    n = torch.randn(M, 4, dtype=torch.float64)
    g_dot_n = ((a * (1 - torch.tanh(x) ** 2)) * n).sum(-1).pow(2).mean().item()  # same directions, exact
    errs = [abs(distill.r_penalty(D, xs, eps, noise=n).item() - g_dot_n) for eps in (1e-1, 1e-2, 1e-3)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * exact
    fd = distill.r_penalty(D, xs, 1e-3, noise=n).item()
    assert abs(fd - exact) / exact < 0.02                                       # Monte Carlo over n


def test_rpgan_losses_are_relativistic():
    d_real, d_fake = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    L_D, L_G = distill.rpgan_losses(d_real, d_fake)
    sp = lambda z: torch.log1p(torch.exp(torch.tensor(z))).item()
    assert L_D.item() == pytest.approx((sp(-2.0) + sp(1.0)) / 2)
    assert L_G.item() == pytest.approx((sp(2.0) + sp(-1.0)) / 2)


# ---------------------------------------------------------------------------------------- rollout
class Recorder(nn.Module):
    """Wraps a model; records per call whether grad was on, and whether x carried a graph."""

    def __init__(self, model):
        super().__init__()
        self.m, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x, t, *a, **k):
        self.calls.append((torch.is_grad_enabled(), x.grad_fn is not None, k["state"].commit))
        return self.m(x, t, *a, **k)


def test_rollout_gradients_reach_only_the_exit_step():
    model = Recorder(tiny_s2dit())
    text, mask = text_inputs()
    ts = flow.few_step_schedule(4, 3.0)
    out = streaming.rollout(model, text, mask, 2, ts, (4, 4, 4), torch.Generator().manual_seed(0), exit_step=2)
    grad_calls = [c for c in model.calls if c[0]]
    assert len(model.calls) == 2 * (3 + 1)                                       # 3 steps + 1 commit per chunk
    assert len(grad_calls) == 2 and all(not c[2] for c in grad_calls)           # the 2 exits, no commit
    assert not any(c[1] for c in model.calls)                                   # inputs never carry a graph
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.m.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert sum(g.abs().sum() > 0 for g in grads.values()) > 0.9 * len(grads)
    assert grads["groups.0.0.cross.kv.weight"].abs().sum() > 0                  # prompt K/V recomputed with grad


def test_rollout_shape_and_seed():
    model = tiny_s2dit()
    text, mask = text_inputs(B=2)
    ts = flow.few_step_schedule(2, 3.0)
    with torch.no_grad():
        run = lambda s: streaming.rollout(model, text, mask, 3, ts, (4, 4, 4), torch.Generator().manual_seed(s))
        a, b, c = run(1), run(1), run(2)
    assert a.shape == (2, 4, 9, 4, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rollout_uses_its_cache():
    """Chunk 2 depends on chunk 1 only through the cache: a larger context t_ctx changes it."""
    model = tiny_s2dit()
    text, mask = text_inputs()
    ts = flow.few_step_schedule(1, 3.0)
    with torch.no_grad():
        run = lambda t_ctx: streaming.rollout(model, text, mask, 2, ts, (4, 4, 4), torch.Generator().manual_seed(0), t_ctx=t_ctx)
        a, b = run(0.0), run(0.5)
    assert torch.equal(a[:, :, :3], b[:, :, :3]) and not torch.allclose(a[:, :, 3:], b[:, :, 3:])


# ---------------------------------------------------------------------------------------- generic pieces
def test_ema_matches_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = flow.EMA(model, decay=0.9)
    expect = {k: p.detach().clone() for k, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, p in model.named_parameters():
            expect[k] = 0.9 * expect[k] + (1 - 0.9) * p.detach()
    for k in expect:
        assert torch.allclose(ema.shadow[k], expect[k], atol=1e-7, rtol=0)
    copy_ = copy.deepcopy(model)
    ema.copy_to(copy_)
    assert torch.equal(copy_.weight, ema.shadow["weight"])


def test_fm_loss_cfg_dropout():
    x0, text, mask, null, null_m = toy_data(0)
    seen = []

    class Spy(Toy):
        def forward(self, x, t, text, mask, **k):
            seen.append(text.clone())
            return super().forward(x, t, text, mask)
    for p, expect in ((1.0, null.expand_as(text)), (0.0, text)):
        seen.clear()
        flow.fm_loss(Spy(), x0, text, mask, null, null_m, p_uncond=p, generator=torch.Generator().manual_seed(0))
        assert torch.equal(seen[0], expect)


@pytest.mark.parametrize("exact_r1", [False, True])
def test_train_dmd_smoke(exact_r1):
    student = tiny_s2dit()
    text, mask = text_inputs()
    null, null_m = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    real = distill.make_real_score(tiny_s2dit(seed=1), null, null_m, 2.0)
    cfg = distill.get_config("tiny", steps=2, gan_start=1, n_chunks=1, latent_hw=(4, 4), lr_g=1e-2,
                             exact_r1=exact_r1)
    before = copy.deepcopy(student.state_dict())
    ema, m = distill.train_dmd(student, real, copy.deepcopy(student), lambda s: (text, mask, null, null_m), cfg, progress=False)
    assert all(m[f"{k}_last"] is not None and m[f"{k}_last"] == m[f"{k}_last"] for k in ("dmd", "critic", "gan_d", "gan_g", "r1", "r2"))
    assert len(m["curves"]["gan_g"]) == 1                                       # GAN on from step 1 only
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert ema is not student                                                   # the EMA copy is returned
    with pytest.raises(ValueError, match="gan_real_steps"):
        distill.train_dmd(student, real, student, None, distill.get_config("tiny", gan_real_steps=2), progress=False)


@pytest.mark.parametrize("n_steps", [None, 4])
def test_dmd_stage_distils_one_student_for_its_step_count(tmp_path, monkeypatch, n_steps):
    """train.py's `dmd` stage distils the student for cfg.sample_steps (n_steps=None); reproduce.py's
    dmd_4step passes 4. Every rollout that trains it runs that schedule (or the GAN's longer T' one),
    and the checkpoint records that one count, the only one stream.py will run it at."""
    cfg = train.get_config("tiny", dmd_steps=2)                                 # GAN on from update 1
    run = runs.Run(str(tmp_path), cfg)
    dcfg = dit.get_config("tiny", depth=4)
    encoder, tokenizer, _ = text_mod.build_text("tiny", seed=0)
    torch.manual_seed(0)
    run._cache.update({"kd": sandwich.S2DiT(dcfg, (1, 1)), "teacher": dit.MoETeacher(dcfg),   # stages held in memory
                       "text": (encoder.eval(), tokenizer),
                       "pool": (torch.randn(4, dcfg.in_channels, 9, 8, 8), ["a red circle moves left"] * 4)})
    schedules, rollout = [], distill.rollout

    def spy(model, text, mask, n_chunks, ts, *a, **k):
        schedules.append(list(ts))
        return rollout(model, text, mask, n_chunks, ts, *a, **k)
    monkeypatch.setattr(distill, "rollout", spy)
    m = train.stage_dmd(run, name="student", n_steps=n_steps)
    T = n_steps or cfg.sample_steps                                             # the pipeline's: 2
    T_real = m["config"]["gan_real_steps"]
    assert T_real > T                                                           # the tiny preset's T' = 4 grows for T = 4
    shift = flow.get_config("tiny").shift
    assert all(ts in (flow.few_step_schedule(T, shift), flow.few_step_schedule(T_real, shift)) for ts in schedules)
    per_update = m["config"]["critic_updates"] + 1                              # critic rollouts + the generator's
    assert schedules.count(flow.few_step_schedule(T, shift)) == per_update * cfg.dmd_steps
    blob = torch.load(run.path("student.pt"), weights_only=True)
    assert m["config"]["n_steps"] == T and m["steps"] == (T,) and blob["config"]["steps"] == (T,)


# ------------------------------------------------------------------- ODE-regression initialisation
def test_ode_trajectories_are_euler_states_at_the_students_times():
    """For dx/dt = a x, Euler's states are products of (1 + a dt): the kept states must be the ones at
    the student's times, the first is the noise itself, the last output is the ODE's end."""
    a, shift, ode_steps = 0.7, 3.0, 8
    real = lambda x, t, text, mask: a * x
    text, mask = text_inputs(B=2)
    ts = flow.few_step_schedule(4, shift)
    xs, x0 = distill.ode_trajectories(real, text, mask, (2, 3, 3), 6, ts, ode_steps, shift, torch.Generator().manual_seed(0))
    assert xs.shape == (2, 4, 2, 6, 3, 3) and x0.shape == (2, 2, 6, 3, 3)
    grid = flow.euler_schedule(ode_steps, shift)
    factor = lambda j: torch.tensor([1 + a * (grid[i + 1] - grid[i]) for i in range(j)]).prod()
    noise = xs[:, 0]
    for i in range(4):                                                          # t_i sits at grid index 2 i
        assert abs(grid[2 * i] - ts[i]) < 1e-6
        torch.testing.assert_close(xs[:, i], noise * factor(2 * i))
    torch.testing.assert_close(x0, noise * factor(ode_steps))
    with pytest.raises(ValueError, match="multiple"):
        distill.ode_trajectories(real, text, mask, (2, 3, 3), 6, ts, 6, shift, torch.Generator())


def test_ode_init_teaches_the_student_the_real_scores_ode():
    """A few regression updates on a handful of trajectories of a (random) real score cut the student's
    chunk-by-chunk regression error on them, and the student's own 2-step streaming output moves
    toward the ODE's end from the same noise."""
    student = tiny_s2dit()
    text, mask = text_inputs()
    null, null_m = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    real = distill.make_real_score(tiny_s2dit(seed=1), null, null_m, 2.0)
    cfg = distill.get_config("tiny", n_chunks=2, latent_hw=(4, 4), ode_pairs=2, ode_steps=4, ode_updates=40,
                             ode_batch=2, ode_lr=3e-3, shift=3.0)
    ts = flow.few_step_schedule(cfg.n_steps, cfg.shift)
    g = torch.Generator().manual_seed(5)                                        # ode_init's pairs: same generator,
    pairs = [distill.ode_trajectories(real, text, mask, (student.cfg.in_channels, 4, 4), 6, ts,  # same order
                                      cfg.ode_steps, cfg.shift, g) for _ in range(2)]
    xs, x0 = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def errors():
        with torch.no_grad():
            reg = distill.ode_regression_loss(student, xs, x0, text.expand(2, -1, -1), mask.expand(2, -1), ts).item()
            state, outs = dit.StreamState(student.cfg.window), []
            for f0 in (0, 3):
                out = streaming.denoise_chunk(student, state, xs[:1, 0, :, f0:f0 + 3], text, mask, ts,
                                            torch.Generator().manual_seed(1))
                streaming.commit_chunk(student, state, out, text, mask)
                outs.append(out)
            return reg, (torch.cat(outs, 2) - x0[:1]).pow(2).mean().item()
    reg0, gen0 = errors()
    m = distill.ode_init(student, real, lambda s: (text, mask), cfg, torch.Generator().manual_seed(5), progress=False)
    reg1, gen1 = errors()
    assert m["ode_pairs"] == 2 and m["ode_loss_last"] < m["ode_loss_first"]
    assert reg1 < 0.5 * reg0, (reg0, reg1)
    assert gen1 < gen0, (gen0, gen1)


def test_ode_init_killed_and_resumed_equals_uninterrupted(tmp_path):
    """ode_init saves itself in both phases (the pairs so far; then the student, its optimizer and the
    noise generator) and resumes where it stopped: killed while making pairs, and killed again inside
    the regression, it ends with the uninterrupted run's student, bit for bit."""
    text, mask = text_inputs()
    null, null_m = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    real = distill.make_real_score(tiny_s2dit(seed=1), null, null_m, 2.0)
    cfg = distill.get_config("tiny", n_chunks=2, latent_hw=(4, 4), ode_pairs=3, ode_steps=4, ode_updates=6,
                             ode_batch=2, ode_lr=3e-3, shift=3.0)

    class Kill(Exception):
        pass

    def fit(ckpt=None, kill=None, seed=0):
        student, calls = tiny_s2dit(seed=seed), []

        def prompts(s):                                   # killed at the `kill`-th prompt batch
            calls.append(s)
            if len(calls) == kill:
                raise Kill
            return text, mask
        loss_fn = distill.ode_regression_loss

        def regression(*a):                               # killed before regression update `kill` - 100
            if kill is not None and kill > 100 and regression.n == kill - 100:
                raise Kill
            regression.n += 1
            return loss_fn(*a)
        regression.n = 0
        distill.ode_regression_loss = regression
        try:
            distill.ode_init(student, real, prompts, cfg, torch.Generator().manual_seed(5), progress=False,
                             ckpt=ckpt, ckpt_every_s=0.0)
        finally:
            distill.ode_regression_loss = loss_fn
        return student

    whole = fit()
    ckpt = str(tmp_path / "ode.ckpt.pt")
    with pytest.raises(Kill):
        fit(ckpt, kill=2)                                 # inside the pairs: 1 of 3 made
    with pytest.raises(Kill):
        fit(ckpt, kill=103)                               # inside the regression: 3 of 6 updates (the stage's
                                                          # student is the same KD copy at every start)
    resumed = fit(ckpt, seed=2)                           # other initial weights: only the checkpoint can make it equal
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert not os.path.exists(ckpt)                       # removed once the stage is done


def test_get_config_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        distill.get_config("huge")


# ---------------------------------------------------------------------------------------- resumable flow matching
def test_train_fm_killed_and_resumed_equals_uninterrupted(tmp_path):
    """A long flow-matching stage saves itself (model, optimizer, EMA, noise generator, step) and resumes
    where it stopped: killed after 3 of 6 updates and run again, it gives the same weights, bit for bit."""
    def fit(ckpt=None, kill_at=None, init_seed=1):
        model = tiny_s2dit(seed=init_seed)
        batch_fn = lambda step: toy_inputs(step)                                 # noqa: E731

        def hook(step, _):
            if step == kill_at:
                raise KeyboardInterrupt                                          # as if the process died here
        return flow.train_fm(model, batch_fn, 6, 1e-3, seed=3, ema_decay=0.9, progress=False, warmup=2,
                                decay="cosine", ckpt=ckpt, ckpt_every_s=0.0, hook=hook, hook_every=1)[0]

    def toy_inputs(step):
        g = torch.Generator().manual_seed(step)
        text, mask = text_inputs()
        return (torch.randn(1, 4, 3, 4, 4, generator=g), text, mask, torch.zeros_like(text), mask)

    reference = fit()
    ckpt = str(tmp_path / "fm.ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, kill_at=4)                       # the checkpoint of update 3 is on disk
    assert os.path.exists(ckpt)
    resumed = fit(ckpt, init_seed=2)               # other initial weights: only the checkpoint can make it equal
    assert not os.path.exists(ckpt)                # removed once the loop has finished
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_lr_factor_warmup_then_cosine():
    assert flow.lr_factor(0, 4, 100, "none") == 0.25 and flow.lr_factor(50, 4, 100, "none") == 1.0
    assert flow.lr_factor(4, 4, 100, "cosine") == pytest.approx(1.0)
    assert flow.lr_factor(100, 4, 100, "cosine") == pytest.approx(0.1)
    assert 0.1 < flow.lr_factor(52, 4, 100, "cosine") < 1.0


def test_train_kd_killed_and_resumed_equals_uninterrupted(tmp_path):
    build(tmp_path / "cache")
    cache = kdcache.CachedKD(str(tmp_path / "cache"))
    cfg = distill.get_kd_config("tiny", steps=5, batch=2)

    def fit(ckpt=None, kill_at=None, a=0.5):
        student = Toy(a=a)
        if kill_at is not None:                                                 # die before update kill_at
            orig = distill.kd_loss
            calls = []

            def dying(*args):
                calls.append(1)
                if len(calls) > kill_at:
                    raise KeyboardInterrupt
                return orig(*args)
            distill.kd_loss = dying
        try:
            return distill.train_kd(student, cache, cfg, progress=False, ckpt=ckpt, ckpt_every_s=0.0)[0]
        finally:
            if kill_at is not None:
                distill.kd_loss = orig

    whole = fit()
    ckpt = str(tmp_path / "kd.ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, kill_at=3)
    resumed = fit(ckpt, a=0.9)                                                   # other start: only the checkpoint can make it equal
    for (k, x), y in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k


def test_train_dmd_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Self-Forcing DMD saves itself (student, critic, discriminator head, both optimizers, EMA,
    generator, logs) and resumes where it stopped, through the critic warm-up and the GAN phase."""
    text, mask = text_inputs()
    null, null_m = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    cfg = distill.get_config("tiny", steps=4, gan_start=2, n_chunks=1, latent_hw=(4, 4), critic_warmup=2)

    def fit(ckpt=None, kill_at=None, init_seed=0):
        def batch(step):
            if step == kill_at:
                raise KeyboardInterrupt                                          # as if the process died here
            return text, mask, null, null_m
        student = tiny_s2dit(seed=init_seed)
        real = distill.make_real_score(tiny_s2dit(seed=1), null, null_m, 2.0)
        return distill.train_dmd(student, real, copy.deepcopy(student), batch, cfg, progress=False,
                                 ckpt=ckpt, ckpt_every_s=0.0)

    reference, m_ref = fit()
    ckpt = str(tmp_path / "dmd.ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, kill_at=3)                       # warm-up and updates 0-2 are on disk, GAN already on
    assert os.path.exists(ckpt)
    resumed, m_res = fit(ckpt, init_seed=2)        # other initial weights: only the checkpoint can make it equal
    assert not os.path.exists(ckpt)
    assert m_res["curves"] == m_ref["curves"]
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
