"""Federation benchmarks, printed as ratios measured in one run (2 CPU cores, torch 1 thread per process).

1. DP-SGD step time / plain step time, per network (goal <= 1.5x).
2. Federated wall time / centralized wall time at equal total local steps (goal <= 1.2x), with and without
   the one-off Ray start.
3. Peak RSS of the whole simulation (driver + Ray processes) with 10 and 20 simulated sites.

Run from the repository root: ``python benchmarks/federation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from echoflow.clients.dp import PrivacyLedger, make_private, poisson_batches
from echoflow.config import load_config
from echoflow.federation.simulation import SimulationConfig, simulate
from echoflow.stages import build_stage
from echoflow.training import Stage, TrainConfig, Trainer, random_batches, set_step_seed

torch.set_num_threads(1)


class Frames(Dataset[dict[str, Tensor]]):
    def __init__(self, n: int, size: int, seed: int) -> None:
        self.x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"frame": self.x[i]}


class VAETask:
    """The demo VAE (no adaptive GAN weight, as under DP) on random frames: a stand-in site cohort."""

    def build_stage(self, name: str, config: Mapping[str, Any]) -> Stage:
        cfg = load_config()
        loss = dict(cfg.train.vae.loss) | {"adaptive": False}
        return build_stage("vae", dict(cfg.model), loss)

    def site_data(self, name: str, site_dir: Path, config: Mapping[str, Any]) -> tuple[Frames, Frames]:
        site = int(site_dir.name.split("_")[-1])
        return Frames(int(config.get("n", 256)), 64, site), Frames(16, 64, 1000 + site)


VAE_TASK = VAETask()
# `benchmarks` is shadowed by an installed package: run as a script; Ray workers import this file by its stem
VAE_TASK_PATH = f"{Path(__file__).stem if __name__ == '__main__' else __name__}:VAE_TASK"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.federation.toy


def step_time(stage: Stage, data: Frames, *, dp: bool, steps: int, batch: int) -> float:
    trainer = Trainer(stage, TrainConfig(steps=steps + 2, batch_size=batch, grad_clip=0.0, ema_decay=0.0, amp=False))
    draw = random_batches(data, batch_size=batch)
    if dp:
        ledger = PrivacyLedger(epsilon=8, delta=1e-5, noise_multiplier=1.0, sample_rate=batch / len(data))
        make_private(trainer, ledger, max_grad_norm=1.0, batch_size=batch)
        draw = poisson_batches(data, sample_rate=ledger.sample_rate)
    trainer.fit(draw, steps=2, quiet=True)  # warm-up
    start = time.perf_counter()
    trainer.fit(draw, steps=steps + 2, quiet=True)
    return (time.perf_counter() - start) / steps


def dp_overhead(steps: int) -> None:
    data = Frames(256, 64, 0)
    for batch in (8, 32):
        plain = step_time(VAE_TASK.build_stage("vae", {}), data, dp=False, steps=steps, batch=batch)
        private = step_time(VAE_TASK.build_stage("vae", {}), data, dp=True, steps=steps, batch=batch)
        print(f"vae (autoencoder + discriminator) batch {batch}: plain {plain * 1e3:.0f} ms/step, "
              f"DP-SGD {private * 1e3:.0f} ms/step, ratio {private / plain:.2f}x")


def run_config(tmp: Path, *, task: str, rounds: int, local_steps: int, **extra: Any) -> dict[str, Any]:
    return {"task": task, "stage": "vae", "config-json": json.dumps(extra), "rounds": rounds,
            "local-steps": local_steps, "batch-size": 8, "lr": 2e-4, "seed": 0, "data-root": str(tmp / "cohort"),
            "checkpoint-dir": str(tmp / "ckpt"), "strategy": "fedavg", "strategy-min-nodes": 1, "evaluate": False,
            "resume": False}


def federated_vs_centralized(sites: int, rounds: int, local_steps: int) -> None:
    total = sites * rounds * local_steps
    data = Frames(256 * sites, 64, 0)
    set_step_seed(0, 0)
    start = time.perf_counter()
    trainer = Trainer(VAE_TASK.build_stage("vae", {}), TrainConfig(steps=total, batch_size=8, ema_decay=0.0, amp=False))
    trainer.fit(random_batches(data, batch_size=8), quiet=True)
    centralized = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        state = simulate(run_config(Path(tmp), task=VAE_TASK_PATH, rounds=rounds,
                                    local_steps=local_steps), SimulationConfig(sites=sites, num_cpus=2))
        federated = time.perf_counter() - start
    rounds_only = sum(entry["wall_s"] for entry in state.history)
    print(f"{total} local steps: centralized {centralized:.1f} s (1 process); federated {sites} sites x {rounds} "
          f"rounds x {local_steps} steps on 2 Ray CPUs {federated:.1f} s (rounds only {rounds_only:.1f} s); "
          f"ratio {federated / centralized:.2f}x ({rounds_only / centralized:.2f}x without the Ray start)")


def tree_rss_mib(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"].strip()), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


def peak_rss(sites: int) -> None:
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mib(os.getpid()))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        simulate(run_config(Path(tmp), task="tests.federation.toy:TASK", rounds=1, local_steps=5),
                 SimulationConfig(sites=sites, num_cpus=2))
    done.set()
    sampler.join()
    print(f"{sites} simulated sites (toy stage, 1 round, 2 Ray CPUs): peak RSS of driver + Ray {peak[0]:.0f} MiB, "
          f"{time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    quick = parser.parse_args().quick
    dp_overhead(steps=5 if quick else 20)
    federated_vs_centralized(sites=2, rounds=2, local_steps=5 if quick else 20)
    for sites in (10, 20):
        peak_rss(sites)


if __name__ == "__main__":
    main()
