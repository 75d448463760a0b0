"""Tests for decoder.py: the efficient decoder's contract, streaming == whole clip, causality,
parameter ratio vs the reference VAE decoder, training, SSIM, Tab. A2 table, checkpoints."""

import pytest
import torch

import decoder as D
import vae as V
from conftest import randomised


@pytest.fixture(scope="module")
def dec():
    return randomised(D.EfficientDecoder(D.get_config("tiny")))


@pytest.mark.parametrize("T", [1, 2, 3, 9])
def test_shapes(dec, T):
    with torch.no_grad():
        y = dec.decode(torch.randn(2, 4, T, 4, 4))
    assert y.shape == (2, 3, 1 + 4 * (T - 1), 16, 16)
    with pytest.raises(ValueError, match="expected latents"):
        dec.decode(torch.randn(2, 8, T, 4, 4))


@torch.no_grad()
def test_streaming_equals_whole_clip(dec):
    z = torch.randn(2, 4, 9, 4, 4)
    full = dec.decode(z)
    parts, cache = [], None
    for t0 in range(0, 9, 3):
        frames, cache = dec.decode_chunk(z[:, :, t0:t0 + 3], cache)
        parts.append(frames)
    assert [p.shape[2] for p in parts] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_causal(dec):
    z = torch.randn(1, 4, 5, 4, 4)
    z2 = z.clone()
    z2[:, :, 2:] = torch.randn_like(z2[:, :, 2:])
    y, y2 = dec.decode(z), dec.decode(z2)
    torch.testing.assert_close(y2[:, :, :5], y[:, :, :5], atol=1e-6, rtol=0)  # latents 0,1 -> frames 0..4
    assert (y2[:, :, 5] - y[:, :, 5]).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_ratio(preset):
    ref = V.VAE(V.get_config(preset)).decoder
    eff = D.EfficientDecoder(D.get_config(preset))
    ratio = D.num_params(ref) / D.num_params(eff)
    assert ratio >= 3.0, ratio
    acts = {type(m) for m in eff.modules()}
    assert torch.nn.Hardswish in acts and torch.nn.SiLU not in acts


@torch.no_grad()
def test_groupnorm_only_on_4d(dec):
    dims = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: dims.append(inp[0].dim()))
             for m in dec.modules() if type(m) is torch.nn.GroupNorm]
    dec.decode_chunk(torch.randn(1, 4, 3, 4, 4), None)
    for h in hooks:
        h.remove()
    assert len(dims) > 3 and set(dims) == {4}


def test_ssim():
    x = V.blob_video(1, 5, 16, seed=0)
    assert abs(D.ssim(x, x) - 1.0) < 1e-4
    torch.manual_seed(0)
    s1 = D.ssim(x, x + 0.05 * torch.randn_like(x))
    s2 = D.ssim(x, x + 0.3 * torch.randn_like(x))
    assert 1.0 > s1 > s2


def test_perceptual_is_fixed_and_sensitive():
    a, b = D.RandomFeaturePyramid(seed=1), D.RandomFeaturePyramid(seed=1)
    x = V.blob_video(1, 1, 16, seed=0)
    assert a(x, x).item() == 0.0
    y = x + 0.2 * torch.randn_like(x)
    assert a(x, y).item() == b(x, y).item() > 0  # same seed, same loss
    assert not any(p.requires_grad for p in a.parameters())


def test_fit_decoder_reduces_loss_with_gan():
    torch.manual_seed(0)
    vae = V.VAE(V.get_config("tiny")).eval()
    d = D.EfficientDecoder(D.get_config("tiny"))
    clip = V.blob_video(2, 5, 16, seed=2)
    with torch.no_grad():
        before = (d.decode(vae.encode(clip)) - clip).abs().mean().item()
    met = D.fit_decoder(d, vae, lambda s: clip, steps=8, lr=3e-3, seed=0, gan_start=5, progress=False)
    with torch.no_grad():
        after = (d.decode(vae.encode(clip)) - clip).abs().mean().item()
    assert after < before and met["gan_start"] == 5 and met["d"] > 0, (before, after, met)
    assert not any(p.requires_grad for p in vae.parameters())  # the encoder stays frozen


