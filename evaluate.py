"""VBench-lite: text-video alignment and video quality measured on the pixels of generated clips
(the paper's Tab. 1, A1 and A6 report VBench; we cannot run VBench's pretrained networks here).

Every generated video comes with its prompt; data.parse_prompt gives the primary object's
(colour, shape, motion). We segment that object on pixels and score:

  semantic (VBench "semantic" dimensions: object class, colour, ...)
    color_acc      nearest palette colour of the object's core pixels == prompt colour
    shape_acc      best soft IoU of the object mask against the 4 shape templates rendered at the
                   mask's box (data.shape_coverage), majority vote over frames == prompt shape
    direction_acc  angle of the centroid velocity (robust Theil-Sen slope) nearest to the
                   prompt's motion among the 6 motions
  quality (VBench "quality" dimensions)
    subject_consistency     cosine similarity of the object's appearance crop between frames,
                            0.5 (sim(first, t) + sim(t-1, t)) as VBench does with DINO features
    background_consistency  exp(-mean |x_t - x_{t-1}| / 0.05) on background pixels (flicker)
    dynamic_degree          fraction of videos whose object moves (VBench uses RAFT flow)
    fvd_score               exp(-fvd / FVD_SCALE), fvd = FVD-lite (below)
  total = (4 quality + 1 semantic) / 5   (VBench's weighting of its quality and semantic scores)

FVD-lite: the Frechet distance between Gaussian fits of features of generated clips and of
ground-truth clips of the same prompts (data.make_clips). The feature network cannot be a
pretrained I3D (no downloads): FeatureNet is a randomly initialised 3D conv net with a fixed
seed (random conv features still separate distributions; "random-feature FID"), plus simple
pixel statistics. Its values are only comparable between runs of this file.

Object segmentation: background b = per-pixel temporal median, except where that median is far
from the video's global median colour (an object that stays put), where b = global median;
foreground = pixels with ||x - b|| > 0.2 (RGB in [0, 1]); the primary object = the largest
8-connected blob per frame (the second object is rendered smaller, data.DataConfig.second_scale).
A frame is valid if the blob covers 0.5 % - 25 % of the frame; a video needs half its frames valid,
else every semantic prediction is "none" (wrong): noise videos score near zero, not at chance.

Run:  python evaluate.py                       demo: ground truth vs shuffled prompts vs noise
      python evaluate.py --real 64 --json      score 64 held-out ground-truth clips
      python evaluate.py --videos DIR --json   score DIR/prompts.jsonl ({"file", "prompt"} lines)
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as Fnn

import data
import dist
import safeio


# ASSUMPTION: every threshold below was set on shapes-world clips (data.py): objects are
# saturated colours > 0.6 from dark backgrounds whose texture stays below 0.1.
@dataclass
class EvalConfig:
    fg_threshold: float = 0.2      # ||x - background|| (RGB in [0,1]) above which a pixel is object
    min_area: float = 0.005        # valid blob: at least this fraction of the frame ...
    max_area: float = 0.25         # ... and at most this fraction
    direction_frames: int = 33     # direction from the first frames only (data: no bounce in 32)
    still_speed: float = 0.004     # below this speed (frame sides per frame) an object is "still"
    flicker_scale: float = 0.05    # background_consistency = exp(-mean |dx_t| / flicker_scale)
    fvd_scale: float = 1.0         # fvd_score = exp(-fvd / fvd_scale); tiny real vs real ~0.9
    feature_size: int = 32         # FeatureNet input side (clips are resized to it)
    crop: int = 16                 # subject-consistency crop side


PRESETS = {"tiny": EvalConfig(), "small": EvalConfig()}  # the metrics do not depend on the size


def get_config(name: str, **overrides):
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "eval", **overrides)


# ----------------------------------------------------------------------------- FVD-lite
# DEVIATION: FVD uses a Kinetics-pretrained I3D; we cannot download weights, so the features
# come from a fixed random network (random features still separate distributions, but the
# numbers are not comparable with published FVDs).
class FeatureNet(nn.Module):
    """Fixed random 3D CNN: 3 convs (3->16->32->64, kernel 3, strides (1,2,2), 2, 2) + ReLU,
    global mean and std pooling over (T, H, W) -> 128 features, plus 9 pixel statistics
    (per-channel mean, std, mean |temporal difference|) -> 137 features. Kaiming-normal weights
    drawn from torch.Generator seeded with `seed`, zero biases; never trained."""

    def __init__(self, seed=0, size=32):
        super().__init__()
        self.size = size
        self.convs = nn.ModuleList([nn.Conv3d(3, 16, 3, (1, 2, 2), 1), nn.Conv3d(16, 32, 3, 2, 1),
                                    nn.Conv3d(32, 64, 3, 2, 1)])
        g = torch.Generator().manual_seed(seed)
        for c in self.convs:
            fan_in = c.weight[0].numel()
            c.weight.data = torch.randn(c.weight.shape, generator=g) * math.sqrt(2 / fan_in)
            c.bias.data.zero_()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x):                                              # x: (B, 3, F, H, W)
        B, _, F, H, W = x.shape
        if (H, W) != (self.size, self.size):
            x2 = x.transpose(1, 2).reshape(B * F, 3, H, W)             # (B*F, 3, H, W)
            x2 = Fnn.interpolate(x2, size=(self.size, self.size), mode="bilinear",
                                 antialias=True, align_corners=False)
            x = x2.view(B, F, 3, self.size, self.size).transpose(1, 2)  # (B, 3, F, s, s)
        stats = [x.mean((2, 3, 4)), x.std((2, 3, 4)),                   # (B, 3) each
                 (x[:, :, 1:] - x[:, :, :-1]).abs().mean((2, 3, 4)) if F > 1 else x[:, :, 0, 0, 0] * 0]
        h = x
        for c in self.convs:
            h = torch.relu(c(h))                                       # (B, C, T', h', w')
        return torch.cat([h.mean((2, 3, 4)), h.std((2, 3, 4))] + stats, 1)  # (B, 137)


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of (N, D) rows.
    Tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD form."""
    a, b = torch.as_tensor(feats_a).double(), torch.as_tensor(feats_b).double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"expected (N, D) and (M, D) features with N, M >= 2, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    e, V = torch.linalg.eigh(S_a)
    sqrt_a = V @ torch.diag(e.clamp(min=0).sqrt()) @ V.T               # S_a^(1/2)
    m = sqrt_a @ S_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- segmentation
