"""Quantization of the DiT as the paper deploys it (Sec. D.2, "W8A8 / W4 mixed"), in PyTorch.

  1. Calibration inputs: every DiT call (denoise steps and commits) of streams of a few prompts,
     captured through chunk_step.ChunkStep, so the latents, timesteps, text embeddings and window
     contents are the ones the phone will see.
  2. Activations: int8 at the input of every Linear / conv / phi, the scale s = absmax / 127 over the
     calibration calls; in the Core ML export they are quantize/dequantize ops.
     # ASSUMPTION: symmetric, one scale per tensor (the paper says "A8" only).
  3. Per-layer sensitivity: PSNR of the DiT output x0 when ONLY that layer's weights are 4-bit, every
     layer in turn (Apple's ml-stable-diffusion mixed-bit pre-analysis does the same).
  4. The plan: 8 bits for the layers the paper names sensitive and for any layer whose 4-bit PSNR is
     under `psnr_threshold`; 4 bits (per block of `block_size` inputs) elsewhere.
  5. Emulation: a copy of the DiT with fake-quantized weights and int8-rounded activations, the
     PyTorch stand-in for the quantized Core ML model (prediction needs macOS); `quality_report` gives
     the PSNR of its denoised latents per streamed chunk against float, `vbench_drop` the VBench-lite drop.
deploy.py applies the plan to the converted program with coremltools (`deploy.quantize_weights`).

Run `python quantize.py`: a random tiny S2DiT, its sensitivity table, the plan and the emulated PSNR
per chunk, in seconds. `python quantize.py --run runs/small`: the error budget of a trained run, the
per-chunk PSNR of the plan next to variants that keep one source of error each (weights only, A8 only,
W8 everywhere, no PSNR promotions).
"""
import copy
import json
from dataclasses import dataclass

import torch
import torch.nn as nn

import data
import dit
import evaluate
import runs
import safeio
import sandwich
import text
from chunk_step import ChunkStep, stream_latents


@dataclass
class QuantConfig:
    psnr_threshold: float = 48.0   # ASSUMPTION: dB; a layer whose 4-bit PSNR is below this gets 8 bits.
                                   # The forced layers measure 42-46 dB at small (head, patch_embed), so a
                                   # layer as sensitive as they are is treated like them (small: SSA's
                                   # down/up switch, 41-45 dB); 30 dB promoted nothing at any width
    block_size: int = 64           # ASSUMPTION: int4 per-block granularity along the input axis (unstated).
                                   # One fp16 scale per 64 weights: 0.27x of fp16; per 32: 0.28x (small DiT)
    calib_prompts: int = 4         # prompts streamed to capture calibration inputs
    calib_chunks: int = 3          # chunks per calibration stream (fills and rolls the window)
    eval_chunks: int = 3           # chunks for the float-vs-quantized PSNR per chunk
    sens_samples: int = 8          # calibration calls used by the per-layer sensitivity scan


PRESETS = {"tiny": QuantConfig(calib_prompts=2, calib_chunks=3), "small": QuantConfig()}
# Layers forced to 8 bits whatever their measured PSNR, as the paper lists them: "patch/projection in
# and out, text embedding, final layer". ASSUMPTION: projection in = patch_embed, out = head; text
# embedding = text_proj and text_pool (the pooled prompt's projection); final layer = its AdaLN
# modulation ada_out and head. Every other layer gets 8 bits only if its measured 4-bit PSNR is under
# the threshold (the width-64 run (commit 0581615) also forced the timestep MLP and SSA's down/up switch; the small run measured
# 58-70 dB for the timestep MLP, which stays 4-bit, and 41-45 dB for the switch, promoted by PSNR).
SENSITIVE = ("patch_embed", "text_proj", "text_pool", "ada_out", "head")
DEFAULT_PROMPTS = ["a red circle moves right", "a blue square moves up", "a green triangle moves left",
                   "a yellow circle moves down"]


def get_config(name: str, **overrides) -> QuantConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "quantization", **overrides)


# ----------------------------------------------------------------------------------------------
# Activations: calibration on captured streaming inputs
# ----------------------------------------------------------------------------------------------
def capture_calibration(system, prompts, chunks, steps):
    """Inputs of every DiT call (denoise steps and commits) of streams of `prompts`."""
    step, record = ChunkStep(system.model, system.latent_hw).eval(), []
    for i, p in enumerate(prompts):
        stream_latents(step, system, p, chunks, steps, seed=i, record=record)
    return record


@torch.no_grad()
def calibrate(step, calib):
    """Activation ranges: absmax of every quantized layer's input over the calibration calls."""
    step.act_mode, step.act_absmax = "calib", {}
    for args in calib:
        step(*args)
    step.act_mode = None
    return {k: max(v, 1e-8) / 127.0 for k, v in step.act_absmax.items()}


