"""A run directory: what train.py writes, and how every other tool reads it back.

    runs/<name>/
      pipeline.json              the PipelineConfig of the run (its preset, seed and step counts)
      <stage>.pt                 a stage's weights: {"config", "state_dict", "metrics"} (safeio.save_checkpoint);
                                 for the DiT family the config is a ModelSpec (kind, DiTConfig, layout, ...)
      <stage>.json               the same config and metrics, for people
      <stage>.done.json          the completion marker: the stage's metrics and seconds
      latents.pt, cache/, ...    the latent pool, the KD cache (kdcache.py), the Core ML bundle, the sample

`Run` opens those files (each model loaded once), `dit_batches` cuts training batches out of the
latent pool, and `load_streaming` assembles what a stream needs (text encoder, S2DiT, decoder and the
numbers that go with them) into a `StreamingSystem`. Everything above this file (train.py, stream.py,
deploy.py, quantize.py, search.py's and reproduce.py's reports) reads runs through it; it imports only
the concept files, so nothing imports train.py but the tools that run its stages (reproduce.py).

Run `python runs.py RUN` to print what a run holds.
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

import data
import decoder as dec_mod
import distill
import dit
import flow
import safeio
import text as text_mod
import vae as vae_mod
from sandwich import STRIDE, S2DiT, SuperNet

# The stages of a run, in the order train.py runs them; a stage's seeds derive from its index.
STAGES = ["text", "vae", "latents", "base", "search", "pretrain", "teacher", "cache", "kd", "dmd",
          "decoder", "deploy", "sample"]


@dataclass
class PipelineConfig:
    preset: str = "small"          # tiny (CI, minutes) | small (the workshop run, <= 1 h)
    seed: int = 0                  # every stage derives its seeds from this one
    threads: int = 2               # torch CPU threads
    clip_frames: int = 33          # training clip length: 33 pixel frames = 9 latent frames = 3 chunks
    text_batch: int = 32           # contrastive batch of the text stage
    text_steps: int = 600          # contrastive updates of the text stage (held-out linear probe 1.00 from 300)
    vae_steps: int = 3600          # VAE updates (on 17-frame windows, 32-px crops: vae.fit_vae); held-out
                                   # PSNR 25.5 dB at 1800, 28.3 dB at 3600 (small)
    vae_batch: int = 4
    vae_lr: float = 1e-3
    pool_clips: int = 2048         # clips encoded once for the DiT stages
    dit_batch: int = 6             # clips per DiT update
    dit_chunks: int = 3            # chunks per DiT training window (a random, chunk-aligned cut of the pool's
                                   # 3-chunk clips; 3 = the current chunk + the KV window of 2, everything a
                                   # streaming chunk attends to; 2 is 1.5x cheaper but never shows the oldest)
    first_chunk_frac: float = 0.0  # share of each flow-matching stage's updates (the first ones) on the clips'
                                   # FIRST chunk alone, `first_chunk_batch` clips per update; the rest on the
                                   # dit_chunks window. A one-chunk update costs ~2.7x less per token (no long
                                   # block-causal attention) and the first chunk is where the prompt alone
                                   # sets colour, shape and direction (curves.py measures it)
    first_chunk_batch: int = 18    # 18 one-chunk clips = the tokens of 6 three-chunk clips
    dit_patch: int = 2             # latent pixels per side of a DiT token, (1, p, p) patches for the whole DiT
                                   # family: 2 as Wan; 4 gives a 3-chunk window 4x fewer tokens (144, not
                                   # 576) and a T_theta update ~5x cheaper (curves.py --bench), but learns
                                   # direction more slowly per update (RESULTS.md, "Three chunks"): no
                                   # preset uses it
    frame_size: int = 0            # frame side in pixels of every clip and video of the run; 0 = the geometry's
                                   # (tiny 32, small 64). A multiple of 4 (VAE) x dit_patch x 2 (SSA stride):
                                   # 48 gives the small geometry a 12 x 12 latent, 0.56x the tokens of 64 px;
                                   # the text stage, the VAE's and decoder's 32-px training crops are unchanged
    dit_lr: float = 1e-3
    dit_warmup: int = 50           # linear lr warm-up of the flow-matching stages
    dit_decay: str = "none"        # lr after warm-up: "none" (constant) or "cosine" (to 10 % at the end)
    base_steps: int = 1200         # T_theta: every student and the teacher inherit it, so it gets the most
    search_steps: int = 80         # Alg. 1 router + supernet updates
    pretrain_steps: int = 400      # S2DiT-Pretrained (continues T_theta through the searched supernet)
    teacher_dim: int = 128         # expert width; = the student's width: each expert is grown from T_theta
                                   # (dit.MoETeacher.grow_from); another width trains it from scratch
    teacher_depth: int = 12        # expert depth: 2 experts x 12 blocks = 3x the student's blocks
    teacher_steps: int = 300
    cache_samples: int = 256       # teacher tuples cached for KD
    cache_shard: int = 64
    kd_steps: int = 300            # offline KD updates (Eq. 12)
    dmd_steps: int = 150           # Self-Forcing DMD generator updates (GAN from half way)
    ode_pairs: int = 128           # ODE trajectories of the real score for DMD's initialisation (distill.ode_init)
    ode_updates: int = 200         # regression updates on them before DMD (0 = DMD starts from the KD student)
    decoder_steps: int = 400        # small: 2000 (crop steps, 4x cheaper: decoder.PRESETS)
    eval_prompts: int = 12         # held-out prompts for VBench-lite
    sample_chunks: int = 8         # length of the sample video (chunks of 12 frames)
    sample_steps: int = 2          # denoising steps of the sample video
    ema: float = 0.995             # EMA of the flow-matching stages (half-life ~140 updates)
    object_weight: float = 0.0     # flow-matching loss weight 1 + this on the latent pixels that see a moving
                                   # object (vae.latent_motion_mask, stored with the pool); 0 = plain MSE.
                                   # DEVIATION: the paper weighs every latent alike. The caption describes the
                                   # objects, ~14% of the latent pixels; the rest is a caption-free background
    # The toy world's difficulty knobs (data.DataConfig) for every clip the run trains on: the VAE, the
    # latent pool, the decoder. The text stage (its own 32-px clips) and every evaluation keep the full
    # world, and the evaluation prompts name one object either way.
    p_two_objects: float = 0.25    # chance a training clip tries a second, smaller object (~70 % fit)
    p_textured: float = 0.5        # chance of a low-contrast textured background instead of a plain one


def data_cfg(cfg: PipelineConfig, full_world: bool = False):
    """The clips of the run: its geometry, and its world's knobs unless `full_world` (held-out measurements
    compare runs on the one full world)."""
    d = data.get_config(cfg.preset)
    d = replace(d, frames=cfg.clip_frames, size=cfg.frame_size or d.size)
    return d if full_world else replace(d, p_two_objects=cfg.p_two_objects, p_textured=cfg.p_textured)


def check_run_config(cfg: PipelineConfig):
    """The checks of a run's config before any work, so that no stage fails half way: the frame side and
    the DiT patch tile the latent grid down to SSA's strided grid (vae.py: 4x; the patch;
    sandwich.STRIDE), and the world's knobs are probabilities."""
    if cfg.dit_patch < 1:
        raise ValueError(f"dit_patch must be >= 1, got {cfg.dit_patch}")
    if cfg.frame_size < 0:
        raise ValueError(f"frame_size must be >= 0 (0 = the {cfg.preset} geometry's), got {cfg.frame_size}")
    for name in ("p_two_objects", "p_textured"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} is a probability, between 0 and 1, got {getattr(cfg, name)}")
    side, unit = data_cfg(cfg).size, 4 * cfg.dit_patch * STRIDE
    if side % unit:
        raise ValueError(f"a frame side of {side} px does not tile into DiT tokens and SSA's strided grid: it must "
                         f"be a multiple of 4 (VAE) x {cfg.dit_patch} (dit_patch) x {STRIDE} (SSA stride) = {unit}, "
                         f"e.g. {max(unit, side // unit * unit)} or {(side // unit + 1) * unit}")