def _components(fg):
    """8-connected blobs by label propagation: every pixel starts with its own id and takes the
    max over its 3x3 neighbourhood until nothing changes. fg (N, H, W) bool -> labels (N, H, W)
    float32 (exact integers below 2^24), 0 = background, ids unique within a frame."""
    N, H, W = fg.shape
    ids = torch.arange(1, H * W + 1, dtype=torch.float32, device=fg.device).view(1, 1, H, W)
    m = fg[:, None].float()                                            # (N, 1, H, W)
    lab = ids * m
    for _ in range(H * W):
        new = Fnn.max_pool2d(lab, 3, 1, 1) * m
        if torch.equal(new, lab):
            break
        lab = new
    return lab[:, 0]


def segment(videos, cfg):
    """videos (B, 3, F, H, W) in [-1, 1] -> dict of per-frame measurements of the primary blob."""
    B, _, F, H, W = videos.shape
    x = ((videos.float() + 1) / 2).clamp(0, 1)                         # (B, 3, F, H, W) in [0,1]
    g_med = x.flatten(2).median(-1).values                             # (B, 3) global median
    t_med = x.median(2).values                                         # (B, 3, H, W)
    far = (t_med - g_med[..., None, None]).norm(dim=1, keepdim=True) > cfg.fg_threshold
    bg = torch.where(far, g_med[..., None, None], t_med)               # (B, 3, H, W)
    d = (x - bg[:, :, None]).pow(2).sum(1).sqrt()                      # (B, F, H, W)
    fg = d > cfg.fg_threshold                                          # (B, F, H, W)
    # A frame mostly "foreground" (noise, a scene cut) holds no object on a background: skip
    # its blob search (label propagation would need ~H+W sweeps over it) and leave it invalid.
    busy = fg.flatten(2).float().mean(-1) > 2 * cfg.max_area           # (B, F)
    lab = _components((fg & ~busy[..., None, None]).view(B * F, H, W)).view(B * F, H * W)
    gid = lab.long() + torch.arange(B * F, device=lab.device)[:, None] * (H * W + 1)  # ids unique over frames
    size = torch.bincount(gid.view(-1), minlength=B * F * (H * W + 1)).float()
    sz = size[gid] * (lab > 0)                                         # (B*F, H*W) blob sizes
    best = lab.gather(1, sz.argmax(1, keepdim=True))                   # (B*F, 1) largest blob id
    obj = ((lab == best) & (best > 0)).view(B, F, H, W)                # (B, F, H, W) primary
    area = obj.flatten(2).sum(-1).float()                              # (B, F)
    valid = (area >= cfg.min_area * H * W) & (area <= cfg.max_area * H * W)  # (B, F)
    ys, xs = torch.arange(H, device=x.device).float() + 0.5, torch.arange(W, device=x.device).float() + 0.5
    w = obj.float()
    n = area.clamp(min=1)
    cx = (w.sum(2) * xs).sum(-1) / n                                   # (B, F) centroid, px
    cy = (w.sum(3) * ys).sum(-1) / n                                   # (B, F)
    big = torch.tensor(1e9, device=x.device)
    x0 = torch.where(obj.any(2), xs, big).amin(-1)                     # (B, F) box, pixel edges
    x1 = torch.where(obj.any(2), xs, -big).amax(-1)
    y0 = torch.where(obj.any(3), ys, big).amin(-1)
    y1 = torch.where(obj.any(3), ys, -big).amax(-1)
    box = torch.stack([x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5], -1)    # (B, F, 4)
    return {"x": x, "bg": bg, "d": d, "fg": fg, "obj": obj, "valid": valid,
            "centroid": torch.stack([cx, cy], -1), "box": box}


