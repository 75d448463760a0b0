"""Shapes world: a procedural text-video toy dataset (docs/design.md, the toy world), plus a loader for a
folder of your own clips and GIF/MP4 writers.

The paper trains on web-scale text-video data; we replace it with clips we can render in
milliseconds and score on pixels (evaluate.py): one or two shapes {circle, square, triangle,
diamond} in 7 colours move {left, right, up, down, up-left, down-right} over a plain or a
low-contrast textured background, bouncing off the walls so that clips of any length exist.
Captions are drawn from templates with synonyms ("a crimson ball slides to the left"), and
`parse_prompt` maps any of them back to (colour, shape, motion). A fixed list `HELD_OUT` of
(colour, shape, motion) combinations never appears in training: split="eval" draws its primary
object from it (compositional generalisation, as VBench's semantic dimensions probe).

Shapes: video (B, 3, F, H, W) float32 in [-1, 1]; B clips, F pixel frames, H = W = size.
Positions are in pixels (x right, y down), pixel centres at integer + 0.5.

Run:  python data.py                      demo: captions + speed figure
      python data.py --bench              clips/s and ms per batch (16 clips x 21 frames x 64^2)
      python data.py --preview out.gif    labelled grid of clips (--preset small --n 8)
"""
import contextlib
import json
import os
import re
import time
from dataclasses import dataclass

import imageio
import numpy as np
import torch
import torch.nn.functional as Fnn

import safeio

# ----------------------------------------------------------------------------- the world
# RGB in [0, 1]; saturated and bright so every colour stays far (> 0.6 in RGB) from the dark
# backgrounds below and from each other (nearest-palette classification in evaluate.py).
COLORS = {
    "red": (0.90, 0.12, 0.12), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10), "magenta": (0.90, 0.20, 0.90), "cyan": (0.10, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
# ASSUMPTION: the two extra motions are the diagonals up-left / down-right: 45 degrees from
# their neighbours, so the angle of the centroid trajectory separates all six with margin.
MOTIONS = ["left", "right", "up", "down", "up-left", "down-right"]
# Unit velocity per motion in image coordinates (x right, y down).
MOTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
                  "up-left": (-1, -1), "down-right": (1, 1)}

# 21 of the 7*4*6 = 168 combinations (12.5 %) never appear in training, as primary or second
# object. Rule: the i-th entry is (COLORS[i % 7], SHAPES[i % 4], MOTIONS[i % 6]), i < 21, so
# every colour is held out 3 times and every shape / motion 5-6 / 3-4 times, and each of them
# still appears in training with all the other attribute values but one or two.
HELD_OUT = [
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "up"),
    ("yellow", "diamond", "down"), ("magenta", "circle", "up-left"),
    ("cyan", "square", "down-right"), ("white", "triangle", "left"),
    ("red", "diamond", "right"), ("green", "circle", "up"), ("blue", "square", "down"),
    ("yellow", "triangle", "up-left"), ("magenta", "diamond", "down-right"),
    ("cyan", "circle", "left"), ("white", "square", "right"), ("red", "triangle", "up"),
    ("green", "diamond", "down"), ("blue", "circle", "up-left"),
    ("yellow", "square", "down-right"), ("magenta", "triangle", "left"),
    ("cyan", "diamond", "right"), ("white", "circle", "up"),
]
TRAIN_COMBOS = [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS
                if (c, s, m) not in HELD_OUT]

# ----------------------------------------------------------------------------- captions
# First word of each list is the canonical name. At least 3 paraphrases per attribute.
COLOR_WORDS = {"red": ["red", "crimson", "scarlet"], "green": ["green", "emerald", "lime"],
               "blue": ["blue", "azure", "cobalt"], "yellow": ["yellow", "golden", "lemon"],
               "magenta": ["magenta", "purple", "violet"], "cyan": ["cyan", "turquoise", "aqua"],
               "white": ["white", "snowy", "ivory"]}
