"""``python -m polydiff.core.train.worker``: one DeepSpeed process of a training run.

The ``deepspeed`` launcher starts this module once per process (see :func:`launch`); it reads
the config, applies the command-line overrides and runs :func:`polydiff.core.train.trainer.train`.
Exit status: 0 done, 2 a config / data / run-folder problem (one line on stderr), 1 a crash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, RunError, cli_overrides, load_config

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The worker's arguments (the same options ``polydiff train`` passes on)."""
    p = argparse.ArgumentParser(
        prog="python -m polydiff.core.train.worker",
        description="One DeepSpeed process of a polydiff training run (started by `deepspeed`).",
    )
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("--out", help="run folder (default: train.out, or runs/<config name>)")
    p.add_argument("--data", help="training shards; replaces data.shards")
    p.add_argument("--max-steps", type=int, help="replaces train.max_steps")
    p.add_argument("--checkpoint-every", type=int, help="replaces train.checkpoint_every")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one training process; returns the exit status."""
    args = parser().parse_args(argv)
    # Imported here: DeepSpeed takes seconds to import, argument errors should not wait.
    from polydiff.core.data import DataError

    from .trainer import train

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = load_config(
            args.config,
            cli_overrides(
                data=args.data,
                out=args.out,
                max_steps=args.max_steps,
                checkpoint_every=args.checkpoint_every,
            ),
        )
        train(cfg, cfg.out_dir, resume=args.resume)
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # A process group left to interpreter shutdown can abort the process ("terminate
        # called without an active exception", exit 250) after a refusal mid-run.
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
