"""The whole S2DiT pipeline, stage by stage, resumable: from nothing to a streaming video and a Core ML bundle.

    text      CLIP-style pretraining of the tiny text encoder (stand-in for CLIP-ViT-L), then frozen
    vae       causal 3D VAE (4x time, 4x space); its encoder is frozen from here on
    latents   a pool of toy-world clips encoded once (the DiT stages train on latents)
    base      T_theta: the all-self-attention DiT of the student's width (Eq. 10's reference)
    search    Alg. 1 + Eq. 10: budget-aware DP picks k, Gumbel-top-k routers pick the layout
    pretrain  S2DiT(layout), inheriting the searched supernet's weights, flow matching   "S2DiT-Pretrained"
    teacher   the two-expert all-attention DiT (high / low noise), larger than the student
    cache     the teacher's diffusion tuples written to disk in checksummed shards (Sec. C.1)
    kd        offline cached KD, Eq. 12, the teacher never loaded                        "S2DiT-KD"
    dmd       Self-Forcing DMD + progressive RpGAN (Eq. 13-14), few-step streaming         "S2DiT-AR"
    decoder   the efficient decoder on frozen-encoder latents (Sec. D.1)
    deploy    the Core ML bundle S2DiTResources/ (Sec. D.2)
    sample    one streamed video for a held-out prompt + VBench-lite on held-out prompts

Every stage writes `<out>/<stage>.pt` (+ JSON of its config and metrics) atomically and then the
marker `<stage>.done.json`; a stage with a marker is skipped, so an interrupted run continues where
it stopped (an interrupted stage restarts from its beginning with the same seeds, which gives the
same result as an uninterrupted run).

    python train.py                          # the `small` preset, everything (about 45 min on 2 CPU cores)
    python train.py --preset tiny --out runs/tiny        # minutes: what the tests run
    python train.py --stages base,search     # only some stages (earlier ones must exist)
    python train.py --device auto            # on a GPU (cuda) or an Apple-silicon Mac (mps)
    torchrun --nproc_per_node 2 train.py --preset tiny   # data-parallel over 2 processes (dist.py)

Under torchrun the text, VAE, flow-matching (base, pretrain, teacher), KD and decoder stages are
data-parallel (PARALLEL): every process trains on its own rows of each batch, DDP averages the
gradients. The other stages run in process 0 while the others wait. Process 0 alone writes files.
"""
import copy
import json
import os
import time
from dataclasses import asdict, fields, replace

import torch
from tqdm import tqdm

import data
import decoder as dec_mod
import deploy
import dist
import distill
import dit
import evaluate
import flow
import kdcache
import safeio
import search
import stream
import text as text_mod
import vae as vae_mod
from runs import (STAGES, PipelineConfig, Run, check_run_config, data_cfg, dit_batches, dit_cfg, fm_batches, latent_hw,
                  load_streaming, read_pipeline, ship_weights, spec_of)
from safeio import save_checkpoint
from sandwich import SuperNet

# The fields of a pipeline preset, each with its comment: runs.PipelineConfig (pipeline.json holds one).

PRESETS = {
    # The 45-minute workshop run: 48-px frames (a 3-chunk window of 324 tokens, 0.56x those of 64 px),
    # T_theta's updates split first chunks then windows as in the ship preset (here the first 40% on
    # first chunks, the rest on the 3-chunk window, where direction over three chunks is learnt),
    # and every later stage shortened to leave T_theta most of the time (RESULTS.md, "The workshop
    # run", has the timed runs that chose these values and their scores).
    "small": PipelineConfig(frame_size=48, first_chunk_frac=0.4, base_steps=2400, vae_steps=1500, pretrain_steps=200,
                            teacher_steps=150, cache_samples=128, kd_steps=200, dmd_steps=40, ode_pairs=64,
                            ode_updates=100, decoder_steps=1000),
    # The shipped model: T_theta's first 40 % of 7000 updates on first chunks (colour, shape and
    # direction from the prompt alone), the rest on the 3-chunk streaming window (a chunk learns to
    # continue the motion of the chunks before it; curves.py: direction appears after ~1000 window
    # updates and keeps rising); the decoder 6000 updates (27.0 dB, 1.2 dB below the reference
    # decoder). Streamed 2-step student, 42 videos per split: seen colour / shape / direction
    # 1.00 / 0.95 / 0.98, held-out 1.00 / 0.79 / 0.93 (weights/README.md has the intervals and the
    # stage times: about 150-157 min on a 2-core machine, more than the 2.5 h it is meant to fit).
    "ship": PipelineConfig(first_chunk_frac=0.4, base_steps=7000, decoder_steps=6000),
    "tiny": PipelineConfig(preset="tiny", threads=1, text_batch=16, text_steps=20, vae_steps=150, vae_batch=4, pool_clips=64, dit_batch=4, base_steps=40,
                           search_steps=10, pretrain_steps=40, teacher_dim=32, teacher_depth=10, teacher_steps=40,
                           cache_samples=16, cache_shard=8, kd_steps=20, dmd_steps=6, ode_pairs=8, ode_updates=10, decoder_steps=30, eval_prompts=4, sample_chunks=3,
                           ema=0.9),
}


