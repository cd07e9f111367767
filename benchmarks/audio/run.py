"""Audio benchmark: vocoders, generation and training speed, and prompt adherence.

Everything runs on the CPU with one thread (``torch.set_num_threads(1)``), in one process,
so the side-by-side numbers (ratios) share the machine's load. x real time = seconds of
audio made per second of compute (above 1: faster than real time).

1. Vocoders, Griffin-Lim vs neural, side by side: held-out synthetic sounds (rng seed 1234,
   which no training run uses; ``--per-caption`` sounds of each of the 12 captions, 2 s) ->
   :meth:`MelSettings.log_mel` -> each vocoder -> multi-resolution STFT distance and
   log-spectral distance (dB) to the original wave, per caption and overall. Speed: batches
   of 8 sounds, the two vocoders alternating on each batch after a warm-up batch; the median
   over batches of x real time.
2. Generation speed: the denoiser (``--checkpoint``, default the bundled one) makes a batch
   of 8 two-second sounds at its default steps and at 10, through the recipe's own
   generation path (sampling, guidance, vocoding, loaded once), with each vocoder; median
   over ``--repeats`` of x real time.
3. Training throughput: samples/s of plain PyTorch AdamW steps (no DeepSpeed, no EMA) on
   decoded synthetic shard samples, median step after warm-up: the denoiser recipe loss of
   ``shared/configs/audio/sounds.yaml``'s model section (its ``vocoder`` set to None: the
   carried vocoder plays no part in the loss) at that config's batch size, and the vocoder
   GAN of ``shared/configs/audio/vocoder.yaml`` (a step = the discriminator part's loss and
   step, then the generator part's). Also the decode rate (shard sample -> log-mel segment).
4. Prompt adherence: ``--per-caption`` sounds per caption from the denoiser (default steps,
   its neural vocoder when it carries one, seed 0), named by the bundled evaluator
   (:func:`prompt_adherence`), per caption and overall, next to real held-out sounds; the
   direct acoustic checks of the prompt words on both: median pitch of the low vs high
   tones (share on the right side of 447 Hz, the geometric middle of 250 and 800 Hz),
   pitch slope of rising vs falling chirps (share of the right sign), onset rate of fast vs
   slow beats (share on the right side of 4.24/s, the middle of 3 and 6); and the Fréchet
   distance of evaluator features (:func:`sound_frechet_distance`), generated vs real
   (seed 1234) next to real vs real (seeds 1234 and 4321), same counts.

Run: ``python benchmarks/audio/run.py`` (``--quick``: fewer sounds and repeats). Prints the
tables; writes ``out/results.json``, ``out/vocoder_per_caption.png`` and
``out/adherence_per_caption.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from polydiff.audio.mel import MelSettings
from polydiff.audio.metrics import (
    SoundEvaluator,
    load_evaluator,
    log_spectral_distance,
    median_pitch,
    multi_resolution_stft_distance,
    onset_rate,
    pitch_slope,
    prompt_adherence,
    sound_frechet_distance,
)
from polydiff.audio.recipe import AudioRecipe
from polydiff.audio.synthetic import SOUND_CAPTIONS, render, sounds
from polydiff.audio.vocoder import GriffinLimVocoder, NeuralVocoder, Vocoder
from polydiff.core.modality import GenerationRequest, default_collate, load_trained
from polydiff.core.pretrained import from_pretrained

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "packages" / "audio" / "src" / "polydiff" / "audio" / "bundled"
CONFIGS = REPO / "shared" / "configs" / "audio"
HELD_OUT_SEED = 1234  # training shards use seed 0 and the evaluator seeds 0 and 1
OTHER_REAL_SEED = 4321
SECONDS = 2.0
BATCH = 8
LOW_HIGH_HZ = math.sqrt(250.0 * 800.0)  # between the low (110-250) and high (800-1800) tones
FAST_SLOW_PER_S = math.sqrt(3.0 * 6.0)  # between slow (1.5-3 /s) and fast (6-10 /s) beats


# --- helpers ---------------------------------------------------------------------------------
def held_out_sounds(per_caption: int, seed: int = HELD_OUT_SEED) -> tuple[Tensor, list[str]]:
    """(12 * per_caption, S) real synthetic sounds of SECONDS, caption by caption, and their
    captions."""
    rng = np.random.default_rng(seed)
    captions = [c for c in SOUND_CAPTIONS for _ in range(per_caption)]
    waves = np.stack([render(c, rng, SECONDS, MelSettings().sample_rate) for c in captions])
    return torch.from_numpy(waves).float(), captions


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_caption(values: Sequence[float], captions: Sequence[str]) -> dict[str, float]:
    return {
        c: float(np.mean([v for v, k in zip(values, captions, strict=True) if k == c]))
        for c in dict.fromkeys(captions)
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finite(value: Any) -> Any:
    """JSON-ready: NaN and infinities become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def load_neural_vocoder(folder: Path) -> NeuralVocoder:
    """A vocoder ``final/`` folder (FileNotFoundError / ValueError with one line)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no vocoder folder at {folder} (pass --vocoder DIR)")
    vocoder = from_pretrained(folder)
    if not isinstance(vocoder, NeuralVocoder):
        raise ValueError(f"{folder} holds a {type(vocoder).__name__}, not a NeuralVocoder")
    return vocoder.eval()


def load_denoiser(folder: Path) -> tuple[nn.Module, AudioRecipe]:
    """A denoiser ``final/`` folder and the recipe bound to its config."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no denoiser checkpoint at {folder} (pass --checkpoint DIR)")
    model, recipe = load_trained(folder, AudioRecipe, "cpu", torch.float32)
    if recipe.config["kind"] == "vocoder":
        raise ValueError(f"{folder} is a vocoder, not a mel denoiser (pass --checkpoint DIR)")
    return model, recipe