SHAPE_WORDS = {"circle": ["circle", "ball", "disc"], "square": ["square", "box", "block"],
               "triangle": ["triangle", "wedge", "pyramid"],
               "diamond": ["diamond", "rhombus", "lozenge"]}
MOTION_PHRASES = {
    "left": ["moves left", "slides to the left", "drifts leftward", "travels left"],
    "right": ["moves right", "slides to the right", "drifts rightward", "travels right"],
    "up": ["moves up", "rises", "floats upward", "climbs"],
    "down": ["moves down", "falls", "sinks downward", "drops"],
    "up-left": ["moves up-left", "drifts up and to the left", "rises toward the left",
                "climbs diagonally to the left"],
    "down-right": ["moves down-right", "drifts down and to the right", "falls toward the right",
                   "sinks diagonally to the right"],
}
TEMPLATES = ["a {c} {s} {m}", "a {c} {s} that {m}", "a {s} colored {c} {m}"]
JOINERS = ["and", "while"]  # two-object captions: "<primary clause> and <second clause>"
# Word sets that parse_prompt reads a motion from (any phrase above hits exactly one pattern).
_LEFT, _RIGHT = {"left", "leftward"}, {"right", "rightward"}
_UP, _DOWN = {"up", "upward", "rises", "climbs"}, {"down", "downward", "falls", "sinks", "drops"}


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def _article(text):  # "a emerald ball" -> "an emerald ball"
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _rng(rng_or_seed):
    return rng_or_seed if isinstance(rng_or_seed, np.random.RandomState) \
        else np.random.RandomState(rng_or_seed)


def caption(colour, shape, motion, rng_or_seed=0):
    """A random paraphrase of one object's attributes, e.g. 'a crimson ball slides to the left'."""
    rng = _rng(rng_or_seed)
    pick = lambda xs: xs[rng.randint(len(xs))]  # noqa: E731
    t = pick(TEMPLATES)
    return _article(t.format(c=pick(COLOR_WORDS[colour]), s=pick(SHAPE_WORDS[shape]),
                             m=pick(MOTION_PHRASES[motion])))


def recaption(objects, rng_or_seed=0):
    """Another caption of the same clip: a fresh paraphrase of every object, joined as make_batch
    joins them. A clip with two captions is what caption-caption contrast needs (text.py), as
    COCO's five captions per image are used to train sentence encoders."""
    rng = _rng(rng_or_seed)
    clauses = [caption(o["color"], o["shape"], o["motion"], rng) for o in objects]
    text = clauses[0]
    for clause in clauses[1:]:
        text += f" {JOINERS[rng.randint(2)]} " + clause
    return text


def swap_one_word(objects, rng_or_seed=0):
    """A caption of the same clip with ONE attribute of the primary object changed (its colour,
    shape or motion, picked at random): the hardest negative a caption can have, since it differs
    from the truth in one word. The new combination is a training one, so held-out combinations
    never appear in a training caption, not even as a negative."""
    rng = _rng(rng_or_seed)
    c, s, m = (objects[0][k] for k in ("color", "shape", "motion"))
    options = [(c2, s, m) for c2 in COLORS if c2 != c] + [(c, s2, m) for s2 in SHAPES if s2 != s] \
        + [(c, s, m2) for m2 in MOTIONS if m2 != m]
    options = [o for o in options if o not in HELD_OUT]
    kind = rng.randint(3)                     # colour, shape or motion: each equally often
    per_kind = [o for o in options if [o[0] != c, o[1] != s, o[2] != m][kind]] or options
    combo = per_kind[rng.randint(len(per_kind))]
    return recaption([dict(color=combo[0], shape=combo[1], motion=combo[2])] + list(objects[1:]), rng)


def canonical_prompt(colour, shape, motion):
    return f"a {colour} {shape} moves {motion}"


