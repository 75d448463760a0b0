"""The iPhone Core ML bundle (paper Sec. D.2): text encoder, DiT with its KV window, decoder.

    S2DiTResources/
      TextEncoder.mlpackage    ids (1,L) int32 + mask (1,L) int32 -> tokens (1,L,Dt)        CPU_AND_NE, fp16
      DiT.mlpackage            ONE multifunction package, weights shared, iOS 18 states:      CPU_AND_NE
                                 denoise(x, t, text, text_mask) -> x0      reads the window
                                 commit (x, t, text, text_mask) -> x0      appends the chunk, rolls the window
                               W4 (4-bit per-block) / W8 (sensitive layers) weights, A8 activations
      DiTStateless.mlpackage   the same step with the caches as explicit inputs and outputs (fallback)
      Decoder.mlpackage        decode_first(z) / decode(z, caches) -> frames, caches          CPU_AND_GPU, fp16
      vocab.json, s2dit_config.json, README.md

The traced forms of the models are in chunk_step.py (static shapes: a chunk is 3 latent frames, the
window 2 chunks); which bits each layer gets and the activation scales come from quantize.py. This file
converts (torch.jit.trace -> coremltools, iOS 18, fp16), applies the plan to the weights, writes the
bundle, checks it offline and, on macOS, streams from it.

What a package's bytes are (mlpackage.package_sizes, in `--check --json`): the MIL program (model.mlmodel:
every function's ops with their names, output types and small inline constants) and the weight blob
(quantized weight data + scales, fp16 constants left unquantized: biases, norm weights, RoPE tables).
The program does not shrink with quantization (the fp16 reference is the same converted program,
activation quantize/dequantize ops included; quantizing swaps weight consts for constexpr ops) and it
grows with the number of ops (depth, two functions), not with the width: ~0.46 MB for DiT.mlpackage
once mlpackage.compact_names has shortened coremltools' long value names (a third of the bytes).
Against the fp16 weights it is 1x at tiny's width 32, so tiny's package ratio stays far above its
weight ratio; at small's width 128 the weights dominate and the quantized DiT.mlpackage is ~0.34x of
its fp16 export. Reading packages back (sizes, names, the offline check) is mlpackage.py.

CLI:  python deploy.py --run runs/tiny --out runs/tiny/S2DiTResources      build (progress prints)
      python deploy.py --check runs/tiny/S2DiTResources --json             offline check, JSON last line
      python deploy.py --run-bundle BUNDLE --prompt "a red circle moves right"   macOS only
"""
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import flow
import runs
import safeio
import text as text_mod
from chunk_step import ChunkStep, DecoderExport, StatefulDiT, StatelessDiT, TextExport, decoder_cache_layout
from mlpackage import check_bundle, compact_names, dir_bytes, package_sizes
from quantize import (DEFAULT_PROMPTS, QuantConfig, calibrate, capture_calibration, emulate_quantized, make_plan,
                      print_plan, quality_report, sensitivity, vbench_drop)


@dataclass
class DeployConfig(QuantConfig):   # the quantization settings (quantize.QuantConfig) and:
    version: str = "1.0"           # bundle version written into metadata


PRESETS = {"tiny": DeployConfig(calib_prompts=2, calib_chunks=3), "small": DeployConfig()}
COMPUTE_UNITS = {"TextEncoder": "CPU_AND_NE", "DiT": "CPU_AND_NE", "DiTStateless": "CPU_AND_NE",
                 "Decoder": "CPU_AND_GPU"}


def get_config(name: str, **overrides) -> DeployConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "deploy", **overrides)


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
def _ct():
    import coremltools as ct
    return ct


def _convert(module, example, inputs, outputs, states=None, export=False):
    """torch.jit.trace (default) or torch.export (`export=True`: shapes specialise to Python ints, for
    code that does x.shape arithmetic we may not edit, e.g. vae.py's GroupNorm4d) -> mlprogram, iOS 18."""
    ct = _ct()
    with torch.no_grad():
        if export:
            traced = torch.export.export(module.eval(), example).run_decompositions({})
        else:
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
    kw = {"states": states} if states else {}
    # coremltools merges equal constants only from 100 elements up. The small ones (reshape shapes, axes,
    # slice bounds, int8 dtypes) are ~2/3 of a DiT function's ops and repeat: 1090 of them, 188 distinct
    # (small DiT). Merging them all is lossless and cuts the program by ~25%.
    passes = ct.PassPipeline.DEFAULT
    passes.set_options("common::const_deduplication", {"const_threshold": 1})
    return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=n) for n in outputs],
                      minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16, pass_pipeline=passes, **kw)


