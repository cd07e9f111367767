"""CLAP: text and sounds in one embedding space, for conditioning and re-ranking (offline).

CLAP (Wu et al. 2023, "Large-scale contrastive language-audio pretraining") maps a caption
and a sound to unit vectors whose cosine similarity says how well they match. Two model
formats load from local files, and nothing is ever downloaded:

* a transformers folder (``ClapModel`` + ``ClapProcessor`` saved by ``save_pretrained``:
  ``config.json`` of ``model_type`` ``"clap"``, weights, tokenizer and feature-extractor
  files) -> :class:`TransformersClap`;
* a LAION ``.pt`` / ``.ckpt`` checkpoint of the ``laion-clap`` package -> :class:`LaionClap`
  (needs ``pip install --no-deps laion-clap==1.1.7`` and what it imports, see the audio
  package's ``laion`` extra). The checkpoint is read with ``torch.load(weights_only=True)``:
  tensors only, nothing in it is executed.

Both take mono waves at any sample rate (resampled to the model's 48 kHz here) and give
``(N, dim)`` float32 L2-normalised embeddings (``dim`` = 512 for the published models).
CLAP models see 10 s windows (a transformers model: its feature extractor's
``max_length_s``): shorter sounds are repeated and zero-padded to the window by the model's
own preprocessing ("repeatpad"), longer ones are cut to their middle window here (CLAP
crops at random, which would make embeddings, and so training inputs, non-deterministic).

:class:`ClapConditioner` is the core ``Conditioner`` of an audio denoiser conditioned on one
CLAP vector: audio embeddings of the training sounds (no captions needed) at training, the
text embedding of the prompt at sampling. :func:`clap_scores` and :func:`rerank` score
generated sounds against their prompts (``--rerank N``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

__all__ = [
    "CLAP_SAMPLE_RATE",
    "ClapConditioner",
    "ClapEmbedder",
    "LaionClap",
    "TransformersClap",
    "build_laion_module",
    "clap_scores",
    "load_clap",
    "read_laion_state_dict",
    "rerank",
]

CLAP_SAMPLE_RATE = 48_000  # Hz, the rate both published CLAP families were trained at
_LAION_WINDOW = 480_000  # samples laion-clap embeds (10 s at 48 kHz; hard-coded in its hook)
_TEXT_MAX_TOKENS = 77  # laion-clap's tokenizer length (padding / truncation)
_CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth")
_NOT_CLAP = (
    "{} is not a CLAP model folder (config.json of model_type clap) or a LAION .pt checkpoint"
)

Waves = Tensor | Sequence[Tensor]


@runtime_checkable
class ClapEmbedder(Protocol):
    """A frozen CLAP model: texts and waves -> unit vectors of one shared space.

    Attributes:
        dim: embedding width (512 for the published models).
        sample_rate: Hz the model hears (48 000); :meth:`embed_audio` resamples to it.
    """

    dim: int
    sample_rate: int

    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """N captions -> (N, dim) float32 unit vectors (on the CPU)."""
        ...

    def embed_audio(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves in [-1, 1] (or N 1-D waves of any lengths) at ``sample_rate`` Hz
        -> (N, dim) float32 unit vectors (on the CPU)."""
        ...


# --- waves -------------------------------------------------------------------------------


def _wave_list(waves: Waves) -> list[Tensor]:
    """(N, S) tensor, (S,) tensor or sequence of 1-D (or (1, S)) waves -> N 1-D float32 waves."""
    if isinstance(waves, Tensor):
        if waves.ndim == 1:
            waves = waves[None]
        if waves.ndim != 2:
            raise ValueError(f"expected (N, S) mono waves, got shape {tuple(waves.shape)}")
        items = list(waves)
    else:
        items = [torch.as_tensor(w) for w in waves]
    out = []
    for wave in items:
        if wave.ndim == 2 and wave.shape[0] == 1:
            wave = wave[0]
        if wave.ndim != 1 or wave.numel() == 0:
            raise ValueError(f"expected mono 1-D waves, got a wave of shape {tuple(wave.shape)}")
        out.append(wave.detach().float().cpu())
    return out


def _prepare_waves(
    waves: Waves, sample_rate: int, model_rate: int, max_samples: int
) -> list[Tensor]:
    """Waves -> 1-D float32 CPU waves at ``model_rate`` Hz, each at most ``max_samples``
    long (the middle is kept)."""
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    prepared = []
    for wave in _wave_list(waves):
        if int(sample_rate) != model_rate:
            wave = torchaudio.functional.resample(wave, int(sample_rate), model_rate)
        if wave.numel() > max_samples:
            start = (wave.numel() - max_samples) // 2
            wave = wave[start : start + max_samples]
        prepared.append(wave.contiguous())
    return prepared


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- transformers ------------------------------------------------------------------------