def dit_cfg(cfg: PipelineConfig):
    return dit.get_config(cfg.preset, patch=(1, cfg.dit_patch, cfg.dit_patch))


def latent_hw(cfg: PipelineConfig):
    """Side of the latent grid: the frame side / 4 (vae.py compresses 4x in space)."""
    return data_cfg(cfg).size // 4


# ----------------------------------------------------------------------------------------------
# Checkpoints of the DiT family (DiT, MoE teacher, S2DiT, search supernet): one spec, one loader
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    kind: str                      # "dit" | "moe" | "s2dit" | "supernet"
    dit: dict                      # dit.DiTConfig fields
    layout: tuple = ()             # S2DiT layout m_1..m_M
    boundary: float = 0.5          # MoE expert boundary
    steps: tuple = ()              # few-step counts a DMD student was distilled for (stream.py checks)


def build_model(spec: ModelSpec):
    cfg = dit.DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.dit.items()})
    if spec.kind == "dit":
        return dit.DiT(cfg)
    if spec.kind == "moe":
        return dit.MoETeacher(cfg, spec.boundary)
    if spec.kind == "s2dit":
        return S2DiT(cfg, spec.layout)
    if spec.kind == "supernet":
        return SuperNet(cfg)
    raise ValueError(f"unknown model kind {spec.kind!r}")