def _stage(name, fn):
    """Run one export; any failure names the model ("DiT export failed: ...")."""
    try:
        return fn()
    except Exception as e:
        raise RuntimeError(f"{name} export failed: {type(e).__name__}: {e}") from e


def const_name_map(mlmodel, names):
    """torch layer name -> name of the const op holding its weight in the converted program (as
    ct.convert returns it, before `compact_names` shortens the names of a saved package)."""
    consts = [op.outputs[0].name for f in mlmodel._mil_program.functions.values()
              for op in f.operations if op.op_type == "const"]
    out = {}
    for n in names:
        key = "_" + n.replace(".", "_") + "_weight_to_fp16"
        hits = [c for c in consts if c.endswith(key)]
        if len(hits) != 1:
            raise ValueError(f"weight of layer {n} not found (or ambiguous) among the program's consts: {hits}")
        out[n] = hits[0]
    return out


def quantize_weights(mlmodel, plan, block_size):
    """W4/W8 per the plan, by const op name (weight_threshold=0: small weights are not silently skipped)."""
    import coremltools.optimize.coreml as cto
    names = const_name_map(mlmodel, plan)
    cfgs = {}
    for layer, p in plan.items():
        kw = {"block_size": block_size} if p["granularity"] == "per_block" else {}
        cfgs[names[layer]] = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{p['bits']}",
                                                          granularity=p["granularity"], weight_threshold=0, **kw)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=cfgs))


def set_metadata(path, role, description, version, extra=None):
    ct = _ct()
    m = ct.models.MLModel(path, skip_model_load=True)
    m.author = "S2DiT toy reimplementation (deploy.py)"
    m.short_description = description
    m.version = version
    m.user_defined_metadata.update({"role": role, "version": version,
                                    "intended_compute_units": COMPUTE_UNITS[role], **(extra or {})})
    tmp = path[:-len(".mlpackage")] + "_meta.mlpackage"
    m.save(tmp)
    shutil.rmtree(path)
    os.replace(tmp, path)


def save(ml, path):
    """Save a final (single-function) package with compact names."""
    ml.save(path)
    compact_names(path)


def save_multi(parts, path, default):
    """Merge single-function packages into one multifunction package (weights shared), compact names."""
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    for fn, p in parts.items():
        desc.add_function(p, src_function_name="main", target_function_name=fn)
    desc.default_function_name = default
    ct.utils.save_multifunction(desc, path)
    compact_names(path)


def dit_io(step):
    ct = _ct()
    L, Dt = step.L, step.model.cfg.text_dim
    x = ct.TensorType(name="x", shape=(1, step.C, step.T, step.hw, step.hw))
    return [x, ct.TensorType(name="t", shape=(1,)), ct.TensorType(name="text", shape=(1, L, Dt)),
            ct.TensorType(name="text_mask", shape=(1, L), dtype=np.int32)]


def dit_example(step):
    return (torch.randn(1, step.C, step.T, step.hw, step.hw), torch.rand(1),
            torch.randn(1, step.L, step.model.cfg.text_dim), torch.ones(1, step.L, dtype=torch.int32))


