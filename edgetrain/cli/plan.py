"""`edgetrain plan`: the configuration that fits a device, the candidates weighed, and why."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, mib, print_json, table
from edgetrain.cli.estimate import add_model_args, host_line
from edgetrain.levels import CHANGE_LEVELS, DEFAULT_ALLOW


class PlanVerb(Verb):
    name = "plan"
    help = "choose per-layer methods that fit a device at the least cost (predicted; --verify measures)"
    examples = (
        "edgetrain plan --device gtx750-1gb --model resnet18 -b 64 -s 224",
        "edgetrain plan -d jetson-nano -m mobilenet_v2 -b 128 -s 224 --prefer accuracy --out plan.yaml",
        "edgetrain plan -d gtx750-1gb -m resnet18 -b 32 -s 224 --plot plan.png --json",
        "edgetrain plan -d gtx750-1gb -m resnet18 -b 64 -s 224 --frontier frontier.png",
        "edgetrain plan -d jetson-nano -m resnet18 -b 16 -s 64 --verify",
        "edgetrain plan -d gtx750-1gb -m vgg11_bn -b 32 -s 224 --allow architecture",
        "edgetrain plan -d jetson-nano -m resnet18 -b 64 -s 128 --method tucker2:ratio=0.5 --method partial",
        "edgetrain fit -d jetson-nano --plan plan.yaml   # train with it",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_args(p)
        p.add_argument("--device", "-d", default="gtx750-1gb", help="device profile name or YAML path")
        p.add_argument("--prefer", choices=("speed", "accuracy"), default="speed",
                       help="weigh step time (speed) or accuracy risk (accuracy) first")  # fmt: skip
        p.add_argument("--allow", choices=CHANGE_LEVELS, default=DEFAULT_ALLOW,
                       help="how much the plan may change training: exact levers only, plus lossy ones (default), "
                       "plus changes to the layers (low-rank)")  # fmt: skip
        p.add_argument("--method", action="append", default=[], metavar="SPEC",
                       help="a low-rank method to apply first (tucker2, cp, partial); the rest is planned")  # fmt: skip
        p.add_argument("--out", "-o", metavar="FILE", help="write the plan (YAML, or JSON for *.json)")
        p.add_argument("--plot", metavar="PNG", help="memory by category: plain vs the plan")
        p.add_argument("--frontier", metavar="PNG",
                       help="the candidate plans' peak against step time, with the Pareto front (also in --json)")  # fmt: skip
        p.add_argument("--verify", action="store_true", help="run one real step under the device's budget guard")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.models import create_model
        from edgetrain.planning import plan_for
        from edgetrain.train.calibrate import resolve_profile

        model = create_model(args.model, args.num_classes)
        shape = (args.channels, args.input_size, args.input_size)
        plan = plan_for(model, shape, args.batch_size, resolve_profile(args.device), args.optimizer, args.prefer, args.model,
                        args.num_classes, methods=args.method, allow=args.allow, frontier=bool(args.frontier))  # fmt: skip
        checked = verify(plan, args) if args.verify else None
        if args.out:
            plan.save(args.out)
        if args.plot:
            plot_plan(plan, args.plot)
        if args.frontier:
            _save(frontier_figure(plan), args.frontier)
        if args.json:
            print_json({**plan.to_dict(), "levers": plan.choices.levers(), "host_check": checked})
        else:
            _print(plan, checked, args)
        return 0


def verify(plan, args: argparse.Namespace) -> dict:
    """One real training step with the plan applied, in a fresh process on this machine, under the
    device's guard; beside it, the same step predicted for this machine (train/validate.host_check)."""
    import torch

    from edgetrain.devices.store import get_device
    from edgetrain.memory.guard import tensor_budget
    from edgetrain.models import create_model
    from edgetrain.planning.search import estimate_plan
    from edgetrain.train.calibrate import resolve_profile
    from edgetrain.train.validate import host_check

    profile = get_device(args.device)
    cuda = profile.kind != "cpu" and torch.cuda.is_available()
    req = {"model": args.model, "num_classes": args.num_classes, "input_shape": plan.request.input_shape,
           "batch_size": plan.request.batch_size, "optimizer": plan.request.optimizer, "plan": plan.to_dict(),
           "budget": tensor_budget(profile), "cuda": cuda}  # fmt: skip
    model = create_model(args.model, args.num_classes)
    host = plan.predicted if cuda else estimate_plan(model, plan, plan.request, resolve_profile("cpu")).predicted
    return host_check(req, host)


