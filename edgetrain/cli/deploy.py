"""`edgetrain deploy`: ship edgetrain (and artifacts) to a board and start the run there."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from edgetrain.cli.common import Verb, add_json, print_json


class Deploy(Verb):
    name = "deploy"
    help = "build the image for a board, ship it over ssh (or a registry), copy artifacts, start and tail the run"
    examples = (
        "edgetrain deploy --device jetson-orin-nano --host me@board --artifacts art --dry-run",
        "edgetrain deploy --device jetson-nano --host me@nano --artifacts art            # runtime image",
        "edgetrain deploy --device jetson-orin-nano --host me@board --image full --jetpack 6",
        "edgetrain deploy --device jetson-xavier-nx --host me@nx --registry registry.local:5000",
        "edgetrain deploy --device jetson-nano --host me@nano --artifacts art --superlink 192.168.1.10:9092 --dry-run",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", "-d", required=True, help="the board's device profile")
        p.add_argument(
            "--host", required=True, metavar="USER@HOST", help="the board, reachable by ssh without a password"
        )
        p.add_argument("--image", choices=("runtime", "full"), default="runtime",
                       help="runtime: onnxruntime fine-tuning, no torch; full: edgetrain with JetPack's torch")  # fmt: skip
        p.add_argument(
            "--artifacts", metavar="DIR", help="exported artifacts to copy and fine-tune (`edgetrain export`)"
        )
        p.add_argument("--data", default="digits", help="data for the run on the board (a path inside the work dir)")
        p.add_argument("--jetpack", type=int, help="the board's JetPack major, when the profile's is not the board's")
        p.add_argument(
            "--registry", help="push to and pull from this registry instead of docker save | ssh docker load"
        )
        p.add_argument("--superlink", metavar="HOST:PORT",
                       help="join the fleet served there (`edgetrain fleet serve`) instead of fine-tuning alone")  # fmt: skip
        p.add_argument("--dry-run", action="store_true", help="print the commands, in order, and run nothing")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.deploy import execute, plan_steps, preflight, target_for
        from edgetrain.devices.store import get_device
        from edgetrain.errors import ConfigError

        if args.artifacts and not (Path(args.artifacts) / "manifest.json").is_file():
            raise ConfigError(f"--artifacts {args.artifacts}: no manifest.json there; write it with `edgetrain export`")
        target = target_for(get_device(args.device), args.image, args.jetpack)
        host_platform = "linux/arm64" if platform.machine() in ("aarch64", "arm64") else "linux/amd64"
        steps = plan_steps(target, args.host, args.artifacts, args.data, args.registry, host_platform, args.superlink)
        if args.dry_run:
            if args.json:
                print_json(
                    {"target": target.__dict__, "steps": [{"name": s.name, "argv": list(s.argv)} for s in steps]}
                )
            else:
                print(
                    f"# {target.device}: {target.image} image {target.tag} for {target.platform} ({target.dockerfile})"
                )
                for s in steps:
                    print(s.shell())
            return 0
        found = preflight(target, args.host, args.registry)
        print(f"{args.host}: {', '.join(f'{k} {v}' for k, v in found.items())}")
        execute(steps, Path.cwd())
        return 0
