"""Motion metrics: kinematic artefacts of joint positions, and the HumanML3D text-to-motion
protocol (R-precision, MM-Dist, FID, Diversity, MultiModality) in the embedding space of a
motion-text evaluator.

Kinematic metrics (joints ``(T, 22, 3)`` in metres, Y up, floor at y = 0, :data:`FPS` = 20;
or a batch ``(B, T, 22, 3)`` with valid lengths ``(B,)``; a batch gives the mean over its
motions, each measured on its own valid frames):

* :func:`foot_skating_ratio` - the foot skating ratio of GMD (Karunratanakul et al. 2023),
  as their evaluation computes it: over the T - 1 steps between frames, the share where a
  foot skates. A foot is one of the two toe joints (``left_foot`` 10, ``right_foot`` 11; the
  ankles sit ~6 cm above the floor even when the foot is flat, so they would never count).
  It skates at step t -> t + 1 when it is near the ground in both frames (height < 5 cm)
  and its horizontal (XZ) speed over the step exceeds 0.5 m/s, both the step's own speed and
  its mean over a centred 5-step window (steps outside the motion count as 0). A step
  counts when either foot skates. Dimensionless, in [0, 1].
* :func:`jitter` - mean jerk magnitude: ``|p[t+3] - 3 p[t+2] + 3 p[t+1] - p[t]| * FPS^3``
  (the third forward difference), averaged over the T - 3 steps and all 22 joints; m/s^3.
* :func:`ground_penetration` - mean over frames of how far the lowest joint is below the
  floor, ``max(0, -min_j y)`` (0 on frames above it); metres.
* :func:`floating` - mean over frames of the lowest joint's height when it is more than
  ``tolerance`` (2 cm) above the floor, ``h [h > tolerance]`` with ``h = min_j y`` (0 on
  grounded frames); metres. A jump's flight counts too: compare with real motions.

The text-to-motion protocol (Guo et al. 2022, followed by MDM and later work), on motion
embeddings ``(N, D)`` and text embeddings ``(N, D)`` of the motions' captions:

* :func:`r_precision` - the motions are shuffled (``seed``) and cut into batches of 32
  (an incomplete last batch is left out, as the protocol's loader drops it; fewer than 32
  motions make one batch). Each motion ranks the batch's 32 texts by Euclidean distance;
  top-k is the share of motions whose own caption is among the k nearest. The synthetic set
  has only 12 captions, so a batch holds several texts with the same caption: a hit is any
  text within the top k *with the motion's caption* (not only its own row). With distinct
  captions this is the paper's definition; with 12 captions chance is higher than k/32. (The
  released evaluation code ranks the other way, each text its batch's motions:
  ``ranked_by="text"``.)
* :func:`matching_score` (MM-Dist) - mean Euclidean distance between each motion and its
  caption's embedding.
* :func:`fid` - the Fréchet distance between the Gaussians of two sets of motion embeddings
  (:func:`polydiff.core.metrics.frechet_distance`), in squared embedding units.
* :func:`diversity` - mean distance between ``pairs`` (300) random pairs of embeddings: two
  independent draws of ``pairs`` indices without replacement (so a pair can repeat an index).
* :func:`multimodality` - per prompt, the same over ``pairs`` (10) pairs of the embeddings
  of that prompt's generations; the mean over prompts' pairs.

:class:`MotionEvaluator` is this package's own evaluator, a motion encoder and a text head
trained contrastively on synthetic motions (:mod:`.synthetic`) so that a motion lies near its
caption; bundled in ``bundled/evaluator`` and reproduced by
``OMP_NUM_THREADS=1 python -m polydiff.motion.metrics --train-evaluator DIR``. Its
embeddings are unit vectors, so MM-Dist and Diversity lie in [0, 2]: the numbers are not
comparable with papers' HumanML3D tables, which use Guo's evaluator;
:mod:`.guo` loads that one (``GuoEvaluator.from_folder``) for the same functions.
:func:`evaluate` computes everything for a generated set against real motions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter1d
from torch import Tensor, nn

from polydiff.core.metrics import frechet_distance
from polydiff.core.pretrained import Configurable, from_pretrained, save_pretrained

from .features import FEATURES, FPS, LAYOUT, MAX_FRAMES, features_to_joints, joints_to_features
from .skeleton import FEET, NUM_JOINTS
from .synthetic import CAPTIONS, render

__all__ = [
    "FLOAT_TOLERANCE",
    "SKATING_HEIGHT",
    "SKATING_SPEED",
    "SKATING_WINDOW",
    "MotionEvaluator",
    "MotionTextEncoder",
    "diversity",
    "evaluate",
    "fid",
    "floating",
    "foot_skating_ratio",
    "ground_penetration",
    "jitter",
    "kinematic_metrics",
    "load_evaluator",
    "matching_score",
    "multimodality",
    "padded_features",
    "r_precision",
    "real_motions",
    "train_evaluator",
]

#: GMD's skating thresholds: a toe below 5 cm that moves faster than 0.5 m/s (also on
#: average over a centred window of 5 steps).
SKATING_HEIGHT = 0.05
SKATING_SPEED = 0.5
SKATING_WINDOW = 5
#: Heights of the lowest joint up to this (m) count as standing on the floor (floating).
FLOAT_TOLERANCE = 0.02
_TOES = (FEET["left"][1], FEET["right"][1])
_CONTACTS = LAYOUT["contacts"].start  # the evaluators read the 259 channels before these
_CAPTION_SCALE = 10.0  # 1 / temperature of the evaluator's caption loss
_INSTANCE_SCALE = 10.0  # and of its motion-motion loss


# --- motions in, lengths ---------------------------------------------------------------------


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _motions(joints: Any, lengths: Any | None) -> list[np.ndarray]:
    """(T, 22, 3), (B, T, 22, 3) + lengths, or a list of (T_i, 22, 3) -> the valid parts."""
    if isinstance(joints, (list, tuple)):
        motions = [_as_array(m) for m in joints]
        if lengths is not None:
            motions = [m[: int(n)] for m, n in zip(motions, lengths, strict=True)]
    else:
        array = _as_array(joints)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"expected (T, 22, 3) or (B, T, 22, 3) joints, got {array.shape}")
        if lengths is None:
            lengths = [array.shape[1]] * array.shape[0]
        lengths = [int(n) for n in np.asarray(_as_array(lengths)).reshape(-1)]
        if len(lengths) != array.shape[0]:
            raise ValueError(f"{array.shape[0]} motions but {len(lengths)} lengths")
        if any(not 0 < n <= array.shape[1] for n in lengths):
            raise ValueError(f"lengths must lie in [1, {array.shape[1]}], got {lengths}")
        motions = [m[:n] for m, n in zip(array, lengths, strict=True)]
    for m in motions:
        if m.ndim != 3 or m.shape[1:] != (NUM_JOINTS, 3):
            raise ValueError(f"expected ({NUM_JOINTS}, 3) joints per frame, got {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError("joints hold NaN or infinite values")
    if not motions:
        raise ValueError("no motions given")
    return motions


def _need_frames(motions: list[np.ndarray], frames: int, metric: str) -> None:
    short = min(len(m) for m in motions)
    if short < frames:
        raise ValueError(f"{metric} needs motions of at least {frames} frames, got {short}")


# --- kinematic metrics -----------------------------------------------------------------------


def _skating_one(joints: np.ndarray, fps: float, height: float, speed: float,
                 window: int) -> float:  # fmt: skip
    toes = joints[:, _TOES]  # (T, 2, 3)
    step_speed = np.linalg.norm(np.diff(toes[..., [0, 2]], axis=0), axis=-1) * fps  # (T-1, 2)
    mean_speed = uniform_filter1d(step_speed, size=window, axis=0, mode="constant", cval=0.0)
    low = toes[..., 1] < height
    contact = low[:-1] & low[1:]
    skating = contact & (step_speed > speed) & (mean_speed > speed)
    return float(skating.any(axis=1).mean())


def foot_skating_ratio(joints: Any, lengths: Any | None = None, *, fps: float = FPS,
                       height: float = SKATING_HEIGHT, speed: float = SKATING_SPEED,
                       window: int = SKATING_WINDOW) -> float:  # fmt: skip
    """GMD's foot skating ratio (module doc): the share of frame steps where a toe joint
    within ``height`` m of the floor (in both frames) slides faster than ``speed`` m/s.

    Args:
        joints: (T, 22, 3), (B, T, 22, 3) with ``lengths`` (B,), or a list of (T_i, 22, 3);
            metres, Y up, floor at 0. Every motion needs T >= 2.
        fps: frame rate. height, speed, window: GMD's 0.05 m, 0.5 m/s and 5 steps.

    Returns:
        The ratio in [0, 1], averaged over motions.
    """
    motions = _motions(joints, lengths)
    _need_frames(motions, 2, "foot_skating_ratio")
    return float(np.mean([_skating_one(m, fps, height, speed, window) for m in motions]))


def jitter(joints: Any, lengths: Any | None = None, *, fps: float = FPS) -> float:
    """Mean jerk magnitude (m/s^3): the norm of the third forward difference of each joint's
    position times ``fps ** 3``, averaged over the T - 3 steps and the 22 joints, then over
    motions (each needs T >= 4). ``joints`` as :func:`foot_skating_ratio`."""
    motions = _motions(joints, lengths)
    _need_frames(motions, 4, "jitter")
    values = [np.linalg.norm(np.diff(m, n=3, axis=0), axis=-1).mean() * fps**3 for m in motions]
    return float(np.mean(values))


def ground_penetration(joints: Any, lengths: Any | None = None) -> float:
    """Mean depth of the lowest joint below the floor, ``max(0, -min_j y)`` averaged over
    frames (m), then over motions. ``joints`` as :func:`foot_skating_ratio`."""
    motions = _motions(joints, lengths)
    return float(np.mean([np.clip(-m[..., 1].min(axis=1), 0.0, None).mean() for m in motions]))


def floating(joints: Any, lengths: Any | None = None, *,
             tolerance: float = FLOAT_TOLERANCE) -> float:  # fmt: skip
    """Mean height of the lowest joint above the floor on frames where it exceeds
    ``tolerance`` m (other frames count 0), averaged over frames (m), then over motions.
    ``joints`` as :func:`foot_skating_ratio`."""
    motions = _motions(joints, lengths)
    values = []
    for m in motions:
        lowest = m[..., 1].min(axis=1)
        values.append(np.where(lowest > tolerance, lowest, 0.0).mean())
    return float(np.mean(values))


def kinematic_metrics(joints: Any, lengths: Any | None = None,
                      fps: float = FPS) -> dict[str, float]:  # fmt: skip
    """All four kinematic metrics with their default thresholds: ``{"foot_skating_ratio",
    "jitter" (m/s^3), "ground_penetration" (m), "floating" (m)}``."""
    motions = _motions(joints, lengths)
    return {
        "foot_skating_ratio": foot_skating_ratio(motions, fps=fps),
        "jitter": jitter(motions, fps=fps),
        "ground_penetration": ground_penetration(motions),
        "floating": floating(motions),
    }


# --- the protocol's statistics on embeddings -------------------------------------------------


def _embeddings(values: Any, name: str) -> np.ndarray:
    array = _as_array(values)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _pair(motion_emb: Any, text_emb: Any, captions: Sequence[str] | None = None):
    motions, texts = _embeddings(motion_emb, "motion_emb"), _embeddings(text_emb, "text_emb")
    if motions.shape != texts.shape:
        raise ValueError(f"motion_emb {motions.shape} and text_emb {texts.shape} differ")
    if captions is not None and len(captions) != len(motions):
        raise ValueError(f"{len(motions)} embeddings but {len(captions)} captions")
    return motions, texts


def r_precision(motion_emb: Any, text_emb: Any, captions: Sequence[str], batch: int = 32,
                top: Sequence[int] = (1, 2, 3), seed: int = 0,
                ranked_by: str = "motion") -> dict[int, float]:  # fmt: skip
    """R-precision (module doc): the share of motions whose caption is among the ``k``
    nearest of their batch's texts, for each ``k`` in ``top``.

    Args:
        motion_emb, text_emb: (N, D) embeddings of the motions and of their captions
            (row i of ``text_emb`` is ``captions[i]``'s).
        captions: N captions; texts with the motion's caption count as hits.
        batch: texts ranked per motion (32); the motions are shuffled with ``seed`` and an
            incomplete last batch is dropped (N < batch: one batch of N).
        ranked_by: ``"motion"``: each motion ranks the batch's texts (the paper's
            description); ``"text"``: each text ranks the batch's motions (what the released
            evaluation code computes). Equal when the distances are symmetric in rank.

    Returns:
        ``{k: share of hits}`` for each ``k``.
    """
    motions, texts = _pair(motion_emb, text_emb, captions)
    if ranked_by not in ("motion", "text"):
        raise ValueError(f"ranked_by must be 'motion' or 'text', got {ranked_by!r}")
    if ranked_by == "text":
        motions, texts = texts, motions
    if batch < 1 or any(k < 1 for k in top):
        raise ValueError(f"batch and every top-k must be >= 1, got {batch} and {tuple(top)}")
    order = np.random.default_rng(seed).permutation(len(motions))
    size = min(batch, len(motions))
    labels = np.unique(np.asarray(captions), return_inverse=True)[1]
    hits = {k: 0 for k in top}
    counted = 0
    for start in range(0, len(order) - size + 1, size):
        rows = order[start : start + size]
        distances = np.linalg.norm(motions[rows, None] - texts[None, rows], axis=-1)
        ranked = labels[rows][np.argsort(distances, axis=1, kind="stable")]  # (size, size)
        same = ranked == labels[rows][:, None]
        for k in top:
            hits[k] += int(same[:, :k].any(axis=1).sum())
        counted += size
    return {k: hits[k] / counted for k in top}


def matching_score(motion_emb: Any, text_emb: Any) -> float:
    """MM-Dist: the mean Euclidean distance between each motion's embedding and its
    caption's, rows paired: (N, D), (N, D) -> float (embedding units)."""
    motions, texts = _pair(motion_emb, text_emb)
    return float(np.linalg.norm(motions - texts, axis=1).mean())