class TransformersClap:
    """A transformers CLAP folder (``ClapModel`` + ``ClapProcessor``), loaded offline.

    Args:
        folder: what ``ClapModel.save_pretrained`` and ``ClapProcessor.save_pretrained``
            wrote (e.g. a local copy of ``laion/clap-htsat-unfused``).
        device: where the model runs; embeddings are returned on the CPU.

    Raises:
        FileNotFoundError: no such folder. ValueError: a folder that does not load as CLAP.
    """

    def __init__(self, folder: str | os.PathLike[str], device: str | torch.device = "cpu"):
        import transformers

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"CLAP model not found: {self.folder}")
        self.device = _device(device)
        try:
            model = transformers.ClapModel.from_pretrained(self.folder, local_files_only=True)
            processor = transformers.ClapProcessor.from_pretrained(
                self.folder, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.folder}: cannot load the CLAP model: {_first_line(e)}") from e
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.dim = int(model.config.projection_dim)
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.window = int(self.feature_extractor.nb_max_samples)  # samples per clip (10 s)
        text_config = model.config.text_config
        # RoBERTa positions start after the padding index: max_position_embeddings - pad - 1.
        positions = int(text_config.max_position_embeddings) - int(text_config.pad_token_id) - 1
        self.max_tokens = min(_TEXT_MAX_TOKENS, positions)

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """N captions -> (N, dim) float32 unit vectors on the CPU."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros((0, self.dim))
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return _unit(output)

    @torch.inference_mode()
    def embed_audio(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves at ``sample_rate`` Hz -> (N, dim) float32 unit vectors on the CPU."""
        prepared = _prepare_waves(waves, sample_rate, self.sample_rate, self.window)
        features = self.feature_extractor(
            [w.numpy() for w in prepared], sampling_rate=self.sample_rate, return_tensors="pt"
        )
        # No wave exceeds the window after _prepare_waves; transformers' "fusion" truncation
        # would otherwise mark a random item as longer.
        is_longer = torch.zeros((len(prepared), 1), dtype=torch.bool, device=self.device)
        output = self.model.get_audio_features(
            input_features=features["input_features"].to(self.device, torch.float32),
            is_longer=is_longer,
        )
        return _unit(output)


def _unit(output: Any) -> Tensor:
    """A transformers features output (a tensor, or a ModelOutput in transformers 5)."""
    embedding = output if isinstance(output, Tensor) else output.pooler_output
    return F.normalize(embedding.float(), dim=-1).cpu()


# --- LAION -------------------------------------------------------------------------------


def read_laion_state_dict(checkpoint: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The model weights of a laion-clap checkpoint, read without unpickling code.

    ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only) of the
    file, its ``"state_dict"`` (or the file itself when it is the state dict), keys without
    the ``"module."`` prefix of DataParallel training, and without
    ``text_branch.embeddings.position_ids`` (a buffer transformers >= 4.31 no longer saves).

    Raises:
        FileNotFoundError: no such file. ValueError: a file that is refused (it would need
            arbitrary unpickling) or that holds no state dict of tensors.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"CLAP model not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, ...
        raise ValueError(
            f"{path}: refused as a LAION CLAP checkpoint (torch.load weights_only=True: "
            f"{_first_line(e)})"
        ) from e
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: not a LAION CLAP checkpoint (no state_dict)")
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{path}: not a LAION CLAP checkpoint (state_dict of non-tensors)")
        cleaned[key.removeprefix("module.")] = value
    cleaned.pop("text_branch.embeddings.position_ids", None)
    return cleaned


def _laion_architecture(state: Mapping[str, Tensor]) -> tuple[str, bool]:
    """(amodel, enable_fusion) of a laion-clap state dict: HTS-AT's size from its patch
    embedding width (96 tiny, 128 base, 256 large); fusion from its fusion layers."""
    fusion = any(".fusion_model." in k or ".mel_conv2d." in k for k in state)
    patch = state.get("audio_branch.patch_embed.proj.weight")
    sizes = {96: "HTSAT-tiny", 128: "HTSAT-base", 256: "HTSAT-large"}
    if patch is None or patch.shape[0] not in sizes:
        raise ValueError(
            "cannot tell its audio model (not HTS-AT): pass LaionClap(..., amodel=NAME)"
        )
    return sizes[patch.shape[0]], fusion


_LAION_BUILD_LOCK = threading.Lock()


