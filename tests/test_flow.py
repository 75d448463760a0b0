"""Tests for flow.py: equations, time convention, samplers against a closed-form velocity."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import flow  # noqa: E402

MU, SIGMA = 2.0, 0.5


def _noise(seed=0, B=128):
    return torch.randn(B, 4, 3, 4, 4, generator=torch.Generator().manual_seed(seed))  # 24k numbers


def test_add_noise_endpoints_and_round_trip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 9, 8, 8, generator=g), torch.randn(2, 4, 9, 8, 8, generator=g)
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(2)), x0)     # t = 0 is data
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(2)), eps)     # t = 1 is noise
    for t in (torch.rand(2, generator=g), torch.rand(2, 9, generator=g)):
        x_t = flow.add_noise(x0, eps, t)
        v = flow.velocity_target(x0, eps)
        torch.testing.assert_close(flow.x0_from_v(x_t, v, t), x0, atol=1e-5, rtol=0)


def test_per_frame_t_broadcasts_over_frames():
    x0, eps = torch.zeros(1, 2, 3, 2, 2), torch.ones(1, 2, 3, 2, 2)
    x_t = flow.add_noise(x0, eps, torch.tensor([[0.0, 0.5, 1.0]]))
    assert x_t[:, :, 0].eq(0).all() and x_t[:, :, 1].eq(0.5).all() and x_t[:, :, 2].eq(1).all()


def test_bad_t_shape_is_clear_error():
    x = torch.zeros(2, 4, 9, 8, 8)
    with pytest.raises(ValueError, match="expected t of shape"):
        flow.add_noise(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, C, T, h, w\)"):
        flow.add_noise(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2))


def test_shift_monotone_with_fixed_endpoints():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 1.0, 3.0, 5.0):
        ts = flow.shift_t(t, s)
        assert ts[0] == 0 and abs(ts[-1] - 1) < 1e-6
        assert (ts[1:] > ts[:-1]).all()
    assert (flow.shift_t(t[1:-1], 3.0) > t[1:-1]).all()                 # s > 1 moves t toward noise
    torch.testing.assert_close(flow.shift_t(t, 1.0), t)


def test_few_step_schedule_values():
    assert flow.few_step_schedule(1, 5.0) == [1.0]
    assert flow.few_step_schedule(4, 1.0) == [1.0, 0.75, 0.5, 0.25]
    # Self-Forcing's warped [1000, 750, 500, 250] with shift 5: 750 -> 937.5, 500 -> 833.3, 250 -> 625
    got = flow.few_step_schedule(4, 5.0)
    assert got == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])
    assert flow.few_step_schedule(2, 3.0) == pytest.approx([1.0, 0.75])


def test_sample_t_per_chunk_equal_within_chunk_independent_across():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(64, 9, chunk=3, generator=g)
    assert t.shape == (64, 9) and (t > 0).all() and (t < 1).all()
    chunks = t.view(64, 3, 3)
    assert (chunks == chunks[:, :, :1]).all()                           # equal inside a chunk
    assert (chunks[:, 0, 0] != chunks[:, 1, 0]).float().mean() > 0.9    # differ across chunks
    t_last = flow.sample_t(4, 7, chunk=3, generator=g)                  # chunks [0:3], [3:6], [6:7]
    assert t_last.shape == (4, 7) and (t_last[:, 3:6] == t_last[:, 3:4]).all()
    assert (t_last[:, 6] != t_last[:, 5]).all()
    whole = flow.sample_t(8, 9, per_chunk=False, mode="uniform", generator=g)
    assert (whole == whole[:, :1]).all()
    a = flow.sample_t(5, 9, generator=torch.Generator().manual_seed(3))
    b = flow.sample_t(5, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sample_t_shared_puts_a_share_of_the_samples_on_one_t():
    """shared=p: about p of the samples have one t for every chunk, the rest independent per-chunk t
    with the same marginal; shared=0 draws exactly what the sampler drew before the option existed."""
    t = flow.sample_t(4000, 9, chunk=3, shift=3.0, shared=0.5, generator=torch.Generator().manual_seed(0))
    one = (t == t[:, :1]).all(1)                                        # (B,) every chunk at one t
    assert 0.45 < one.float().mean() < 0.55
    assert (t[~one].view(-1, 3, 3)[:, :, 0].std(1) > 0).all()           # the others: per-chunk t
    plain = flow.sample_t(4000, 9, chunk=3, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert abs(t.mean() - plain.mean()) < 0.02                          # the marginal of t is kept
    assert torch.equal(plain, flow.sample_t(4000, 9, chunk=3, shift=3.0, shared=0.0,
                                            generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="probability"):
        flow.sample_t(2, 9, shared=1.5)


def test_sample_t_logit_normal_and_shift_statistics():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(20000, 1, mode="logit_normal", generator=g)
    assert abs(t.median() - 0.5) < 0.02                                 # sigmoid(N(0,1)) has median 1/2
    ts = flow.sample_t(20000, 1, mode="uniform", shift=3.0, generator=g)
    assert abs(ts.median() - 0.75) < 0.02                               # shift(0.5, 3) = 0.75
    with pytest.raises(ValueError, match="unknown t mode"):
        flow.sample_t(2, 3, mode="cosine")


def test_cfg_velocity():
    vc, vu = torch.full((2,), 3.0), torch.full((2,), 1.0)
    assert torch.equal(flow.cfg_velocity(vc, vu, 1.0), vc)
    assert torch.equal(flow.cfg_velocity(vc, vu, 0.0), vu)
    assert torch.equal(flow.cfg_velocity(vc, vu, 5.0), torch.full((2,), 11.0))


def test_euler_with_exact_velocity_recovers_gaussian():
    noise = _noise()
    v_star = flow.gaussian_velocity(MU, SIGMA)
    x = flow.sample_euler(v_star, noise, steps=200, shift=1.0)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.var().item() - SIGMA ** 2) < 0.01
    # with a shift the grid is different but the ODE is the same: still converges
    xs = flow.sample_euler(v_star, noise, steps=200, shift=3.0)
    assert abs(xs.mean().item() - MU) < 0.02 and abs(xs.var().item() - SIGMA ** 2) < 0.02


def test_euler_controls_with_wrong_conventions_fail():
    """The same check must fail for the bugs it is meant to catch."""
    noise = _noise()
    v_star = flow.gaussian_velocity(MU, SIGMA)
    flipped = flow.sample_euler(lambda x, t: -v_star(x, t), noise, steps=200, shift=1.0)
    assert abs(flipped.mean().item() - MU) > 0.5                        # sign of v flipped
    # time convention flipped: the model is asked at 1 - t (t = 0 read as noise)
    swapped = flow.sample_euler(lambda x, t: v_star(x, 1 - t), noise, steps=200, shift=1.0)
    assert abs(swapped.mean().item() - MU) > 0.5 or abs(swapped.var().item() - SIGMA ** 2) > 0.05


def test_sample_few_step_one_step_is_posterior_mean_and_seeded():
    noise = _noise()
    v_star = flow.gaussian_velocity(MU, SIGMA)
    one = flow.sample_few_step(v_star, noise, [1.0])
    torch.testing.assert_close(one, torch.full_like(one, MU), atol=1e-5, rtol=0)  # E[x0 | pure noise]
    ts = flow.few_step_schedule(4, 3.0)
    a = flow.sample_few_step(v_star, noise, ts, generator=torch.Generator().manual_seed(7))
    b = flow.sample_few_step(v_star, noise, ts, generator=torch.Generator().manual_seed(7))
    c = flow.sample_few_step(v_star, noise, ts, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)                  # fresh noise follows the seed
    # everything is linear-Gaussian, so the variance of the rollout is known in closed form:
    # x0 = mu + k_t (x_t - m_t) with k_t = (1-t) sigma^2 / s_t^2; x_t' = (1-t') x0 + t' eps'.
    # (The result is narrower than the data: each x0 is a posterior mean, which is why DMD
    # trains the student instead of plugging in the teacher.)
    var_xt = 1.0
    for i, t in enumerate(ts):
        k_t = (1 - t) * SIGMA ** 2 / ((1 - t) ** 2 * SIGMA ** 2 + t ** 2)
        var_x0 = k_t ** 2 * var_xt
        if i + 1 < len(ts):
            var_xt = (1 - ts[i + 1]) ** 2 * var_x0 + ts[i + 1] ** 2
    assert abs(a.mean().item() - MU) < 0.02 and abs(a.var().item() - var_x0) < 0.005
    with pytest.raises(ValueError, match="starting at t = 1"):
        flow.sample_few_step(v_star, noise, [0.5, 0.25])


def test_get_config():
    assert dit.get_config("tiny").chunk == 3                        # the stream's geometry: the model's config
    assert flow.get_config("small").sample_steps >= flow.get_config("tiny").sample_steps
    with pytest.raises(ValueError, match="tiny"):
        flow.get_config("huge")


def test_fm_loss_weight_of_ones_is_plain_mse_and_a_weight_moves_the_loss():
    cfg = dit.get_config("tiny")
    torch.manual_seed(0)
    model = dit.DiT(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g)
    text, mask = torch.randn(2, 5, cfg.text_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)
    null, null_m = torch.zeros(1, 5, cfg.text_dim), torch.ones(1, 5, dtype=torch.bool)
    loss = lambda w: flow.fm_loss(model, x0, text, mask, null, null_m, w, generator=torch.Generator().manual_seed(1))  # noqa: E731
    plain = loss(None)
    torch.testing.assert_close(loss(torch.ones(2, 1, 3, 8, 8)), plain)
    torch.testing.assert_close(loss(torch.full((2, 1, 3, 8, 8), 7.0)), plain)   # normalised by the mean
    w = torch.ones(2, 1, 3, 8, 8)
    w[..., :4, :] = 5.0                                                  # the top half weighs 5x
    assert not torch.allclose(loss(w), plain)