def parse_prompt(text):
    """Any caption -> (colour, shape, motion) of its primary (first-mentioned) object."""
    # The second object's clause starts at "and a"/"while an"; "up and to the left" does not.
    primary = re.split(r"\s(?:and|while)\s+(?=an?\s)", text.lower().strip())[0]
    w = _words(primary)
    colour = next((c for x in w for c, syn in COLOR_WORDS.items() if x in syn), None)
    shape = next((s for x in w for s, syn in SHAPE_WORDS.items() if x in syn), None)
    ws = set(w)
    h = (-1 if ws & _LEFT else 0) + (1 if ws & _RIGHT else 0)
    v = (-1 if ws & _UP else 0) + (1 if ws & _DOWN else 0)
    motion = next((m for m, vec in MOTION_VECTORS.items() if vec == (h, v)), None)
    if colour is None or shape is None or motion is None:
        raise ValueError(f"cannot parse prompt {text!r}: colour={colour}, shape={shape}, "
                         f"motion={motion}")
    return colour, shape, motion


def vocabulary():
    """Every word a caption can contain: [a-z]+ pieces plus whole whitespace tokens ('up-left')."""
    texts = TEMPLATES + JOINERS + ["a an moves"] + list(MOTIONS)
    texts += [x for d in (COLOR_WORDS, SHAPE_WORDS, MOTION_PHRASES) for v in d.values() for x in v]
    vocab = set()
    for t in texts:
        t = re.sub(r"\{[a-z]\}", " ", t)
        vocab.update(_words(t))
        vocab.update(x for x in t.lower().split() if re.fullmatch(r"[a-z-]+", x))
    return sorted(vocab)


def eval_prompts(n=None):
    """The held-out combinations in a fixed order (cycled if n > len(HELD_OUT))."""
    n = len(HELD_OUT) if n is None else n
    return [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]


# ----------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    size: int = 32               # frame side H = W in pixels (tiny 32, small 64)
    frames: int = 33             # pixel frames per clip, F = 1 + 4k (9 latent frames = 3 chunks)
    max_objects: int = 2         # one primary object, optionally a second one
    p_two_objects: float = 0.25  # chance to try a second object (~70 % fit without overlap)
    p_textured: float = 0.5      # probability of a textured (vs plain) background
    fps: int = 16                # playback rate (docs/design.md, conventions)
    object_frac: float = 0.3     # primary object side as a fraction of the frame side
    second_scale: float = 0.65   # ASSUMPTION: second object smaller, so "primary = largest blob"
    horizon: int = 32            # frames the object travels before its first possible bounce
    travel: tuple = (0.8, 1.0)   # fraction of the free range covered in `horizon` frames
    start_jitter: float = 0.2    # start up to this fraction of the free range from its edge
    texture_amp: float = 0.05    # peak texture amplitude (low contrast keeps objects segmentable)


PRESETS = {"tiny": DataConfig(size=32, frames=33), "small": DataConfig(size=64, frames=33)}


def get_config(name: str, **overrides):
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "data", **overrides)


# ----------------------------------------------------------------------------- rendering
def _coverage(shape_idx, dx, dy, r):
    """Anti-aliased coverage in [0, 1]. dx, dy: offsets from the box centre in box units
    (broadcastable to (..., h, w)); shape_idx, r (box radius in px): (..., 1, 1)."""
    dx, dy = torch.broadcast_tensors(dx, dy)                           # (..., h, w)
    ax, ay = dx.abs(), dy.abs()
    # Signed distance (negative inside, box units); scaled by r it is approximately in pixels.
    sd = torch.sqrt(dx * dx + dy * dy) - 1                             # 0: circle
    sd = torch.where(shape_idx == 1, torch.maximum(ax, ay) - 1, sd)    # 1: square
    # 2: triangle, apex (0, -1), base y = +1 from x = -1 to 1; side lines 2|x| - y - 1 = 0
    sd = torch.where(shape_idx == 2, torch.maximum(dy - 1, (2 * ax - dy - 1) / 5 ** 0.5), sd)
    sd = torch.where(shape_idx == 3, (ax + ay - 1) / 2 ** 0.5, sd)     # 3: diamond
    return (0.5 - sd * r).clamp(0, 1)                                  # 1-pixel soft edge


