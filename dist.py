"""Where the tensors live and how many processes share one training run: the device (cpu, cuda, mps)
and data-parallel training with PyTorch's DistributedDataParallel (DDP), as nanoGPT's train.py does.

    python train.py --preset tiny --device auto                   # cuda if present, else mps, else cpu
    torchrun --nproc_per_node 2 train.py --preset tiny            # 2 processes on the CPU (gloo)
    torchrun --nproc_per_node 8 train.py --device cuda --set ...  # 8 GPUs (NCCL)

torchrun starts N copies of the script with RANK, WORLD_SIZE and LOCAL_RANK in their environment;
`setup` joins them into one process group. The training loops then split every batch of the
preset, which stays the *global* batch, into N equal shards:

  * every process draws the random numbers of the whole batch (clip seeds, crops, t, noise, caption
    dropout) from the same generators, so all processes hold the same generator states (one
    checkpoint resumes them all) and row i gets what it gets in a single process;
  * each process trains on its own rows only (`rows`), and renders only those clips (text, VAE and
    decoder stages; the DiT stages cut their rows out of the latent pool);
  * DDP averages the processes' gradients: the mean over N shards of their mean losses is the mean
    loss of the whole batch, so one update equals the single-process update up to float rounding
    (tests/test_ddp.py measures it);
  * process 0 alone writes checkpoints, logs and progress bars (`is_main`).

Random numbers come from CPU generators and are moved to the device (`torch.randn(..., generator=g)
.to(x)` throughout): the same seed draws the same noise on every device, and the CPU's figures are
unchanged. Run `python dist.py` to see the device `auto` picks here.
"""
import argparse
import datetime
import os
import sys

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from safeio import UsageError

DEVICES = ("cpu", "auto", "cuda", "mps")


def pick_device(name="cpu"):
    """"auto" -> cuda, else mps (Apple silicon), else cpu; a named device must exist here."""
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if has[d])
    if not has[name]:
        raise UsageError(f"--device {name}: this machine has no {name} device (torch {torch.__version__}); "
                         f"use --device cpu or auto")
    return torch.device(name)


def demo_device(prog, description):
    """The device of a concept file's demo (`python lcha.py --device auto`): parsed from the command
    line and made torch's default, so the demo's tensors and modules are created on it unchanged."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_device_arg(parser)
    try:
        device = pick_device(parser.parse_args().device)
    except UsageError as e:
        parser.error(str(e))                                                  # one line, exit code 2
    torch.set_default_device(device)
    print(f"{prog} demo on {device}")
    return device


def add_device_arg(parser, default="cpu"):
    parser.add_argument("--device", default=default, choices=DEVICES,
                        help="where the networks run: cpu (the README's figures), cuda, mps, or auto "
                             "(cuda, then mps, then cpu)")


# ----------------------------------------------------------------------------- the process group
def rank():
    return td.get_rank() if td.is_initialized() else 0


def world():
    return td.get_world_size() if td.is_initialized() else 1


def is_main():
    """Process 0 writes files, logs and progress bars; a single process is process 0."""
    return rank() == 0


def launched():
    """Started by torchrun (or any launcher that sets the variables torch.distributed reads)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device):
    """Join torchrun's process group (once) and return this process's device: with CUDA each process
    takes GPU LOCAL_RANK and NCCL carries the gradients, elsewhere gloo does. A single process
    (no torchrun) is left alone."""
    if not launched() or td.is_initialized():
        return device
    if device.type == "mps":
        raise UsageError("data-parallel training runs on cuda (NCCL) or cpu (gloo); on a Mac train in one "
                         "process (python train.py --device mps)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # ASSUMPTION: the stages that are not data-parallel (latents, search, cache, DMD, deploy, sample) run
    # in process 0 while the others wait at a barrier, so a wait may last as long as the longest stage.
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=12))
    if not is_main():
        sys.stdout = open(os.devnull, "w")        # process 0 alone logs; errors still reach stderr
    return device


def cleanup():
    if td.is_initialized():
        td.destroy_process_group()


def barrier():
    """Wait for every process (a no-op in a single process)."""
    if td.is_initialized():
        td.barrier()


# ----------------------------------------------------------------------------- sharding a batch
def rows(batch):
    """This process's rows of a global batch of `batch`: slice(r B/N, (r+1) B/N). One process: all."""
    n, r = world(), rank()
    if batch % n:
        raise ValueError(f"a batch of {batch} does not split evenly over {n} processes; run a number of "
                         f"processes that divides every batch of the preset, or change the batch with --set")
    return slice(r * batch // n, (r + 1) * batch // n)


class _GatherRows(torch.autograd.Function):
    """All processes' rows in rank order, (B/N, ...) -> (B, ...), with a gradient: each process's loss
    depends on every row, so a row's gradient is the sum over the processes' losses."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world())]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                         # (B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        td.all_reduce(grad)                                             # sum of every process's gradient
        return grad[rows(grad.shape[0])]                                # (B/N, ...) this process's rows


def gather_rows(x):
    """The whole batch from every process's rows (identity in one process); differentiable."""
    return _GatherRows.apply(x) if world() > 1 else x


def mean(x):
    """The mean of a per-process number over the processes (a logged loss: the whole batch's loss)."""
    if world() == 1:
        return x
    x = x.detach().clone()
    td.all_reduce(x)
    return x / world()


# ----------------------------------------------------------------------------- DDP
class _Step(torch.nn.Module):
    """A training step's loss as one module holding the networks it trains: DDP then sees exactly
    one forward per update, however often the loss calls a network (text.py calls its encoder twice)."""

    def __init__(self, loss_fn, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(n for n in nets if isinstance(n, torch.nn.Module))
        self.params = torch.nn.ParameterList(p for p in nets if isinstance(p, torch.nn.Parameter))  # logit scale
        self.loss_fn = loss_fn

    def forward(self, *args, **kw):
        return self.loss_fn(*args, **kw)


def data_parallel(loss_fn, *nets, unused=False):
    """loss_fn itself in one process; under torchrun the same call, run through DDP so that backward()
    averages the gradients of `nets` (modules or parameters) over the processes. Every process must
    call it, and backward its loss, step by step. unused=True when a shard may leave parameters
    without a gradient (the MoE teacher trains one expert per clip): DDP then looks for them."""
    if world() == 1:
        return loss_fn
    return DistributedDataParallel(_Step(loss_fn, nets), find_unused_parameters=unused)


if __name__ == "__main__":
    print(f"--device auto picks {pick_device('auto')} here (torch {torch.__version__}); "
          f"processes: {world()} (torchrun sets more)")
