"""Inside a saved Core ML package (.mlpackage): what its bytes are, its names, the offline check.

deploy.py converts the models and writes the bundle; this file only reads and rewrites saved packages,
at the protobuf level (coremltools.proto), so it runs on Linux without the Core ML framework.

  .mlpackage/Data/com.apple.CoreML/model.mlmodel    the MIL program: per function, ops with their
                                                    names, output types and small inline constants
  .mlpackage/Data/com.apple.CoreML/weights/weight.bin   the weight blob, referenced by offset

  compact_names(pkg)     the program without coremltools' long value names (a third of its bytes)
  package_sizes(pkg)     package = program + blob (quantized data, fp16 constants, alignment) + manifest
  inspect_package(pkg)   functions, I/O, states, op census with ops flagged as not Neural-Engine, weight
                         dtypes per layer, sizes
  check_bundle(dir)      every file and model of an S2DiTResources bundle (deploy.py --check)

Run `python mlpackage.py`: converts a two-layer MLP, compacts its names and prints the bytes before and
after, in seconds.
"""
import json
import math
import os
import re

import safeio


# Ops that public reports say do not run on the Neural Engine (they fall back to CPU/GPU).
# ASSUMPTION: not an Apple list; verify on a device with MLComputePlan. "conv3d" = conv on a rank-5 input.
NON_ANE_OPS = {"gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
               "cumsum", "topk", "argsort", "non_maximum_suppression", "while_loop", "cond", "random_normal",
               "random_uniform", "random_bernoulli", "random_categorical", "conv3d", "einsum"}


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
def _short_name(i):
    """0 -> "_0", 35 -> "_z", 36 -> "_10": base-36 names; a leading "_" never matches our API names."""
    digits, s = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        s, i = digits[i % 36] + s, i // 36
        if i == 0:
            return "_" + s


def compact_names(path):
    """Rename a saved package's intermediate values and ops to short names ("_0", "_1", ...), in place.

    coremltools names every value after the traced torch code ("step_model_groups_3_0_attn_qkv_linear_
    cast_fp16"), and each name is stored three times or more: as the op's output, as the op's own "name"
    attribute and at every use. For the small DiT the names were a third of the program. The graph does
    not change. Kept: the function inputs, outputs and states (the API in s2dit_config.json) and any
    nested block's inputs; the values stored in the weight blob (layer weights, biases) keep their torch
    name ("head_weight"), so the check can still say which layer is int4 / int8. Applied to the fp16
    reference export too: size ratios compare like with like."""
    from coremltools.proto import Model_pb2
    file = os.path.join(path, "Data", "com.apple.CoreML", "model.mlmodel")
    spec = Model_pb2.Model()
    with open(file, "rb") as f:
        spec.ParseFromString(f.read())

    def holds_blob(op):
        vals = [op.attributes["val"]] if "val" in op.attributes else []
        vals += [a.value for arg in op.inputs.values() for a in arg.arguments if a.HasField("value")]
        return any(v.HasField("blobFileValue") for v in vals)

    def blocks(block):                                            # a block and the blocks nested in it
        yield block
        for op in block.operations:
            for b in op.blocks:
                yield from blocks(b)

    for fn in spec.mlProgram.functions.values():
        for top in fn.block_specializations.values():
            ops = list(_walk_ops(top))
            api = {i.name for i in fn.inputs} | set(top.outputs) | {i.name for b in blocks(top) for i in b.inputs}
            # stored values keep a readable name, without the wrapper prefix and the cast suffixes:
            # "step_model_head_weight_to_fp16_quantized" -> "head_weight"
            stored = [o.name for op in ops if holds_blob(op) for o in op.outputs if o.name not in api]
            new = {}
            for n in stored:
                short = re.sub(r"(_to_fp16)?(_quantized)?$", "", re.sub(r"^step_model_", "", n))
                taken = (short in api or short in new.values() or (short != n and short in stored)
                         or not re.fullmatch(r"[A-Za-z_]\w*", short))
                new[n] = n if taken else short
            used, counter = api | set(new.values()), iter(range(10 ** 9))

            def fresh():
                while (name := _short_name(next(counter))) in used:
                    pass
                return name

            for op in ops:                                        # every other value: "_0", "_1", ...
                for o in op.outputs:
                    if o.name not in api and o.name not in new:
                        new[o.name] = fresh()
            rename = lambda n: new.get(n, n)
            for op in ops:
                for o in op.outputs:
                    o.name = rename(o.name)
                for arg in op.inputs.values():
                    for a in arg.arguments:
                        if a.HasField("name"):
                            a.name = rename(a.name)
                if "name" in op.attributes:                       # the op's name: its first output's, or fresh
                    op.attributes["name"].immediateValue.tensor.strings.values[:] = \
                        [op.outputs[0].name if op.outputs else fresh()]
            for b in blocks(top):
                b.outputs[:] = [rename(n) for n in b.outputs]
    with safeio.atomic_path(file) as tmp, open(tmp, "wb") as f:
        f.write(spec.SerializeToString())


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def weight_bytes(path):
    w = os.path.join(path, "Data", "com.apple.CoreML", "weights")
    return dir_bytes(w) if os.path.isdir(w) else 0


