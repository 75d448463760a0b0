"""train.py end to end on the `tiny` preset: every stage, resumability, the run's streaming system."""
import json
import os

import pytest
import torch

import runs
import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "tiny")
    cfg = train.get_config("tiny")
    stages = [s for s in runs.STAGES if s != "deploy"]   # the Core ML bundle has its own tests (test_deploy.py)
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


def test_pipeline_ode_fields_reach_dmds_initialisation(tiny_run, tmp_path):
    """PipelineConfig.ode_pairs / ode_updates set DMD's ODE initialisation (the `small` preset shortens
    it): the dmd stage of a copy of the run with other values draws that many trajectories."""
    import shutil
    from dataclasses import asdict, replace
    run, _, _ = tiny_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run.dir, copy)
    os.remove(os.path.join(copy, "dmd.done.json"))
    cfg = replace(run.cfg, ode_pairs=3, ode_updates=2, dmd_steps=2)
    with open(os.path.join(copy, "pipeline.json"), "w") as f:   # the copy is a run of these values
        json.dump(asdict(cfg), f)
    train.run_pipeline(copy, cfg, ["dmd"])
    ode = torch.load(os.path.join(copy, "dmd_ode.pt"), weights_only=True)["metrics"]
    assert ode["ode_pairs"] == 3 and run.cfg.ode_pairs != 3
    assert torch.load(run.path("dmd_ode.pt"), weights_only=True)["metrics"]["ode_pairs"] == run.cfg.ode_pairs


