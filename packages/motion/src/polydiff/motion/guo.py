"""The HumanML3D evaluator of Guo et al. 2022 ("Generating Diverse and Natural 3D Human
Motions from Text", CVPR), which papers' text-to-motion tables use, from a folder the user
supplies. Nothing here downloads; the files are the ones released with that paper.

Folder layout read by :meth:`GuoEvaluator.from_folder` (each part can also be passed
explicitly)::

    FOLDER/finest.tar            the text_mot_match checkpoint (or FOLDER/model/finest.tar,
                                 FOLDER/text_mot_match/model/finest.tar)
    FOLDER/glove/our_vab_data.npy   (V, 300) GloVe vectors
    FOLDER/glove/our_vab_words.pkl  the V words (a pickled list)
    FOLDER/glove/our_vab_idx.pkl    word -> row (a pickled dict)
    FOLDER/meta/mean.npy, std.npy   (263,) the evaluator's feature normalisation

Safety: the checkpoint is read with ``torch.load(weights_only=True)`` (tensors and plain
containers only); the two ``.pkl`` files with an unpickler whose ``find_class`` refuses every
global, so only lists, dicts, strings and numbers load and no code can run (a pickle naming
any class or function is a ValueError); the ``.npy`` files with ``allow_pickle=False``.

The networks, whose state-dict keys match the checkpoint's ``text_encoder``,
``movement_encoder`` and ``motion_encoder`` entries (sizes are read from the weights; the
released ones are in brackets):

* :class:`MovementConvEncoder` - over the normalised features minus the 4 foot contacts
  (259): ``main`` = Conv1d(259, 512, k4 s2 p1), Dropout(0.2), LeakyReLU(0.2), Conv1d(512, 512,
  k4 s2 p1), Dropout, LeakyReLU; ``out_net`` Linear(512, 512). One movement per 4 frames
  (the *unit length*).
* :class:`MotionEncoderBiGRUCo` - ``input_emb`` Linear(512, 1024), a bidirectional GRU
  (1024) from a learned initial state ``hidden`` (2, 1, 1024) over the first
  ``length // 4`` movements, ``output_net`` = Linear(2048, 1024), LayerNorm, LeakyReLU(0.2),
  Linear(1024, 512) on the two directions' last states.
* :class:`TextEncoderBiGRUCo` - per token a 300-d GloVe vector plus ``pos_emb`` Linear(15,
  300) of its one-hot part of speech, ``input_emb`` Linear(300, 512), a bidirectional GRU
  (512) from a learned ``hidden``, ``output_net`` as above to 512.

Text: HumanML3D's captions are word/POS tokens from spaCy, nouns and verbs lemmatised
("a/DET person/NOUN walk/VERB forward/ADV"). :meth:`GuoEvaluator.embed_text` takes such
tokens (a list, or a string of them) or plain text, which :func:`pos_tokens` tags with a
small lexicon (below). Every caption becomes ``sos`` + its first 20 tokens + ``eos``, padded
with ``unk`` to 22; a word outside the vocabulary is ``unk`` with the OTHER tag, and a word of
the evaluator's VIP lists (:data:`VIP_WORDS`) takes that list's tag instead of its own.

Motions: (B, T, 263) HumanML3D features; each length is rounded down to a multiple of 4 (the
protocol's loader crops them so), the features normalised by ``meta/mean.npy`` and
``std.npy``, zero past the length up to 196 frames (as the protocol pads them), and the motion
encoder runs over ``length // 4`` movements. Lengths below 4 frames are a ValueError.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .metrics import padded_features

__all__ = [
    "MAX_MOTION_FRAMES",
    "MAX_TEXT_TOKENS",
    "POS_TAGS",
    "UNIT_LENGTH",
    "VIP_WORDS",
    "GuoEvaluator",
    "MotionEncoderBiGRUCo",
    "MovementConvEncoder",
    "TextEncoderBiGRUCo",
    "WordVectorizer",
    "load_plain_pickle",
    "pos_tokens",
]

#: The one-hot part-of-speech order of the evaluator (index = position).
POS_TAGS: tuple[str, ...] = (
    "VERB", "NOUN", "DET", "ADP", "NUM", "AUX", "PRON", "ADJ", "ADV",
    "Loc_VIP", "Body_VIP", "Obj_VIP", "Act_VIP", "Desc_VIP", "OTHER",
)  # fmt: skip
#: Words whose tag the evaluator replaces by their list's (the released lists).
VIP_WORDS: dict[str, tuple[str, ...]] = {
    "Loc_VIP": ("left", "right", "clockwise", "counterclockwise", "anticlockwise", "forward",
                "back", "backward", "up", "down", "straight", "curve"),
    "Body_VIP": ("arm", "chin", "foot", "feet", "face", "hand", "mouth", "leg", "waist", "eye",
                 "knee", "shoulder", "thigh"),
    "Obj_VIP": ("stair", "dumbbell", "chair", "window", "floor", "car", "ball", "handrail",
                "baseball", "basketball"),
    "Act_VIP": ("walk", "run", "swing", "pick", "bring", "kick", "put", "squat", "throw", "hop",
                "dance", "jump", "turn", "stumble", "dance", "stop", "sit", "lift", "lower",
                "raise", "wash", "stand", "kneel", "stroll", "rub", "bend", "balance", "flap",
                "jog", "shuffle", "lean", "rotate", "spin", "spread", "climb"),
    "Desc_VIP": ("slowly", "carefully", "fast", "careful", "slow", "quickly", "happy", "angry",
                 "sad", "happily", "angrily", "sadly"),
}  # fmt: skip
#: Tokens of a caption the text encoder reads (plus sos and eos).
MAX_TEXT_TOKENS = 20
#: Frames per movement of the movement encoder (two stride-2 convolutions).
UNIT_LENGTH = 4
#: The protocol's padded motion length (frames).
MAX_MOTION_FRAMES = 196
_FEATURES = 263
_CONTACTS = 4


# --- reading the released files safely --------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what needs no global: lists, tuples, dicts, sets, strings, numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to the global {module}.{name}")


def load_plain_pickle(path: str | os.PathLike[str]) -> Any:
    """A pickle that holds only plain containers, strings and numbers; anything else (a
    class, a function, a persistent id) is refused before it is called.

    Raises:
        ValueError: (one line) the file is missing, is not a pickle, or names a global.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        why = str(e).splitlines()[0] if str(e) else "invalid data"
        raise ValueError(
            f"refusing {path}: {why}; only plain lists/dicts of strings and numbers are read"
        ) from None
    except Exception as e:  # truncated or foreign data: EOFError, struct/Value errors
        raise ValueError(f"{path} is not a readable pickle ({type(e).__name__})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read {path} as a plain .npy array: {str(e).splitlines()[0]}"
        ) from None


