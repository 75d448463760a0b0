"""Bad input to every command-line tool: exit code 2, one line on stderr naming the problem (no traceback),
found before any expensive work, and nothing of the user's lost or changed.

The CLIs run in-process (main(argv), SystemExit caught, capsys for stderr): a subprocess would start
torch again for each case. Only the signal test needs a real process."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import data
import decoder
import deploy
import distill
import dit
import evaluate
import flow
import lcha
import quantize
import safeio
import search
import stream
import text
import train
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "weights", "ship")          # a real run (the shipped weights), read only here


def snapshot(path):
    """{relative path: bytes} of every file under path (or of path itself): 'nothing was lost'."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    out = {}
    for r, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(r, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def refuses(main, argv, capsys, *needles, keep=()):
    """main(argv) exits 2 with one stderr line containing every needle; the paths in `keep` are unchanged."""
    before = {p: snapshot(p) for p in keep}
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if not l.startswith("warning:")]
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    for p, snap in before.items():
        assert snapshot(p) == snap, f"{p} changed"
    return lines[0]


@pytest.fixture
def user_files(tmp_path):
    """A folder of the user's own files, which no tool may touch."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    (d / "sub").mkdir()
    (d / "sub" / "photo.mp4").write_bytes(b"\x00\x01 my video")
    return str(d)


@pytest.fixture
def run_copy(tmp_path):
    """A copy of the shipped run, to break."""
    d = str(tmp_path / "run")
    shutil.copytree(SHIPPED, d)
    return d


# ----------------------------------------------------------------------------------------------
# stream.py
# ----------------------------------------------------------------------------------------------
def s_args(*extra, prompt="a red circle moves right", run=SHIPPED):
    return ["--run", run, "--prompt", prompt, "--chunks", "4", *extra]


@pytest.mark.parametrize("argv, needles", [
    (s_args(prompt="\U0001F600\U0001F680"), ["empty prompt", "no words"]),              # emoji only
    (s_args(prompt="?! ... !!"), ["empty prompt"]),                                      # punctuation only
    (s_args(prompt=""), ["empty prompt"]),
    (s_args("--seed", str(10 ** 23)), ["--seed", "64-bit"]),
    (s_args("--seed", "-1"), ["--seed"]),
    (s_args("--steps", "-1", "--stage", "kd"), ["--steps must be >= 1"]),
    (s_args("--steps", "0"), ["--steps must be >= 1, got 0"]),
    (s_args("--then", "2:?!"), ["--then prompt", "'?!'"]),                              # checked before chunk 0
    (s_args("--then", "two:a blue square moves up"), ["CHUNK:PROMPT"]),
    (s_args("--then", "9:a blue square moves up"), ["chunk 9", "1..3"]),
    (s_args("--chunks", "0"), ["--chunks must be >= 1"]),
    (s_args("--chunks", "many"), ["--chunks", "invalid int"]),                           # argparse's error, one line
    (s_args("--out", "/tmp/video.avi"), [".gif or .mp4"]),
    (s_args("--strip", "/tmp/strip.jpg"), ["--strip must end in .png"]),
    (s_args("--stage", "vae"), ["--stage vae is not a stage with a streaming DiT", "dmd, kd, pretrain"]),
    (s_args("--stage", "dmd_4step"), ["no trained S2DiT", "reproduce.py"]),
    (s_args(prompt="zebra giraffe elephant"), ["knows none of the words", "vocab.json"]),
    (["--prompt", "a red circle"], ["--run"]),                                           # missing required flag
])
def test_stream_refuses_before_any_work(argv, needles, capsys):
    refuses(stream.main, argv, capsys, *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--serve", "--out", "v.mp4"], ["--out does not apply to --serve", "without --serve"]),
    (["--serve", "--strip", "s.png"], ["--strip does not apply to --serve"]),
    (["--serve", "--chunks", "5"], ["--chunks does not apply to --serve", "until Stop"]),
    (["--serve", "--then", "2:a blue square moves up"], ["--then does not apply to --serve", "switch prompt in the page"]),
    (["--serve", "--json"], ["--json does not apply to --serve"]),
    (["--serve", "--steps", "2"], ["--steps does not apply to --serve"]),
    (["--serve", "--stage", "dmd"], ["--stage does not apply to --serve"]),
    (["--serve", "--port", "70000"], ["--port must be in 0..65535"]),
    (["--serve", "--port", "-1"], ["--port must be in 0..65535"]),
    (["--serve", "--port", "eighty"], ["--port", "invalid int"]),
    (["--serve", "--seed", "-1"], ["--seed"]),
    (["--serve", "--prompt", "?!"], ["empty prompt"]),
    (["--serve", "--prompt", "zebra giraffe"], ["knows none of the words"]),
    (["--serve", "--run", "/nonexistent/run"], ["/nonexistent/run not found"]),
    (["--serve", "--host", "no-such-host.invalid", "--port", "0"], ["cannot listen on no-such-host.invalid:0"]),
    (s_args("--port", "8000"), ["--port needs --serve"]),
    (s_args("--host", "0.0.0.0"), ["--host needs --serve"]),
    (["--run", SHIPPED], ["--prompt is required", "--serve"]),
])
def test_stream_serve_refuses_before_serving(argv, needles, capsys):
    refuses(stream.main, argv, capsys, *needles)


def test_stream_serve_port_in_use(capsys):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refuses(stream.main, ["--serve", "--port", str(port)], capsys, f"cannot listen on 127.0.0.1:{port}",
                f"--port {port + 1}")


def test_stream_vae_stage_does_not_say_rerun_vae(capsys):
    line = refuses(stream.main, s_args("--stage", "vae"), capsys)
    assert "re-run" not in line


def test_stream_out_is_a_directory_checked_first(tmp_path, user_files, capsys):
    target = os.path.join(user_files, "sub")                  # --out x.mp4 where x.mp4 is a folder
    os.rename(target, os.path.join(user_files, "x.mp4"))
    refuses(stream.main, s_args("--out", os.path.join(user_files, "x.mp4")), capsys, "is a directory", keep=[user_files])


def test_stream_out_below_a_file(user_files, capsys):
    refuses(stream.main, s_args("--out", os.path.join(user_files, "notes.txt", "v.mp4")), capsys, "cannot write",
            keep=[user_files])


def test_stream_missing_run_and_run_that_is_a_file(tmp_path, user_files, capsys):
    refuses(stream.main, s_args(run=str(tmp_path / "nope")), capsys, "not found", "train.py")
    refuses(stream.main, s_args(run=os.path.join(user_files, "notes.txt")), capsys, "not found", keep=[user_files])


def test_stream_pipeline_json_with_an_extra_key_names_the_file(run_copy, capsys):
    p = os.path.join(run_copy, "pipeline.json")
    blob = json.load(open(p))
    json.dump({**blob, "colour_boost": 3}, open(p, "w"))
    refuses(stream.main, s_args(run=run_copy), capsys, p, "colour_boost", keep=[run_copy])


def test_stream_invalid_pipeline_json_names_the_file(run_copy, capsys):
    p = os.path.join(run_copy, "pipeline.json")
    open(p, "w").write('{"preset": "small",')
    refuses(stream.main, s_args(run=run_copy), capsys, p, "not valid JSON", keep=[run_copy])


def test_stream_invalid_done_json_names_the_file(run_copy, capsys):
    p = os.path.join(run_copy, "dmd.done.json")
    open(p, "w").write("{ truncated")
    refuses(stream.main, s_args(run=run_copy), capsys, p, "not valid JSON", keep=[run_copy])


def test_stream_wrong_step_count_for_the_student_is_one_line(capsys):
    refuses(stream.main, s_args("--steps", "4"), capsys, "distilled for 2 denoising steps only, not 4")


def test_stream_warns_about_unknown_words_and_refuses_when_none_known():
    tok = __import__("text").Tokenizer(["a", "red", "circle", "moves", "right"])
    assert stream.unknown_words(tok, "a red zebra moves right") == ["zebra"]
    with pytest.raises(ValueError, match=r"knows none of the words"):
        stream.unknown_words(tok, "zebra giraffe")


# ----------------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------------
def fake_run(path, **overrides):
    """A run directory as train.py leaves it after its first stage (its config and one marker)."""
    os.makedirs(path, exist_ok=True)
    cfg = train.get_config("tiny", **overrides)
    json.dump(train.asdict(cfg), open(os.path.join(path, "pipeline.json"), "w"))
    json.dump({"stage": "text", "seconds": 1.0, "config": {}, "metrics": {}}, open(os.path.join(path, "text.done.json"), "w"))
    return path


@pytest.mark.parametrize("argv, needles", [
    (["--preset", "tiny", "--stages", ""], ["--stages is empty"]),
    (["--preset", "tiny", "--stages", " , "], ["--stages is empty"]),
    (["--preset", "tiny", "--stages", "vae,nope"], ["unknown stage 'nope'"]),
    (["--preset", "tiny", "--force", "decodr"], ["unknown stage 'decodr'"]),
    (["--preset", "huge"], ["unknown pipeline preset 'huge'"]),
    (["--preset", "tiny", "--seed", "-3"], ["--seed must be in"]),
    (["--preset", "tiny", "--seed", "1.5"], ["--seed", "invalid int"]),
    (["--preset", "tiny", "--set", "base_step=3"], ["--set 'base_step=3'", "FIELD=VALUE", "base_steps"]),
    (["--preset", "tiny", "--set", "base_steps"], ["--set 'base_steps'", "FIELD=VALUE"]),
    (["--preset", "tiny", "--set", "base_steps=many"], ["base_steps takes a int"]),
    (["--preset", "tiny", "--set", "dit_lr=fast"], ["dit_lr takes a float"]),
    (["--preset", "tiny", "--set", "seed=3"], ["--set seed: use --seed"]),
    (["--preset", "small", "--set", "frame_size=40"], ["frame side of 40 px", "multiple of", "= 16", "32 or 48"]),
    (["--preset", "small", "--set", "frame_size=48", "--set", "dit_patch=4"], ["frame side of 48 px", "= 32"]),
    (["--preset", "small", "--set", "frame_size=-16"], ["frame_size must be >= 0"]),
    (["--preset", "small", "--set", "p_textured=1.5"], ["p_textured is a probability", "got 1.5"]),
    (["--preset", "small", "--set", "p_two_objects=-0.1"], ["p_two_objects is a probability"]),
    (["--preset", "tiny", "--set", "frame_size=96"], ["no stored latency table", "tiny/96px",
                                                      "python search.py --measure tiny/96px"]),
])
def test_train_refuses_bad_flags(argv, needles, tmp_path, capsys):
    refuses(train.main, argv + ["--out", str(tmp_path / "run")], capsys, *needles)
    assert not os.path.exists(tmp_path / "run")                # nothing created either


def test_train_set_overrides_the_preset_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "RUNNERS", {})                   # record the configuration, run nothing
    monkeypatch.setattr(train, "STAGES", [])
    train.main(["--preset", "tiny", "--set", "base_steps=7", "--set", "dit_lr=0.5", "--out", str(tmp_path / "run")])
    cfg = json.load(open(tmp_path / "run" / "pipeline.json"))
    assert (cfg["base_steps"], cfg["dit_lr"], cfg["text_steps"]) == (7, 0.5, train.get_config("tiny").text_steps)


def test_frame_size_sets_every_clip_and_the_latency_table_of_the_run():
    """frame_size 0 keeps the geometry's side; another side reaches the clips, the latent grid and the
    search's latency key, and the key names that geometry back."""
    small, s48 = train.get_config("small", frame_size=0), train.get_config("ship", frame_size=48)
    assert (train.data_cfg(small).size, train.latent_hw(small), search.latency_key(small)) == (64, 16, "small")
    assert (train.data_cfg(s48).size, train.latent_hw(s48), search.latency_key(s48)) == (48, 12, "small/48px")
    assert search.latency_key(train.get_config("small", frame_size=64)) == "small"       # the preset's own side
    for cfg in (small, s48, train.get_config("small", frame_size=64, dit_patch=4)):
        back = search.parse_latency_key(search.latency_key(cfg))
        assert (train.data_cfg(back).size, back.dit_patch) == (train.data_cfg(cfg).size, cfg.dit_patch)
    video, _, _ = data.make_batch(train.data_cfg(s48), 2, seed=0)
    assert video.shape[-2:] == (48, 48)


