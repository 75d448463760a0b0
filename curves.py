"""Learning curves of T_theta: does the DiT learn what its prompt says, and what limits it?

Every later stage (search, S2DiT-Pretrained, the teacher, KD, DMD) inherits T_theta, the
all-attention DiT of the student's width, so whether the toy world is learnable is decided here.
This file trains T_theta with a named recipe and, every few hundred updates, samples videos
(many-step Euler + CFG, decoded by the run's VAE) for prompts of SEEN (colour, shape, motion)
combinations and of HELD-OUT ones, and scores them with evaluate.py (VBench-lite, unchanged). It
also asks whether the DiT reads each word at all: the relative change of its velocity when one
word of the prompt changes ("word sensitivity").

    python train.py --stages text,vae,latents           # what the curves need (runs/small)
    python curves.py --run runs/small --recipe current  # one curve: ~/s2dit-runs/.. or --out
    python curves.py --report runs/small/curves         # table (Markdown) + plot (SVG) of every curve
    python curves.py --bench                            # a training step's GFLOP/s against the matmul peak

A curve checkpoints itself every few minutes and resumes where it stopped (flow.train_fm).
Scores carry their sample count and a 95% Wilson interval: two points whose intervals overlap
are a tie.
"""
import argparse
import glob
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch

import data
import dit
import evaluate
import flow
import runs
import stream
import text as text_mod

# Each recipe is a set of overrides on top of the run's preset: PipelineConfig fields (dit_batch,
# dit_chunks, first_chunk_frac, dit_lr, dit_decay, ema, ...), DiT fields under "dit" and flow.FlowConfig
# fields under "flow". One change at a
# time against "current", so a curve says what its change is worth.
RECIPES = {
    "current": {},                                                   # the small preset as it is
    "first_chunk": {"first_chunk_frac": 1.0},                        # every update on first chunks, 18 clips
    "first_chunk_cosine": {"first_chunk_frac": 1.0, "dit_decay": "cosine"},
    "first_chunk_abspos": {"first_chunk_frac": 1.0, "dit": {"abs_pos": True}},  # + (y, x) position (dit.py)
    "first_chunk_shift3": {"first_chunk_frac": 1.0, "flow": {"train_shift": 3.0}},  # train t as the sampler's
    # Against the preset of train_shift 3 with 90 % first-chunk updates: more of the updates on the
    # 3-chunk window, where a chunk learns to continue the motion of the chunks before it
    "half_window": {"first_chunk_frac": 0.5},                        # first half first chunks, then windows
    "window_only": {"first_chunk_frac": 0.0},                        # every update on the 3-chunk window
    # Against window_only: the loss weighs the latent pixels of moving objects (what the caption
    # describes) 5x (runs.PipelineConfig.object_weight)
    "window_objects": {"first_chunk_frac": 0.0, "object_weight": 4.0},
    # Against window_only: 4 x 4 latent pixels per token instead of 2 x 2, so a 3-chunk window is
    # 144 tokens instead of 576 (the VAE, and what it keeps of shape, unchanged)
    "window_patch4": {"first_chunk_frac": 0.0, "dit_patch": 4},
    # Against window_only: half of the samples with one t for all three chunks. The pipeline uses the
    # flow models on whole windows at one t (Euler sampling, the ODE pairs, DMD's real score), a
    # thin diagonal of what independent per-chunk t (diffusion forcing) trains on
    "window_shared": {"first_chunk_frac": 0.0, "flow": {"shared_t": 0.5}},
}


def wilson(p, n, z=1.96):
    """95% Wilson score interval of a proportion p measured on n samples."""
    if n == 0:
        return (0.0, 1.0)
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, c - h), min(1.0, c + h))


def prompt_sets(n):
    """n SEEN and n HELD-OUT combinations, canonical phrasing, spread over the whole lists."""
    seen = [data.TRAIN_COMBOS[round(i * len(data.TRAIN_COMBOS) / n)] for i in range(n)]
    return {"seen": seen, "heldout": data.eval_prompts(n)}


