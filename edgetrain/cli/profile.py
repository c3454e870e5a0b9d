"""`edgetrain profile`: detect and calibrate this machine, print and optionally save it."""

from __future__ import annotations

import argparse
import sys

from edgetrain.cli.common import Verb, add_json, print_json


class Profile(Verb):
    name = "profile"
    help = "detect and calibrate this machine into a device profile"
    examples = ("edgetrain profile --quick", "edgetrain profile --save my-board", "edgetrain profile --quick --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="calibrate in seconds (probe 1 GiB, small kernels)")
        p.add_argument("--save", metavar="NAME", help="save as NAME in the user profile directory")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.devices.store import save_profile
        from edgetrain.train.calibrate import profile_device

        prof = profile_device(name=args.save, quick=args.quick)
        if args.save:
            path = save_profile(prof, args.save)
            print(f"saved {path}", file=sys.stderr)
        if args.json:
            print_json(prof.to_dict())
        else:
            print(prof.to_yaml(), end="")
        return 0
