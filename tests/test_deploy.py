"""deploy.py, chunk_step.py, quantize.py, mlpackage.py: the Core ML bundle (paper Sec. D.2). One tiny bundle is built
per pytest session (conversion is slow); the tests inspect saved specs (prediction needs macOS), hold the
static-shape export path against the PyTorch streaming path and the quantized emulation against float."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import chunk_step
import decoder
import deploy
import dit
import mlpackage
import quantize
import runs
import sandwich
import text

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_models_for_test(preset="tiny"):
    """A StreamingSystem of random-weight models of a preset. Weights are perturbed so that the
    zero-initialised AdaLN gates and output head do not make the DiT the identity / v = 0."""
    torch.manual_seed(0)
    cfg = dit.get_config(preset)
    model = sandwich.S2DiT(cfg, sandwich.DEFAULT_LAYOUT[preset]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    enc, tok, _ = text.build_text(preset)
    dec = decoder.EfficientDecoder(decoder.get_config(preset)).eval()
    hw = {"tiny": 8, "small": 16}[preset]
    return runs.StreamingSystem(name="S2DiT-test", model=model, text=enc.eval(), tokenizer=tok, decoder=dec,
                                steps=2, shift=3.0, t_ctx=0.1, latent_hw=hw, fps=16, preset=preset)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    models = build_models_for_test()
    out = str(tmp_path_factory.mktemp("bundle") / "S2DiTResources")
    report = deploy.build_bundle(models, out, progress=False)
    return models, out, report, mlpackage.check_bundle(out)


def test_export_step_equals_streaming_path():
    """The static-shape ChunkStep + roll == dit.StreamState streaming over 4 chunks (window rolls twice)."""
    models = build_models_for_test()
    m, cfg = models.model, models.model.cfg
    step = chunk_step.ChunkStep(m, 8).eval()
    g = torch.Generator().manual_seed(1)
    txt, mask = torch.randn(1, 16, cfg.text_dim, generator=g), torch.zeros(1, 16, dtype=torch.bool)
    mask[:, :5] = True
    state, caches = dit.StreamState(cfg.window), step.empty_caches()
    with torch.no_grad():
        for i in range(4):
            for t in (1.0, 0.6):                                      # two denoise steps read the window
                x = torch.randn(1, 4, 3, 8, 8, generator=g)
                v = m(x, torch.full((1, 3), t), txt, mask, state=state)
                x0, _ = step(x, torch.tensor([t]), txt, mask.int(), *caches)
                err = (x0 - (x - t * v)).abs().max().item()
                assert err < 1e-4, f"chunk {i}, t={t}: max|diff| {err:.2e}"
                assert v.abs().mean() > 1e-2                           # a non-trivial output
            xc = torch.randn(1, 4, 3, 8, 8, generator=g)              # commit: append and roll
            state.commit = True
            m(xc, torch.full((1, 3), 0.1), txt, mask, state=state)
            state.commit = False
            state.advance(3)
            _, new = step(xc, torch.tensor([0.1]), txt, mask.int(), *caches)
            caches = chunk_step.roll(caches, new)
    assert caches[-1].tolist() == [1.0, 1.0]                           # both slots valid after 4 commits


def test_stateful_wrapper_rolls_like_functional_roll():
    models = build_models_for_test()
    step = chunk_step.ChunkStep(models.model, 8).eval()
    sd = chunk_step.StatefulDiT(step, commit=True)
    caches = step.empty_caches()
    with torch.no_grad():
        for _ in range(3):
            args = deploy.dit_example(step) if hasattr(step, "L") else (torch.randn(1, 4, 3, 8, 8), torch.rand(1),
                                                                         torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.int32))
            sd(*args)
            _, new = step(*args, *caches)
            caches = chunk_step.roll(caches, new)
    for name, c in zip(chunk_step.CACHE_NAMES, caches):
        assert torch.allclose(getattr(sd, name).float(), c, atol=2e-2, rtol=1e-2), name   # fp16 buffers


def test_specs_io_states_functions_metadata(built):
    models, out, report, chk = built
    assert chk["ok"], chk["problems"]
    dit_m = chk["models"]["DiT"]
    assert set(dit_m["functions"]) == {"denoise", "commit"}
    for fn in dit_m["functions"].values():
        assert [i["name"] for i in fn["inputs"]] == ["x", "t", "text", "text_mask"]
        assert [o["name"] for o in fn["outputs"]] == ["x0"]
        assert {s["name"] for s in fn["states"]} == {"lcha_S", "lcha_z", "lcha_tail", "ssa_K", "ssa_V", "valid"}
    commit, denoise = dit_m["functions"]["commit"]["op_census"], dit_m["functions"]["denoise"]["op_census"]
    assert commit.get("write_state", 0) >= 6 and commit.get("slice_update", 0) >= 5   # rolled by slice updates
    assert denoise.get("write_state", 0) == 0 and denoise.get("read_state", 0) == 6   # denoise only reads
    sl = chk["models"]["DiTStateless"]
    assert [o["name"] for o in sl["outputs"]][:2] == ["x0", "lcha_S_out"] and not sl["states"]
    assert set(chk["models"]["Decoder"]["functions"]) == {"decode_first", "decode"}
    assert [o["name"] for o in chk["models"]["TextEncoder"]["outputs"]] == ["tokens"]
    for name, m in chk["models"].items():
        md = m["metadata"]
        assert md["role"] == name and md["intended_compute_units"] == deploy.COMPUTE_UNITS[name] and md["author"]
    assert chk["models"]["Decoder"]["metadata"]["intended_compute_units"] == "CPU_AND_GPU"
    cfg = json.load(open(os.path.join(out, "s2dit_config.json")))
    assert cfg["window_chunks"] == 2 and cfg["chunk_latent_frames"] == 3 and len(cfg["schedule"]) == 2


def test_weight_bits_follow_plan_and_activations_quantized(built):
    models, out, report, chk = built
    plan = report["plan"]
    forced = [n for n, p in plan.items() if p["why"] == "sensitive layer"]
    assert {"patch_embed", "head", "text_proj.0", "text_proj.2"} <= set(forced)
    assert sum(p["bits"] == 4 for p in plan.values()) > len(plan) // 2
    for fn in ("denoise", "commit"):
        w = chk["models"]["DiT"]["functions"][fn]["weights"]
        for layer, p in plan.items():      # every planned layer is quantized (none silently skipped)
            hit = [dt for name, dt in w.items() if name == layer.replace(".", "_") + "_weight"]  # compact_names
            assert hit == [f"INT{p['bits']}"], (layer, hit)
        census = chk["models"]["DiT"]["functions"][fn]["op_census"]
        # one int8 quantize/dequantize pair per layer input; the converter merges pairs that share an
        # input and scale, so fewer than len(plan) remain (measured 75 of 86)
        assert census.get("quantize", 0) >= 0.8 * len(plan) and census["dequantize"] == census["quantize"]


def test_emulated_quantized_close_to_float(built):
    """Emulated W4/W8 + A8 DiT vs float, PSNR of the denoised latents of each streamed chunk.
    Measured on this tiny random model: ~40 dB; floor 30 dB."""
    _, _, report, _ = built
    assert len(report["psnr_per_chunk_db"]) == 3
    assert min(report["psnr_per_chunk_db"]) > 30.0, report["psnr_per_chunk_db"]


def test_emulation_differs_from_float_and_follows_bits():
    """The emulation is not the float model, and 8-bit everywhere is closer than the plan's W4."""
    models = build_models_for_test()
    calib = quantize.capture_calibration(models, quantize.DEFAULT_PROMPTS[:1], 2, 2)
    scales = quantize.calibrate(chunk_step.ChunkStep(models.model, 8).eval(), calib)
    layers = quantize.quant_layers(models.model)
    bs = quantize.get_config("tiny").block_size
    w4 = {n: {"bits": 4, "granularity": quantize.granularity(m, 4, bs)} for n, m in layers.items()}
    w8 = {n: {"bits": 8, "granularity": "per_channel"} for n in layers}
    f = chunk_step.ChunkStep(models.model, 8).eval()
    with torch.no_grad():
        ref = f(*calib[1])[0]
        p4 = quantize.psnr(ref, quantize.emulate_quantized(models.model, w4, scales, 8, bs)(*calib[1])[0])
        p8 = quantize.psnr(ref, quantize.emulate_quantized(models.model, w8, scales, 8, bs)(*calib[1])[0])
    assert 15 < p4 < p8 < 80, (p4, p8)