@torch.no_grad()
def sample_videos(model, run, combos, chunks, seeds, scale, steps, shift, streamed=False):
    """Euler + CFG -> decoded videos (B, 3, F, H, W), prompts. Whole window: one t for every frame.
    streamed: chunk by chunk as a stream is made, each chunk denoised next to the clean chunks
    before it (t = 0 there), so later chunks must continue the motion the first one started."""
    encoder, tokenizer = run.text()
    n_text, n_mask = run.null_text()
    prompts = [data.canonical_prompt(*c) for c in combos for _ in range(seeds)]
    tokens, _, mask = text_mod.encode_text(encoder, tokenizer, prompts)
    hw, T = runs.latent_hw(run.cfg), chunks * model.cfg.chunk
    g = torch.Generator().manual_seed(1234)                          # the same noise at every point
    noise = torch.randn(len(prompts), model.cfg.in_channels, T, hw, hw, generator=g)
    B = len(prompts)
    if not streamed:
        v_fn = lambda x, t: flow.cfg_predict(model, x, t[:, None].expand(B, T), tokens, mask,  # noqa: E731
                                                n_text, n_mask, scale, causal=True)
        z = flow.sample_euler(v_fn, noise, steps, shift)             # (B, C, T, h, w)
        return run.vae().decode(z).clamp(-1, 1), prompts
    c, z = model.cfg.chunk, noise[:, :, :0]                          # the clean chunks so far
    for k in range(chunks):
        def v_fn(x, t, ctx=z):                                       # velocity of the new chunk only
            tt = torch.cat([torch.zeros(B, ctx.shape[2]), t[:, None].expand(B, c)], 1)       # (B, T_k)
            v = flow.cfg_predict(model, torch.cat([ctx, x], 2), tt, tokens, mask, n_text, n_mask, scale,
                                 causal=True)
            return v[:, :, ctx.shape[2]:]
        z = torch.cat([z, flow.sample_euler(v_fn, noise[:, :, k * c:(k + 1) * c], steps, shift)], 2)
    return run.vae().decode(z).clamp(-1, 1), prompts


@torch.no_grad()
def word_sensitivity(model, run, chunks, t=0.7):
    """|v(prompt) - v(prompt with one word changed)| / |v(prompt)| at noise level t, averaged over
    6 base prompts and every other value of the word: how much the DiT reads colour, shape, motion."""
    encoder, tokenizer = run.text()
    hw, T = runs.latent_hw(run.cfg), chunks * model.cfg.chunk
    g = torch.Generator().manual_seed(99)
    out = {}
    bases = data.TRAIN_COMBOS[::25][:6]
    for j, (name, values) in enumerate((("colour", list(data.COLORS)), ("shape", data.SHAPES),
                                        ("motion", data.MOTIONS))):
        ratios = []
        for base in bases:
            combos = [base] + [base[:j] + (v,) + base[j + 1:] for v in values if v != base[j]]
            tokens, _, mask = text_mod.encode_text(encoder, tokenizer, [data.canonical_prompt(*c) for c in combos])
            x0 = torch.randn(1, model.cfg.in_channels, T, hw, hw, generator=g).expand(len(combos), -1, -1, -1, -1)
            tt = torch.full((len(combos), T), t)
            v = model(x0, tt, tokens, mask, causal=True)             # (K, C, T, h, w)
            ratios += ((v[1:] - v[:1]).flatten(1).norm(dim=1) / v[:1].flatten(1).norm()).tolist()
        out[name] = sum(ratios) / len(ratios)
    return out


def evaluate_point(model, run, chunks, n_prompts, seeds, scale, steps):
    fcfg = flow.get_config(run.cfg.preset)
    point = {}
    for split, combos in prompt_sets(n_prompts).items():
        videos, prompts = sample_videos(model, run, combos, chunks, seeds, scale, steps, fcfg.shift)
        s = evaluate.score_videos(videos, prompts)
        for k in ("color_acc", "shape_acc", "direction_acc"):
            point[f"{split}_{k}"] = s[k]
        point[f"{split}_n"] = s["n"]
    point["sensitivity"] = word_sensitivity(model, run, chunks)
    return point