def test_world_knobs_reach_the_training_clips_not_the_held_out_ones():
    """p_two_objects / p_textured shape the run's clips; data_cfg(full_world=True), the held-out clips'
    config, keeps the data preset's world whatever the run sets."""
    plain = train.get_config("small", p_two_objects=0.0, p_textured=0.0)
    assert (train.data_cfg(plain).p_two_objects, train.data_cfg(plain).p_textured) == (0.0, 0.0)
    full = data.get_config("small")
    assert (train.data_cfg(plain, full_world=True).p_two_objects, train.data_cfg(plain, full_world=True).p_textured) \
        == (full.p_two_objects, full.p_textured)
    assert train.data_cfg(train.get_config("small")) == train.data_cfg(train.get_config("small"), full_world=True)
    _, _, gt = data.make_batch(dataclasses.replace(train.data_cfg(plain), frames=2), 64, seed=0)
    assert all(len(g["objects"]) == 1 and not g["textured"] for g in gt)         # one object, plain background
    busy = train.get_config("small", p_two_objects=1.0, p_textured=1.0)
    _, _, gt = data.make_batch(dataclasses.replace(train.data_cfg(busy), frames=2), 64, seed=0)
    assert sum(len(g["objects"]) == 2 for g in gt) > 32 and all(g["textured"] for g in gt)   # ~70 % of tries fit


