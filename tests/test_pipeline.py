"""train.py end to end on the `tiny` preset: every stage, resumability, the run's streaming system."""
import json
import os

import pytest
import torch

import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "tiny")
    cfg = train.get_config("tiny")
    stages = [s for s in train.STAGES if s != "deploy"]   # the Core ML bundle has its own tests (test_deploy.py)
    run, times = train.run_pipeline(out, cfg, stages)
    return run, times, stages


def test_every_stage_completes_and_writes_its_outputs(tiny_run):
    run, times, stages = tiny_run
    for s in stages:
        assert run.done(s), s
        assert json.load(open(run.path(f"{s}.done.json")))["seconds"] >= 0
    for f in ("text.pt", "vocab.json", "vae.pt", "latents.pt", "base.pt", "search.pt", "layout.json", "pretrain.pt",
              "teacher.pt", "cache/index.json", "kd.pt", "dmd.pt", "decoder.pt", "sample.mp4"):
        assert os.path.exists(run.path(f)), f
    layout = json.load(open(run.path("layout.json")))["layout"]
    assert layout[0] == 1 and layout[-1] == 1
    m = run.metrics("sample")
    for k in ("color_acc", "shape_acc", "direction_acc", "semantic", "quality", "total"):
        assert 0.0 <= m["vbench_lite"][k] <= 1.0
    assert m["stream"]["frames"] == 9 + 12 * (run.cfg.sample_chunks - 1)


def test_resume_skips_done_stages_and_reruns_a_killed_one_identically(tiny_run):
    run, _, _ = tiny_run
    before = torch.load(run.path("kd.pt"), weights_only=True)["state_dict"]
    os.remove(run.path("kd.done.json"))                  # as if killed during the kd stage
    with open(run.path("kd.pt"), "wb") as f:              # ... leaving a half-written file behind
        f.write(b"partial")
    _, times = train.run_pipeline(run.dir, run.cfg, ["base", "kd"])
    after = torch.load(run.path("kd.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)   # same seed, same result


def test_corrupt_or_missing_checkpoint_names_the_stage(tiny_run, tmp_path):
    run, _, _ = tiny_run
    bad = tmp_path / "pretrain.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="pretrain"):
        train.load_model(str(bad), train.ModelSpec, train.build_model, "pretrain")
    with pytest.raises(FileNotFoundError, match="teacher"):
        train.load_model(str(tmp_path / "teacher.pt"), train.ModelSpec, train.build_model, "teacher")


def test_streaming_system_of_the_run(tiny_run):
    run, _, _ = tiny_run
    models = train.load_streaming(run.dir)
    assert models["name"] == "S2DiT-AR" and models["steps"]
    import stream
    a = torch.cat([c.frames for c in stream.stream(models, "a red circle moves left", 2, models["steps"][0], seed=1)], 1)
    b = torch.cat([c.frames for c in stream.stream(models, "a red circle moves left", 2, models["steps"][0], seed=1)], 1)
    assert torch.equal(a, b) and a.shape[1] == 21


def test_unknown_preset_and_stage_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown pipeline preset"):
        train.get_config("huge")
    with pytest.raises(SystemExit):
        train.main(["--stages", "vae,nope", "--out", str(tmp_path / "x")])
