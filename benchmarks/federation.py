"""Federation benchmarks, printed as ratios measured in one run (2 CPU cores, torch 1 thread per process).

1. DP-SGD step time / plain step time, per network at demo size (goal <= 1.5x).
2. Federated wall time / centralized wall time at equal total local steps (goal <= 1.2x), with and without
   the one-off Ray start.
3. Peak RSS of the whole simulation (driver + Ray processes): 10 sites train the demo VAE for 2 rounds (goal
   <= 24 GiB), and 20 sites of the toy stage.
4. Federated VAE over the 4 non-IID phantom sites / centralized VAE at the same total optimiser steps: pooled
   VAL reconstruction loss ratio (goal <= 1.10); also vs centralized at as many steps as each site took (equal
   wall time); and the federated latent scale next to the centralized one. ``strategy=...`` etc. after the
   options are config overrides (e.g. ``--only quality strategy=fedavgm``).

Run from the repository root: ``python benchmarks/federation.py [--quick] [--only dp,speed,memory,quality]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from echoflow.clients.dp import PrivacyLedger, make_private, poisson_batches
from echoflow.clients.site import mean_loss
from echoflow.config import load_config, plain
from echoflow.federation.federate import federate
from echoflow.federation.simulation import SimulationConfig, simulate
from echoflow.federation.task import load_group_arrays
from echoflow.models.vae import measure_latent_scale
from echoflow.stages import STAGES
from echoflow.stages.data import stage_dataset
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import Stage, TrainConfig, Trainer, random_batches, set_step_seed
from echoflow.study.centralized import train_stage
from echoflow.study.models import Cohort

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


class Items(Dataset[dict[str, Tensor]]):
    """Examples ``i`` of a batch dict (every tensor's first dimension)."""

    def __init__(self, batch: dict[str, Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def dp_overhead(steps: int) -> None:
    """Per network at demo size: median CPU time of a DP-SGD step / of a plain step, the two interleaved.

    Both draw from the same 256 synthetic examples of 64 patients (4 items each): DP by patient-level Poisson
    sampling (one item per sampled patient; expected batch = the federation's), plain by a uniform batch OF THE
    SAME SIZE as that step's Poisson batch, so both arms do the same work but for DP (a fixed plain batch of 8
    against Poisson batches of mean 7.4-8.3 compared unequal work). The draws are not timed. CPU time
    of this one-thread process, not wall time: other processes on a shared machine then slow both arms less
    unevenly. The VAE runs as under DP (fixed adversarial weight), before and after its GAN term switches on
    (the generator loss then also runs the discriminator).
    """
    # benchmarks/models.py, the sibling script; imported here, not on top: Ray workers import this file too
    from models import demo_batch

    cfg = load_config()
    batch = int(cfg.federation.batch_size)
    cases: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in STAGES] + [("vae", {"adv_start": 0})]
    for name, loss_overrides in cases:
        items = demo_batch(name, 256)
        data = Items(items | {"patient": torch.arange(256) // 4})
        loss = plain(cfg.train[name].loss) | ({"adaptive": False} if name == "vae" else {}) | loss_overrides
        trainers = {}
        for dp in (False, True):
            trainers[dp] = Trainer(build_stage(name, plain(cfg.model), loss),
                                   TrainConfig(batch_size=batch, grad_clip=0.0 if dp else 1.0, ema_decay=0.0,
                                               amp=False))
        ledger = PrivacyLedger(epsilon=8, delta=1e-5)
        ledger.begin_stage(name, share=1.0, sample_rate=batch / 64, planned_steps=steps + 2)
        secret = torch.Generator().manual_seed(0)
        make_private(trainers[True], ledger, stage=name, max_grad_norm=1.0, batch_size=batch, generator=secret)
        private_draw = poisson_batches(data, sample_rate=batch / 64, generator=secret)
        times: dict[bool, list[float]] = {False: [], True: []}
        walls: dict[bool, list[float]] = {False: [], True: []}
        sizes = []
        for step in range(steps + 2):  # the first two are warm-up
            private = private_draw()
            sizes.append(len(private["patient"]))
            set_step_seed(0, step)
            for dp, drawn in ((False, random_batches(data, batch_size=max(sizes[-1], 1))()), (True, private)):
                set_step_seed(0, step)
                start, wall = time.process_time(), time.perf_counter()
                trainers[dp].train_step(drawn)
                if step >= 2:
                    times[dp].append(time.process_time() - start)
                    walls[dp].append(time.perf_counter() - wall)
        plain_s, private_s = statistics.median(times[False]), statistics.median(times[True])
        wall_ratio = statistics.median(walls[True]) / statistics.median(walls[False])
        label = name + (" (GAN term on)" if loss_overrides else "")
        print(f"RESULT DP-SGD / plain step time, {label}: {private_s / plain_s:.2f}x (plain {plain_s * 1e3:.0f} ms, "
              f"DP-SGD {private_s * 1e3:.0f} ms CPU, equal batches: Poisson, expected {batch}, mean "
              f"{statistics.mean(sizes[2:]):.1f}; medians of {steps}; wall time {wall_ratio:.2f}x; goal <= 1.5x; "
              f"{load()})")


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


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
    # round 1 also starts the Ray actors (a Python + torch import each); later rounds are the steady state
    steady = sum(entry["wall_s"] for entry in state.history[1:]) / max(rounds - 1, 1)
    print(f"RESULT federated / centralized wall time: {federated / centralized:.2f}x ({total} local steps, "
          f"{rounds_only / centralized:.2f}x without the Ray start; goal <= 1.2x; {load()})")
    print(f"{total} local steps: centralized {centralized:.1f} s (1 process); federated {sites} sites x {rounds} "
          f"rounds x {local_steps} steps on 2 Ray CPUs {federated:.1f} s (rounds only {rounds_only:.1f} s); "
          f"ratio {federated / centralized:.2f}x ({rounds_only / centralized:.2f}x without the Ray start, "
          f"{steady * rounds / centralized:.2f}x for rounds after the first, which starts the actors)")


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


def peak_rss(sites: int, *, task: str, rounds: int) -> None:
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mib(os.getpid()))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            simulate(run_config(Path(tmp), task=task, rounds=rounds, local_steps=5, n=64),
                     SimulationConfig(sites=sites, num_cpus=2))
    finally:
        done.set()
        sampler.join()
    stage = "demo VAE" if task == VAE_TASK_PATH else "toy stage"
    print(f"RESULT peak RSS, {sites} sites ({stage}): {peak[0] / 1024:.2f} GiB (driver + Ray; goal <= 24 GiB)")
    print(f"{sites} simulated sites ({stage}, {rounds} rounds, 2 Ray CPUs): peak RSS of driver + Ray "
          f"{peak[0] / 1024:.2f} GiB (goal <= 24 GiB), {time.perf_counter() - start:.1f} s")


def federated_vs_centralized_vae(rounds: int, local_steps: int, lr: float, overrides: Sequence[str] = ()) -> None:
    sites = 4
    total = sites * rounds * local_steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([f"workdir={tmp}", "mlflow.tracking_uri=", "data.sites=4", "data.patients_per_site=8",
                           "data.size=32", "data.frames=16", "model.vae.base_channels=8",
                           "model.discriminator.base_channels=8", f"federation.sites={sites}",
                           f"federation.rounds={rounds}", f"federation.local_steps={local_steps}",
                           "federation.evaluate=false", f"federation.lr={lr}", f"train.vae.optim.steps={total}",
                           "train.vae.optim.batch_size=${federation.batch_size}", "train.vae.optim.lr=${federation.lr}",
                           "train.vae.optim.ema_decay=0.0", *overrides])
        start = time.perf_counter()
        state = federate(cfg, ["vae"])["vae"]
        federated_s = time.perf_counter() - start
        cohort = Cohort.of(cfg)
        train_sites = cohort.split("TRAIN")
        start = time.perf_counter()
        central = train_stage("vae", cfg, train_sites, out=Path(tmp) / "central", quiet=True)
        central_s = time.perf_counter() - start
        per_site = cfg.copy()  # centralized for as many steps as each site took: equal wall time, 1/sites the data
        OmegaConf.update(per_site, "train.vae.optim.steps", rounds * local_steps)
        short = train_stage("vae", per_site, train_sites, out=Path(tmp) / "central_short", quiet=True)
        val = stage_dataset("vae", cohort.split("VAL"), clip_frames=cfg.data.clip_frames, clip_fps=cfg.data.clip_fps)
        frames = torch.cat([torch.from_numpy(v) for site in train_sites for v in site.videos]).float() / 127.5 - 1
        losses, scales = {}, {}
        for name, load in (("federated", lambda st: load_group_arrays(st, state.arrays)),
                           ("centralized", lambda st: st.groups()["model"].load_state_dict(central.state_dict())),
                           ("short", lambda st: st.groups()["model"].load_state_dict(short.state_dict()))):
            stage = build_stage("vae", dict(cfg.model), dict(cfg.train.vae.loss))
            load(stage)
            losses[name] = mean_loss(stage, val, batch_size=64, seed=0)
            scales[name] = measure_latent_scale(stage.groups()["model"], frames.unsqueeze(1))  # type: ignore[arg-type]
    ratio = losses["federated"] / losses["centralized"]
    print(f"RESULT federated / centralized VAE VAL loss: {ratio:.3f} (same total steps, measured in this run; "
          f"goal <= 1.10)")
    print(f"VAE on 4 non-IID phantom sites, {total} total steps (federated {sites} sites x {rounds} rounds x "
          f"{local_steps} steps, {cfg.strategy.name}): VAL loss federated {losses['federated']:.4f} / centralized "
          f"{losses['centralized']:.4f} = {ratio:.3f} (goal <= 1.10), lr {lr}; vs centralized at "
          f"{rounds * local_steps} steps (as many as each site) {losses['short']:.4f}: "
          f"{losses['federated'] / losses['short']:.3f}; federated latent scale pooled from "
          f"site moments {float(state.arrays['model.latent_scale']):.4f} vs measured on all frames "
          f"{scales['federated']:.4f} (wall {federated_s:.0f} s vs {central_s:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--only", default="dp,speed,memory,quality", help="comma list of benchmarks to run")
    parser.add_argument("overrides", nargs="*", help="config overrides for the quality benchmark")
    args = parser.parse_args()
    only, quick = set(args.only.split(",")), args.quick
    if "dp" in only:
        dp_overhead(steps=6 if quick else 30)
    if "speed" in only:
        federated_vs_centralized(sites=2, rounds=3 if quick else 4, local_steps=5 if quick else 50)
    if "memory" in only:
        peak_rss(10, task=VAE_TASK_PATH, rounds=2)
        peak_rss(20, task="tests.federation.toy:TASK", rounds=1)
    if "quality" in only:
        federated_vs_centralized_vae(rounds=4 if quick else 20, local_steps=10 if quick else 20, lr=1e-3,
                                     overrides=args.overrides)


if __name__ == "__main__":
    main()
