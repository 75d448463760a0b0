"""The offline KD cache on disk (paper Sec. C.1): the teacher's diffusion tuples, written once.

Sec. C.1's point is that the teacher (a 14B MoE for the paper; dit.MoETeacher here) runs ONCE over
the data, and the student's KD (Eq. 12, distill.kd_loss) then reads its answers from disk: the
teacher is never in memory while the student trains. This file is that cache:

    <run>/cache/index.json       per shard: file, sample count, sha256, bytes; the build's settings
    <run>/cache/shard_00000.pt   {text, mask, t_h, n_h, v_h, t_l, n_l, v_l} (distill.KD_KEYS) of
                                 shard_size samples, torch.save'd

`build_cache` writes the shards atomically and resumes an interrupted build (intact shards are
skipped, a rebuilt shard equals the original bit for bit); `CachedKD` reads them as a dataset and
verifies each shard's checksum when it first opens it; `kd_speed_comparison` measures what the
cache buys: KD steps per second and extra memory, cached against the teacher in the loop.

Run `python kdcache.py`: a random tiny teacher cached in 3 shards, read back and verified.
"""
import copy
import hashlib
import io
import json
import os
import resource
import tempfile
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import dit
import safeio
from distill import KD_KEYS, kd_loss, teacher_tuples
from flow import optimizer_step

SHARD_SEED_STRIDE = 1_000_003      # shard k draws its noise from seed * stride + k


def _sha256(data: bytes):
    return hashlib.sha256(data).hexdigest()