def test_compare_decoders_table():
    torch.manual_seed(0)
    vae = V.VAE(V.get_config("tiny")).eval()
    d = D.EfficientDecoder(D.get_config("tiny"))
    res = D.compare_decoders(vae, d, V.blob_video(2, 9, 16, seed=0))
    for name in ("vae_decoder", "efficient_decoder"):
        assert set(res[name]) >= {"params", "latency_ms_per_chunk", "psnr", "ssim"}
        assert res[name]["latency_ms_per_chunk"] > 0
    assert res["param_ratio"] == res["vae_decoder"]["params"] / res["efficient_decoder"]["params"] >= 3
    assert "efficient_decoder" in D.format_table(res)


def test_checkpoint_round_trip_and_errors(dec, tmp_path):
    path = str(tmp_path / "decoder.pt")
    D.save_checkpoint(path, dec, dec.cfg, {"l1": 0.1})
    loaded = D.load_decoder(path)
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), dec.decode(z))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        D.load_decoder(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt.*re-run the `decoder` stage"):
        D.load_decoder(str(bad))
    vae_path = str(tmp_path / "vae.pt")
    tiny_vae = V.VAE(V.get_config("tiny"))
    V.save_checkpoint(vae_path, tiny_vae, tiny_vae.cfg)
    with pytest.raises(RuntimeError, match="re-run the `decoder` stage"):
        D.load_decoder(vae_path)  # a VAE checkpoint is not a decoder checkpoint


def test_fit_decoder_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Decoder stage: saved every update here, killed inside the GAN phase, resumed: the same weights."""
    torch.manual_seed(0)
    vae = V.VAE(V.get_config("tiny")).eval()
    clip = V.blob_video(2, 5, 16, seed=2)

    def fit(ckpt=None, kill_at=None, init_seed=0):
        torch.manual_seed(init_seed)
        d = D.EfficientDecoder(D.get_config("tiny"))

        def batch_fn(s):
            if s == kill_at:
                raise KeyboardInterrupt
            return clip + 0.01 * s
        D.fit_decoder(d, vae, batch_fn, steps=6, lr=3e-3, seed=0, gan_start=2, progress=False, ckpt=ckpt, ckpt_every_s=0.0)
        return d

    whole = fit()
    ckpt = str(tmp_path / "decoder.ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, kill_at=4)
    resumed = fit(ckpt, init_seed=1)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_comparison_strip_shows_clip_and_both_decoders(tmp_path):
    """decoder.py --strip: per clip three labelled rows (clip, VAE decoder, efficient decoder)."""
    from PIL import Image
    torch.manual_seed(0)
    vae = V.VAE(V.get_config("tiny")).eval()
    d = D.EfficientDecoder(D.get_config("tiny")).eval()
    videos = V.blob_video(2, 9, 16, seed=0)                      # 2 clips, 9 frames of 16x16
    path = str(tmp_path / "dec.png")
    D.save_comparison_strip(path, vae, d, videos, every=4)
    img = Image.open(path)
    assert img.size == (3 * (16 * 2 + 2) - 2, 2 * 3 * (16 * 2 + 14))   # 3 frames wide, 6 rows
    assert not list(tmp_path.glob("*.tmp*"))


def test_fit_decoder_teacher_term_without_gan():
    """gan_start >= 1: no discriminator update at all; teacher_weight pulls toward the VAE decoder."""
    torch.manual_seed(0)
    vae = V.VAE(V.get_config("tiny")).eval()
    cfg = D.get_config("tiny")
    cfg.gan_start, cfg.teacher_weight, cfg.betas = 1.0, 1.0, (0.9, 0.99)
    d = D.EfficientDecoder(cfg)
    clip = V.blob_video(1, 9, 16, seed=0)
    with torch.no_grad():
        ref = vae.decode(vae.encode(clip))
        before = (d.decode(vae.encode(clip)) - ref).abs().mean().item()
    met = D.fit_decoder(d, vae, lambda s: clip, steps=8, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        after = (d.decode(vae.encode(clip)) - ref).abs().mean().item()
    assert met["gan_start"] == 8 and met["d"] == 0 and after < before, (met, before, after)