def shape_coverage(shape_idx, cx, cy, rx, ry, H, W):
    """Coverage (..., H, W) of shapes inscribed in boxes [cx-rx, cx+rx] x [cy-ry, cy+ry] (pixels).
    shape_idx (long), cx, cy, rx, ry: tensors of one shape (...). Used by evaluate.py."""
    dev = torch.as_tensor(cx).device                                   # the device of the boxes
    e = lambda t: torch.as_tensor(t, device=dev).float()[..., None, None]  # noqa: E731  (...) -> (..., 1, 1)
    xs = torch.arange(W, dtype=torch.float32, device=dev) + 0.5        # (W,) pixel centres
    ys = torch.arange(H, dtype=torch.float32, device=dev)[:, None] + 0.5   # (H, 1)
    return _coverage(e(shape_idx), (xs - e(cx)) / e(rx), (ys - e(cy)) / e(ry),
                     e(torch.minimum(torch.as_tensor(rx, device=dev), torch.as_tensor(ry, device=dev))))


def _paint(shape_idx, c, r, w, size):
    """Alpha (B, F, size, size) of one object per clip, evaluated only in an S x S window
    around it (8x fewer pixels than the full frame at 64 px) and scattered into the frame.
    shape_idx (B,), c (B, F, 2) centres in px, r (B,) radii in px, w (B,) weights."""
    B, F = c.shape[:2]
    S = int(np.ceil(2 * float(r.max()))) + 4                           # window side, px
    o = (c - r[:, None, None]).floor().long() - 2                      # (B, F, 2) window corner
    g = torch.arange(S)                                                # (S,)
    xs = (o[..., 0, None] + g + 0.5 - c[..., 0, None]) / r[:, None, None]  # (B, F, S) box units
    ys = (o[..., 1, None] + g + 0.5 - c[..., 1, None]) / r[:, None, None]  # (B, F, S)
    a = _coverage(shape_idx[:, None, None, None], xs[:, :, None, :], ys[:, :, :, None],
                  r[:, None, None, None]) * w[:, None, None, None]     # (B, F, S, S)
    # Scatter into a canvas padded by S on every side, so windows never index out of range.
    P = size + 2 * S
    canvas = torch.zeros(B * F * P * P)
    bf = torch.arange(B * F).view(B, F, 1, 1) * P * P                  # (B, F, 1, 1)
    yy, xx = o[..., 1, None, None] + S + g[:, None], o[..., 0, None, None] + S + g  # (B,F,S,1|S)
    canvas[(bf + yy * P + xx).reshape(-1)] = a.reshape(-1)
    return canvas.view(B, F, P, P)[:, :, S:S + size, S:S + size]       # (B, F, H, W)


def _trajectory(rng, cfg, motion, r, frames):
    """Centre (frames, 2) of an object of radius r: straight line, reflected at the walls."""
    lo, hi = r, cfg.size - r
    L = hi - lo                                                        # free range of the centre
    o = rng.uniform(0, cfg.start_jitter) * L                          # offset from starting edge
    s = (L - o) * rng.uniform(*cfg.travel) / cfg.horizon               # px per frame per axis
    u = np.array(MOTION_VECTORS[motion], dtype=np.float64)
    # Start at the edge the object moves away from, so no bounce happens in `horizon` frames.
    p0 = np.array([lo + o if ui > 0 else hi - o if ui < 0 else rng.uniform(lo, hi) for ui in u])
    p = p0 + s * u * np.arange(frames)[:, None] - lo                   # (frames, 2) unreflected
    q = np.mod(p, 2 * L)                                               # bounce = triangle wave
    return torch.tensor(lo + np.where(q > L, 2 * L - q, q), dtype=torch.float32)