# ----------------------------------------------------------------------------- the metrics
def _colour(s):
    """Nearest palette colour of the median of the object's core pixels (d above its median)."""
    names, pal = list(data.COLORS), torch.tensor(list(data.COLORS.values()), device=s["x"].device)  # (P, 3)
    out = []
    for b in range(s["x"].shape[0]):
        m = s["obj"][b] & s["valid"][b][:, None, None]                 # (F, H, W)
        if not m.any():
            out.append(None)
            continue
        core = m & (s["d"][b] >= s["d"][b][m].median())               # skip anti-aliased edges
        rgb = s["x"][b].permute(1, 2, 3, 0)[core].median(0).values     # (3,)
        out.append(names[int((pal - rgb).norm(dim=1).argmin())])
    return out


def _shape(s):
    """Per valid frame, soft IoU of the soft object mask with each template at the mask's box;
    the shape with the most frame wins."""
    B, F, H, W = s["d"].shape
    # Soft mask: coverage = d / contrast (d grows linearly with an edge pixel's coverage);
    # contrast = the object's 90th-percentile distance, i.e. that of fully covered pixels.
    contrast = torch.stack([s["d"][b][s["obj"][b]].quantile(0.9) if s["obj"][b].any()
                            else s["d"].new_tensor(1.) for b in range(B)]).clamp(min=1e-3)  # (B,)
    near = Fnn.max_pool2d(s["obj"].float().view(B * F, 1, H, W), 3, 1, 1).view(B, F, H, W)
    m = (s["d"] / contrast[:, None, None, None]).clamp(0, 1) * near   # (B, F, H, W)
    # Soft box: the column maxima of an anti-aliased shape ramp linearly across its extreme
    # pixel, so their sum is its width 2 rx to sub-pixel accuracy (thresholded extents are
    # biased by up to a pixel, enough to confuse a square with a circle at 32 px).
    colmax, rowmax = m.amax(2), m.amax(3)                              # (B, F, W), (B, F, H)
    xs, ys = torch.arange(W, device=m.device).float() + 0.5, torch.arange(H, device=m.device).float() + 0.5
    rx, ry = colmax.sum(-1) / 2, rowmax.sum(-1) / 2                    # (B, F) half-sizes, px
    cx = (colmax * xs).sum(-1) / (2 * rx).clamp(min=1e-6)             # (B, F) box centre, px
    cy = (rowmax * ys).sum(-1) / (2 * ry).clamp(min=1e-6)
    c, r = torch.stack([cx, cy], -1), torch.stack([rx, ry], -1).clamp(min=0.5)  # (B, F, 2)
    ious = []
    for k in range(len(data.SHAPES)):
        t = data.shape_coverage(torch.full((B, F), k, device=c.device), c[..., 0], c[..., 1], r[..., 0], r[..., 1],
                                H, W)                                  # (B, F, H, W)
        ious.append(torch.minimum(m, t).sum((2, 3)) / torch.maximum(m, t).sum((2, 3)).clamp(min=1e-6))
    best = torch.stack(ious, -1).argmax(-1)                            # (B, F)
    votes = Fnn.one_hot(best, len(data.SHAPES)) * s["valid"][..., None]  # (B, F, S)
    return [data.SHAPES[int(v.sum(0).argmax())] if s["valid"][b].any() else None
            for b, v in enumerate(votes)]


