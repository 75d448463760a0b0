"""The paper's tables at toy scale (docs/design.md, tables), measured on this machine and written to RESULTS.md.

    python reproduce.py --run runs/small            # after `python train.py`; reuses the run's stages

| paper    | toy experiment here |
|----------|---------------------|
| Tab. 1   | teacher, T_theta, S2DiT-Pretrained, -KD, -AR: params and VBench-lite (quality, semantic, total) |
| Tab. 3   | searched layout vs hourglass / all-LCHA / all-SSA / random (Eq. 10 loss, latency); LCHA vs local-only vs linear-only |
| Tab. A1  | S2DiT-AR: separately distilled 1-, 2- and 4-step students, each at its own step count |
| Tab. A2  | reference VAE decoder vs efficient decoder |
| Tab. A3  | latency breakdown of one chunk on this CPU, FPS |
| Tab. A5  | full attention vs SANA-style linear attention vs LCHA: latency, eval loss, alignment, FVD-lite |
| Tab. A6  | 30-chunk streams: subject / background consistency, all-attention AR vs S2DiT-AR |
| Tab. A7  | S2DiT-AR distilled without the teacher (its own pretrained model as the real score), 2 steps both |

Non-streaming models (teacher, T_theta, Pretrained, KD) sample the whole 3-chunk clip with the Euler
sampler + CFG at a shared t (their "full-step" setting); the AR students stream chunk by chunk.
Extra training (Tab. 3 / A5 ablations, Tab. A1's 1- and 4-step students, Tab. A7's second DMD) is
written into the run as stages `ablate_*`, `dmd_1step`, `dmd_4step` and `dmd_noteacher` and reused by
later invocations; the 2-step student is the pipeline's own `dmd` stage.

Each table goes into its own marked block of RESULTS.md (`<!-- reproduce.py tab1: begin -->` ... `end -->`);
the report's prose around the blocks is left as it is (write_results below).
"""
import copy
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import torch

import curves
import data
import dist
import evaluate
import flow
import runs
import safeio
import sandwich
import stream
import text as text_mod
import train
from dit import count_params

ATTN_KINDS = ("lcha", "local", "linear")


def prompts_for(n):
    return [data.canonical_prompt(*a) for a in data.eval_prompts(n)]


@torch.no_grad()
def sample_full(run, model, prompts, seed=0):
    """Whole-clip Euler + CFG sampling of a (block-causal) flow model, decoded by the VAE decoder."""
    cfg, fcfg = run.cfg, flow.get_config(run.cfg.preset)
    encoder, tokenizer = run.text()
    tokens, _, mask = text_mod.encode_text(encoder, tokenizer, prompts)
    n_text, n_mask = run.null_text()
    hw = runs.latent_hw(cfg)
    T = 1 + (cfg.clip_frames - 1) // 4
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.cfg.in_channels, T, hw, hw, generator=g).to(run.device)
    B = len(prompts)

    def v_fn(x, t):                                                     # t (B,) -> one t for every frame
        return flow.cfg_predict(model, x, t[:, None].expand(B, T), tokens, mask, n_text, n_mask,
                                   fcfg.cfg_scale, causal=True)
    z = flow.sample_euler(v_fn, noise, fcfg.sample_steps, fcfg.shift)
    return run.vae().decode(z).clamp(-1, 1)                             # (B, 3, F, H, W)


@torch.no_grad()
def sample_ar(models, prompts, steps, chunks=3, seed=0):
    vids = [torch.cat([c.frames for c in stream.stream(models, p, chunks, steps, seed + i)], dim=1)
            for i, p in enumerate(prompts)]
    return torch.stack(vids)                                            # (B, 3, F, H, W)


def score(videos, prompts, seed=0):
    """VBench-lite to 3 decimals, and n, the videos scored (the report's intervals need it)."""
    s = evaluate.score_videos(videos, prompts, seed=seed)
    return {"n": s["n"], **{k: round(float(s[k]), 3) for k in ("color_acc", "shape_acc", "direction_acc", "semantic",
                                                                 "quality", "total", "fvd", "subject_consistency",
                                                                 "background_consistency", "dynamic_degree") if k in s}}


def streaming_models(run, stage, steps=None):
    if stage in runs.DIT_STAGES:
        return runs.load_streaming(run.dir, stage, run.device)
    system = runs.load_streaming(run.dir, device=run.device)            # any DiT stage of the run, streamed
    return replace(system, model=run.model(stage).eval(), name=stage, stage=stage, steps=steps)