def package_sizes(path):
    """Bytes of a .mlpackage by what they hold: `package` (all files) = `program` (model.mlmodel: the MIL
    ops of every function, their names, output types and inline constants) + `weights` (the blob) +
    the manifest. The blob = `quantized` (int4/int8 weight data and their fp16 scales, constexpr ops)
    + `float_consts` (constants left in fp16/fp32: biases, norm weights, gates, RoPE tables) + `blob_overhead`
    (per-entry headers and 64-byte alignment). `float_matrices`: unquantized layer weights of rank >= 2
    (should be none). `largest_float`: the biggest float constant, (name, elements)."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2
    bits = {"FLOAT16": 16, "FLOAT32": 32, "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "INT32": 32, "BFLOAT16": 16}
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    entries = {}                                         # blob offset -> (kind, bytes, name, elements, rank)
    for fn in spec.mlProgram.functions.values():
        for op in _walk_ops(fn.block_specializations[fn.opset]):
            vals = [op.attributes["val"]] if op.type == "const" else \
                [a.value for arg in op.inputs.values() for a in arg.arguments if a.HasField("value")]
            for v in vals:
                if not v.HasField("blobFileValue"):
                    continue
                tt = v.type.tensorType
                n = math.prod(d.constant.size for d in tt.dimensions)
                kind = "quantized" if op.type.startswith("constexpr_") else "float_consts"
                nbytes = (n * bits.get(MIL_pb2.DataType.Name(tt.dataType), 32) + 7) // 8
                entries[v.blobFileValue.offset] = (kind, nbytes, op.outputs[0].name, n, len(tt.dimensions))
    out = {"package": dir_bytes(path), "program": os.path.getsize(os.path.join(path, "Data", "com.apple.CoreML", "model.mlmodel")),
           "weights": weight_bytes(path), "quantized": 0, "float_consts": 0}
    for kind, nbytes, *_ in entries.values():
        out[kind] += nbytes
    out["blob_overhead"] = out["weights"] - out["quantized"] - out["float_consts"]
    floats = [e for e in entries.values() if e[0] == "float_consts"]
    out["float_matrices"] = sorted(name for _, _, name, n, rank in floats if rank >= 2 and "weight" in name)
    out["largest_float"] = max(((name, n) for _, _, name, n, _ in floats), key=lambda e: e[1], default=None)
    return out


# ----------------------------------------------------------------------------------------------
# The offline check
# ----------------------------------------------------------------------------------------------
def _walk_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk_ops(b)


def _feature(f):
    t = f.type
    kind = t.WhichOneof("Type")
    if kind == "multiArrayType":
        from coremltools.proto import FeatureTypes_pb2 as ft
        return {"name": f.name, "shape": list(t.multiArrayType.shape),
                "dtype": ft.ArrayFeatureType.ArrayDataType.Name(t.multiArrayType.dataType)}
    if kind == "stateType":
        a = t.stateType.arrayType
        return {"name": f.name, "shape": list(a.shape), "dtype": "FLOAT16" if a.dataType == 65552 else str(a.dataType)}
    return {"name": f.name, "type": kind}


def inspect_package(path):
    """Functions, I/O, states, op census (+ ops flagged as not Neural-Engine), weight dtypes, sizes."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    d = spec.description
    funcs = list(d.functions) or [d]
    names = [f.name for f in d.functions] or ["main"]
    out = {"functions": {}, "metadata": {"author": d.metadata.author, "short_description": d.metadata.shortDescription,
                                         "version": d.metadata.versionString, **dict(d.metadata.userDefined)},
           "size_bytes": dir_bytes(path), "weights_bytes": weight_bytes(path), "sizes": package_sizes(path)}
    for name, f in zip(names, funcs):
        fn = spec.mlProgram.functions[name]
        census, weights, flagged = {}, {}, set()
        for op in _walk_ops(fn.block_specializations[fn.opset]):
            typ = op.type
            if typ == "conv" and len(op.outputs[0].type.tensorType.dimensions) == 5:
                typ = "conv3d"                                           # a 3-D conv: see NON_ANE_OPS
            census[typ] = census.get(typ, 0) + 1
            if typ in NON_ANE_OPS:
                flagged.add(typ)
            if typ.startswith("constexpr_"):
                arg = op.inputs["data"].arguments[0] if "data" in op.inputs else None
                dt = arg.value.type.tensorType.dataType if arg is not None and arg.HasField("value") else None
                weights[op.outputs[0].name] = MIL_pb2.DataType.Name(dt) if dt is not None else typ
            elif typ == "const" and "val" in op.attributes:
                tt = op.attributes["val"].type.tensorType
                if len(tt.dimensions) >= 2:
                    weights[op.outputs[0].name] = MIL_pb2.DataType.Name(tt.dataType)
        out["functions"][name] = {"inputs": [_feature(i) for i in f.input], "outputs": [_feature(o) for o in f.output],
                                  "states": [_feature(s) for s in f.state], "op_census": census,
                                  "non_ane_ops": sorted(flagged), "weights": weights}
    first = out["functions"][names[0]]
    out.update({k: first[k] for k in ("inputs", "outputs", "states")})
    out["weight_dtypes"] = {}
    for fn in out["functions"].values():
        for dt in fn["weights"].values():
            out["weight_dtypes"][dt] = out["weight_dtypes"].get(dt, 0) + 1
    return out