def _velocity(s, cfg):
    """Theil-Sen velocity (median of pairwise slopes, robust to a few mis-segmented frames) of
    the centroid over the first direction_frames valid frames. -> (B, 2) px/frame, x right y down."""
    c, valid = s["centroid"][:, :cfg.direction_frames], s["valid"][:, :cfg.direction_frames]
    Fd = c.shape[1]
    t = torch.arange(Fd, device=c.device).float()
    dt = t[None, :] - t[:, None]                                       # (F, F) j - i
    pair = (dt > 0) & valid[:, :, None] & valid[:, None, :]           # (B, F, F)
    slope = (c[:, None, :, :] - c[:, :, None, :]) / dt.clamp(min=1)[None, :, :, None]  # (B,F,F,2)
    slope = torch.where(pair[..., None], slope, slope.new_tensor(float("nan")))
    v = slope.flatten(1, 2).nanmedian(1).values                        # (B, 2)
    return torch.nan_to_num(v, nan=0.0)


def _direction(v, size, cfg):
    out = []
    for vx, vy in v.tolist():
        if math.hypot(vx, vy) < cfg.still_speed * size:
            out.append(None)                                           # "still": never correct
            continue
        ang = math.atan2(-vy, vx)                                      # up is +y in this angle
        dist = {m: abs(math.remainder(ang - math.atan2(-u[1], u[0]), 2 * math.pi))
                for m, u in data.MOTION_VECTORS.items()}
        out.append(min(dist, key=dist.get))
    return out


# DEVIATION: VBench compares DINO features (subject) and CLIP features (background); we compare
# the object's pixels and the background's pixels directly.
def _subject_consistency(s, cfg):
    """Object crop (x - b, masked, resampled to crop x crop around its box) per frame; VBench's
    0.5 (cos(f_1, f_t) + cos(f_{t-1}, f_t)) averaged over t >= 2; invalid frames count 0."""
    B, F, H, W = s["d"].shape
    diff = (s["x"] - s["bg"][:, :, None]) * Fnn.max_pool2d(
        s["obj"].float().view(B * F, 1, H, W), 3, 1, 1).view(B, 1, F, H, W)  # (B, 3, F, H, W)
    box = s["box"].clamp(-1e4, 1e4)
    c = (box[..., :2] + box[..., 2:]) / 2                              # (B, F, 2) px
    half = ((box[..., 2:] - box[..., :2]).amax(-1) / 2 * 1.25).clamp(min=1)  # (B, F) px
    g = torch.linspace(-1, 1, cfg.crop, device=diff.device)
    gx = (c[..., 0, None] + half[..., None] * g) / W * 2 - 1           # (B, F, crop) in [-1, 1]
    gy = (c[..., 1, None] + half[..., None] * g) / H * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), -1)
    crops = Fnn.grid_sample(diff.transpose(1, 2).reshape(B * F, 3, H, W),
                            grid.view(B * F, cfg.crop, cfg.crop, 2), align_corners=False)
    f = Fnn.normalize(crops.view(B, F, -1), dim=-1) * s["valid"][..., None]  # (B, F, 3*crop^2)
    if F < 2:
        return s["valid"].float().mean(1)
    sim = 0.5 * ((f[:, :1] * f[:, 1:]).sum(-1) + (f[:, :-1] * f[:, 1:]).sum(-1))  # (B, F-1)
    return sim.mean(1)                                                 # (B,)


