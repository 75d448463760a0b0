"""Data-parallel training on the CPU (gloo, 2 processes) against one process with the same global batch.

DDP averages the processes' gradients of their shards' mean losses: the same update as one process
on the whole batch, up to the order of float additions. So the weights agree to a tolerance, not
bit for bit (one process sums the batch in one pass, two processes sum halves and then the halves).
The loops (flow.train_fm, distill.train_kd, text.fit_text_encoder) are compared by how far apart
training took the weights, as a share of how far it moved them: ||a - b|| / ||a - w0|| over all
float weights, w0 the initial ones:

    FM_TOL   1e-4  flow matching with a loss weight, 4 updates: measured 6e-6; cached KD, 3 updates: 3e-6
    TEXT_TOL 1e-2  text encoder, 3 updates: measured 3e-3. Its attention's key bias has a gradient
                   that is zero up to rounding (softmax does not change when a constant is added to
                   every key score); Adam scales such noise up to a full step, whose sign then differs.
                   Without that bias: 5e-7.

A wrong split (both processes training on the same rows) lands at 0.25 (text), 0.7 (KD) and 1.3
(flow matching): the tests hold it above 10x the tolerance. The whole train.py under torchrun (VAE,
flow matching, MoE teacher, decoder) is compared by ||a - b|| / ||a|| < RTOL = 1e-5 (measured
2e-9 .. 1.3e-7). A killed and resumed 2-process loop ends equal, bit for bit, to one never
interrupted, and a killed torchrun of train.py resumes."""
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
import torch.multiprocessing as mp

import data
import dist
import distill
import dit
import flow
import kdcache
import runs
import safeio
import sandwich
import text as text_mod
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM_TOL, TEXT_TOL, RTOL = 1e-4, 1e-2, 1e-5


def rel_diff(a, b, w0=None):
    """||a - b|| / ||a - w0|| over the float tensors of two state dicts (w0 None: / ||a||)."""
    keys = [k for k in a if a[k].is_floating_point()]
    norm = lambda d: sum((d[k] ** 2).sum() for k in keys) ** 0.5     # noqa: E731
    ref = {k: a[k].double() - (0 if w0 is None else w0[k].double()) for k in keys}
    return float(norm({k: a[k].double() - b[k].double() for k in keys}) / norm(ref))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the loops themselves
def fm_model(seed=0):
    torch.manual_seed(seed)
    return dit.DiT(dit.get_config("tiny"))


def fm_batches(step):
    """A global batch of 4 clips, a function of the step (as runs.dit_batches): latents, text, mask,
    the null prompt, and a loss weight (object_weight: 1 + 4 on about a fifth of the latent pixels)."""
    g = torch.Generator().manual_seed(step)
    cfg = dit.get_config("tiny")
    text = torch.randn(4, 5, cfg.text_dim, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    weight = 1 + 4 * (torch.rand(4, 1, 6, 4, 4, generator=g) < 0.2).float()
    return torch.randn(4, cfg.in_channels, 6, 4, 4, generator=g), text, mask, text[:1] * 0, mask[:1], weight


def fit_fm(ckpt=None, kill_at=None, init_seed=0):
    def batches(step):
        if step == kill_at:
            raise KeyboardInterrupt                                  # as if the processes died here
        return fm_batches(step)
    model, _ = flow.train_fm(fm_model(init_seed), batches, 4, 1e-3, seed=3, ema_decay=0.9, progress=False,
                             warmup=2, ckpt=ckpt, ckpt_every_s=0.0)
    return model.state_dict()


def kd_student():
    torch.manual_seed(1)
    cfg = dit.get_config("tiny")
    return sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT["tiny"])


def build_kd_cache(out):
    """8 teacher tuples of a random two-expert teacher (off its zero-initialised head and gates)."""
    torch.manual_seed(2)
    teacher = dit.MoETeacher(dit.get_config("tiny"), 0.5).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kdcache.build_cache(teacher, lambda k: fm_batches(k)[:5], 8, out, 4, 0.5, 3.0, seed=0, progress=False)


def fit_kd(cache_dir):
    cfg = distill.KDConfig(steps=3, batch=4, lr=1e-3, ema=0.0)                # ema 0: the raw weights
    model, _ = distill.train_kd(kd_student(), kdcache.CachedKD(cache_dir), cfg, progress=False)
    return model.state_dict()


def text_encoder():
    return text_mod.build_text("tiny", words=data.vocabulary(), seed=0)


def fit_text():
    encoder, tokenizer, cfg = text_encoder()
    text_mod.fit_text_encoder(encoder, tokenizer, text_mod.data_batch_fn("tiny", 8, frames=9), 3, cfg.fit_lr,
                              seed=0, progress=False, eval_batches=1)
    return encoder.state_dict()