def test_preset_args_name_the_recipe_that_makes_a_run(tmp_path, monkeypatch):
    """pipeline.json stores the geometry (`small`) for the `ship` preset too; preset_args names the recipe
    back, and the arguments it gives make the very same configuration again."""
    monkeypatch.setattr(train, "RUNNERS", {})
    monkeypatch.setattr(train, "STAGES", [])
    cases = {"--preset ship": train.get_config("ship"), "--preset small": train.get_config("small"),
             "--preset ship --seed 3 --set base_steps=9000": train.get_config("ship", seed=3, base_steps=9000),
             "--preset tiny --set dit_lr=0.5": train.get_config("tiny", dit_lr=0.5)}
    for i, (want, cfg) in enumerate(cases.items()):
        assert train.preset_args(cfg) == want
        train.main(want.split() + ["--out", str(tmp_path / str(i))])
        assert train.read_pipeline(str(tmp_path / str(i) / "pipeline.json")) == cfg


def test_train_out_is_a_file(user_files, capsys):
    refuses(train.main, ["--preset", "tiny", "--out", os.path.join(user_files, "notes.txt")], capsys, "is a file",
            keep=[user_files])


def test_train_out_is_a_folder_of_user_files(user_files, capsys):
    refuses(train.main, ["--preset", "tiny", "--out", user_files], capsys, "not a train.py run", keep=[user_files])