def _background_consistency(s, cfg):
    """exp(-mean |x_t - x_{t-1}| / flicker_scale) over pixels that are background (not near any
    foreground) in both frames; 0 if no such pixel exists (e.g. a noise video)."""
    B, F, H, W = s["d"].shape
    if F < 2:
        return torch.ones(B, device=s["d"].device)
    near = Fnn.max_pool2d(s["fg"].float().view(B * F, 1, H, W), 5, 1, 2).view(B, F, H, W) > 0
    keep = ~(near[:, 1:] | near[:, :-1])                               # (B, F-1, H, W)
    dx = (s["x"][:, :, 1:] - s["x"][:, :, :-1]).abs().mean(1)          # (B, F-1, H, W)
    n = keep.flatten(1).sum(1)
    flicker = (dx * keep).flatten(1).sum(1) / n.clamp(min=1)           # (B,)
    return torch.where(n > 0, torch.exp(-flicker / cfg.flicker_scale), flicker.new_zeros(()))


@data.one_thread()  # small tensors: one intra-op thread is faster on a loaded machine
def score_videos(videos, prompts, reference=None, seed=0, cfg=None):
    """videos (B, 3, F, H, W) in [-1, 1] + their prompts -> dict of floats (see module doc).
    reference: ground-truth clips for FVD-lite; default data.make_clips of the same prompts."""
    cfg = cfg or EvalConfig()
    if videos.dim() != 5 or videos.shape[1] != 3 or videos.shape[-1] != videos.shape[-2]:
        raise ValueError(f"expected videos (B, 3, F, H, W) with H == W, got {tuple(videos.shape)}")
    if len(prompts) != len(videos):
        raise ValueError(f"expected {len(videos)} prompts, got {len(prompts)}")
    B, _, F, H, W = videos.shape
    want = [data.parse_prompt(p) for p in prompts]
    pred_c, pred_s, pred_m, subj, bgc, vel = [], [], [], [], [], []
    for i in range(0, B, 16):  # chunks of 16 videos bound the memory of segmentation
        s = segment(videos[i:i + 16], cfg)
        pred_c += _colour(s)
        pred_s += _shape(s)
        v = _velocity(s, cfg)
        vel.append(v)
        pred_m += _direction(v, H, cfg)
        subj.append(_subject_consistency(s, cfg))
        bgc.append(_background_consistency(s, cfg))
    speed = torch.cat(vel).norm(dim=1) / H                             # (B,) frame sides / frame
    out = {"n": B,
           "color_acc": float(np.mean([p == w[0] for p, w in zip(pred_c, want)])),
           "shape_acc": float(np.mean([p == w[1] for p, w in zip(pred_s, want)])),
           "direction_acc": float(np.mean([p == w[2] for p, w in zip(pred_m, want)])),
           # DEVIATION: VBench's dynamic degree thresholds RAFT optical flow; we threshold the
           # segmented object's speed (a video without a valid object is not dynamic).
           "dynamic_degree": float((speed >= cfg.still_speed).float().mean()),
           "subject_consistency": float(torch.cat(subj).mean()),
           "background_consistency": float(torch.cat(bgc).mean())}
    if reference is None:
        reference, _ = data.make_clips(data.DataConfig(size=H, frames=F), want, seed)
    net = FeatureNet(seed=0, size=cfg.feature_size).to(videos.device)    # the videos' device
    reference = reference.to(videos.device)
    out["fvd"] = frechet_distance(net(videos.float()), net(reference.float())) if B > 1 else float("nan")
    out["fvd_score"] = math.exp(-out["fvd"] / cfg.fvd_scale) if B > 1 else 0.0
    out["semantic"] = (out["color_acc"] + out["shape_acc"] + out["direction_acc"]) / 3
    out["quality"] = (out["subject_consistency"] + out["background_consistency"]
                      + out["dynamic_degree"] + out["fvd_score"]) / 4
    # VBench: Total Score = (4 * Quality Score + 1 * Semantic Score) / 5
    out["total"] = (4 * out["quality"] + out["semantic"]) / 5
    return out