# ----------------------------------------------------------------------------------------------
# Weights: symmetric linear quantization, per-layer sensitivity, the plan
# ----------------------------------------------------------------------------------------------
def quant_layers(model):
    """name -> module for every weight the bundle quantizes (Linear, conv, phi)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d)) or
            (hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.dim() == 3 and n.endswith("phi"))}


def granularity(mod, bits, block_size):
    w = mod.weight
    if bits == 4 and isinstance(mod, nn.Linear) and w.shape[1] % block_size == 0:
        return "per_block"
    return "per_channel"


def fake_quant_weight(w, bits, gran, block_size):
    """Symmetric linear quantization (coremltools "linear_symmetric"): per output channel, or per block
    of `block_size` inputs. Returns the dequantized weight."""
    qmax = 2 ** (bits - 1) - 1
    if gran == "per_block":
        wb = w.reshape(w.shape[0], -1, block_size)                         # (out, in/bs, bs)
        s = wb.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
        return ((wb / s).round().clamp(-qmax - 1, qmax) * s).reshape(w.shape)
    s = w.reshape(w.shape[0], -1).abs().amax(-1).clamp(min=1e-12) / qmax   # (out,)
    s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return (w / s).round().clamp(-qmax - 1, qmax) * s


def psnr(ref, x):
    """PSNR in dB with the reference's peak |value| as the signal peak."""
    mse = (ref - x).pow(2).mean().clamp(min=1e-20)
    return float(10 * torch.log10(ref.abs().max().pow(2) / mse))