def export_dit(system, out_dir, plan=None, act_scales=None, block_size=QuantConfig.block_size, tmp=None, stateless=True, fp16_dir=None):
    """DiT.mlpackage (stateful, denoise + commit) and DiTStateless.mlpackage; fp16 if plan is None.
    fp16_dir: also save both packages as converted, before weight quantization (the size references
    DiT_fp16, DiTStateless_fp16: the same program, fp16 weights)."""
    def run():
        ct = _ct()
        step = ChunkStep(system.model, system.latent_hw).eval()
        step.L = system.tokenizer.max_len
        if act_scales is not None:
            step.act_mode, step.act_scales = "export", act_scales
        work = tmp or os.path.join(out_dir, ".work")
        os.makedirs(work, exist_ok=True)
        shapes = {n: s for n, s in step.cache_shapes().items() if math.prod(s)}
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=s, dtype=np.float16), name=n) for n, s in shapes.items()]
        parts, fp16_parts = {}, {}
        for fn in ("denoise", "commit"):
            ml = _convert(StatefulDiT(step, fn == "commit"), dit_example(step), dit_io(step), ["x0"], states)
            if fp16_dir is not None:
                fp16_parts[fn] = os.path.join(work, f"dit_{fn}_fp16.mlpackage")
                ml.save(fp16_parts[fn])
            if plan is not None:
                ml = quantize_weights(ml, plan, block_size)
            parts[fn] = os.path.join(work, f"dit_{fn}.mlpackage")
            ml.save(parts[fn])
        path = os.path.join(out_dir, "DiT.mlpackage")
        save_multi(parts, path, "denoise")
        res = {"DiT": path}
        if fp16_dir is not None:
            res["DiT_fp16"] = os.path.join(fp16_dir, "DiT_fp16.mlpackage")
            save_multi(fp16_parts, res["DiT_fp16"], "denoise")
        if stateless:
            cin = [ct.TensorType(name=n, shape=s) for n, s in shapes.items()]
            ex = dit_example(step) + tuple(torch.zeros(s) for s in shapes.values())
            ml = _convert(StatelessDiT(step), ex, dit_io(step) + cin, ["x0"] + [n + "_out" for n in shapes])
            if fp16_dir is not None:
                res["DiTStateless_fp16"] = os.path.join(fp16_dir, "DiTStateless_fp16.mlpackage")
                save(ml, res["DiTStateless_fp16"])
            if plan is not None:
                ml = quantize_weights(ml, plan, block_size)
            res["DiTStateless"] = os.path.join(out_dir, "DiTStateless.mlpackage")
            save(ml, res["DiTStateless"])
        shutil.rmtree(work, ignore_errors=True)
        return res
    return _stage("DiT", run)



def export_text(system, out_dir):
    def run():
        ct = _ct()
        L = system.tokenizer.max_len
        ids = torch.ones(1, L, dtype=torch.int32)
        inputs = [ct.TensorType(name="ids", shape=(1, L), dtype=np.int32),
                  ct.TensorType(name="mask", shape=(1, L), dtype=np.int32)]
        ml = _convert(TextExport(system.text), (ids, torch.ones(1, L, dtype=torch.int32)), inputs, ["tokens"])
        path = os.path.join(out_dir, "TextEncoder.mlpackage")
        save(ml, path)
        return path
    return _stage("TextEncoder", run)



def export_decoder(system, out_dir, tmp=None):
    def run():
        ct = _ct()
        dec, cfg, hw = system.decoder.eval(), system.model.cfg, system.latent_hw
        keys, shapes = decoder_cache_layout(dec, cfg.in_channels, hw, cfg.chunk)
        work = tmp or os.path.join(out_dir, ".work_dec")
        os.makedirs(work, exist_ok=True)
        z = ct.TensorType(name="z", shape=(1, cfg.in_channels, cfg.chunk, hw, hw))
        cin = [ct.TensorType(name=f"cache_{i}", shape=s) for i, s in enumerate(shapes)]
        outs = ["frames"] + [f"cache_{i}_out" for i in range(len(keys))]
        parts = {}
        for fn, first in (("decode_first", True), ("decode", False)):
            ex = (torch.randn(1, cfg.in_channels, cfg.chunk, hw, hw),) + (() if first else tuple(torch.zeros(s) for s in shapes))
            ml = _convert(DecoderExport(dec, keys, shapes, first), ex, [z] + ([] if first else cin), outs, export=True)
            parts[fn] = os.path.join(work, f"{fn}.mlpackage")
            ml.save(parts[fn])
        path = os.path.join(out_dir, "Decoder.mlpackage")
        save_multi(parts, path, "decode")
        shutil.rmtree(work, ignore_errors=True)
        return path, keys, shapes
    return _stage("Decoder", run)




