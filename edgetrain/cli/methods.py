"""`edgetrain methods`: the registered memory-saving methods and their options."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, print_json, table


class Methods(Verb):
    name = "methods"
    help = "list the registered memory-saving methods and their options"
    examples = ("edgetrain methods", "edgetrain methods --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.methods.base import describe_methods

        rows = describe_methods()
        if args.json:
            print_json(rows)
            return 0
        opts = lambda o: ", ".join(f"{k}={v}" for k, v in o.items()) or "-"
        table("methods (use as --method name:key=value,...; the planner weighs a method up to --allow LEVEL)",
              ["name", "risk", "level", "options", "what"],
              [[r["name"], r["risk"], r["level"], opts(r["options"]), r["help"]] for r in rows])  # fmt: skip
        return 0