def test_error_budget_separates_the_sources():
    """quantize.error_budget: every variant streams 3 chunks; switching the activations off changes the
    result (A8 is applied), and W8 everywhere is closer to float than the plan's W4/W8."""
    models = build_models_for_test()
    cfg = quantize.get_config("tiny")
    out = quantize.error_budget(models, cfg, progress=False)
    assert len(out) == 5 and all(len(v) == cfg.eval_chunks for v in out.values())
    mean = {k: sum(v) / len(v) for k, v in out.items()}
    assert all(10 < v < 100 for v in mean.values()), mean                # finite: every variant is perturbed
    assert mean["plan's weights, float activations"] != mean["plan: W4/W8 + A8"]
    assert mean["W8 everywhere + A8"] > mean["plan: W4/W8 + A8"], mean
    assert mean["A8 only (float weights)"] > mean["plan: W4/W8 + A8"], mean


def _graph(path):
    """A package's program as structure only, read from the saved proto: per function, each op's type,
    its attributes other than its name, its output types and, per input, where each argument comes from
    (the position of the op and output producing it, a function input by its API name, a nested block's
    input by position, or an inline value), nested blocks alike, and the block outputs. Names are ignored.
    Read from the proto itself, so that the comparison depends on the two files only: compared after
    coremltools' MIL loader had rebuilt both programs through its builder, the test failed now and
    then, and the cause was not found."""
    from coremltools.models import MLModel
    spec = MLModel(path, skip_model_load=True).get_spec()
    out = {}
    for fname, fn in spec.mlProgram.functions.items():
        where = {i.name: ("input", i.name) for i in fn.inputs}

        def arg(a):
            return where[a.name] if a.HasField("name") else ("value", a.value.SerializeToString())

        def block(b, prefix):
            for i, v in enumerate(b.inputs):
                where[v.name] = ("block_input", prefix, i)
            ops = []
            for k, op in enumerate(b.operations):
                at = prefix + (k,)
                ops.append((op.type,
                            tuple((key, tuple(arg(a) for a in op.inputs[key].arguments)) for key in sorted(op.inputs)),
                            tuple((key, op.attributes[key].SerializeToString()) for key in sorted(op.attributes)
                                  if key != "name"),
                            tuple(o.type.SerializeToString() for o in op.outputs),
                            tuple(block(nb, at + (j,)) for j, nb in enumerate(op.blocks))))
                for j, o in enumerate(op.outputs):
                    where[o.name] = ("op", at, j)
            return ops, tuple(where[n] for n in b.outputs)

        out[fname] = tuple(block(top, (opset,)) for opset, top in sorted(fn.block_specializations.items()))
    return out, spec


