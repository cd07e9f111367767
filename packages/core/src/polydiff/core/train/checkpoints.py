"""Atomic DeepSpeed checkpoints in ``<out>/checkpoints`` (:class:`Checkpoints`).

All ranks write ``checkpoints/tmp-<tag>/``; after a barrier rank 0 adds ``checkpoint.json``
(step, world size, parts, every file's size), renames the folder to ``checkpoints/<tag>/`` and
replaces ``checkpoints/latest`` (temp file + ``os.replace``). A folder is complete iff it has no
``tmp-`` prefix and its manifest matches the files, so a kill -9 at any moment leaves the
previous checkpoint (or the new one) usable. A one-part ``model`` run keeps DeepSpeed's files
directly in ``<tag>/``; a run with other parts has one DeepSpeed checkpoint per part in
``<tag>/<part>/``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from polydiff.core.pretrained import fsync_path

from .config import RunError
from .parts import PLAIN
from .safe_load import UnsafeCheckpointError, restricted_load

__all__ = ["MANIFEST_NAME", "TMP_PREFIX", "TRASH_PREFIX", "Checkpoints", "write_atomic"]

MANIFEST_NAME = "checkpoint.json"
TMP_PREFIX = "tmp-"  # a save in progress (or killed)
TRASH_PREFIX = "trash-"  # a checkpoint being deleted


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _engines(engines: Any) -> dict[str, Any]:
    return dict(engines) if isinstance(engines, Mapping) else {PLAIN: engines}


class Checkpoints:
    """The ``<out>/checkpoints`` folder: atomic saves, finding the newest complete one, pruning.

    Every rank calls :meth:`save` and :meth:`load_newest` (they run collectives); the folder
    operations happen on rank 0, so the folder must be shared by all nodes. ``engines`` is one
    DeepSpeed engine (the plain one-part layout) or ``{part: engine}``; with any part other
    than a lone ``model``, each part's DeepSpeed checkpoint goes to ``<tag>/<part>/`` and the
    trainer's client state is stored with the ``main`` part.
    """

    def __init__(self, folder: Path, rank: int, world_size: int, keep: int) -> None:
        self.folder, self.rank, self.world_size, self.keep = folder, rank, world_size, keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:06d}"

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, newest first. Leftover ``tmp-*``
        folders (a save that was killed) and folders whose files do not match their manifest
        (truncated or missing files) are skipped with a warning."""
        found = []
        if not self.folder.is_dir():
            return found
        for path in self.folder.iterdir():
            if not path.is_dir() or path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            problem = self._check(path)
            if problem is None:
                manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
                found.append((int(manifest["step"]), path))
            elif self.rank == 0:
                print(f"[polydiff] skipping checkpoint {path}: {problem}", file=sys.stderr)
        return sorted(found, key=lambda item: item[0], reverse=True)

    @staticmethod
    def _check(path: Path) -> str | None:
        try:
            manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
            files = manifest["files"]
            int(manifest["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"no valid {MANIFEST_NAME} ({e})"
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        return None

    def save(
        self, engines: Any, step: int, client_state: dict[str, Any], main: str | None = None
    ) -> Path:
        """Write checkpoint ``step`` atomically (all ranks call this)."""
        from deepspeed import comm as dist

        engines = _engines(engines)
        main = main or next(iter(engines))
        for engine in engines.values():
            # DeepSpeed unpickles with weights_only=False: a replaced file could run code.
            # Load through the weights-only unpickler instead.
            engine.checkpoint_engine.load = restricted_load
        tag = self.tag(step)
        tmp = self.folder / f"{TMP_PREFIX}{tag}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # from a save that was killed
            tmp.mkdir()
        dist.barrier()
        # save_latest=False: `latest` must only ever name a renamed, complete folder.
        if list(engines) == [PLAIN]:
            engines[PLAIN].save_checkpoint(
                str(self.folder), tag=tmp.name, client_state=client_state, save_latest=False
            )
        else:
            for name, engine in engines.items():
                state = client_state if name == main else {"step": step, "part": name}
                engine.save_checkpoint(str(tmp), tag=name, client_state=state, save_latest=False)
        dist.barrier()  # every rank's files are written
        final = self.folder / tag
        if self.rank == 0:
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                fsync_path(file)
                files[file.relative_to(tmp).as_posix()] = file.stat().st_size
            manifest = {
                "step": step,
                "world_size": self.world_size,
                "parts": list(engines),
                "files": files,
            }
            write_atomic(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
            if final.exists():  # re-saving a step (a resumed run that had saved it)
                self._discard(final)
            os.rename(tmp, final)
            fsync_path(self.folder)
            write_atomic(self.folder / "latest", tag)
            if self.keep:
                for _, old in self.complete()[self.keep :]:
                    self._discard(old)
        dist.barrier()
        return final

    def _discard(self, path: Path) -> None:
        # Rename first: a kill during rmtree leaves a trash-* folder, never a damaged checkpoint.
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self) -> None:
        """Remove ``tmp-*`` and ``trash-*`` folders of killed saves (rank 0)."""
        if self.rank == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_dir() and path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    shutil.rmtree(path, ignore_errors=True)

    def load_newest(
        self, engines: Any, main: str | None = None
    ) -> tuple[int, dict[str, Any]] | None:
        """Load the newest complete checkpoint into ``engines`` (all ranks call this).

        Falls back to the previous complete checkpoint when one cannot be loaded (any part).
        Files are unpickled with the weights-only unpickler (:mod:`.safe_load`). Returns
        ``(step, client_state)`` or None when there is none.

        Raises:
            RunError: the newest checkpoint was written by a different number of processes,
                or holds other parts than ``engines``, or a file holds more than tensors and
                plain data (a tampered file is refused, not skipped).
        """
        from deepspeed import comm as dist

        engines = _engines(engines)
        main = main or next(iter(engines))
        for engine in engines.values():
            # DeepSpeed unpickles with weights_only=False: a replaced file could run code.
            # Load through the weights-only unpickler instead.
            engine.checkpoint_engine.load = restricted_load
        candidates: list[Any] = [None]
        if self.rank == 0:
            candidates = [[(step, path.name) for step, path in self.complete()]]
        dist.broadcast_object_list(candidates, src=0)
        for step, name in candidates[0]:
            manifest = json.loads((self.folder / name / MANIFEST_NAME).read_text("utf-8"))
            if manifest["world_size"] != self.world_size:
                raise RunError(
                    f"checkpoint {self.folder / name} was written by {manifest['world_size']} "
                    f"processes; resume it with the same number (this run has "
                    f"{self.world_size}) so that every rank's data position and RNG carry over"
                )
            saved = manifest.get("parts", [PLAIN])
            if saved != list(engines):
                raise RunError(
                    f"checkpoint {self.folder / name} holds the parts {', '.join(saved)}; this "
                    f"recipe trains {', '.join(engines)}: resume with the recipe that wrote it"
                )
            error, client_state, ok, unsafe = "", None, True, False
            try:
                for part, engine in engines.items():
                    if list(engines) == [PLAIN]:
                        path, state = engine.load_checkpoint(str(self.folder), tag=name)
                    else:
                        path, state = engine.load_checkpoint(str(self.folder / name), tag=part)
                    ok = ok and path is not None and isinstance(state, dict)
                    if part == main:
                        client_state = state
            except UnsafeCheckpointError as e:  # never fall back past a tampered file
                ok, unsafe, error = False, True, str(e)
            except Exception as e:  # a corrupt file: try the previous checkpoint
                ok, error = False, f"{type(e).__name__}: {e}"
            flag = torch.tensor([-1.0 if unsafe else 1.0 if ok else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 1.0:
                assert client_state is not None
                return step, client_state
            if flag.item() == -1.0:
                raise RunError(error or f"another process refused a file of {self.folder / name}")
            print(
                f"[polydiff] rank {self.rank}: cannot load checkpoint {name} {error}; "
                "trying the previous one",
                file=sys.stderr,
            )
        return None
