from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgetrain.core.step import make_optimizer, train_step
from edgetrain.errors import BudgetError, ConfigError, EdgeOOMError
from edgetrain.memory.allocator import CachingAllocatorModel, cuda_round
from edgetrain.memory.guard import BudgetGuard
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.validate import compare_case

MiB = 2**20


@pytest.mark.parametrize("model,batch,size", [("cifar_resnet20", 16, 32), ("resnet18", 8, 64), ("mobilenet_v2", 8, 64)])
def test_prediction_matches_measurement(model, batch, size):
    r = compare_case(model, batch, size)
    assert abs(r["tensor_err"]) <= 0.01, r
    assert abs(r["process_err"]) <= 0.10, {k: v for k, v in r.items()}


def test_estimate_resnet18_b128_224_is_fast_and_allocates_nothing():
    code = (
        "import time, json; from edgetrain.planning.estimate import estimate;"
        "from edgetrain.models import create_model; m = create_model('resnet18'); t = time.perf_counter();"
        "e = estimate(m, (3, 224, 224), 128); dt = time.perf_counter() - t; from edgetrain.memory.process import peak_rss_bytes;"
        "print(json.dumps([dt, e.predicted.peak_total_bytes, peak_rss_bytes()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds, predicted, maxrss = json.loads(out.stdout)
    assert seconds < 5
    assert predicted > 2500 * MiB
    assert maxrss < 1500 * MiB  # the torch import alone is ~700 MiB here: the activations were never allocated


def test_guard_plain_resnet18_does_not_fit_gtx750_but_runs_under_a_large_budget():
    model = create_model("resnet18")
    est = estimate(model, (3, 224, 224), 64, device="gtx750-1gb")
    assert est.fits is False
    x, y = __import__("torch").randn(64, 3, 224, 224), __import__("torch").randint(0, 10, (64,))
    opt = make_optimizer("sgd", model.parameters())
    with pytest.raises(EdgeOOMError, match=r"budget 724.0 MiB"):
        with BudgetGuard(est.budget_bytes, model=model, optimizer=opt, tensors=(x, y), round_to=512):
            train_step(model, x[:64], y[:64], opt)
    opt.zero_grad(set_to_none=True)
    with BudgetGuard(4 * 2**30, model=model, optimizer=opt, tensors=(x, y)) as g:
        train_step(model, x, y, opt)
    assert est.predicted.peak_total_bytes * 0.9 < g.report().peak_bytes <= 4 * 2**30


def test_cuda_allocator_model():
    assert cuda_round(1) == 512 and cuda_round(513) == 1024 and cuda_round(4096) == 4096
    a = CachingAllocatorModel()
    a.malloc(1, 1000)  # small pool: one 2 MiB segment
    assert a.reserved == 2 * MiB
    a.malloc(2, 5 * MiB)  # large pool: 20 MiB segment
    assert a.reserved == 22 * MiB
    a.free(2)
    a.malloc(3, 8 * MiB)  # reuses the freed 20 MiB segment
    assert a.reserved == 22 * MiB
    a.malloc(4, 30 * MiB)  # > 10 MiB: its own segment rounded to 2 MiB
    assert a.reserved == 52 * MiB and a.peak_reserved == 52 * MiB


def test_estimate_adds_allocator_and_overheads_for_a_device():
    e = estimate(create_model("cifar_resnet8"), (3, 32, 32), 32, device="jetson-nano")
    p = e.predicted
    assert p.peak_device_bytes >= p.peak_total_bytes + 32 * MiB  # rounding + workspace
    assert p.peak_process_bytes == p.peak_device_bytes + 1100 * MiB  # context + framework
    assert e.fits is True


def test_bad_inputs_get_one_clear_line(tmp_path):
    m = create_model("vgg11_bn")
    with pytest.raises(ConfigError, match="batch size must be a positive integer"):
        estimate(m, (3, 64, 64), 0)
    with pytest.raises(ConfigError, match=r"input size 16 is too small for vgg11_bn.*-s 32"):
        estimate(m, (3, 16, 16), 2, name="vgg11_bn")
    from edgetrain.devices.store import get_device, save_profile

    tiny = save_profile(get_device("gtx750-1gb").replace(name="tiny", usable_memory_bytes=32 * MiB), "tiny", tmp_path)
    with pytest.raises(BudgetError, match="parameters alone take 43 MiB, more than tiny's budget of 32 MiB"):
        estimate(create_model("resnet18"), (3, 32, 32), 1, device=str(tiny))


@pytest.mark.parametrize("methods", [
    ["microbatch:micro_batches=16"],
    ["microbatch:micro_batches=8", "step-in-backward"],
    ["microbatch:micro_batches=4", "compress:bits=2"],
    ["microbatch:micro_batches=8", "checkpoint", "precision:dtype=bf16"],
    ["microbatch:micro_batches=4", "precision:dtype=fp16", "optim-state:dtype=int8"],
])  # fmt: skip
def test_many_micro_batches_are_predicted_from_two_or_three_to_the_byte(methods):
    """The shortcut (two micro-batches, three with the step in backward, on a view of the whole input) against every micro-batch run."""
    from edgetrain.core.step import StepSpec
    from edgetrain.devices.store import get_device
    from edgetrain.memory.predict import fake_step, fewer_micro_batches, predict_step, summarize
    from edgetrain.methods.base import prepare

    model, _, settings = prepare(create_model("cifar_resnet20"), methods, shapes_only=True)
    spec = StepSpec((3, 32, 32), 64, 10, "sgd", settings)
    assert fewer_micro_batches(spec)[0].settings.micro_batches == (3 if "step-in-backward" in methods else 2)
    full = fake_step(model, spec)
    for device in ("gtx750-1gb", "jetson-nano"):  # the CUDA allocator's replay and the CPU-side one
        report, predicted = predict_step(model, spec, get_device(device))
        assert (report.peak_bytes, report.peak_by_category) == (full.peak_bytes, full.peak_by_category)
        whole = summarize(full, get_device(device))
        assert (predicted.peak_device_bytes, predicted.peak_process_bytes) == (
            whole.peak_device_bytes, whole.peak_process_bytes)  # fmt: skip


def test_the_malloc_policy_is_public_and_what_the_env_variable_sets():
    """`edgetrain.pin_malloc_policy()` for users' own scripts; glibc's MALLOC_MMAP_THRESHOLD_ sets the
    same policy from the environment: 100 MiB of freed 256 KiB tensors go back to the OS with it,
    and stay in glibc's heap without it (after one 16 MiB free raised the dynamic threshold)."""
    import os

    import edgetrain

    assert edgetrain.pin_malloc_policy() is True  # glibc: the policy is in force
    code = ("import torch, psutil, gc; a = torch.empty(2**22).fill_(1); del a;"
            "xs = [torch.empty(2**16).fill_(1) for _ in range(400)]; keep = torch.empty(16).fill_(1);"
            "del xs; gc.collect(); print(psutil.Process().memory_info().rss)")  # fmt: skip
    rss = {}
    for pinned in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env.update({"MALLOC_MMAP_THRESHOLD_": "131072"} if pinned else {})
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        rss[pinned] = int(out.stdout.strip())
    assert rss[False] - rss[True] > 80 * MiB, rss
