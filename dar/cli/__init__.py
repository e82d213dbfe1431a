"""The ``dar`` command line. One module per subcommand, each with ``add_parser(subparsers)`` that
registers it and sets ``func``; :data:`COMMANDS` lists them in help order. Every subcommand rejects
unknown options; config values are ``key=value`` overrides (``train.steps=500
model.routing.query=dynamic``), validated by type, for the commands whose module sets
``TAKES_OVERRIDES``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "distill", "sample", "eval", "info", "diagnose", "bench", "experiment", "convert_sit",
            "prepare_latents")

EXAMPLES = """examples:
  dar train                                    # DAR (static_t, c4) on the built-in Fashion-MNIST
  dar train --preset fmnist-residual --run-dir runs/residual
  dar train train.steps=500 model.routing.query=dynamic --run-dir runs/dyn
  dar sample runs/fmnist --num 80 --grid runs/grid.png
  dar sample runs/fmnist --num 10000 --out runs/samples/fmnist-sde sampler.method=sde sampler.steps=250
  dar info runs/fmnist
  dar distill --teacher runs/residual --run-dir runs/distill distill.generator_steps=4
"""


def _command_module(name: str):
    return importlib.import_module(f"dar.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dar", description="Diffusion-Adaptive Routing for diffusion transformers",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _command_module(name).add_parser(sub)
    return parser


def takes_overrides(command: str) -> bool:
    return getattr(_command_module(command.replace("-", "_")), "TAKES_OVERRIDES", False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE tokens are config overrides wherever they appear; everything else is an option.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if overrides and not takes_overrides(args.command):
        parser.error(f"`dar {args.command}` takes no KEY=VALUE overrides (got {overrides[0]})")
    from dar.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"dar {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dar {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