# What the app reads from s2dit_config.json: key -> JSON type. Checked by check_config.
CONFIG_SCHEMA = {"version": str, "model": str, "chunk_latent_frames": int, "window_chunks": int, "steps": int,
                 "shift": (int, float), "schedule": list, "t_ctx": (int, float), "fps": int, "frames_per_chunk": dict,
                 "latent": list, "text": dict, "compute_units": dict, "tensors": dict, "quantization": dict}
PACKAGES = {"TextEncoder": ["main"], "DiT": ["denoise", "commit"], "DiTStateless": ["main"],
            "Decoder": ["decode_first", "decode"]}
COMPUTE_UNIT_NAMES = {"ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"}
BLOB_SENTINEL = 0xDEADBEEF      # coremltools' weight file (MIL blob storage v2): a 64-byte file header
                                # {u32 count, u32 version = 2, 7 x u64 reserved}, and before every blob a
                                # 64-byte header {u32 sentinel, u32 dtype, u64 size, u64 data offset, ...}


def check_config(cfg):
    """s2dit_config.json against CONFIG_SCHEMA and its own consistency -> list of problems."""
    if not isinstance(cfg, dict):
        return ["s2dit_config.json: not a JSON object"]
    problems = []
    for k, typ in CONFIG_SCHEMA.items():
        if k not in cfg:
            problems.append(f"s2dit_config.json: missing {k!r}")
        elif not isinstance(cfg[k], typ) or isinstance(cfg[k], bool):
            problems.append(f"s2dit_config.json: {k!r} is a {type(cfg[k]).__name__}, expected "
                            f"{getattr(typ, '__name__', 'a number')}")
    if problems:
        return problems
    pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    for k in ("chunk_latent_frames", "window_chunks", "steps", "fps"):
        if not pos_int(cfg[k]):
            problems.append(f"s2dit_config.json: {k!r} must be a positive integer, got {cfg[k]!r}")
    sched = cfg["schedule"]
    if len(sched) != cfg["steps"] or not all(isinstance(t, (int, float)) and 0 < t <= 1 for t in sched):
        problems.append(f"s2dit_config.json: 'schedule' must hold 'steps' = {cfg['steps']} times in (0, 1], got {sched!r}")
    if not 0 <= cfg["t_ctx"] < 1:
        problems.append(f"s2dit_config.json: 't_ctx' must be in [0, 1), got {cfg['t_ctx']!r}")
    if len(cfg["latent"]) != 5 or not all(pos_int(v) for v in cfg["latent"]):
        problems.append(f"s2dit_config.json: 'latent' must be 5 positive integers (1, C, T, h, w), got {cfg['latent']!r}")
    for k in ("max_len", "dim"):
        if not pos_int(cfg["text"].get(k)):
            problems.append(f"s2dit_config.json: 'text.{k}' must be a positive integer")
    if not all(pos_int(cfg["frames_per_chunk"].get(k)) for k in ("first", "next")):
        problems.append("s2dit_config.json: 'frames_per_chunk' needs positive integers 'first' and 'next'")
    cu = cfg["compute_units"]
    if set(cu) != set(PACKAGES) or not set(cu.values()) <= COMPUTE_UNIT_NAMES:
        problems.append(f"s2dit_config.json: 'compute_units' must map {sorted(PACKAGES)} to one of "
                        f"{sorted(COMPUTE_UNIT_NAMES)}, got {cu!r}")
    if not set(PACKAGES) <= set(cfg["tensors"]):
        problems.append(f"s2dit_config.json: 'tensors' must describe {sorted(PACKAGES)}")
    return problems


