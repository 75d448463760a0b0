"""S2DiT: the sandwich diffusion transformer (paper Fig. 2, Alg. 1).

The blocks of a DiT are taken in M groups of 2. Each group n runs either
  m_n = 1: two LCHA blocks on the HIGH-resolution token grid (linear cost, local detail), or
  m_n = 0: two softmax blocks on the LOW-resolution (strided) grid, i.e. Stride Self-Attention.
The first and the last group are always LCHA (m_1 = m_M = 1): the model reads and writes the VAE
latent at full resolution. "Sandwich" is what the search (search.py) found best: global SSA in the
middle, LCHA on both ends, e.g. `L S S L` or `L L S S S S L L`.

Alg. 1 (ASSUMPTION: the paper's main text is not available to us; this is our reconstruction from its
symbols, each line quoted at its code):
  1: x_L <- x;  S <- x                                  high-res stream and the long skip
  2: for n = 1..M:
  3:   d_n = m_{n-1} (1 - m_n)                          switch down: leave high resolution
  4:   u_n = (1 - m_{n-1}) m_n                          switch up: return to high resolution
  5:   if d_n:  S <- x_L;  x_S <- down_n(x_L);  S_down <- x_S
  6:   if u_n:  x_L <- S + up_n(x_S - S_down)          long skip: high-res detail + the low-res update
  7:   if m_n:  x_L <- y_L = LCHA_n(x_L)   else:  x_S <- y_S = SSA_n(x_S)
  8: return x_L                                         final merge: m_M = 1, the output is high-res
(m_0 := 1). Line 6 up-samples only what the SSA groups *added* and adds it to the skipped high-res
tokens, so nothing of the full-resolution detail is lost in the stride; with stride 1 a run of SSA
groups is exactly the same blocks run at full resolution. search.py evaluates the same lines with
soft/straight-through m_n (both branches computed); with hard m_n it equals this file (tested).

Weight inheritance from the all-self-attention DiT T_theta of the same width (Sec. A: "wherever
compatible"): `inherit_from` copies every tensor whose name and shape match; group n block i is
T_theta's block 2n+i. Inherited: patch/text/time embeddings, output head, and in every block the
AdaLN, norms, cross-attention, FFN and attention q/k/v/out (LCHA keeps those names). Fresh: LCHA's
phi, local conv, channel mix and fusion gate; every down_n / up_n.

Run `python sandwich.py` to draw the layouts with the token count of each group and count the
`paper` preset's parameters and FLOPs on the meta device; `python sandwich.py --bench --json`
times all-attention DiT vs S2DiT vs a SANA-style linear DiT at three token counts.
"""
import json
import math
import os
import time

import torch
import torch.nn as nn

import dist
import dit
import safeio
from dit import Attention, Backbone, Block, DiTConfig, Geometry, rope_tables
from lcha import make_attention, make_ffn
from ssa import PatchMerge, PixelShuffleUp, low_res_grid

# Default layouts per preset, used until search.py writes `layout.json` for a run.
DEFAULT_LAYOUT = {"tiny": (1, 0, 0, 1), "small": (1, 0, 0, 1), "paper": (1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1)}
STRIDE = 2  # SSA stride (docs/design.md, defaults)

# The `paper` preset (meta device only): Wan2.1-1.3B widths (D 1536, 12 heads, FFN 8960), 28 blocks
# (14 groups), a 768-wide text encoder (CLIP-ViT-L), the Wan2.1 VAE latent (16 ch, 8x8 spatial).
# ASSUMPTION: the paper states ~1.8B parameters, not the widths; these reproduce that size.
PAPER_CFG = DiTConfig(in_channels=16, dim=1536, depth=28, heads=12, text_dim=768, mlp_ratio=8960 / 1536,
                      freq_dim=256)
PAPER_LATENT = (16, 3, 36, 64)  # (C, T, h, w): one chunk of 3 latent frames at 512x288, Wan VAE 8x


def check_layout(layout, groups):
    layout = tuple(int(m) for m in layout)
    if len(layout) != groups:
        raise ValueError(f"layout {layout} has {len(layout)} groups, the model has {groups} (depth / 2)")
    if any(m not in (0, 1) for m in layout):
        raise ValueError(f"layout {layout} must be binary (1 = LCHA, 0 = SSA)")
    if layout[0] != 1 or layout[-1] != 1:
        raise ValueError(f"layout {layout}: the first and last groups must be LCHA (m_1 = m_M = 1)")
    return layout