def run_curve(run_dir, name, updates, every, out_dir, n_prompts=12, seeds=2, scale=None, steps=20,
              text_path=None, threads=2, eval_chunks=1):
    """Train T_theta with recipe `name` for `updates` updates, scoring every `every`; resumable."""
    torch.set_num_threads(threads)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    recipe = dict(RECIPES[name])
    run = runs.open_run(run_dir)
    if text_path:                                                    # compare text encoders on one pool
        run._cache["text"] = text_mod.load_text(text_path)
    pipe = {k: v for k, v in recipe.items() if k in asdict(run.cfg)}
    run.cfg = replace(run.cfg, **pipe)
    dcfg = replace(runs.dit_cfg(run.cfg), **recipe.get("dit", {}))
    fcfg = replace(flow.get_config(run.cfg.preset), **recipe.get("flow", {}))
    scale = fcfg.cfg_scale if scale is None else scale
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    log = {"recipe": name, "overrides": recipe, "run": run_dir, "text": text_path or run.path("text.pt"),
           "cfg_scale": scale, "euler_steps": steps, "eval_chunks": eval_chunks, "combinations": n_prompts, "seeds": seeds,
           "points": []}
    if os.path.exists(path):
        with open(path) as f:
            log["points"] = json.load(f)["points"]
    done = {p["update"] for p in log["points"]}
    if updates in done:                                              # a finished curve: nothing to train
        return log
    # training seconds only (the scoring is not training); a resumed curve continues its count
    clock = {"train": log["points"][-1]["seconds"] if log["points"] else 0, "mark": time.time()}

    def hook(step, ema_model):
        if step in done:
            return
        t0 = time.time()
        clock["train"] += t0 - clock["mark"]
        n1 = int(run.cfg.first_chunk_frac * updates)                 # clips seen so far (fm_batches)
        clips = min(step, n1) * run.cfg.first_chunk_batch + max(0, step - n1) * run.cfg.dit_batch
        point = {"update": step, "clips": clips, "seconds": round(clock["train"])}
        point.update(evaluate_point(ema_model.eval(), run, eval_chunks, n_prompts, seeds, scale, steps))
        point["eval_seconds"] = round(time.time() - t0)
        clock["mark"] = time.time()
        log["points"].append(point)
        with open(path + ".tmp", "w") as f:
            json.dump(log, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"[{name}] update {step}: " + ", ".join(
            f"{k} {point[k]:.2f}" for k in point if k.endswith("_acc")) +
            f"; sensitivity {point['sensitivity']}", flush=True)

    torch.manual_seed(run.cfg.seed)
    model = dit.DiT(dcfg)
    batch_fn = runs.fm_batches(run, run.cfg.seed + runs.STAGES.index("base"), updates)  # as the base stage
    flow.train_fm(model, batch_fn, updates, run.cfg.dit_lr, p_uncond=fcfg.cfg_dropout, shift=fcfg.train_shift,
                     seed=run.cfg.seed, ema_decay=run.cfg.ema, desc=f"curve {name}", warmup=run.cfg.dit_warmup,
                     decay=run.cfg.dit_decay, ckpt=os.path.join(out_dir, f"{name}.ckpt.pt"),
                     hook=hook, hook_every=every, shared_t=fcfg.shared_t)
    return log


# ----------------------------------------------------------------------------------------------
# Report: one Markdown table and one SVG plot of every curve in a folder
# ----------------------------------------------------------------------------------------------
ATTRS = (("color_acc", "colour", 1 / 7), ("shape_acc", "shape", 1 / 4), ("direction_acc", "direction", 1 / 6))
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def load_curves(folder):
    logs = []
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(p) as f:
            logs.append(json.load(f))
    if not logs:
        raise FileNotFoundError(f"no curves (*.json) in {folder}; make one with `python curves.py --run DIR --recipe NAME`")
    return logs


def table(logs):
    rows = ["| recipe | update | clips | minutes | seen colour / shape / direction | held-out colour / shape / direction "
            "| word sensitivity colour / shape / motion |", "|---|---|---|---|---|---|---|"]
    for log in logs:
        for p in log["points"]:
            cell = lambda split: " / ".join(f"{p[f'{split}_{k}']:.2f}" for k, _, _ in ATTRS)  # noqa: E731
            s = p["sensitivity"]
            rows.append(f"| {log['recipe']} | {p['update']} | {p['clips']} | {p['seconds'] / 60:.1f} | {cell('seen')} | "
                        f"{cell('heldout')} | {s['colour']:.3f} / {s['shape']:.3f} / {s['motion']:.3f} |")
    for log in logs:
        n = log["combinations"] * log["seeds"]
        lo, hi = wilson(0.5, n)
        rows.append(f"\n{log['recipe']}: {n} videos per split and point ({log['combinations']} combinations x "
                    f"{log['seeds']} noise draws, {log['eval_chunks']} chunk(s), {log['euler_steps']} Euler steps, "
                    f"CFG {log['cfg_scale']}); a 95% interval is about +-{(hi - lo) / 2:.2f} at 0.5.")
    return "\n".join(rows)


