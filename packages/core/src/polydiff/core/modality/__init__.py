"""The modality kit: what every polydiff modality shares, so a new modality is its data, its
network, its export and its metrics — and nothing else.

- :mod:`.contract`: the :class:`Modality` base class (the plug-in contract), the
  :class:`GenerationRequest`, entry-point discovery.
- :mod:`.schema`: pydantic schemas of model configs (:class:`DenoisingSchema`).
- :mod:`.conditioning`: text, label and vector conditioners with CFG dropout.
- :mod:`.codec`: frozen latent codecs (:class:`LatentCodec`).
- :mod:`.denoising`: schedule and loss from a denoising config.
- :mod:`.generation`: the one generation path (CLI and Python API).
- :mod:`.checkpoint`: loading trained checkpoints of a modality.
- :mod:`.tuning`: step grids tuned to a checkpoint (``polydiff tune-steps``).

Nothing here imports the trainer or DeepSpeed.
"""

from .checkpoint import bundled_checkpoint, load_trained
from .codec import (
    LatentCodec,
    codec_record,
    decode_frames,
    encode_frames,
    frozen_codec,
    load_codec,
    track_latent_std,
)
from .conditioning import (
    Conditioner,
    LabelConditioner,
    TextConditioner,
    VectorConditioner,
    conditioned_batch,
)
from .contract import (
    DTYPES,
    ENTRY_POINT_GROUP,
    ConfigError,
    GenerateOption,
    GenerationRequest,
    Loss,
    Modality,
    RequestOptions,
    available_modalities,
    default_collate,
    load_modality,
)
from .denoising import denoising_loss, make_schedule, model_params
from .generation import (
    Generated,
    RequestError,
    Sampling,
    SamplingCaptured,
    capture_sampling,
    check_request,
    denoise,
    generate,
    generate_files,
    time_ranges,
)
from .tuning import checkpoint_modality, tune_steps

__all__ = [
    "DTYPES",
    "ENTRY_POINT_GROUP",
    "Conditioner",
    "ConfigError",
    "GenerateOption",
    "Generated",
    "GenerationRequest",
    "LabelConditioner",
    "LatentCodec",
    "Loss",
    "Modality",
    "RequestError",
    "RequestOptions",
    "Sampling",
    "SamplingCaptured",
    "TextConditioner",
    "VectorConditioner",
    "available_modalities",
    "bundled_checkpoint",
    "capture_sampling",
    "check_request",
    "checkpoint_modality",
    "codec_record",
    "conditioned_batch",
    "decode_frames",
    "default_collate",
    "denoise",
    "denoising_loss",
    "encode_frames",
    "frozen_codec",
    "generate",
    "generate_files",
    "load_codec",
    "load_modality",
    "load_trained",
    "make_schedule",
    "model_params",
    "time_ranges",
    "track_latent_std",
    "tune_steps",
]