# Seeds. Each stage draws its data and noise from the run's seed through its own offset (seed + k) or
# stride (seed * k + step), so no two stages share a random stream and a re-run stage draws exactly
# what it drew the first time (resume). The values are arbitrary; distinct is what matters.
STAGE_SEED_STRIDE = 1_000          # the global torch seed of a stage: seed * stride + its index
VAE_CLIP_STRIDE = 7919             # VAE update s trains on the clips of seed * stride + s
POOL_CLIP_STRIDE = 104_729         # latent-pool batch i: clips of seed * stride + i
DECODER_CLIP_STRIDE = 6007         # decoder update s: clips of seed * stride + s
HELD_OUT_CLIPS = 10_000_019        # the held-out clips of the VAE and decoder PSNR, the same in every run
SEARCH_BATCHES = 77                # seed + k: the search's Eq. 10 batches
CACHE_BATCHES = 555                # the clips the teacher's tuples are cached for
KD_SPEED_BATCHES = 3               # the on-the-fly KD of the cached-vs-on-the-fly measurement
DMD_PROMPTS = 11                   # the prompts of the ODE pairs, the critic warm-up and DMD
ODE_NOISE = 13                     # the noise of the ODE trajectories and the regression batches


def get_config(name: str, **overrides):
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "pipeline", **overrides)


def preset_args(cfg: PipelineConfig) -> str:
    """The train.py arguments that make `cfg`: the preset it differs least from, then its --seed and
    --set overrides, e.g. "--preset ship --set base_steps=7000". pipeline.json stores only the
    geometry's name (`preset`: small for the `ship` preset too), so this is how a run names its recipe."""
    have = asdict(cfg)
    diffs = {name: [k for k, v in asdict(p).items() if k != "seed" and have[k] != v]
             for name, p in PRESETS.items() if p.preset == cfg.preset}     # --set cannot change the geometry
    name = min(diffs, key=lambda n: len(diffs[n]))                         # first in PRESETS on a tie
    diff = diffs[name]
    return " ".join([f"--preset {name}"] + ([f"--seed {cfg.seed}"] if cfg.seed else [])
                    + [f"--set {k}={have[k]}" for k in diff])


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------
def stage_text(run):
    cfg = run.cfg
    encoder, tokenizer, tcfg = text_mod.build_text(cfg.preset, words=data.vocabulary(), seed=cfg.seed)
    encoder.to(run.device)
    # ASSUMPTION: the CLIP-style pretraining sees 32-px, 9-frame clips at every preset: it must learn
    # words (colour, shape, direction), which small clips show as well as large ones, 4x cheaper.
    batch_fn = text_mod.data_batch_fn("tiny", cfg.text_batch, frames=9)
    m = text_mod.fit_text_encoder(encoder, tokenizer, batch_fn, cfg.text_steps, tcfg.fit_lr, cfg.seed,
                                  eval_split="eval")
    if not dist.is_main():                           # process 0 alone measures and writes (torchrun)
        return m
    m.update(text_mod.probe(encoder, tokenizer))     # does it keep every word? (linear probe, one-word pairs)
    print("text: linear probe on held-out captions " + ", ".join(
        f"{k} {m['probe_' + k]:.3f}" for k in ("colour", "shape", "motion")))
    text_mod.save_text(run.path("text.pt"), encoder, tokenizer, tcfg, m)
    return m


