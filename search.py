"""Budget-aware sandwich search (paper Alg. 1, Eq. 10, supplementary Sec. A).

How the paper found its layout, in four steps:

1. A latency table: one LCHA group at high resolution, one SSA group at low resolution and one branch
   switch (down_n + up_n), measured on this CPU at the preset's shapes (one chunk of 3 latent frames)
   once and stored (LATENCY_MS: a timing during the run would let machine load pick the layout);
   plus an estimate for the paper's iPhone from FLOPs and bytes moved (`iphone_estimate`).
2. The search space shrinks (Sec. A): 2^(2n) (each of 2n blocks picks LCHA or SSA) -> 2^n (the two
   blocks of a group share their choice) -> 2^(n-2) (m_1 = m_M = 1) -> C(n-2, k) (the budget fixes k,
   the number of LCHA groups among the n-2 middle ones).
3. The budget-aware dynamic program picks k: the largest number of high-resolution (LCHA) groups whose
   cheapest arrangement still meets the latency (or memory) budget.
4. Differentiable routing (Alg. 1): a supernet computes both branches of every group; binary routers
   m_n = Gumbel-top-k with a straight-through estimator keep exactly k LCHA groups in the middle; the
   supernet (inheriting T_theta's weights) and the routers are trained by self-distillation, Eq. 10:
        L_SD = E_{x0, eps, t, e} || S_{theta, m}(x_t, t, e) - T_theta(x_t, t, e) ||^2
   against the frozen, pretrained all-self-attention DiT T_theta. The layout is the top-k of the router logits.

`python search.py --run runs/X --budget-ms N --json` prints the chosen layout, its latency and Eq. 10
loss beside the alternatives at the same budget (hourglass, all-LCHA, all-SSA, random): the toy Tab. 3.
`python search.py` alone runs a seconds-long planted-problem demo.
"""
import itertools
import json
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dist
import dit
import flow
import runs
import safeio
from dit import Attention, Block, DiTConfig, Geometry, rope_tables
from lcha import make_attention, make_ffn
from sandwich import PAPER_CFG, STRIDE, SuperNet, switches
from ssa import PatchMerge, PixelShuffleUp, low_res_grid


@dataclass
class SearchConfig:
    steps: int = 300              # router + supernet training steps (Eq. 10)
    batch: int = 4                # clips per step
    lr: float = 3e-4              # supernet weights
    router_lr: float = 3e-2       # router logits (they must move faster than the weights)
    tau: float = 0.5              # Gumbel-Softmax temperature, annealed to tau_end
    tau_end: float = 0.3
    seed: int = 0


PRESETS = {"tiny": SearchConfig(steps=40, batch=2), "small": SearchConfig(steps=300, batch=4)}

# The latency table the search uses, stored per preset (ms; one torch thread, this repository's CPU, median
# of 15 calls of `latency_table` at the preset's DiT width and latent size). Stored, not timed during the
# run: a live timing moves with the machine's load, and with it the budget, k and the layout, so the
# same seed would give different models. Re-measure: `python search.py --measure tiny` (a DiT patch
# or a frame side other than the preset's is its own geometry: `--measure small/patch4`, `small/48px`).
LATENCY_MS = {
    "tiny": {"lcha_group_ms": 5.856, "ssa_group_ms": 2.678, "switch_ms": 0.139, "tokens_high": 48, "tokens_low": 12},
    "tiny/patch4": {"lcha_group_ms": 2.281, "ssa_group_ms": 1.033, "switch_ms": 0.040, "tokens_high": 12, "tokens_low": 3},
    "small": {"lcha_group_ms": 18.345, "ssa_group_ms": 5.813, "switch_ms": 0.557, "tokens_high": 192, "tokens_low": 48},
    "small/patch4": {"lcha_group_ms": 10.654, "ssa_group_ms": 1.812, "switch_ms": 0.103, "tokens_high": 48, "tokens_low": 12},
    # 48 px frames (the small preset's frame_size): the column-wise median of 7 runs of `--measure small/48px`
    "small/48px": {"lcha_group_ms": 6.310, "ssa_group_ms": 1.977, "switch_ms": 0.139, "tokens_high": 108, "tokens_low": 27},
}


