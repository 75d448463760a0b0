"""Resumable training loops: save every few minutes, continue bit-identically after a kill.

A long stage (the VAE, T_theta, the decoder, ...) is a loop `for step in range(steps)` whose batches
are a function of the step. If, every `every_s` seconds, the loop saves everything that changes as
it runs (the weights, the optimizer's moments, the learning-rate schedule, the EMA, every random
generator it draws from, the step), then a killed process that is started again can load that and
continue at the saved step, and the result is the same, bit for bit, as a run that was never
interrupted. The checkpoint is written atomically (temporary name, then rename) and removed when
the loop finishes, so a finished stage leaves only its result behind.

    ckpt = Checkpoint(path)                       # path None: a loop that never saves
    start, state = ckpt.load()                    # 0, None on a fresh start
    if state: model.load_state_dict(state["model"]); ...
    for step in range(start, steps):
        ...
        ckpt.maybe_save(step + 1, lambda: {"model": model.state_dict(), ...})
    ckpt.finish()

Under torchrun (dist.py) every process holds the same state, so process 0 alone writes the file and
every process resumes from it.

Run `python resume.py` for a demo: a loop killed half way and resumed ends where an
uninterrupted one does.
"""
import os
import time

import torch

import dist


class Checkpoint:
    def __init__(self, path, every_s=180.0):
        self.path, self.every_s, self.last = path, every_s, time.time()

    def load(self):
        """-> (step to start at, saved state dict or None). A file that cannot be read is an error
        naming it: deleting it restarts the stage from its beginning, with the same result."""
        if not self.path or not os.path.exists(self.path):
            return 0, None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            return int(state["step"]), state
        except Exception as e:  # noqa: BLE001 (any failure means the same: this file is unusable)
            raise RuntimeError(f"cannot resume from {self.path} ({type(e).__name__}); delete it to restart "
                               f"this stage from its beginning") from e

    def maybe_save(self, step, make_state, force=False):
        """Save {"step": step, **make_state()} if every_s seconds have passed since the last save."""
        if not self.path or not dist.is_main() or not (force or time.time() - self.last >= self.every_s):
            return False
        tmp = f"{self.path}.{os.getpid()}.tmp"             # unique: two processes never share a temp file
        torch.save({"step": step, **make_state()}, tmp)
        os.replace(tmp, self.path)
        self.last = time.time()
        return True

    def finish(self):
        if self.path and dist.is_main() and os.path.exists(self.path):
            os.remove(self.path)


def _demo():
    import tempfile

    def train(ckpt_path, stop_at=None):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.Adam([w], lr=0.1)
        g = torch.Generator().manual_seed(1)
        ckpt = Checkpoint(ckpt_path, every_s=0.0)
        start, state = ckpt.load()
        if state:
            w.data.copy_(state["w"])
            opt.load_state_dict(state["opt"])
            g.set_state(state["generator"])
        for step in range(start, 20):
            if step == stop_at:
                return None                                            # "killed"
            loss = ((w - torch.randn(3, generator=g)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.maybe_save(step + 1, lambda: {"w": w.detach().clone(), "opt": opt.state_dict(),
                                               "generator": g.get_state()})
        ckpt.finish()
        return w.detach()

    with tempfile.TemporaryDirectory() as d:
        whole = train(None)
        train(os.path.join(d, "c.pt"), stop_at=11)
        resumed = train(os.path.join(d, "c.pt"))
    print(f"uninterrupted {whole.tolist()}\nkilled at 11, resumed {resumed.tolist()}")
    assert torch.equal(whole, resumed)


if __name__ == "__main__":
    _demo()