def _backgrounds(rng, cfg, B):
    """(B, 3, H, W) dark tinted backgrounds, plain or textured (sum of 3 faint sinusoids)."""
    base = rng.uniform(0.12, 0.32, (B, 1)) + rng.uniform(-0.04, 0.04, (B, 3))  # (B, 3)
    textured = rng.rand(B) < cfg.p_textured                                     # (B,)
    f = rng.uniform(1, 4, (B, 3, 2)) * rng.choice([-1, 1], (B, 3, 2))           # cycles / frame
    phase = rng.uniform(0, 2 * np.pi, (B, 3))
    n = torch.arange(cfg.size, dtype=torch.float64) / cfg.size                 # (H,)
    arg = (torch.tensor(f[..., 0])[..., None, None] * n + torch.tensor(f[..., 1])[..., None, None]
           * n[:, None]) * 2 * np.pi + torch.tensor(phase)[..., None, None]     # (B, 3, H, W)
    tex = arg.sin().mean(1) * cfg.texture_amp * torch.tensor(textured)[:, None, None]  # (B,H,W)
    bg = torch.tensor(base)[:, :, None, None] + tex[:, None]                   # (B, 3, H, W)
    return bg.float(), textured


def _render(cfg, objects, bg, frames):
    """objects: per clip a list of dicts (shape, color, centroid (F,2), radius). -> video."""
    B, K = len(objects), max(len(o) for o in objects)
    bg = bg * 2 - 1                                                    # (B, 3, H, W) in [-1, 1]
    video = bg[:, :, None].repeat(1, 1, frames, 1, 1)                  # (B, 3, F, H, W)
    for k in range(K):
        get = lambda o, key, d: o[k][key] if len(o) > k else d  # noqa: E731
        idx = torch.tensor([SHAPES.index(get(o, "shape", "circle")) for o in objects])  # (B,)
        c = torch.stack([get(o, "centroid", torch.zeros(frames, 2)) for o in objects])  # (B,F,2)
        r = torch.tensor([get(o, "radius", 1.0) for o in objects])                   # (B,)
        w = torch.tensor([float(len(o) > k) for o in objects])        # (B,) 0: no k-th object
        col = torch.tensor([COLORS[get(o, "color", "red")] for o in objects]) * 2 - 1  # (B, 3)
        a = _paint(idx, c, r, w, cfg.size)                             # (B, F, H, W) alpha
        # Alpha blending x = (1 - a) bg + a col = bg + a (col - bg). The objects never overlap
        # (make_batch rejects such pairs), so adding the terms equals painting in any order.
        video.addcmul_(a[:, None], col[:, :, None, None, None] - bg[:, :, None])
    return video                                                       # (B, 3, F, H, W)


def _make_object(rng, cfg, combo, scale, frames):
    colour, shape, motion = combo
    r = cfg.object_frac * cfg.size / 2 * scale
    c = _trajectory(rng, cfg, motion, r, frames)                       # (F, 2)
    box = torch.cat([c - r, c + r], 1)                                 # (F, 4) x0, y0, x1, y1
    # "colour" and "color" both given: readers of the brief use either spelling.
    return {"color": colour, "colour": colour, "shape": shape, "motion": motion,
            "centroid": c, "box": box, "radius": r}