def get_config(name: str, **overrides):
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "search", **overrides)


def latency_key(cfg) -> str:
    """The LATENCY_MS entry of a pipeline's geometry: its preset, + "/patchP" for a DiT patch other than 2,
    + "/Spx" for a frame side other than the preset's (runs.PipelineConfig.frame_size)."""
    side = cfg.frame_size and cfg.frame_size != data.get_config(cfg.preset).size
    return cfg.preset + (f"/patch{cfg.dit_patch}" if cfg.dit_patch != 2 else "") + (f"/{cfg.frame_size}px" if side else "")


def parse_latency_key(key: str):
    """"small/patch4/48px" -> runs.PipelineConfig of that geometry (the inverse of latency_key); a malformed
    key is a ValueError naming the form."""
    preset, *parts = key.split("/")
    fields = {}
    for part in parts:
        if part.startswith("patch") and part[5:].isdigit() and "dit_patch" not in fields:
            fields["dit_patch"] = int(part[5:])
        elif part.endswith("px") and part[:-2].isdigit() and "frame_size" not in fields:
            fields["frame_size"] = int(part[:-2])
        else:
            preset = None
    if preset not in PRESETS:
        raise ValueError(f"expected PRESET[/patchP][/Spx] (e.g. small, small/patch4, small/48px), PRESET one of "
                         f"{sorted(PRESETS)}; got {key!r}")
    cfg = runs.PipelineConfig(preset=preset, **fields)
    runs.check_run_config(cfg)
    return cfg


def latency_of(cfg) -> dict:
    """The stored latency table of a pipeline's geometry (a copy); a geometry without one is a ValueError
    that says how to measure it."""
    key = latency_key(cfg)
    if key not in LATENCY_MS:
        raise ValueError(f"no stored latency table for the geometry {key!r} (search.LATENCY_MS); measure one "
                         f"with `python search.py --measure {key}` and store it there")
    return dict(LATENCY_MS[key])