def switches(layout):
    """Alg. 1, lines 3-4: (d_n, u_n) for every group, with m_0 = 1."""
    prev = (1,) + tuple(layout[:-1])
    return [(p * (1 - m), (1 - p) * m) for p, m in zip(prev, layout)]


def draw(layout, grid, stride=STRIDE):
    """`L L S S L` plus the token count per group for a token grid (T, h, w)."""
    T, h, w = grid
    hi, lo = T * h * w, T * (h // stride) * (w // stride)
    letters = " ".join("L" if m else "S" for m in layout)
    counts = " ".join(str(hi if m else lo) for m in layout)
    return f"{letters}\n  tokens per group: {counts}"


class S2DiT(Backbone):
    """The sandwich: Backbone ends from dit.py, groups of 2 blocks in the middle, as laid out by `layout`."""

    def __init__(self, cfg: DiTConfig, layout, stride=STRIDE, attn="lcha"):
        super().__init__(cfg)
        if cfg.depth % 2:
            raise ValueError(f"S2DiT needs an even depth (groups of 2 blocks), got {cfg.depth}")
        self.layout = check_layout(layout, cfg.depth // 2)
        self.stride, self.attn_kind = stride, attn
        D, H = cfg.dim, cfg.heads

        def lcha_block():
            return Block(D, H, make_attention(attn, D, H), make_ffn(attn, D, cfg.mlp_ratio), cfg.mlp_ratio)

        def ssa_block():                                            # softmax blocks, run on the strided grid
            return Block(D, H, Attention(D, H), mlp_ratio=cfg.mlp_ratio)

        # Given a layout, only the chosen branch of each group exists (and runs).
        self.groups = nn.ModuleList([nn.ModuleList([lcha_block() if m else ssa_block() for _ in range(2)])
                                     for m in self.layout])
        sw = switches(self.layout)
        self.down = nn.ModuleDict({str(n): PatchMerge(D, stride) for n, (d, u) in enumerate(sw) if d})
        self.up = nn.ModuleDict({str(n): PixelShuffleUp(D, stride) for n, (d, u) in enumerate(sw) if u})

    def run_blocks(self, tokens, c, grid, txt, text_mask, causal, t0, window, state):
        # Alg. 1 is written out three times, each as the paper's lines: here with hard m_n (only the
        # chosen branch exists and runs), in SuperNet.run_blocks with soft m_n (both branches run and
        # are blended, so gradients reach the routers) and in chunk_step.ChunkStep.forward (static
        # shapes and explicit fixed-size caches, which torch.jit.trace needs). One shared loop would
        # hide either the branch skipping or the blending behind flags; instead
        # tests/test_search.py::test_alg1_three_forms_agree holds the three equal.
        cfg, d = self.cfg, self.cfg.dim // self.cfg.heads
        lo = low_res_grid(grid, self.stride)
        rope_hi = rope_tables(grid, d, t0=t0, theta=cfg.rope_theta, device=tokens.device)  # (N, d/2) x 2
        rope_lo = rope_tables(lo, d, t0=t0, stride=self.stride, theta=cfg.rope_theta, device=tokens.device)
        hi = Geometry(grid, rope_hi, causal, cfg.chunk, window, cfg.sink, state)
        lo_geo = hi.at(lo, rope_lo)
        # Alg. 1, line 1: x_L <- x; S <- x
        x_L, S, x_S, S_down = tokens, tokens, None, None
        for n, (m_n, (d_n, u_n)) in enumerate(zip(self.layout, switches(self.layout))):
            if d_n:  # line 5: S <- x_L; x_S <- down_n(x_L); S_down <- x_S
                S = x_L
                x_S = S_down = self.down[str(n)](x_L, grid)         # (B, N/s^2, D)
            if u_n:  # line 6: x_L <- S + up_n(x_S - S_down)
                x_L = S + self.up[str(n)](x_S - S_down, grid)       # (B, N, D)
            for blk in self.groups[n]:
                if m_n:  # line 7: y_L = LCHA_n(x_L) on the high-resolution grid
                    x_L = blk(x_L, c, txt, text_mask, hi)           # (B, N, D)
                else:    # line 7: y_S = SSA_n(x_S) on the strided grid
                    x_S = blk(x_S, c, txt, text_mask, lo_geo)       # (B, N/s^2, D)
        return x_L  # line 8: m_M = 1, so the last group left the result at high resolution


def block_name_map(name):
    """S2DiT parameter name -> the all-attention DiT's: group n, block i <-> block 2n+i."""
    parts = name.split(".")
    if parts[0] == "groups":
        return ".".join(["blocks", str(2 * int(parts[1]) + int(parts[2]))] + parts[3:])
    return name


def inherit_from(student: nn.Module, teacher: nn.Module, name_map=block_name_map):
    """Copy every compatible tensor of an all-attention DiT into `student`; returns
    {"inherited": [...], "fresh": [...]} (parameter names of the student)."""
    src = teacher.state_dict()
    own = student.state_dict()
    inherited, fresh = [], []
    with torch.no_grad():
        for name, tensor in own.items():
            other = src.get(name_map(name))
            if other is not None and other.shape == tensor.shape:
                tensor.copy_(other)
                inherited.append(name)
            else:
                fresh.append(name)
    return {"inherited": inherited, "fresh": fresh}


class SuperNet(Backbone):
    """Both branches of every group, and down_n / up_n for every group; `forward(..., m=...)` runs
    Alg. 1 with (possibly soft) routers. m: (M,) tensor with m_1 = m_M = 1."""

    def __init__(self, cfg: DiTConfig, stride=STRIDE):
        super().__init__(cfg)
        D, H, M = cfg.dim, cfg.heads, cfg.depth // 2
        self.M, self.stride = M, stride
        self.lcha = nn.ModuleList([nn.ModuleList([Block(D, H, make_attention("lcha", D, H),
                                                        make_ffn("lcha", D, cfg.mlp_ratio), cfg.mlp_ratio)
                                                  for _ in range(2)]) for _ in range(M)])
        self.ssa = nn.ModuleList([nn.ModuleList([Block(D, H, Attention(D, H), mlp_ratio=cfg.mlp_ratio)
                                                 for _ in range(2)]) for _ in range(M)])
        self.down = nn.ModuleList([PatchMerge(D, stride) for _ in range(M)])
        self.up = nn.ModuleList([PixelShuffleUp(D, stride) for _ in range(M)])
        self.router = nn.Parameter(torch.zeros(M - 2))               # logits of m_2..m_{M-1}
        self.m = None                                                 # routers used by the next forward

    def run_blocks(self, tokens, c, grid, txt, text_mask, causal, t0, window, state):
        cfg, d = self.cfg, self.cfg.dim // self.cfg.heads
        lo = low_res_grid(grid, self.stride)
        rope_hi = rope_tables(grid, d, t0=t0, theta=cfg.rope_theta, device=tokens.device)
        rope_lo = rope_tables(lo, d, t0=t0, stride=self.stride, theta=cfg.rope_theta, device=tokens.device)
        hi = Geometry(grid, rope_hi, causal, cfg.chunk, window, cfg.sink, state)
        lo_geo = hi.at(lo, rope_lo)
        m = self.m
        # Alg. 1 with soft m_n (S2DiT.run_blocks says why it is written out again)
        # line 1 (x_S, S_down start as zeros; with hard routers they are only read after line 5)
        x_L, S = tokens, tokens
        x_S = S_down = tokens.new_zeros(tokens.shape[0], math.prod(lo), tokens.shape[2])
        for n in range(self.M):
            m_prev = m[n - 1] if n > 0 else 1.0
            d_n, u_n = m_prev * (1 - m[n]), (1 - m_prev) * m[n]      # lines 3-4, soft or hard
            # line 5, blended: S <- x_L; x_S <- down_n(x_L); S_down <- x_S   (when d_n = 1)
            S = d_n * x_L + (1 - d_n) * S
            x_S = d_n * self.down[n](x_L, grid) + (1 - d_n) * x_S
            S_down = d_n * x_S + (1 - d_n) * S_down
            # line 6, blended: x_L <- S + up_n(x_S - S_down)   (when u_n = 1)
            x_L = u_n * (S + self.up[n](x_S - S_down, grid)) + (1 - u_n) * x_L
            # line 7, both branches: y_L = LCHA_n(x_L), y_S = SSA_n(x_S)
            y_L, y_S = x_L, x_S
            for b_L, b_S in zip(self.lcha[n], self.ssa[n]):
                y_L = b_L(y_L, c, txt, text_mask, hi)               # (B, N, D)
                if 0 < n < self.M - 1:                              # m_1 = m_M = 1: no SSA branch at the ends
                    y_S = b_S(y_S, c, txt, text_mask, lo_geo)       # (B, N/s^2, D)
            x_L = m[n] * y_L + (1 - m[n]) * x_L                     # the unchosen stream passes unchanged
            x_S = (1 - m[n]) * y_S + m[n] * x_S
        return x_L                                                  # line 8

    def layout(self, k):
        """The hard layout the routers rank: m_1 = m_M = 1 and the k middle groups of largest logit
        (search.gumbel_top_k without the noise)."""
        mid = torch.zeros(self.M - 2)
        mid[self.router.detach().argsort(descending=True)[:k].cpu()] = 1.0
        return (1,) + tuple(int(v) for v in mid.tolist()) + (1,)

    def inherit(self, base: nn.Module):
        """Both branches of group n inherit T_theta's blocks 2n, 2n+1 wherever compatible."""
        def name_map(name):
            p = name.split(".")
            if p[0] in ("lcha", "ssa"):
                return ".".join(["blocks", str(2 * int(p[1]) + int(p[2]))] + p[3:])
            return name
        return inherit_from(self, base, name_map)

    def extract(self, layout) -> S2DiT:
        """The S2DiT of `layout` with this supernet's weights (chosen branches, their switches)."""
        layout = check_layout(layout, self.M)
        model = S2DiT(self.cfg, layout, self.stride)

        def name_map(name):
            p = name.split(".")
            if p[0] == "groups":
                return ".".join(["lcha" if layout[int(p[1])] else "ssa"] + p[1:])
            return name
        rep = inherit_from(model, self, name_map)
        assert not rep["fresh"], f"extract left tensors fresh: {rep['fresh']}"
        return model


def short_name(name):
    """groups.1.0.attn.phi.weight -> attn.phi; down.1.proj.bias -> down"""
    parts = name.split(".")
    if parts[0] != "groups":
        return parts[0]
    parts = parts[3:]
    return ".".join(parts[:-1] if parts[-1] in ("weight", "bias") else parts)


def sana_dit(cfg: DiTConfig):
    """A SANA-Video-style linear DiT of equal width and depth (Tab. A5 baseline): every block ReLU
    linear attention with RoPE in the numerator, and a conv inside the FFN."""
    model = dit.DiT(cfg)
    model.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads, make_attention("sana", cfg.dim, cfg.heads),
                                        make_ffn("sana", cfg.dim, cfg.mlp_ratio)) for _ in range(cfg.depth)])
    return model


