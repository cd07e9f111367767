"""The shared DeepSpeed trainer: recipes, configs, the training loop and its launcher.

``launch(config, ...)`` checks a YAML config and runs ``python -m polydiff.core.train.worker``
under the ``deepspeed`` launcher; each process runs :func:`polydiff.core.train.trainer.train`.
DeepSpeed itself is imported only inside the processes (and by ``trainer``).
"""

from .config import DataConfig, OptimConfig, TrainConfig, load_config
from .launch import build_command, launch
from .recipe import ENTRY_POINT_GROUP, ConfigError, Recipe, available_modalities, load_recipe
from .trainer import RunError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "Recipe",
    "RunError",
    "TrainConfig",
    "available_modalities",
    "build_command",
    "launch",
    "load_config",
    "load_recipe",
]
