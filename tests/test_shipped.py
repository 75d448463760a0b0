"""The shipped `small` weights (weights/small, <= 25 MB) load with the current code and stream video.

Not asserted: prompt alignment. The issue asks for an evaluate.py semantic score above a floor; the
shipped S2DiT-AR does not reach chance level yet (semantic 0.03 on 12 held-out prompts; chance, a clean
object in a random colour, shape and direction, is 0.19; README, "What is not there yet"), and a test
that could only pass by lowering the floor below chance would prove nothing."""
import os

import pytest
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
    # the shipped student was distilled for the pipeline's sample_steps = 2; stream.py's default --steps
    assert models["name"] == "S2DiT-AR" and models["steps"] == [2]
    prompts = [data.canonical_prompt(*a) for a in data.eval_prompts(2)]
    with torch.no_grad():
        run = lambda p, seed: torch.cat([c.frames for c in stream.stream(models, p, 3, seed=seed)], dim=1)
        a, a2, b = run(prompts[0], 0), run(prompts[0], 0), run(prompts[1], 0)
    assert a.shape == (3, 33, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, a2)                        # same seed, same video
    assert not torch.equal(a, b)                     # the prompt reaches the frames


def test_readme_commands_stream_the_shipped_weights_and_refuse_other_step_counts(tmp_path, capsys):
    """README's quick-start command (its default --steps), shortened to 1 chunk; another count is a
    clear error naming the count the student was distilled for, before any work."""
    stream.main(["--run", WEIGHTS, "--prompt", "a red circle moves right", "--chunks", "1",
                 "--out", str(tmp_path / "red.mp4"), "--json"])
    assert (tmp_path / "red.mp4").exists()
    with pytest.raises(SystemExit):
        stream.main(["--run", WEIGHTS, "--prompt", "a red circle moves right", "--steps", "4"])
    assert "distilled for 2 denoising steps only, not 4" in capsys.readouterr().err
