"""Tests for vae.py: shapes, chunked == full decoding, causality, GroupNorm on 4-D views,
training reduces the loss, latent statistics, checkpoints."""
import os

import pytest
import torch

import vae as V
from conftest import randomised


@pytest.fixture(scope="module")
def tiny():
    return randomised(V.VAE(V.get_config("tiny")))


@pytest.mark.parametrize("F", [1, 5, 9, 33])
def test_encode_decode_shapes(tiny, F):
    x = V.blob_video(2, F, 16, seed=F)  # (2, 3, F, 16, 16)
    with torch.no_grad():
        z = tiny.encode(x)
        y = tiny.decode(z)
    assert z.shape == (2, 4, 1 + (F - 1) // 4, 4, 4)
    assert y.shape == x.shape


def test_bad_shapes_raise(tiny):
    with pytest.raises(ValueError, match="F=1\\+4k"):
        tiny.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="expected latents"):
        tiny.decode(torch.zeros(1, 5, 3, 4, 4))
    with pytest.raises(ValueError, match="tiny"):
        V.get_config("huge")


@torch.no_grad()
def test_chunked_decode_equals_full(tiny):
    z = torch.randn(2, 4, 9, 4, 4)  # 3 chunks of 3 latent frames
    full = tiny.decode(z)  # (2, 3, 33, 16, 16)
    parts, cache, sizes = [], None, []
    for t0 in range(0, 9, 3):
        frames, cache = tiny.decode_chunk(z[:, :, t0:t0 + 3], cache)
        parts.append(frames)
        sizes.append(frames.shape[2])
    assert sizes == [9, 12, 12]
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=0)
    # a different (uneven) chunking gives the same frames too: 1 + 4 + 4 latent frames
    parts, cache = [], None
    for a, b in ((0, 1), (1, 5), (5, 9)):
        frames, cache = tiny.decode_chunk(z[:, :, a:b], cache)
        parts.append(frames)
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_decode_chunk_does_not_mutate_cache(tiny):
    z = torch.randn(1, 4, 6, 4, 4)
    _, cache = tiny.decode_chunk(z[:, :, :3], None)
    snapshot = {k: v.clone() for k, v in cache.items()}
    a, _ = tiny.decode_chunk(z[:, :, 3:], cache)
    b, _ = tiny.decode_chunk(z[:, :, 3:], cache)  # same cache reused -> same frames
    torch.testing.assert_close(a, b)
    assert all(torch.equal(snapshot[k], cache[k]) for k in snapshot)


@torch.no_grad()
def test_causality(tiny):
    x = V.blob_video(1, 17, 16, seed=3)
    z = tiny.encode(x)  # (1, 4, 5, 4, 4)
    x2 = x.clone()
    x2[:, :, 9:] = torch.rand_like(x2[:, :, 9:]) * 2 - 1  # perturb pixel frames >= 9
    z2 = tiny.encode(x2)
    # latent t sees pixel frames <= 4t: latents 0..2 (frames <= 8) unchanged, latent 3 changes
    torch.testing.assert_close(z2[:, :, :3], z[:, :, :3], atol=1e-6, rtol=0)
    assert (z2[:, :, 3] - z[:, :, 3]).abs().max() > 1e-3
    # decoding: perturb latent frames >= 3 -> pixel frames <= 8 unchanged, frame 9 changes
    z3 = z.clone()
    z3[:, :, 3:] += 1.0
    y, y3 = tiny.decode(z), tiny.decode(z3)
    torch.testing.assert_close(y3[:, :, :9], y[:, :, :9], atol=1e-6, rtol=0)
    assert (y3[:, :, 9] - y[:, :, 9]).abs().max() > 1e-4


@torch.no_grad()
def test_groupnorm_only_on_4d(tiny):
    dims = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: dims.append(inp[0].dim()))
             for m in tiny.modules() if type(m) is torch.nn.GroupNorm]
    tiny.decode(tiny.encode(V.blob_video(1, 9, 16)))
    for h in hooks:
        h.remove()
    assert len(dims) > 5 and set(dims) == {4}


def test_fit_reduces_loss_and_sets_stats():
    torch.manual_seed(0)
    m = V.VAE(V.get_config("tiny"))
    fixed = V.blob_video(2, 5, 16, seed=1)
    before = V.reconstruct_psnr(m, fixed)
    met = V.fit_vae(m, lambda s: fixed, steps=12, lr=3e-3, seed=0, progress=False, stats_batches=1)
    after = V.reconstruct_psnr(m, fixed)
    assert met["loss"] < met["first_loss"] and after > before + 1.0, (met, before, after)
    z = m.encode(fixed)  # normalised with the stats of exactly these clips
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-3
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-2


def test_psnr_helper():
    a = torch.zeros(1, 3, 1, 4, 4)
    assert abs(V.psnr(a, a + 0.2) - 10 * torch.log10(torch.tensor(4 / 0.04)).item()) < 1e-4