class one_thread(contextlib.ContextDecorator):
    """Render on one intra-op thread: the tensors are small (a few MB), so a second thread
    gains little, and on a loaded 2-core machine the threads' hand-offs made one batch ~10x
    slower (measured 1.6 s vs 0.15 s). The caller's thread count is restored afterwards."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@one_thread()
def make_batch(cfg, batch_size, seed, split="train", single_object=False, rows=slice(None)):
    """-> video (B, 3, F, H, W) in [-1, 1], captions list[str], gt list[dict] ('objects': ...).
    split="train" never uses HELD_OUT; split="eval" draws the primary object from HELD_OUT.
    rows: render only these clips of the batch (data-parallel training: each process renders its own,
    dist.rows); every clip is still drawn, so a clip is the same whichever process renders it. The
    captions and ground truth stay the whole batch's (the text stage contrasts every caption)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = np.random.RandomState(seed)
    bg, textured = _backgrounds(rng, cfg, batch_size)
    pool = HELD_OUT if split == "eval" else TRAIN_COMBOS
    objects, captions = [], []
    for b in range(batch_size):
        objs = [_make_object(rng, cfg, pool[rng.randint(len(pool))], 1.0, cfg.frames)]
        text = caption(*[objs[0][k] for k in ("color", "shape", "motion")], rng)
        if not single_object and cfg.max_objects > 1 and rng.rand() < cfg.p_two_objects:
            for _ in range(50):  # rejection sampling: the two boxes never touch (2 px margin)
                # ASSUMPTION: a new combination per try; crossing paths are rejected, so
                # second objects lean towards motions compatible with the primary's.
                combo = TRAIN_COMBOS[rng.randint(len(TRAIN_COMBOS))]
                o2 = _make_object(rng, cfg, combo, cfg.second_scale, cfg.frames)
                gap = (objs[0]["centroid"] - o2["centroid"]).abs().numpy().max(1)  # (F,)
                if (gap > objs[0]["radius"] + o2["radius"] + 2).all():
                    objs.append(o2)
                    text += f" {JOINERS[rng.randint(2)]} " + caption(*combo, rng)
                    break
        objects.append(objs)
        captions.append(text)
    video = _render(cfg, objects[rows], bg[rows], cfg.frames)
    return video, captions, [{"objects": o, "textured": bool(t)} for o, t in zip(objects, textured)]


@one_thread()
def make_clips(cfg, attrs, seed, frames=None):
    """Render one clip per (colour, shape, motion) in attrs, single object. -> (video, gt)."""
    frames = cfg.frames if frames is None else frames
    for a in attrs:
        if a[0] not in COLORS or a[1] not in SHAPES or a[2] not in MOTIONS:
            raise ValueError(f"unknown attributes {a}; expected colour in {list(COLORS)}, "
                             f"shape in {SHAPES}, motion in {MOTIONS}")
    rng = np.random.RandomState(seed)
    bg, textured = _backgrounds(rng, cfg, len(attrs))
    objects = [[_make_object(rng, cfg, tuple(a), 1.0, frames)] for a in attrs]
    video = _render(cfg, objects, bg, frames)
    return video, [{"objects": o, "textured": bool(t)} for o, t in zip(objects, textured)]


# ----------------------------------------------------------------------------- your own clips
def read_video(path, fps=16):
    """A .gif/.mp4 -> uint8 (F, H, W, 3). GIF frames are repeated by their duration at `fps`
    (Pillow merges identical consecutive frames into one longer frame when it writes a GIF)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        frames = [np.asarray(f) for f in imageio.mimread(path, memtest=False)]
        reps = [1] * len(frames)
        if path.lower().endswith(".gif"):
            meta = [imageio.v3.immeta(path, index=i) for i in range(len(frames))]
            reps = [max(1, round(m.get("duration", 0) * fps / 1000)) for m in meta]
    except Exception as e:  # noqa: BLE001 - any decoder error becomes one clear message (ffmpeg's dump: its first line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"cannot read video {path} (empty, truncated or not a video?): {first}") from e
    if not frames:
        raise ValueError(f"video {path} has no frames")
    frames = [f[..., None].repeat(3, -1) if f.ndim == 2 else f[..., :3] for f in frames]
    return np.stack([f for f, n in zip(frames, reps) for _ in range(n)]).astype(np.uint8)


def to_tensor(frames, size=None, n_frames=None):
    """uint8 (F, H, W, 3) -> float (3, F, size, size) in [-1, 1], looped/cut to n_frames."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(0, 3, 1, 2)  # (F, 3, H, W)
    if size is not None and x.shape[-2:] != (size, size):
        x = Fnn.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False).clamp(-1, 1)
    if n_frames is not None:
        x = x[torch.arange(n_frames) % x.shape[0]]                     # loop short clips
    return x.permute(1, 0, 2, 3).contiguous()                          # (3, F, H, W)


