"""One run in several processes: DDP under torchrun (gloo on CPU, nccl on CUDA).

`edgetrain fit --nproc N` starts torchrun with N ranks of the same `fit`. Every rank reads the
same batches in the same order and trains on its slice (B/N images), DDP averages the gradients,
so N processes at B/N take the same steps as one at B (without BatchNorm, whose statistics stay
per rank). Every rank applies the same plan, planned for its B/N; rank 0 alone writes
checkpoints and reports. The loss is averaged over ranks, so every rank takes the same
decisions (divergence, recovery).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.methods.base import handler_for, spec_of

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a dead rank stops the others after this at most


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from torchrun's environment (one process when there is none)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start(w: World, cuda: bool) -> torch.device:
    """Join the process group; the device this rank trains on."""
    if w.size == 1:
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(w.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return torch.device(f"cuda:{w.local_rank}" if cuda else "cpu")


def barrier(w: World) -> None:
    if w.size > 1:
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, w: World) -> int:
    """Each rank's share of the batch; the batch must split evenly."""
    if batch_size % w.size:
        raise ConfigError(f"--batch-size {batch_size} does not split over --nproc {w.size} processes: "
                          f"give a multiple of {w.size}")  # fmt: skip
    return batch_size // w.size


def check_methods(configs, w: World) -> None:
    """A method whose backward DDP cannot follow is refused in one line."""
    if w.size == 1:
        return
    for c in configs:
        if not handler_for(c).replicas_ok:
            raise ConfigError(f"method {spec_of(c)} cannot run under DDP (--nproc {w.size}): its backward updates "
                              "or recomputes outside the gradient hooks DDP averages with; drop it or use --nproc 1")  # fmt: skip


def wrap(model: nn.Module, w: World, device: torch.device) -> nn.Module:
    """DDP over `model` (gradients as views into its buckets: no second copy of them)."""
    if w.size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def shard(x: torch.Tensor, w: World) -> torch.Tensor:
    """This rank's slice of a batch (N, ...) -> (N/size, ...)."""
    return x if w.size == 1 else x.tensor_split(w.size)[w.rank]


def mean_over_ranks(value: torch.Tensor, w: World) -> torch.Tensor:
    if w.size == 1:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / w.size


def usable_processes(cuda: bool) -> int:
    return (
        torch.cuda.device_count()
        if cuda
        else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def launch(argv: list[str], nproc: int, cuda: bool) -> int:
    """Run `edgetrain <argv>` as `nproc` ranks under torchrun; its exit code."""
    have = usable_processes(cuda)
    if nproc > have:
        what = "GPUs" if cuda else "CPU cores"
        raise ConfigError(f"--nproc {nproc} is more than this machine can run ({have} {what}): give at most {have}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "edgetrain.cli.main", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, have // nproc)))}
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        return 130


def default_out() -> str:
    """runs/<date-time> (-2, -3, ... when taken): a run's directory when none is given; under
    --nproc chosen once, before the ranks start, so that all of them use it."""
    base, k = time.strftime("runs/%Y%m%d-%H%M%S"), 2
    out = base
    while os.path.exists(out):
        out, k = f"{base}-{k}", k + 1
    return out