def count_flops(model, x, t, text, mask, **kw):
    """FLOPs of one forward, counted by torch's FlopCounterMode (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model(x, t, text, mask, **kw)
    return fc.get_total_flops()


def paper_report():
    """Build the `paper` preset on the meta device: parameters and FLOPs of one chunk step."""
    with torch.device("meta"):
        model = S2DiT(PAPER_CFG, DEFAULT_LAYOUT["paper"])
        C, T, h, w = PAPER_LATENT
        x, t = torch.empty(1, C, T, h, w), torch.empty(1, T)
        text, mask = torch.empty(1, 77, PAPER_CFG.text_dim), torch.ones(1, 77, dtype=torch.bool)
        flops = count_flops(model, x, t, text, mask, causal=False)
    return {"params": dit.count_params(model), "flops_per_chunk_step": flops, "tokens_per_chunk": T * h * w // 4,
            "widths": {"dim": PAPER_CFG.dim, "heads": PAPER_CFG.heads, "depth": PAPER_CFG.depth,
                       "ffn": round(PAPER_CFG.dim * PAPER_CFG.mlp_ratio), "text_dim": PAPER_CFG.text_dim}}


def bench(preset="small", sizes=(64, 128, 256), repeats=5, device="cpu"):
    """One forward of one chunk (3 latent frames) for three models at three frame sizes (pixels).
    Each timed call ends in .cpu(), which waits for a GPU to finish (and costs nothing on the CPU)."""
    torch.manual_seed(0)
    cfg = dit.get_config(preset)
    models = {"attention": dit.DiT(cfg), "s2dit": S2DiT(cfg, DEFAULT_LAYOUT[preset]), "sana": sana_dit(cfg)}
    models = {k: m.to(device) for k, m in models.items()}
    n = 1024                                                         # the device's matmul peak, same run
    a, b = torch.randn(n, n).to(device), torch.randn(n, n).to(device)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        (a @ b).cpu()
    peak = 5 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9
    rows = {k: [] for k in models}
    tokens = []
    for px in sizes:
        h = px // 4                                                 # latent side (VAE 4x)
        x, t = torch.randn(1, cfg.in_channels, cfg.chunk, h, h).to(device), torch.rand(1, cfg.chunk).to(device)
        text, mask = torch.randn(1, 8, cfg.text_dim).to(device), torch.ones(1, 8, dtype=torch.bool).to(device)
        tokens.append(cfg.chunk * (h // 2) ** 2)
        for name, model in models.items():
            with torch.no_grad():
                model(x, t, text, mask)                             # warm-up
                times = []
                for _ in range(repeats):
                    s = time.perf_counter()
                    model(x, t, text, mask).cpu()
                    times.append(time.perf_counter() - s)
            rows[name].append(sorted(times)[len(times) // 2] * 1e3)   # median
    with torch.no_grad():
        flops = count_flops(models["s2dit"], x, t, text, mask)
    lx = [math.log(n) for n in tokens]
    mx = sum(lx) / len(lx)

    def fit(v):                                                     # least-squares slope of log ms vs log N
        ly = [math.log(ms) for ms in v]
        my = sum(ly) / len(ly)
        return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    slope = {k: fit(v) for k, v in rows.items()}
    return {"preset": preset, "frame_px": list(sizes), "tokens": tokens, "latency_ms": rows,
            "loglog_slope": slope,
            "ratio_attention_over_s2dit": [a / s for a, s in zip(rows["attention"], rows["s2dit"])],
            "s2dit_gflops_per_s": flops / rows["s2dit"][-1] / 1e6, "matmul_peak_gflops_per_s": peak,
            "threads": torch.get_num_threads(), "device": str(device)}


def main(argv=None):
    p = safeio.Parser(prog="sandwich.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="tiny | small (paper is counted on the meta device)")
    p.add_argument("--layout", default=None, help="e.g. 1,0,0,1 (default: the preset's default layout)")
    p.add_argument("--run", default=None, help="draw the layout search.py found for a train.py run (its layout.json)")
    p.add_argument("--bench", action="store_true", help="time attention DiT vs S2DiT vs SANA-style DiT")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    dist.add_device_arg(p)
    args = p.parse_args(argv)
    if args.bench:
        res = bench(args.preset, device=dist.pick_device(args.device))
        if not args.json:
            for k, v in res["latency_ms"].items():
                print(f"{k:10s} " + "  ".join(f"{ms:8.1f} ms" for ms in v) + f"   slope {res['loglog_slope'][k]:.2f}")
        print(json.dumps(res))
        return
    cfg = dit.get_config(args.preset)
    layout = tuple(int(c) for c in args.layout.split(",")) if args.layout else DEFAULT_LAYOUT[args.preset]
    if args.run:
        path = os.path.join(args.run, "layout.json")
        if not os.path.exists(path):
            p.error(f"{path} not found: run the `search` stage (python train.py --out {args.run})")
        layout = tuple(safeio.read_json(path, "layout file").get("layout", ()))
    model = S2DiT(cfg, layout)
    grid = (cfg.chunk, (64 if args.preset == "small" else 32) // 8, (64 if args.preset == "small" else 32) // 8)
    print(f"S2DiT-{args.preset}: {dit.count_params(model):,} params, layout")
    print("  " + draw(layout, grid))
    base = dit.DiT(cfg)
    rep = inherit_from(model, base)
    print(f"  inherits {len(rep['inherited'])} tensors from the all-attention DiT; fresh: "
          f"{sorted(set(short_name(n) for n in rep['fresh']))}")
    paper = paper_report()
    print(f"S2DiT-paper (meta device): {paper['params'] / 1e9:.2f}B params, "
          f"{paper['flops_per_chunk_step'] / 1e12:.2f} TFLOPs per chunk step ({paper['tokens_per_chunk']} tokens), "
          f"widths {paper['widths']}")
    print("  " + draw(DEFAULT_LAYOUT["paper"], (3, 18, 32)))
    res = {"preset": args.preset, "layout": layout, "params": dit.count_params(model), "paper": paper}
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    safeio.run_cli("sandwich.py", main)
