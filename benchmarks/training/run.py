"""Trainer benchmark: DeepSpeed trainer vs a bare PyTorch loop, data wait, ZeRO memory.

1. Step time: the digits recipe (shared/configs/image/digits.yaml) trained by `polydiff train`
   (1 CPU process, ZeRO 0, fp32) against a bare PyTorch loop over the same model, batches
   (the same ShardStream) and AdamW. Step time = median over steps after a warm-up.
2. Data wait: the trainer's data-wait fraction with 2 loader workers decoding the PNG shards.
3. Memory: peak resident memory per rank of a ~25M-parameter image DiT trained on 2 CPU ranks
   with ZeRO 0 and with ZeRO 2 (optimizer states partitioned).

Run: ``python benchmarks/training/run.py`` (``--quick`` for fewer steps). Writes
``out/results.json`` and ``out/step_time.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from polydiff.core.data import ShardStream, write_shards
from polydiff.core.train import launch, load_modality

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "shared" / "configs" / "image" / "digits.yaml"
OUT = Path(__file__).resolve().parent / "out"


def make_shards(root: Path) -> Path:
    shards = root / "digits"
    write_shards(load_modality("image").synthetic("digits", None), shards, maxcount=500)
    return shards


def bare_loop(shards: Path, steps: int) -> list[float]:
    """The same model, data and optimizer, with nothing but forward, backward and step."""
    cfg = yaml.safe_load(CONFIG.read_text())
    recipe = load_modality("image").from_config(cfg["model"])
    torch.manual_seed(0)
    model = recipe.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["train"]["lr"]))
    stream = ShardStream(
        str(shards),
        decode=recipe.decode,
        collate=recipe.collate,
        bucket=recipe.bucket,
        batch_size=cfg["train"]["batch_size"],
    )
    gen = torch.Generator().manual_seed(0)
    batches, times = iter(stream), []
    for _ in range(steps):
        start = time.perf_counter()
        loss = recipe.loss(model, next(batches), gen, "model")
        if isinstance(loss, tuple):  # (loss, extras for metrics.jsonl)
            loss = loss[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def write_config(root: Path, name: str, changes: dict) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)  # e.g. drop the U-Net section when switching to a DiT
        else:
            node[leaf] = value
    if "deepspeed" not in changes:  # the config sits in a temporary folder: make it absolute
        cfg["deepspeed"] = str(REPO / "shared/configs/deepspeed" / Path(cfg["deepspeed"]).name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class PeakMemory:
    """Polls the peak resident memory (VmHWM) of every trainer worker process."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    # The ranks only: the launcher's own processes name the worker module too.
                    if b"polydiff.core.train.worker" not in cmd or b"launcher" in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0), kib)
                except OSError:
                    continue
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def trainer_run(root: Path, name: str, shards: Path, changes: dict, num_procs: int = 1) -> dict:
    config = write_config(root, name, changes)
    out = root / f"run-{name}"
    with PeakMemory() as memory:
        code = launch(str(config), data=str(shards), out=str(out), num_procs=num_procs)
    if code != 0:
        raise RuntimeError(f"training run {name} failed with exit code {code}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": rows, "peak_rss_mib": sorted(v / 1024 for v in memory.peaks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = 30 if args.quick else 80
    log_every = 5  # a metrics line (one all-reduce) per 5 steps, as a real run would log
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        common = {
            "train.max_steps": steps,
            "train.log_every": log_every,
            "train.preview_every": 0,
            "train.checkpoint_every": 0,
            "data.num_workers": 0,
        }

        bare = bare_loop(shards, steps)
        ours = trainer_run(root, "steptime", shards, common)
        trainer_steps = [64 / r["samples_per_s"] for r in ours["metrics"]]  # batch 64, 1 rank
        # Skip the first 5 steps of each (warm-up): the bare steps, the trainer's first line.
        t_bare = statistics.median(bare[log_every:])
        t_ours = statistics.median(trainer_steps[1:])
        results["step_time"] = {
            "bare_s": t_bare,
            "trainer_s": t_ours,
            "ratio": t_ours / t_bare,
            "steps": steps,
        }

        workers = trainer_run(root, "workers", shards, {**common, "data.num_workers": 2})
        waits = [r["data_wait_fraction"] for r in workers["metrics"][1:]]
        results["data_wait"] = {
            "num_workers": 2,
            "median": statistics.median(waits),
            "mean": statistics.fmean(waits),
        }

        memory = {}
        dit = {
            "model.kind": "dit",
            "model.unet": None,
            "model.dit": {"patch": 2, "dim": 512, "depth": 8, "heads": 8},
            **common,
            "train.max_steps": 8,
            "train.batch_size": 8,
        }
        for stage in (0, 2):
            run = trainer_run(
                root,
                f"zero{stage}",
                shards,
                {**dit, "deepspeed": str(REPO / f"shared/configs/deepspeed/zero{stage}_fp32.json")},
                num_procs=2,
            )
            memory[f"zero{stage}"] = run["peak_rss_mib"]
        results["memory_2_ranks_mib"] = memory

    print(
        "\nTrainer step time vs a bare PyTorch loop (digits U-Net, batch 64, 1 CPU process,"
        f" metrics every {log_every} steps)"
    )
    st = results["step_time"]
    print(
        f"  bare loop {st['bare_s'] * 1e3:8.1f} ms/step | trainer {st['trainer_s'] * 1e3:8.1f}"
        f" ms/step | ratio {st['ratio']:.3f}x (goal <= 1.10x)"
    )
    dw = results["data_wait"]
    print(
        f"\nData-wait fraction with 2 loader workers: median {dw['median']:.1%}, "
        f"mean {dw['mean']:.1%} (goal <= 5%)"
    )
    print("\nPeak resident memory per rank, 2 CPU ranks, image DiT (dim 512, depth 8):")
    for stage, peaks in results["memory_2_ranks_mib"].items():
        print(f"  {stage}: " + ", ".join(f"{p:.0f} MiB" for p in peaks))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, args.out / "step_time.png")
    print(f"\nwrote {args.out}/results.json and step_time.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    st = results["step_time"]
    a.bar(["bare loop", "polydiff trainer"], [st["bare_s"] * 1e3, st["trainer_s"] * 1e3])
    a.set(ylabel="ms per step", title=f"step time ({st['ratio']:.2f}x)")
    mem = results["memory_2_ranks_mib"]
    b.bar(list(mem), [max(v) for v in mem.values()])
    b.set(ylabel="peak RSS per rank (MiB)", title="ZeRO 0 vs 2, 2 ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