def check_vocab(path, max_len=None):
    """vocab.json as the app tokenizes with it: tokens (unique strings, <pad> = 0, <unk> = 1), max_len."""
    try:
        with open(path) as f:
            v = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        return [f"vocab.json: not valid JSON ({str(e)[:80]})"]
    if not isinstance(v, dict) or not isinstance(v.get("tokens"), list):
        return ["vocab.json: expected an object with a 'tokens' list"]
    tokens, problems = v["tokens"], []
    if tokens[:2] != ["<pad>", "<unk>"] or len(tokens) < 3:
        problems.append("vocab.json: 'tokens' must start with <pad>, <unk> and hold words")
    if not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
        problems.append("vocab.json: 'tokens' must be distinct non-empty strings")
    if v.get("pad_id") != 0 or v.get("unk_id") != 1:
        problems.append("vocab.json: 'pad_id' must be 0 and 'unk_id' 1")
    if not isinstance(v.get("max_len"), int) or v["max_len"] < 1 or (max_len is not None and v["max_len"] != max_len):
        problems.append(f"vocab.json: 'max_len' {v.get('max_len')!r} must equal s2dit_config.json's text.max_len {max_len}")
    return problems


def _blob_refs(spec):
    """Every weight-file reference of a program: (offset, expected bytes, value name)."""
    from coremltools.proto import MIL_pb2
    bits = {"FLOAT16": 16, "FLOAT32": 32, "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "INT32": 32, "BFLOAT16": 16}
    refs = []
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in _walk_ops(block):
                vals = list(op.attributes.values())
                vals += [a.value for arg in op.inputs.values() for a in arg.arguments if a.HasField("value")]
                for v in vals:
                    if v.HasField("blobFileValue"):
                        tt = v.type.tensorType
                        n = math.prod(d.constant.size for d in tt.dimensions)
                        nbytes = (n * bits.get(MIL_pb2.DataType.Name(tt.dataType), 32) + 7) // 8
                        refs.append((v.blobFileValue.offset, nbytes, op.outputs[0].name if op.outputs else op.type))
    return refs


def check_package_files(path):
    """The files of one .mlpackage as Core ML reads them, without loading it: the manifest, the program
    (a protobuf that parses, an ML program with functions) and the weight file, every blob the program
    references inside it with a valid header and at least the bytes its tensor type needs."""
    import struct
    from coremltools.proto import Model_pb2
    name = os.path.basename(path.rstrip("/"))
    try:
        with open(os.path.join(path, "Manifest.json")) as f:
            man = json.load(f)
        root = man["itemInfoEntries"][man["rootModelIdentifier"]]["path"]
    except FileNotFoundError:
        return [f"{name}: Manifest.json missing"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{name}: Manifest.json is corrupt ({type(e).__name__}: {str(e)[:80]})"]
    model_file = os.path.join(path, "Data", root)
    if not os.path.isfile(model_file):
        return [f"{name}: the manifest's model file Data/{root} is missing"]
    spec = Model_pb2.Model()
    try:
        with open(model_file, "rb") as f:
            spec.ParseFromString(f.read())
    except Exception as e:                                   # protobuf's DecodeError and friends
        return [f"{name}: {root} is not a Core ML model ({type(e).__name__}: {str(e)[:80]})"]
    if spec.WhichOneof("Type") != "mlProgram" or not spec.mlProgram.functions:
        return [f"{name}: {root} holds no ML program (corrupt or not written by coremltools)"]
    refs = _blob_refs(spec)
    weights = os.path.join(os.path.dirname(model_file), "weights", "weight.bin")
    if not refs:
        return []
    if not os.path.isfile(weights):
        return [f"{name}: weights/weight.bin missing ({len(refs)} weights reference it)"]
    size, problems = os.path.getsize(weights), []
    with open(weights, "rb") as f:
        head = f.read(64)
        count, version = struct.unpack_from("<II", head) if len(head) == 64 else (0, 0)
        if version != 2 or count < len({offset for offset, _, _ in refs}):
            return [f"{name}: weights/weight.bin has no valid header ({size} bytes, {count} blobs for "
                    f"{len(refs)} references)"]
        for offset, need, value in refs:
            if offset + 64 > size:
                problems.append(f"{name}: weight {value} at offset {offset} lies past the end of weight.bin ({size} bytes)")
                continue
            f.seek(offset)
            sentinel, _, nbytes, data_at = struct.unpack("<IIQQ", f.read(24))
            if sentinel != BLOB_SENTINEL:
                problems.append(f"{name}: weight {value} at offset {offset}: no blob header in weight.bin")
            elif data_at + nbytes > size:
                problems.append(f"{name}: weight {value}: its {nbytes} bytes at offset {data_at} run past the end "
                                f"of weight.bin ({size} bytes)")
            elif nbytes != need:
                problems.append(f"{name}: weight {value}: the blob holds {nbytes} bytes, its type needs {need}")
    if len(problems) > 5:                                    # one truncation breaks many: say it, count the rest
        problems = problems[:3] + [f"{name}: ... and {len(problems) - 3} more weights outside weight.bin"]
    return problems


def check_bundle(path):
    """Validate a bundle offline (no prediction): every file the app reads (config against its schema,
    vocabulary, each package's manifest, program and weight file), then every model's I/O, states,
    functions, ops, weight dtypes, metadata. Never raises on a broken bundle.
    -> {"ok", "problems", "models": {...}, "config": ...}."""
    if not os.path.isdir(path):
        what = "is a file, not a bundle directory" if os.path.exists(path) else "not found"
        return {"bundle": path, "ok": False, "models": {}, "config": None,
                "problems": [f"bundle directory {path} {what}; build one with `python deploy.py --run RUN --out {path}`"]}
    problems, models, config = [], {}, None
    for f in ("vocab.json", "s2dit_config.json", "README.md"):
        if not os.path.isfile(os.path.join(path, f)):
            problems.append(f"missing {f}")
    if os.path.isfile(os.path.join(path, "s2dit_config.json")):
        try:
            with open(os.path.join(path, "s2dit_config.json")) as f:
                config = json.load(f)
            problems += check_config(config)
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"s2dit_config.json: not valid JSON ({str(e)[:80]})")
    if os.path.isfile(os.path.join(path, "vocab.json")):
        max_len = config.get("text", {}).get("max_len") if isinstance(config, dict) and isinstance(config.get("text"), dict) else None
        problems += check_vocab(os.path.join(path, "vocab.json"), max_len)
    for name, fns in PACKAGES.items():
        p = os.path.join(path, name + ".mlpackage")
        if not os.path.isdir(p):
            problems.append(f"missing {name}.mlpackage")
            continue
        broken = check_package_files(p)
        problems += broken
        if broken:
            continue
        try:
            info = inspect_package(p)
        except Exception as e:                               # anything else coremltools cannot read
            problems.append(f"{name}: unreadable ({type(e).__name__}: {str(e)[:120]})")
            continue
        models[name] = info
        if sorted(info["functions"]) != sorted(fns):
            problems.append(f"{name}: functions {sorted(info['functions'])}, expected {fns}")
        if name == "DiT" and not all(info["functions"][f]["states"] for f in info["functions"]):
            problems.append("DiT: functions without states")
        if not info["metadata"].get("role") or not info["metadata"].get("intended_compute_units"):
            problems.append(f"{name}: metadata role / intended_compute_units missing")
    return {"bundle": path, "ok": not problems, "problems": problems, "models": models, "config": config}


if __name__ == "__main__":
    import shutil
    import tempfile

    import coremltools as ct
    import torch
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(1, 64)
    ml = ct.convert(torch.jit.trace(mlp, x), inputs=[ct.TensorType(name="x", shape=(1, 64))],
                    outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS18)
    d = tempfile.mkdtemp()
    a, b = os.path.join(d, "a.mlpackage"), os.path.join(d, "b.mlpackage")
    ml.save(a)
    shutil.copytree(a, b)
    compact_names(b)
    sa, sb = package_sizes(a), package_sizes(b)
    ops = lambda p: [(op.type, [o.name for o in op.outputs]) for op in _walk_ops(
        (lambda f: f.block_specializations[f.opset])(ct.models.MLModel(p, skip_model_load=True).get_spec().mlProgram.functions["main"]))]
    for (ta, na), (tb, nb) in zip(ops(a), ops(b)):
        print(f"{ta:10s} {', '.join(na):34s} -> {', '.join(nb)}")
    print(f"program {sa['program']:,} B -> {sb['program']:,} B; weight blob {sa['weights']:,} B (unchanged: {sb['weights']:,} B)")
    assert [t for t, _ in ops(a)] == [t for t, _ in ops(b)] and sb["program"] < sa["program"] and sa["weights"] == sb["weights"]
    shutil.rmtree(d)