def spec_of(model, kind, **kw):
    return ModelSpec(kind=kind, dit=asdict(model.cfg), **kw)


def load_model(path, stage):
    """A DiT-family checkpoint back as its model (eval mode); bad files name the stage to re-run."""
    return safeio.load_checkpoint(path, ModelSpec, build_model, stage)


# ----------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------
class Run:
    """A run directory: stage files, completion markers, the pipeline config; models loaded once,
    onto `device` (dist.pick_device; every file is read with map_location="cpu" first, so a run
    trained on a GPU opens on a machine without one)."""

    def __init__(self, out, cfg: PipelineConfig, device="cpu"):
        self.dir, self.cfg, self.device = out, cfg, torch.device(device)
        os.makedirs(out, exist_ok=True)
        self._cache = {}

    def path(self, name):
        return os.path.join(self.dir, name)

    def done(self, stage):
        return os.path.exists(self.path(f"{stage}.done.json"))

    def finish(self, stage, metrics, seconds, device="cpu", processes=1):
        """The stage's marker, with the device and the number of processes its seconds were measured on."""
        blob = {"stage": stage, "seconds": seconds, "device": str(device), "processes": processes,
                "config": asdict(self.cfg), "metrics": metrics}
        safeio.write_json(self.path(f"{stage}.done.json"), blob, indent=1, default=str)

    def marker(self, stage):
        """The stage's <stage>.done.json, checked: bad JSON or a missing field names the file."""
        p = self.path(f"{stage}.done.json")
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found; run the `{stage}` stage of train.py (--out {self.dir})")
        blob = safeio.read_json(p, "stage marker")
        if not isinstance(blob, dict) or not {"metrics", "seconds"} <= set(blob):
            raise safeio.UsageError(f"stage marker {p} lacks 'metrics' / 'seconds'; delete it and re-run the "
                                    f"`{stage}` stage: python train.py --out {self.dir}")
        return blob

    def metrics(self, stage):
        return self.marker(stage)["metrics"]

    def _once(self, key, load):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def model(self, stage):
        return self._once(stage, lambda: load_model(self.path(f"{stage}.pt"), stage).requires_grad_(False).to(self.device))

    def text(self):
        def load():
            encoder, tokenizer = text_mod.load_text(self.path("text.pt"))
            return encoder.to(self.device), tokenizer
        return self._once("text", load)

    def vae(self):
        return self._once("vae", lambda: vae_mod.load_vae(self.path("vae.pt")).requires_grad_(False).to(self.device))

    def pool(self):
        """The `latents` stage's clips: (z (n, C, T, h, w) float, captions). Its moving-object masks
        are read in the same load (moving())."""
        def load():
            p = self.path("latents.pt")
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} not found; run the `latents` stage of train.py")
            blob = torch.load(p, map_location="cpu", weights_only=True)
            self._cache["moving"] = blob.get("moving")                  # None in a pool made before the masks
            return blob["z"].float().to(self.device), blob["captions"]
        return self._once("pool", load)

    def moving(self):
        """The pool's moving-object masks (n, 1, T, h, w) bool (vae.latent_motion_mask)."""
        self.pool()
        if self._cache["moving"] is None:
            raise ValueError(f"{self.path('latents.pt')} has no moving-object masks (an older pool); "
                             f"re-run its stage: python train.py --out {self.dir} --force latents")
        return self._cache["moving"]

    def null_text(self):
        """The empty prompt's tokens (1, L, Dt) and mask (1, L): the unconditional side of CFG."""
        encoder, _ = self.text()
        with torch.no_grad():
            tokens, _, mask = encoder.null_embedding(1)
        return tokens, mask


