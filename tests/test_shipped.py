"""The shipped `small` weights (weights/small, <= 25 MB) load with the current code and stream video.

Not asserted: prompt alignment. The issue asks for an evaluate.py semantic score above a floor; the
shipped S2DiT-AR does not reach one yet (README, "What is not there yet"), and a test that could only
pass by lowering the floor to what we measured would prove nothing."""
import os

import torch

import data
import stream
import train

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "small")


def test_shipped_weights_are_small_enough():
    size = sum(os.path.getsize(os.path.join(WEIGHTS, f)) for f in os.listdir(WEIGHTS))
    assert size <= 25 * 2 ** 20, size


def test_shipped_weights_load_and_stream_deterministic_prompt_dependent_video():
    models = train.load_streaming(WEIGHTS)
    assert models["name"] == "S2DiT-AR" and models["steps"] == [1, 2, 4]
    prompts = [data.canonical_prompt(*a) for a in data.eval_prompts(2)]
    with torch.no_grad():
        run = lambda p, seed: torch.cat([c.frames for c in stream.stream(models, p, 3, 2, seed=seed)], dim=1)
        a, a2, b = run(prompts[0], 0), run(prompts[0], 0), run(prompts[1], 0)
    assert a.shape == (3, 33, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, a2)                        # same seed, same video
    assert not torch.equal(a, b)                     # the prompt reaches the frames
