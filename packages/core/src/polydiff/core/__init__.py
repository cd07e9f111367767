"""polydiff.core: the shared diffusion core.

Schedules, prediction types, training objectives, stateless samplers, guidance, neural blocks,
EMA, save/load and text encoders, used by every polydiff modality. The core never imports a
modality.
"""

from . import guidance, predictions, schedules
from .guidance import CFG, CFGPlusPlus
from .sampling import SAMPLERS, SPACINGS, invert, sample, timesteps

__all__ = [
    "CFG",
    "SAMPLERS",
    "SPACINGS",
    "CFGPlusPlus",
    "guidance",
    "invert",
    "predictions",
    "sample",
    "schedules",
    "timesteps",
]