# ----------------------------------------------------------------------------------------------
# The bundle
# ----------------------------------------------------------------------------------------------
# An output directory holding this file was written by deploy.py, which may replace it; any other
# non-empty directory is refused (safeio.atomic_dir): --out never deletes what the user put there.
BUNDLE_MARKER = ".s2dit_bundle"
UNMARKED_BUNDLE = ("TextEncoder.mlpackage", "DiT.mlpackage", "DiTStateless.mlpackage", "Decoder.mlpackage",
                   "vocab.json", "s2dit_config.json", "README.md")      # a complete bundle from before the marker


README = """# S2DiTResources: streaming text-to-video on the iPhone (Core ML, iOS 18)

Built by `deploy.py` (paper Sec. D.2). Shapes, tensor names, schedule: `s2dit_config.json`.

| package | load with `MLModelConfiguration.computeUnits` | what |
|---|---|---|
| TextEncoder.mlpackage | `.cpuAndNeuralEngine` | `ids`, `mask` (1,L) int32 -> `tokens` (1,L,Dt) |
| DiT.mlpackage | `.cpuAndNeuralEngine`, `functionName = "denoise"` / `"commit"` | one chunk step, caches are states |
| DiTStateless.mlpackage | `.cpuAndNeuralEngine` | the same step, caches as inputs/outputs (fallback) |
| Decoder.mlpackage | `.cpuAndGPU`, `functionName = "decode_first"` / `"decode"` | latent chunk -> RGB frames |

Tokenize with `vocab.json`: lower-case, punctuation -> spaces, split on spaces, one id per word
(`<unk>` = 1), pad with 0 to `max_len`; mask = 1 for real words.

## The streaming loop (Swift)
```swift
let cfgNE = MLModelConfiguration(); cfgNE.computeUnits = .cpuAndNeuralEngine
let text = try TextEncoder(configuration: cfgNE)                 // or MLModel(contentsOf:configuration:)
let dn = MLModelConfiguration(); dn.computeUnits = .cpuAndNeuralEngine; dn.functionName = "denoise"
let cm = MLModelConfiguration(); cm.computeUnits = .cpuAndNeuralEngine; cm.functionName = "commit"
let denoise = try MLModel(contentsOf: ditURL, configuration: dn)
let commit  = try MLModel(contentsOf: ditURL, configuration: cm)
let state = denoise.makeState()          // ONE state for the stream: K/V window, LCHA states, conv tails, valid
let dec1 = MLModelConfiguration(); dec1.computeUnits = .cpuAndGPU; dec1.functionName = "decode_first"
let decN = MLModelConfiguration(); decN.computeUnits = .cpuAndGPU; decN.functionName = "decode"
// 1. tokens = text.prediction(ids, mask)                             once per prompt
// 2. for each chunk i:
//      x = Gaussian noise (1,C,3,h,w)
//      for (j, t) in schedule.enumerated():                        // s2dit_config.json "schedule"
//          x0 = denoise.prediction(from: [x, t, text, text_mask], using: state)["x0"]
//          if j + 1 < schedule.count { x = (1 - t') * x0 + t' * noise }   // t' = schedule[j + 1]
//      xc = t_ctx > 0 ? (1 - t_ctx) * x0 + t_ctx * noise : x0
//      _ = commit.prediction(from: [xc, t_ctx, text, text_mask], using: state)   // appends, rolls the window
//      frames, caches = (i == 0 ? decode_first(z: x0) : decode(z: x0, cache_k: caches))  // keep caches
//      show frames (9 for chunk 0, then 12) at 16 FPS
```
Denoise outputs x0 (= x - t v), not v. A new prompt: re-run the text encoder, keep the state.
If an MLState made by the "denoise" function cannot be passed to the "commit" function on your OS
version, use DiTStateless: call it for every step and, after the commit call, feed its `*_out`
caches back as the next inputs (start from zeros).
"""


ROLES = {"TextEncoder": "text token ids -> text embedding", "DiT": "one denoising step / commit of one chunk",
         "DiTStateless": "one chunk step, caches as inputs/outputs", "Decoder": "latent chunk -> RGB frames"}