def test_train_out_is_a_run_with_another_seed(tmp_path, capsys):
    run = fake_run(str(tmp_path / "run"), seed=0)
    refuses(train.main, ["--preset", "tiny", "--seed", "1", "--out", run], capsys, "another configuration", "seed 0",
            keep=[run])


def test_train_out_is_a_run_with_another_preset(tmp_path, capsys):
    run = fake_run(str(tmp_path / "run"))
    refuses(train.main, ["--preset", "small", "--out", run], capsys, "another configuration", "preset 'tiny'",
            keep=[run])


def test_train_out_with_invalid_pipeline_json(tmp_path, capsys):
    run = fake_run(str(tmp_path / "run"))
    open(os.path.join(run, "pipeline.json"), "w").write("{not json")
    refuses(train.main, ["--preset", "tiny", "--out", run], capsys, "pipeline.json", "not valid JSON", keep=[run])


def test_train_out_with_invalid_done_json_names_the_file(tmp_path, capsys, monkeypatch):
    run = fake_run(str(tmp_path / "run"))
    open(os.path.join(run, "text.done.json"), "w").write("[1, 2")
    monkeypatch.setattr(train, "RUNNERS", {})                   # the marker is read before any stage would run
    with pytest.raises(safeio.UsageError, match="text.done.json"):
        train.run_pipeline(run, train.get_config("tiny"), ["text"])


def test_train_out_in_a_read_only_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:                                      # root may write anyway: the folder reports read-only
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(ro) else real(p, mode))
    try:
        refuses(train.main, ["--preset", "tiny", "--out", str(ro / "run")], capsys, "not a writable folder")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_train_ship_from_a_missing_run(tmp_path, capsys):
    refuses(train.main, ["--out", str(tmp_path / "nope"), "--ship", str(tmp_path / "s")], capsys, "not found")
    assert not os.path.exists(tmp_path / "s")