def build_cache(teacher, batch_fn, n_samples, out_dir, shard_size, boundary, cfg_scale, seed, progress=True):
    """The `cache` stage. batch_fn(k) -> (x0, text, mask, null_text, null_mask): the clean data of shard
    k (at least shard_size samples; the surplus is dropped). Each shard is one torch.save'd dict of
    KD_KEYS, written atomically; `index.json` lists per shard its file, sample count and sha256 and is
    rewritten after every shard, so an interrupted build resumes: complete, intact shards are skipped.
    Shard k's noise comes from its own seed, so a rebuilt shard equals the original bit for bit."""
    if n_samples < 1 or shard_size < 1:
        raise ValueError(f"expected n_samples, shard_size >= 1, got {n_samples}, {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "index.json")
    meta = {"n_samples": n_samples, "shard_size": shard_size, "boundary": boundary, "cfg_scale": cfg_scale, "seed": seed}
    index = {**meta, "shards": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{index_path} was built with {({k: old.get(k) for k in meta})}, not {meta}; "
                             f"delete {out_dir} to rebuild the cache")
        index = old
    n_shards = -(-n_samples // shard_size)
    done = {s["file"]: s for s in index["shards"]}
    skipped = built = 0
    t0 = time.perf_counter()
    for k in tqdm(range(n_shards), desc="cache", disable=not progress):
        name = f"shard_{k:05d}.pt"
        path = os.path.join(out_dir, name)
        count = min(shard_size, n_samples - k * shard_size)
        if name in done and os.path.exists(path):
            with open(path, "rb") as f:
                if _sha256(f.read()) == done[name]["sha256"]:
                    skipped += 1
                    continue
        x0, text, mask, null_text, null_mask = batch_fn(k)
        if x0.shape[0] < count:
            raise ValueError(f"batch_fn({k}) returned {x0.shape[0]} samples, shard {name} needs {count}")
        g = torch.Generator().manual_seed(seed * SHARD_SEED_STRIDE + k)
        tup = teacher_tuples(teacher, x0[:count], text[:count], mask[:count], null_text, null_mask,
                             boundary, cfg_scale, g)
        buf = io.BytesIO()
        torch.save({key: tup[key].detach().cpu().contiguous().clone() for key in KD_KEYS}, buf)
        data = buf.getvalue()
        safeio.write_bytes(path, data)
        done[name] = {"file": name, "count": count, "sha256": _sha256(data), "bytes": len(data)}
        index["shards"] = [done[n] for n in sorted(done)]
        safeio.write_bytes(index_path, json.dumps(index, indent=1).encode())
        built += 1
    size = sum(s["bytes"] for s in index["shards"])
    return {"n_samples": n_samples, "shards": n_shards, "built": built, "skipped": skipped,
            "cache_bytes": size, "seconds": time.perf_counter() - t0}


class CachedKD:
    """The cache as a dataset: item i -> dict of KD_KEYS tensors of sample i. A shard is verified
    (sha256 and sample count against index.json) when it is first opened."""

    def __init__(self, out_dir):
        self.dir = out_dir
        path = os.path.join(out_dir, "index.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"KD cache index {path} not found; run the `cache` stage first")
        with open(path) as f:
            self.index = json.load(f)
        self.shards = self.index["shards"]
        self.starts = [sum(s["count"] for s in self.shards[:i]) for i in range(len(self.shards))]
        self.loaded = {}
        self.nbytes = sum(s["bytes"] for s in self.shards)

    def __len__(self):
        return sum(s["count"] for s in self.shards)

    def _corrupt(self, path, why):
        return RuntimeError(f"KD cache shard {path} is corrupt or truncated ({why}); "
                            f"re-run the `cache` stage (it rebuilds damaged shards)")

    def shard(self, i):
        if i not in self.loaded:
            s = self.shards[i]
            path = os.path.join(self.dir, s["file"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"KD cache shard {path} is missing; re-run the `cache` stage")
            with open(path, "rb") as f:
                data = f.read()
            if _sha256(data) != s["sha256"]:
                raise self._corrupt(path, f"sha256 mismatch, {len(data)} bytes vs {s['bytes']} expected")
            try:
                d = torch.load(io.BytesIO(data), weights_only=True)
            except Exception as e:  # noqa: BLE001 -- any unpickling failure is the same user error
                raise self._corrupt(path, f"torch.load failed: {e}") from e
            if set(d) != set(KD_KEYS) or any(d[k].shape[0] != s["count"] for k in KD_KEYS):
                raise self._corrupt(path, f"expected {s['count']} samples of {KD_KEYS}")
            self.loaded[i] = d
        return self.loaded[i]

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a cache of {len(self)}")
        i = max(j for j, s in enumerate(self.starts) if s <= idx)
        d = self.shard(i)
        return {k: d[k][idx - self.starts[i]] for k in KD_KEYS}

    def collate(self, indices):
        items = [self[int(i)] for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in KD_KEYS}

    def verify_all(self):
        for i in range(len(self.shards)):
            self.shard(i)


# ----------------------------------------------------------------------------------------------
# What the cache buys (Sec. C.1): speed and memory of cached KD against the teacher in the loop
# ----------------------------------------------------------------------------------------------
def _rss_kb(field):
    """VmHWM (peak) or VmRSS (current) of this process in kB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak():
    """Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kd_speed_comparison(student, teacher, cache, batch_fn, steps, boundary=0.5, cfg_scale=3.0, lr=1e-4):
    """Cached KD vs on-the-fly KD (teacher forwards inside the loop), same run, same student start.
    Memory method: per phase, peak resident set size (VmHWM, reset before the phase through
    /proc/self/clear_refs) minus the RSS at the phase start = the extra memory the loop needs for
    activations, teacher outputs and optimizer state; falls back to ru_maxrss (monotone, so only an
    upper bound) where clear_refs is unavailable. Weights already resident are not in that delta, so
    `weights_mb` adds the parameter bytes each loop needs loaded (on-the-fly: student + teacher)."""
    pb = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters()) / 2 ** 20
    B = batch_fn(0)[0].shape[0]
    res = {}
    for name in ("cached", "on_the_fly"):
        s = copy.deepcopy(student)
        opt = torch.optim.AdamW(s.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)

        def batch(i):
            if name == "cached":
                return cache.collate(torch.randint(len(cache), (B,), generator=g))
            return teacher_tuples(teacher, *batch_fn(i), boundary, cfg_scale, g)
        optimizer_step(opt, kd_loss(s, batch(0)), list(s.parameters()), 0)   # warm-up, not timed
        exact = _reset_peak()
        rss0 = _rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        for i in range(steps):
            optimizer_step(opt, kd_loss(s, batch(i + 1)), list(s.parameters()), 0)
        dt = time.perf_counter() - t0
        peak = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res[name] = {"steps_per_s": steps / dt, "peak_rss_delta_mb": max(peak - rss0, 0) / 1024,
                     "weights_mb": pb(student) + (pb(teacher) if name == "on_the_fly" else 0.0)}
    res["speedup"] = res["cached"]["steps_per_s"] / res["on_the_fly"]["steps_per_s"]
    res["weights_ratio"] = res["on_the_fly"]["weights_mb"] / res["cached"]["weights_mb"]
    res["memory_method"] = "VmHWM-VmRSS via /proc/self/clear_refs" if exact else "ru_maxrss delta (upper bound)"
    return res


def _demo():
    torch.manual_seed(0)
    cfg = dit.get_config("tiny", depth=2)
    teacher = dit.MoETeacher(cfg).eval()
    for p in teacher.parameters():                                   # a fresh DiT outputs v = 0: give it a function
        nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    null_t, null_m = torch.zeros(1, 4, cfg.text_dim), torch.ones(1, 4, dtype=torch.bool)
    data = lambda k: (torch.randn(2, cfg.in_channels, 3, 8, 8), torch.randn(2, 4, cfg.text_dim),
                      torch.ones(2, 4, dtype=torch.bool), null_t, null_m)
    with tempfile.TemporaryDirectory() as d:
        info = build_cache(teacher, data, 5, d, 2, 0.5, 3.0, seed=0, progress=False)
        again = build_cache(teacher, data, 5, d, 2, 0.5, 3.0, seed=0, progress=False)
        cache = CachedKD(d)
        cache.verify_all()
        b = cache.collate(range(len(cache)))
    print(f"{info['shards']} shards, {info['cache_bytes']:,} bytes; built again: {again['skipped']} skipped")
    print("cached tuples: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in b.items()))
    assert again["built"] == 0 and (b["t_h"] >= 0.5).all() and (b["t_l"] < 0.5).all()


if __name__ == "__main__":
    _demo()