def fid(emb_a: Any, emb_b: Any) -> float:
    """Fréchet distance between two sets of motion embeddings (N, D), (M, D) (squared
    embedding units; N, M >= 2)."""
    return frechet_distance(_embeddings(emb_a, "emb_a"), _embeddings(emb_b, "emb_b"))


def diversity(emb: Any, pairs: int = 300, seed: int = 0) -> float:
    """Mean distance between random pairs of the (N, D) embeddings: ``min(pairs, N)`` first
    and as many second indices, each drawn without replacement (rng ``seed``), paired in
    order (embedding units; N >= 2)."""
    array = _embeddings(emb, "emb")
    if len(array) < 2 or pairs < 1:
        raise ValueError(f"diversity needs >= 2 embeddings and pairs >= 1, got {len(array)}")
    rng = np.random.default_rng(seed)
    count = min(pairs, len(array))
    first = rng.choice(len(array), count, replace=False)
    second = rng.choice(len(array), count, replace=False)
    return float(np.linalg.norm(array[first] - array[second], axis=1).mean())


def multimodality(groups: Any, pairs: int = 10, seed: int = 0) -> float:
    """Mean distance between random pairs of generations of the same prompt.

    Args:
        groups: the embeddings of each prompt's generations: a (P, R, D) array, a sequence of
            (R_i, D) arrays or a mapping prompt -> (R_i, D). Groups with fewer than 2 are
            skipped.
        pairs: per group, ``min(pairs, R_i)`` first and as many second indices, each drawn
            without replacement (rng ``seed``, groups in order), paired in order.

    Returns:
        The mean over all groups' pairs (embedding units).
    """
    if isinstance(groups, Mapping):
        groups = list(groups.values())
    elif not isinstance(groups, (list, tuple)):
        array = _as_array(groups)
        if array.ndim != 3:
            raise ValueError(f"groups must be (P, R, D) or a list of (R, D), got {array.shape}")
        groups = list(array)
    rng = np.random.default_rng(seed)
    distances = []
    for group in groups:
        array = _embeddings(group, "a group")
        if len(array) < 2:
            continue
        count = min(pairs, len(array))
        first = rng.choice(len(array), count, replace=False)
        second = rng.choice(len(array), count, replace=False)
        distances.append(np.linalg.norm(array[first] - array[second], axis=1))
    if not distances:
        raise ValueError("multimodality needs a prompt with at least 2 generations")
    return float(np.concatenate(distances).mean())