# --- the networks --------------------------------------------------------------------------


def _co_embedding_head(hidden: int, output: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2 * hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, output),
    )  # fmt: skip


def _last_states(gru: nn.GRU, start: Tensor, inputs: Tensor, lengths: Tensor) -> Tensor:
    """(B, L, H) inputs, (B,) lengths -> (B, 2 H): both directions' final states."""
    packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
    _, last = gru(packed, start.expand(-1, inputs.shape[0], -1).contiguous())
    return torch.cat([last[0], last[1]], dim=-1)


class MovementConvEncoder(nn.Module):
    """(B, T, input_size) normalised features (no contacts) -> (B, T // 4, output_size)."""

    def __init__(self, input_size: int = 259, hidden_size: int = 512,
                 output_size: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv1d(input_size, hidden_size, 4, 2, 1), nn.Dropout(0.2), nn.LeakyReLU(0.2),
            nn.Conv1d(hidden_size, output_size, 4, 2, 1), nn.Dropout(0.2), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.out_net = nn.Linear(output_size, output_size)

    def forward(self, features: Tensor) -> Tensor:
        return self.out_net(self.main(features.transpose(1, 2)).transpose(1, 2))


class MotionEncoderBiGRUCo(nn.Module):
    """(B, L, input_size) movements, (B,) counts -> (B, output_size) motion embedding."""

    def __init__(self, input_size: int = 512, hidden_size: int = 1024,
                 output_size: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.input_emb = nn.Linear(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_net = _co_embedding_head(hidden_size, output_size)
        self.hidden = nn.Parameter(torch.randn(2, 1, hidden_size))

    def forward(self, movements: Tensor, lengths: Tensor) -> Tensor:
        states = _last_states(self.gru, self.hidden, self.input_emb(movements), lengths)
        return self.output_net(states)


class TextEncoderBiGRUCo(nn.Module):
    """(B, L, word_size) word vectors, (B, L, pos_size) one-hot tags, (B,) lengths ->
    (B, output_size) text embedding."""

    def __init__(self, word_size: int = 300, pos_size: int = len(POS_TAGS),
                 hidden_size: int = 512, output_size: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.pos_emb = nn.Linear(pos_size, word_size)
        self.input_emb = nn.Linear(word_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_net = _co_embedding_head(hidden_size, output_size)
        self.hidden = nn.Parameter(torch.randn(2, 1, hidden_size))

    def forward(self, words: Tensor, pos: Tensor, lengths: Tensor) -> Tensor:
        inputs = self.input_emb(words + self.pos_emb(pos))
        return self.output_net(_last_states(self.gru, self.hidden, inputs, lengths))


# --- words ---------------------------------------------------------------------------------


def _one_hot(tag: str) -> np.ndarray:
    vector = np.zeros(len(POS_TAGS), dtype=np.float32)
    vector[POS_TAGS.index(tag) if tag in POS_TAGS else POS_TAGS.index("OTHER")] = 1.0
    return vector


_VIP_TAG = {word: tag for tag, words in VIP_WORDS.items() for word in words}


class WordVectorizer:
    """``"word/POS"`` tokens -> (GloVe vector, one-hot tag), as the evaluator was trained:
    unknown words are ``unk``/OTHER, VIP words take their list's tag.

    Args:
        vectors: (V, W) word vectors. words: the vocabulary. index: word -> row.
    """

    def __init__(self, vectors: np.ndarray, words: Sequence[str], index: Mapping[str, int]) -> None:
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(f"word vectors must be (V, W), got shape {self.vectors.shape}")
        self.word_to_row: dict[str, int] = {}
        for word in words:
            row = index.get(word)
            if not isinstance(row, int) or not 0 <= row < len(self.vectors):
                raise ValueError(f"word {word!r} has no row in the {len(self.vectors)} vectors")
            self.word_to_row[word] = row
        missing = [w for w in ("sos", "eos", "unk") if w not in self.word_to_row]
        if missing:
            raise ValueError(f"the vocabulary lacks the special words {missing}")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], prefix: str = "our_vab") -> WordVectorizer:
        """Read ``{prefix}_data.npy``, ``{prefix}_words.pkl`` (a list) and
        ``{prefix}_idx.pkl`` (a dict) from ``folder`` (the pickles safely, see the module)."""
        folder = Path(folder)
        vectors = _load_npy(folder / f"{prefix}_data.npy")
        words = load_plain_pickle(folder / f"{prefix}_words.pkl")
        index = load_plain_pickle(folder / f"{prefix}_idx.pkl")
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{folder / f'{prefix}_words.pkl'} must hold a list of words")
        if not isinstance(index, dict):
            raise ValueError(f"{folder / f'{prefix}_idx.pkl'} must hold a dict word -> index")
        return cls(vectors, words, index)

    def __getitem__(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        word, _, tag = token.rpartition("/")
        if word in self.word_to_row:
            vector = self.vectors[self.word_to_row[word]]
            return vector, _one_hot(_VIP_TAG.get(word, tag))
        return self.vectors[self.word_to_row["unk"]], _one_hot("OTHER")

    def encode(self, tokens: Sequence[str], max_tokens: int = MAX_TEXT_TOKENS
               ) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
        """One caption: ``sos`` + its first ``max_tokens`` tokens + ``eos``, padded with
        ``unk`` -> ((max_tokens + 2, W) vectors, (max_tokens + 2, 15) tags, length)."""
        body = ["sos/OTHER", *list(tokens)[:max_tokens], "eos/OTHER"]
        padded = body + ["unk/OTHER"] * (max_tokens + 2 - len(body))
        pairs = [self[t] for t in padded]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), len(body)


# --- a small part-of-speech tagger for plain captions ------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_DET = _words("a an the this that these those each every some any another both all no")
_PRON = _words(
    "he she it they him her them his its their someone somebody himself herself itself "
    "themselves i me my you your we us our something anything nothing everything"
)
_POSSESSIVE = _words("his her its their my your our")
_ADP = _words(
    "with in on at to from into onto over under above below behind across through by of for "
    "toward towards after before like along off near against between beside around"
)
_AUX = _words(
    "is are was were be been being am does do did has have had can will would should could may "
    "might must"
)
_CONJ = _words("and or but while as if so because")
_NUMBERS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve twenty thirty"
)
_ADV = _words(
    "forward forwards backward backwards back up down away again sideways together very still "
    "out once twice straight around here there also quite just too far then"
)
_ADJ = _words(
    "left right slow fast big small large high low other few several whole long short wide "
    "sad happy angry quick tall little same full half circular heavy light"
)
_VERBS = _words(
    "walk run jog sprint jump hop leap squat sit stand wave raise lift lower kick throw catch "
    "turn spin rotate step move bend lean crouch kneel dance swing stretch climb punch push "
    "pull pick put bring hold reach clap shake stop start go come look crawl fall stumble "
    "balance rub wash shuffle stroll march skip bow nod get take make perform flap spread "
    "cross drop lie rise roll slide twist tilt wipe point hit grab carry open close play "
    "drink eat pace limp tiptoe swim fly lunge rest keep begin wait"
)
_IRREGULAR = {
    "ran": "run", "sat": "sit", "stood": "stand", "went": "go", "goes": "go", "threw": "throw",
    "thrown": "throw", "took": "take", "taken": "take", "held": "hold", "fell": "fall",
    "fallen": "fall", "got": "get", "swung": "swing", "spun": "spin", "knelt": "kneel",
    "bent": "bend", "came": "come", "caught": "catch", "leapt": "leap", "rose": "rise",
    "feet": "foot", "men": "man", "women": "woman", "people": "person", "children": "child",
    "lying": "lie", "began": "begin",
}  # fmt: skip


def _lemma(word: str, tag: str) -> str:
    """A noun's or verb's lemma by rule: irregular forms; else of the candidates from -ies,
    -es, -s (and for verbs -ing, -ed) the first that is a known verb; else the plain rule
    (a verb's -ing / -ed stem without a doubled final consonant, a plural's singular)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    plural: list[str] = []
    if word.endswith("ies") and len(word) > 4:
        plural.append(word[:-3] + "y")
    if re.search(r"(ch|sh|ss|x|z)es$", word):
        plural.append(word[:-2])
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        plural.append(word[:-1])
    verbal: list[str] = []
    if tag == "VERB":
        for suffix in ("ing", "ed"):
            if word.endswith(suffix) and len(word) > len(suffix) + 2:
                stem = word[: -len(suffix)]
                undoubled = stem[:-1] if stem[-1] == stem[-2] and stem[-1] not in "lsz" else stem
                verbal += [stem, stem + "e", stem[:-1] + "y", undoubled]
                break
    for candidate in (*plural, *verbal):
        if candidate in _VERBS:
            return candidate
    if verbal:
        return verbal[-1]
    return plural[0] if plural else word


def _known_verb(word: str) -> bool:
    return _lemma(word, "VERB") in _VERBS


def pos_tokens(text: str) -> list[str]:
    """Plain English caption -> HumanML3D-style ``word/POS`` tokens, lowercased, punctuation
    and hyphens dropped, nouns and verbs lemmatised ("a person walks forward" ->
    ``["a/DET", "person/NOUN", "walk/VERB", "forward/ADV"]``).

    A lexicon tagger, not spaCy: closed word classes (DET, PRON, ADP, AUX, CCONJ, NUM) and
    short lists of adverbs (and any ``-ly`` word), adjectives and ~100 motion verbs; a known
    verb right after a determiner, adjective or possessive is a NOUN ("a wave"); any other
    word is a NOUN. The evaluator's VIP lists override most words that matter for motion, so
    its errors on rarer words cost little.
    """
    words = re.findall(r"[a-z]+", text.lower().replace("-", ""))
    tokens: list[str] = []
    previous_tag, previous_word = "", ""
    for word in words:
        if word in _DET:
            tag = "DET"
        elif word in _PRON:
            tag = "PRON"
        elif word in _ADP:
            tag = "ADP"
        elif word in _AUX:
            tag = "AUX"
        elif word in _CONJ:
            tag = "CCONJ"
        elif word in _NUMBERS:
            tag = "NUM"
        elif word in _ADV or (word.endswith("ly") and len(word) > 4):
            tag = "ADV"
        elif word in _ADJ:
            tag = "ADJ"
        elif _known_verb(word) and not (
            previous_tag in ("DET", "ADJ") or previous_word in _POSSESSIVE
        ):
            tag = "VERB"
        else:
            tag = "NOUN"
        lemma = _lemma(word, tag) if tag in ("NOUN", "VERB") and word != "left" else word
        tokens.append(f"{lemma}/{tag}")
        previous_tag, previous_word = tag, word
    return tokens


def _caption_tokens(caption: Any) -> list[str]:
    """A caption as tokens: a list of ``word/POS``, a string of them, or plain text."""
    if isinstance(caption, str):
        parts = caption.split()
        if parts and all("/" in p for p in parts):
            return parts
        return pos_tokens(caption)
    tokens = list(caption)
    if not all(isinstance(t, str) and "/" in t for t in tokens):
        raise ValueError(f"caption tokens must be 'word/POS' strings, got {tokens!r}")
    return tokens


# --- the evaluator --------------------------------------------------------------------------

_CHECKPOINT_PLACES = ("finest.tar", "model/finest.tar", "text_mot_match/model/finest.tar")


def _find_checkpoint(folder: Path) -> Path:
    for place in _CHECKPOINT_PLACES:
        if (folder / place).is_file():
            return folder / place
    raise ValueError(f"no finest.tar in {folder} (looked for {', '.join(_CHECKPOINT_PLACES)})")


def _load_checkpoint(path: Path) -> dict[str, dict[str, Tensor]]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, a corrupt zip, not a torch file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot load {path} as a weights-only torch checkpoint: {reason}"
        ) from None
    parts = ("text_encoder", "movement_encoder", "motion_encoder")
    if not isinstance(record, Mapping) or any(
        not isinstance(record.get(p), Mapping) for p in parts
    ):
        raise ValueError(f"{path} lacks the state dicts {', '.join(parts)}")
    return {p: dict(record[p]) for p in parts}


def _shape(state: Mapping[str, Tensor], key: str, part: str) -> tuple[int, ...]:
    if key not in state or not isinstance(state[key], Tensor):
        raise ValueError(f"{part} state dict lacks {key}")
    return tuple(state[key].shape)


def _loaded(module: nn.Module, state: Mapping[str, Tensor], part: str) -> nn.Module:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"{part} weights do not fit: {' '.join(lines[1:3]) or lines[0]}") from None
    return module.eval()


class GuoEvaluator(nn.Module):
    """Guo et al.'s co-embedding networks with their word vectorizer and normalisation;
    ``embed_motion`` / ``embed_text`` plug into :func:`~.metrics.r_precision`,
    :func:`~.metrics.fid`, :func:`~.metrics.diversity`, :func:`~.metrics.evaluate`.

    Build it with :meth:`from_folder`.
    """

    def __init__(self, text_encoder: TextEncoderBiGRUCo, movement_encoder: MovementConvEncoder,
                 motion_encoder: MotionEncoderBiGRUCo, vectorizer: WordVectorizer,
                 mean: np.ndarray, std: np.ndarray) -> None:  # fmt: skip
        super().__init__()
        self.text_encoder = text_encoder.eval()
        self.movement_encoder = movement_encoder.eval()
        self.motion_encoder = motion_encoder.eval()
        self.vectorizer = vectorizer
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, np.float32)))
        self.requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *,
                    checkpoint: str | os.PathLike[str] | None = None,
                    glove: str | os.PathLike[str] | None = None,
                    meta: str | os.PathLike[str] | None = None) -> GuoEvaluator:  # fmt: skip
        """Load the evaluator from the released files (layout in the module doc).

        Args:
            folder: the folder holding them. checkpoint: ``finest.tar`` (default: searched in
                ``folder``). glove: the folder of ``our_vab_*`` (default ``folder/glove``).
                meta: the folder of ``mean.npy`` / ``std.npy`` (default ``folder/meta``).

        Raises:
            ValueError: (one line) a missing or unsafe file, or weights that do not fit.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"Guo evaluator folder not found: {folder}")
        path = Path(checkpoint) if checkpoint is not None else _find_checkpoint(folder)
        states = _load_checkpoint(path)
        vectorizer = WordVectorizer.from_folder(Path(glove) if glove else folder / "glove")
        meta_dir = Path(meta) if meta else folder / "meta"
        mean, std = _load_npy(meta_dir / "mean.npy"), _load_npy(meta_dir / "std.npy")

        text, movement, motion = (states[p] for p in ("text_encoder", "movement_encoder",
                                                      "motion_encoder"))  # fmt: skip
        word_size, pos_size = _shape(text, "pos_emb.weight", "text_encoder")
        text_hidden = _shape(text, "input_emb.weight", "text_encoder")[0]
        text_out = _shape(text, "output_net.3.weight", "text_encoder")[0]
        move_hidden, move_in = _shape(movement, "main.0.weight", "movement_encoder")[:2]
        move_out = _shape(movement, "main.3.weight", "movement_encoder")[0]
        motion_hidden, motion_in = _shape(motion, "input_emb.weight", "motion_encoder")
        motion_out = _shape(motion, "output_net.3.weight", "motion_encoder")[0]
        checks = [
            (pos_size == len(POS_TAGS), f"text_encoder expects {pos_size} tags, not 15"),
            (word_size == vectorizer.dim,
             f"text_encoder expects {word_size}-d words, the GloVe vectors are {vectorizer.dim}-d"),
            (mean.shape == std.shape == (_FEATURES,),
             f"mean/std must be ({_FEATURES},), got {mean.shape} and {std.shape}"),
            (move_in == _FEATURES - _CONTACTS,
             f"movement_encoder reads {move_in} channels, not {_FEATURES - _CONTACTS}"),
            (motion_in == move_out,
             f"motion_encoder reads {motion_in}-d movements, not {move_out}"),
            (text_out == motion_out, f"text ({text_out}-d) and motion ({motion_out}-d) differ"),
        ]  # fmt: skip
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"{path}: {problem}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"{meta_dir}: mean/std must be finite with std > 0")
        return cls(
            _loaded(TextEncoderBiGRUCo(word_size, pos_size, text_hidden, text_out), text,
                    "text_encoder"),
            _loaded(MovementConvEncoder(move_in, move_hidden, move_out), movement,
                    "movement_encoder"),
            _loaded(MotionEncoderBiGRUCo(motion_in, motion_hidden, motion_out), motion,
                    "motion_encoder"),
            vectorizer, mean, std,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def embed_motion(self, features: Any, lengths: Any | None = None) -> Tensor:
        """(B, T, 263) HumanML3D features + lengths (or a list of (T_i, 263)) -> (B, D) (CPU).
        Lengths are rounded down to a multiple of 4 (at least 4 frames each)."""
        batch, lengths = padded_features(features, lengths)
        if bool((lengths < UNIT_LENGTH).any()):
            raise ValueError(f"the Guo evaluator needs motions of at least {UNIT_LENGTH} frames")
        lengths = lengths // UNIT_LENGTH * UNIT_LENGTH
        # The protocol pads every motion to 196 frames: the movements just past a length see
        # that padding (the convolutions' biases), so the padded size must be the same.
        frames = max(MAX_MOTION_FRAMES, -(-batch.shape[1] // UNIT_LENGTH) * UNIT_LENGTH)
        batch = torch.nn.functional.pad(batch, (0, 0, 0, frames - batch.shape[1]))
        x = ((batch.to(self.device) - self.mean) / self.std)[..., : _FEATURES - _CONTACTS]
        valid = torch.arange(frames, device=self.device)[None] < lengths.to(self.device)[:, None]
        movements = self.movement_encoder(x * valid[..., None])
        return self.motion_encoder(movements, lengths // UNIT_LENGTH).cpu()

    @torch.no_grad()
    def embed_text(self, captions: Sequence[Any]) -> Tensor:
        """B captions (plain text, a string of ``word/POS`` tokens, or a list of them) ->
        (B, D) (CPU)."""
        if isinstance(captions, str):
            raise ValueError("captions must be a sequence of captions, not one string")
        encoded = [self.vectorizer.encode(_caption_tokens(c)) for c in captions]
        if not encoded:
            raise ValueError("no captions given")
        words = torch.from_numpy(np.stack([e[0] for e in encoded])).to(self.device)
        tags = torch.from_numpy(np.stack([e[1] for e in encoded])).to(self.device)
        lengths = torch.tensor([e[2] for e in encoded])
        return self.text_encoder(words, tags, lengths).cpu()