# ----------------------------------------------------------------------------------------------
# Batches for the DiT stages: latents from the pool, text from the frozen encoder
# ----------------------------------------------------------------------------------------------
BATCH_SEED_STRIDE = 1_000_003      # batch_fn(step) seeds its generator with seed * stride + step


def dit_batches(run, batch, seed, with_null=True, chunks=None, object_weight=0.0):
    """batch_fn(step) -> (x0, text, mask[, null_text, null_mask[, weight]]) sampled from the latent pool:
    `batch` clips, each cut to a window of `chunks` whole chunks (default dit_chunks, see
    PipelineConfig) at a random chunk-aligned start; a one-chunk window is always the clip's first
    chunk, the one a stream starts with (its first latent frame is the VAE's single-frame one).
    object_weight > 0 adds the loss weight (B, 1, T, h, w): 1 + object_weight on moving objects."""
    z, captions = run.pool()
    moving = run.moving() if object_weight > 0 else None
    encoder, tokenizer = run.text()
    n_text, n_mask = run.null_text()
    chunk, T = dit_cfg(run.cfg).chunk, z.shape[2]
    win = min((chunks or run.cfg.dit_chunks) * chunk, T)                 # latent frames per window
    starts = 1 if win == chunk else (T - win) // chunk + 1

    def fn(step):
        g = torch.Generator().manual_seed(seed * BATCH_SEED_STRIDE + step)
        idx = torch.randint(z.shape[0], (batch,), generator=g)
        f0 = int(torch.randint(starts, (1,), generator=g)) * chunk       # chunk-aligned start
        tokens, _, mask = text_mod.encode_text(encoder, tokenizer, [captions[i] for i in idx])
        out = (z[idx.to(z.device), :, f0:f0 + win], tokens, mask)
        if not with_null:
            return out
        out += (n_text, n_mask)
        if moving is not None:
            out += ((1 + object_weight * moving[idx, :, f0:f0 + win].float()).to(z.device),)
        return out
    return fn


def fm_batches(run, seed, steps):
    """The batches of a flow-matching stage of `steps` updates: the first first_chunk_frac of them
    on one-chunk windows (first_chunk_batch clips), the rest on dit_chunks windows (dit_batch clips);
    with the loss weights of object_weight when it is > 0."""
    cfg = run.cfg
    n1 = int(cfg.first_chunk_frac * steps)
    long = dit_batches(run, cfg.dit_batch, seed, object_weight=cfg.object_weight)
    if n1 == 0:
        return long
    short = dit_batches(run, cfg.first_chunk_batch, seed, chunks=1, object_weight=cfg.object_weight)
    return lambda step: short(step) if step < n1 else long(step)