def student(run, stage, n_steps, without_teacher=False):
    """The streaming system of the DMD student `stage`, distilled for n_steps. The pipeline's `dmd`
    (n_steps = sample_steps) comes from train.py; the other students are reproduce.py's own stages,
    distilled here by train.stage_dmd once per run (again if the file was distilled for other steps)."""
    if stage != "dmd" and not (run.done(stage) and run.metrics(stage)["config"]["n_steps"] == n_steps):
        t0 = time.time()
        m = train.stage_dmd(run, without_teacher=without_teacher, name=stage, n_steps=n_steps)
        run.finish(stage, m, time.time() - t0, run.device)
    system = runs.load_streaming(run.dir, stage, run.device)
    if system.steps != n_steps:             # a run from when one 4-step student served 1, 2 and 4 steps
        raise ValueError(f"{run.path(stage + '.pt')} was distilled for {system.steps} steps, not {n_steps}; "
                         f"distil it again: `python train.py {train.preset_args(run.cfg)} --out {run.dir} "
                         f"--force dmd,deploy,sample`")
    return system


def ar_students(run):
    """Tab. A1: {T: the student distilled for T steps} for T = 1, 2, 4 (one DMD run each)."""
    return {n: student(run, "dmd" if n == run.cfg.sample_steps else f"dmd_{n}step", n) for n in (1, 2, 4)}


# ----------------------------------------------------------------------------------------------
def table1_a1(run, n, seed):
    prompts = prompts_for(n)
    rows, videos = {}, {}
    for name, stage in (("teacher (2 experts)", "teacher"), ("T_theta (all attention)", "base"),
                        ("S2DiT-Pretrained", "pretrain"), ("S2DiT-KD", "kd")):
        model = run.model(stage).eval()
        v = sample_full(run, model, prompts, seed)
        videos[name] = v
        rows[name] = {"params": count_params(model), "setting": "full-step Euler + CFG", **score(v, prompts, seed)}
    a1, students = {}, ar_students(run)
    for steps, ar in students.items():                                 # each student at its own step count
        v = sample_ar(ar, prompts, steps, seed=seed)
        a1[f"{steps} step{'s' * (steps > 1)}"] = {"student": ar.stage, **score(v, prompts, seed)}
        videos[f"S2DiT-AR {steps}-step"] = v
    k = run.cfg.sample_steps                                            # Tab. 1's AR row: the pipeline's student
    if os.path.exists(run.path("dmd_ode.pt")):                          # the same student before DMD
        ode = streaming_models(run, "dmd_ode", steps=k)
        v = sample_ar(ode, prompts, k, seed=seed)
        videos[f"S2DiT-AR {k}-step, ODE init only"] = v
        rows["S2DiT-AR before DMD (ODE init only)"] = {"params": count_params(ode.model),
                                                       "setting": f"streaming, {k} steps", **score(v, prompts, seed)}
    rows["S2DiT-AR"] = {"params": count_params(students[k].model), "setting": f"streaming, {k} steps",
                        **{c: v for c, v in a1[f"{k} steps"].items() if c != "student"}}
    return rows, a1, videos, prompts


def table3(run, steps, seed):
    m = run.metrics("search")
    rows = {k: {"layout": "".join("L" if x else "S" for x in r["layout"]), "latency_ms": round(r["latency_ms"], 2),
                "fits_budget": r["fits"], "eq10_loss": round(r["eq10_loss"], 5)} for k, r in m["rows"].items()}
    ablation = {}
    for kind in ATTN_KINDS:
        ablation[kind] = ablate(run, f"ablate_{kind}", lambda: variant_s2dit(run, kind), steps, seed)
    return {"budget_ms": m["budget_ms"], "k": m["k"], "layouts": rows, "attention": ablation}


def variant_s2dit(run, kind):
    base = run.model("base")
    layout = tuple(json.load(open(run.path("layout.json")))["layout"])
    model = sandwich.S2DiT(base.cfg, layout, attn=kind).to(run.device)
    sandwich.inherit_from(model, base)
    return model