def test_train_ship_into_a_folder_of_user_files(user_files, capsys):
    refuses(train.main, ["--out", SHIPPED, "--ship", user_files], capsys, "give a new or empty directory",
            keep=[user_files, SHIPPED])


# ----------------------------------------------------------------------------------------------
# evaluate.py
# ----------------------------------------------------------------------------------------------
def videos_dir(tmp_path, lines, files=None):
    d = tmp_path / "videos"
    d.mkdir(exist_ok=True)
    for name, blob in (files or {}).items():
        (d / name).write_bytes(blob)
    (d / "prompts.jsonl").write_text("".join(l + "\n" for l in lines))
    return str(d)


@pytest.mark.parametrize("lines, files, needles", [
    ([], None, ["lists no videos"]),
    (["{\"file\": \"a.mp4\""], {"a.mp4": b""}, ["line 1", "expected {'file', 'prompt'}"]),
    ([json.dumps({"file": "a.mp4", "prompt": "a fluffy cloud"})], {"a.mp4": b""}, ["line 1", "cannot parse prompt"]),
    ([json.dumps({"file": "a.mp4", "prompt": 7})], {"a.mp4": b""}, ["line 1", "must be a text"]),
    ([json.dumps({"file": "gone.mp4", "prompt": "a red circle moves left"})], None, ["gone.mp4", "not found"]),
    ([json.dumps({"file": "a.mp4", "prompt": "a red circle moves left"})], {"a.mp4": b""}, ["a.mp4", "cannot read video"]),
    ([json.dumps({"file": "a.mp4", "prompt": "a red circle moves left"})], {"a.mp4": b"not a video at all"},
     ["a.mp4", "cannot read video"]),
])
def test_evaluate_videos_folder_problems(lines, files, needles, tmp_path, capsys):
    d = videos_dir(tmp_path, lines, files)
    refuses(evaluate.main, ["--videos", d, "--json"], capsys, *needles, keep=[d])


def test_evaluate_missing_folder_and_missing_prompts_file(tmp_path, capsys):
    refuses(evaluate.main, ["--videos", str(tmp_path / "nope")], capsys, "video folder not found")
    (tmp_path / "empty").mkdir()
    refuses(evaluate.main, ["--videos", str(tmp_path / "empty")], capsys, "prompts.jsonl", "not found")


def test_evaluate_bad_flags(capsys):
    refuses(evaluate.main, ["--preset", "huge", "--real", "2"], capsys, "unknown")
    refuses(evaluate.main, ["--real", "0"], capsys, "--real must be >= 1")