# ----------------------------------------------------------------------------------------------
# 1. Latency table
# ----------------------------------------------------------------------------------------------
def _time(fn, repeats=5):
    with torch.no_grad():
        fn()
        ts = []
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def latency_table(cfg: DiTConfig, latent_hw, repeats=5):
    """ms of one LCHA group (high-res), one SSA group (low-res), one switch (down + up), one chunk."""
    torch.manual_seed(0)
    D, H = cfg.dim, cfg.heads
    grid = (cfg.chunk, latent_hw // cfg.patch[1], latent_hw // cfg.patch[2])
    lo = low_res_grid(grid, STRIDE)
    N, n_lo = math.prod(grid), math.prod(lo)
    x, c = torch.randn(1, N, D), torch.randn(1, cfg.chunk, D)
    txt, mask = torch.randn(1, 8, D), torch.ones(1, 8, dtype=torch.bool)
    d = D // H
    rope_hi, rope_lo = rope_tables(grid, d), rope_tables(lo, d, stride=STRIDE)
    lcha = [Block(D, H, make_attention("lcha", D, H), make_ffn("lcha", D, cfg.mlp_ratio)) for _ in range(2)]
    ssa = [Block(D, H, Attention(D, H), mlp_ratio=cfg.mlp_ratio) for _ in range(2)]
    down, up = PatchMerge(D, STRIDE), PixelShuffleUp(D, STRIDE)
    x_lo = torch.randn(1, n_lo, D)

    def group(blocks, h, g, rope):
        for b in blocks:
            h = b(h, c, txt, mask, Geometry(g, rope))
        return h

    return {"lcha_group_ms": _time(lambda: group(lcha, x, grid, rope_hi), repeats),
            "ssa_group_ms": _time(lambda: group(ssa, x_lo, lo, rope_lo), repeats),
            "switch_ms": _time(lambda: up(down(x, grid), grid), repeats),
            "tokens_high": N, "tokens_low": n_lo}


# ASSUMPTION (documented model of an iPhone 15 Pro class device, not a measurement): the Neural Engine
# sustains ~8 TFLOP/s on fp16-activation transformer layers (about a quarter of its 35 TOPS int8 peak)
# and the SoC ~50 GB/s of DRAM bandwidth; a layer takes max(FLOPs / compute, bytes / bandwidth)
# (a roofline). Bytes = weights at the mixed W4/W8 precision (~0.6 byte/param) + 8-bit activations in/out.
IPHONE = {"flops_per_s": 8e12, "bytes_per_s": 50e9, "bytes_per_param": 0.6, "bytes_per_act": 1}


def iphone_estimate(cfg: DiTConfig = PAPER_CFG, tokens_high=3 * 18 * 32):
    """Roofline estimate (ms) of one LCHA group, one SSA group and one switch at the paper's shapes."""
    D, H = cfg.dim, cfg.heads
    s = STRIDE
    out = {}
    with torch.device("meta"):
        grid = (3, 18, 32)
        lo = low_res_grid(grid, s)
        c, txt, mask = torch.empty(1, 3, D), torch.empty(1, 77, D), torch.ones(1, 77, dtype=torch.bool)
        from torch.utils.flop_counter import FlopCounterMode
        for name, blocks, g, stride in (
                ("lcha_group", [Block(D, H, make_attention("lcha", D, H), make_ffn("lcha", D, cfg.mlp_ratio), cfg.mlp_ratio)
                                for _ in range(2)], grid, 1),
                ("ssa_group", [Block(D, H, Attention(D, H), mlp_ratio=cfg.mlp_ratio) for _ in range(2)], lo, s)):
            n = math.prod(g)
            x = torch.empty(1, n, D)
            rope = rope_tables(g, D // H, stride=stride, device="meta")
            with FlopCounterMode(display=False) as fc:
                for b in blocks:
                    x = b(x, c, txt, mask, Geometry(g, rope))
            params = sum(p.numel() for b in blocks for p in b.parameters())
            byts = params * IPHONE["bytes_per_param"] + 2 * 2 * n * D * IPHONE["bytes_per_act"]
            out[name + "_ms"] = 1e3 * max(fc.get_total_flops() / IPHONE["flops_per_s"], byts / IPHONE["bytes_per_s"])
        sw_params = 2 * s * s * D * D
        out["switch_ms"] = 1e3 * (sw_params * IPHONE["bytes_per_param"] + 4 * math.prod(grid) * D) / IPHONE["bytes_per_s"]
    return out


def layout_latency(layout, table):
    """Latency model: sum of group costs plus one switch cost per change of resolution.
    # ASSUMPTION: additive per-group costs (groups run one after another on one device)."""
    n_sw = sum(d + u for d, u in switches(layout))
    return sum(table["lcha_group_ms"] if m else table["ssa_group_ms"] for m in layout) + n_sw * table["switch_ms"] / 2


def layout_memory(layout, cfg: DiTConfig, tokens_high, bytes_per=4):
    """Peak activation memory (MB) of one chunk: the largest working set of any group. LCHA keeps
    (N, D) activations + per-head d x d states; SSA keeps its (N/s^2)^2 score matrix per head."""
    D, H, d = cfg.dim, cfg.heads, cfg.dim // cfg.heads
    n_lo = tokens_high // STRIDE ** 2
    lcha = (6 * tokens_high * D + (1 + cfg.window) * H * d * d) * bytes_per
    ssa = (6 * n_lo * D + H * n_lo * n_lo * (1 + cfg.window)) * bytes_per + tokens_high * D * bytes_per  # + skip S
    return max(lcha if m else ssa for m in layout) / 2 ** 20


# ----------------------------------------------------------------------------------------------
# 2-3. Search space and the budget-aware dynamic program
# ----------------------------------------------------------------------------------------------
def search_space(n, k):
    return {"blocks_2^(2n)": 2 ** (2 * n), "groups_2^n": 2 ** n, "ends_fixed_2^(n-2)": 2 ** (n - 2),
            f"budget_C(n-2,k={k})": math.comb(n - 2, k)}


def all_layouts(n, k=None):
    for mid in itertools.product((0, 1), repeat=n - 2):
        if k is None or sum(mid) == k:
            yield (1,) + mid + (1,)


def dp_cheapest(n, cost_L, cost_S, switch, agg="sum"):
    """best[k] = (cost, layout): the cheapest layout with exactly k LCHA groups among the n-2 middle ones.

    DP over groups: state (k so far, type of the last group). A step adds the group's cost and, when the
    type changes, half a switch (down_n at the change to S, up_n at the change back: one switch per pair).
    `agg="max"` turns the sum into a maximum (peak memory instead of latency)."""
    comb = (lambda a, b: a + b) if agg == "sum" else max
    INF = (float("inf"), None)
    best = {(1, 1): (cost_L, (1,))}                                  # after group 1 (always LCHA)
    for pos in range(1, n):
        nxt = {}
        choices = (1,) if pos == n - 1 else (0, 1)
        for (k, last), (c, lay) in best.items():
            for m in choices:
                step = (cost_L if m else cost_S) + (switch / 2 if m != last else 0.0) if agg == "sum" else \
                    (cost_L if m else cost_S)
                key = (k + m, m)
                cand = (comb(c, step), lay + (m,))
                if cand[0] < nxt.get(key, INF)[0]:
                    nxt[key] = cand
        best = nxt
    return {k - 2: v for (k, last), v in sorted(best.items())}       # k counts middle LCHA groups only


def choose_k(n, table, budget_ms):
    """The largest k whose cheapest layout meets the budget (more high-resolution groups = more detail).
    # ASSUMPTION: the paper's DP "chooses k"; we take the largest feasible k, the richest model that fits."""
    best = dp_cheapest(n, table["lcha_group_ms"], table["ssa_group_ms"], table["switch_ms"])
    feasible = [k for k, (c, _) in best.items() if c <= budget_ms + 1e-9]  # float sums differ in order
    if not feasible:
        c, lay = min(best.values())
        raise ValueError(f"no layout meets the budget of {budget_ms:.2f} ms: the cheapest layout "
                         f"{''.join('L' if m else 'S' for m in lay)} costs {c:.2f} ms")
    k = max(feasible)
    return k, best[k]


# ----------------------------------------------------------------------------------------------
# 4. Differentiable routing: Alg. 1's routers on the supernet (sandwich.SuperNet)
# ----------------------------------------------------------------------------------------------
def gumbel_top_k(logits, k, tau, generator=None):
    """m for the middle groups: forward = exactly k ones (top-k of logits + Gumbel noise), backward =
    gradient of the soft relaxation sigmoid((score - theta) / tau) (straight-through estimator);
    theta sits halfway between the k-th and (k+1)-th score, so soft > 0.5 exactly on the hard top-k.
    # ASSUMPTION: this top-k relaxation; the paper names Gumbel-Softmax + STE, not the k-constraint's form."""
    n = logits.numel()
    u = torch.rand(n, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device)
    score = logits - torch.log(-torch.log(u))                        # Gumbel(0, 1) perturbation
    order = score.detach().argsort(descending=True)
    hard = torch.zeros(n, device=logits.device)
    hard[order[:k]] = 1.0
    if k == 0 or k == n:
        return hard
    theta = (score.detach()[order[k - 1]] + score.detach()[order[k]]) / 2
    soft = torch.sigmoid((score - theta) / tau)
    return hard + (soft - soft.detach())                              # straight-through: exactly hard forward


def sample_routers(supernet, k, tau, generator=None):
    """m = (1, Gumbel-top-k of the router logits, 1): Alg. 1's routers for one supernet update."""
    mid = gumbel_top_k(supernet.router, k, tau, generator)
    return torch.cat([mid.new_ones(1), mid, mid.new_ones(1)])


def eq10_loss(student, teacher, x0, text, mask, generator=None):
    """Eq. 10: || S(x_t, t, e) - T(x_t, t, e) ||^2 on flow-matching inputs (per-chunk t)."""
    B, C, T = x0.shape[:3]
    t = flow.sample_t(B, T, chunk=teacher.cfg.chunk, generator=generator).to(x0)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = flow.add_noise(x0, eps, t)
    with torch.no_grad():
        target = teacher(x_t, t, text, mask)
    return F.mse_loss(student(x_t, t, text, mask), target)


def run_search(supernet: SuperNet, teacher: nn.Module, batch_fn, k, cfg: SearchConfig, progress=True,
               train_weights=True):
    """Train routers (and supernet weights) with Eq. 10; returns (layout, history)."""
    g = torch.Generator().manual_seed(cfg.seed)
    params = [{"params": [supernet.router], "lr": cfg.router_lr}]
    if train_weights:
        params.append({"params": [p for n, p in supernet.named_parameters() if n != "router"], "lr": cfg.lr})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    teacher.eval()
    hist = []
    bar = tqdm(range(cfg.steps), desc=f"search k={k}", disable=not progress)
    for step in bar:
        tau = cfg.tau * (cfg.tau_end / cfg.tau) ** (step / max(1, cfg.steps - 1))   # annealed temperature
        supernet.m = sample_routers(supernet, k, tau, g)
        x0, text, mask = batch_fn(step)
        loss = eq10_loss(supernet, teacher, x0, text, mask, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", layout="".join("L" if v else "S" for v in supernet.layout(k)))
    supernet.m = None
    return supernet.layout(k), hist


def layout_loss(supernet, teacher, layout, batches, seed=0):
    """Eq. 10 loss of a fixed (hard) layout on held-out batches, with the supernet's shared weights."""
    g = torch.Generator().manual_seed(seed)
    supernet.m = torch.tensor(layout, dtype=torch.float32, device=supernet.router.device)
    with torch.no_grad():
        loss = sum(eq10_loss(supernet, teacher, *b, generator=g).item() for b in batches) / len(batches)
    supernet.m = None
    return loss


def alternatives(M, k, table, budget_ms, seed=0):
    """The toy Tab. 3 rows at one budget: hourglass (one contiguous SSA run), all-LCHA, all-SSA, random."""
    n_mid = M - 2
    a = k // 2
    rows = {"hourglass": (1,) * (1 + a) + (0,) * (n_mid - k) + (1,) * (1 + k - a),
            "all-LCHA": (1,) * M, "all-SSA": (1,) + (0,) * n_mid + (1,)}
    rng = random.Random(seed)
    mids = [lay for lay in all_layouts(M, k)]
    rows["random"] = mids[rng.randrange(len(mids))]
    return {name: {"layout": lay, "latency_ms": layout_latency(lay, table),
                   "fits": layout_latency(lay, table) <= budget_ms} for name, lay in rows.items()}


# ----------------------------------------------------------------------------------------------
# The toy Tab. 3 of a run: the searched layout against the alternatives at one budget
# ----------------------------------------------------------------------------------------------
HELD_OUT_SEED = 999_983            # the held-out batches every layout is scored on


def search_rows(run, sup, base, layout, k, table, budget):
    """Eq. 10 loss (shared supernet weights, held-out batches) of the chosen layout and the alternatives."""
    M = sup.M
    held = [b for b in map(runs.dit_batches(run, 4, HELD_OUT_SEED, with_null=False), range(4))]
    rows = {"searched": {"layout": layout, "latency_ms": layout_latency(layout, table),
                         "fits": layout_latency(layout, table) <= budget + 1e-9}}
    rows.update(alternatives(M, k, table, budget, seed=run.cfg.seed))
    hw = runs.latent_hw(run.cfg)
    for name, row in rows.items():
        row["eq10_loss"] = layout_loss(sup, base, row["layout"], held)
        row["peak_act_mb"] = layout_memory(row["layout"], sup.cfg, sup.cfg.chunk * (hw // sup.cfg.patch[1]) ** 2)
    return rows


def search_report(run_dir, budget_ms=None, device="cpu"):
    """For `python py --run DIR --budget-ms N`: the chosen layout at that budget and its rivals."""
    run = runs.open_run(run_dir, device)
    m = run.metrics("search")
    sup, base = run.model("search"), run.model("base")
    table = m["latency_table_ms"]
    budget = m["budget_ms"] if budget_ms is None else budget_ms
    k, _ = choose_k(sup.M, table, budget)
    layout = sup.layout(k)                      # the routers' ranking, cut at the k this budget allows
    return {"budget_ms": budget, "k": k, "layout": layout, "latency_table_ms": table,
            "search_space": search_space(sup.M, k), "rows": search_rows(run, sup, base, layout, k, table, budget)}


def main(argv=None):
    p = safeio.Parser(prog="search.py", description="Budget-aware sandwich search (Alg. 1, Eq. 10)")
    p.add_argument("--run", default=None, help="a run directory with base.pt and search.pt (train.py --stages base,search)")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget per chunk step on this CPU (ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--measure", default=None, help="time the latency table of a preset on this CPU (for LATENCY_MS)")
    dist.add_device_arg(p)
    args = p.parse_args(argv)
    device = dist.pick_device(args.device)                          # --run and the demo; --measure times the CPU
    if args.measure:
        try:
            cfg = parse_latency_key(args.measure)
        except ValueError as e:
            p.error(f"--measure: {e}")
        torch.set_num_threads(1)
        print(json.dumps(latency_table(runs.dit_cfg(cfg), runs.latent_hw(cfg), repeats=15)))
        return
    if args.run is None:
        return demo(device)
    if args.budget_ms is not None and not args.budget_ms > 0:
        p.error(f"--budget-ms must be > 0, got {args.budget_ms}")
    try:
        res = search_report(args.run, args.budget_ms, device)
    except ValueError as e:                      # the budget no layout meets, a broken run file: one line
        p.error(str(e))
    if not args.json:
        for name, row in res["rows"].items():
            print(f"{name:10s} {''.join('L' if m else 'S' for m in row['layout'])}  {row['latency_ms']:7.2f} ms  "
                  f"Eq.10 {row.get('eq10_loss', float('nan')):.5f}  {'fits' if row['fits'] else 'over budget'}")
    print(json.dumps(res))


def demo(device="cpu"):
    """Planted problem: the teacher IS a sandwich of a known layout; the search must find it."""
    torch.manual_seed(0)
    cfg = dit.get_config("tiny", depth=10)                          # M = 5 groups, 3 middle
    planted = (1, 0, 1, 0, 1)
    sup = SuperNet(cfg)
    for p_ in sup.parameters():
        if p_.dim() > 1:
            nn.init.normal_(p_, std=0.1)
    sup.to(device)
    teacher = sup.extract(planted).eval().to(device)
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    batch = lambda step: (torch.randn(2, cfg.in_channels, 3, 4, 4, generator=g).to(device),
                          torch.randn(2, 4, cfg.text_dim, generator=g).to(device),
                          torch.ones(2, 4, dtype=torch.bool, device=device))
    k = sum(planted[1:-1])
    found, hist = run_search(sup, teacher, batch, k, SearchConfig(steps=40, router_lr=0.1), progress=False,
                             train_weights=False)
    print("search space for n=14, k=4:", search_space(14, 4))
    print(f"planted {planted} -> found {found}; Eq. 10 loss {hist[0]:.4f} -> {hist[-1]:.4f}")
    assert found == planted


if __name__ == "__main__":
    safeio.run_cli("search.py", main)
