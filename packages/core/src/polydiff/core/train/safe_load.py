"""Loading DeepSpeed checkpoint files without unpickling arbitrary objects.

DeepSpeed saves ``.pt`` files with ``torch.save`` and loads them with ``weights_only=False``,
which runs whatever a pickled object's ``__reduce__`` names: replacing a checkpoint file is
then enough to run code on ``--resume``. :func:`restricted_load` loads with torch's
weights-only unpickler, which builds only tensors, plain containers and numbers, plus the few
data classes a polydiff checkpoint holds (NumPy's RNG state array, DeepSpeed's loss scaler,
ZeRO stage enum and fragment addresses). Anything else is refused with
:class:`UnsafeCheckpointError` naming the file and what it asked for.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import torch

__all__ = ["UnsafeCheckpointError", "restricted_load", "safe_globals"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something else than tensors and plain data."""


def _numpy_globals() -> list[Any]:
    # NumPy's RNG state is (name, uint32 array, pos, has_gauss, gauss): the array pickles as
    # ndarray + dtype + the reconstruct function, whose module moved in NumPy 2.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [type(np.dtype(name)) for name in ("uint32", "float64", "int64")]
    return [np.ndarray, np.dtype, _reconstruct, *dtype_classes]


def safe_globals() -> list[Any]:
    """The classes (besides tensors and plain data) a checkpoint may hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [*_numpy_globals(), LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def restricted_load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """``torch.load`` with the weights-only unpickler and :func:`safe_globals`.

    Raises:
        UnsafeCheckpointError: the file names another global (a tampered or foreign file).
    """
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph of advice; the global it refused is what matters.
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"it asks for {found.group(1)}" if found else "it is no plain data"
            raise UnsafeCheckpointError(
                f"{path}: refusing to load it: {what}, but checkpoints hold only tensors and "
                "plain data; was the file replaced?"
            ) from None