def plan_quantization(system, prompts, steps, cfg, say, progress=True):
    """quantize.py's recipe on this system: calibration inputs from streams of `prompts`, int8
    activation scales, the per-layer 4-bit sensitivity, the mixed-bit plan and what it costs
    (PSNR of the emulated model's latents per chunk; VBench-lite drop when the system is a run's)."""
    say(f"[deploy] capturing calibration inputs: {len(prompts)} prompts x {cfg.calib_chunks} chunks x {steps} steps")
    calib = _stage("DiT", lambda: capture_calibration(system, prompts, cfg.calib_chunks, steps))
    scales = calibrate(ChunkStep(system.model, system.latent_hw).eval(), calib)
    say(f"[deploy] per-layer sensitivity (W4 of one layer at a time, {cfg.sens_samples} calls)")
    table = sensitivity(system, calib, cfg)
    plan = make_plan(system, table, cfg)
    if progress:
        print_plan(plan)
    qstep = emulate_quantized(system.model, plan, scales, system.latent_hw, cfg.block_size)
    per_chunk = quality_report(system, qstep, prompts[:2], cfg.eval_chunks, steps)
    say("[deploy] emulated W4/W8 + A8 vs float, PSNR of denoised latents per chunk: "
        + ", ".join(f"{p:.1f}" for p in per_chunk) + " dB")
    vb = None
    if system.run:
        try:
            vb = vbench_drop(system, qstep, n_prompts=4, steps=steps)
        except Exception as e:              # evaluate.py's API differs: report, don't fail
            vb = {"skipped": f"{type(e).__name__}: {e}"}
    return {"plan": plan, "sensitivity_psnr_w4": table, "act_scales": scales, "psnr_per_chunk_db": per_chunk,
            "vbench_lite": vb}


def bundle_config(system, steps, cfg, plan, dec_keys, dec_shapes):
    """s2dit_config.json: what an app needs to drive the bundle (schedule, shapes, tensor names)."""
    mcfg, L, hw = system.model.cfg, system.tokenizer.max_len, system.latent_hw
    step = ChunkStep(system.model, hw)
    return {
        "version": cfg.version, "model": str(system.name), "chunk_latent_frames": mcfg.chunk,
        "window_chunks": mcfg.window, "steps": steps, "shift": system.shift,
        "schedule": flow.few_step_schedule(steps, system.shift), "t_ctx": float(system.t_ctx),
        "fps": system.fps, "frames_per_chunk": {"first": 4 * mcfg.chunk - 3, "next": 4 * mcfg.chunk},
        "latent": [1, mcfg.in_channels, mcfg.chunk, hw, hw],
        "text": {"max_len": L, "dim": mcfg.text_dim},
        "compute_units": COMPUTE_UNITS,
        "tensors": {"TextEncoder": {"inputs": ["ids", "mask"], "outputs": ["tokens"]},
                    "DiT": {"functions": ["denoise", "commit"], "inputs": ["x", "t", "text", "text_mask"],
                            "outputs": ["x0"], "states": {k: list(v) for k, v in step.cache_shapes().items() if math.prod(v)},
                            "denoise_output": "x0 = x - t * v"},
                    "DiTStateless": {"extra_outputs": "<cache>_out: the caches rolled with this chunk"},
                    "Decoder": {"functions": ["decode_first", "decode"], "inputs": ["z"] + [f"cache_{i}" for i in range(len(dec_keys))],
                                "outputs": ["frames"] + [f"cache_{i}_out" for i in range(len(dec_keys))],
                                "cache_shapes": [list(s) for s in dec_shapes]}},
        "rope": "relative window slots: no frame offset input (see deploy.py docstring)",
        "quantization": {"weights": {k: v["bits"] for k, v in plan.items()}, "activations": "int8 symmetric per tensor",
                         "psnr_threshold_db": cfg.psnr_threshold}}


