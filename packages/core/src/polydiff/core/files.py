"""Where generated samples go: the ``--out FILE --num N`` naming rule every modality shares.

:func:`polydiff.core.provenance.check_output` checks these paths before sampling, and
:func:`polydiff.core.provenance.atomic_output` writes them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["output_paths"]


def output_paths(out: str | Path, num: int, default_suffix: str) -> list[Path]:
    """The files ``--out FILE --num N`` writes: ``FILE`` when N == 1, else ``FILE_0`` ..
    ``FILE_{N-1}`` (suffix kept; ``default_suffix`` such as ``".png"`` added when ``out`` has
    none)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    out = Path(out)
    if not out.suffix:
        out = out.with_suffix(default_suffix)
    if num == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num)]