def generate(
    model: nn.Module,
    recipe: AudioRecipe,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    vocoder: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH,
) -> list[Any]:
    """The recipe's generation path (``polydiff.audio.pipeline.generate`` without the
    checkpoint load it does on every call): one Sound per prompt."""
    request = GenerationRequest.of(
        list(prompts),
        steps=steps,
        vocoder=vocoder,
        seed=seed,
        seconds=SECONDS,
        batch_size=batch_size,
    )
    recipe.check_request(request)
    with torch.inference_mode():
        return recipe.generate(model, request)


# --- 1. vocoders -----------------------------------------------------------------------------
def vocoder_quality(neural: NeuralVocoder, per_caption: int) -> dict[str, Any]:
    mel = neural.mel
    waves, captions = held_out_sounds(per_caption)
    log_mels = mel.log_mel(waves)
    target = waves[:, : mel.samples(log_mels.shape[-1])]
    vocoders: dict[str, Vocoder] = {"griffin-lim": GriffinLimVocoder(mel), "neural": neural}
    outputs: dict[str, list[Tensor]] = {name: [] for name in vocoders}
    speeds: dict[str, list[float]] = {name: [] for name in vocoders}
    for vocoder in vocoders.values():
        vocoder.vocode(log_mels[:BATCH])  # warm-up
    for start in range(0, len(captions), BATCH):
        batch = log_mels[start : start + BATCH]
        audio_s = batch.shape[0] * mel.samples(batch.shape[-1]) / mel.sample_rate
        for name, vocoder in vocoders.items():  # alternating: both see the same load
            began = time.perf_counter()
            outputs[name].append(vocoder.vocode(batch))
            speeds[name].append(audio_s / (time.perf_counter() - began))
    result: dict[str, Any] = {"sounds": len(captions), "seconds": SECONDS, "seed": HELD_OUT_SEED}
    for name in vocoders:
        made = torch.cat(outputs[name])
        stft = multi_resolution_stft_distance(made, target, reduction="none").tolist()
        lsd = log_spectral_distance(made, target).tolist()
        result[name] = {
            "mr_stft": float(np.mean(stft)),
            "lsd_db": float(np.mean(lsd)),
            "mr_stft_per_caption": _per_caption(stft, captions),
            "lsd_db_per_caption": _per_caption(lsd, captions),
            "x_real_time": statistics.median(speeds[name]),
        }
    gl, nv = result["griffin-lim"], result["neural"]
    result["ratio_neural_gl"] = {
        "mr_stft": nv["mr_stft"] / gl["mr_stft"],
        "lsd_db": nv["lsd_db"] / gl["lsd_db"],
        "x_real_time": nv["x_real_time"] / gl["x_real_time"],
    }
    print(
        f"  {'caption':22s} {'MR-STFT GL':>10s} {'neural':>7s} {'ratio':>6s} | "
        f"{'LSD dB GL':>9s} {'neural':>7s} {'ratio':>6s}"
    )
    rows = [
        (
            c,
            gl["mr_stft_per_caption"][c],
            nv["mr_stft_per_caption"][c],
            gl["lsd_db_per_caption"][c],
            nv["lsd_db_per_caption"][c],
        )
        for c in SOUND_CAPTIONS
    ]
    rows.append(("all", gl["mr_stft"], nv["mr_stft"], gl["lsd_db"], nv["lsd_db"]))
    for caption, s_gl, s_nv, l_gl, l_nv in rows:
        print(
            f"  {caption:22s} {s_gl:10.3f} {s_nv:7.3f} {s_nv / s_gl:5.2f}x | "
            f"{l_gl:9.2f} {l_nv:7.2f} {l_nv / l_gl:5.2f}x"
        )
    batches = len(speeds["neural"])
    print(
        f"  speed (x real time, median of {batches} batches of {BATCH}): GL "
        f"{gl['x_real_time']:.1f}, neural {nv['x_real_time']:.1f}, neural/GL "
        f"{result['ratio_neural_gl']['x_real_time']:.1f}x",
        flush=True,
    )
    return result