# ----------------------------------------------------------------------------------------------
# Opening a run
# ----------------------------------------------------------------------------------------------
def read_pipeline(p):
    """pipeline.json -> PipelineConfig; bad JSON, unknown or mistyped fields name the file."""
    blob = safeio.read_json(p, "run configuration")
    fields = PipelineConfig.__dataclass_fields__
    extra = sorted(set(blob) - set(fields)) if isinstance(blob, dict) else None
    if extra is None or extra:
        what = f"unknown fields {extra}" if extra else "not a JSON object"
        raise safeio.UsageError(f"run configuration {p} has {what}; it must hold exactly runs.PipelineConfig's "
                                f"fields (restore the file, or train a new run with another --out)")
    wrong = [k for k, v in blob.items() if not isinstance(v, type(getattr(PipelineConfig, k)))
             and not (isinstance(v, int) and isinstance(getattr(PipelineConfig, k), float))]
    if wrong:
        raise safeio.UsageError(f"run configuration {p}: fields {wrong} have the wrong type; restore the file")
    return PipelineConfig(**blob)


def open_run(run_dir, device="cpu"):
    p = os.path.join(run_dir, "pipeline.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} not found: {run_dir} is not a train.py run; train one with "
                                f"`python train.py --out {run_dir}`")
    return Run(run_dir, read_pipeline(p), device)


# ----------------------------------------------------------------------------------------------
# The streaming system of a run (stream.py, deploy.py, quantize.py, reproduce.py)
# ----------------------------------------------------------------------------------------------
DIT_STAGES = ("dmd", "kd", "pretrain")          # what stream.py / deploy.py can stream (+ reproduce.py's dmd_*)


@dataclass
class StreamingSystem:
    """Everything a stream needs, loaded once: prompt -> text encoder -> S2DiT chunk after chunk -> decoder."""
    model: nn.Module               # the S2DiT (sandwich.py), eval mode
    text: nn.Module                # the frozen text encoder (text.py)
    tokenizer: text_mod.Tokenizer  # its word-level tokenizer
    decoder: nn.Module = None      # efficient decoder (decoder.py) or the VAE; decode_chunk(z, cache)
    latent_hw: int = 16            # side of the latent grid h = w
    shift: float = 3.0             # timestep shift of the few-step schedule (flow.FlowConfig.shift)
    t_ctx: float = 0.0             # noise level a chunk is re-encoded at into the caches (Self-Forcing: 0)
    steps: int = None              # the one step count a DMD student was distilled for; None: any count
    name: str = "S2DiT"            # "S2DiT-AR", "S2DiT-KD", ...: what reports call it
    stage: str = None              # the run's stage it came from
    fps: int = 16                  # playback frame rate of the toy world
    preset: str = "small"          # the run's preset (deploy.py / quantize.py pick their settings by it)
    run: str = None                # the run directory

    @property
    def default_steps(self):
        """The step count a stream runs at when none is asked: the student's own, else flow's few_steps."""
        return self.steps if self.steps is not None else flow.FlowConfig.few_steps


def check_dit_stage(stage):
    if stage is not None and stage not in DIT_STAGES and not stage.startswith("dmd_"):
        raise safeio.UsageError(f"--stage {stage} is not a stage with a streaming DiT; choose one of "
                                f"{', '.join(DIT_STAGES)} (or a reproduce.py student: dmd_1step, dmd_4step, dmd_noteacher)")


