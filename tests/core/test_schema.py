"""Config schemas (polydiff.core.modality.schema and the image / video / train configs built on
it): defaults, one-line errors that name the dotted key first, YAML's quirks, unknown keys at
every level, recorded configs that validate back unchanged, and per-part optimizer settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from polydiff.core.modality.contract import ConfigError
from polydiff.core.modality.schema import SCHEDULES, DenoisingSchema, validate_schema
from polydiff.core.train.config import KEYS, PART_KEYS, OptimConfig, load_config, schema_table
from polydiff.image.config import DEFAULTS as IMAGE_DEFAULTS
from polydiff.image.config import KINDS, SECTION_DEFAULTS, ImageConfig
from polydiff.video.config import DEFAULTS as VIDEO_DEFAULTS
from polydiff.video.config import DIT_DEFAULTS, VideoConfig

REPO = Path(__file__).resolve().parents[2]
SHARED = {
    "text_encoder": None,
    "text_max_length": 16,
    "schedule": "cosine",
    "zero_terminal_snr": False,
    "shift": 1.0,
    "prediction": "v",
    "time_distribution": "uniform",
    "weighting": "min_snr",
    "snr_gamma": 5.0,
    "cond_drop": 0.1,
    "sampler": "unipc",
    "sample_steps": 30,
    "guidance": 3.0,
    "gradient_checkpointing": False,
}


def error(schema: type[pydantic.BaseModel], raw: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_schema(schema, raw)
    message = str(caught.value)
    assert "\n" not in message  # one line
    assert "Input should" not in message and "validation error" not in message
    return message


# --- the shared denoising keys -----------------------------------------------------------------


def test_the_shared_keys_have_todays_defaults():
    assert validate_schema(DenoisingSchema, {}) == SHARED
    assert SCHEDULES == ("linear", "scaled_linear", "cosine", "flow")
    assert {k: IMAGE_DEFAULTS[k] for k in SHARED} == SHARED
    assert {k: VIDEO_DEFAULTS[k] for k in SHARED} == SHARED


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        ({"sampler": "plms"}, "model.sampler: 'plms' is not one of ddpm, ddim, euler,"),
        ({"schedule": "sigmoid"}, "model.schedule: 'sigmoid' is not one of linear, scaled_linear"),
        ({"prediction": "noise"}, "model.prediction: 'noise' is not one of eps, x0, v, flow"),
        ({"weighting": "p2"}, "model.weighting: 'p2' is not one of none, min_snr"),
        ({"time_distribution": 1}, "model.time_distribution: 1 is not one of uniform, logit"),
        ({"cond_drop": 1.5}, "model.cond_drop: expected a probability in [0, 1], got 1.5"),
        ({"guidance": -1.0}, "model.guidance: expected float >= 0.0, got -1.0"),
        ({"guidance": "strong"}, "model.guidance: expected float >= 0.0, got 'strong'"),
        ({"guidance": float("nan")}, "model.guidance: expected float >= 0.0, got nan"),
        ({"shift": 0}, "model.shift: expected float >= 1e-06, got 0"),
        ({"text_max_length": 1}, "model.text_max_length: expected int >= 2, got 1"),
        ({"text_encoder": 5}, "model.text_encoder: expected null (bundled MiniLM) or a model"),
        (
            {"zero_terminal_snr": True, "prediction": "eps"},
            "model.prediction: eps cannot be used with zero_terminal_snr (use v or x0)",
        ),
        ([1], "model: expected a mapping, got list"),
        (None, "model: expected a mapping, got NoneType"),
    ],
)
def test_shared_key_errors_are_one_line_naming_the_key(raw, line):
    assert error(DenoisingSchema, raw).startswith(line)


def test_yaml_exponent_strings_are_floats_and_ints_and_bools_stay_strict():
    # YAML 1.1 reads 1e-4 (no dot) as the string "1e-4".
    cfg = validate_schema(DenoisingSchema, {"guidance": "1e-4", "shift": "2", "snr_gamma": 4})
    assert cfg["guidance"] == 1e-4 and cfg["shift"] == 2.0
    assert type(cfg["snr_gamma"]) is int  # a float key keeps an int as given (records as 4)
    for value in ("30", 30.0, True):
        assert error(DenoisingSchema, {"sample_steps": value}).startswith(
            f"model.sample_steps: expected int >= 1, got {value!r}"
        )
    assert (
        error(DenoisingSchema, {"guidance": True})
        == "model.guidance: expected float >= 0.0, got True"
    )
    for value in (1, 0, "true"):
        assert error(DenoisingSchema, {"gradient_checkpointing": value}) == (
            f"model.gradient_checkpointing: expected true/false, got {value!r}"
        )
    assert error(ImageConfig, {"channels": True}).startswith("model.channels: expected 1")


def test_a_plain_pydantic_schema_gets_the_same_errors():
    class Tiny(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        hidden: int = 32
        dropout: float = 0.1

    assert validate_schema(Tiny, {"hidden": 8}) == {"hidden": 8, "dropout": 0.1}
    assert (
        error(Tiny, {"widht": 1, "a": 2})
        == "unknown key(s) model.a, model.widht; valid: dropout, hidden"
    )
    assert error(Tiny, {"hidden": "x"}).startswith("model.hidden: expected an integer, got 'x'")


# --- unknown keys at every level ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "raw", "line"),
    [
        (
            ImageConfig,
            {"learning_rte": 1},
            "unknown key(s) model.learning_rte; valid: autoencoder,",
        ),
        (ImageConfig, {"b": 1, "a": 2}, "unknown key(s) model.a, model.b; valid: autoencoder,"),
        (
            ImageConfig,
            {"unet": {"base_chanels": 8}},
            "unknown key(s) model.unet.base_chanels; valid: attention_levels, base_channels, "
            "channel_mult, dropout, heads, num_res_blocks",
        ),
        (
            ImageConfig,
            {"kind": "dit", "dit": {"patches": 2}},
            "unknown key(s) model.dit.patches; valid: depth, dim, heads, mlp_ratio, patch, qk_norm",
        ),
        (
            ImageConfig,
            {"kind": "autoencoder", "autoencoder": {"kl": 1}},
            "unknown key(s) model.autoencoder.kl; valid: base_channels, channel_mult, kl_weight,",
        ),
        (VideoConfig, {"frame": 16}, "unknown key(s) model.frame; valid: autoencoder, buckets,"),
        (
            VideoConfig,
            {"dit": {"patchsize": 2}},
            "unknown key(s) model.dit.patchsize; valid: absolute_positions, attention, depth,",
        ),
    ],
)
def test_unknown_keys_are_refused_at_every_level_listing_the_valid_ones(schema, raw, line):
    assert error(schema, raw).startswith(line)


# --- image -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        ({"kind": "gan"}, "model.kind: 'gan' is not one of unet, dit, latent_dit, autoencoder"),
        ({"channels": 2}, "model.channels: expected 1 (grayscale) or 3 (RGB), got 2"),
        ({"image_size": 15}, "model.image_size: 15 is not divisible by 2"),
        ({"image_size": 16.0}, "model.image_size: expected int >= 1, got 16.0"),
        (
            {"kind": "dit", "dit": {"heads": 5}},
            "model.dit.heads: dim / heads must be a multiple of 4 (2D rotary)",
        ),
        ({"kind": "dit", "dit": {"patch": 3}}, "model.image_size: 16 is not divisible by 3"),
        (
            {"unet": {"attention_levels": [3]}},
            "model.unet.attention_levels: must index channel_mult",
        ),
        ({"unet": {"channel_mult": []}}, "model.unet.channel_mult: needs at least one level"),
        ({"unet": {"heads": 3}}, "model.unet.heads: must divide every level's width"),
        (
            {"unet": {"channel_mult": [1, True]}},
            "model.unet.channel_mult: expected a list of integers >= 1",
        ),
        ({"unet": [1]}, "model.unet: expected a mapping, got list"),
        ({"unet": None}, "model.unet: expected a mapping, got NoneType"),
        ({"dit": {"patch": 2}}, "model.dit: is not used by kind 'unet'; remove it"),
        ({"kind": "latent_dit"}, "model.autoencoder: kind latent_dit needs the path of a trained"),
        (
            {"kind": "autoencoder", "autoencoder": "x"},
            "model.autoencoder: expected a mapping, got str",
        ),
        (
            {"kind": "autoencoder", "autoencoder": {"channel_mult": [1, 2, 2]}, "image_size": 18},
            "model.image_size: 18 is not divisible by 4",
        ),
    ],
)
def test_image_rules_name_the_key(raw, line):
    assert error(ImageConfig, raw).startswith(line)


def test_image_configs_hold_exactly_the_sections_of_their_kind():
    assert set(validate_schema(ImageConfig, {})) == {*IMAGE_DEFAULTS, "unet"}
    for kind in KINDS:
        raw = {"kind": kind, **({"autoencoder": "ae/final"} if kind == "latent_dit" else {})}
        cfg = validate_schema(ImageConfig, raw)
        sections = {"unet": ["unet"], "dit": ["dit"], "latent_dit": ["dit", "autoencoder"]}
        assert set(cfg) - set(IMAGE_DEFAULTS) == set(sections.get(kind, ["autoencoder"]))
    latent = validate_schema(ImageConfig, {"kind": "latent_dit", "autoencoder": Path("ae")})
    assert (
        latent["dit"] == {**SECTION_DEFAULTS["dit"], "patch": 1} and latent["autoencoder"] == "ae"
    )
    assert validate_schema(
        ImageConfig, {"kind": "autoencoder", "autoencoder": {"kl_weight": "1e-4"}}
    )["autoencoder"] == {**SECTION_DEFAULTS["autoencoder"], "kl_weight": 1e-4}
    assert ImageConfig.model_json_schema()["properties"]["kind"]["enum"] == list(KINDS)


# --- video -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (
            {"frames": 15},
            "model.frames: frames 15 of [15, 32, 32] is not divisible by dit.patch [2, 4, 4]",
        ),
        (
            {"buckets": [[16, 32, 30]]},
            "model.buckets: width 30 of [16, 32, 30] is not divisible by",
        ),
        (
            {"buckets": [[16, 32]]},
            "model.buckets[0]: expected a list of 3 integers >= 1, got [16, 32]",
        ),
        ({"buckets": []}, "model.buckets: expected a non-empty list of [frames, height, width]"),
        ({"dit": {"patch": [2, 4]}}, "model.dit.patch: expected a list of 3 integers >= 1"),
        (
            {"dit": {"dim": 20, "heads": 4}},
            "model.dit.heads: dim / heads must be an even number >= 6",
        ),
        (
            {"dit": {"attention": "sparse"}},
            "model.dit.attention: 'sparse' is not one of full, factorised",
        ),
        ({"dit": None}, "model.dit: expected a mapping, got NoneType"),
        ({"decoder": "ffmpeg"}, "model.decoder: 'ffmpeg' is not one of auto, decord, pyav"),
        ({"channels": 4}, "model.channels: expected 1 (grey) or 3 (RGB), got 4"),
        ({"fps": 0}, "model.fps: expected float >= 1, got 0"),
        ({"autoencoder": ""}, "model.autoencoder: expected null (pixels) or a checkpoint folder"),
    ],
)
def test_video_rules_name_the_key(raw, line):
    assert error(VideoConfig, raw).startswith(line)


def test_video_defaults_and_latent_sizes_left_to_the_autoencoder():
    cfg = validate_schema(VideoConfig, {"buckets": ([16, 32, 32], (8, 64, 64))})
    assert {k: cfg[k] for k in VIDEO_DEFAULTS if k != "buckets"} == {
        k: v for k, v in VIDEO_DEFAULTS.items() if k != "buckets"
    }
    assert cfg["buckets"] == [[16, 32, 32], [8, 64, 64]] and cfg["dit"] == DIT_DEFAULTS
    assert validate_schema(VideoConfig, {"autoencoder": "ae", "height": 30})["height"] == 30


# --- recorded configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "folder"),
    [
        (ImageConfig, "packages/image/src/polydiff/image/bundled/digits"),
        (VideoConfig, "packages/video/src/polydiff/video/bundled/moving-shapes"),
    ],
)
def test_bundled_checkpoint_configs_validate_back_unchanged(schema, folder):
    recorded = json.loads((REPO / folder / "config.json").read_text())["model"]
    validated = validate_schema(schema, recorded)
    assert validated == recorded
    # The same JSON too (an int stays an int, a list a list), so a re-record is identical.
    assert json.dumps(validated, sort_keys=True) == json.dumps(recorded, sort_keys=True)
    assert validate_schema(schema, validated) == validated


# --- data and train ----------------------------------------------------------------------------


def config(**train: Any) -> dict[str, Any]:
    return {
        "modality": "image",
        "model": {},
        "data": {"shards": "data/x"},
        "train": {"max_steps": 10, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-5, **train},
        "deepspeed": {"zero_optimization": {"stage": 0}},
    }


def load_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as caught:  # polydiff.core.train's ConfigError
        load_config(raw, validate_model=False)
    assert type(caught.value).__name__ == "ConfigError" and "\n" not in str(caught.value)
    return str(caught.value)


def test_train_parts_override_the_optimizer_settings_of_one_part(tmp_path):
    parts = {"discriminator": {"lr": "1e-4", "betas": [0.0, 0.99], "decay_steps": None}}
    cfg = load_config(config(weight_decay=0.01, parts=parts), validate_model=False)
    assert cfg.train.parts == {
        "discriminator": {"lr": 1e-4, "betas": (0.0, 0.99), "decay_steps": None}
    }
    disc = cfg.train.for_part("discriminator")
    assert (disc.lr, disc.betas, disc.weight_decay, disc.max_steps) == (1e-4, (0.0, 0.99), 0.01, 10)
    assert disc.parts == {}
    assert cfg.train.for_part("generator") == dataclasses.replace(cfg.train, parts={})
    record = cfg.to_dict()["train"]["parts"]
    assert record == {"discriminator": {"lr": 1e-4, "betas": [0.0, 0.99], "decay_steps": None}}
    json.dumps(cfg.to_dict())
    assert load_config(config(), validate_model=False).train.parts == {}
    assert set(PART_KEYS) == {
        "lr", "min_lr", "warmup_steps", "lr_decay", "decay_steps", "weight_decay", "betas",
        "adam_eps", "grad_clip",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("parts", "line"),
    [
        ({"d": {"lrr": 1}}, "unknown config key train.parts.d.lrr; valid keys: train.parts.d.lr,"),
        ({"d": {"lr": 0}}, "train.parts.d.lr must be > 0, got 0.0"),
        ({"d": {"lr": "fast"}}, "train.parts.d.lr must be a number, got 'fast'"),
        ({"d": {"warmup_steps": 1.5}}, "train.parts.d.warmup_steps must be an integer, got 1.5"),
        (
            {"d": {"lr_decay": "exp"}},
            "train.parts.d.lr_decay must be one of cosine, linear, constant",
        ),
        ({"d": {"betas": [0.9, 1.0]}}, "train.parts.d.betas must be in [0, 1), got [0.9, 1.0]"),
        ({"d": {"lr": None}}, "train.parts.d.lr must be set (leave it out to use train.lr)"),
        ({"d": {"min_lr": 0.1}}, "train.parts.d.min_lr must be in [0, train.lr], got 0.1"),
        (
            {"d": {"lr": 1e-4, "min_lr": 1e-3}},
            "train.parts.d.min_lr must be in [0, train.parts.d.lr]",
        ),
        ({"d": {"lr": 1e-6}}, "train.parts.d.lr must be >= train.min_lr (1e-05), got 1e-06"),
        (
            {"d": {"decay_steps": 2, "warmup_steps": 2}},
            "train.parts.d.decay_steps must be > train.parts.d",
        ),
        ({"d": [1]}, "train.parts.d must be a mapping, got [1]"),
        ([1], "train.parts must be a mapping of part names to optimizer settings, got [1]"),
        ({1: {"lr": 1}}, "train.parts must map part names (strings) to settings, got the name 1"),
    ],
)
def test_train_parts_are_checked_like_the_train_keys(parts, line):
    assert load_error(config(parts=parts)).startswith(line)


@pytest.mark.parametrize(
    ("train", "line"),
    [
        ({"lr": 0}, "train.lr must be > 0, got 0.0"),
        ({"lr": True}, "train.lr must be a number, got True"),
        ({"batch_size": 1.5}, "train.batch_size must be an integer, got 1.5"),
        ({"min_lr": 1.0}, "train.min_lr must be in [0, train.lr], got 1.0"),
        (
            {"decay_steps": 3, "warmup_steps": 3},
            "train.decay_steps must be > train.warmup_steps, got 3",
        ),
        ({"betas": [0.9]}, "train.betas must be a list of two numbers, got [0.9]"),
        (
            {"gradient_checkpointing": 1},
            "train.gradient_checkpointing must be true or false, got 1",
        ),
        ({"lr_warmup": 1}, "unknown config key train.lr_warmup; valid keys: train.max_steps,"),
        ({"a": 1, "b": 2}, "unknown config keys train.a, train.b; valid keys: train.max_steps,"),
    ],
)
def test_train_errors_keep_their_wording(train, line):
    assert load_error(config(**train)).startswith(line)


def test_data_errors_keep_their_wording_and_yaml_strings_are_numbers():
    raw = config(lr="1e-4", weight_decay="0.1")
    raw["data"] = {"shards": ["a", "b"], "max_bad_fraction": "0.5"}
    cfg = load_config(raw, validate_model=False)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.data.max_bad_fraction) == (1e-4, 0.1, 0.5)
    for data, line in [
        ({"shards": ""}, "data.shards must be non-empty, got ''"),
        ({"shards": ["a", 1]}, "data.shards must be a string or a list of strings"),
        ({"num_workers": -1}, "data.num_workers must be >= 0, got -1"),
        ({"allow_pipe": "yes"}, "data.allow_pipe must be true or false, got 'yes'"),
        ({"x": 1}, "unknown config key data.x; valid keys: data.shards, data.num_workers,"),
    ]:
        assert load_error({**raw, "data": data}).startswith(line)
    del raw["train"]["lr"]
    assert load_error(raw) == "missing config key train.lr"


def test_documented_keys_include_parts():
    assert KEYS["train"]["parts"][0] == {}
    assert "| `train.parts` | `{}` |" in schema_table()
    assert OptimConfig(max_steps=1, batch_size=1, lr=1.0).for_part("x").lr == 1.0
