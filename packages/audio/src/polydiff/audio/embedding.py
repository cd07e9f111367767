"""Audio embedding models for the Fréchet audio distance (FAD), from local files only.

FAD (Kilgour et al. 2019) is the Fréchet distance between Gaussians fitted to embeddings of
two sets of sounds (:func:`polydiff.core.metrics.frechet_distance`): 0 for equal statistics,
larger the more the sets differ, in squared embedding units, so values are comparable only
for one embedding model and similar set sizes. The user supplies the model:

* a transformers audio model folder (``config.json`` + ``preprocessor_config.json``, e.g.
  Wav2Vec2, HuBERT, AST or Whisper): ``AutoFeatureExtractor`` + ``AutoModel`` (the encoder
  of an encoder-decoder), the embedding of a sound is its last hidden state averaged over
  time -> :class:`TransformersAudioEmbedding`;
* a CLAP folder or LAION ``.pt`` checkpoint: its audio branch
  (:func:`~polydiff.audio.clap.load_clap`) -> :class:`ClapAudioEmbedding`.

Nothing is downloaded (``local_files_only``); waves are resampled to the model's rate.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torchaudio
from torch import Tensor

from polydiff.audio.clap import ClapEmbedder, load_clap
from polydiff.core.metrics import frechet_distance

__all__ = [
    "AudioEmbeddingModel",
    "ClapAudioEmbedding",
    "TransformersAudioEmbedding",
    "frechet_audio_distance",
    "load_audio_embedding_model",
]

Waves = Tensor | Sequence[Tensor]
_CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth")
_NOT_AN_AUDIO_MODEL = (
    "{} is not an audio embedding model (a transformers audio model folder with config.json "
    "and preprocessor_config.json, a CLAP folder, or a LAION CLAP .pt checkpoint)"
)


@runtime_checkable
class AudioEmbeddingModel(Protocol):
    """Sounds -> one vector each. ``sample_rate``: Hz the model hears (``embed`` resamples)."""

    sample_rate: int

    def embed(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves in [-1, 1] (or N 1-D waves) at ``sample_rate`` Hz -> (N, D)
        float32 embeddings on the CPU."""
        ...


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _mono_waves(waves: Waves) -> Tensor | list[Tensor]:
    """A (N, S) float32 CPU tensor, or a list of 1-D waves when given one (lengths may vary)."""
    if isinstance(waves, Tensor):
        batch = waves[None] if waves.ndim == 1 else waves
        if batch.ndim != 2 or batch.shape[1] == 0:
            raise ValueError(f"expected (N, S) mono waves, got shape {tuple(waves.shape)}")
        return batch.detach().float().cpu()
    items = [torch.as_tensor(w).detach().float().cpu() for w in waves]
    for wave in items:
        if wave.ndim != 1 or wave.numel() == 0:
            raise ValueError(f"expected mono 1-D waves, got a wave of shape {tuple(wave.shape)}")
    return items


