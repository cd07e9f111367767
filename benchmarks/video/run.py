"""Video benchmark: attention layouts as clips grow, and the loader's decoders.

1. Training throughput and peak memory of the video DiT with full 3D attention vs factorised
   (space, then time) attention as the clip grows from 8 to 64 frames (32x32 pixels, 2x4x4
   tubelets = 64 tokens per two frames). Each configuration trains a few AdamW steps of the
   real recipe loss in its own process; tokens/s = batch x tokens per clip / median step
   time; peak memory = the process's peak resident memory above its state before the first
   step (CPU), or ``torch.cuda.max_memory_allocated`` (GPU).
2. Loader throughput: clips/s of ``polydiff.video.data.decode`` (clip sampling, decoding,
   resize) on H.264 moving-shapes clips, with decord and with PyAV, at 32x32 and 128x128.
3. With a GPU: the DiT-B preset (shared/configs/video/dit-b.yaml) in bf16, model FLOPs
   utilisation = 6 x parameters x tokens/s + attention FLOPs, over the GPU's bf16 peak.
4. Generation memory against video length: the bundled model generates 16 to 160 frames
   (one to twelve overlapping chunks) in a fresh process each; peak resident memory above the
   process's state after loading must stay flat (it grew ~2.25 GB per chunk while the chunked
   extension ran with autograd on).

Run: ``python benchmarks/video/run.py`` (``--quick``: fewer lengths and steps). Prints the
tables; writes ``out/results.json`` and ``out/attention_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[2]
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Highest resident memory seen while the block runs (polled every 2 ms)."""

    def __enter__(self) -> _PeakRSS:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _train_steps(spec: dict[str, Any], queue: Any) -> None:
    """Child process: build the model, train ``steps`` steps, report time and memory."""
    torch.set_num_threads(spec["threads"])
    from polydiff.video.recipe import VideoRecipe

    recipe = VideoRecipe.from_config(spec["model"])
    cfg = recipe.config
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = recipe.build_model().to(device)
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    model = model.to(dtype)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    frames, height, width = cfg["frames"], cfg["height"], cfg["width"]
    batch = {
        "video": torch.randn(spec["batch"], cfg["channels"], frames, height, width),
        "caption": ["a red circle moving left"] * spec["batch"],
    }
    generator = torch.Generator(device).manual_seed(0)
    recipe.loss(model, batch, generator, "model")  # load the text encoder before measuring
    base = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with _PeakRSS() as rss:
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            loss = recipe.loss(model, batch, generator, "model")
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak) - base
    pt, ph, pw = cfg["dit"]["patch"]
    tokens = (frames // pt) * (height // ph) * (width // pw)
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    params = sum(p.numel() for p in model.parameters())
    queue.put({"step_s": step, "tokens": tokens, "peak_bytes": max(0, peak), "params": params})


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_train_steps` in a fresh process (its own peak memory)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_train_steps, args=(spec, queue))
    process.start()
    while True:  # a child that dies (out of memory, an error) must not hang the benchmark
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():
                message = f"benchmark process failed (exit {process.exitcode}): {spec}"
                raise RuntimeError(message) from None
    process.join()
    result["tokens_per_s"] = spec["batch"] * result["tokens"] / result["step_s"]
    return result


def attention_scaling(lengths: list[int], steps: int, device: str) -> list[dict[str, Any]]:
    rows = []
    for frames in lengths:
        for attention in ("full", "factorised"):
            spec = {
                "model": {
                    "frames": frames,
                    "height": 32,
                    "width": 32,
                    "text_max_length": 12,
                    "dit": {"dim": 128, "depth": 4, "heads": 4, "attention": attention},
                },
                "batch": 4,
                "steps": steps,
                "threads": torch.get_num_threads(),
                "device": device,
                "bf16": device == "cuda",
            }
            result = measure(spec)
            rows.append({"frames": frames, "attention": attention, **result})
            print(
                f"  {frames:3d} frames {attention:10s} {result['tokens']:5d} tokens  "
                f"{result['tokens_per_s']:9.0f} tokens/s  "
                f"{result['peak_bytes'] / 2**20:8.1f} MiB peak",
                flush=True,
            )
    return rows


def loader_throughput(clips: int) -> list[dict[str, Any]]:
    from polydiff.video import data
    from polydiff.video.synthetic import moving_shapes

    rows = []
    for size, frames in ((32, 16), (128, 32)):
        samples = list(moving_shapes(clips, size=size, frames=frames, seed=1))
        cfg = {
            "frames": 16, "height": size, "width": size, "fps": 8, "channels": 3,
            "buckets": None,
        }  # fmt: skip
        speeds = {}
        for decoder in ("decord", "pyav"):
            data.decode(samples[0], {**cfg, "decoder": decoder})  # warm-up (library start)
            start = time.perf_counter()
            for sample in samples:
                data.decode(sample, {**cfg, "decoder": decoder})
            speeds[decoder] = len(samples) / (time.perf_counter() - start)
        rows.append({"size": size, "source_frames": frames, **speeds})
        ratio = speeds["decord"] / speeds["pyav"]
        print(
            f"  {size}x{size}, 16 of {frames} frames: decord {speeds['decord']:7.1f} clips/s  "
            f"PyAV {speeds['pyav']:7.1f} clips/s  (decord/PyAV {ratio:.2f}x)",
            flush=True,
        )
    return rows


def dit_b_mfu(steps: int) -> dict[str, Any] | None:
    """DiT-B preset, bf16, on the GPU; None without one."""
    if not torch.cuda.is_available():
        return None
    import yaml

    preset = yaml.safe_load((REPO / "shared/configs/video/dit-b.yaml").read_text())
    model = {k: v for k, v in preset["model"].items() if k != "buckets"}
    spec = {"model": model, "batch": 8, "steps": steps, "threads": 1, "device": "cuda",
            "bf16": True}  # fmt: skip
    result = measure(spec)
    dim, depth = model["dit"]["dim"], model["dit"]["depth"]
    frames, side = model["frames"], model["height"]
    pt, ph, _ = model["dit"]["patch"]
    t_tokens, s_tokens = frames // pt, (side // ph) ** 2
    # Per token and block, attention scores + weighted sum: 4 x keys x dim FLOPs forward,
    # over the keys it sees (factorised: a frame's tokens, then a place's frames); x3 for
    # forward + backward.
    attention = 3 * 4 * dim * depth * (s_tokens + t_tokens)
    flops_per_token = 6 * result["params"] + attention
    achieved = flops_per_token * result["tokens_per_s"]
    result.update({"flops_per_token": flops_per_token, "mfu": achieved / H100_BF16_PEAK})
    print(f"  DiT-B bf16: {result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f} %")
    return result


def _generate_peak(spec: dict[str, Any], queue: Any) -> None:
    """Child process: generate ``frames`` frames with the bundled model, report peak memory."""
    torch.set_num_threads(spec["threads"])
    from polydiff.video.pipeline import generate

    generate("a red circle moving right", frames=16, steps=1)  # load model and text encoder
    base = _rss_bytes()
    start = time.perf_counter()
    with _PeakRSS() as rss:
        generate("a red circle moving right", frames=spec["frames"], steps=spec["steps"])
    queue.put({"peak_bytes": rss.peak - base, "seconds": time.perf_counter() - start})


def generation_memory(lengths: list[int], steps: int) -> list[dict[str, Any]]:
    context = mp.get_context("spawn")
    rows = []
    for frames in lengths:
        queue = context.Queue()
        spec = {"frames": frames, "steps": steps, "threads": 2}
        child = context.Process(target=_generate_peak, args=(spec, queue))
        child.start()
        try:
            result = queue.get(timeout=1800)
        except Empty as e:
            raise RuntimeError(f"generating {frames} frames failed (exit {child.exitcode})") from e
        child.join()
        rows.append({"frames": frames, **result})
        print(
            f"  {frames:4d} frames: peak {result['peak_bytes'] / 2**20:7.1f} MiB above the loaded "
            f"model, {result['seconds']:6.1f} s",
            flush=True,
        )
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for attention, marker in (("full", "o"), ("factorised", "s")):
        mine = [r for r in rows if r["attention"] == attention]
        frames = [r["frames"] for r in mine]
        left.plot(frames, [r["tokens_per_s"] for r in mine], marker=marker, label=attention)
        right.plot(frames, [r["peak_bytes"] / 2**20 for r in mine], marker=marker, label=attention)
    left.set(xlabel="clip length (frames, 32x32)", ylabel="training tokens/s", xscale="log")
    right.set(xlabel="clip length (frames, 32x32)", ylabel="peak memory (MiB)", xscale="log")
    left.legend()
    right.legend()
    fig.suptitle("video DiT (dim 128, depth 4): full 3D vs factorised attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clip lengths and steps")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [8, 16, 32] if args.quick else [8, 16, 32, 64]
    steps = 3 if args.quick else 5
    print(f"1. attention layouts as the clip grows ({device}, batch 4, 32x32, patch 2x4x4)")
    scaling = attention_scaling(lengths, steps, device)
    print("2. loader: decode 16-frame clips at 8 fps (clips/s, one process)")
    loader = loader_throughput(20 if args.quick else 60)
    print("3. DiT-B MFU (bf16)")
    mfu = dit_b_mfu(steps)
    if mfu is None:
        print("  no GPU here: skipped")
    print(f"4. generation memory against length (bundled model, {2 if args.quick else 4} steps)")
    generation = generation_memory([16, 40, 88] if args.quick else [16, 40, 88, 160],
                                   2 if args.quick else 4)  # fmt: skip
    results = {"device": device, "attention": scaling, "loader": loader, "dit_b": mfu,
               "generation": generation}  # fmt: skip
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    _plot(scaling, OUT / "attention_scaling.png")
    print(f"wrote {OUT / 'results.json'} and {OUT / 'attention_scaling.png'}")


if __name__ == "__main__":
    main()
