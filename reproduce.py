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
"""
import copy
import json
import os
import platform
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
    s = evaluate.score_videos(videos, prompts, seed=seed)
    return {k: round(float(s[k]), 3) for k in ("color_acc", "shape_acc", "direction_acc", "semantic",
                                                 "quality", "total", "fvd", "subject_consistency",
                                                 "background_consistency", "dynamic_degree") if k in s}


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
                         f"distil it again: `python train.py --preset {run.cfg.preset} --out {run.dir} "
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
        rows[f"S2DiT-AR before DMD (ODE init only, {k} steps)"] = {"params": count_params(ode.model),
                                                                   "setting": "streaming", **score(v, prompts, seed)}
    rows[f"S2DiT-AR ({k} steps, streaming)"] = {"params": count_params(students[k].model), "setting": "streaming",
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
    for kind, label in (("attention", "full attention"), ("sana", "SANA-Video linear attention"), ("lcha", "LCHA")):
        stage = f"ablate_all_{kind}"
        res = ablate(run, stage, lambda: variant_all(run, kind), steps, seed)
        model = variant_all(run, kind)
        model.load_state_dict(torch.load(run.path(f"{stage}.pt"), map_location="cpu", weights_only=True))
        s = score(sample_full(run, model.eval(), prompts, seed), prompts, seed)
        rows[label] = {**res, "semantic": s["semantic"], "fvd": s.get("fvd")}
    return rows


def table_a3(run, chunks, seed):
    rows = {}
    for steps, ar in ar_students(run).items():
        r = stream.run(ar, prompts_for(1)[0], chunks, steps, seed, progress=False)
        rows[f"{steps} step{'s' * (steps > 1)}"] = {"student": ar.stage,
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
        rows[label] = {"frames": v.shape[2], "subject_consistency": round(s["subject_consistency"], 3),
                       "background_consistency": round(s["background_consistency"], 3),
                       "semantic": round(s["semantic"], 3)}
    return rows


def table_a7(run, n, seed):
    """Like with like: both students distilled for, and streamed at, the pipeline's sample_steps."""
    prompts, steps = prompts_for(n), run.cfg.sample_steps
    rows = {}
    for label, stage in (("with teacher (S2DiT-AR)", "dmd"), ("without teacher", "dmd_noteacher")):
        models = student(run, stage, steps, without_teacher=stage == "dmd_noteacher")
        rows[label] = {"student": stage, "steps": steps, **score(sample_ar(models, prompts, steps, seed=seed), prompts, seed)}
    return rows