def stage_vae(run):
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    model = vae_mod.VAE(vae_mod.get_config(cfg.preset)).to(run.device)
    dcfg = data_cfg(cfg)
    mine = dist.rows(cfg.vae_batch)                                  # this process's clips of each batch
    clips = lambda s: data.make_batch(dcfg, cfg.vae_batch, cfg.seed * VAE_CLIP_STRIDE + s, rows=mine)[0].to(run.device)
    m = vae_mod.fit_vae(model, clips, cfg.vae_steps, cfg.vae_lr, cfg.seed, ckpt=run.path("vae.ckpt.pt"),
                        batch=cfg.vae_batch)
    if not dist.is_main():                           # process 0 alone measures and writes (torchrun)
        return m
    held_out = data.make_batch(data_cfg(cfg, full_world=True), 16, seed=HELD_OUT_CLIPS, split="eval")[0].to(run.device)
    m["heldout_psnr"] = vae_mod.reconstruct_psnr(model, held_out)
    print(f"VAE held-out reconstruction PSNR: {m['heldout_psnr']:.2f} dB")
    save_checkpoint(run.path("vae.pt"), model, model.cfg, m)
    return m


def stage_latents(run):
    cfg, vae = run.cfg, run.vae()
    dcfg = data_cfg(cfg)
    zs, moving, caps = [], [], []
    for i in tqdm(range(0, cfg.pool_clips, 16), desc="latents"):
        video, captions, _ = data.make_batch(dcfg, min(16, cfg.pool_clips - i), seed=cfg.seed * POOL_CLIP_STRIDE + i)
        zs.append(vae.encode(video.to(run.device)).half().cpu())
        moving.append(vae_mod.latent_motion_mask(video))            # where the caption's objects are
        caps += captions
    z = torch.cat(zs)
    with safeio.atomic_path(run.path("latents.pt")) as tmp:
        torch.save({"z": z, "captions": caps, "moving": torch.cat(moving)}, tmp)
    return {"clips": len(caps), "latent_shape": list(z.shape[1:]), "bytes": os.path.getsize(run.path("latents.pt"))}


def fm_stage(run, model, steps, name, lr=None, boundary=None, ema=True):
    cfg = run.cfg
    batch_fn = fm_batches(run, cfg.seed + STAGES.index(name), steps)
    fcfg = flow.get_config(cfg.preset)
    trained, m = flow.train_fm(model, batch_fn, steps, lr or cfg.dit_lr, p_uncond=fcfg.cfg_dropout,
                                  shift=fcfg.train_shift, seed=cfg.seed, ema_decay=cfg.ema if ema else None, desc=name,
                                  boundary=boundary, warmup=cfg.dit_warmup, decay=cfg.dit_decay,
                                  ckpt=run.path(f"{name}.ckpt.pt"), shared_t=fcfg.shared_t)
    m["params"] = dit.count_params(model)
    m.pop("losses", None)
    return trained, m


def stage_base(run):
    torch.manual_seed(run.cfg.seed)
    model = dit.DiT(dit_cfg(run.cfg)).to(run.device)
    trained, m = fm_stage(run, model, run.cfg.base_steps, "base")
    if dist.is_main():
        save_checkpoint(run.path("base.pt"), trained, spec_of(trained, "dit"), m)
    return m