# --- 2. generation speed ---------------------------------------------------------------------
def generation_speed(model: nn.Module, recipe: AudioRecipe, repeats: int) -> list[dict[str, Any]]:
    default_steps = int(recipe.config["sample_steps"])
    prompts = [SOUND_CAPTIONS[i % len(SOUND_CAPTIONS)] for i in range(BATCH)]
    vocoders = ["griffin-lim"] + (["neural"] if getattr(model, "vocoder", None) else [])
    rows = []
    print(f"  {'steps':>5s} {'vocoder':12s} {'wall s':>7s} {'x real time':>11s}")
    for steps in dict.fromkeys([default_steps, 10]):
        for vocoder in vocoders:
            wall = _median_seconds(
                lambda s=steps, v=vocoder: generate(model, recipe, prompts, steps=s, vocoder=v),
                repeats,
            )
            row = {
                "steps": steps,
                "vocoder": vocoder,
                "batch": BATCH,
                "wall_s": wall,
                "x_real_time": BATCH * SECONDS / wall,
            }
            rows.append(row)
            print(f"  {steps:5d} {vocoder:12s} {wall:7.2f} {row['x_real_time']:11.2f}", flush=True)
    if "neural" not in vocoders:
        print("  the checkpoint carries no neural vocoder: Griffin-Lim only")
    for steps in dict.fromkeys([default_steps, 10]):
        speed = {r["vocoder"]: r["x_real_time"] for r in rows if r["steps"] == steps}
        if len(speed) == 2:
            print(f"  {steps} steps: neural/GL {speed['neural'] / speed['griffin-lim']:.2f}x")
    return rows