class ClipFolder:
    """A folder of .mp4/.gif clips + captions.jsonl ({"file": "a.mp4", "caption": "..."})."""

    def __init__(self, path, size, frames):
        self.path, self.size, self.frames = path, size, frames
        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip folder not found: {path}")
        index = os.path.join(path, "captions.jsonl")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"captions file not found: {index}")
        self.items = []
        with open(index) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    file, text = d["file"], d["caption"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{index} line {n}: expected {{'file', 'caption'}}: {e}")
                if not isinstance(text, str) or not re.search(r"\w", text):
                    raise ValueError(f"{index} line {n}: the caption must be a non-empty text, got {text!r}")
                if not isinstance(file, str) or not file:
                    raise ValueError(f"{index} line {n}: 'file' must be a file name, got {file!r}")
                full = os.path.join(path, file)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{index} line {n}: clip file not found: {full}")
                self.items.append((full, text))
        if not self.items:
            raise ValueError(f"{index} lists no clips")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        file, text = self.items[i]
        return to_tensor(read_video(file), self.size, self.frames), text

    def batch(self, batch_size, seed):
        idx = np.random.RandomState(seed).randint(len(self), size=batch_size)
        clips = [self[int(i)] for i in idx]
        return torch.stack([v for v, _ in clips]), [t for _, t in clips]


# ----------------------------------------------------------------------------- writers
def _to_uint8(video):
    """(3, F, H, W) float in [-1, 1] or (F, H, W, 3) uint8 -> numpy uint8 (F, H, W, 3)."""
    if isinstance(video, torch.Tensor) and video.dtype != torch.uint8:
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"expected video (3, F, H, W), got {tuple(video.shape)}")
        video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 video (F, H, W, 3), got {video.shape} {video.dtype}")
    return video


def save_video(path, video, fps=16):
    """Write a .gif or .mp4 atomically (a unique temporary file next to it, then a rename: safeio.atomic_path)."""
    frames = _to_uint8(video)
    ext = os.path.splitext(path)[1]
    if ext.lower() not in (".gif", ".mp4"):
        raise ValueError(f"expected a .gif or .mp4 path, got {path}")
    with safeio.atomic_path(path) as tmp:     # the temporary name keeps the extension: imageio picks the format by it
        if ext.lower() == ".gif":
            imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
        else:  # macro_block_size=1: keep the exact size (libx264 still needs even H, W)
            imageio.mimsave(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1)