def test_compact_names_keeps_the_graph(tmp_path, monkeypatch):
    """compact_names renames only: the quantized DiT exported without it and with it has the same ops
    wired the same way in both functions (and in the stateless fallback), the same I/O and states, unique
    value and op names, stored weights named after their layer, and a smaller program."""
    import shutil
    from coremltools.converters.mil.frontend.milproto.load import load_mil_proto   # b must still load
    rename = mlpackage.compact_names
    models = build_models_for_test()
    m = models.model
    calib = quantize.capture_calibration(models, quantize.DEFAULT_PROMPTS[:1], 1, 2)
    scales = quantize.calibrate(chunk_step.ChunkStep(m, models.latent_hw).eval(), calib)
    plan = quantize.make_plan(models, {n: float("inf") for n in quantize.quant_layers(m)}, deploy.get_config("tiny"))
    monkeypatch.setattr(deploy, "compact_names", lambda path: None)     # export with coremltools' names
    res = deploy.export_dit(models, str(tmp_path), plan, scales)
    size = lambda p: os.path.getsize(os.path.join(p, "Data", "com.apple.CoreML", "model.mlmodel"))
    for name in ("DiT", "DiTStateless"):
        a, b = res[name], str(tmp_path / f"{name}_compact.mlpackage")
        shutil.copytree(a, b)
        rename(b)
        (ga, sa), (gb, sb) = _graph(a), _graph(b)
        assert ga == gb and set(gb) == ({"denoise", "commit"} if name == "DiT" else {"main"})
        assert sa.description == sb.description                          # inputs, outputs, states, metadata
        load_mil_proto(sb.mlProgram, sb.specificationVersion, os.path.join(b, "Data", "com.apple.CoreML", "weights"))
        for fn in sb.mlProgram.functions.values():
            ops = fn.block_specializations[fn.opset].operations
            values = [o.name for op in ops for o in op.outputs]
            op_names = [op.attributes["name"].immediateValue.tensor.strings.values[0] for op in ops]
            assert len(values) == len(set(values)) and len(op_names) == len(set(op_names))
            assert max(map(len, op_names)) <= max(len(v) for v in values)   # no long op name left behind
            assert all(n == op.outputs[0].name for n, op in zip(op_names, ops) if op.outputs)  # op = its output
            stored = {o.name for op in ops if op.type.startswith("constexpr_") for o in op.outputs}
            assert "head_weight" in stored and "patch_embed_weight" in stored, sorted(stored)[:5]
        assert size(b) < 0.75 * size(a), (size(a), size(b))


