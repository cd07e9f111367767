"""The shared DeepSpeed trainer: configs, the training loop and its launcher.

A modality plugs in as a :class:`polydiff.core.modality.Modality` (found by entry point, see
:func:`load_modality`). ``launch(config, ...)`` checks a YAML config and runs
``python -m polydiff.core.train.worker`` under the ``deepspeed`` launcher; each process runs
:func:`polydiff.core.train.trainer.train`. DeepSpeed itself is imported only inside the
processes (and by ``trainer``). A config with a ``distill:`` section distils a trained
checkpoint into a few-step student (:mod:`polydiff.core.train.distill`).
"""

from polydiff.core.modality.contract import (
    ENTRY_POINT_GROUP,
    Modality,
    available_modalities,
    load_modality,
)

from .config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    OptimConfig,
    RunError,
    TrainConfig,
    load_config,
)
from .launch import build_command, launch
from .metrics import plot_metrics
from .recipe import Recipe, load_recipe  # the trainer's names for Modality, load_modality

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "Modality",
    "OptimConfig",
    "Recipe",
    "RunError",
    "TrainConfig",
    "available_modalities",
    "build_command",
    "launch",
    "load_config",
    "load_modality",
    "load_recipe",
    "plot_metrics",
]
