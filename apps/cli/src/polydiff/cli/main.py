"""The ``polydiff`` command line: make shards, train, generate — for every installed modality.

Modalities come from the ``polydiff.modalities`` entry points (see
``polydiff.core.train.recipe``); this module never imports one by name. User errors print one
line and exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user: reported as one line with exit status 2."""


def _recipe(name: str):  # Recipe is imported lazily to keep --help fast
    from polydiff.core.train import load_recipe

    return load_recipe(name)


# --------------------------------------------------------------------------- data


def _parse_source(spec: str) -> tuple[str, str, int | None]:
    """``synthetic:NAME[:COUNT]`` -> ("synthetic", NAME, COUNT); a folder -> ("folder", path,
    None)."""
    if spec.startswith("synthetic:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise UsageError(f"--source {spec!r}: expected synthetic:NAME or synthetic:NAME:COUNT")
        count = None
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise UsageError(f"--source {spec!r}: COUNT must be a positive integer")
            count = int(parts[2])
        return "synthetic", parts[1], count
    folder = Path(spec)
    if not folder.is_dir():
        raise UsageError(f"--source {spec!r} is neither a folder nor synthetic:NAME[:COUNT]")
    return "folder", str(folder), None


def cmd_make_shards(args: argparse.Namespace) -> int:
    from polydiff.core.data import write_shards

    recipe = _recipe(args.modality)
    kind, what, count = _parse_source(args.source)
    samples = recipe.synthetic(what, count) if kind == "synthetic" else recipe.source(Path(what))
    if args.maxcount < 1:
        raise UsageError("--maxcount must be >= 1")
    summary = write_shards(
        samples,
        args.out,
        maxcount=args.maxcount,
        meta={"modality": args.modality, "source": args.source},
    )
    print(summary.report())
    if summary.written == 0:
        raise UsageError(f"no samples written from {args.source}")
    return 0


# --------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from polydiff.core.train import launch

    if not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    return launch(
        args.config,
        data=args.data,
        out=args.out,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        num_procs=args.num_procs,
        resume=args.resume,
        hostfile=args.hostfile,
    )


# --------------------------------------------------------------------------- generate


def check_generate_args(args: argparse.Namespace) -> None:
    """The checks every modality's generation shares (one clear line each)."""
    from polydiff.core import SAMPLERS

    prompts = [p for p in (args.prompt or []) if p.strip()]
    if not prompts:
        raise UsageError("no prompt given: pass --prompt TEXT (an empty prompt list is an error)")
    args.prompt = prompts
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if args.guidance is not None and not (
        math.isfinite(args.guidance) and 0 <= args.guidance <= 50
    ):
        raise UsageError(f"--guidance must be a number in [0, 50], got {args.guidance}")
    if args.num < 1:
        raise UsageError("--num must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint folder not found: {args.checkpoint}")


def cmd_generate(argv: Sequence[str]) -> int:
    from polydiff.core.train import available_modalities

    if not argv or argv[0].startswith("-"):
        names = ", ".join(available_modalities()) or "none installed"
        raise UsageError(f"usage: polydiff generate MODALITY ...; installed: {names}")
    modality, rest = argv[0], list(argv[1:])
    recipe = _recipe(modality)
    if not hasattr(recipe, "generate"):
        raise UsageError(f"modality {modality!r} cannot generate from the command line")
    parser = argparse.ArgumentParser(prog=f"polydiff generate {modality}")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--prompt", action="append", help="text prompt (repeat for several)")
    parser.add_argument("--out", required=True, type=Path, help="output file")
    parser.add_argument("--num", type=int, default=1, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--sampler", default=None, help="sampler name")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale")
    parser.add_argument("--seed", type=int, default=0)
    if hasattr(recipe, "add_generate_arguments"):
        recipe.add_generate_arguments(parser)
    args = parser.parse_args(rest)
    check_generate_args(args)
    for path in recipe.generate(args):
        print(path)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list installed modalities")
    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True
    )
    shards = data.add_parser("make-shards", help="write WebDataset shards")
    shards.add_argument("--modality", required=True)
    shards.add_argument(
        "--source", required=True, help="a folder of your files, or synthetic:NAME[:COUNT]"
    )
    shards.add_argument("--out", required=True, help="output folder")
    shards.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    train = sub.add_parser("train", help="train with the DeepSpeed launcher")
    train.add_argument("--config", required=True)
    train.add_argument("--data", default=None, help="shards (folder, brace pattern or list)")
    train.add_argument("--out", default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--checkpoint-every", type=int, default=None)
    train.add_argument("--num-procs", type=int, default=1, help="processes (per node)")
    train.add_argument("--resume", action="store_true")
    train.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for several nodes")
    sub.add_parser(
        "generate", help="polydiff generate MODALITY --prompt TEXT --out FILE", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "generate":
            return cmd_generate(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "list":
            from polydiff.core.train import available_modalities

            print("\n".join(available_modalities()) or "no modality installed")
            return 0
        if args.command == "data":
            return cmd_make_shards(args)
        return cmd_train(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        # UsageError, ConfigError, CheckpointError and unknown names are all ValueErrors.
        print(f"polydiff: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