# --- evaluators ------------------------------------------------------------------------------


@runtime_checkable
class MotionTextEncoder(Protocol):
    """What :func:`evaluate` needs of an evaluator (:class:`MotionEvaluator`,
    :class:`~polydiff.motion.guo.GuoEvaluator`)."""

    def embed_motion(self, features: Any, lengths: Any | None = None) -> Tensor: ...

    def embed_text(self, captions: Sequence[Any]) -> Tensor: ...


def padded_features(features: Any, lengths: Any | None = None) -> tuple[Tensor, Tensor]:
    """Features as a zero-padded float32 batch: (B, T, 263) + lengths (B,), a list of
    (T_i, 263) arrays / tensors (lengths from their sizes), or one (T, 263) motion ->
    ``(features (B, T, 263), lengths (B,) long)`` on the CPU, zeros past each length."""
    if isinstance(features, (list, tuple)):
        items = [torch.as_tensor(_as_array(f), dtype=torch.float32) for f in features]
        if any(f.dim() != 2 for f in items):
            raise ValueError("each motion's features must be (T, 263)")
        if lengths is None:
            lengths = [len(f) for f in items]
        longest = max((len(f) for f in items), default=0)
        batch = torch.zeros(len(items), longest, FEATURES)
        for i, f in enumerate(items):
            if f.shape[-1] != FEATURES:
                raise ValueError(f"expected (T, {FEATURES}) features, got {tuple(f.shape)}")
            batch[i, : len(f)] = f
    else:
        batch = torch.as_tensor(_as_array(features), dtype=torch.float32)
        if batch.dim() == 2:
            batch = batch[None]
    if batch.dim() != 3 or batch.shape[-1] != FEATURES or batch.shape[0] == 0:
        raise ValueError(f"expected (B, T, {FEATURES}) features, got {tuple(batch.shape)}")
    if lengths is None:
        lengths = [batch.shape[1]] * batch.shape[0]
    lengths = torch.as_tensor(_as_array(lengths).reshape(-1)).long()
    if len(lengths) != batch.shape[0]:
        raise ValueError(f"{batch.shape[0]} motions but {len(lengths)} lengths")
    if bool(((lengths < 1) | (lengths > batch.shape[1])).any()):
        raise ValueError(f"lengths must lie in [1, {batch.shape[1]}], got {lengths.tolist()}")
    if not bool(torch.isfinite(batch).all()):
        raise ValueError("features hold NaN or infinite values")
    valid = torch.arange(batch.shape[1])[None] < lengths[:, None]
    return batch * valid[..., None], lengths


