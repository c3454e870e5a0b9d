"""`edgetrain devices`: the known device profiles."""

from __future__ import annotations

import argparse
import sys

from edgetrain.cli.common import Verb, add_json, mib, print_json, table
from edgetrain.devices.store import get_device, list_devices
from edgetrain.errors import EdgetrainError, UnknownNameError


class Devices(Verb):
    name = "devices"
    help = "list the known device profiles (built-in and calibrated)"
    examples = ("edgetrain devices", "edgetrain devices 'jetson*' --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'jetson*'")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        names = list_devices(args.pattern)
        if not names:
            if any(c in args.pattern for c in "*?["):
                raise EdgetrainError(f"no device profile matches '{args.pattern}': `edgetrain devices` lists them all")
            raise UnknownNameError("device", args.pattern, list_devices())
        profiles = []
        for n in names:  # one malformed file does not hide the others: it is named on stderr
            try:
                profiles.append(get_device(n))
            except EdgetrainError as e:
                print(f"edgetrain devices: skipped a bad profile: {e}", file=sys.stderr)
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