# ----------------------------------------------------------------------------------------------
def md_table(rows, first="model"):
    rows = {k: v for k, v in rows.items() if isinstance(v, dict)}
    cols = []
    for r in rows.values():
        cols += [c for c in r if c not in cols and not isinstance(r[c], (dict, list))]
    out = [f"| {first} | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def write_results(path, res, cmd, seconds):
    L = ["# RESULTS: the paper's tables at toy scale", "",
         f"Produced by `{cmd}` (tables computed so far are reused from `<run>/reproduce.json`; "
         f"together they took {seconds / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in res["seconds"].items())
         + f") on {platform.machine()} "
         f"({os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
         f"device {res.get('device', 'cpu')}), "
         f"seed {res['seed']}, preset `{res['preset']}`, {res['n_prompts']} held-out prompts "
         "(colour, shape, motion combinations never seen in training).", "",
         "The paper's own numbers are not reproduced here: its main text and tables were not available to us "
         "(see README, 'Where the paper is silent'). For each table we state the ordering the paper reports or "
         "implies, and whether it holds at toy scale.", ""]
    checks = res["checks"]
    sections = [
        ("Tab. 1: VBench-lite of the pipeline's models", md_table(res["tab1"]), checks["tab1"]),
        ("Tab. A1: S2DiT-AR, one student distilled per step count (1, 2, 4), each at its own count",
         md_table(res["taba1"], "steps"), checks["taba1"]),
        ("Tab. 3 (a): layouts at the search budget (Eq. 10 loss with the supernet's shared weights)",
         f"budget {res['tab3']['budget_ms']:.2f} ms per chunk step on this CPU, k = {res['tab3']['k']}\n\n"
         + md_table(res["tab3"]["layouts"], "layout"), checks["tab3a"]),
        ("Tab. 3 (b): LCHA vs its two paths alone (S2DiT, searched layout, fine-tuned from T_theta)",
         md_table(res["tab3"]["attention"], "attention"), checks["tab3b"]),
        ("Tab. A2: decoders", md_table(res["taba2"], "decoder"), checks["taba2"]),
        ("Tab. A3: latency of one chunk on this CPU (S2DiT-AR, each student at its own step count)",
         md_table(res["taba3"], "steps"),
         checks["taba3"]),
        ("Tab. A5: full attention vs SANA-Video linear attention vs LCHA (every block, fine-tuned from T_theta)",
         md_table(res["taba5"], "attention"), checks["taba5"]),
        ("Tab. A6: 30-chunk streams", md_table(res["taba6"]), checks["taba6"]),
        ("Tab. A7: DMD without the teacher (both students distilled for and streamed at the same steps)",
         md_table(res["taba7"]), checks["taba7"]),
        ("Latency vs tokens (one forward of one chunk, `python sandwich.py --bench --json`)",
         md_table(res["latency_vs_tokens"], "model"), checks["bench"]),
    ]
    for title, table, check in sections:
        L += [f"## {title}", "", table, "", f"*Paper's ordering:* {check}", ""]
    L += ["## Pictures", "", f"![prompts x models]({os.path.relpath(res['grid'], os.path.dirname(os.path.abspath(path)))})", "",
          "Rows: held-out prompts; columns: the models of Tab. 1 (with the 2-step student before DMD, when the run kept it) and the AR students of Tab. A1 (1, 2, 4 steps).", ""]
    old = open(path).read() if os.path.exists(path) else ""
    for name in ("curves", "chain"):                     # curves.py's blocks (learning curves, the chain) stay
        begin, end = f"<!-- curves.py {name}: begin -->", f"<!-- curves.py {name}: end -->"
        if begin in old and end in old:
            L += [old[old.index(begin):old.index(end) + len(end)], ""]
    safeio.write_text(path, "\n".join(L))


def holds(cond, yes, no):
    return ("holds: " + yes) if cond else ("does not hold: " + no)


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
        return {"taba2": run.metrics("decoder")["table_a2"]}
    if name == "taba3":
        return {"taba3": table_a3(run, 8, s)}
    if name == "taba5":
        return {"taba5": table_a5(run, n, args.ablate_steps, s)}
    if name == "taba6":
        return {"taba6": table_a6(run, min(n, 4), args.a6_chunks, s)}
    if name == "taba7":
        return {"taba7": table_a7(run, n, s)}
    bench = sandwich.bench(run.cfg.preset, device=run.device)
    return {"bench": bench, "latency_vs_tokens": {
        k: {f"{tok} tokens ({px}px)": round(ms, 1) for tok, px, ms in zip(bench["tokens"], bench["frame_px"], v)}
        | {"log-log slope": round(bench["loglog_slope"][k], 2)} for k, v in bench["latency_ms"].items()}}


def checks(res):
    t1, a1, t3, a5, bench = res["tab1"], res["taba1"], res["tab3"], res["taba5"], res["bench"]
    kd, pre = t1["S2DiT-KD"]["total"], t1["S2DiT-Pretrained"]["total"]
    a1_tot = [r["total"] for r in a1.values()]
    lay, att = t3["layouts"], t3["attention"]
    a7 = res["taba7"]
    return {
        "tab1": holds(kd >= pre, f"KD total {kd} >= Pretrained {pre}", f"KD total {kd} < Pretrained {pre}"),
        "taba1": holds(a1_tot == sorted(a1_tot), f"total rises with steps {a1_tot}", f"totals by steps {a1_tot}"),
        "tab3a": holds(lay["searched"]["eq10_loss"] <= min(r["eq10_loss"] for r in lay.values() if r["fits_budget"]),
                       "the searched layout has the lowest Eq. 10 loss among layouts within budget",
                       "a layout within budget has a lower Eq. 10 loss than the searched one"),
        "tab3b": holds(att["lcha"]["eval_loss"] <= min(att["local"]["eval_loss"], att["linear"]["eval_loss"]),
                       "LCHA's eval loss is below local-only and linear-only",
                       f"eval losses {[(k, v['eval_loss']) for k, v in att.items()]}"),
        "taba2": "the paper's efficient decoder is much smaller and faster at a small fidelity cost; compare the rows",
        "taba3": holds(all(r["fps"] > 16 for r in res["taba3"].values()),
                       "every setting streams faster than the 16 FPS playback rate",
                       "some settings stream slower than the 16 FPS playback rate"),
        "taba5": holds(a5["LCHA"]["eval_loss"] <= a5["SANA-Video linear attention"]["eval_loss"],
                       "LCHA beats SANA-style linear attention in eval loss",
                       "SANA-style linear attention beats LCHA in eval loss"),
        "taba6": "the paper reports S2DiT-AR keeping subject and background consistent on long streams; compare the rows",
        "taba7": holds(a7["with teacher (S2DiT-AR)"]["total"] >= a7["without teacher"]["total"],
                       "distilling from the teacher beats self-distillation",
                       "self-distillation matches or beats the teacher at toy scale"),
        "bench": holds(bench["loglog_slope"]["s2dit"] <= 1.2 and bench["loglog_slope"]["s2dit"] < bench["loglog_slope"]["attention"],
                       f"S2DiT grows near-linearly (slope {bench['loglog_slope']['s2dit']:.2f}), full attention "
                       f"faster ({bench['loglog_slope']['attention']:.2f})", f"slopes {bench['loglog_slope']}"),
    }


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
    res.update({"seed": args.seed, "preset": run.cfg.preset, "n_prompts": args.prompts, "separate_students": True,
                "device": str(run.device)})
    res.setdefault("seconds", {})
    for name in args.tables.split(","):
        print(f"{name} ...", flush=True)
        t0 = time.time()
        res.update(compute(name, run, args, os.path.dirname(os.path.abspath(args.out))))
        res["seconds"][name] = time.time() - t0
        safeio.write_json(store, res, indent=1, default=str)
    missing = [t for t in TABLES if t not in res]
    if missing:
        print(f"tables still to compute: {missing}; RESULTS.md is written once all exist")
        return
    res["checks"] = checks(res)
    seconds = sum(res["seconds"].values())
    cmd = "python reproduce.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    write_results(args.out, res, cmd.strip(), seconds)
    print(f"wrote {args.out}; the tables took {seconds / 60:.1f} min in all")


if __name__ == "__main__":
    main()