def _worker(rank, port, out, cache_dir):
    """One of 2 processes, as torchrun would start it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.setup(torch.device("cpu"))
    try:
        res = {"fm": fit_fm(), "text": fit_text(), "kd": fit_kd(cache_dir)}
        ckpt = os.path.join(out, "fm.ckpt.pt")
        try:
            fit_fm(ckpt, kill_at=2)                                  # process 0 saved update 2's state
        except KeyboardInterrupt:
            pass
        dist.barrier()
        res["ckpt_saved"] = os.path.exists(ckpt)
        res["fm_resumed"] = fit_fm(ckpt, init_seed=1)               # other initial weights: only the checkpoint
        res["ckpt_left"] = os.path.exists(ckpt)                     # can make it equal
        rows = dist.rows
        dist.rows = lambda batch: slice(0, batch // 2)               # a wrong split: both train on rows 0, 1
        try:
            res["fm_same_rows"], res["text_same_rows"], res["kd_same_rows"] = fit_fm(), fit_text(), fit_kd(cache_dir)
        finally:
            dist.rows = rows
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.cleanup()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    build_kd_cache(os.path.join(out, "cache"))
    mp.spawn(_worker, args=(free_port(), out, os.path.join(out, "cache")), nprocs=2)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1)] + [out]


def test_both_processes_hold_the_same_weights(two_processes):
    r0, r1, _ = two_processes
    for key in ("fm", "text", "kd", "fm_resumed"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)


# (stage, how the one-process reference is trained, its initial weights, updates, tolerance).
# Text pretraining: each process embeds its own clips; the gathered embeddings give every process
# the whole contrastive batch, so its loss (and gradient) is the one-process loss.
ONE_PROCESS = {
    "fm": ("flow matching", lambda out: fit_fm(), lambda: fm_model().state_dict(), 4, FM_TOL),
    "kd": ("cached KD", lambda out: fit_kd(os.path.join(out, "cache")), lambda: kd_student().state_dict(), 3, FM_TOL),
    "text": ("text encoder", lambda out: fit_text(), lambda: text_encoder()[0].state_dict(), 3, TEXT_TOL),
}


@pytest.mark.parametrize("key", list(ONE_PROCESS))
def test_two_processes_equal_one_process(key, two_processes):
    """Within tolerance of one process, and more than 10x the tolerance away from the same loop
    with both processes on the same rows (so the test can fail)."""
    name, fit_one, initial, updates, tol = ONE_PROCESS[key]
    one, w0 = fit_one(two_processes[2]), initial()
    d = rel_diff(one, two_processes[0][key], w0)
    wrong = rel_diff(one, two_processes[0][key + "_same_rows"], w0)
    print(f"{name}, {updates} updates: two processes vs one {d:.1e} (tolerance {tol:.0e}); "
          f"both on the same rows {wrong:.1e}")
    assert d < tol < wrong / 10


def test_killed_two_process_loop_resumes_bit_identically(two_processes):
    r0 = two_processes[0]
    assert r0["ckpt_saved"] and not r0["ckpt_left"]                  # process 0 wrote it, then removed it
    for k in r0["fm"]:
        assert torch.equal(r0["fm"][k], r0["fm_resumed"][k]), k


# ----------------------------------------------------------------------------- train.py under torchrun
STAGES = ["text", "vae", "latents", "base", "teacher", "decoder"]
SETS = {"text_steps": 2, "vae_steps": 4, "pool_clips": 16, "base_steps": 4, "teacher_steps": 4, "decoder_steps": 4}


def torchrun(out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--preset", "tiny", "--out", out, "--stages", ",".join(STAGES)]
    for k, v in SETS.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def untrained_text_stage(out, cfg):
    """The run's text stage as done, with the encoder untrained: its DDP is held above, and its
    probe would take most of this test's time."""
    os.makedirs(out)
    safeio.write_json(os.path.join(out, "pipeline.json"), asdict(cfg), indent=1)
    encoder, tokenizer, tcfg = text_encoder()
    text_mod.save_text(os.path.join(out, "text.pt"), encoder, tokenizer, tcfg, {})
    runs.Run(out, cfg).finish("text", {}, 0.0)


def test_torchrun_pipeline_matches_one_process_and_resumes_after_a_kill(tmp_path):
    one, two, cfg = str(tmp_path / "one"), str(tmp_path / "two"), train.get_config("tiny", **SETS)
    for out in (one, two):
        untrained_text_stage(out, cfg)
    train.run_pipeline(one, cfg, STAGES)
    proc = torchrun(two)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(two, "vae.done.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)                              # killed during a later stage
    proc.communicate(timeout=60)
    assert not os.path.exists(os.path.join(two, "decoder.done.json"))
    proc = torchrun(two)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "[vae] done already" in log and "on cpu x 2 processes" in log
    for stage in STAGES[1:]:
        assert runs.Run(two, None).marker(stage)["processes"] == 2, stage
        if stage == "latents":
            continue                                                 # fp16 VAE latents: compared through base
        a = torch.load(os.path.join(one, f"{stage}.pt"), weights_only=True)["state_dict"]
        b = torch.load(os.path.join(two, f"{stage}.pt"), weights_only=True)["state_dict"]
        d = rel_diff(a, b)
        print(f"{stage}: two processes vs one {d:.1e}")
        assert d < RTOL, stage


def test_a_process_count_that_does_not_split_the_batches_is_refused_before_any_work(monkeypatch):
    cfg = train.get_config("tiny")
    train.check_split(cfg)                                           # one process: anything goes
    monkeypatch.setattr(dist, "world", lambda: 2)
    train.check_split(cfg)                                           # tiny's batches are even
    monkeypatch.setattr(dist, "world", lambda: 3)
    with pytest.raises(ValueError, match="3 processes do not split the batches .*vae_batch"):
        train.check_split(cfg)