def test_checkpoint_round_trip_and_errors(tiny, tmp_path):
    path = str(tmp_path / "vae.pt")
    V.save_checkpoint(path, tiny, tiny.cfg, {"psnr": 1.0})
    assert os.path.exists(str(tmp_path / "vae.json")) and not os.path.exists(path + ".tmp")
    loaded = V.load_vae(path)
    assert loaded.cfg == tiny.cfg
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), tiny.decode(z))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        V.load_vae(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(path, "rb").read()[:1000])  # truncated file
    with pytest.raises(RuntimeError, match="bad.pt.*re-run the `vae` stage"):
        V.load_vae(str(bad))
    other = str(tmp_path / "other.pt")
    small = V.VAE(V.get_config("small"))
    V.save_checkpoint(other, small, tiny.cfg)  # tiny config, small weights: a mismatch
    with pytest.raises(RuntimeError, match="does not match.*re-run the `vae` stage"):
        V.load_vae(other)


def test_motion_crop_finds_the_moving_object_and_weights_its_pixels():
    from dataclasses import replace
    video = torch.zeros(2, 3, 9, 64, 64)                                   # static black background
    for f in range(9):                                                     # an 8-px square moving right
        video[:, :, f, 44:52, 4 + 2 * f:12 + 2 * f] = 1.0
    cfg = replace(V.get_config("small"), train_frames=9, train_crop=32, motion_crop=1.0)
    crop = V.train_view(video, cfg, torch.Generator().manual_seed(0))
    assert crop.shape == (2, 3, 9, 32, 32)
    assert torch.equal(crop.amax(dim=(2, 3, 4)), torch.ones(2, 3))         # the square is inside the crop
    uniform = V.train_view(video, replace(cfg, motion_crop=0.0), torch.Generator().manual_seed(1))
    assert uniform.shape == crop.shape
    w = V.motion_weights(video, 4.0)                                      # (B, 1, F, H, W)
    moving = (video - video.median(dim=2, keepdim=True).values).abs().sum(1, keepdim=True) > 0.15
    assert torch.equal(w[moving], torch.full_like(w[moving], 5.0)) and torch.equal(w[~moving], torch.ones_like(w[~moving]))
    assert moving.any() and (~moving).any()


def test_judge_reconstructions_scores_clips_and_what_the_vae_lets_through(tmp_path):
    """The clips themselves score ~1; a VAE that outputs nothing useful (zero-initialised decoder
    output: every reconstruction is grey) lets no colour through."""
    path = str(tmp_path / "vae.pt")
    model = V.VAE(V.get_config("tiny"))
    torch.nn.init.zeros_(model.decoder.conv_out.conv.weight)
    torch.nn.init.zeros_(model.decoder.conv_out.conv.bias)
    V.save_checkpoint(path, model, model.cfg)
    res = V.judge_reconstructions(path, "tiny", n=4)
    assert res["n"] == 4 and res["clips"]["color_acc"] >= 0.95
    assert res["reconstructions"]["color_acc"] == 0.0 and res["psnr"] < 20


def test_fit_vae_killed_and_resumed_equals_uninterrupted(tmp_path):
    """The VAE stage saves itself every few minutes (here: every update) and resumes bit-identically,
    global random stream included (the posterior samples draw from it)."""
    def fit(ckpt=None, kill_at=None, init_seed=0):
        torch.manual_seed(init_seed)
        model = V.VAE(V.get_config("tiny"))
        batch = lambda s: torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(s)) * 2 - 1  # noqa: E731

        def batch_fn(s):
            if s == kill_at:
                raise KeyboardInterrupt                     # killed before update `kill_at`
            return batch(s)
        V.fit_vae(model, batch_fn, 4, seed=3, progress=False, stats_batches=1, ckpt=ckpt, ckpt_every_s=0.0)
        return model

    whole = fit()
    ckpt = str(tmp_path / "vae.ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, kill_at=2)
    resumed = fit(ckpt, init_seed=1)                        # other initial weights: only the checkpoint makes it equal
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_latent_motion_mask_covers_the_object_and_only_its_path():
    import data
    video, _, gt = data.make_batch(data.get_config("small"), 2, seed=3, single_object=True)
    m = V.latent_motion_mask(video)                                      # (2, 1, 9, 16, 16)
    assert m.shape == (2, 1, 9, 16, 16) and m.dtype == torch.bool
    for b in range(2):
        box = gt[b]["objects"][0]["box"] / 4                             # (F, 4) x0, y0, x1, y1 in latent px
        path = torch.ones(16, 16, dtype=torch.bool)                      # False on the object's whole path
        x0, y0 = int(box[:, 0].min()), int(box[:, 1].min())
        x1, y1 = int(box[:, 2].max()), int(box[:, 3].max())
        path[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = False
        for k, f in ((0, 0), (4, 16), (8, 32)):                          # latent frame k holds pixel frame f
            cx, cy = int((box[f, 0] + box[f, 2]) / 2), int((box[f, 1] + box[f, 3]) / 2)
            assert m[b, 0, k, cy, cx], "the object's centre is masked"
            assert not (m[b, 0, k] & path).any(), "nothing off the object's path is masked"
        assert m[b].float().mean() < 0.3
    static = video[:, :, :1].expand_as(video).contiguous()               # a clip that does not move
    assert not V.latent_motion_mask(static).any()