def test_compact_names_collisions_and_nested_blocks(tmp_path):
    """The renaming rules on a hand-written program: a stored value whose short name is taken keeps its
    long name, a short name that is not an identifier is refused, nested blocks' inputs and outputs
    stay consistent, API names are untouched."""
    from coremltools.proto import MIL_pb2, Model_pb2
    spec = Model_pb2.Model()
    fn = spec.mlProgram.functions["main"]
    fn.opset = "CoreML8"
    fn.inputs.add().name = "x"
    block = fn.block_specializations["CoreML8"]

    def op(typ, outs, ins=(), blob=False):
        o = block.operations.add() if not isinstance(typ, tuple) else typ[1].operations.add()
        o.type = typ if not isinstance(typ, tuple) else typ[0]
        for n in outs:
            o.outputs.add().name = n
        for k, v in ins:
            o.inputs[k].arguments.add().name = v
        if blob:
            o.attributes["val"].blobFileValue.offset = 64
        o.attributes["name"].immediateValue.tensor.strings.values.append(outs[0] if outs else "noout")
        return o
    op("const", ["step_model_a_weight_to_fp16"], blob=True)              # -> a_weight? taken: "a_weight" is stored too
    op("const", ["a_weight"], blob=True)
    op("const", ["step_model_0_weight_to_fp16"], blob=True)              # "0_weight" is not an identifier
    op("const", ["step_model_b_bias_to_fp16"], blob=True)                # -> b_bias
    op("linear", ["lin_out"], [("x", "x"), ("weight", "a_weight"), ("bias", "step_model_b_bias_to_fp16")])
    loop = op("while_loop", ["loop_out_0", "loop_out_1"], [("loop_vars", "lin_out")])
    inner = loop.blocks.add()
    inner.inputs.add().name = "loop_var"
    op(("add", inner), ["inner_sum"], [("x", "loop_var"), ("y", "lin_out")])
    inner.outputs.append("inner_sum")
    op("relu", ["x0"], [("x", "loop_out_1")])
    block.outputs.append("x0")
    pkg = tmp_path / "p.mlpackage"
    os.makedirs(pkg / "Data" / "com.apple.CoreML")
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    mlpackage.compact_names(str(pkg))
    out = Model_pb2.Model()
    out.ParseFromString((pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    ops = out.mlProgram.functions["main"].block_specializations["CoreML8"].operations
    names = [[o.name for o in x.outputs] for x in ops]
    assert names[0] == ["step_model_a_weight_to_fp16"] and names[1] == ["a_weight"]
    assert names[2] == ["step_model_0_weight_to_fp16"] and names[3] == ["b_bias"]
    lin, loop, relu = ops[4], ops[5], ops[6]
    assert [a.name for k in ("x", "weight", "bias") for a in lin.inputs[k].arguments] == ["x", "a_weight", "b_bias"]
    assert lin.outputs[0].name.startswith("_") and loop.inputs["loop_vars"].arguments[0].name == lin.outputs[0].name
    inner = loop.blocks[0]
    assert inner.inputs[0].name == "loop_var" and inner.operations[0].inputs["x"].arguments[0].name == "loop_var"
    assert inner.operations[0].inputs["y"].arguments[0].name == lin.outputs[0].name
    assert inner.operations[0].outputs[0].name.startswith("_")
    assert inner.outputs[0] == inner.operations[0].outputs[0].name
    assert relu.outputs[0].name == "x0" and relu.inputs["x"].arguments[0].name == loop.outputs[1].name
    assert out.mlProgram.functions["main"].block_specializations["CoreML8"].outputs == ["x0"]


def test_quantized_dit_size_tiny(built):
    """What the bytes of the tiny DiT.mlpackage are, fp16 export vs quantized. Tiny is structurally unlike
    the size bar (quantized package <= 0.35x fp16, tested at width in the next test): the
    package is the MIL program of two functions (~1700 ops each, their output types and compact names:
    ~0.44 MB, the same in both exports) plus the weights, and tiny's fp16 weights are only ~0.46 MB, so
    even zero-byte weights would give ~0.5x. What must hold: quantization leaves no layer weight in fp16,
    the float constants left (biases, norm weights, gates, RoPE tables) stay small, the weight blob
    shrinks to <= 0.40x (measured 0.37x: at width 32 most layers are too narrow for blocks of 64 and
    the forced-8-bit ends hold a large share), the program does not grow by more than the constexpr
    ops (the fp16 reference already holds the activation quantize/dequantize ops), and the package holds
    nothing else."""
    models, _, report, chk = built
    f, q = report["dit_fp16"], report["dit_quantized"]
    print(f"\ntiny DiT.mlpackage: fp16 {f['package']:,} B -> quantized {q['package']:,} B "
          f"({report['dit_size_ratio']['package']:.2f}x); program {f['program']:,} -> {q['program']:,} B; weight blob "
          f"{f['weights']:,} -> {q['weights']:,} B ({report['dit_size_ratio']['weights']:.2f}x); quantized data + scales "
          f"{q['quantized']:,} B, fp16 consts {q['float_consts']:,} B (largest {q['largest_float']}), blob overhead "
          f"{q['blob_overhead']:,} B; DiTStateless {report['stateless_size_ratio']['package']:.2f}x")
    assert q["float_matrices"] == [] and f["quantized"] == 0              # every layer weight quantized
    assert q["float_consts"] < 40_000, q                                    # measured 21 kB
    assert q["largest_float"][1] <= 1536, q["largest_float"]               # a RoPE table, not a weight
    assert report["dit_size_ratio"]["weights"] <= 0.40, (f, q)
    assert q["program"] <= 1.06 * f["program"], (f["program"], q["program"])
    assert q["package"] - q["program"] - q["weights"] < 2_000                # only the manifest besides
    assert chk["models"]["DiT"]["sizes"]["package"] == q["package"]        # the check reports the same


def test_quantized_dit_package_ratio(tmp_path):
    """The size bar on DiT.mlpackage: quantized package <= 0.35x its fp16 export, for a DiT of the
    small preset's width, depth and latent size (width 128, 8 blocks, two functions, 16x16 latents; the
    default layout L S S L). The program does not depend on the width, so the bar needs the weights to
    dominate: at tiny's width 32 the package is ~0.7x (previous test). Random weights; bits follow the
    plan's rules without the sensitivity scan (no layer promoted by PSNR): this test is about bytes.
    Measured 0.332x; the trained small run (layout L S L L, two switch projections promoted to 8 bits by
    PSNR) 0.343x (RESULTS.md, Core ML bundle)."""
    models = build_models_for_test("small")
    m = models.model
    calib = quantize.capture_calibration(models, quantize.DEFAULT_PROMPTS[:1], 1, 2)
    scales = quantize.calibrate(chunk_step.ChunkStep(m, models.latent_hw).eval(), calib)
    plan = quantize.make_plan(models, {n: float("inf") for n in quantize.quant_layers(m)}, deploy.get_config("small"))
    os.makedirs(tmp_path / "fp16")
    res = deploy.export_dit(models, str(tmp_path), plan, scales, deploy.get_config("small").block_size,
                            stateless=False, fp16_dir=str(tmp_path / "fp16"))
    f, q = mlpackage.package_sizes(res["DiT_fp16"]), mlpackage.package_sizes(res["DiT"])
    print(f"\nsmall DiT.mlpackage (width {m.cfg.dim}): fp16 {f['package']:,} B -> quantized {q['package']:,} B "
          f"({q['package'] / f['package']:.3f}x; program {q['program']:,} B, weight blob {q['weights'] / f['weights']:.3f}x)")
    assert q["package"] <= 0.35 * f["package"], (f, q)


def test_untraceable_shape_names_the_model(tmp_path):
    models = replace(build_models_for_test(), latent_hw=6)   # 3 x 3 tokens: not divisible by the SSA stride
    with pytest.raises(RuntimeError, match="DiT export failed"):
        deploy.export_dit(models, str(tmp_path), stateless=False)


def test_check_cli_json(built):
    _, out, _, _ = built
    res = subprocess.run([sys.executable, os.path.join(HERE, "deploy.py"), "--check", out, "--json"],
                         capture_output=True, text=True, cwd=HERE, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(last["models"]) == {"TextEncoder", "DiT", "DiTStateless", "Decoder"}
    for m in last["models"].values():
        for key in ("inputs", "outputs", "states", "functions", "weight_dtypes", "size_bytes"):
            assert key in m
        for fn in m["functions"].values():
            assert "op_census" in fn and "non_ane_ops" in fn


def test_run_bundle_needs_macos(built):
    if sys.platform == "darwin":
        pytest.skip("on macOS --run-bundle really runs")
    _, out, _, _ = built
    res = subprocess.run([sys.executable, os.path.join(HERE, "deploy.py"), "--run-bundle", out, "--prompt", "a red circle"],
                         capture_output=True, text=True, cwd=HERE, timeout=120)
    assert res.returncode == 2 and "macOS" in res.stderr


def _break(bundle, what):
    """Break a copy of a good bundle in one of the ways a disk, a sync or a hand edit does."""
    data = lambda pkg, *p: os.path.join(bundle, pkg + ".mlpackage", "Data", "com.apple.CoreML", *p)
    if what == "decoder weights deleted":
        os.remove(data("Decoder", "weights", "weight.bin"))
    elif what == "dit weights truncated":
        with open(data("DiT", "weights", "weight.bin"), "r+b") as f:
            f.truncate(1024)
    elif what == "config empty":
        open(os.path.join(bundle, "s2dit_config.json"), "w").write("{}")
    elif what == "config truncated":
        text = open(os.path.join(bundle, "s2dit_config.json")).read()
        open(os.path.join(bundle, "s2dit_config.json"), "w").write(text[:len(text) // 2])
    elif what == "vocab garbage":
        open(os.path.join(bundle, "vocab.json"), "wb").write(b"\x89PNG\r\n garbage \xff\xfe")
    elif what == "program garbage":
        open(data("TextEncoder", "model.mlmodel"), "wb").write(os.urandom(4096))
    elif what == "manifest corrupt":
        open(os.path.join(bundle, "DiTStateless.mlpackage", "Manifest.json"), "w").write('{"itemInfoEntries": ')
    elif what == "vocab without words":
        open(os.path.join(bundle, "vocab.json"), "w").write('{"tokens": ["a", "a"], "max_len": 16}')
    elif what == "config wrong type":
        cfg = json.load(open(os.path.join(bundle, "s2dit_config.json")))
        json.dump({**cfg, "steps": "two"}, open(os.path.join(bundle, "s2dit_config.json"), "w"))
    elif what == "weights header zeroed":
        with open(data("Decoder", "weights", "weight.bin"), "r+b") as f:
            f.write(b"\0" * 64)


BROKEN = {"decoder weights deleted": "Decoder.mlpackage: weights/weight.bin missing",
          "dit weights truncated": "DiT.mlpackage: weight",              # "... lies past the end of weight.bin"
          "config empty": "s2dit_config.json: missing 'version'",
          "config truncated": "s2dit_config.json: not valid JSON",
          "vocab garbage": "vocab.json: not valid JSON",
          "program garbage": "TextEncoder.mlpackage: com.apple.CoreML/model.mlmodel",
          "manifest corrupt": "DiTStateless.mlpackage: Manifest.json is corrupt",
          "vocab without words": "vocab.json: 'tokens' must start with <pad>, <unk>",
          "config wrong type": "s2dit_config.json: 'steps' is a str, expected int",
          "weights header zeroed": "Decoder.mlpackage: weights/weight.bin has no valid header"}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_check_finds_each_broken_file(built, what, tmp_path, capsys):
    """deploy.py --check reads every file the app reads: each breakage -> ok false, the reason, exit 1."""
    bundle = str(tmp_path / "S2DiTResources")
    shutil.copytree(built[1], bundle)
    _break(bundle, what)
    assert deploy.main(["--check", bundle, "--json"]) == 1
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is False and any(p.startswith(BROKEN[what]) for p in res["problems"]), res["problems"]
    assert "Traceback" not in err
    if what == "dit weights truncated":
        assert any("past the end of weight.bin (1024 bytes)" in p for p in res["problems"])
    if what == "decoder weights deleted":                              # the rest of the bundle is still read
        assert set(res["models"]) == {"TextEncoder", "DiT", "DiTStateless"}


def test_out_replaces_its_own_bundle_only(built, tmp_path, capsys):
    """The bundle carries deploy.py's marker; a folder without it is refused before any work."""
    assert os.path.isfile(os.path.join(built[1], deploy.BUNDLE_MARKER))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        deploy.build_bundle(built[0], str(mine), progress=False)
    assert os.listdir(mine) == ["keep.txt"] and (mine / "keep.txt").read_text() == "mine"