# --- 3. training throughput ------------------------------------------------------------------
def _model_section(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no training config at {path}")
    config = yaml.safe_load(path.read_text())
    return copy.deepcopy(config["model"]), dict(config.get("train") or {})


def _decoded_batch(recipe: AudioRecipe, count: int) -> tuple[dict[str, Any], float]:
    """A collated batch of ``count`` decoded synthetic shard samples, and decodes per second."""
    samples = list(sounds(count, seed=HELD_OUT_SEED))
    random.seed(0)  # decode crops with the `random` module
    recipe.decode(samples[0])  # warm-up (mel transform)
    start = time.perf_counter()
    decoded = [recipe.decode(s) for s in samples]
    rate = count / (time.perf_counter() - start)
    return default_collate(decoded), rate


def _train_steps(
    recipe: AudioRecipe, model: nn.Module, batch: dict[str, Any], lr: float, warmup: int, steps: int
) -> float:
    """Median seconds of one step (every part: loss, backward, AdamW step) after warm-up."""
    model.train()
    parts = recipe.parts(model)
    optimizers = {n: torch.optim.AdamW(p.parameters(), lr=lr) for n, p in parts.items()}
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        for name, optimizer in optimizers.items():
            loss = recipe.loss(model, batch, generator, name)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)  # the generator loss also fills D's gradients
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_speed(configs: Sequence[Path], warmup: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    print(
        f"  {'run':32s} {'batch':>5s} {'segment':>8s} {'params':>8s} {'step ms':>8s} "
        f"{'samples/s':>9s} {'decode/s':>8s}"
    )
    for path in configs:
        model_cfg, train_cfg = _model_section(path)
        if model_cfg.get("kind") == "vocoder":
            label, batch_default = f"vocoder GAN D+G ({path.stem})", 16
        else:
            label, batch_default = f"denoiser ({path.stem})", 32
            model_cfg["vocoder"] = None  # the carried vocoder plays no part in the loss
        recipe = AudioRecipe.from_config(model_cfg)
        batch_size = int(train_cfg.get("batch_size", batch_default))
        lr = float(train_cfg.get("lr", 2e-4))
        torch.manual_seed(0)
        model = recipe.build_model()
        batch, decode_rate = _decoded_batch(recipe, batch_size)
        step_s = _train_steps(recipe, model, batch, lr, warmup, steps)
        segment = batch["mel"].shape[-1]
        row = {
            "run": label,
            "config": str(path),
            "batch": batch_size,
            "segment_frames": segment,
            "params": _params(model),
            "step_s": step_s,
            "samples_per_s": batch_size / step_s,
            "decode_per_s": decode_rate,
        }
        rows.append(row)
        seconds = recipe.mel.samples(segment) / recipe.mel.sample_rate
        print(
            f"  {label:32s} {batch_size:5d} {seconds:6.2f} s {row['params'] / 1e6:7.2f}M "
            f"{1000 * step_s:8.1f} {row['samples_per_s']:9.1f} {decode_rate:8.1f}",
            flush=True,
        )
    return rows


# --- 4. prompt adherence ---------------------------------------------------------------------
def _share(values: Sequence[float], test: Callable[[float], bool]) -> float:
    """Share of ``values`` passing ``test``; NaN (a silent sound) counts as a miss."""
    return float(np.mean([bool(not math.isnan(v) and test(v)) for v in values]))


def acoustic_checks(waves: Tensor, captions: Sequence[str], sample_rate: int) -> dict[str, Any]:
    """The prompt words' direct acoustic checks (module doc) on a set of sounds."""

    def group(test: Callable[[str], bool], measure: Callable[..., float]) -> list[float]:
        return [measure(w, sample_rate) for w, c in zip(waves, captions, strict=True) if test(c)]

    low = group(lambda c: c.startswith("a low"), median_pitch)
    high = group(lambda c: c.startswith("a high"), median_pitch)
    rising = group(lambda c: c == "a rising chirp", pitch_slope)
    falling = group(lambda c: c == "a falling chirp", pitch_slope)
    fast = group(lambda c: c == "a fast beat", onset_rate)
    slow = group(lambda c: c == "a slow beat", onset_rate)

    def summary(values: list[float], test: Callable[[float], bool]) -> dict[str, float]:
        finite = [v for v in values if not math.isnan(v)]
        return {
            "median": float(np.median(finite)) if finite else math.nan,
            "share_right": _share(values, test),
            "count": len(values),
        }

    return {
        "low_tone_pitch_hz": summary(low, lambda v: v < LOW_HIGH_HZ),
        "high_tone_pitch_hz": summary(high, lambda v: v > LOW_HIGH_HZ),
        "rising_chirp_slope_oct_s": summary(rising, lambda v: v > 0),
        "falling_chirp_slope_oct_s": summary(falling, lambda v: v < 0),
        "fast_beat_onsets_per_s": summary(fast, lambda v: v > FAST_SLOW_PER_S),
        "slow_beat_onsets_per_s": summary(slow, lambda v: v < FAST_SLOW_PER_S),
    }


def prompt_adherence_section(
    model: nn.Module, recipe: AudioRecipe, evaluator: SoundEvaluator, per_caption: int
) -> dict[str, Any]:
    sample_rate = recipe.mel.sample_rate
    prompts = [c for c in SOUND_CAPTIONS for _ in range(per_caption)]
    start = time.perf_counter()
    made = generate(model, recipe, prompts, batch_size=16)
    wall = time.perf_counter() - start
    generated = torch.stack([s.wave for s in made])
    real, real_captions = held_out_sounds(per_caption)
    other_real, _ = held_out_sounds(per_caption, OTHER_REAL_SEED)
    assert real_captions == prompts
    vocoder = "neural" if getattr(model, "vocoder", None) is not None else "griffin-lim"
    result: dict[str, Any] = {
        "per_caption": per_caption,
        "steps": int(recipe.config["sample_steps"]),
        "vocoder": vocoder,
        "generation_wall_s": wall,
        "adherence": {
            "generated": prompt_adherence(generated, prompts, sample_rate, evaluator),
            "real": prompt_adherence(real, prompts, sample_rate, evaluator),
        },
        "acoustic": {
            "generated": acoustic_checks(generated, prompts, sample_rate),
            "real": acoustic_checks(real, prompts, sample_rate),
        },
        "frechet": {
            "generated_vs_real": sound_frechet_distance(generated, real, sample_rate, evaluator),
            "real_vs_real": sound_frechet_distance(other_real, real, sample_rate, evaluator),
        },
    }
    gen, ref = result["adherence"]["generated"], result["adherence"]["real"]
    print(
        f"  {len(prompts)} sounds, {result['steps']} steps, {vocoder} vocoder, "
        f"generated in {wall:.1f} s"
    )
    print(f"  {'evaluator accuracy':22s} {'generated':>9s} {'real':>6s}")
    for caption in [*SOUND_CAPTIONS, "accuracy"]:
        name = "all" if caption == "accuracy" else caption
        print(f"  {name:22s} {100 * gen[caption]:8.0f}% {100 * ref[caption]:5.0f}%")
    units = {
        "low_tone_pitch_hz": ("low tones: median pitch", "Hz", f"< {LOW_HIGH_HZ:.0f}"),
        "high_tone_pitch_hz": ("high tones: median pitch", "Hz", f"> {LOW_HIGH_HZ:.0f}"),
        "rising_chirp_slope_oct_s": ("rising chirps: slope", "oct/s", "> 0"),
        "falling_chirp_slope_oct_s": ("falling chirps: slope", "oct/s", "< 0"),
        "fast_beat_onsets_per_s": ("fast beats: onsets", "/s", f"> {FAST_SLOW_PER_S:.2f}"),
        "slow_beat_onsets_per_s": ("slow beats: onsets", "/s", f"< {FAST_SLOW_PER_S:.2f}"),
    }
    print(f"  {'acoustic check (median, share right)':38s} {'generated':>16s} {'real':>16s}")
    for key, (label, unit, rule) in units.items():
        cells = []
        for side in ("generated", "real"):
            s = result["acoustic"][side][key]
            cells.append(f"{s['median']:7.2f} {100 * s['share_right']:4.0f}%")
        print(f"  {label + f' ({unit}, {rule})':38s} {cells[0]:>16s} {cells[1]:>16s}")
    fd = result["frechet"]
    print(
        f"  Fréchet distance (evaluator features, {len(prompts)} vs {len(prompts)}): generated "
        f"vs real {fd['generated_vs_real']:.2f}, real vs real {fd['real_vs_real']:.2f}",
        flush=True,
    )
    return result


# --- plots -----------------------------------------------------------------------------------
def _plot_bars(
    path: Path, title: str, ylabel: str, series: dict[str, Sequence[float]], labels: Sequence[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sounds, steps and repeats")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=BUNDLED / "sounds",
        help="the mel denoiser's final/ folder (default: the bundled one)",
    )
    parser.add_argument(
        "--vocoder",
        type=Path,
        default=None,
        help="a neural vocoder's final/ folder (default: bundled/vocoder, else "
        "the one the denoiser carries)",
    )
    parser.add_argument(
        "--train-configs",
        type=Path,
        nargs=2,
        metavar=("DENOISER", "VOCODER"),
        default=[CONFIGS / "sounds.yaml", CONFIGS / "vocoder.yaml"],
        help="the configs whose model sections section 3 trains",
    )
    parser.add_argument(
        "--evaluator",
        type=Path,
        default=None,
        help="the sound evaluator's folder (default: the bundled one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    per_caption = 2 if args.quick else 8
    vocoder_per_caption = 4 if args.quick else 8
    repeats = 2 if args.quick else 3
    warmup, steps = (1, 3) if args.quick else (2, 5)

    model, recipe = load_denoiser(args.checkpoint)
    if args.vocoder is not None or (BUNDLED / "vocoder").is_dir():
        neural = load_neural_vocoder(args.vocoder or BUNDLED / "vocoder")
        vocoder_source = str(args.vocoder or BUNDLED / "vocoder")
    elif getattr(model, "vocoder", None) is not None:
        neural, vocoder_source = model.vocoder.eval(), f"{args.checkpoint} (carried)"
    else:
        raise FileNotFoundError("no neural vocoder: pass --vocoder DIR")
    evaluator = load_evaluator(args.evaluator)
    print(f"denoiser {args.checkpoint}, neural vocoder {vocoder_source}, 1 CPU thread")

    print(
        f"1. vocoders on held-out synthetic sounds (seed {HELD_OUT_SEED}, {vocoder_per_caption} "
        f"per caption, {SECONDS:g} s): distance to the original wave (lower is better)"
    )
    vocoders = vocoder_quality(neural, vocoder_per_caption)
    print(f"2. generation speed (batch {BATCH}, {SECONDS:g} s sounds, median of {repeats})")
    generation = generation_speed(model, recipe, repeats)
    print(f"3. training throughput (plain PyTorch AdamW, median of {steps} steps after {warmup})")
    training = training_speed(args.train_configs, warmup, steps)
    print(f"4. prompt adherence ({per_caption} per caption)")
    adherence = prompt_adherence_section(model, recipe, evaluator, per_caption)

    results = {
        "checkpoint": str(args.checkpoint),
        "vocoder": vocoder_source,
        "threads": 1,
        "quick": args.quick,
        "vocoders": vocoders,
        "generation": generation,
        "training": training,
        "adherence": adherence,
    }
    (OUT / "results.json").write_text(json.dumps(_finite(results), indent=2))
    labels = list(SOUND_CAPTIONS)
    _plot_bars(
        OUT / "vocoder_per_caption.png",
        f"vocoders on held-out synthetic sounds ({vocoder_per_caption} per caption)",
        "MR-STFT distance to the original (lower is better)",
        {
            name: [vocoders[name]["mr_stft_per_caption"][c] for c in labels]
            for name in ("griffin-lim", "neural")
        },
        labels,
    )
    _plot_bars(
        OUT / "adherence_per_caption.png",
        f"evaluator accuracy per caption ({per_caption} sounds each)",
        "accuracy",
        {side: [adherence["adherence"][side][c] for c in labels] for side in ("generated", "real")},
        labels,
    )
    print(
        f"wrote {OUT / 'results.json'}, {OUT / 'vocoder_per_caption.png'} and "
        f"{OUT / 'adherence_per_caption.png'}"
    )


if __name__ == "__main__":
    main()