def _import_laion() -> Any:
    try:
        import laion_clap
    except ImportError as e:
        raise ValueError(
            f"LAION CLAP checkpoints need the laion-clap package (pip install --no-deps "
            f"laion-clap==1.1.7, plus the polydiff-audio[laion] extra): {_first_line(e)}"
        ) from e
    return laion_clap


_ROBERTA_NEEDS = (
    "roberta-base's config.json and tokenizer (vocab.json + merges.txt, or tokenizer.json)"
)


def _roberta_folder(text_model: str | os.PathLike[str] | None) -> Path:
    """The folder of roberta-base's files: ``text_model``, or (None) its snapshot in the
    Hugging Face cache, found without the network."""
    if text_model is not None:
        folder = Path(text_model)
        if not folder.is_dir():
            raise FileNotFoundError(f"RoBERTa text model folder not found: {folder}")
        return folder
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download("roberta-base", local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and kin: not in the cache
        raise ValueError(
            f"LAION CLAP needs {_ROBERTA_NEEDS}: not in the Hugging Face cache; pass "
            f"text_model=FOLDER"
        ) from e


def _offline_roberta(text_model: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """(RobertaConfig, RobertaTokenizer) for laion-clap's text branch, from local files.

    The files are checked first: transformers 5 quietly returns a default config and a
    five-token tokenizer for a folder without them.
    """
    import transformers

    folder = _roberta_folder(text_model)
    has_tokenizer = (folder / "tokenizer.json").is_file() or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not ((folder / "config.json").is_file() and has_tokenizer):
        raise ValueError(f"LAION CLAP needs {_ROBERTA_NEEDS}; {folder} lacks them")
    try:
        config = transformers.RobertaConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.RobertaTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: not a usable RoBERTa folder: {_first_line(e)}") from e
    return config, tokenizer


@contextmanager
def _laion_roberta(config: Any, tokenizer: Any) -> Iterator[None]:
    """While building a ``laion_clap.CLAP_Module``: its hard-coded ``"roberta-base"`` text
    branch and tokenizer come from ``config`` and ``tokenizer`` instead of the hub.

    laion-clap looks ``RobertaModel`` (in its ``clap_module.model``) and ``RobertaTokenizer``
    (in ``laion_clap.hook``) up as module globals when it builds; they are swapped for
    stand-ins whose ``from_pretrained`` returns these, and restored afterwards (site-packages
    is not edited). The text branch gets random weights: the checkpoint replaces every one
    of them, so roberta-base's ~500 MB of weights are never needed.
    """
    import transformers

    hook = _import_laion().hook
    factory = sys.modules[hook.create_model.__module__]
    model_module = sys.modules[factory.CLAP.__module__]

    class OfflineRobertaModel:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
            return transformers.RobertaModel(config)

    class OfflineRobertaTokenizer:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
            return tokenizer

    with _LAION_BUILD_LOCK:
        saved = model_module.RobertaModel, hook.RobertaTokenizer
        model_module.RobertaModel = OfflineRobertaModel
        hook.RobertaTokenizer = OfflineRobertaTokenizer
        try:
            yield
        finally:
            model_module.RobertaModel, hook.RobertaTokenizer = saved


def build_laion_module(
    text_model: str | os.PathLike[str] | None,
    amodel: str = "HTSAT-tiny",
    enable_fusion: bool = False,
    device: str | torch.device = "cpu",
) -> Any:
    """An untrained ``laion_clap.CLAP_Module`` built offline (``text_model``: see
    :class:`LaionClap`); random weights, for :meth:`torch.nn.Module.load_state_dict`."""
    laion_clap = _import_laion()
    config, tokenizer = _offline_roberta(text_model)
    try:
        with _laion_roberta(config, tokenizer), warnings.catch_warnings():
            # HTS-AT's torch.meshgrid call without indexing= (its behaviour is the intended one)
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            return laion_clap.CLAP_Module(
                enable_fusion=bool(enable_fusion), device=str(_device(device)), amodel=amodel
            )
    except RuntimeError as e:  # laion-clap: "Model config for X not found."
        raise ValueError(f"laion-clap cannot build amodel={amodel!r}: {_first_line(e)}") from e


class LaionClap:
    """A LAION CLAP ``.pt`` checkpoint through ``laion_clap.CLAP_Module``, offline.

    Args:
        checkpoint: the ``.pt`` file (e.g. ``630k-audioset-best.pt``); read with
            :func:`read_laion_state_dict` (``weights_only=True``), never laion-clap's own
            ``load_ckpt`` (which unpickles arbitrary objects, or downloads without a path).
        text_model: laion-clap hard-codes the hub id ``"roberta-base"`` for its text branch
            and tokenizer. A local folder with roberta-base's ``config.json``,
            ``vocab.json`` and ``merges.txt`` (weights not needed: the checkpoint holds
            them) is used in its place. None: ``"roberta-base"`` from a pre-filled Hugging
            Face cache, with ``local_files_only`` (as ``HF_HUB_OFFLINE=1`` would).
        amodel: laion-clap's audio model name (its ``model_configs``); ``HTSAT-tiny`` for the
            630k checkpoints, ``HTSAT-base`` for the music ones. None: the HTS-AT size read
            from the weights (the patch embedding's width).
        enable_fusion: True for the ``*-fusion-*`` checkpoints; None: read from the weights
            (fusion layers present or not).
        device: where the model runs; embeddings are returned on the CPU.

    Raises:
        FileNotFoundError: no checkpoint / text model folder. ValueError: laion-clap missing,
        no usable RoBERTa, a refused file, or weights that do not fit ``amodel``/fusion.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        text_model: str | os.PathLike[str] | None = None,
        amodel: str | None = "HTSAT-tiny",
        enable_fusion: bool | None = False,
        device: str | torch.device = "cpu",
    ):
        self.checkpoint = Path(checkpoint)
        state = read_laion_state_dict(self.checkpoint)  # before the slow build: fail fast
        if amodel is None or enable_fusion is None:
            try:
                found_amodel, found_fusion = _laion_architecture(state)
            except ValueError as e:
                raise ValueError(f"{self.checkpoint}: {e}") from e
            amodel = found_amodel if amodel is None else amodel
            enable_fusion = found_fusion if enable_fusion is None else enable_fusion
        self.device = _device(device)
        self.amodel = amodel
        self.enable_fusion = bool(enable_fusion)
        self.module = build_laion_module(text_model, amodel, self.enable_fusion, self.device)
        try:
            result = self.module.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatches
            raise ValueError(
                f"{self.checkpoint}: weights do not fit laion-clap amodel={amodel!r} "
                f"enable_fusion={self.enable_fusion}: {_first_line(e)}"
            ) from e
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{self.checkpoint}: weights do not fit laion-clap amodel={amodel!r} "
                f"enable_fusion={self.enable_fusion}: {len(result.missing_keys)} missing "
                f"(e.g. {result.missing_keys[:1]}), {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:1]})"
            )
        self.module.eval().requires_grad_(False)
        self.dim = int(self.module.model.joint_embed_shape)
        self.sample_rate = int(self.module.model_cfg["audio_cfg"]["sample_rate"])

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """N captions -> (N, dim) float32 unit vectors on the CPU."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros((0, self.dim))
        embedding = self.module.get_text_embedding(texts, use_tensor=True)
        return F.normalize(embedding.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_audio(self, waves: Waves, sample_rate: int) -> Tensor:
        """(N, S) mono waves at ``sample_rate`` Hz -> (N, dim) float32 unit vectors on the CPU."""
        prepared = _prepare_waves(waves, sample_rate, self.sample_rate, _LAION_WINDOW)
        # use_tensor=True: tensors in, tensors out (laion-clap's numpy path would also
        # quantise to int16 first).
        embedding = self.module.get_audio_embedding_from_data(
            [w.to(self.device) for w in prepared], use_tensor=True
        )
        return F.normalize(embedding.float(), dim=-1).cpu()


# --- loading -----------------------------------------------------------------------------


def _is_clap_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "clap"


@functools.cache
def _load_clap_cached(path: str, device: str, text_model: str | None) -> ClapEmbedder:
    resolved = Path(path)
    if resolved.is_dir():
        return TransformersClap(resolved, device)
    return LaionClap(resolved, text_model, amodel=None, enable_fusion=None, device=device)


def load_clap(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    text_model: str | os.PathLike[str] | None = None,
) -> ClapEmbedder:
    """A CLAP model from local files, loaded once per process per (path, device, text_model).

    Args:
        path: a transformers CLAP folder (``config.json`` of ``model_type`` ``"clap"``) or a
            LAION ``.pt`` / ``.ckpt`` checkpoint (HTS-AT size and fusion are read from its
            weights; for other audio models build :class:`LaionClap` directly).
        device: where the model runs.
        text_model: LAION only, the local roberta-base folder (see :class:`LaionClap`).

    Raises:
        FileNotFoundError: ``path`` does not exist ("CLAP model not found: X").
        ValueError: anything else that is not a loadable CLAP model (one line).
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"CLAP model not found: {path}")
    is_folder = resolved.is_dir() and _is_clap_folder(resolved)
    is_checkpoint = resolved.is_file() and resolved.suffix.lower() in _CHECKPOINT_SUFFIXES
    if not (is_folder or is_checkpoint):
        raise ValueError(_NOT_CLAP.format(path))
    text = None if text_model is None else str(Path(text_model).expanduser().resolve())
    return _load_clap_cached(str(resolved), str(_device(device)), text)


# --- scoring -----------------------------------------------------------------------------


def clap_scores(
    embedder: ClapEmbedder, waves: Waves, sample_rate: int, prompts: Sequence[str]
) -> Tensor:
    """(N,) cosine similarity in [-1, 1] of each wave with its prompt (higher: better match).

    Args:
        waves: (N, S) mono waves (or N 1-D waves) at ``sample_rate`` Hz.
        prompts: N captions, one per wave.
    """
    prompts = [str(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    audio = embedder.embed_audio(waves, sample_rate)
    if len(prompts) != audio.shape[0]:
        raise ValueError(f"{audio.shape[0]} waves but {len(prompts)} prompts")
    return (audio * embedder.embed_text(prompts)).sum(dim=-1)


def rerank(
    embedder: ClapEmbedder, candidates: Waves, sample_rate: int, prompt: str
) -> tuple[list[int], Tensor]:
    """Candidates for one prompt, best first.

    Args:
        candidates: (K, S) mono waves (or K 1-D waves) at ``sample_rate`` Hz.

    Returns:
        ``order``: the K candidate indices by decreasing CLAP score (ties: the earlier
        candidate first); ``scores``: (K,) the score of each candidate, in candidate order.
    """
    audio = embedder.embed_audio(candidates, sample_rate)
    scores = audio @ embedder.embed_text([str(prompt)])[0]
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    return order, scores


# --- conditioning ------------------------------------------------------------------------


def _is_wave(value: Any) -> bool:
    return isinstance(value, Tensor) or hasattr(value, "__array__")


@dataclass(frozen=True)
class ClapConditioner:
    """One CLAP vector per sample, from a caption or from a sound (core ``Conditioner``).

    Training on sounds without captions passes the waves (their audio embeddings); sampling
    passes the prompts (text embeddings): CLAP puts both in one space. The null input of
    classifier-free guidance is the zero vector.

    Attributes:
        model: a CLAP folder or LAION checkpoint (:func:`load_clap`; loaded once per process).
        device: where CLAP runs (None: the CPU). dtype: accepted for parity with
            ``TextConditioner``; CLAP runs in float32 and :meth:`encode` casts its output.
        sample_rate: Hz of the waves passed to :meth:`encode` (the mel settings' rate).
        text_model: LAION checkpoints only, the local roberta-base folder.
    """

    model: str
    device: str | None = None
    dtype: torch.dtype | None = None
    sample_rate: int = 16_000
    text_model: str | None = None

    def embedder(self) -> ClapEmbedder:
        return load_clap(self.model, self.device or "cpu", self.text_model)

    @property
    def dims(self) -> tuple[None, int]:
        """(token width: None, no token context; pooled width: the CLAP dim)."""
        return None, self.embedder().dim

    def embeddings(self, values: Sequence[Any] | Tensor) -> Tensor:
        """Captions and/or waves -> (N, dim) float32 CPU unit vectors, in input order.

        ``values``: a (N, S) wave tensor, or a sequence whose items are each a caption
        (str) or a 1-D wave at ``sample_rate`` Hz (tensor or array); a batch may mix both.
        """
        embedder = self.embedder()
        if isinstance(values, Tensor):
            return embedder.embed_audio(values, self.sample_rate)
        values = list(values)
        texts = [i for i, v in enumerate(values) if isinstance(v, str)]
        waves = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if any(not _is_wave(values[i]) for i in waves):
            kinds = sorted({type(values[i]).__name__ for i in waves if not _is_wave(values[i])})
            raise ValueError(f"CLAP conditioning takes captions or waves, got {', '.join(kinds)}")
        out = torch.zeros((len(values), embedder.dim))
        if texts:
            out[texts] = embedder.embed_text([values[i] for i in texts])
        if waves:
            out[waves] = embedder.embed_audio([values[i] for i in waves], self.sample_rate)
        return out

    def encode(
        self, values: Sequence[Any] | Tensor, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """Captions or waves -> ``{"pooled": (N, dim)}`` on ``device`` in ``dtype``."""
        return {"pooled": self.embeddings(values).to(device=device, dtype=dtype)}

    def null(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """``{"pooled": (1, dim)}`` zeros (no conditioning)."""
        return {"pooled": torch.zeros((1, self.embedder().dim), device=device, dtype=dtype)}
