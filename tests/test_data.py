"""Tests of data.py: the shapes world, its captions, held-out split, ground truth and I/O."""
import itertools
import json
import math
import os
import re
import sys
from dataclasses import replace

import imageio
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402


def tiny(**kw):
    return replace(data.get_config("tiny"), **kw)


def test_presets_and_unknown_preset():
    assert (data.get_config("tiny").size, data.get_config("small").size) == (32, 64)
    assert data.get_config("tiny").frames == data.get_config("small").frames == 33
    with pytest.raises(ValueError, match="tiny"):
        data.get_config("huge")


def test_world_size_and_held_out_fraction():
    assert len(data.COLORS) >= 5 and len(data.SHAPES) >= 4 and len(data.MOTIONS) == 6
    total = len(data.COLORS) * len(data.SHAPES) * len(data.MOTIONS)
    assert len(set(data.HELD_OUT)) == len(data.HELD_OUT)
    assert 0.10 <= len(data.HELD_OUT) / total <= 0.15
    assert len(data.TRAIN_COMBOS) + len(data.HELD_OUT) == total
    # compositional generalisation: every single attribute value still appears in training
    for i, values in enumerate((data.COLORS, data.SHAPES, data.MOTIONS)):
        assert {c[i] for c in data.TRAIN_COMBOS} == set(values)
    assert data.eval_prompts() == data.HELD_OUT and len(data.eval_prompts(50)) == 50


