"""--device: the choice of device, and every tensor of training and streaming placed on the model's.

No GPU here, so the placement is held on the `meta` device: it has shapes and a device but no data,
and an op that mixes in a CPU tensor (what a forgotten `.to(device)` leaves behind on a cuda or mps
run) raises. Data-dependent code (the MoE teacher's expert routing, the search's top-k) cannot run
there; it is covered by the CPU tests and, placement aside, runs the same code on every device."""
import os

import pytest
import torch

import data
import decoder as dec_mod
import dist
import dit
import flow
import sandwich
import stream
import streaming
import text as text_mod
import train
import vae as vae_mod

META = torch.device("meta")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pick_device_cpu_and_auto():
    assert dist.pick_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert dist.pick_device("auto").type == want
    with pytest.raises(ValueError, match="unknown device"):
        dist.pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_device_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert e.value.code == 2
    assert "this machine has no cuda device" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")                 # nothing written


def test_stream_on_auto_equals_cpu_here():
    """`--device auto` streams; where auto is the CPU, bit for bit the CPU's video."""
    auto = dist.pick_device("auto")
    shipped = os.path.join(ROOT, "weights", "ship")
    videos = [torch.cat([c.frames for c in stream.stream(stream.load_models(shipped, device=d),
                                                         "a red circle moves right", 2, seed=3)], 1)
              for d in ("cpu", auto)]
    assert videos[1].device.type == "cpu"                       # frames come back for the writer
    if auto.type == "cpu":
        assert torch.equal(*videos)


def meta_batch(cfg, B=2, T=6, hw=4):
    x0 = torch.randn(B, cfg.in_channels, T, hw, hw, device=META)
    text = torch.randn(B, 5, cfg.text_dim, device=META)
    return x0, text, torch.ones(B, 5, dtype=torch.bool, device=META)


@pytest.mark.parametrize("kind", ["dit", "s2dit"])
def test_flow_matching_step_places_every_tensor_on_the_model_device(kind):
    cfg = dit.get_config("tiny")
    model = (dit.DiT(cfg) if kind == "dit" else sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT["tiny"])).to(META)
    x0, text, mask = meta_batch(cfg)
    loss = flow.fm_loss(model, x0, text, mask, text[:1], mask[:1], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.device == META and all(p.grad.device == META for p in model.parameters() if p.grad is not None)


def test_streaming_rollout_places_every_tensor_on_the_model_device():
    """Self-Forcing's rollout: denoise, re-noise, commit to the caches, chunk after chunk."""
    cfg = dit.get_config("tiny")
    model = sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT["tiny"]).to(META).eval()
    _, text, mask = meta_batch(cfg, B=1)
    with torch.no_grad():
        clip = streaming.rollout(model, text, mask, 2, flow.few_step_schedule(2, 3.0), (cfg.in_channels, 4, 4),
                                 torch.Generator().manual_seed(0), t_ctx=0.1)
    assert clip.device == META and clip.shape[2] == 2 * cfg.chunk


def test_vae_decoder_and_text_encoder_place_every_tensor_on_their_device():
    vae = vae_mod.VAE(vae_mod.get_config("tiny")).to(META)
    rec, kl = vae(torch.randn(2, 3, 9, 32, 32, device=META))
    (rec.mean() + kl).backward()
    dec = dec_mod.EfficientDecoder(dec_mod.get_config("tiny")).to(META)
    frames, _ = dec.decode_chunk(torch.randn(1, 4, 3, 8, 8, device=META), None)
    encoder, tokenizer, _ = text_mod.build_text("tiny", words=data.vocabulary())
    tokens, pooled, mask = text_mod.encode_text(encoder.to(META), tokenizer, ["a red circle moves left"])
    assert {rec.device, frames.device, tokens.device, pooled.device, mask.device} == {META}


@pytest.mark.parametrize("demo", ["dit.py", "ssa.py"])
def test_concept_demos_take_a_device(demo):
    """`python dit.py --device auto` runs its checks on the picked device (the CPU here); a device this
    machine lacks is a one-line usage error, not a traceback."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = subprocess.run([sys.executable, demo, "--device", "auto"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0 and f"{demo} demo on cpu" in ok.stdout, ok.stderr
    missing = "cuda" if not torch.cuda.is_available() else "mps"
    bad = subprocess.run([sys.executable, demo, "--device", missing], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and f"no {missing} device" in bad.stderr
