"""The ``polydiff`` command line: make shards, train, generate — for every installed modality.

Modalities come from the ``polydiff.modalities`` entry points (see
``polydiff.core.modality``); this module never imports one by name. User errors print one
line and exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user: reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _modality(name: str):  # imported lazily to keep --help fast
    from polydiff.core.modality import load_modality

    return load_modality(name)


def _version() -> str:
    from polydiff.core.provenance import polydiff_version

    return polydiff_version()


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

    modality = _modality(args.modality)
    kind, what, count = _parse_source(args.source)
    samples = (
        modality.synthetic(what, count) if kind == "synthetic" else modality.source(Path(what))
    )
    if args.maxcount < 1:
        raise UsageError("--maxcount must be >= 1")
    summary = write_shards(
        samples,
        args.out,
        maxcount=args.maxcount,
        meta={"modality": args.modality, "source": args.source},
        overwrite=args.overwrite,
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


def generate_parser(modality: type) -> argparse.ArgumentParser:
    """``polydiff generate MODALITY``'s options: the shared ones, then the modality's own."""
    from polydiff.core import SAMPLERS
    from polydiff.core.modality import DTYPES

    suffixes = ", ".join(modality.output_suffixes)
    parser = _Parser(
        prog=f"polydiff generate {modality.name}",
        description=f"Generate {modality.name} outputs from prompts ({suffixes}); each file "
        "records how it was made (embedded where the format allows, and a sidecar JSON).",
    )
    add = parser.add_argument
    add("--prompt", action="append", help="text prompt (repeat for several)")
    add("--out", required=True, type=Path,
        help=f"output file ({suffixes}); with several outputs FILE_0, FILE_1, ... in prompt "
        "order, --num per prompt")  # fmt: skip
    add("--checkpoint", default=None, help="checkpoint folder (default: the bundled model)")
    add("--negative-prompt", default=None, help="guidance pushes away from this prompt")
    add("--num", type=int, default=1, help="outputs per prompt (default: %(default)s)")
    add("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    add("--sampler", default=None, metavar="SAMPLER",
        help=f"one of {', '.join(SAMPLERS)} (default: the checkpoint's)")  # fmt: skip
    add("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    add("--seed", type=int, default=0, help="seeds the noise: same seed, same output (default: 0)")
    add(
        "--batch-size",
        type=int,
        default=None,
        help="outputs per sampling batch (default: the modality's)",
    )
    add("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    add("--dtype", default="float32", choices=tuple(DTYPES),
        help="precision of the model and the text encoder (default: float32)")  # fmt: skip
    add("--timesteps", type=_timesteps, default=None, metavar="T1,T2,...",
        help="the grid's model times, decreasing (default: a grid stored by tune-steps for "
        "the sampler and steps, else the schedule's spacing)")  # fmt: skip
    for option in modality.generate_options:
        flag = f"--{option.name.replace('_', '-')}"
        if option.type is bool:  # a switch: given means True
            add(flag, action="store_const", const=True, default=option.default, help=option.help)
        else:
            add(flag, type=option.type, default=option.default, help=option.help)
    return parser


_NOT_OPTIONS = ("prompts", "options", "progress")


def _timesteps(text: str) -> tuple[float, ...]:
    """``"999,700,400,100"`` -> (999.0, 700.0, 400.0, 100.0) (the request checks the rest)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


# --------------------------------------------------------------------------- tune-steps


def cmd_tune_steps(args: argparse.Namespace) -> int:
    from polydiff.core.modality import GenerationRequest, RequestError, tune_steps

    prompts = [p for p in (args.prompt or []) if p.strip()]
    request = GenerationRequest.of(
        prompts,
        checkpoint=args.checkpoint,
        num=args.num,
        seed=args.seed,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        grid = tune_steps(request, args.sampler, args.nfe, teacher_steps=args.teacher_steps)
    except RequestError as e:
        raise UsageError(f"--{e.option.replace('_', '-')}: {e}") from e
    ratio = grid.error / grid.default_error if grid.default_error > 0 else float("nan")
    times = ", ".join(f"{t:.1f}" for t in grid.timesteps)
    print(
        f"{grid.sampler} at NFE {grid.nfe}: error {grid.error:.3g} vs the default grid's "
        f"{grid.default_error:.3g} ({ratio:.2f}x), tuning cost {grid.model_evaluations} "
        f"model evaluations per sample\ntimesteps: {times}\n"
        f"wrote {Path(args.checkpoint) / 'grids.json'}"
    )
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    from polydiff.core.modality import GenerationRequest, RequestError, generate_files
    from polydiff.core.modality import available_modalities as installed

    names = ", ".join(installed()) or "none installed"
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: polydiff generate MODALITY --prompt TEXT --out FILE [options]\n"
              f"modalities: {names}\n"
              f"options of one: polydiff generate MODALITY --help")  # fmt: skip
        return 0
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"usage: polydiff generate MODALITY ...; installed: {names}")
    modality = _modality(argv[0])
    args = generate_parser(modality).parse_args(list(argv[1:]))
    # Every request field is an option of the same name (--negative-prompt: negative_prompt).
    shared = [f.name for f in fields(GenerationRequest) if f.name not in _NOT_OPTIONS]
    own = [option.name for option in modality.generate_options]
    request = GenerationRequest.of(
        [p for p in (args.prompt or []) if p.strip()],
        progress=True,
        **{name: getattr(args, name) for name in (*shared, *own)},
    )
    try:
        paths = generate_files(modality, request, args.out)
    except RequestError as e:
        raise UsageError(f"--{e.option.replace('_', '-')}: {e}") from e
    for path in paths:
        print(path)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="polydiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"polydiff {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    shards.add_argument(
        "--overwrite", action="store_true", help="replace the shards already in --out"
    )
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
    tune = sub.add_parser(
        "tune-steps",
        help="tune a sampler's step grid to a checkpoint (stored beside its weights)",
        description="Find the grid of --nfe model evaluations at which --sampler best matches "
        "a many-step teacher from the same noise on your prompts, and store it in the "
        "checkpoint folder (grids.json); generate uses it when sampler and steps match.",
    )
    tune.add_argument("--checkpoint", required=True, help="a trained model folder (final/)")
    tune.add_argument("--sampler", required=True, help="a deterministic sampler (e.g. unipc)")
    tune.add_argument("--nfe", required=True, type=int, help="model evaluations per sample")
    tune.add_argument("--prompt", action="append", help="prompt to tune on (repeat for several)")
    tune.add_argument("--num", type=int, default=4, help="outputs per prompt (default: 4)")
    tune.add_argument("--seed", type=int, default=0, help="seeds the noise (default: 0)")
    tune.add_argument("--guidance", type=float, default=None,
                      help="CFG scale (default: the checkpoint's)")  # fmt: skip
    tune.add_argument("--negative-prompt", default=None)
    tune.add_argument("--teacher-steps", type=int, default=100,
                      help="steps of the reference integration (default: 100)")  # fmt: skip
    tune.add_argument("--device", default="cpu")
    tune.add_argument("--dtype", default="float32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "generate":
            return cmd_generate(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "list":
            from polydiff.core.modality import available_modalities

            print("\n".join(available_modalities()) or "no modality installed")
            return 0
        if args.command == "data":
            return cmd_make_shards(args)
        if args.command == "tune-steps":
            return cmd_tune_steps(args)
        return cmd_train(args)
    except (ValueError, OSError) as err:
        # UsageError, ConfigError, CheckpointError and unknown names are all ValueErrors.
        print(f"polydiff: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