def test_batch_shapes_range_and_determinism():
    cfg = tiny(frames=9)
    v, caps, gt = data.make_batch(cfg, 6, seed=3)
    assert v.shape == (6, 3, 9, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    assert len(caps) == len(gt) == 6
    o = gt[0]["objects"][0]
    assert o["centroid"].shape == (9, 2) and o["box"].shape == (9, 4)
    v2, caps2, _ = data.make_batch(cfg, 6, seed=3)
    assert torch.equal(v, v2) and caps == caps2
    v3, _, _ = data.make_batch(cfg, 6, seed=4)
    assert not torch.equal(v, v3)
    a, _ = data.make_clips(cfg, data.eval_prompts(4), seed=1)
    b, _ = data.make_clips(cfg, data.eval_prompts(4), seed=1)
    assert torch.equal(a, b) and a.shape == (4, 3, 9, 32, 32)
    assert data.make_clips(cfg, data.eval_prompts(2), seed=1, frames=13)[0].shape[2] == 13


def test_held_out_never_in_train_and_eval_only_held_out():
    cfg = tiny(frames=2, p_two_objects=0.5)
    seen, n_two = set(), 0
    for seed in range(4):
        _, caps, gt = data.make_batch(cfg, 128, seed, split="train")
        for c, g in zip(caps, gt):
            for o in g["objects"]:
                combo = (o["color"], o["shape"], o["motion"])
                assert combo not in data.HELD_OUT
                seen.add(combo)
            n_two += len(g["objects"]) == 2
            assert data.parse_prompt(c) == tuple(g["objects"][0][k] for k in ("color", "shape",
                                                                               "motion"))
    assert n_two > 100 and len(seen) > 0.8 * len(data.TRAIN_COMBOS)
    _, caps, gt = data.make_batch(cfg, 64, 0, split="eval")
    assert all((g["objects"][0]["color"], g["objects"][0]["shape"], g["objects"][0]["motion"])
               in data.HELD_OUT for g in gt)
    with pytest.raises(ValueError):
        data.make_batch(cfg, 2, 0, split="test")


def test_single_object_and_two_object_captions():
    cfg = tiny(frames=5, p_two_objects=1.0)
    _, caps, gt = data.make_batch(cfg, 32, 0)
    two = [(c, g) for c, g in zip(caps, gt) if len(g["objects"]) == 2]
    assert len(two) > 20
    for c, g in two:
        assert " and " in c or " while " in c
        second = g["objects"][1]
        clause = re.split(r"\s(?:and|while)\s+(?=an?\s)", c)[1]         # the second object's
        assert data.parse_prompt(clause) == (second["color"], second["shape"], second["motion"])
        # objects never overlap, second is smaller
        gap = (g["objects"][0]["centroid"] - second["centroid"]).abs().max(1).values
        assert (gap > g["objects"][0]["radius"] + second["radius"]).all()
        assert second["radius"] < g["objects"][0]["radius"]
    _, _, gt1 = data.make_batch(cfg, 32, 0, single_object=True)
    assert all(len(g["objects"]) == 1 for g in gt1)


def test_parse_prompt_round_trips_every_paraphrase():
    combos = list(itertools.product(data.COLORS, data.SHAPES, data.MOTIONS))
    n = 0
    for c, s, m in combos:
        assert data.parse_prompt(data.canonical_prompt(c, s, m)) == (c, s, m)
        for t, cw, sw, mw in itertools.product(data.TEMPLATES, data.COLOR_WORDS[c],
                                               data.SHAPE_WORDS[s], data.MOTION_PHRASES[m]):
            text = data._article(t.format(c=cw, s=sw, m=mw))
            assert data.parse_prompt(text) == (c, s, m), text
            n += 1
    assert n == len(combos) * 3 * 3 * 3 * 4
    # two objects: the primary is the first mentioned, whatever the second says
    assert data.parse_prompt("a crimson ball drifts up and to the left and a blue box falls") \
        == ("red", "circle", "up-left")
    assert data.parse_prompt("an aqua wedge rises while a snowy disc moves right") \
        == ("cyan", "triangle", "up")
    assert data.parse_prompt(data.caption("white", "diamond", "down-right", 5)) == \
        ("white", "diamond", "down-right")


@pytest.mark.parametrize("bad", ["a red circle", "a tree moves left", "a red circle moves up-right",
                                 "a ball moves left", ""])
def test_parse_prompt_unknown_is_value_error(bad):
    with pytest.raises(ValueError):
        data.parse_prompt(bad)


def test_vocabulary_covers_every_caption():
    vocab = set(data.vocabulary())
    _, caps, _ = data.make_batch(tiny(frames=2, p_two_objects=0.5), 300, 1)
    for c in caps + [data.canonical_prompt(*h) for h in data.HELD_OUT]:
        assert set(data._words(c)) <= vocab and set(c.split()) <= vocab, c


def test_shape_coverage_areas():
    r = 10.0
    want = [math.pi * r * r, 4 * r * r, 2 * r * r, 2 * r * r]  # circle, square, triangle, diamond
    for k, a in enumerate(want):
        cov = data.shape_coverage(torch.tensor(k), torch.tensor(32.3), torch.tensor(31.6),
                                  torch.tensor(r), torch.tensor(r), 64, 64)
        assert cov.shape == (64, 64) and abs(float(cov.sum()) - a) / a < 0.03, data.SHAPES[k]


def test_ground_truth_matches_pixels_and_motion():
    cfg = tiny(size=64, frames=33, p_textured=0.0)
    attrs = [("red", "square", m) for m in data.MOTIONS]
    v, gt = data.make_clips(cfg, attrs, seed=0)
    x = (v + 1) / 2                                                    # (B, 3, F, H, W)
    for b, (_, _, m) in enumerate(attrs):
        o = gt[b]["objects"][0]
        bg = x[b, :, 0, 0, 0] if o["box"][0, 0] > 2 else x[b, :, 0, -1, -1]
        alpha = (x[b] - bg[:, None, None, None]).abs().sum(0)          # (F, H, W)
        alpha = alpha / alpha.amax((1, 2), keepdim=True)
        pos = torch.arange(64).float() + 0.5
        cx = (alpha.sum(1) * pos).sum(-1) / alpha.sum((1, 2))
        cy = (alpha.sum(2) * pos).sum(-1) / alpha.sum((1, 2))
        assert torch.allclose(torch.stack([cx, cy], -1), o["centroid"], atol=0.3)
        # moves the named way without bouncing within the horizon, and clearly (> 25 px)
        step = o["centroid"][1:] - o["centroid"][:-1]                  # (F-1, 2)
        u = torch.tensor(data.MOTION_VECTORS[m]).float()
        assert torch.all(step * u >= 0) and torch.all(step[:, u == 0] == 0)
        assert (o["centroid"][-1] - o["centroid"][0]).abs().max() > 25


def test_bounces_keep_objects_in_frame():
    cfg = tiny()
    _, gt = data.make_clips(cfg, [("blue", "circle", m) for m in data.MOTIONS], 0, frames=200)
    for g in gt:
        box = g["objects"][0]["box"]
        assert box.min() >= -1e-4 and box.max() <= 32 + 1e-4
        c = g["objects"][0]["centroid"]
        assert (c[:, 0].max() - c[:, 0].min() > 10) or (c[:, 1].max() - c[:, 1].min() > 10)


def test_save_video_gif_and_mp4(tmp_path):
    v, _ = data.make_clips(tiny(frames=9), [("red", "circle", "left")], 0)
    p = str(tmp_path / "a.gif")
    data.save_video(p, v[0])
    back = data.read_video(p)
    assert back.shape == (9, 32, 32, 3)
    assert np.abs(back.astype(float) - data._to_uint8(v[0]).astype(float)).mean() < 8
    still = v[0][:, :1].repeat(1, 9, 1, 1)                             # identical frames
    data.save_video(p, still)
    assert data.read_video(p).shape[0] == 9                            # merged frames restored
    p4 = str(tmp_path / "a.mp4")
    data.save_video(p4, v[0])
    assert data.read_video(p4).shape == (9, 32, 32, 3)
    assert sorted(os.listdir(tmp_path)) == ["a.gif", "a.mp4"]          # no tmp files left
    with pytest.raises(ValueError):
        data.save_video(str(tmp_path / "a.avi"), v[0])
    with pytest.raises(ValueError):
        data.save_video(p, v[0, :2])


def test_save_grid_gif(tmp_path):
    v, caps, _ = data.make_batch(tiny(frames=5), 5, 0)
    p = str(tmp_path / "grid.gif")
    data.save_grid_gif(p, v, caps, fps=16, ncol=3)
    g = data.read_video(p)
    assert g.shape[0] == 5 and g.shape[2] == 3 * 128 and g.shape[1] > 2 * 128


def test_clip_folder(tmp_path):
    rng = np.random.RandomState(0)
    frames = (rng.rand(5, 20, 24, 3) * 255).astype(np.uint8)
    imageio.mimsave(str(tmp_path / "a.gif"), list(frames), duration=62.5, loop=0)
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "a.gif", "caption": "a red circle moves left"}) + "\n")
    ds = data.ClipFolder(str(tmp_path), size=16, frames=9)
    assert len(ds) == 1
    x, c = ds[0]
    assert x.shape == (3, 9, 16, 16) and c == "a red circle moves left"
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 5], x[:, 0])                               # 5 frames looped to 9
    xb, cb = ds.batch(3, seed=0)
    assert xb.shape == (3, 3, 9, 16, 16) and len(cb) == 3