class _Block(nn.Module):
    """Pre-norm residual temporal convolution (dilated, kernel 3), zero past the length."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(width, width, 1)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """(B, W, T), (B, 1, T) -> (B, W, T)."""
        # Masked again after the norm: its bias would make the padding nonzero.
        x = self.norm(h.transpose(1, 2)).transpose(1, 2) * mask
        return (h + self.mix(F.gelu(self.conv(x)))) * mask


class MotionEvaluator(Configurable, nn.Module):
    """A motion encoder and a text head that embed a motion near its caption (unit vectors of
    ``embed_dim``), for R-precision, MM-Dist, FID, Diversity and MultiModality.

    Motion side: (B, T, 263) HumanML3D features (unnormalised, as :func:`joints_to_features`
    gives them) and lengths; normalised by the training set's per-channel mean and std
    (buffers; each std floored at a tenth of its feature group's mean std, so a channel that
    hardly varies in real data does not blow up a generator's small error), the 4 contact
    channels dropped (259 left, as Guo's evaluator). A per-frame linear layer, a stride-2
    convolution, dilated residual convolutions (receptive field ~2.5 s), mean and max pooling
    over the valid frames, an MLP. Padding is zeroed after every layer, so an embedding does
    not depend on the batch it is in.

    Text side: the pooled sentence embedding of the frozen text encoder ``text_encoder``
    (None: the bundled all-MiniLM-L6-v2, loaded on first use and shared through
    :class:`polydiff.core.modality.TextConditioner`) and an MLP. Only the MLP is saved.
    """

    def __init__(self, width: int = 128, embed_dim: int = 128, dilations: Sequence[int] = (1, 2, 4),
                 text_encoder: str | None = None, text_max_length: int = 16,
                 text_dim: int = 384, text_hidden: int = 256) -> None:  # fmt: skip
        super().__init__()
        self.text_encoder = text_encoder
        self.text_max_length = text_max_length
        self.text_dim = text_dim
        self.register_buffer("mean", torch.zeros(FEATURES))
        self.register_buffer("std", torch.ones(FEATURES))
        self.proj = nn.Linear(_CONTACTS, width)
        self.down = nn.Conv1d(width, width, 4, stride=2, padding=1)
        self.blocks = nn.ModuleList(_Block(width, d) for d in dilations)
        self.motion_head = nn.Sequential(
            nn.LayerNorm(2 * width), nn.Linear(2 * width, width), nn.GELU(),
            nn.Linear(width, embed_dim),
        )  # fmt: skip
        self.text_head = nn.Sequential(
            nn.Linear(text_dim, text_hidden), nn.GELU(), nn.Linear(text_hidden, embed_dim)
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def set_statistics(self, features: Tensor, lengths: Tensor) -> None:
        """Set the normalisation from (N, T, 263) real features and lengths (N,)."""
        valid = torch.arange(features.shape[1])[None] < lengths[:, None]
        frames = features[valid].double()
        mean, std = frames.mean(0), frames.std(0)
        for part in LAYOUT.values():
            std[part] = std[part].clamp_min(0.1 * float(std[part].mean()) + 1e-8)
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())

    def motion_features(self, features: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, 263) padded features, (B,) lengths -> (B, 2 W) pooled, before the head."""
        features, lengths = features.to(self.device), lengths.to(self.device)
        frames = torch.arange(features.shape[1], device=self.device)
        mask = (frames[None] < lengths[:, None]).float()[:, None]  # (B, 1, T)
        x = ((features - self.mean) / self.std)[..., :_CONTACTS]
        h = self.proj(x).transpose(1, 2) * mask
        if h.shape[-1] % 2:  # the stride-2 convolution sees whole pairs of frames
            h, mask = F.pad(h, (0, 1)), F.pad(mask, (0, 1))
        h = self.down(h)
        mask = mask[..., ::2]  # output i covers frames 2i - 1 .. 2i + 2: valid while 2i < L
        h = h * mask
        for block in self.blocks:
            h = block(h, mask)
        count = mask.sum(-1).clamp_min(1.0)
        mean = h.sum(-1) / count
        peak = h.masked_fill(mask == 0, -torch.inf).amax(-1)
        return torch.cat([mean, peak], dim=1)

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, 263) padded features, (B,) lengths -> (B, embed_dim) unit embeddings."""
        return F.normalize(self.motion_head(self.motion_features(features, lengths)), dim=-1)

    def text_head_embedding(self, pooled: Tensor) -> Tensor:
        """(B, text_dim) pooled sentence embeddings -> (B, embed_dim) unit embeddings."""
        return F.normalize(self.text_head(pooled.to(self.device)), dim=-1)

    def pooled_text(self, captions: Sequence[str]) -> Tensor:
        """(B, text_dim) the frozen text encoder's pooled embeddings of ``captions``."""
        from polydiff.core.modality import TextConditioner

        conditioner = TextConditioner(self.text_encoder, self.text_max_length)
        pooled = conditioner.encode(list(captions), self.device, torch.float32)["pooled"]
        if pooled.shape[-1] != self.text_dim:
            raise ValueError(
                f"text encoder {self.text_encoder or 'all-MiniLM-L6-v2'} gives {pooled.shape[-1]}"
                f"-d embeddings; this evaluator was trained on {self.text_dim}-d ones"
            )
        return pooled

    @torch.no_grad()
    def embed_motion(self, features: Any, lengths: Any | None = None) -> Tensor:
        """Features (see :func:`padded_features`) -> (B, embed_dim) unit embeddings (CPU)."""
        batch, lengths = padded_features(features, lengths)
        out = [self(batch[i : i + 256], lengths[i : i + 256]) for i in range(0, len(batch), 256)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """B captions -> (B, embed_dim) unit embeddings (CPU)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a sequence of strings")
        return self.text_head_embedding(self.pooled_text(captions)).cpu()


# --- training the evaluator on synthetic motions ---------------------------------------------


def real_motions(count: int, seed: int = 0, joint_noise: float = 0.0
                 ) -> tuple[Tensor, Tensor, list[str]]:  # fmt: skip
    """``count`` synthetic motions, the captions in turn (rng ``seed``), as features:
    ``(features (count, 195, 263) zero-padded, lengths (count,), captions)``.

    ``joint_noise`` > 0 adds Gaussian noise of that standard deviation (m) to every joint
    position before the features are computed: consistent feature noise, as a generator's
    imprecise joints give."""
    rng = np.random.default_rng(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    batch = torch.zeros(count, MAX_FRAMES - 1, FEATURES)
    lengths = torch.zeros(count, dtype=torch.long)
    for i, caption in enumerate(captions):
        joints = render(caption, rng)
        if joint_noise > 0:
            joints = joints + rng.normal(0.0, joint_noise, joints.shape)
        features = torch.from_numpy(joints_to_features(joints))
        batch[i, : len(features)] = features
        lengths[i] = len(features)
    return batch, lengths, captions


def _augment(model: MotionEvaluator, features: Tensor, lengths: Tensor, noisy: Tensor,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A generator's imprecision on a (B, T, 263) batch: on 60 % of the motions a random crop
    to 70-100 % of their length; on the ``noisy`` ones (B,) bool, white Gaussian noise of
    0-0.3 normalised units and, on half of those, slow noise (linearly interpolated between
    knots ~0.5 s apart) of 0-0.3 units."""
    batch, frames, _ = features.shape
    crop = torch.rand(batch, generator=generator) < 0.6
    keep = torch.empty(batch).uniform_(0.7, 1.0, generator=generator)
    new_lengths = torch.where(crop, (lengths * keep).long().clamp_min(8), lengths)
    new_lengths = torch.minimum(new_lengths, lengths)
    start = (torch.rand(batch, generator=generator) * (lengths - new_lengths + 1)).long()
    index = (start[:, None] + torch.arange(frames)[None]).clamp_max(frames - 1)
    out = features.gather(1, index[..., None].expand(-1, -1, FEATURES))
    scale = model.std
    noisy = noisy.float()[:, None, None]
    white = torch.empty(batch, 1, 1).uniform_(0.0, 0.3, generator=generator) * noisy
    out = out + white * scale * torch.randn(out.shape, generator=generator)
    slow = torch.empty(batch, 1, 1).uniform_(0.0, 0.3, generator=generator) * noisy
    slow = slow * (torch.rand(batch, 1, 1, generator=generator) < 0.5)
    knots = torch.randn(batch, FEATURES, frames // 10 + 2, generator=generator)
    drift = F.interpolate(knots, size=frames, mode="linear", align_corners=True).transpose(1, 2)
    out = out + slow * scale * drift
    valid = torch.arange(frames)[None] < new_lengths[:, None]
    return out * valid[..., None], new_lengths


def _caption_loss(motion: Tensor, text: Tensor, labels: Tensor) -> Tensor:
    """Symmetric InfoNCE between (B, D) motion embeddings and (C, D) caption embeddings with
    (B,) caption labels: each motion picks its caption among the C; each caption in the batch
    picks its motions among the B (all of them positives, averaged). A fixed temperature
    (0.1) rather than a learned one: it is met once a motion is clearly nearest its caption,
    so the motions of one caption are not pulled onto a single point."""
    logits = _CAPTION_SCALE * motion @ text.T  # (B, C)
    to_text = F.cross_entropy(logits, labels)
    present = labels.unique()
    log_prob = logits.T[present].log_softmax(dim=1)  # (C', B)
    positive = (labels[None] == present[:, None]).float()
    to_motion = -(log_prob * positive).sum(1).div(positive.sum(1)).mean()
    return (to_text + to_motion) / 2


def _instance_loss(view_a: Tensor, view_b: Tensor, rows: Tensor) -> Tensor:
    """Symmetric InfoNCE between two cropped views (B, D) of the same B motions: each of the
    ``rows`` (B,) bool picks its twin among the batch. It keeps what tells one motion from
    another of the same caption (speed, amplitude, timing) in the embedding, which FID and
    Diversity need. Only motions without feature noise are rows (noisy ones are negatives),
    so the embedding is not taught to ignore noise, and FID still sees it."""
    logits = _INSTANCE_SCALE * view_a @ view_b.T
    target = torch.arange(len(view_a))[rows]
    return (F.cross_entropy(logits[rows], target) + F.cross_entropy(logits.T[rows], target)) / 2


@torch.no_grad()
def _report(model: MotionEvaluator, seed: int, count: int, log: Any) -> dict[str, float]:
    """The protocol on ``count`` held-out real motions (seed ``seed``), clean and with
    :func:`_augment`'s noise: R-precision, MM-Dist, Diversity, the spread within a caption
    (MultiModality over the motions of each caption), and the FID of each set against another
    ``count`` real motions (seed + 1)."""
    features, lengths, captions = real_motions(count, seed)
    other, other_lengths, _ = real_motions(count, seed + 1)
    reference = model.embed_motion(other, other_lengths)
    text = model.embed_text(captions)
    report: dict[str, float] = {}
    every = torch.ones(count, dtype=torch.bool)
    noisy = _augment(model, features, lengths, every, torch.Generator().manual_seed(seed))
    for name, (f, n) in (("clean", (features, lengths)), ("noisy", noisy)):
        motion = model.embed_motion(f, n)
        precision = r_precision(motion, text, captions)
        report.update({f"{name}_r_precision_top{k}": v for k, v in precision.items()})
        report[f"{name}_matching_score"] = matching_score(motion, text)
        report[f"{name}_diversity"] = diversity(motion)
        groups = [motion[[c == caption for c in captions]] for caption in CAPTIONS]
        groups = [g for g in groups if len(g) > 1]
        report[f"{name}_within_caption"] = multimodality(groups) if groups else math.nan
        report[f"{name}_fid_vs_real"] = fid(motion, reference)
    log(", ".join(f"{k} {v:.4f}" for k, v in report.items()))
    return report


def train_evaluator(out: str | os.PathLike[str], *, steps: int = 1000, count: int = 2400,
                    seed: int = 0, held_out: int = 480,
                    log: Any = print) -> MotionEvaluator:  # fmt: skip
    """Train the evaluator on ``count`` synthetic motions (the captions in turn, rng
    ``seed``) and save it to ``out``.

    Another ``count // 2`` motions (rng ``seed + 100``) get 1 cm of joint noise before their
    features are computed. Each step takes 64 motions in two :func:`_augment`-ed views each
    (crops; feature noise on half of the motions, the same half in both views); the loss is
    :func:`_caption_loss` of both views against the 12 captions' embeddings (the frozen
    encoder's pooled vectors plus Gaussian noise of 0.01 a channel, so the text head is smooth
    around them) plus :func:`_instance_loss` between the views of the noise-free half; AdamW,
    a one-cycle learning rate. Logs the R-precision, MM-Dist, Diversity and FID against real
    motions of ``held_out`` motions rendered with seeds ``seed + 1`` and ``seed + 2``
    (:func:`_report`).
    """
    torch.manual_seed(seed)
    clean, lengths, captions = real_motions(count, seed)
    noisy, noisy_lengths, _ = real_motions(count // 2, seed + 100, joint_noise=0.01)
    pool = torch.cat([clean, noisy])
    pool_lengths = torch.cat([lengths, noisy_lengths])
    labels = torch.tensor([CAPTIONS.index(c) for c in captions + captions[: len(noisy)]])
    model = MotionEvaluator()
    model.set_statistics(clean, lengths)
    with torch.no_grad():
        caption_pooled = model.pooled_text(CAPTIONS).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(pool), (64,), generator=generator)
        batch_lengths = pool_lengths[idx]
        batch = pool[idx, : int(batch_lengths.max())]
        noisy = torch.rand(64, generator=generator) < 0.5
        view_a = model(*_augment(model, batch, batch_lengths, noisy, generator))
        view_b = model(*_augment(model, batch, batch_lengths, noisy, generator))
        pooled = caption_pooled + 0.01 * torch.randn(caption_pooled.shape, generator=generator)
        text = model.text_head_embedding(pooled)
        caption = _caption_loss(view_a, text, labels[idx]) + _caption_loss(
            view_b, text, labels[idx]
        )
        loss = caption / 2 + _instance_loss(view_a, view_b, ~noisy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    _report(model, seed + 1, held_out, log)
    save_pretrained(model, out)
    return model


_BUNDLED_EVALUATOR = Path(__file__).resolve().parent / "bundled" / "evaluator"


def load_evaluator(folder: str | os.PathLike[str] | None = None) -> MotionEvaluator:
    """A trained :class:`MotionEvaluator` (None: the bundled one), in eval mode."""
    model = from_pretrained(_BUNDLED_EVALUATOR if folder is None else folder)
    if not isinstance(model, MotionEvaluator):
        raise ValueError(f"{folder} is not a MotionEvaluator checkpoint")
    return model.eval()


# --- the whole protocol ----------------------------------------------------------------------


@torch.no_grad()
def evaluate(generated_features: Any, lengths: Any | None, captions: Sequence[Any],
             real_features: Any, real_lengths: Any | None, real_captions: Sequence[Any],
             evaluator: MotionTextEncoder | None = None, *, batch: int = 32,
             diversity_pairs: int = 300, multimodality_pairs: int = 10, seed: int = 0,
             kinematic: bool = True) -> dict[str, float]:  # fmt: skip
    """The text-to-motion protocol for a generated set against real motions.

    Args:
        generated_features: (B, T, 263) features (zero-padded) with ``lengths`` (B,), or a
            list of (T_i, 263) with ``lengths`` None; ``captions``: their B prompts (strings,
            or for :class:`~polydiff.motion.guo.GuoEvaluator` also word/POS tokens).
        real_features, real_lengths, real_captions: the same for real motions.
        evaluator: anything with ``embed_motion`` / ``embed_text`` (default the bundled
            :class:`MotionEvaluator`).
        batch, diversity_pairs, multimodality_pairs, seed: as :func:`r_precision`,
            :func:`diversity`, :func:`multimodality`.
        kinematic: also the kinematic metrics of the generated motions (their joints by
            :func:`~.features.features_to_joints`).

    Returns:
        ``r_precision_top1/2/3``, ``matching_score``, ``fid`` (generated vs real),
        ``diversity``, ``multimodality`` (generations grouped by prompt; NaN when no prompt
        has two), the same ``real_*`` R-precision, matching score and diversity of the real
        set (the reference row of the tables) and, with ``kinematic``, ``foot_skating_ratio``,
        ``jitter``, ``ground_penetration``, ``floating`` of the generated motions and
        ``real_*`` ones.
    """
    model = evaluator if evaluator is not None else load_evaluator()
    generated, lengths = padded_features(generated_features, lengths)
    real, real_lengths = padded_features(real_features, real_lengths)
    if len(captions) != len(generated) or len(real_captions) != len(real):
        raise ValueError(
            f"{len(generated)} generated motions with {len(captions)} captions, {len(real)} "
            f"real ones with {len(real_captions)}"
        )
    report: dict[str, float] = {}
    embedded: dict[str, np.ndarray] = {}
    for prefix, features, n, texts in (("", generated, lengths, captions),
                                       ("real_", real, real_lengths, real_captions)):  # fmt: skip
        motion = model.embed_motion(features, n).double().numpy()
        text = model.embed_text(list(texts)).double().numpy()
        keys = [c if isinstance(c, str) else " ".join(c) for c in texts]
        precision = r_precision(motion, text, keys, batch=batch, seed=seed)
        report.update({f"{prefix}r_precision_top{k}": v for k, v in precision.items()})
        report[f"{prefix}matching_score"] = matching_score(motion, text)
        report[f"{prefix}diversity"] = diversity(motion, diversity_pairs, seed)
        embedded[prefix] = motion
        if prefix == "":
            groups: dict[str, list[np.ndarray]] = {}
            for key, row in zip(keys, motion, strict=True):
                groups.setdefault(key, []).append(row)
            stacked = [np.stack(g) for g in groups.values() if len(g) > 1]
            report["multimodality"] = (
                multimodality(stacked, multimodality_pairs, seed) if stacked else math.nan
            )
    report["fid"] = fid(embedded[""], embedded["real_"])
    if kinematic:
        for prefix, features, n in (("", generated, lengths), ("real_", real, real_lengths)):
            joints = features_to_joints(features.double()).numpy()
            metrics = kinematic_metrics([j[: int(k)] for j, k in zip(joints, n, strict=True)])
            report.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m polydiff.motion.metrics --train-evaluator DIR``: reproduce the bundled one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m polydiff.motion.metrics")
    parser.add_argument("--train-evaluator", metavar="DIR", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--count", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=480)
    args = parser.parse_args(argv)
    train_evaluator(args.train_evaluator, steps=args.steps, count=args.count, seed=args.seed,
                    held_out=args.held_out)  # fmt: skip
    return 0


if __name__ == "__main__":
    # Run from the imported module, so the checkpoint records the class as
    # "polydiff.motion.metrics:MotionEvaluator" rather than "__main__:MotionEvaluator".
    from polydiff.motion.metrics import main as _main

    raise SystemExit(_main())