def test_evaluate_one_video_gives_json_null_for_fvd(tmp_path, capsys):
    v, caps, _ = data.make_batch(data.get_config("tiny"), 1, seed=3, split="eval")
    data.save_video(str(tmp_path / "a.gif"), v[0])
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"file": "a.gif", "prompt": caps[0]}) + "\n")
    evaluate.main(["--videos", str(tmp_path), "--json"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in last and json.loads(last)["fvd"] is None


# ----------------------------------------------------------------------------------------------
# deploy.py (the broken bundles are in test_deploy.py, which builds one)
# ----------------------------------------------------------------------------------------------
def test_deploy_out_is_a_folder_of_user_files(user_files, capsys):
    refuses(deploy.main, ["--run", SHIPPED, "--out", user_files], capsys, "did not write", "left untouched",
            keep=[user_files])


def test_deploy_out_is_a_file(user_files, capsys):
    refuses(deploy.main, ["--run", SHIPPED, "--out", os.path.join(user_files, "notes.txt")], capsys, "is a file",
            keep=[user_files])


def test_deploy_missing_run_and_no_arguments(tmp_path, capsys):
    refuses(deploy.main, ["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], capsys, "not found")
    refuses(deploy.main, [], capsys, "give --run RUN --out BUNDLE")
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_deploy_check_of_no_bundle_is_json_and_one_line(kind, user_files, capsys):
    path = os.path.join(user_files, "nope") if kind == "missing" else os.path.join(user_files, "notes.txt")
    assert deploy.main(["--check", path, "--json"]) == 2
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is False and path in res["problems"][0]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("not found" if kind == "missing" else "is a file") in err


# ----------------------------------------------------------------------------------------------
# data.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption", ["", "   ", "?!", 42, None, ["a red circle"]])
def test_clip_folder_refuses_empty_or_non_text_captions(caption, tmp_path):
    data.save_video(str(tmp_path / "a.gif"), data.make_batch(data.get_config("tiny"), 1, seed=0)[0][0])
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.gif", "caption": caption}) + "\n")
    with pytest.raises(ValueError, match="line 1: the caption must be a non-empty text") as e:
        data.ClipFolder(str(tmp_path), 32, 9)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, needles", [
    (["--preset", "huge"], ["unknown"]),
    (["--split", "test"], ["--split must be train or eval"]),
    (["--n", "0", "--preview", "/tmp/x.gif"], ["--n must be >= 1"]),
    (["--preview", "/tmp/x.mp4"], [".gif"]),
])
def test_data_cli_bad_flags(argv, needles, capsys):
    refuses(data.main, argv, capsys, *needles)


# ----------------------------------------------------------------------------------------------
# Atomic outputs
# ----------------------------------------------------------------------------------------------
def test_atomic_path_unique_temp_names_and_cleanup(tmp_path):
    target = str(tmp_path / "v.mp4")
    with safeio.atomic_path(target) as a, safeio.atomic_path(target) as b:   # two writers, one target
        assert a != b and os.path.dirname(a) == str(tmp_path) and a.endswith(".mp4")
        open(a, "w").write("A")
        open(b, "w").write("B")
    assert open(target).read() == "A" and os.listdir(tmp_path) == ["v.mp4"]   # whole files, no temp left
    with pytest.raises(KeyboardInterrupt):
        with safeio.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert open(target).read() == "A" and os.listdir(tmp_path) == ["v.mp4"]


def test_atomic_dir_replaces_only_its_own_directory(tmp_path, user_files):
    out = str(tmp_path / "bundle")
    for content in ("first", "second"):                        # its own directory: replaced
        with safeio.atomic_dir(out, ".mark", "tool") as d:
            open(os.path.join(d, "x"), "w").write(content)
    assert open(os.path.join(out, "x")).read() == "second" and sorted(os.listdir(tmp_path)) == ["bundle", "mine"]
    before = snapshot(user_files)
    with pytest.raises(safeio.UsageError, match="did not write"):   # anyone else's: refused, untouched
        with safeio.atomic_dir(user_files, ".mark", "tool"):
            pass
    assert snapshot(user_files) == before


def test_stream_warns_about_the_unknown_words_it_ignores(capsys):
    stream.main(["--run", SHIPPED, "--prompt", "a red zebra moves right", "--chunks", "1", "--json"])
    err = capsys.readouterr().err
    assert "warning" in err and "['zebra']" in err and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stream_killed_leaves_no_temporary_file(sig, tmp_path):
    out = tmp_path / "v.mp4"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "stream.py"), "--run", SHIPPED, "--prompt",
                             "a red circle moves right", "--chunks", "200", "--out", str(out), "--json"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # not ignored, as in a shell
    deadline = time.time() + 120
    while time.time() < deadline and not [f for f in os.listdir(tmp_path) if f.startswith(".v.mp4.")]:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".v.mp4.")], "the temporary video never appeared"
    time.sleep(1.0)                                            # a few chunks into the file
    proc.send_signal(sig)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
    assert os.listdir(tmp_path) == []                          # no half video, no temporary file


# ----------------------------------------------------------------------------------------------
# reproduce.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--run", SHIPPED, "--tables", "tab1,tab99"], ["unknown table 'tab99'"]),
    (["--run", SHIPPED, "--prompts", "0"], ["--prompts must be >= 1"]),
    (["--run", "/nonexistent/run"], ["pipeline.json not found", "train.py"]),
])
def test_reproduce_refuses_before_any_table(argv, needles, tmp_path, capsys):
    refuses(__import__("reproduce").main, argv + ["--out", str(tmp_path / "R.md")], capsys, *needles, keep=[SHIPPED])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The concept files' own CLIs (--run)