def test_clip_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.ClipFolder(str(tmp_path / "nope"), 16, 9)
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        data.ClipFolder(str(tmp_path), 16, 9)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "gone.mp4", "caption": "x"}))
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        data.ClipFolder(str(tmp_path), 16, 9)
    (tmp_path / "bad.gif").write_bytes(b"not a gif at all")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "bad.gif", "caption": "x"}))
    ds = data.ClipFolder(str(tmp_path), 16, 9)
    with pytest.raises(ValueError, match="bad.gif"):
        ds[0]


def test_second_captions_and_one_word_swaps():
    """text.py's word-keeping terms: recaption describes the same clip (parses to the same primary
    object), swap_one_word changes exactly one attribute of it and never names a held-out combination."""
    cfg = data.get_config("tiny")
    _, caps, gt = data.make_batch(cfg, 64, seed=3)
    rng = np.random.RandomState(0)
    kinds = set()
    for c, g in zip(caps, gt):
        truth = data.parse_prompt(c)
        assert data.parse_prompt(data.recaption(g["objects"], rng)) == truth
        swapped = data.parse_prompt(data.swap_one_word(g["objects"], rng))
        diff = [i for i in range(3) if swapped[i] != truth[i]]
        assert len(diff) == 1 and swapped not in data.HELD_OUT, (c, swapped)
        kinds.add(diff[0])
    assert kinds == {0, 1, 2}                        # colour, shape and motion swaps all occur