def load_streaming(run_dir, stage=None, device="cpu") -> StreamingSystem:
    """The streaming system of a run, its networks on `device`. `stage` forces a DiT stage (dmd, kd,
    pretrain, or a student reproduce.py distilled: dmd_1step, dmd_4step, dmd_noteacher); by default
    the first of DIT_STAGES that is done. `steps` is the count a DMD student was distilled for, None
    for the flow-matching stages (any step count)."""
    check_dit_stage(stage)
    run = open_run(run_dir, device)
    candidates = [stage] if stage else list(DIT_STAGES)
    found = [s for s in candidates if run.done(s)]
    if not found:
        how = (f"`python reproduce.py --run {run_dir} --tables tab1` distils dmd_1step and dmd_4step, "
               f"`--tables taba7` dmd_noteacher" if stage and stage.startswith("dmd_") else
               f"run `python train.py --out {run_dir}`")
        raise FileNotFoundError(f"{run_dir} has no trained S2DiT (stages {candidates}); {how}")
    name = found[0]
    steps = run.metrics(name)["config"]["n_steps"] if name.startswith("dmd") else None   # the schedule it learnt
    encoder, tokenizer = run.text()
    dec = dec_mod.load_decoder(run.path("decoder.pt")).to(run.device) if run.done("decoder") else run.vae()
    label = {"dmd": "AR", "kd": "KD", "pretrain": "Pretrained"}.get(name, f"AR ({name})" if name.startswith("dmd") else name)
    pcfg = run.cfg
    return StreamingSystem(model=run.model(name).eval(), text=encoder, tokenizer=tokenizer, decoder=dec.eval(),
                           latent_hw=latent_hw(pcfg), shift=flow.get_config(pcfg.preset).shift,
                           t_ctx=distill.get_config(pcfg.preset).t_ctx, steps=steps, name=f"S2DiT-{label}",
                           stage=name, fps=data_cfg(pcfg).fps, preset=pcfg.preset, run=run_dir)


def ship_weights(run_dir, out_dir):
    """Copy what streaming needs (text encoder, S2DiT-AR, decoder, their metrics) into `out_dir`, a
    run directory of its own that stream.py / deploy.py load like any other. The DiT's weights are
    stored in fp16 (half the bytes); its videos differ from the run's by fp16 rounding only."""
    run = open_run(run_dir)
    stage = next((s for s in DIT_STAGES if run.done(s)), None)
    if stage is None:
        raise FileNotFoundError(f"{run_dir} has no trained S2DiT to ship (none of {DIT_STAGES} is done); "
                                f"finish the run first: python train.py --out {run_dir}")
    files = ["pipeline.json", "text.pt", "vocab.json", f"{stage}.pt", f"{stage}.done.json", "decoder.pt",
             "decoder.done.json", "sample.done.json"]
    shippable = set(files) | {f"{s}.{x}" for s in DIT_STAGES for x in ("pt", "done.json")}
    if os.path.abspath(out_dir) == os.path.abspath(run_dir):
        raise safeio.UsageError(f"--ship {out_dir} is the run itself; give another directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise safeio.UsageError(f"--ship {out_dir} is a file; give a directory")
    if os.path.isdir(out_dir) and not set(os.listdir(out_dir)) <= shippable:   # only an earlier ship is replaced
        raise safeio.UsageError(f"--ship {out_dir} holds files a ship does not write "
                                f"({sorted(set(os.listdir(out_dir)) - shippable)[:3]}...); give a new or empty directory")
    for f in files:
        if not os.path.exists(run.path(f)):
            continue
        with safeio.atomic_path(os.path.join(out_dir, f)) as tmp:
            if f == f"{stage}.pt":    # the DiT in fp16: half the bytes in git, loads back into fp32 parameters
                blob = torch.load(run.path(f), map_location="cpu", weights_only=True)
                blob["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
                torch.save(blob, tmp)
            else:
                shutil.copyfile(run.path(f), tmp)
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))


def main(argv=None):
    p = safeio.Parser(prog="runs.py", description="What a train.py run directory holds.")
    p.add_argument("run", help="a run directory written by train.py (e.g. runs/tiny or weights/ship)")
    args = p.parse_args(argv)
    run = open_run(args.run)
    print(f"{args.run}: preset {run.cfg.preset}, seed {run.cfg.seed}")
    for stage in STAGES + sorted({f.split(".")[0] for f in os.listdir(args.run) if f.startswith("dmd_")}):
        if run.done(stage):
            print(f"  {stage:14s} done in {run.marker(stage)['seconds']:7.1f} s")
    if any(run.done(s) for s in DIT_STAGES):
        system = load_streaming(args.run)
        print(json.dumps({"streams": system.name, "steps": system.default_steps, "latent_hw": system.latent_hw,
                          "shift": system.shift, "t_ctx": system.t_ctx, "fps": system.fps}))


if __name__ == "__main__":
    safeio.run_cli("runs.py", main)