@torch.no_grad()
def sensitivity(system, calib, cfg: QuantConfig):
    """PSNR of the DiT output x0 when only one layer's weights are 4-bit, every layer in turn."""
    step = ChunkStep(system.model, system.latent_hw).eval()
    calib = calib[::max(1, len(calib) // cfg.sens_samples)][:cfg.sens_samples]  # a spread-out subset
    refs = [step(*a)[0] for a in calib]
    table = {}
    for name, mod in quant_layers(system.model).items():
        w = mod.weight.data.clone()
        mod.weight.data.copy_(fake_quant_weight(w, 4, granularity(mod, 4, cfg.block_size), cfg.block_size))
        out = torch.cat([step(*a)[0].flatten() for a in calib])
        mod.weight.data.copy_(w)
        table[name] = psnr(torch.cat([r.flatten() for r in refs]), out)
    return table


def make_plan(system, table, cfg: QuantConfig):
    """{layer: {"bits", "granularity", "psnr_w4", "why"}}: 8 bits for the named sensitive layers and
    for layers under the PSNR threshold, 4 bits elsewhere."""
    plan = {}
    for name, mod in quant_layers(system.model).items():
        forced = any(name == s or name.startswith(s + ".") for s in SENSITIVE)
        low = table[name] < cfg.psnr_threshold
        bits = 8 if (forced or low) else 4
        plan[name] = {"bits": bits, "granularity": granularity(mod, bits, cfg.block_size), "psnr_w4": table[name],
                      "why": "sensitive layer" if forced else (f"PSNR < {cfg.psnr_threshold}" if low else "")}
    return plan


def print_plan(plan):
    print(f"{'layer':44s} {'PSNR(W4) dB':>12s} {'bits':>5s}  why")
    for name, p in plan.items():
        print(f"{name:44s} {p['psnr_w4']:12.1f} {p['bits']:5d}  {p['why']}")


# ----------------------------------------------------------------------------------------------
# The quantized DiT emulated in PyTorch, and what it costs in quality
# ----------------------------------------------------------------------------------------------
def emulate_quantized(model, plan, calib, latent_hw=None, block_size=QuantConfig.block_size):
    """PyTorch emulation of the quantized DiT: a copy of `model` with fake-quantized weights at the
    planned bits and a ChunkStep whose activation points fake-quantize to int8 at the ranges
    calibrated on `calib` (a list of ChunkStep inputs, or a precomputed {layer: scale})."""
    q = copy.deepcopy(model).eval()
    latent_hw = latent_hw if latent_hw is not None else calib[0][0].shape[-1]
    step = ChunkStep(q, latent_hw).eval()
    scales = calib if isinstance(calib, dict) else calibrate(ChunkStep(model, latent_hw).eval(), calib)
    with torch.no_grad():
        for name, mod in quant_layers(q).items():
            mod.weight.copy_(fake_quant_weight(mod.weight, plan[name]["bits"], plan[name]["granularity"], block_size))
    step.act_mode, step.act_scales = "fake", scales
    return step


@torch.no_grad()
def quality_report(system, qstep, prompts, chunks, steps):
    """PSNR of the denoised latents per chunk, quantized emulation vs float, same noise."""
    fstep = ChunkStep(system.model, system.latent_hw).eval()
    per_chunk = []
    for i, p in enumerate(prompts):
        a = stream_latents(fstep, system, p, chunks, steps, seed=100 + i)
        b = stream_latents(qstep, system, p, chunks, steps, seed=100 + i)
        per_chunk.append([psnr(x, y) for x, y in zip(a, b)])
    return [sum(c[j] for c in per_chunk) / len(per_chunk) for j in range(chunks)]


@torch.no_grad()
def vbench_drop(system, qstep, n_prompts=2, chunks=3, steps=2, seed=0):
    """VBench-lite (evaluate.score_videos) of float vs emulated-quantized streams on held-out prompts."""
    prompts = [data.canonical_prompt(*a) for a in data.eval_prompts(n_prompts)]
    fstep = ChunkStep(system.model, system.latent_hw).eval()
    scores = {}
    for name, st in (("float", fstep), ("quantized", qstep)):
        vids = []
        for i, p in enumerate(prompts):
            cache, frames = None, []
            for z in stream_latents(st, system, p, chunks, steps, seed=seed + i):
                f, cache = system.decoder.decode_chunk(z, cache)
                frames.append(f[0].clamp(-1, 1))
            vids.append(torch.cat(frames, dim=1))
        scores[name] = evaluate.score_videos(torch.stack(vids), prompts, seed=seed)
    return scores


@torch.no_grad()
def error_budget(system, cfg: QuantConfig, prompts=None, progress=True):
    """Where the emulated model's error comes from: PSNR of the denoised latents per streamed chunk
    against float for the plan and for variants that each keep one source of error. -> {variant: [dB]}"""
    steps = system.default_steps                     # as deploy.build_bundle: the student's count
    prompts = list(prompts or DEFAULT_PROMPTS[:cfg.calib_prompts])
    calib = capture_calibration(system, prompts, cfg.calib_chunks, steps)
    scales = calibrate(ChunkStep(system.model, system.latent_hw).eval(), calib)
    plan = make_plan(system, sensitivity(system, calib, cfg), cfg)
    layers = quant_layers(system.model)
    bits = lambda rule: {n: {"bits": b, "granularity": granularity(layers[n], b, cfg.block_size)}
                         for n, b in ((n, rule(n)) for n in layers)}
    variants = {
        "plan: W4/W8 + A8": (plan, True),
        "plan's weights, float activations": (plan, False),
        "plan without the PSNR promotions": (bits(lambda n: 8 if plan[n]["why"] == "sensitive layer" else 4), True),
        "W8 everywhere + A8": (bits(lambda n: 8), True),
        "A8 only (float weights)": (None, True),
    }
    out = {}
    for name, (p, a8) in variants.items():
        if p is None:
            step = ChunkStep(copy.deepcopy(system.model).eval(), system.latent_hw).eval()
            step.act_mode, step.act_scales = "fake", scales
        else:
            step = emulate_quantized(system.model, p, scales, system.latent_hw, cfg.block_size)
            step.act_mode = "fake" if a8 else None
        out[name] = quality_report(system, step, prompts[:2], cfg.eval_chunks, steps)
        if progress:
            n8 = sum(v["bits"] == 8 for v in p.values()) if p else 0
            print(f"{name:36s} {n8:3d} layers at 8 bits   " + " / ".join(f"{x:.1f}" for x in out[name]) + " dB", flush=True)
    return out


def _demo():
    """A random tiny S2DiT: its sensitivity table, the plan and the emulated PSNR per chunk."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = sandwich.S2DiT(dit.get_config("tiny"), sandwich.DEFAULT_LAYOUT["tiny"]).eval()
    with torch.no_grad():
        for p in m.parameters():                  # random weights, perturbed off the zero-init gates and head
            p.add_(torch.randn_like(p) * 0.05)
    enc, tok, _ = text.build_text("tiny")
    system = runs.StreamingSystem(model=m, text=enc.eval(), tokenizer=tok, latent_hw=8, shift=3.0, t_ctx=0.1)
    cfg = get_config("tiny")
    calib = capture_calibration(system, DEFAULT_PROMPTS[:cfg.calib_prompts], cfg.calib_chunks, steps=2)
    scales = calibrate(ChunkStep(m, 8).eval(), calib)
    print(f"{len(calib)} calibration calls, {len(scales)} int8 activation points")
    plan = make_plan(system, sensitivity(system, calib, cfg), cfg)
    print_plan(plan)
    qstep = emulate_quantized(m, plan, scales, 8, cfg.block_size)
    per_chunk = quality_report(system, qstep, DEFAULT_PROMPTS[:1], cfg.eval_chunks, steps=2)
    print("emulated W4/W8 + A8 vs float, PSNR of the denoised latents per chunk: "
          + ", ".join(f"{p:.1f}" for p in per_chunk) + " dB")


if __name__ == "__main__":
    ap = safeio.Parser(prog="quantize.py", description="Quantization of the DiT: a random tiny demo, or the error budget of a run.")
    ap.add_argument("--run", default=None, help="a train.py run directory: per-chunk PSNR of the plan and its variants")
    ap.add_argument("--json", action="store_true", help="also print {variant: [dB per chunk]} as the last line")
    args = ap.parse_args()
    if args.run is None:
        _demo()
    else:
        torch.set_num_threads(2)
        system = safeio.run_cli("quantize.py", runs.load_streaming, args.run)   # a bad run: one line, exit 2
        print(f"{args.run}: PSNR of the denoised latents per streamed chunk, emulation vs float")
        budget = error_budget(system, get_config(system.preset if system.preset in PRESETS else "small"))
        if args.json:
            print(json.dumps(budget))
