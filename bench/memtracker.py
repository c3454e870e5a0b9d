"""What each memory figure counts: edgetrain's tracker, torch's MemTracker and the CPU allocator.

    .venv/bin/python bench/memtracker.py        # about 2 minutes; writes bench/memtracker.txt

One real training step (SGD with momentum, after a warm-up step) per row, measured three ways in
the same process: edgetrain's tensor level (live storages, the budget guard's count) and its
within-op figure (plus what an op holds inside itself: oneDNN's copies of a convolution's
operands, BatchNorm backward's buffer); torch's MemTracker (torch.distributed._tools); and the
CPU allocator itself (torch.profiler's memory events: every allocation, inner ones included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.profiler import ProfilerActivity, profile

from edgetrain.core.step import make_optimizer, train_step
from edgetrain.memory.allocator import pin_malloc_policy
from edgetrain.memory.guard import BudgetGuard
from edgetrain.methods.base import prepare
from edgetrain.models import create_model

MiB = 2**20
CASES = [("resnet18", 64, 128, []), ("resnet18", 64, 128, ["checkpoint"]), ("resnet18", 64, 128, ["compress:bits=4"]),
         ("mobilenet_v2", 16, 224, []), ("mobilenet_v2", 16, 224, ["checkpoint"]), ("vgg11_bn", 8, 224, [])]  # fmt: skip


def allocator_peak(step) -> int:
    """Peak of the CPU allocator's live bytes during `step()`, above what was live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def row(name: str, batch: int, size: int, methods: list[str]) -> dict:
    torch.manual_seed(0)
    model, _, settings = prepare(create_model(name, 10), methods, shapes_only=True)
    opt = make_optimizer("sgd", model.parameters())
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    train_step(model, x, y, opt, settings)  # warm-up: momentum exists
    with BudgetGuard(None, model, opt, (x, y)) as g:
        before = g.live_bytes
        train_step(model, x, y, opt, settings, tracker=g)
    ours = g.report()
    mt = MemTracker()
    mt.track_external(model, opt, x, y)
    with mt:
        train_step(model, x, y, opt, settings)
    snap = mt.get_tracker_snapshot("peak")
    theirs = snap[next(iter(snap))]["Total"]
    alloc = before + allocator_peak(lambda: train_step(model, x, y, opt, settings))
    return {"case": f"{name} b{batch} {size}px {'+'.join(methods) or 'plain'}", "tensor": ours.peak_bytes,
            "memtracker": theirs, "within_op": ours.within_op_peak_bytes, "within_op_at": ours.within_op,
            "allocator": alloc}  # fmt: skip


def main() -> None:
    pin_malloc_policy()
    lines = [f"{'case':<36} {'edgetrain tensors':>18} {'MemTracker':>11} {'diff':>7} {'edgetrain within-op':>20} "
             f"{'CPU allocator':>14} {'diff':>7}  peak op"]  # fmt: skip
    print(lines[0], flush=True)
    for case in CASES:
        r = row(*case)
        line = (f"{r['case']:<36} {r['tensor'] / MiB:>14.1f} MiB {r['memtracker'] / MiB:>7.1f} MiB "
                f"{r['memtracker'] / r['tensor'] - 1:>+7.2%} {r['within_op'] / MiB:>16.1f} MiB "
                f"{r['allocator'] / MiB:>10.1f} MiB {r['within_op'] / r['allocator'] - 1:>+7.2%}  {r['within_op_at']}")  # fmt: skip
        print(line, flush=True)
        lines.append(line)
    lines.append("tensors: live storages (edgetrain and MemTracker count the same ones, the input batch included);")
    lines.append(
        "within-op: plus what the op running holds inside itself; CPU allocator: torch.profiler's memory events."
    )
    (Path(__file__).parent / "memtracker.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