class TransformersAudioEmbedding:
    """A transformers audio encoder: the time-average of its last hidden state.

    Args:
        folder: ``save_pretrained`` of the model and of its feature extractor.
        device: where the model runs.

    Raises:
        FileNotFoundError: no such folder. ValueError: a folder that does not load.
    """

    def __init__(self, folder: str | os.PathLike[str], device: str | torch.device = "cpu"):
        import transformers

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"audio embedding model not found: {self.folder}")
        self.device = torch.device(device)
        try:
            extractor = transformers.AutoFeatureExtractor.from_pretrained(
                self.folder, local_files_only=True
            )
            model = transformers.AutoModel.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.folder}: cannot load the audio model: {_first_line(e)}") from e
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. Whisper: the audio encoder alone
        self.feature_extractor = extractor
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.sample_rate = int(extractor.sampling_rate)

    @torch.inference_mode()
    def _embed_batch(self, waves: list[Tensor]) -> Tensor:
        """Equal-length 1-D waves at the model's rate -> (N, D): no padding, so the mean over
        time covers exactly the sound."""
        features = self.feature_extractor(
            [w.numpy() for w in waves], sampling_rate=self.sample_rate, return_tensors="pt"
        )
        inputs = {
            k: v.to(self.device, torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in features.items()
            if isinstance(v, Tensor)
        }
        hidden = self.model(**inputs).last_hidden_state  # (N, T, D)
        return hidden.float().mean(dim=1).cpu()

    def embed(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves at ``sample_rate`` Hz -> (N, D) float32 embeddings on the CPU.
        A list of waves of different lengths is embedded one wave at a time."""
        batch = _mono_waves(waves)
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        rate = int(sample_rate)

        def resampled(wave: Tensor) -> Tensor:
            if rate == self.sample_rate:
                return wave
            return torchaudio.functional.resample(wave, rate, self.sample_rate)

        if isinstance(batch, Tensor):
            return self._embed_batch(list(resampled(batch)))
        return torch.cat([self._embed_batch([resampled(w)]) for w in batch])


class ClapAudioEmbedding:
    """The audio branch of a CLAP model (unit vectors, D = its ``dim``)."""

    def __init__(self, clap: ClapEmbedder):
        self.clap = clap
        self.sample_rate = int(clap.sample_rate)

    def embed(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves at ``sample_rate`` Hz -> (N, dim) CLAP audio embeddings."""
        return self.clap.embed_audio(waves, sample_rate)


def _model_type(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


@functools.cache
def _load_cached(path: str, device: str) -> AudioEmbeddingModel:
    folder = Path(path)
    if folder.is_file() or _model_type(folder) == "clap":
        return ClapAudioEmbedding(load_clap(folder, device))
    return TransformersAudioEmbedding(folder, device)


def load_audio_embedding_model(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> AudioEmbeddingModel:
    """The FAD embedding model in ``folder`` (see the module doc), loaded once per process.

    Raises:
        FileNotFoundError: nothing at ``folder`` ("audio embedding model not found: X").
        ValueError: something there that is not such a model (one line).
    """
    path = Path(folder).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"audio embedding model not found: {folder}")
    if path.is_file():
        if path.suffix.lower() not in _CHECKPOINT_SUFFIXES:
            raise ValueError(_NOT_AN_AUDIO_MODEL.format(folder))
    elif _model_type(path) is None or (
        _model_type(path) != "clap" and not (path / "preprocessor_config.json").is_file()
    ):
        raise ValueError(_NOT_AN_AUDIO_MODEL.format(folder))
    return _load_cached(str(path), str(torch.device(device)))


def _embed_all(model: AudioEmbeddingModel, waves: Waves, sample_rate: int, batch: int) -> Tensor:
    items = waves if isinstance(waves, Tensor) else list(waves)
    chunks = [model.embed(items[i : i + batch], sample_rate) for i in range(0, len(items), batch)]
    return torch.cat(chunks) if chunks else torch.zeros((0, 0))


def frechet_audio_distance(
    model: AudioEmbeddingModel,
    waves_a: Waves,
    waves_b: Waves,
    sample_rate: int,
    batch_size: int = 16,
) -> float:
    """FAD between two sets of sounds under ``model``.

    Args:
        model: from :func:`load_audio_embedding_model`.
        waves_a, waves_b: (N_a, S) and (N_b, S') mono waves in [-1, 1] (or sequences of 1-D
            waves) at ``sample_rate`` Hz; N >= 2 each (more than the embedding width D for a
            full-rank covariance, which FAD assumes; with fewer the value is still defined).
        batch_size: waves embedded per forward pass.

    Returns:
        The squared Fréchet distance (>= 0) between the two embedding Gaussians.

    Raises:
        ValueError: a set of fewer than 2 sounds, or a batch size below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, waves in (("waves_a", waves_a), ("waves_b", waves_b)):
        if len(waves) < 2:
            raise ValueError(f"{name}: FAD needs at least 2 sounds per set, got {len(waves)}")
    features_a = _embed_all(model, waves_a, sample_rate, batch_size)
    features_b = _embed_all(model, waves_b, sample_rate, batch_size)
    return frechet_distance(features_a, features_b)