def save_grid_gif(path, videos, labels, fps=16, ncol=4):
    """videos (B, 3, F, H, W) in [-1, 1] -> one GIF, a grid of tiles each with its label."""
    from PIL import Image, ImageDraw  # pillow ships with imageio
    if videos.dim() != 5 or videos.shape[1] != 3 or len(labels) != videos.shape[0]:
        raise ValueError(f"expected videos (B, 3, F, H, W) and B labels, got "
                         f"{tuple(videos.shape)} and {len(labels)} labels")
    B, _, F, H, W = videos.shape
    up = max(1, -(-128 // W))                                          # tiles >= 128 px wide
    lines = [re.findall(r".{1,21}(?:\s|$)", t + " ") or [""] for t in labels]
    th = 11 * max(len(x) for x in lines) + 2                           # label strip height
    ncol = min(ncol, B)
    nrow = -(-B // ncol)
    grid = np.zeros((F, nrow * (H * up + th), ncol * W * up, 3), np.uint8)
    for b in range(B):
        tiles = _to_uint8(videos[b]).repeat(up, 1).repeat(up, 2)       # (F, H*up, W*up, 3)
        y, x = (b // ncol) * (H * up + th), (b % ncol) * W * up
        grid[:, y:y + H * up, x:x + W * up] = tiles
        strip = Image.new("RGB", (W * up, th))
        ImageDraw.Draw(strip).multiline_text((2, 1), "\n".join(s.strip() for s in lines[b]),
                                             fill=(255, 255, 255), spacing=1)
        grid[:, y + H * up:y + H * up + th, x:x + W * up] = np.asarray(strip)
    save_video(path, grid, fps)


def save_strip(path, videos, labels, every=4, scale=2):
    """A still picture of videos: one row per video (its label above it), every `every`-th frame
    side by side, each frame `scale`x larger. videos (B, 3, F, H, W) in [-1, 1] -> PNG at `path`.
    For pages that show what a video does without playing it (README, RESULTS.md)."""
    from PIL import Image, ImageDraw  # pillow ships with imageio
    if videos.dim() != 5 or videos.shape[1] != 3 or len(labels) != videos.shape[0]:
        raise ValueError(f"expected videos (B, 3, F, H, W) and B labels, got "
                         f"{tuple(videos.shape)} and {len(labels)} labels")
    B, _, F, H, W = videos.shape
    idx = list(range(0, F, every))
    h, w, th, gap = H * scale, W * scale, 14, 2
    img = Image.new("RGB", (len(idx) * (w + gap) - gap, B * (h + th)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for b in range(B):
        frames = _to_uint8(videos[b])                                  # (F, H, W, 3)
        y = b * (h + th)
        draw.text((2, y + 1), labels[b], fill=(0, 0, 0))
        for j, f in enumerate(idx):
            tile = Image.fromarray(frames[f]).resize((w, h), Image.NEAREST)
            img.paste(tile, (j * (w + gap), y + th))
    tmp = f"{path}.{os.getpid()}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def _bench(size=64, frames=21, batch=16, reps=5):
    cfg = DataConfig(size=size, frames=frames)
    make_batch(cfg, batch, 0)                                          # warm-up
    t0 = time.perf_counter()
    for i in range(reps):
        make_batch(cfg, batch, i)
    ms = (time.perf_counter() - t0) / reps * 1000
    print(f"bench: {batch} clips x {frames} frames x {size}x{size}: {ms:.1f} ms/batch, "
          f"{batch / ms * 1000:.0f} clips/s")
    return ms


def main(argv=None):
    ap = safeio.Parser(prog="data.py", description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="store_true", help="print clips/s and ms per batch")
    ap.add_argument("--preview", default=None, help="write a labelled grid GIF of clips here")
    ap.add_argument("--preset", default="tiny", help=f"size preset, one of {sorted(PRESETS)}")
    ap.add_argument("--n", type=int, default=8, help="number of clips in the preview")
    ap.add_argument("--split", default="train", help="train or eval (held-out combinations)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    args = ap.parse_args(argv)
    try:
        cfg = get_config(args.preset)
        if args.split not in ("train", "eval"):
            raise ValueError(f"--split must be train or eval, got {args.split!r}")
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.preview:
            if not args.preview.lower().endswith(".gif"):
                raise ValueError(f"--preview writes a GIF: give a path ending in .gif, got {args.preview}")
            safeio.check_writable_file(args.preview, "--preview")
    except ValueError as e:
        ap.error(str(e))
    if args.bench:
        _bench()
    elif args.preview:
        v, caps, _ = make_batch(cfg, args.n, args.seed, split=args.split)
        save_grid_gif(args.preview, v, caps, fps=cfg.fps, ncol=4)
        print(f"wrote {args.preview}: {args.n} clips {tuple(v.shape)}")
    else:
        v, caps, gt = make_batch(cfg, 6, args.seed)
        for c, g in zip(caps, gt):
            print(f"{c!r:60s} -> {parse_prompt(c)}  textured={g['textured']}")
        print(f"video {tuple(v.shape)} in [{v.min():.2f}, {v.max():.2f}]; "
              f"{len(HELD_OUT)}/{len(HELD_OUT) + len(TRAIN_COMBOS)} combinations held out")
        assert all(parse_prompt(c)[:3] == tuple(g["objects"][0][k] for k in ("color", "shape",
                   "motion")) for c, g in zip(caps, gt))
        _bench()


if __name__ == "__main__":
    main()