def read_prompt_dir(path, size, frames=None):
    """DIR/prompts.jsonl ({"file", "prompt"} per line) -> videos (B, 3, F, size, size), prompts.
    Clips are resized to size x size and cut to the shortest clip's length (or to `frames`). Every line
    is checked (JSON, file present, prompt parses) before any video is decoded."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"video folder not found: {path}")
    index = os.path.join(path, "prompts.jsonl")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"prompts file not found: {index}")
    items = []
    with open(index) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    file, prompt = d["file"], d["prompt"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{index} line {n}: expected {{'file', 'prompt'}}: {e}")
                if not isinstance(file, str) or not os.path.isfile(os.path.join(path, file)):
                    raise FileNotFoundError(f"{index} line {n}: video file not found: {os.path.join(path, str(file))}")
                if not isinstance(prompt, str):
                    raise ValueError(f"{index} line {n}: the prompt must be a text, got {prompt!r}")
                try:
                    data.parse_prompt(prompt)
                except ValueError as e:
                    raise ValueError(f"{index} line {n}: {e}; VBench-lite scores prompts that name a colour, "
                                     f"a shape and a motion, e.g. \"a red circle moves left\"") from None
                items.append((os.path.join(path, file), prompt))
    if not items:
        raise ValueError(f"{index} lists no videos; add lines such as {{\"file\": \"a.mp4\", \"prompt\": \"a red circle moves left\"}}")
    clips = [data.to_tensor(data.read_video(file), size) for file, _ in items]
    F = frames or min(c.shape[1] for c in clips)
    return torch.stack([c[:, torch.arange(F) % c.shape[1]] for c in clips]), [p for _, p in items]


def _print(res, as_json):
    for k, v in res.items():
        print(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")
    if as_json:   # NaN / inf (FVD of a single video) are not JSON: null
        print(json.dumps({k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v
                          for k, v in res.items()}))


def main(argv=None):
    """The CLI; prints the metrics (with --json, the last line is one JSON object)."""
    ap = safeio.Parser(prog="evaluate.py", description="VBench-lite metrics on pixels")
    ap.add_argument("--real", type=int, default=None, help="score N ground-truth held-out clips")
    ap.add_argument("--videos", default=None, help="score DIR/prompts.jsonl videos")
    ap.add_argument("--preset", default="tiny", help=f"frame size preset: {sorted(data.PRESETS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the FVD-lite reference clips")
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON (last line)")
    dist.add_device_arg(ap)
    args = ap.parse_args(argv)
    try:
        device = dist.pick_device(args.device)           # where the clips are segmented and featurised
        dcfg, ecfg = data.get_config(args.preset), get_config(args.preset)
        if args.real is not None and args.real < 1:
            raise ValueError(f"--real must be >= 1, got {args.real}")
        if args.videos:
            v, p = read_prompt_dir(args.videos, dcfg.size)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.videos:
        _print(score_videos(v.to(device), p, seed=args.seed, cfg=ecfg), args.json)
    elif args.real:
        v, p, _ = data.make_batch(dcfg, args.real, seed=1000 + args.seed, split="eval")
        _print(score_videos(v.to(device), p, seed=args.seed, cfg=ecfg), args.json)
    else:  # demo: the three situations the tests check
        v, p, _ = data.make_batch(dcfg, 32, seed=1000, split="eval")
        v = v.to(device)
        real = score_videos(v, p)
        wrong = [data.canonical_prompt(*[xs[(xs.index(a) + 1) % len(xs)] for a, xs in zip(
            data.parse_prompt(q), (list(data.COLORS), data.SHAPES, data.MOTIONS))]) for q in p]
        shuf = score_videos(v, wrong)
        noise = score_videos(torch.rand(v.shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1, p)
        for name, r in (("ground truth", real), ("wrong prompts", shuf), ("noise", noise)):
            print(f"{name:14s} " + " ".join(f"{k}={r[k]:.3f}" for k in (
                "color_acc", "shape_acc", "direction_acc", "fvd", "semantic", "quality", "total")))
        assert real["semantic"] > 0.9 > 0.4 > shuf["semantic"] and noise["semantic"] < 0.4


if __name__ == "__main__":
    main()