def build_bundle(system, out_dir, calib_prompts=None, progress=True, cfg=None):
    """Calibrate, pick bits per layer, export the three models, write the bundle. -> report dict."""
    t_start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)                      # conversion and the scans are tiny ops: 1 thread is faster
    say = (lambda *a: print(f"[{time.time() - t_start:6.1f} s]", *a, flush=True)) if progress else (lambda *a, **k: None)
    cfg = cfg or get_config(system.preset if system.preset in PRESETS else "small")
    steps = system.default_steps
    prompts = list(calib_prompts or DEFAULT_PROMPTS[:cfg.calib_prompts])
    try:   # atomic_dir refuses a non-empty directory deploy.py did not write, before any work
        with safeio.atomic_dir(out_dir, BUNDLE_MARKER, "deploy.py", UNMARKED_BUNDLE) as tmp:
            q = plan_quantization(system, prompts, steps, cfg, say, progress)
            say("[deploy] TextEncoder")
            export_text(system, tmp)
            say("[deploy] DiT (stateful denoise + commit, stateless fallback; W4/W8 + A8)")
            ref = os.path.join(tmp, ".fp16")
            os.makedirs(ref)
            dit_paths = export_dit(system, tmp, q["plan"], q["act_scales"], cfg.block_size, fp16_dir=ref)
            sizes_fp16 = {n: package_sizes(dit_paths[n + "_fp16"]) for n in ("DiT", "DiTStateless")}
            shutil.rmtree(ref)
            say("[deploy] Decoder (decode_first + decode)")
            _, dkeys, dshapes = export_decoder(system, tmp)
            for role, desc in ROLES.items():
                set_metadata(os.path.join(tmp, role + ".mlpackage"), role, desc, cfg.version,
                             {"model": str(system.name), "quantization":
                              "W4/W8 mixed + A8" if role.startswith("DiT") else "fp16"})
            system.tokenizer.save_vocab(os.path.join(tmp, "vocab.json"))
            safeio.write_json(os.path.join(tmp, "s2dit_config.json"),
                              bundle_config(system, steps, cfg, q["plan"], dkeys, dshapes), indent=1)
            safeio.write_text(os.path.join(tmp, "README.md"), README)
    finally:
        torch.set_num_threads(threads)
    sizes = {n: dir_bytes(os.path.join(out_dir, n + ".mlpackage")) for n in ROLES}
    quant = {n: package_sizes(os.path.join(out_dir, n + ".mlpackage")) for n in ("DiT", "DiTStateless")}
    # the size bar (<= 0.35x) is on DiT.mlpackage's "package" ratio; the stateless fallback is reported too
    ratio = {n: {k: quant[n][k] / max(sizes_fp16[n][k], 1) for k in ("package", "program", "weights")} for n in quant}
    report = {"bundle": out_dir, **q, "sizes_bytes": sizes,
              "dit_fp16": sizes_fp16["DiT"], "dit_quantized": quant["DiT"], "dit_size_ratio": ratio["DiT"],
              "stateless_fp16": sizes_fp16["DiTStateless"], "stateless_quantized": quant["DiTStateless"],
              "stateless_size_ratio": ratio["DiTStateless"], "seconds": time.time() - t_start}
    for n in quant:
        f, z, r = sizes_fp16[n], quant[n], ratio[n]
        say(f"[deploy] {n}: fp16 {f['package']:,} B -> quantized {z['package']:,} B ({r['package']:.2f}x); "
            f"program {f['program']:,} -> {z['program']:,} B, weight blob {f['weights']:,} -> {z['weights']:,} B "
            f"({r['weights']:.2f}x; quantized data {z['quantized']:,} B, fp16 consts {z['float_consts']:,} B)")
    say(f"[deploy] bundle at {out_dir} in {report['seconds']:.0f} s")
    return report