def test_resumed_dmd_stage_equals_the_uninterrupted_run(tiny_run):
    """The dmd stage again (a resume after a kill, or `--stages dmd` on a finished run) in a process whose
    global RNG is elsewhere than in the uninterrupted run: the same student, tensor for tensor. Every
    module a stage creates (the discriminator head too) is seeded from the stage's seed."""
    run, _, _ = tiny_run
    before = torch.load(run.path("dmd.pt"), weights_only=True)["state_dict"]
    os.remove(run.path("dmd.done.json"))                 # as if killed during the dmd stage
    torch.manual_seed(12345)
    torch.randn(1000)                                    # the global RNG is not where the first run left it
    train.run_pipeline(run.dir, run.cfg, ["dmd"])
    after = torch.load(run.path("dmd.pt"), weights_only=True)["state_dict"]
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_search_budget_comes_from_the_stored_latency_table(tiny_run):
    """Machine load must not change the layout: the search stage uses search.LATENCY_MS, never a live timing."""
    import search
    run, _, _ = tiny_run
    m = run.metrics("search")
    assert m["latency_table_ms"] == search.LATENCY_MS["tiny"]
    M = runs.dit_cfg(run.cfg).depth // 2
    t = search.LATENCY_MS["tiny"]
    assert m["budget_ms"] == search.dp_cheapest(M, t["lcha_group_ms"], t["ssa_group_ms"], t["switch_ms"])[(M - 2) // 2][0]


def test_corrupt_or_missing_checkpoint_names_the_stage(tiny_run, tmp_path):
    run, _, _ = tiny_run
    bad = tmp_path / "pretrain.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="pretrain"):
        runs.load_model(str(bad), "pretrain")
    with pytest.raises(FileNotFoundError, match="teacher"):
        runs.load_model(str(tmp_path / "teacher.pt"), "teacher")


def test_streaming_system_of_the_run(tiny_run):
    run, _, _ = tiny_run
    system = runs.load_streaming(run.dir)
    n = run.cfg.sample_steps                               # the pipeline's student: distilled for sample_steps
    assert system.name == "S2DiT-AR" and system.steps == n and run.metrics("dmd")["config"]["n_steps"] == n
    import stream
    a = torch.cat([c.frames for c in stream.stream(system, "a red circle moves left", 2, seed=1)], 1)   # default: n
    b = torch.cat([c.frames for c in stream.stream(system, "a red circle moves left", 2, n, seed=1)], 1)
    assert torch.equal(a, b) and a.shape[1] == 21
    with pytest.raises(ValueError, match=f"distilled for {n} denoising steps only, not 4"):
        stream.check_request(system, "a red circle moves left", 2, 4)


def test_shipped_copy_stores_the_dit_in_fp16_and_loads_back(tiny_run, tmp_path):
    """train.py --ship: the DiT file holds fp16 tensors (half the bytes), loads into the same fp32 model
    up to fp16 rounding, and the copy is a run that load_streaming opens."""
    run, _, _ = tiny_run
    out = str(tmp_path / "shipped")
    runs.ship_weights(run.dir, out)
    sd = torch.load(os.path.join(out, "dmd.pt"), weights_only=True)["state_dict"]
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    a, b = runs.load_streaming(run.dir).model, runs.load_streaming(out).model
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert q.dtype == p.dtype and torch.allclose(p, q, rtol=1e-3, atol=1e-4), k
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_reproduce_distils_a_student_per_step_count_once_and_drops_stale_tables(tiny_run, tmp_path):
    import reproduce
    run, _, _ = tiny_run
    one = reproduce.student(run, "dmd_1step", 1)                       # Tab. A1's 1-step student, trained here
    assert one.steps == 1 and one.name == "S2DiT-AR (dmd_1step)"
    assert run.metrics("dmd_1step")["config"]["n_steps"] == 1
    marker = run.path("dmd_1step.done.json")
    stamp = os.path.getmtime(marker)
    assert reproduce.student(run, "dmd_1step", 1).steps == 1 and os.path.getmtime(marker) == stamp  # reused
    with pytest.raises(ValueError, match="not 4"):                     # the pipeline's student is never re-purposed
        reproduce.student(run, "dmd", 4)
    # a reproduce.json from the single-student days: the tables that streamed it are dropped, the rest kept
    store = run.path("reproduce.json")
    with open(store, "w") as f:
        json.dump({"taba1": {"1 step": {"total": 0.3}}, "taba7": {}, "taba2": {"old": 1},
                   "seconds": {"taba7": 1.0, "taba2": 0.0}}, f)
    reproduce.main(["--run", run.dir, "--tables", "taba2", "--out", str(tmp_path / "RESULTS.md")])
    res = json.load(open(store))
    assert "taba1" not in res and "taba7" not in res and "taba7" not in res["seconds"]
    assert res["separate_students"] and res["taba2"] == run.metrics("decoder")["table_a2"]


def test_unknown_preset_and_stage_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown pipeline preset"):
        train.get_config("huge")
    with pytest.raises(SystemExit):
        train.main(["--stages", "vae,nope", "--out", str(tmp_path / "x")])


def test_learning_curve_scores_resumes_and_reports(tiny_run, tmp_path):
    """curves.py on the tiny run: a curve of 4 updates scored every 2 writes one point per score with
    both splits, keeps its points when run again (nothing retrained), and --report writes the table,
    the SVG and its block in a Markdown file without touching the rest of the file."""
    import curves
    run, _, _ = tiny_run
    out = str(tmp_path / "curves")
    log = curves.run_curve(run.dir, "first_chunk", 4, 2, out, n_prompts=1, seeds=2, steps=2, threads=1)
    assert [p["update"] for p in log["points"]] == [2, 4]
    p = log["points"][-1]
    assert p["seen_n"] == p["heldout_n"] == 2 and p["clips"] == 4 * run.cfg.first_chunk_batch
    assert all(0 <= p[f"{s}_{k}"] <= 1 for s in ("seen", "heldout") for k in ("color_acc", "shape_acc", "direction_acc"))
    assert set(p["sensitivity"]) == {"colour", "shape", "motion"} and p["sensitivity"]["colour"] > 0
    stamp = os.path.getmtime(os.path.join(out, "first_chunk.json"))
    again = curves.run_curve(run.dir, "first_chunk", 4, 2, out, n_prompts=1, seeds=2, steps=2, threads=1)
    assert again["points"] == log["points"] and os.path.getmtime(os.path.join(out, "first_chunk.json")) == stamp
    md = tmp_path / "RESULTS.md"
    md.write_text("# tables\n\nkeep me\n")
    svg = str(tmp_path / "c.svg")
    for _ in range(2):                                  # twice: the block is replaced, not appended again
        curves.main(["--report", out, "--svg", svg, "--results", str(md)])
    text = md.read_text()
    assert text.startswith("# tables\n\nkeep me\n") and text.count("<!-- curves.py curves: begin -->") == 1
    assert "| first_chunk | 4 |" in text and open(svg).read().startswith("<svg")
    curves.main(["--report", out, "--svg", svg, "--results", str(md), "--block", "curves9"])   # a block of its own
    text = md.read_text()
    assert text.count("<!-- curves.py curves: begin -->") == text.count("<!-- curves.py curves9: begin -->") == 1
    assert curves.wilson(0.5, 24) == pytest.approx((0.314, 0.686), abs=1e-3)


def test_chain_scores_only_the_stages_asked_for(tiny_run, capsys):
    """curves.py --chain --chain-stages dmd scores the streamed student alone (one row, both splits,
    the command in the table's line); a stage the chain does not have is refused before any work."""
    import curves
    run, _, _ = tiny_run
    rows = curves.score_chain(run.dir, n_prompts=1, seeds=2, stages=["dmd"])
    assert list(rows) == ["S2DiT-AR"] and rows["S2DiT-AR"]["seen_n"] == rows["S2DiT-AR"]["heldout_n"] == 2
    curves.main(["--chain", run.dir, "--chain-stages", "dmd,kd", "--prompts", "1"])
    out = capsys.readouterr().out
    assert f"--chain {run.dir} --chain-stages dmd,kd`" in out
    assert "| S2DiT-KD |" in out and "| S2DiT-AR |" in out and "| T_theta" not in out
    with pytest.raises(SystemExit):
        curves.main(["--chain", run.dir, "--chain-stages", "dmd,vae"])
    assert "no chain stage vae" in capsys.readouterr().err
    # --cfg-scale sets the flow-matching rows' guidance, and the command in the table's line says so
    curves.main(["--chain", run.dir, "--chain-stages", "base", "--prompts", "1", "--cfg-scale", "5"])
    out = capsys.readouterr().out
    assert f"--chain {run.dir} --chain-stages base --cfg-scale 5`" in out and "CFG 5.0 |" in out


def test_streamed_sampling_of_one_chunk_is_the_whole_window_and_later_chunks_see_the_first(tiny_run):
    """curves.sample_videos(streamed=True) denoises chunk by chunk next to the clean chunks before:
    with one chunk it is the whole-window sampler; with two, the first chunk is the whole-window one
    (block-causal: the first chunk sees only itself, at the same t in both) and the second, which
    sees a clean first chunk instead of a noisy one, differs."""
    import curves
    import data
    import dit
    run, _, _ = tiny_run
    model = run.model("base")
    combos = [data.TRAIN_COMBOS[0]]
    one = [curves.sample_videos(model, run, combos, 1, 1, 3.0, 2, 3.0, streamed=s)[0] for s in (False, True)]
    torch.testing.assert_close(one[0], one[1])
    two = [curves.sample_videos(model, run, combos, 2, 1, 3.0, 2, 3.0, streamed=s)[0] for s in (False, True)]
    f1 = one[0].shape[2]                                   # pixel frames of the first chunk
    torch.testing.assert_close(two[1][:, :, :f1], two[0][:, :, :f1], atol=1e-4, rtol=0)
    seen = []                                              # the t of every call: the context is clean

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def forward(self, x, t, *a, **k):
            seen.append(t.clone())
            return self.inner(x, t, *a, **k)
    curves.sample_videos(Spy(), run, combos, 2, 1, 3.0, 2, 3.0, streamed=True)
    c = model.cfg.chunk
    assert [t.shape[1] for t in seen] == [c] * 4 + [2 * c] * 4         # 2 Euler steps x (cond, uncond) per chunk
    assert all((t[:, :c] == 0).all() and (t[:, c:] > 0).all() for t in seen[4:])
    assert isinstance(model, dit.DiT)


def test_bench_times_the_same_update_in_float32_and_under_bfloat16_autocast():
    import curves
    f32 = curves.bench("tiny", batch=2, chunks=1, threads=1, reps=1)
    b16 = curves.bench("tiny", batch=2, chunks=1, threads=1, reps=1, bf16=True)
    assert (f32["dtype"], b16["dtype"]) == ("float32", "bfloat16 autocast")
    assert f32["gflop_per_update"] == b16["gflop_per_update"] > 0      # the same work, only the precision differs
    assert f32["ms_per_update"] > 0 and b16["ms_per_update"] > 0