def plan_figure(plan):
    """Stacked bars of the predicted tensor peak by category, plain next to the chosen plan, each
    with its device-level peak marked; the budget is compared with the device level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgetrain.memory.plot import COLORS, MIB, budget_lines

    base = plan.candidates[0]  # the model as given (plain, or with the low-rank methods the user named)
    bars = [(base["plan"], base["peak_by_category"], base.get("peak_device_bytes")),
            ("plan: " + plan.summary(), plan.predicted.peak_by_category, plan.predicted.peak_device_bytes)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = 0.0
    for i, (_, cats, device) in enumerate(bars):
        bottom = 0.0
        for cat, v in cats.items():
            ax.bar(i, v / MIB, bottom=bottom, width=0.6, color=COLORS[cat], label=cat if i == 0 else None)
            bottom += v / MIB
        if device:
            ax.hlines(device / MIB, i - 0.38, i + 0.38, color="#444444", lw=2, ls=":",
                      label="device level (allocator model)" if i == 0 else None)  # fmt: skip
            ax.annotate(f"device level {device / MIB:,.0f} MiB", (i, device / MIB), fontsize=8, ha="center",
                        va="bottom", xytext=(0, 2), textcoords="offset points")  # fmt: skip
        top = max(top, bottom, (device or 0) / MIB)
    chosen = plan.predicted.peak_device_bytes
    ax.set_ylim(0, budget_lines(ax, chosen, plan.request.budget_bytes, top, draw_device=False))
    ax.set_xticks(range(len(bars)), [label[:40] for label, _, _ in bars], fontsize=8)
    ax.set_ylabel("MiB at the step's peak (tensors, by category)")
    ax.set_title(
        f"{plan.request.model} b{plan.request.batch_size} {plan.request.input_shape[-1]}px on {plan.request.device}"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def frontier_figure(plan):
    """The candidate plans' predicted device peak against their predicted step time: the Pareto
    front joined and labelled, the budget line, plain and the chosen plan marked; the top axis
    gives the peak as a ratio to plain's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgetrain.memory.plot import MIB

    pts, budget = plan.frontier, plan.request.budget_bytes / MIB
    plain = next((p["peak_device_bytes"] for p in pts if p["plan"] == "plain"), None)
    plain = plain or plan.candidates[0].get("peak_device_bytes") or max(p["peak_device_bytes"] for p in pts)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    rest = [p for p in pts if not p["front"] and not p.get("chosen")]
    ax.scatter([p["peak_device_bytes"] / MIB for p in rest], [p["time_factor"] for p in rest], s=14,
               color="#bbbbbb", label="other plans (modelled)")  # fmt: skip
    front = sorted((p for p in pts if p["front"]), key=lambda p: p["peak_device_bytes"])
    ax.plot([p["peak_device_bytes"] / MIB for p in front], [p["time_factor"] for p in front], "o-", ms=5,
            color="#1f77b4", label="Pareto front (modelled)")  # fmt: skip
    for i, p in enumerate(front):  # labels alternate above and below the line
        ax.annotate(_short(p["plan"]), (p["peak_device_bytes"] / MIB, p["time_factor"]), fontsize=7,
                    xytext=(4, 9 if i % 2 else -13), textcoords="offset points", color="#1f4f7f", rotation=20)  # fmt: skip
    for p in (p for p in pts if p.get("chosen")):
        ax.scatter([p["peak_device_bytes"] / MIB], [p["time_factor"]], marker="*", s=220, color="#d62728",
                   zorder=5, label=f"chosen: {_short(p['plan'], 40)} (exact estimate)")  # fmt: skip
    ax.axvline(budget, color="#d62728", ls="--", lw=1.2, label=f"budget {budget:,.0f} MiB")
    ax.set_xlabel("predicted peak at the device level (MiB)")
    ax.set_ylabel("predicted step time (x plain)")
    top = ax.secondary_xaxis("top", functions=(lambda x: x * MIB / plain, lambda r: r * plain / MIB))
    top.set_xlabel("peak (x plain)")
    r = plan.request
    ax.set_title(f"{r.model} b{r.batch_size} {r.input_shape[-1]}px on {r.device}: memory against time "
                 f"(--allow {r.allow})", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", frameon=True)
    fig.tight_layout()
    return fig


def _short(plan: str, n: int = 34) -> str:
    """A plan's summary cut for a label: methods abbreviated, at most `n` characters."""
    for long, short in (("microbatch:micro_batches=", "mb"), ("compress:bits=", "c"), ("checkpoint", "ckpt"),
                        ("step-in-backward", "sib"), ("precision:dtype=", ""), ("tucker2:ratio=", "uv"),
                        ("optim-state:dtype=", "state-")):  # fmt: skip
        plan = plan.replace(long, short)
    return plan if len(plan) <= n else plan[: n - 1] + "…"


def plot_plan(plan, path: str) -> None:
    """`plan_figure` written as a PNG."""
    _save(plan_figure(plan), path)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(plan, checked: dict | None, args: argparse.Namespace) -> None:
    rows = []
    for r in plan.candidates:
        peak = mib(r["peak_device_bytes"]) if r.get("peak_device_bytes") else "-"
        over = f"{r['overhead']:.2f}x" if r.get("overhead") else "-"
        fits = {True: "yes", False: "no", None: "not checked"}[r["fits"]]
        rows.append(["*" if r.get("chosen") else "", r["plan"][:70], peak, over, r.get("risk", "-"), fits])
    head = f"{plan.request.model} b{plan.request.batch_size} {plan.request.input_shape[-1]}px {plan.request.optimizer} on {plan.request.device}"
    table(f"{head}: budget {mib(plan.request.budget_bytes)} (prefer {args.prefer})",
          ["", "candidate", "peak (device)", "time", "risk", "fits"], rows)  # fmt: skip
    print(f"chosen: {plan.summary()}  predicted {mib(plan.predicted.peak_device_bytes)}, "
          f"step time {plan.overhead:.2f}x plain")  # fmt: skip
    for reason in plan.reasons:
        print(f"  - {reason}")
    risky = [
        f"{lv['method']} ({lv['level']}, risk {lv['risk']})" for lv in plan.choices.levers() if lv["level"] != "exact"
    ]
    if risky:
        print(f"  levers that change training: {', '.join(risky)}")
    if any(r["fits"] is None for r in plan.candidates):
        print("  (not checked: costlier candidates modelled to fit; only the chosen one is estimated exactly)")
    if checked:
        print(f"verified: one real step under the {plan.request.device} guard held {mib(checked['host_measured_tensor_bytes'])} "
              f"of tensors, {checked['host_tensor_error']:+.2%} from the prediction")  # fmt: skip
        print(host_line(checked))
    if args.out:
        print(f"plan written to {args.out}: train with `{fit_command(plan, args.out)}`")


def fit_command(plan, path: str) -> str:
    """The complete `fit` command for a plan file (fit also reads these from the file)."""
    opt = f" --optimizer {plan.request.optimizer}" if plan.request.optimizer != "sgd" else ""
    return (f"edgetrain fit --device {plan.request.device} --model {plan.request.model} -b {plan.request.batch_size} "
            f"-s {plan.request.input_shape[-1]}{opt} --plan {path}")  # fmt: skip