def variant_all(run, kind):
    base = run.model("base")
    if kind == "attention":
        return copy.deepcopy(base)
    if kind == "sana":
        model = sandwich.sana_dit(base.cfg)
    else:
        model = sandwich.S2DiT(base.cfg, (1,) * (base.cfg.depth // 2), attn=kind)
    model.to(run.device)
    sandwich.inherit_from(model, base)
    return model


def ablate(run, stage, make, steps, seed):
    """Fine-tune a variant (inheriting T_theta) for `steps` flow-matching updates, once per run; report
    the held-out flow-matching loss and the latency of one chunk."""
    if run.done(stage):
        return run.metrics(stage)
    t0 = time.time()
    model = make().requires_grad_(True)
    trained, m = train.fm_stage(run, model, steps, "base", ema=False)   # short runs: the raw weights
    out = {"params": count_params(trained), "train_loss_last": m["loss_last"],
           "eval_loss": heldout_fm_loss(run, trained, seed), "chunk_ms": chunk_ms(trained, run)}
    with safeio.atomic_path(run.path(f"{stage}.pt")) as tmp:
        torch.save({k: v.cpu() for k, v in trained.state_dict().items()}, tmp)
    run.finish(stage, out, time.time() - t0, run.device)
    return out


@torch.no_grad()
def heldout_fm_loss(run, model, seed, batches=6):
    fn = runs.dit_batches(run, 6, 424_242)
    g = torch.Generator().manual_seed(seed)
    return round(sum(flow.fm_loss(model, *fn(i), p_uncond=0.0, generator=g).item() for i in range(batches)) / batches, 5)


@torch.no_grad()
def chunk_ms(model, run, repeats=5):
    hw = runs.latent_hw(run.cfg)
    x, t = torch.randn(1, model.cfg.in_channels, 3, hw, hw).to(run.device), torch.rand(1, 3).to(run.device)
    text, mask = torch.randn(1, 8, model.cfg.text_dim).to(run.device), torch.ones(1, 8, dtype=torch.bool).to(run.device)
    model.eval()(x, t, text, mask)
    ts = []
    for _ in range(repeats):
        s = time.perf_counter()
        model(x, t, text, mask)
        ts.append(time.perf_counter() - s)
    return round(1e3 * sorted(ts)[len(ts) // 2], 2)


def table_a5(run, n, steps, seed):
    prompts = prompts_for(n)
    rows = {}
    for kind, label in (("attention", "full attention"), ("sana", "SANA-style linear attention"), ("lcha", "LCHA")):
        stage = f"ablate_all_{kind}"
        res = ablate(run, stage, lambda: variant_all(run, kind), steps, seed)
        model = variant_all(run, kind)
        model.load_state_dict(torch.load(run.path(f"{stage}.pt"), map_location="cpu", weights_only=True))
        s = score(sample_full(run, model.eval(), prompts, seed), prompts, seed)
        rows[label] = {**res, "n": s["n"], "semantic": s["semantic"], "fvd": s.get("fvd")}
    return rows


def table_a3(run, chunks, seed):
    rows = {}
    for steps, ar in ar_students(run).items():
        r = stream.run(ar, prompts_for(1)[0], chunks, steps, seed, progress=False)
        rows[f"{steps} step{'s' * (steps > 1)}"] = {"student": ar.stage, "chunks": chunks,
                                                    "text_encoder_ms": round(r["breakdown_ms"]["text_encoder"], 2),
                                                    "dit_per_step_ms": round(r["breakdown_ms"]["dit_per_step"], 2),
                                                    "commit_ms": round(r["breakdown_ms"]["commit"], 2),
                                                    "decoder_ms": round(r["breakdown_ms"]["decoder"], 2),
                                                    "chunk_ms": round(r["chunk_ms"], 2), "fps": round(r["fps"], 1)}
    return rows


def table_a6(run, n, chunks, seed):
    prompts = prompts_for(n)
    rows = {}
    ar = student(run, "dmd", run.cfg.sample_steps)
    base = streaming_models(run, "base")
    for label, models, steps in ((f"S2DiT-AR ({ar.steps} steps)", ar, ar.steps),
                                 ("all-attention AR (T_theta, no DMD, 8 steps)", base, 8)):
        v = sample_ar(models, prompts, steps, chunks=chunks, seed=seed)
        s = evaluate.score_videos(v, prompts, seed=seed)
        rows[label] = {"streams": len(prompts), "frames": v.shape[2],
                       "subject_consistency": round(s["subject_consistency"], 3),
                       "background_consistency": round(s["background_consistency"], 3),
                       "semantic": round(s["semantic"], 3)}
    return rows


def table_a7(run, n, seed):
    """Like with like: both students distilled for, and streamed at, the pipeline's sample_steps."""
    prompts, steps = prompts_for(n), run.cfg.sample_steps
    rows = {}
    for label, stage in (("with the teacher (S2DiT-AR, `dmd`)", "dmd"),
                         ("without the teacher (`dmd_noteacher`)", "dmd_noteacher")):
        models = student(run, stage, steps, without_teacher=stage == "dmd_noteacher")
        rows[label] = {"student": stage, "steps": steps, **score(sample_ar(models, prompts, steps, seed=seed), prompts, seed)}
    return rows


TABLES = ("tab1", "tab3", "taba2", "taba3", "taba5", "taba6", "taba7", "bench")
AR_TABLES = ("tab1", "taba1", "taba3", "taba6", "taba7")               # the tables that stream DMD students


def compute(name, run, args, out_dir):
    """One table (tab1 also gives Tab. A1 and the picture grid)."""
    n, s = args.prompts, args.seed
    if name == "tab1":
        t1, a1, videos, prompts = table1_a1(run, n, s)
        names = list(videos)                                            # pictures: first 4 prompts x models
        grid = torch.stack([videos[m][i][:, ::2] for i in range(min(4, n)) for m in names])  # every 2nd frame
        labels = [f"{m}: {prompts[i]}" for i in range(min(4, n)) for m in names]
        path = os.path.join(out_dir, "assets", "results_grid.gif")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data.save_grid_gif(path, grid, labels, fps=8, ncol=len(names))     # 8 FPS: real time at stride 2
        return {"tab1": t1, "taba1": a1, "grid": path}
    if name == "tab3":
        return {"tab3": table3(run, args.ablate_steps, s)}
    if name == "taba2":
        return {"taba2": run.metrics("decoder")["table_a2"], "decoder_updates": run.metrics("decoder").get("steps")}
    if name == "taba3":
        return {"taba3": table_a3(run, 8, s)}
    if name == "taba5":
        return {"taba5": table_a5(run, n, args.ablate_steps, s)}
    if name == "taba6":
        return {"taba6": table_a6(run, min(n, 4), args.a6_chunks, s)}
    if name == "taba7":
        return {"taba7": table_a7(run, n, s)}
    return {"bench": sandwich.bench(run.cfg.preset, device=run.device)}


# ----------------------------------------------------------------------------------------------
# RESULTS.md: each table sits in a block of its own, between `<!-- reproduce.py NAME: begin -->` and
# `<!-- reproduce.py NAME: end -->`, and only the text between the markers is replaced. The report
# around the blocks (its prose, the paper's tables, curves.py's blocks) stays byte for byte; a block not
# yet in the file is appended at its end under a heading. Rates carry their 95% Wilson interval; the
# line above a table gives its sample count, the command, the date and the commit.
RATES = {"color_acc": "colour", "shape_acc": "shape", "direction_acc": "direction",         # fractions of n videos
         "dynamic_degree": "dynamic degree"}
SCORES = {"subject_consistency": "subject consistency", "background_consistency": "background consistency",
          "fvd": "FVD-lite (lower is better)", "semantic": "semantic", "quality": "quality", "total": "total"}
VBENCH = [*RATES, "subject_consistency", "background_consistency", "fvd", "semantic", "quality", "total"]
ATTENTION = {"lcha": "LCHA", "local": "local path only", "linear": "linear path only"}     # Tab. 3 (b)'s rows


def rate(p, n):
    """A fraction of n videos with its 95% Wilson interval: '0.67 [0.39, 0.86]'."""
    lo, hi = curves.wilson(p, n)
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def n_videos(rows, res):
    return next(iter(rows.values())).get("n", res["n_prompts"])     # a store from before rows kept n


def vbench(r, keys, n):
    """One row's VBench-lite cells: rates with their interval, composite scores to 2 decimals."""
    def cell(k):
        if r.get(k) is None:                                            # FVD-lite of a single video
            return ""
        return rate(r[k], r.get("n", n)) if k in RATES else f"{r[k]:.2f}"
    return [cell(k) for k in keys]


def head(keys):
    return [RATES.get(k) or SCORES[k] for k in keys]


def md(columns, rows):
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def wrapped(paragraph):
    """Prose wrapped at 100 columns as the report's; a table as it is."""
    if paragraph.startswith("|"):
        return paragraph
    return textwrap.fill(paragraph, 100, break_on_hyphens=False, break_long_words=False)


def millions(params):
    return f"{params / 1e6:.2f}M"


def lowest_in_bold(values, digits):
    return [f"**{v:.{digits}f}**" if v == min(values) else f"{v:.{digits}f}" for v in values]


def slashed(values):
    return " / ".join(f"{v:.2f}" for v in values)


def ordering(values, n, is_rate=False):
    """The paper's ordering values[0] < values[1] < ... at toy scale, n videos per value: 'holds', 'does
    not hold', or a tie when a step is inside the noise: rates whose 95% intervals overlap, composite
    scores less than one video's change (1/n) apart."""
    def apart(a, b):
        if is_rate:
            (lo_a, hi_a), (lo_b, hi_b) = curves.wilson(a, n), curves.wilson(b, n)
            return hi_a < lo_b or hi_b < lo_a
        return abs(b - a) >= 1 / n
    steps = list(zip(values, values[1:]))
    if any(b < a and apart(a, b) for a, b in steps):
        return "does not hold"
    if all(b > a and apart(a, b) for a, b in steps):
        return "holds"
    if is_rate:
        return "a tie (the 95% intervals overlap)"
    return f"a tie, within one video's change (1/{n} = {1 / n:.2f})"


def holds(cond):
    """For single measurements (a loss, a latency): no interval to tie in."""
    return "holds" if cond else "does not hold"


def made(res, table, count=None):
    """The line above a table: its sample count, then the command, the date and the commit that made it."""
    m = res.get("made", {}).get(table)
    how = m and f"Made by `{m['cmd']}` on {m['date']}" + (f", commit {m['commit']}" if m["commit"] else "")
    parts = [p for p in (count, how) if p]
    return ". ".join(parts) + "." if parts else ""


def stamp(argv):
    """How a table is made now: the command, today's date and the checkout's commit ('' outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cmd": shlex.join(["python", "reproduce.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": time.strftime("%Y-%m-%d"), "commit": commit}


# One function per block, each a list of paragraphs: the line above, the table(s), the paper's ordering.
def block_tab1(res):
    t1 = res["tab1"]
    n = n_videos(t1, res)
    semantic = ["color_acc", "shape_acc", "direction_acc", "semantic"]
    quality = ["subject_consistency", "background_consistency", "dynamic_degree", "fvd", "quality", "total"]
    kd, pre = t1["S2DiT-KD"]["total"], t1["S2DiT-Pretrained"]["total"]
    return [made(res, "tab1", f"n = {n} held-out prompts, one video each"),
            md(["model", "params", "setting", *head(semantic)],
               [[name, millions(r["params"]), r["setting"], *vbench(r, semantic, n)] for name, r in t1.items()]),
            md(["model", *head(quality)], [[name, *vbench(r, quality, n)] for name, r in t1.items()]),
            f"*Paper's ordering:* KD > Pretrained (total 83.62 vs 82.40). Toy: total {kd:.2f} vs {pre:.2f}, "
            f"{ordering([pre, kd], n)}."]


def block_taba1(res):
    a1 = res["taba1"]
    n = n_videos(a1, res)
    total, dynamic = [r["total"] for r in a1.values()], [r["dynamic_degree"] for r in a1.values()]
    return [made(res, "tab1", f"n = {n} held-out prompts, one video each"),
            md(["steps", "student", *head(VBENCH)],
               [[k.split()[0], f"`{r['student']}`", *vbench(r, VBENCH, n)] for k, r in a1.items()]),
            "*Paper's ordering:* more steps score higher (total 80.37 < 82.69 < 83.26, dynamic degree 55.09 < 57.50 "
            f"< 59.17). Toy: total {slashed(total)}, {ordering(total, n)}; dynamic degree {slashed(dynamic)}, "
            f"{ordering(dynamic, n, is_rate=True)}."]


def block_taba7(res):
    a7 = res["taba7"]
    n = n_videos(a7, res)
    with_teacher, without = (r["total"] for r in a7.values())
    return [made(res, "taba7", f"n = {n} held-out prompts, one video each"),
            md(["model", *head(VBENCH)], [[name, *vbench(r, VBENCH, n)] for name, r in a7.items()]),
            "*Paper's ordering:* with the teacher > without (total 83.26 vs 83.04). Toy: total "
            f"{with_teacher:.2f} vs {without:.2f}, {ordering([without, with_teacher], n)}."]


def block_tab3a(res):
    t3 = res["tab3"]
    rows = {}                                                           # one row per layout: "searched = hourglass"
    for name, r in t3["layouts"].items():
        rows.setdefault(r["layout"], {**r, "names": []})["names"].append(name)
    rows = list(rows.values())
    best_within_budget = min(r["eq10_loss"] for r in rows if r["fits_budget"])
    return [made(res, "tab3", f"Budget {t3['budget_ms']:.1f} ms, k = {t3['k']}"),
            md(["layout", "groups", "latency (ms)", "within budget", "Eq. 10 loss"],
               [[" = ".join(r["names"]), f"`{' '.join(r['layout'])}`", f"{r['latency_ms']:.1f}",
                 "yes" if r["fits_budget"] else "no", loss]
                for r, loss in zip(rows, lowest_in_bold([r["eq10_loss"] for r in rows], 2))]),
            "*Paper's claim:* the searched sandwich beats single-attention and hourglass layouts at equal latency "
            f"(numbers not available to us). Toy: {holds(t3['layouts']['searched']['eq10_loss'] <= best_within_budget)}, "
            "the searched layout has the lowest Eq. 10 loss within budget (one evaluation)."]


def attention_table(rows, n=None):
    """Tab. 3 (b) and A5: attention kinds fine-tuned from T_theta (A5 adds semantic and FVD-lite)."""
    extra = ["semantic", "fvd"] if n else []
    return md(["attention", "params", "last training loss", "eval loss", "ms per chunk", *head(extra)],
              [[ATTENTION.get(kind, kind), millions(r["params"]), f"{r['train_loss_last']:.2f}", loss,
                f"{r['chunk_ms']:.1f}", *vbench(r, extra, n)]
               for (kind, r), loss in zip(rows.items(), lowest_in_bold([r["eval_loss"] for r in rows.values()], 3))])


def block_tab3b(res):
    loss = {k: r["eval_loss"] for k, r in res["tab3"]["attention"].items()}
    return [made(res, "tab3", "One run each, eval loss on 6 held-out batches of 6 clips"),
            attention_table(res["tab3"]["attention"]),
            "*Paper's claim:* LCHA beats its local path alone on every metric (numbers not available to us). Toy: "
            f"{holds(loss['lcha'] < min(loss['local'], loss['linear']))}, eval loss {loss['lcha']:.3f} against "
            f"local only {loss['local']:.3f} and linear only {loss['linear']:.3f} (one run each)."]


def block_taba5(res):
    a5 = res["taba5"]
    n = n_videos(a5, res)
    _, sana, lcha = (r["eval_loss"] for r in a5.values())             # full attention, SANA-style, LCHA
    return [made(res, "taba5", f"n = {n} held-out prompts for semantic and FVD-lite, one video each"),
            attention_table(a5, n),
            "*Paper's ordering:* LCHA beats SANA-Video (L_eval 0.259 vs 0.265; full attention, 0.252, does not fit "
            f"the phone). Toy: {holds(lcha < sana)}, eval loss {lcha:.3f} vs {sana:.3f} (one run each)."]


def block_bench(res):
    b = res["bench"]
    label = {"attention": "all-attention DiT", "sana": "SANA-style linear DiT",
             "s2dit": f"S2DiT (`{' '.join('L' if m else 'S' for m in sandwich.DEFAULT_LAYOUT[b['preset']])}`)"}
    slope = b["loglog_slope"]
    sizes = [f"{tokens} tokens ({px} px), ms" for tokens, px in zip(b["tokens"], b["frame_px"])]
    return [made(res, "bench", f"One forward of one chunk, median of 5, {b['threads']} threads"
                 + (f", on {b['device']}" if b.get("device", "cpu") != "cpu" else "")),
            md(["model", *sizes, "log-log slope"],
               [[label.get(k, k), *(f"{ms:.1f}" for ms in v), f"{slope[k]:.2f}"] for k, v in b["latency_ms"].items()]),
            "*Paper:* full attention runs out of memory on the phone where LCHA takes 900 ms (Tab. A5). Toy: "
            f"{holds(slope['s2dit'] <= 1.2 and slope['s2dit'] < slope['attention'])}, S2DiT grows near-linearly "
            f"(slope {slope['s2dit']:.2f}), full attention faster ({slope['attention']:.2f}) and "
            f"{b['ratio_attention_over_s2dit'][-1]:.1f}x slower than S2DiT at {b['tokens'][-1]} tokens."]


def block_taba2(res):
    a2 = res["taba2"]
    ref, eff = a2["vae_decoder"], a2["efficient_decoder"]
    fewer, faster = ref["params"] / eff["params"], ref["latency_ms_per_chunk"] / eff["latency_ms_per_chunk"]
    return [made(res, "taba2", f"n = {a2['clips']} held-out clips of {a2['frames']} frames"),
            md(["efficient decoder recipe", "updates", "params", "ms per chunk, reference / efficient",
                "PSNR (dB), reference / efficient", "SSIM, reference / efficient"],
               [[f"this run's (`{res.get('recipe') or '--preset ' + res['preset']}`)", res.get("decoder_updates") or "",
                 f"{millions(eff['params'])} vs {millions(ref['params'])} ({fewer:.1f}x fewer)",
                 f"{ref['latency_ms_per_chunk']:.1f} / {eff['latency_ms_per_chunk']:.1f} ({faster:.1f}x faster)",
                 f"{ref['psnr']:.1f} / {eff['psnr']:.1f}", f"{ref['ssim']:.2f} / {eff['ssim']:.2f}"]]),
            "*Paper:* the efficient decoder is 4x smaller, real time, 0.45 dB below the VAE decoder (31.71 vs "
            f"32.16 dB). Toy: {fewer:.1f}x smaller, {faster:.1f}x faster, {ref['psnr'] - eff['psnr']:.1f} dB below."]


def block_taba3(res):
    a3 = res["taba3"]
    chunks = next(iter(a3.values())).get("chunks")
    return [made(res, "taba3", chunks and f"{chunks} chunks of the first held-out prompt, mean per chunk"),
            md(["steps", "student", "text encoder, once (ms)", "DiT per step (ms)", "commit (ms)", "decoder (ms)",
                "per chunk of 12 frames (ms)", "FPS"],
               [[k.split()[0], f"`{r['student']}`", *(f"{r[c]:.1f}" for c in ("text_encoder_ms", "dit_per_step_ms",
                 "commit_ms", "decoder_ms", "chunk_ms")), f"{r['fps']:.0f}"] for k, r in a3.items()]),
            "*Paper:* 1124 ms per chunk at 4 steps on an iPhone 16 Pro Max, 10.7 FPS. Toy: "
            f"{holds(all(r['fps'] > 16 for r in a3.values()))}, every student streams faster than the 16 FPS "
            "playback."]


def block_taba6(res):
    a6 = res["taba6"]
    first = next(iter(a6.values()))                                     # streams: not in stores before it was kept
    count = "streams" in first and f"n = {first['streams']} held-out prompts, one stream of {first['frames']} frames each"
    scores = ["subject_consistency", "background_consistency", "semantic"]
    return [made(res, "taba6", count),
            md(["model", "streams", "frames", *head(scores)],
               [[name, r.get("streams", ""), r["frames"], *vbench(r, scores, None)] for name, r in a6.items()]),
            "*Paper:* S2DiT-AR keeps 30-second videos as consistent as the server-side AR model (subject consistency "
            "95.03 vs 95.05); compare the rows."]


BLOCKS = {  # block: (the `--tables` name that computes it, its heading when appended, its paragraphs)
    "tab1": ("tab1", "Tab. 1: the models of the chain", block_tab1),
    "taba1": ("tab1", "Tab. A1: denoising steps of the streaming student", block_taba1),
    "taba7": ("taba7", "Tab. A7: DMD without the teacher", block_taba7),
    "tab3a": ("tab3", "Tab. 3 (a): the searched layout", block_tab3a),
    "tab3b": ("tab3", "Tab. 3 (b): LCHA against its two paths", block_tab3b),
    "taba5": ("taba5", "Tab. A5: attention kinds", block_taba5),
    "bench": ("bench", "Latency against tokens", block_bench),
    "taba2": ("taba2", "Tab. A2: decoders", block_taba2),
    "taba3": ("taba3", "Tab. A3: latency of one chunk", block_taba3),
    "taba6": ("taba6", "Tab. A6: 30-chunk streams", block_taba6),
}


def marker(name, end=False):
    return f"<!-- reproduce.py {name}: {'end' if end else 'begin'} -->"


def read_report(path):
    """The report's text ('' when it does not exist yet). A block's markers must be both absent or both
    present once, begin first: otherwise replacing the block could swallow the prose after it."""
    text = open(path).read() if os.path.exists(path) else ""
    for name in BLOCKS:
        begin, end = marker(name), marker(name, end=True)
        found = (text.count(begin), text.count(end))
        if found != (0, 0) and (found != (1, 1) or text.index(begin) > text.index(end)):
            raise safeio.UsageError(f"{path}: block {name} needs one `{begin}` followed by one `{end}`, found "
                                    f"{found[0]} and {found[1]}; mend the markers (or delete both to have the block "
                                    f"appended at the end); the file is left as it is")
    return text


def write_results(path, res):
    """Every table computed so far into its block of the report at `path`, written atomically; returns the
    blocks written."""
    text = read_report(path) or "# Results: the paper's tables at toy scale\n"
    written = [name for name, (table, _, _) in BLOCKS.items() if table in res]
    for name in written:
        _, heading, paragraphs = BLOCKS[name]
        body = "\n\n".join(wrapped(p) for p in paragraphs(res) if p)
        begin, end = marker(name), marker(name, end=True)
        if begin in text:
            text = text[:text.index(begin) + len(begin)] + f"\n{body}\n" + text[text.index(end):]
        else:
            text = text.rstrip("\n") + f"\n\n## {heading}\n\n{begin}\n{body}\n{end}\n"
    safeio.write_text(path, text)
    return written


def main(argv=None):
    p = safeio.Parser(prog="reproduce.py", description="Reproduce the paper's tables at toy scale into RESULTS.md")
    p.add_argument("--run", default="runs/small", help="a completed train.py run")
    p.add_argument("--tables", default=",".join(TABLES), help=f"subset of {','.join(TABLES)} (others reused)")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts per VBench-lite score")
    p.add_argument("--ablate-steps", type=int, default=150, help="fine-tuning steps of each Tab. 3 / A5 variant")
    p.add_argument("--a6-chunks", type=int, default=30, help="chunks of the long streams of Tab. A6")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's)")
    p.add_argument("--out", default="RESULTS.md", help="where to write the tables")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    dist.add_device_arg(p)
    args = p.parse_args(argv)
    store = os.path.join(args.run, "reproduce.json")                    # tables computed so far (resumable)
    try:                                                                # every table name and file before any work
        unknown = [t for t in args.tables.split(",") if t not in TABLES]
        if unknown or not args.tables:
            raise ValueError(f"unknown table {(unknown or [''])[0]!r}; tables: {','.join(TABLES)}")
        for flag in ("prompts", "ablate_steps", "a6_chunks"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        safeio.check_writable_file(args.out)
        read_report(args.out)                                           # broken block markers: before any work
        run = runs.open_run(args.run, dist.pick_device(args.device))
        res = safeio.read_json(store, "table store") if os.path.exists(store) else {}
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    torch.set_num_threads(args.threads or run.cfg.threads)
    if res and not res.get("separate_students"):    # stored when one 4-step student served 1, 2 and 4 steps
        stale = [t for t in AR_TABLES if t in res]
        for t in stale:
            res.pop(t)
            res.get("seconds", {}).pop(t, None)
        print(f"{store}: dropped {stale}, measured with the old single DMD student; recompute them with "
              f"--tables {','.join(t for t in stale if t in TABLES)}")
    res.update({"seed": args.seed, "preset": run.cfg.preset, "recipe": train.preset_args(run.cfg),
                "n_prompts": args.prompts, "separate_students": True})
    res.setdefault("seconds", {})
    for name in args.tables.split(","):
        print(f"{name} ...", flush=True)
        t0 = time.time()
        res.update(compute(name, run, args, os.path.dirname(os.path.abspath(args.out))))
        res["seconds"][name] = time.time() - t0
        res.setdefault("made", {})[name] = stamp(argv)                  # the line above its blocks
        safeio.write_json(store, res, indent=1, default=str)
    print(f"wrote the blocks {', '.join(write_results(args.out, res))} into {args.out}")
    missing = [t for t in TABLES if t not in res]
    if missing:
        print(f"tables still to compute: {missing}")


if __name__ == "__main__":
    safeio.run_cli("reproduce.py", main)
