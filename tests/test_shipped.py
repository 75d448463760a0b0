"""The shipped `small` weights (weights/small, <= 25 MB) load with the current code and stream video
that follows held-out prompts better than chance."""
import os

import torch

import data
import evaluate
import stream
import train

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "small")
# Chance level of `semantic` (mean of colour 1/7, shape 1/4 and direction 1/6 accuracy) is 0.19.
SEMANTIC_FLOOR = 0.30


def test_shipped_weights_are_small_enough():
    size = sum(os.path.getsize(os.path.join(WEIGHTS, f)) for f in os.listdir(WEIGHTS))
    assert size <= 25 * 2 ** 20, size


def test_shipped_weights_stream_prompt_aligned_video():
    models = train.load_streaming(WEIGHTS)
    assert models["name"] == "S2DiT-AR"
    steps = 2 if 2 in models["steps"] else models["steps"][-1]
    attrs = data.eval_prompts(8)
    prompts = [data.canonical_prompt(*a) for a in attrs]
    with torch.no_grad():
        videos = torch.stack([torch.cat([c.frames for c in stream.stream(models, p, 3, steps, seed=i)], dim=1)
                              for i, p in enumerate(prompts)])
    assert videos.shape[1:] == (3, 33, 64, 64)
    s = evaluate.score_videos(videos, prompts, seed=0)
    assert s["semantic"] > SEMANTIC_FLOOR, s
