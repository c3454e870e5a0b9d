"""`edgetrain`: the command line. Each verb is a small class in its own module."""

from __future__ import annotations

import argparse
import sys

from edgetrain.cli.common import Verb
from edgetrain.cli.deploy import Deploy
from edgetrain.cli.devices import Devices
from edgetrain.cli.estimate import Estimate
from edgetrain.cli.export import Export
from edgetrain.cli.finetune import Finetune
from edgetrain.cli.fit import Fit
from edgetrain.cli.fleet import Fleet
from edgetrain.cli.methods import Methods
from edgetrain.cli.models import Models
from edgetrain.cli.plan import PlanVerb
from edgetrain.cli.profile import Profile
from edgetrain.errors import EdgetrainError

VERBS: list[Verb] = [
    Devices(),
    Profile(),
    Models(),
    Methods(),
    Estimate(),
    PlanVerb(),
    Fit(),
    Export(),
    Finetune(),
    Deploy(),
    Fleet(),
]


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line (what is wrong, and where the help is), not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edgetrain", description="Fit CNN training into small GPUs and Jetson boards.")
    parser.add_argument(
        "--profiles", metavar="DIR", action="append", default=[], help="also read device profiles from DIR"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help, epilog=verb.epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        verb.add_arguments(p)
        p.set_defaults(_verb=verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and a non-zero exit for any user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # as given: `fit --nproc` starts its ranks with the same command line
    except SystemExit as e:  # --help (0) or a usage error, already printed in one line (2)
        return int(e.code or 0)
    from edgetrain.devices.store import add_profile_dir

    try:
        for d in args.profiles:
            add_profile_dir(d)
        return args._verb.run(args)
    except EdgetrainError as e:
        print(f"edgetrain {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"edgetrain {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