# ----------------------------------------------------------------------------------------------
# Streaming from the Core ML models (macOS only: prediction needs the Core ML framework)
# ----------------------------------------------------------------------------------------------
def run_bundle(bundle, prompt, chunks=4, seed=0, out=None):
    ct = _ct()
    with open(os.path.join(bundle, "s2dit_config.json")) as f:
        cfg = json.load(f)
    cu = lambda role: getattr(ct.ComputeUnit, cfg["compute_units"][role])
    load = lambda name, fn=None: ct.models.MLModel(os.path.join(bundle, name + ".mlpackage"), compute_units=cu(name),
                                                   **({"function_name": fn} if fn else {}))
    tok = text_mod.Tokenizer.from_json(os.path.join(bundle, "vocab.json"))
    ids, mask = tok.encode([prompt])
    ids, mask = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
    tokens = load("TextEncoder").predict({"ids": ids, "mask": mask})["tokens"]
    denoise, commit = load("DiT", "denoise"), load("DiT", "commit")
    dec_first, dec = load("Decoder", "decode_first"), load("Decoder", "decode")
    state = denoise.make_state()                        # one state for the whole stream, shared by both functions
    rng, ts, t_ctx = np.random.default_rng(seed), cfg["schedule"], cfg["t_ctx"]
    n_cache = len(cfg["tensors"]["Decoder"]["cache_shapes"])
    caches, video, t0 = None, [], time.time()
    for i in range(chunks):
        x = rng.standard_normal(cfg["latent"]).astype(np.float32)
        for j, t in enumerate(ts):
            x0 = denoise.predict({"x": x, "t": np.array([t], np.float32), "text": tokens, "text_mask": mask}, state=state)["x0"]
            if j + 1 < len(ts):
                x = (1 - ts[j + 1]) * x0 + ts[j + 1] * rng.standard_normal(x0.shape).astype(np.float32)
        xc = (1 - t_ctx) * x0 + t_ctx * rng.standard_normal(x0.shape).astype(np.float32) if t_ctx > 0 else x0
        commit.predict({"x": xc, "t": np.array([t_ctx], np.float32), "text": tokens, "text_mask": mask}, state=state)
        inp = {"z": x0} if caches is None else {"z": x0, **{f"cache_{k}": caches[k] for k in range(n_cache)}}
        res = (dec_first if caches is None else dec).predict(inp)
        caches = [res[f"cache_{k}_out"] for k in range(n_cache)]
        video.append(torch.from_numpy(res["frames"][0]))
        print(f"chunk {i}: {res['frames'].shape[2]} frames, {time.time() - t0:.2f} s")
    video = torch.cat(video, dim=1).clamp(-1, 1)
    if out:
        data.save_video(out, video, cfg["fps"])
    return video


def main(argv=None):
    p = safeio.Parser(prog="deploy.py", description="Build / check / run the S2DiT Core ML bundle (paper Sec. D.2).")
    p.add_argument("--run", help="train.py run directory to export (with --out)")
    p.add_argument("--out", help="bundle directory to write, e.g. runs/tiny/S2DiTResources")
    p.add_argument("--check", help="bundle directory to validate offline")
    p.add_argument("--json", action="store_true", help="with --check: print the report as one JSON line (last line)")
    p.add_argument("--run-bundle", help="bundle directory to stream from with Core ML (macOS only)")
    p.add_argument("--prompt", help="with --run-bundle: the text prompt")
    p.add_argument("--chunks", type=int, default=4, help="with --run-bundle: chunks to stream")
    p.add_argument("--video", default=None, help="with --run-bundle: write the frames to this .mp4/.gif")
    a = p.parse_args(argv)
    if a.check:
        res = check_bundle(a.check)
        if not a.json:
            for name, m in res["models"].items():
                print(f"{name:13s} {m['size_bytes']:>10,} B  functions {sorted(m['functions'])}  weights {m['weight_dtypes']}")
            print("OK" if res["ok"] else "PROBLEMS: " + "; ".join(res["problems"]))
        print(json.dumps(res) if a.json else "")
        if not os.path.isdir(a.check):                   # no bundle at all: bad input, not a broken bundle
            print(f"deploy.py: error: {res['problems'][0]}", file=sys.stderr)
            return 2
        return 0 if res["ok"] else 1
    if a.run_bundle:
        if sys.platform != "darwin":
            print("--run-bundle needs macOS (Core ML prediction runs only there); on Linux use "
                  "`python deploy.py --check BUNDLE` or stream.py for the PyTorch models.", file=sys.stderr)
            return 2
        if not a.prompt:
            p.error("--run-bundle needs --prompt")
        run_bundle(a.run_bundle, a.prompt, a.chunks, out=a.video)
        return 0
    if not (a.run and a.out):
        p.error("give --run RUN --out BUNDLE, --check BUNDLE, or --run-bundle BUNDLE --prompt TEXT")
    try:                                                 # the output directory and the run, before any work
        safeio.check_dir_target(os.path.abspath(a.out), BUNDLE_MARKER, "deploy.py", UNMARKED_BUNDLE)
        system = runs.load_streaming(a.run)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    build_bundle(system, a.out, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
