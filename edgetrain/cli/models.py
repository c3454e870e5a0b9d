"""`edgetrain models`: the model names edgetrain can build (nothing is downloaded)."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, print_json


class Models(Verb):
    name = "models"
    help = "list the model names (torchvision's and edgetrain's own)"
    examples = ("edgetrain models", "edgetrain models 'resnet*'")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("pattern", nargs="?", default="*", help="shell-style filter")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.models import list_models

        names = list_models(args.pattern)
        if args.json:
            print_json(names)
        else:
            print("\n".join(names))
        return 0