# ----------------------------------------------------------------------------------------------
def test_concept_clis_name_a_missing_or_broken_run(tmp_path, run_copy, capsys):
    import decoder
    import sandwich
    import search
    import vae
    run_cli = lambda prog, main: lambda argv: safeio.run_cli(prog, main, argv)
    refuses(run_cli("vae.py", vae.main), ["--run", str(tmp_path / "nope")], capsys, "pipeline.json not found")
    refuses(run_cli("decoder.py", decoder.main), ["--run", str(tmp_path / "nope")], capsys, "vae.pt not found")
    refuses(run_cli("decoder.py", decoder.main), ["--strip", str(tmp_path / "d.png")], capsys, "--strip needs --run")
    refuses(run_cli("decoder.py", decoder.main), ["--run", run_copy, "--strip", str(tmp_path / "d.gif")], capsys,
            "--strip must end in .png")
    (tmp_path / "folder.png").mkdir()
    refuses(run_cli("decoder.py", decoder.main), ["--run", run_copy, "--strip", str(tmp_path / "folder.png")], capsys,
            "is a directory")
    refuses(run_cli("decoder.py", decoder.main), ["--run", run_copy, "--clips", "0"], capsys, "--clips must be >= 1")
    refuses(run_cli("search.py", search.main), ["--run", run_copy], capsys, "search.done.json not found")
    refuses(run_cli("search.py", search.main), ["--run", run_copy, "--budget-ms", "-1"], capsys, "--budget-ms must be > 0")
    refuses(run_cli("search.py", search.main), ["--measure", "small/patchx"], capsys, "PRESET[/patchP][/Spx]")
    refuses(run_cli("search.py", search.main), ["--measure", "small/40px"], capsys, "frame side of 40 px")
    open(os.path.join(run_copy, "layout.json"), "w").write("{")
    refuses(run_cli("sandwich.py", sandwich.main), ["--run", run_copy], capsys, "layout.json", "not valid JSON")
    open(os.path.join(run_copy, "decoder.pt"), "wb").write(b"truncated")
    open(os.path.join(run_copy, "vae.pt"), "wb").write(b"truncated")
    refuses(run_cli("decoder.py", decoder.main), ["--run", run_copy], capsys, "vae.pt is corrupt or unreadable")


def test_atomic_dir_also_replaces_its_unmarked_older_output(tmp_path):
    """A bundle written before deploy.py marked its bundles is still its own: exactly its files."""
    out = tmp_path / "bundle"
    out.mkdir()
    for name in deploy.UNMARKED_BUNDLE:
        (out / name).write_text("old")
    with safeio.atomic_dir(str(out), deploy.BUNDLE_MARKER, "deploy.py", deploy.UNMARKED_BUNDLE) as d:
        open(os.path.join(d, "new"), "w").write("new")
    assert sorted(os.listdir(out)) == sorted(["new", deploy.BUNDLE_MARKER])
    (tmp_path / "other").mkdir()
    for name in deploy.UNMARKED_BUNDLE + ("my_notes.txt",):    # one file more: not only ours, refused
        (tmp_path / "other" / name).write_text("old")
    with pytest.raises(safeio.UsageError, match="did not write"):
        with safeio.atomic_dir(str(tmp_path / "other"), deploy.BUNDLE_MARKER, "deploy.py", deploy.UNMARKED_BUNDLE):
            pass
    assert len(os.listdir(tmp_path / "other")) == len(deploy.UNMARKED_BUNDLE) + 1


def test_every_get_config_is_a_fresh_copy_and_names_what_is_unknown():
    """get_config hands out a deep copy (editing it, or a list inside it, leaves the preset alone),
    applies overrides, and an unknown preset or field is a ValueError listing what is known."""
    lookups = [m.get_config for m in (data, decoder, deploy, distill, dit, evaluate, flow, lcha, quantize,
                                      search, text, train, vae)] + [distill.get_kd_config]
    for get in lookups:
        a, b = get("tiny"), get("tiny")
        assert a == b and a is not b, get.__module__
        for f in dataclasses.fields(a):
            value = getattr(a, f.name)
            if isinstance(value, list):
                value.append("edited")
                assert getattr(get("tiny"), f.name) != value, (get.__module__, f.name)
        first = dataclasses.fields(a)[0]
        assert getattr(get("tiny", **{first.name: getattr(b, first.name)}), first.name) == getattr(b, first.name)
        with pytest.raises(ValueError, match="known presets"):
            get("huge")
        with pytest.raises(ValueError, match=r"unknown .* field\(s\) \['no_such_field'\]"):
            get("tiny", no_such_field=1)
