"""`edgetrain devices`: the known device profiles."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, mib, print_json, table
from edgetrain.devices.store import get_device, list_devices


class Devices(Verb):
    name = "devices"
    help = "list the known device profiles (built-in and calibrated)"
    examples = ("edgetrain devices", "edgetrain devices 'jetson*' --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'jetson*'")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        profiles = [get_device(n) for n in list_devices(args.pattern)]
        if args.json:
            print_json([{**p.to_dict(), "path": p.path} for p in profiles])
            return 0
        rows = [
            [p.name, p.kind, mib(p.total_memory_bytes), mib(p.usable_memory_bytes), p.fp32_gflops,
             p.source, p.reference[:48]]
            for p in profiles
        ]  # fmt: skip
        table(
            "device profiles", ["name", "kind", "total MiB", "usable MiB", "fp32 GFLOP/s", "source", "reference"], rows
        )
        return 0
