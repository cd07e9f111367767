"""Few-step students distilled from the bundled models vs their teachers, side by side.

The students are latent-consistency distillations (``polydiff.core.train.distill``,
``shared/configs/<modality>/*-lcm.yaml``) sampled with the ``lcm`` sampler at guidance 1 (the
teacher's scale is folded into their weights); the teachers run their own sampler and
guidance. Both go through ``polydiff.core.modality.generate`` with fixed seeds, so a row is
reproducible (``lcm`` draws fresh noise per step: the batch size is fixed too).

1. Digits: classifier agreement (``polydiff.image.metrics.digit_agreement``) on 20 images per
   digit (200), student at 1, 2, 4 steps vs teacher at 1, 2, 4, 10, 30 steps (each teacher
   step is two model evaluations: guidance). The classifier reads
   8x8 downsampled images, so blur hardly costs agreement (the teacher's own one-step x0 guess
   passes); two finer figures are given beside it: the Fréchet distance of those 64-d features
   to the 1,797 real digits (``fd``), and the RMS pixel distance (in [-1, 1] units) to the
   teacher's 30-step images from the same seeds (``rms_to_teacher``: what distillation aims
   at; the lcm sampler's fresh noise makes multi-step rows differ from it by construction).
2. Video: prompt adherence (``polydiff.video.metrics.prompt_adherence``, the bundled clip
   evaluator) on the 105 moving-shapes prompts: motion, colour, shape, at the same steps, and
   the clip Fréchet distance to 105 real clips (``real_clips(105, seed=5)``).

Wall time per sample is the whole request's (text encoding, sampling, decoding) over its
outputs, on this machine's threads (``--threads``, default 1).

Run: ``python benchmarks/distill/run.py [--digits-student DIR] [--video-student DIR]
[--digits-teacher DIR] [--video-teacher DIR] [--only digits|video] [--quick]``. Defaults: the
bundled teachers and, where they ship, the bundled students (``bundled/digits-lcm``,
``bundled/moving-shapes-lcm``). Prints the tables; writes ``out/results.json`` and
``out/distill.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polydiff.core.modality import GenerationRequest, generate, load_modality

OUT = Path(__file__).resolve().parent / "out"
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = (1, 2, 4, 10, 30)  # 1 and 2: the teacher at the students' budgets


def _bundled(modality: str, name: str) -> Path | None:
    folder, _ = load_modality(modality).bundled
    candidate = folder.parent / name
    return candidate if (candidate / "config.json").is_file() else None


def _run(modality: str, folder: Path, prompts: list[str], num: int, steps: int,
         student: bool, batch: int) -> tuple[list[Any], float]:  # fmt: skip
    """Outputs of one request and the wall seconds per output."""
    options: dict[str, Any] = {"steps": steps, "seed": 0, "batch_size": batch, "num": num}
    if student:
        options.update(sampler="lcm", guidance=1.0)
    start = time.perf_counter()
    made = generate(modality, GenerationRequest.of(prompts, checkpoint=folder, **options))
    return made.outputs, (time.perf_counter() - start) / len(made.outputs)


def _recorded(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("L"), dtype=np.float64) / 127.5 - 1.0 for im in images])


def digits(teacher: Path, student: Path | None, per_digit: int) -> list[dict[str, Any]]:
    """Rows of (model, sampler, steps, guidance, agreement, fd, rms_to_teacher, seconds per
    image)."""
    from polydiff.core.metrics import frechet_distance
    from polydiff.image.metrics import digit_agreement, to_digit_features
    from polydiff.image.synthetic import digit_caption, real_digits

    real = real_digits()[0]
    real_features = real.reshape(len(real), -1).astype(np.float64)

    prompts = [digit_caption(d) for d in range(10)]
    asked = [d for d in range(10) for _ in range(per_digit)]
    rows = []
    plan = [("teacher", teacher, s) for s in sorted(TEACHER_STEPS, reverse=True)]
    plan += [("student", student, s) for s in STUDENT_STEPS] if student else []
    reference = None  # the teacher's 30-step images (first in the plan)
    for who, folder, steps in plan:
        images, seconds = _run("image", folder, prompts, per_digit, steps, who == "student", 50)
        pixels = _pixels(images)
        reference = pixels if reference is None else reference
        model = _recorded(folder)["model"]
        rows.append({
            "model": who, "checkpoint": str(folder), "steps": steps,
            "sampler": "lcm" if who == "student" else model["sampler"],
            "guidance": 1.0 if who == "student" else model["guidance"],
            "agreement": digit_agreement(images, asked), "count": len(images),
            "fd": frechet_distance(to_digit_features(images), real_features),
            "rms_to_teacher": float(np.sqrt(np.mean((pixels - reference) ** 2))),
            "seconds_per_sample": seconds,
        })  # fmt: skip
        print(_digit_row(rows[-1]), flush=True)
    return sorted(rows, key=lambda r: (r["model"] != "teacher", r["steps"]))


def _digit_row(r: dict[str, Any]) -> str:
    head = f"{r['model']:8s} {r['sampler']:6s} {r['steps']:3d} steps  guidance {r['guidance']:3g}"
    scores = f"agreement {100 * r['agreement']:5.1f} %  fd {r['fd']:6.2f}"
    rms = f"rms to teacher@30 {r['rms_to_teacher']:.3f}"
    return f"{head}  {scores}  {rms}  {1000 * r['seconds_per_sample']:7.1f} ms/image"


def video_prompts() -> list[str]:
    """The 105 moving-shapes captions (every shape, colour and motion)."""
    from polydiff.video import synthetic

    combos = itertools.product(synthetic.SHAPES, synthetic.COLOURS, synthetic.MOTIONS)
    return [synthetic.caption(*c) for c in combos]


def video(teacher: Path, student: Path | None, count: int) -> list[dict[str, Any]]:
    """Rows of (model, sampler, steps, guidance, motion, colour, shape, seconds per clip)."""
    from polydiff.video.metrics import clip_frechet_distance, prompt_adherence, real_clips

    every = video_prompts()
    prompts = every[:: max(1, len(every) // count)][:count]  # strided: all motions, colours
    real = real_clips(105, seed=5)[0].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
    rows = []
    plan = [("teacher", teacher, s) for s in TEACHER_STEPS]
    plan += [("student", student, s) for s in STUDENT_STEPS] if student else []
    for who, folder, steps in plan:
        clips, seconds = _run("video", folder, prompts, 1, steps, who == "student", 15)
        scores = prompt_adherence(torch.stack(clips), prompts)
        model = _recorded(folder)["model"]
        rows.append({
            "model": who, "checkpoint": str(folder), "steps": steps,
            "sampler": "lcm" if who == "student" else model["sampler"],
            "guidance": 1.0 if who == "student" else model["guidance"],
            **{k: scores[k] for k in ("motion", "colour", "shape", "all")},
            "count": int(scores["count"]), "clip_fd": clip_frechet_distance(clips, real),
            "seconds_per_sample": seconds,
        })  # fmt: skip
        print(_video_row(rows[-1]), flush=True)
    return rows


def _video_row(r: dict[str, Any]) -> str:
    return (f"{r['model']:8s} {r['sampler']:6s} {r['steps']:3d} steps  guidance {r['guidance']:3g}"
            f"  motion {100 * r['motion']:5.1f} %  colour {100 * r['colour']:5.1f} %  shape "
            f"{100 * r['shape']:5.1f} %  clip fd {r['clip_fd']:7.1f}  "
            f"{r['seconds_per_sample']:6.2f} s/clip")  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, m) for k, m in (("digits", "agreement"), ("video", "motion"),
                                  ("video", "colour")) if results.get(k)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (section, metric) in zip(axes[0], panels, strict=True):
        for who, style in (("teacher", "o-"), ("student", "s-")):
            rows = [r for r in results[section] if r["model"] == who]
            if rows:
                label = f"{who} ({rows[0]['sampler']}, guidance {rows[0]['guidance']:g})"
                steps, values = [r["steps"] for r in rows], [100 * r[metric] for r in rows]
                ax.plot(steps, values, style, label=label)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 10, 30], ["1", "2", "4", "10", "30"])
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(f"{metric} %")
        ax.set_title(f"{section}: {metric}")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits-teacher", type=Path, default=None)
    p.add_argument("--digits-student", type=Path, default=None)
    p.add_argument("--video-teacher", type=Path, default=None)
    p.add_argument("--video-student", type=Path, default=None)
    p.add_argument("--only", choices=("digits", "video"), default=None)
    p.add_argument("--quick", action="store_true", help="5 images per digit, 21 video prompts")
    p.add_argument("--video-prompts", type=int, default=105, help="a strided subset of the 105")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    previous = OUT / "results.json"  # a section not rerun (--only) keeps its last figures
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    results["threads"] = args.threads
    if args.only in (None, "digits"):
        teacher = args.digits_teacher or load_modality("image").bundled[0]
        student = args.digits_student or _bundled("image", "digits-lcm")
        per_digit = 5 if args.quick else 20
        print(f"digits: classifier agreement, {per_digit} images per digit (seed 0)")
        results["digits"] = digits(teacher, student, per_digit)
    if args.only in (None, "video"):
        teacher = args.video_teacher or load_modality("video").bundled[0]
        student = args.video_student or _bundled("video", "moving-shapes-lcm")
        print(f"video: prompt adherence on {args.video_prompts} moving-shapes prompts (seed 0)")
        results["video"] = video(teacher, student, 21 if args.quick else args.video_prompts)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, OUT / "distill.png")
    print(f"wrote {OUT / 'results.json'} and {OUT / 'distill.png'}")


if __name__ == "__main__":
    main()
