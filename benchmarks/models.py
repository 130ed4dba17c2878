"""Model benchmarks, measured in one run on one thread.

1. Training steps/s of every stage at its demo size and batch (ratio to the VAE's).
2. Sampling time per clip for 2, 4, 8, 16, 32 ODE steps and the EF-consistency reached at each (R² of requested
   vs regressor-measured EF), as ratios to the 32-step run. Needs trained models in --workdir (e.g. after
   `echoflow train all workdir=runs/models`); without them only part 1 runs.

    python benchmarks/models.py [--workdir runs/models] [--clips 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from echoflow.config import load_config, plain
from echoflow.models.vae import AdversarialVAE
from echoflow.stages import STAGES
from echoflow.stages.data import encode_sites
from echoflow.stages.objectives import build_stage
from echoflow.stages.trainer import Batch, TrainConfig, Trainer
from echoflow.study.evaluate import video_flow_ef
from echoflow.study.models import Cohort, trained_network


def demo_batch(name: str, batch: int, *, size: int = 64, latent: int = 16, frames: int = 16) -> Batch:
    ef = 20 + 60 * torch.rand(batch)
    if name == "vae":
        return {"frame": torch.rand(batch, 1, size, size) * 2 - 1}
    if name == "image_flow":
        return {"frame": torch.randn(batch, 4, latent, latent)}
    if name == "reid":
        return {"a": torch.randn(batch, 4, latent, latent), "b": torch.randn(batch, 4, latent, latent),
                "patient": torch.arange(batch) % max(batch // 2, 1)}
    if name == "video_flow":
        return {"clip": torch.randn(batch, 4, frames, latent, latent), "ef": ef}
    return {"clip": torch.rand(batch, 1, frames, size, size) * 2 - 1, "ef": ef}


def bench_training(overrides: list[str], *, steps: int) -> None:
    cfg = load_config(overrides)
    rates = {}
    for name in STAGES:
        optim = plain(cfg.train[name].optim)
        stage = build_stage(name, plain(cfg.model), {**plain(cfg.train[name].loss),
                                                     **({"adv_start": 0} if name == "vae" else {})})
        trainer = Trainer(stage, TrainConfig(**optim))
        data = demo_batch(name, optim["batch_size"])
        trainer.train_step(data)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(data)
        rates[name] = steps / (time.perf_counter() - start)
    for name, rate in rates.items():
        print(f"train {name:<10} batch {cfg.train[name].optim.batch_size:>3}: {rate:6.2f} steps/s "
              f"({rate / rates['vae']:.2f}x the VAE's)")
        print(f"RESULT train {name} steps/s: {rate:.2f} ({rate / rates['vae']:.2f}x the VAE's, measured in this run)")


def bench_sampling(overrides: list[str], *, clips: int) -> None:
    cfg = load_config(overrides)
    vae = trained_network(cfg, "vae")
    assert isinstance(vae, AdversarialVAE)
    held_out = encode_sites(vae, Cohort.of(cfg).split("VAL", "TEST"))
    nets = {name: trained_network(cfg, name) for name in ("video_flow", "ef")}
    results = {}
    for steps in (2, 4, 8, 16, 32):
        start = time.perf_counter()
        fit, _, _ = video_flow_ef(nets["video_flow"], vae, nets["ef"], held_out, n=clips,
                                  frames=cfg.data.clip_frames, steps=steps, method=cfg.train.sampling.method,
                                  target=cfg.train.video_flow.loss.target, guidance=cfg.train.sampling.guidance)
        results[steps] = ((time.perf_counter() - start) / clips, fit.r2)
    base_time, base_r2 = results[32]
    for steps, (seconds, r2) in results.items():
        print(f"sample {steps:>2} steps ({cfg.train.sampling.method}): {seconds:.3f} s/clip "
              f"({seconds / base_time:.2f}x the 32-step time), EF R² {r2:.3f} ({r2 - base_r2:+.3f} vs 32 steps)")
        print(f"RESULT sample {steps} steps time: {seconds / base_time:.2f}x (vs 32 steps, {seconds:.3f} s/clip; EF R² "
              f"{r2:.3f}, {r2 - base_r2:+.3f} vs 32 steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/models"))
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per stage")
    parser.add_argument("--clips", type=int, default=32, help="generated clips per step count")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [f"workdir={args.workdir}", *args.overrides]
    with threadpool_limits(1):
        bench_training(overrides, steps=args.steps)
        if (args.workdir / "video_flow" / "model.safetensors").exists():
            bench_sampling(overrides, clips=args.clips)
        else:
            print(f"sampling: skipped, no trained models in {args.workdir}")


if __name__ == "__main__":
    main()