def svg(logs, width=960, height=330):
    """Three panels (colour, shape, direction) of accuracy against clips seen: one colour per
    recipe, solid = held-out combinations, dashed = seen ones, grey = chance. Plain SVG text: no
    plotting library needed, and it renders on GitHub and in any browser."""
    W, H, m = width // 3, height, 40
    xmax = max((p["clips"] for log in logs for p in log["points"]), default=1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20 * len(logs) + 10}" '
           f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for i, (key, label, chance) in enumerate(ATTRS):
        x0 = i * W
        X = lambda c: x0 + m + (W - m - 10) * c / xmax                                   # noqa: E731
        Y = lambda a: H - m + (-(H - m - 20)) * a                                        # noqa: E731
        out.append(f'<text x="{x0 + W / 2}" y="14" text-anchor="middle" font-weight="bold">{label}</text>')
        out.append(f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(xmax)}" y2="{Y(0)}" stroke="black"/>')
        out.append(f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(0)}" y2="{Y(1)}" stroke="black"/>')
        for a in (0, 0.5, 1):
            out.append(f'<text x="{X(0) - 4}" y="{Y(a) + 4}" text-anchor="end">{a:g}</text>')
        out.append(f'<text x="{X(xmax)}" y="{Y(0) + 16}" text-anchor="end">{xmax // 1000}k clips</text>')
        out.append(f'<line x1="{X(0)}" y1="{Y(chance)}" x2="{X(xmax)}" y2="{Y(chance)}" stroke="#aaa" stroke-dasharray="2,3"/>')
        for j, log in enumerate(logs):
            for split, dash in (("heldout", ""), ("seen", ' stroke-dasharray="5,4"')):
                pts = " ".join(f"{X(p['clips']):.1f},{Y(p[f'{split}_{key}']):.1f}" for p in log["points"])
                out.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS[j % len(COLOURS)]}" stroke-width="2"{dash}/>')
    for j, log in enumerate(logs):
        y = H + 20 * j + 14
        out.append(f'<line x1="{m}" y1="{y - 4}" x2="{m + 24}" y2="{y - 4}" stroke="{COLOURS[j % len(COLOURS)]}" stroke-width="2"/>')
        out.append(f'<text x="{m + 30}" y="{y}">{log["recipe"]}: {json.dumps(log["overrides"])} '
                   f'(solid held-out, dashed seen; grey chance)</text>')
    out.append("</svg>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# How close to the machine is a training step? (achieved GFLOP/s against the matmul peak, one run)
# ----------------------------------------------------------------------------------------------
def bench(preset="small", batch=6, chunks=3, threads=2, reps=5, dit_overrides=None, bf16=False):
    """FLOPs of one T_theta update (forward + backward, counted by torch's FlopCounterMode) over its
    measured time, next to the peak of a square float32 matmul on the same threads, in one process.
    `bf16`: the same update under CPU autocast to bfloat16 (weights and the optimizer stay float32),
    against a bfloat16 matmul's peak; some CPUs run bfloat16 matmuls in dedicated units, most do not."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    peak = 20 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9
    cfg = dit.get_config(preset, **(dit_overrides or {}))
    torch.manual_seed(0)
    model = dit.DiT(cfg)
    hw = data.get_config(preset).size // 4
    T = chunks * cfg.chunk
    x0 = torch.randn(batch, cfg.in_channels, T, hw, hw)
    text = torch.randn(batch, 16, cfg.text_dim)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = flow.fm_loss(model, x0, text, mask, text[:1], mask[:1], generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sec = (time.perf_counter() - t0) / reps
    tokens = batch * T * (hw // cfg.patch[1]) * (hw // cfg.patch[2])
    return {"preset": preset, "dtype": "bfloat16 autocast" if bf16 else "float32", "patch": cfg.patch[1],
            "threads": threads, "batch": batch, "chunks": chunks,
            "tokens_per_update": tokens,
            "params": dit.count_params(model), "gflop_per_update": round(flops / 1e9, 2),
            "ms_per_update": round(sec * 1000, 1), "clips_per_s": round(batch / sec, 1),
            "achieved_gflops": round(flops / sec / 1e9, 1), "matmul_peak_gflops": round(peak, 1),
            "fraction_of_peak": round(flops / sec / 1e9 / peak, 2)}


# ----------------------------------------------------------------------------------------------
# The chain: where is prompt following gained and lost? Every stage scored on the same prompts
# ----------------------------------------------------------------------------------------------
CHAIN = (("T_theta (all attention)", "base"), ("teacher (2 experts)", "teacher"), ("S2DiT-Pretrained", "pretrain"),
         ("S2DiT-KD", "kd"), ("S2DiT-AR before DMD (ODE init)", "dmd_ode"), ("S2DiT-AR", "dmd"))


@torch.no_grad()
def score_chain(run_dir, n_prompts=21, seeds=2, chunks=3, steps=30, ar_steps=None, stages=None, cfg_scale=None):
    """Each stage of the run's chain that exists (of `stages`, default all of CHAIN's), scored by
    evaluate.py on the same SEEN and HELD-OUT combinations (n_prompts each, `seeds` noise draws): the
    flow-matching models whole-clip (Euler + CFG, `steps` steps, VAE decoder), the few-step students
    streamed chunk by chunk through the efficient decoder at their own step count, as a user sees them.
    `cfg_scale` (default: the flow preset's, the scale the run's distillation used) sets the guidance
    of the flow-matching rows only: the students have their guidance distilled in."""
    known = [stage for _, stage in CHAIN]
    unknown = sorted(set(stages or ()) - set(known))
    if unknown:
        raise ValueError(f"no chain stage {', '.join(unknown)}: choose from {', '.join(known)}")
    run = runs.open_run(run_dir)
    fcfg = flow.get_config(run.cfg.preset)
    scale = fcfg.cfg_scale if cfg_scale is None else cfg_scale
    rows = {}
    for label, stage in CHAIN:
        if stages and stage not in stages:
            continue
        streaming = stage.startswith("dmd")
        if not os.path.exists(run.path(f"{stage}.pt")) or (not streaming and not os.path.exists(run.path("vae.pt"))):
            continue
        row = {}
        if streaming:                                                # loaded once per stage, not per split
            system = runs.load_streaming(run.dir, "dmd")
            if stage != "dmd":
                system = replace(system, model=run.model(stage).eval())
            k = ar_steps or system.steps
        for split, combos in prompt_sets(n_prompts).items():
            if streaming:
                prompts = [data.canonical_prompt(*c) for c in combos for _ in range(seeds)]
                videos = torch.stack([torch.cat([ch.frames for ch in stream.stream(system, p, chunks, k, seed=i)], 1)
                                      for i, p in enumerate(prompts)])
                row["setting"] = f"streamed, {k} steps"
            else:
                videos, prompts = sample_videos(run.model(stage).eval(), run, combos, chunks, seeds, scale,
                                                steps, fcfg.shift)
                row["setting"] = f"Euler {steps} steps + CFG {scale}"
            s = evaluate.score_videos(videos, prompts)
            for key, _, _ in ATTRS:
                row[f"{split}_{key}"] = s[key]
            row[f"{split}_n"] = s["n"]
        rows[label] = row
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_acc")), flush=True)
    return rows


def chain_table(rows):
    """Markdown: accuracy [95% interval] per attribute and split, sample counts in the header."""
    if not rows:
        return "(no stage to score)"
    any_row = next(iter(rows.values()))
    head = (f"| model | setting | seen colour | seen shape | seen direction | held-out colour | held-out shape | "
            f"held-out direction |\n|---|---|---|---|---|---|---|---|")
    out = [head]
    for label, r in rows.items():
        cells = []
        for split in ("seen", "heldout"):
            for key, _, _ in ATTRS:
                lo, hi = wilson(r[f"{split}_{key}"], r[f"{split}_n"])
                cells.append(f"{r[f'{split}_{key}']:.2f} [{lo:.2f}, {hi:.2f}]")
        out.append(f"| {label} | {r['setting']} | " + " | ".join(cells) + " |")
    out.append(f"\n{any_row['seen_n']} videos per split (each combination with several noise draws); "
               f"[95% Wilson interval]; chance 0.14 / 0.25 / 0.17.")
    return "\n".join(out)




def write_block(path, body, name="curves"):
    """Replace the block `name` (between its begin / end markers) in `path`, appended when absent;
    the rest of the file (reproduce.py's tables) is left as it is, and reproduce.py keeps it in turn."""
    begin, end = f"<!-- curves.py {name}: begin -->", f"<!-- curves.py {name}: end -->"
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body}\n{end}"
    new = old[:old.index(begin)] + block + old[old.index(end) + len(end):] if begin in old and end in old \
        else old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Learning curves of T_theta (prompt following against updates).")
    p.add_argument("--run", help="a train.py run with the text, vae and latents stages done")
    p.add_argument("--recipe", default="current", help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--updates", type=int, default=1200, help="T_theta updates")
    p.add_argument("--every", type=int, default=200, help="score every N updates")
    p.add_argument("--prompts", type=int, default=None, help="combinations per split (seen, held-out); "
                   "default 12 for a curve, 21 (every held-out one) for --chain")
    p.add_argument("--seeds", type=int, default=2, help="noise draws per combination")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale of the curves and of --chain's flow-matching rows (default: the preset's)")
    p.add_argument("--eval-chunks", type=int, default=1, help="chunks per scored video (1 = 9 frames: every recipe "
                   "is scored on the same first chunk, where the prompt alone sets the direction)")
    p.add_argument("--euler-steps", type=int, default=20, help="Euler steps of the scored samples")
    p.add_argument("--text", default=None, help="another text encoder checkpoint (default: the run's text.pt)")
    p.add_argument("--out", default=None, help="folder of the curve files (default: <run>/curves)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--report", default=None, help="write the table and plot of every curve in this folder and exit")
    p.add_argument("--svg", default="assets/curves.svg", help="where --report writes the plot")
    p.add_argument("--results", default=None, help="with --report: also put the table and plot into this "
                   "Markdown file (RESULTS.md), between its curves markers")
    p.add_argument("--block", default=None, help="with --results: the name of the block (its markers) the "
                   "table goes into, so curves of another protocol or the chain of another run get their own "
                   "(default: curves, or chain with --chain)")
    p.add_argument("--chain", default=None, help="score every stage of this run's chain (T_theta ... S2DiT-AR) "
                   "on the same seen and held-out prompts and exit")
    p.add_argument("--chain-stages", default=None, help="with --chain: only these stages, comma-separated "
                   f"(of {','.join(stage for _, stage in CHAIN)}), e.g. dmd for the streamed student alone")
    p.add_argument("--bench", action="store_true", help="print the training step's GFLOP/s against the matmul peak and exit")
    p.add_argument("--bf16", action="store_true", help="with --bench: also time each step under bfloat16 autocast, "
                   "side by side with float32 in the same process")
    args = p.parse_args(argv)
    if args.bench:
        for chunks, batch, patch in ((3, 6, 2), (1, 18, 2), (3, 6, 4)):       # the windows, the patch-4 window
            arms = [bench("small", batch=batch, chunks=chunks, threads=args.threads,
                          dit_overrides={"patch": (1, patch, patch)}, bf16=bf16)
                    for bf16 in ((False, True) if args.bf16 else (False,))]
            for arm in arms:
                print(json.dumps(arm))
            if args.bf16:
                f32, b16 = arms[0]["ms_per_update"], arms[1]["ms_per_update"]
                print(f"  ms per update, float32 / bfloat16 autocast: {f32} / {b16}: "
                      f"autocast runs at {f32 / b16:.2f}x the float32 speed")
        return
    if args.chain:
        torch.set_num_threads(args.threads)
        only = args.chain_stages.split(",") if args.chain_stages else None
        try:
            rows = score_chain(args.chain, args.prompts or 21, max(args.seeds, 2), stages=only,
                               cfg_scale=args.cfg_scale)
        except ValueError as e:
            p.error(str(e))
        flag = f" --chain-stages {args.chain_stages}" if only else ""
        flag += f" --cfg-scale {args.cfg_scale:g}" if args.cfg_scale is not None else ""
        body = (f"Made by `python curves.py --chain {args.chain}{flag}` on {time.strftime('%Y-%m-%d')}.\n\n"
                + chain_table(rows))
        print(body)
        if args.results:
            write_block(args.results, body, args.block or "chain")
        return
    if args.report:
        logs = load_curves(args.report)
        print(table(logs))
        with open(args.svg, "w") as f:
            f.write(svg(logs))
        print(f"\nplot: {args.svg}")
        if args.results:
            args.block = args.block or "curves"
            rel = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.results)))
            write_block(args.results, f"Made by `python curves.py --report {args.report} --svg {args.svg} "
                        f"--results {args.results} --block {args.block}` "
                        f"on {time.strftime('%Y-%m-%d')}.\n\n![learning curves]({rel})\n\n{table(logs)}", args.block)
        return
    if not args.run:
        p.error("--run DIR is required (or --report FOLDER)")
    if args.recipe not in RECIPES:
        p.error(f"unknown recipe {args.recipe!r}; recipes: {', '.join(RECIPES)}")
    run_curve(args.run, args.recipe, args.updates, args.every, args.out or os.path.join(args.run, "curves"),
              args.prompts or 12, args.seeds, args.cfg_scale, args.euler_steps, text_path=args.text, threads=args.threads,
              eval_chunks=args.eval_chunks)


if __name__ == "__main__":
    main()