def stage_search(run, budget_ms=None):
    cfg = run.cfg
    dcfg = dit_cfg(cfg)
    M = dcfg.depth // 2
    table = search.latency_of(cfg)                           # stored, never timed here: see search.LATENCY_MS
    scfg = search.get_config(cfg.preset)
    # ASSUMPTION: the default budget is the latency of the cheapest layout with half of the middle
    # groups at high resolution (the paper sets its budget from the iPhone's frame-rate target).
    half = search.dp_cheapest(M, table["lcha_group_ms"], table["ssa_group_ms"], table["switch_ms"])[(M - 2) // 2][0]
    budget = budget_ms if budget_ms is not None else half
    k, (cheapest_cost, _) = search.choose_k(M, table, budget)
    base = run.model("base")
    torch.manual_seed(cfg.seed)
    sup = SuperNet(dcfg).to(run.device)
    inh = sup.inherit(base)
    batch_fn = dit_batches(run, scfg.batch, cfg.seed + SEARCH_BATCHES, with_null=False)
    layout, hist = search.run_search(sup, base, batch_fn, k, replace(scfg, steps=cfg.search_steps, seed=cfg.seed))
    save_checkpoint(run.path("search.pt"), sup, spec_of(sup, "supernet"), {"layout": layout, "k": k})
    safeio.write_json(run.path("layout.json"), {"layout": layout, "k": k, "budget_ms": budget})
    rep = search.search_rows(run, sup, base, layout, k, table, budget)
    return {"layout": layout, "k": k, "budget_ms": budget, "latency_table_ms": table,
            "iphone_estimate_ms": search.iphone_estimate(), "search_space": search.search_space(M, k),
            "eq10_first": hist[0], "eq10_last": hist[-1], "rows": rep,
            "inherited_tensors": len(inh["inherited"]), "fresh_tensors": len(inh["fresh"]),
            "router_logits": sup.router.tolist()}


def stage_pretrain(run):
    layout = tuple(json.load(open(run.path("layout.json")))["layout"])
    sup = run.model("search")
    model = sup.extract(layout).requires_grad_(True).to(run.device)   # inherits T_theta through the searched supernet
    trained, m = fm_stage(run, model, run.cfg.pretrain_steps, "pretrain")
    m["layout"] = layout
    if dist.is_main():
        save_checkpoint(run.path("pretrain.pt"), trained, spec_of(trained, "s2dit", layout=layout), m)
    return m


def stage_teacher(run):
    cfg = run.cfg
    tcfg = replace(dit_cfg(cfg), dim=cfg.teacher_dim, depth=cfg.teacher_depth)
    torch.manual_seed(cfg.seed)
    model = dit.MoETeacher(tcfg, flow.get_config(cfg.preset).boundary).to(run.device)
    grown = model.grow_from(run.model("base")) if tcfg.dim == dit_cfg(cfg).dim else None  # see MoETeacher.grow_from
    trained, m = fm_stage(run, model, cfg.teacher_steps, "teacher", boundary=model.boundary)
    m["grown_from_base"] = grown
    if dist.is_main():
        save_checkpoint(run.path("teacher.pt"), trained, spec_of(trained, "moe", boundary=trained.boundary), m)
    return m


def stage_cache(run):
    cfg, fcfg = run.cfg, flow.get_config(run.cfg.preset)
    teacher = run.model("teacher")
    fn = dit_batches(run, cfg.cache_shard, cfg.seed + CACHE_BATCHES)
    return kdcache.build_cache(teacher, fn, cfg.cache_samples, run.path("cache"), cfg.cache_shard,
                               teacher.boundary, fcfg.cfg_scale, cfg.seed)


def stage_kd(run):
    cfg = run.cfg
    student = copy.deepcopy(run.model("pretrain")).requires_grad_(True)
    cache = kdcache.CachedKD(run.path("cache"))
    kcfg = distill.get_kd_config(cfg.preset, seed=cfg.seed, steps=cfg.kd_steps)
    trained, m = distill.train_kd(student, cache, kcfg, ckpt=run.path("kd.ckpt.pt"))
    m.pop("kd_losses", None)
    if not dist.is_main():                           # process 0 alone measures and writes (torchrun)
        return m
    # Sec. C.1's point, measured in one run: cached KD vs KD with the teacher in the loop.
    fcfg = flow.get_config(cfg.preset)
    m["speed"] = kdcache.kd_speed_comparison(copy.deepcopy(run.model("pretrain")).requires_grad_(True),
                                             run.model("teacher"), cache,
                                             dit_batches(run, kcfg.batch, cfg.seed + KD_SPEED_BATCHES),
                                             steps=5 if cfg.preset == "tiny" else 20,
                                             boundary=run.model("teacher").boundary, cfg_scale=fcfg.cfg_scale)
    layout = run.model("pretrain").layout
    save_checkpoint(run.path("kd.pt"), trained, spec_of(trained, "s2dit", layout=layout), m)
    return m


def stage_dmd(run, without_teacher=False, name="dmd", n_steps=None):
    """S2DiT-AR: ODE-regression initialisation (distill.ode_init, saved as <name>_ode.pt), then
    Self-Forcing DMD + progressive GAN. One student per step count T = n_steps, by default cfg.sample_steps
    (the student the pipeline streams, ships and evaluates). DMD fits the student's samples from the
    T-step schedule only, so Tab. A1's 1- and 4-step students are separate runs of this stage under
    other names (reproduce.py: dmd_1step, dmd_4step), as is Tab. A7's dmd_noteacher."""
    cfg, fcfg = run.cfg, flow.get_config(run.cfg.preset)
    n_steps = n_steps or cfg.sample_steps
    kd = run.model("kd")
    student = copy.deepcopy(kd).requires_grad_(True)
    critic = copy.deepcopy(kd).requires_grad_(True)
    n_text, n_mask = run.null_text()
    real_model = run.model("pretrain") if without_teacher else run.model("teacher")
    real = distill.make_real_score(real_model, n_text, n_mask, fcfg.cfg_scale)
    hw = latent_hw(cfg)
    dcfg = distill.get_config(cfg.preset, seed=cfg.seed, latent_hw=(hw, hw), shift=fcfg.shift, n_steps=n_steps,
                              steps=cfg.dmd_steps, gan_start=cfg.dmd_steps // 2, ode_pairs=cfg.ode_pairs,
                              ode_updates=cfg.ode_updates)
    # The progressive GAN's "real" samples take T' > T steps. ASSUMPTION: T' >= 2 T, so the tiny
    # preset's T' = 4 becomes 8 for a 4-step student (small: T' = 8 for every T <= 4).
    dcfg = replace(dcfg, gan_real_steps=max(dcfg.gan_real_steps, 2 * n_steps),
                   ode_steps=-(-dcfg.ode_steps // n_steps) * n_steps)  # the student's times on the ODE grid
    batch = dit_batches(run, dcfg.batch, cfg.seed + DMD_PROMPTS)
    text_fn = lambda s: batch(s)[1:]
    ode, ckpt, ode_path = {}, run.path(f"{name}.ckpt.pt"), run.path(f"{name}_ode.pt")
    if dcfg.ode_updates > 0 and os.path.exists(ckpt) and os.path.exists(ode_path):
        ode = torch.load(ode_path, map_location="cpu", weights_only=True)["metrics"]    # resumed: the checkpoint holds the student
    elif dcfg.ode_updates > 0:   # Self-Forcing's starting point; kept as <name>_ode.pt (Tab. 1: before DMD)
        ode = distill.ode_init(student, real, text_fn, dcfg, torch.Generator().manual_seed(cfg.seed + ODE_NOISE),
                               ckpt=run.path(f"{name}_ode.ckpt.pt"))
        save_checkpoint(ode_path, student, spec_of(student, "s2dit", layout=kd.layout, steps=(n_steps,)), ode)
    trained, m = distill.train_dmd(student, real, critic, text_fn, dcfg, ckpt=ckpt)
    m.pop("curves", None)
    m.update(ode)
    m["steps"] = (n_steps,)                                           # the one count it streams at (stream.py checks)
    save_checkpoint(run.path(f"{name}.pt"), trained, spec_of(trained, "s2dit", layout=kd.layout, steps=(n_steps,)), m)
    return m


def stage_decoder(run):
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    dec = dec_mod.EfficientDecoder(dec_mod.get_config(cfg.preset)).to(run.device)
    dcfg = data_cfg(cfg)
    vae = run.vae()
    short = replace(dcfg, frames=17)                                 # 17-frame clips: 2x cheaper steps
    mine = dist.rows(cfg.vae_batch)                                  # this process's clips of each batch
    clips = lambda s: data.make_batch(short, cfg.vae_batch, cfg.seed * DECODER_CLIP_STRIDE + s, rows=mine)[0].to(run.device)
    m = dec_mod.fit_decoder(dec, vae, clips, cfg.decoder_steps, seed=cfg.seed, ckpt=run.path("decoder.ckpt.pt"),
                            batch=cfg.vae_batch)
    if not dist.is_main():                           # process 0 alone measures and writes (torchrun)
        return m
    held_out = data.make_batch(data_cfg(cfg, full_world=True), 8, seed=HELD_OUT_CLIPS, split="eval")[0].to(run.device)
    m["table_a2"] = dec_mod.compare_decoders(vae, dec, held_out)
    save_checkpoint(run.path("decoder.pt"), dec, dec.cfg, m)
    return m


def stage_deploy(run):
    return deploy.build_bundle(load_streaming(run.dir), run.path("S2DiTResources"))   # traced on the CPU, always


def stage_sample(run):
    cfg = run.cfg
    system = load_streaming(run.dir, device=run.device)
    colour, shape, motion = data.eval_prompts()[0]
    prompt = data.canonical_prompt(colour, shape, motion)
    res = stream.run(system, prompt, cfg.sample_chunks, cfg.sample_steps, cfg.seed, out=run.path("sample.mp4"))
    scores = evaluate_model(system, cfg.eval_prompts, cfg.sample_steps, seed=cfg.seed)
    return {"stream": res, "vbench_lite": scores, "video": run.path("sample.mp4")}


def evaluate_model(system, n_prompts, steps, seed=0, chunks=3):
    """VBench-lite of streamed videos (3 chunks = 33 frames) for n held-out prompts."""
    attrs = data.eval_prompts(n_prompts)
    prompts = [data.canonical_prompt(*a) for a in attrs]
    videos = []
    for i, p in enumerate(prompts):
        frames = [c.frames for c in stream.stream(system, p, chunks, steps, seed + i)]
        videos.append(torch.cat(frames, dim=1))
    return evaluate.score_videos(torch.stack(videos), prompts, seed=seed)


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------
# Data-parallel under torchrun: each process trains on its own rows of every batch (dist.py). The others
# run in process 0 alone: search and cache are short, latents/deploy/sample are not training, and DMD
# (rollouts, a critic and a GAN) stays a single-process loop.
PARALLEL = ("text", "vae", "base", "pretrain", "teacher", "kd", "decoder")
RUNNERS = {"text": stage_text, "vae": stage_vae, "latents": stage_latents, "base": stage_base,
           "search": stage_search, "pretrain": stage_pretrain, "teacher": stage_teacher, "cache": stage_cache,
           "kd": stage_kd, "dmd": stage_dmd, "decoder": stage_decoder, "deploy": stage_deploy,
           "sample": stage_sample}


def check_out(out, cfg: PipelineConfig):
    """Before any work: `out` is a new or empty directory, or a run of this very configuration, and
    writable. A run of another seed or preset is never mixed with this one; other folders are not ours."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise safeio.UsageError(f"--out {out} is a file; give a run directory (e.g. runs/{cfg.preset})")
    p = os.path.join(out, "pipeline.json")
    if os.path.isdir(out):
        if os.path.exists(p):
            old = asdict(read_pipeline(p))
            new = json.loads(json.dumps(asdict(cfg)))
            diff = [f"{k} {old[k]!r} (asked for {new[k]!r})" for k in new if old[k] != new[k]]
            if diff:
                raise safeio.UsageError(f"{out} is a run with another configuration: {', '.join(diff[:4])}; "
                                        f"use another --out, or the run's own --preset/--seed")
        elif os.listdir(out):
            raise safeio.UsageError(f"--out {out} is a non-empty directory that is not a train.py run "
                                    f"(no pipeline.json); give a new or empty directory")
    d = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise safeio.UsageError(f"cannot write the run directory {out}: {d} is not a writable folder")


def check_split(cfg: PipelineConfig):
    """Under torchrun every data-parallel batch splits evenly over the processes (dist.rows): checked
    before any work, so that a bad process count is one line, not a stage that dies half way."""
    batches = {f: getattr(cfg, f) for f in ("text_batch", "vae_batch", "dit_batch")}
    if cfg.first_chunk_frac > 0:
        batches["first_chunk_batch"] = cfg.first_chunk_batch
    batches["the KD batch"] = distill.get_kd_config(cfg.preset).batch
    uneven = {k: v for k, v in batches.items() if v % dist.world()}
    if uneven:
        raise ValueError(f"{dist.world()} processes do not split the batches {uneven} evenly; run a number of "
                         f"processes that divides every one, or change them with --set")


def stage_seed(cfg: PipelineConfig, stage):
    return cfg.seed * STAGE_SEED_STRIDE + STAGES.index(stage)


def run_pipeline(out, cfg: PipelineConfig, stages=None, force=(), device="cpu"):
    check_out(out, cfg)
    dist.barrier()                                   # every process has checked `out` before process 0 writes
    torch.set_num_threads(cfg.threads)
    run = Run(out, cfg, device)
    p = run.path("pipeline.json")
    if dist.is_main() and not os.path.exists(p):
        safeio.write_json(p, asdict(cfg), indent=1)
    times = {}
    for stage in stages or STAGES:
        if run.done(stage) and stage not in force:
            times[stage] = run.marker(stage)["seconds"]
            print(f"[{stage}] done already ({times[stage]:.0f} s), skipping")
            continue
        print(f"[{stage}] ...", flush=True)
        t0 = time.time()
        # Anything a stage draws from the global RNG (fresh modules, sampling) starts from the stage's
        # own seed: a stage gives the same result whichever stages ran before it in this process, so a
        # resumed run equals an uninterrupted one.
        torch.manual_seed(stage_seed(cfg, stage))
        if stage in PARALLEL or dist.is_main():
            metrics = RUNNERS[stage](run)
        times[stage] = time.time() - t0
        if dist.is_main():
            run.finish(stage, metrics, times[stage], run.device, dist.world())
        dist.barrier()                               # the stage's files are written before anyone reads them
        print(f"[{stage}] finished in {times[stage]:.0f} s", flush=True)
    return run, times


def parse_sets(items):
    """["base_steps=400", "dit_decay=cosine"] -> {"base_steps": 400, "dit_decay": "cosine"}, each value
    converted to its PipelineConfig field's type; unknown fields and bad values raise ValueError."""
    types = {f.name: f.type for f in fields(PipelineConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(types))}")
        if key in ("preset", "seed"):
            raise ValueError(f"--set {key}: use --{key}")
        kind = {"int": int, "float": float, "str": str}[types[key] if isinstance(types[key], str) else types[key].__name__]
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return out


def main(argv=None):
    p = safeio.Parser(prog="train.py", description="Train the toy S2DiT pipeline end to end (resumable).")
    p.add_argument("--preset", default="small", help="tiny (minutes), small (the workshop run, about 45 "
                   "min) or ship (the shipped model, ~2.6 h on 2 cores)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--force", default="", help="comma-separated stages to re-run even if done")
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the preset (repeatable), e.g. --set base_steps=400; "
                        "the run records it in pipeline.json")
    p.add_argument("--ship", default=None, help="copy the run's streaming weights to this directory and exit")
    dist.add_device_arg(p)
    args = p.parse_args(argv)
    out = args.out or os.path.join("runs", args.preset)
    try:
        if args.ship:
            size = ship_weights(out, args.ship)
            print(f"shipped {size / 2 ** 20:.1f} MB to {args.ship}")
            return
        cfg = get_config(args.preset, seed=args.seed, **parse_sets(args.set))
        if not 0 <= args.seed < 2 ** 31:
            raise ValueError(f"--seed must be in 0..{2 ** 31 - 1}, got {args.seed}")
        if args.stages is not None and not [s for s in args.stages.split(",") if s.strip()]:
            raise ValueError(f"--stages is empty; leave it out to run every stage, or name some of {','.join(STAGES)}")
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        force = [f.strip() for f in args.force.split(",") if f.strip()]
        for s in (stages or []) + force:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages: {','.join(STAGES)}")
        check_run_config(cfg)
        if stages is None or "search" in stages or "search" in force:
            search.latency_of(cfg)                  # the search's stored latency table: hours in, too late to find out
        check_out(out, cfg)
        device = dist.setup(dist.pick_device(args.device))   # joins torchrun's processes, if any
        check_split(cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    processes = dist.world()
    try:
        run, times = run_pipeline(out, cfg, stages, force=force, device=device)
    finally:
        dist.cleanup()
    on = f"{device}" + (f" x {processes} processes" if processes > 1 else "")
    print(f"\nstage times (s) on {on}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    if run.done("sample"):
        m = run.metrics("sample")
        print(f"video:   {m['video']}")
        print(f"metrics: {run.path('sample.done.json')}  (VBench-lite: " +
              ", ".join(f"{k} {m['vbench_lite'][k]:.2f}" for k in ("color_acc", "shape_acc", "direction_acc", "total")) + ")")
    if run.done("deploy"):
        print(f"bundle:  {run.path('S2DiTResources')}")


if __name__ == "__main__":
    main()
