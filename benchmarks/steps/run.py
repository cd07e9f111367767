"""Fewer steps on the bundled models: default grids vs grids tuned to each checkpoint.

For every bundled model (image digits, video moving shapes, audio sounds, shape points,
motion) this

1. tunes a ``unipc`` grid at NFE 5 and 10 to the checkpoint (``polydiff tune-steps``'s
   ``tune_steps``) on tuning prompts from seed 0, and writes it into the bundled folder's
   ``grids.json`` (``--no-write`` keeps them in memory only);
2. on *other* seeds, measures in the model's space how far each setting lands from a
   100-step ``exp_ab3`` teacher from the same noise: the default grid and the tuned grid at
   NFE 5 and 10, and the checkpoint's own default (its sampler and steps);
3. for the two models with a task metric, measures it: digit-classifier agreement (digits,
   ``polydiff.image.metrics.digit_agreement``) and the clip evaluator's motion and colour
   adherence (video, ``polydiff.video.metrics.prompt_adherence``).

Prints tables and writes ``out/results.json`` and ``out/steps.png``.
Run: ``OMP_NUM_THREADS=1 python benchmarks/steps/run.py [--quick] [--only image,video]``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from polydiff.core.modality import (
    GenerationRequest,
    bundled_checkpoint,
    capture_sampling,
    generate,
    load_modality,
    load_trained,
    tune_steps,
)
from polydiff.core.modality.denoising import make_schedule
from polydiff.core.sampling import timesteps
from polydiff.core.step_grids import teacher_times

OUT = Path(__file__).resolve().parent / "out"
NFES = (5, 10)
PROMPTS = {
    "image": [f"a handwritten digit {d}" for d in range(10)],
    "video": [
        "a red circle moving right",
        "a blue square moving up",
        "a yellow triangle moving left",
        "a green circle moving down",
        "a white square growing",
    ],
    "audio": [
        "a low sine tone",
        "a high sine tone",
        "a rising chirp",
        "a falling chirp",
        "a fast beat",
        "a slow beat",
    ],
    "shape": ["a torus", "a cone", "a table", "a mug"],
    "motion": [
        "a person walks forward",
        "a person jumps",
        "a person squats down",
        "a person waves with the right hand",
    ],
}


def final_latents(bound, model, request: GenerationRequest) -> torch.Tensor:
    """The samples of the modality's first sampling pass, in the model's space."""
    with torch.inference_mode(), capture_sampling() as captured:
        bound.generate(model, request)
    assert captured.final is not None
    return captured.final.double()


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def latent_errors(name: str, folder: Path, grids: dict, seeds: list[int], num: int) -> dict:
    """Error vs the teacher, per setting, on held-out seeds."""
    cls = load_modality(name)
    model, bound = load_trained(folder, cls)
    schedule = make_schedule(bound.config)
    first = timesteps(schedule, 1).tolist()[0]
    fine = teacher_times(schedule, first, 100)
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        base = GenerationRequest(prompts=tuple(PROMPTS[name]), num=num, seed=seed,
                                 batch_size=len(PROMPTS[name]) * num)  # fmt: skip
        teacher = final_latents(
            bound, model, replace(base, sampler="exp_ab3", steps=len(fine), timesteps=tuple(fine))
        )
        settings = {
            f"default {bound.config['sampler']} {bound.config['sample_steps']}": replace(base),
        }
        for nfe in NFES:
            settings[f"unipc {nfe} default grid"] = replace(base, sampler="unipc", steps=nfe)
            settings[f"unipc {nfe} tuned"] = replace(
                base, sampler="unipc", steps=nfe, timesteps=grids[nfe].timesteps
            )
        for label, request in settings.items():
            rows.setdefault(label, []).append(
                relative(final_latents(bound, model, request), teacher)
            )
    return {label: sum(v) / len(v) for label, v in rows.items()}


def task_metrics(name: str, folder: Path, grids: dict, num: int) -> dict:
    """Digit agreement / video adherence through the public generate (seed 7)."""
    if name not in ("image", "video"):
        return {}
    prompts = PROMPTS[name] if name == "image" else PROMPTS[name][:4]
    settings = {"default": {}}
    for nfe in NFES:
        settings[f"unipc {nfe} default grid"] = {
            "sampler": "unipc",
            "steps": nfe,
            "timesteps": tuple(timesteps(make_schedule(_config(folder)), nfe).tolist()),
        }
        settings[f"unipc {nfe} tuned"] = {"sampler": "unipc", "steps": nfe}  # the stored grid
    results = {}
    for label, extra in settings.items():
        start = time.perf_counter()
        made = generate(name, GenerationRequest.of(prompts, num=num, seed=7,
                                                   checkpoint=folder, **extra))  # fmt: skip
        seconds = (time.perf_counter() - start) / len(made.outputs)
        grid = made.metadata[0]["grid"]
        if name == "image":
            from polydiff.image.metrics import digit_agreement

            digits = [int(r["prompt"].rsplit(" ", 1)[1]) for r in made.metadata]
            results[label] = {"agreement": digit_agreement(made.outputs, digits),
                              "seconds": seconds, "grid": grid}  # fmt: skip
        else:
            from polydiff.video.metrics import prompt_adherence

            scores = prompt_adherence(made.outputs, [r["prompt"] for r in made.metadata])
            results[label] = {"motion": scores["motion"], "colour": scores["colour"],
                              "seconds": seconds, "grid": grid}  # fmt: skip
    return results


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and samples")
    parser.add_argument("--only", default=",".join(PROMPTS), help="modalities, comma-separated")
    parser.add_argument("--no-write", action="store_true", help="do not store the tuned grids")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    results: dict = {}
    for name in names:
        folder = bundled_checkpoint(load_modality(name))
        grids, tuning = {}, {}
        for nfe in NFES:
            start = time.perf_counter()
            request = GenerationRequest(prompts=tuple(PROMPTS[name]), num=1 if args.quick else 2,
                                        seed=0, checkpoint=str(folder))  # fmt: skip
            grids[nfe] = tune_steps(request, "unipc", nfe, write=not args.no_write)
            tuning[nfe] = {
                "seconds": time.perf_counter() - start,
                "model_evaluations": grids[nfe].model_evaluations,
                "tuning_error": grids[nfe].error,
                "tuning_default_error": grids[nfe].default_error,
                "timesteps": list(grids[nfe].timesteps),
            }
        seeds = [11] if args.quick else [11, 12]
        errors = latent_errors(name, folder, grids, seeds, 1)
        metrics = task_metrics(name, folder, grids, 1 if args.quick else 3)
        results[name] = {"tuning": tuning, "errors": errors, "metrics": metrics}
        print(f"\n{name} ({folder.name}): error vs a 100-step exp_ab3 teacher, held-out seeds")
        for label, value in errors.items():
            print(f"  {label:<28} {value:9.3e}")
        for nfe in NFES:
            t = tuning[nfe]
            print(f"  tuning unipc {nfe}: {t['model_evaluations']} model evaluations per "
                  f"sample, {t['seconds']:.0f} s")  # fmt: skip
        for label, row in metrics.items():
            print(f"  {label:<28} " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            ))  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "steps.png")
    print(f"\nwrote {args.out}/results.json, steps.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        errors = result["errors"]
        ax.plot(
            NFES, [errors[f"unipc {n} default grid"] for n in NFES], "--o", label=f"{name} default"
        )
        ax.plot(NFES, [errors[f"unipc {n} tuned"] for n in NFES], "-s", label=f"{name} tuned")
    ax.set(yscale="log", xlabel="NFE", ylabel="relative error vs the 100-step teacher",
           title="Bundled models: default vs tuned unipc grids", xticks=list(NFES))  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
