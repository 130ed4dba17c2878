"""Does the latent video flow follow the requested EF? One arm, several seeds, measured by the LV segmenter.

Trains the demo-size `LatentVideoFlow` (configs/model/demo.yaml, latents 4x16x16, 16-frame clips at 12.5 fps)
centrally on a small phantom cohort for a fixed step budget, animates N held-out first frames (an unseen
cohort: other patients, another site style) at M requested EFs, decodes, and reads EF with an `LVSegmenter`
trained on the training cohort's LV masks — independent of any EF regressor. Reports per seed the slope,
intercept, R² and residual SD of measured vs requested EF, and the share of variance due to the first frame
(two-way table N x M), then the mean and a t 95 % CI over seeds.

The codec is a fixed linear one, not the trained VAE, so every arm sees identical latents and only the flow
changes: PCA of 4x4 pixel patches keeping 4 components (64x64 -> 4x16x16, scaled to unit variance). The meter is
trained on real frames and their codec reconstructions (same masks), so it reads decoded clips; its own error on
real and reconstructed held-out clips is reported as ``meter``.

    python benchmarks/ef_following.py --arm smooth --ef-embedding smooth --seeds 0 1 2 --out runs/eff
    python benchmarks/ef_following.py --arm fourier --ef-embedding fourier --seeds 0 1 2 --out runs/eff
    python benchmarks/ef_following.py --arm balanced --balanced --seeds 0 1 2 --out runs/eff
    python benchmarks/ef_following.py --out runs/eff --summarize fourier   # the table: mean ± CI over seeds

Each run appends one JSON line per seed to ``--out/results.jsonl`` and prints it; the cohorts, codec and meter
are cached under ``--out/cache`` (same arguments -> same files).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats

from echoflow.data.phantom import generate_cohort, read_lv_masks
from echoflow.data.sites import ClipDataset, SiteData, balanced_batches, load_sites
from echoflow.models.segmenter import LVSegmenter
from echoflow.models.video_flow import LatentVideoFlow, animate
from echoflow.stages.objectives import FlowStage
from echoflow.stages.trainer import TrainConfig, Trainer, random_batches
from echoflow.study.ef_following import following
from echoflow.study.meter import fit_segmenter
from echoflow.study.protocol import seed_interval

PATCH, COMPONENTS = 4, 4


class PatchPCA:
    """Linear codec: frames (N, 1, 64, 64) in [-1, 1] <-> latents (N, 4, 16, 16) of unit variance."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, scale: float) -> None:
        self.mean, self.basis, self.scale = mean, basis, scale  # (16,), (16, 4)

    @classmethod
    def fit(cls, frames: torch.Tensor) -> PatchPCA:
        patches = F.pixel_unshuffle(frames, PATCH).permute(0, 2, 3, 1).reshape(-1, PATCH * PATCH)
        mean = patches.mean(0)
        _, _, v = torch.linalg.svd(patches - mean, full_matrices=False)
        basis = v[:COMPONENTS].T.contiguous()
        codes = (patches - mean) @ basis
        return cls(mean, basis, float(codes.std()))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        patches = F.pixel_unshuffle(frames, PATCH).permute(0, 2, 3, 1)
        return ((patches - self.mean) @ self.basis / self.scale).permute(0, 3, 1, 2).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        patches = latents.permute(0, 2, 3, 1) * self.scale @ self.basis.T + self.mean
        return F.pixel_shuffle(patches.permute(0, 3, 1, 2), PATCH).clamp(-1, 1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "basis": self.basis, "scale": torch.tensor(self.scale)}


def unit(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(video).float().div(127.5).sub(1).unsqueeze(1)  # (T, 1, H, W)


def cohort(path: Path, *, sites: int, patients: int, seed: int, frames: int) -> list[Path]:
    roots = [path / f"site_{s:02d}" for s in range(sites)]
    if not all((root / "FileList.csv").exists() for root in roots):
        generate_cohort(path, sites=sites, patients_per_site=patients, seed=seed, frames=frames)
    return roots


def codec_and_meter(cache: Path, train: list[SiteData], *, meter_steps: int) -> tuple[PatchPCA, LVSegmenter]:
    frames = torch.cat([unit(v) for site in train for v in site.videos])
    if (cache / "codec.safetensors").exists():
        s = load_file(cache / "codec.safetensors")
        codec = PatchPCA(s["mean"], s["basis"], float(s["scale"]))
    else:
        codec = PatchPCA.fit(frames)
        save_file(codec.state(), cache / "codec.safetensors")
    meter = LVSegmenter()
    if (cache / "meter.safetensors").exists():
        meter.load_state_dict(load_file(cache / "meter.safetensors"))
        return codec, meter.eval()
    masks = np.concatenate([read_lv_masks(r.path) for site in train for r in site.records])
    recon = ((codec.decode(codec.encode(frames)) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    pixels = np.concatenate([np.concatenate(site.videos) for site in train])
    meter = fit_segmenter(np.concatenate([pixels, recon]), np.concatenate([masks, masks]), steps=meter_steps)
    save_file(meter.state_dict(), cache / "meter.safetensors")
    return codec, meter


def clip_of(video: torch.Tensor, frames: int = 16, stride: int = 2) -> torch.Tensor:
    return video[: (frames - 1) * stride + 1 : stride]


def summarize(results: Path, *, reference: str) -> None:
    """Mean and t 95 % CI over seeds per (arm, guidance), and the paired per-seed difference to ``reference``."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    keys = ("slope", "intercept", "r2_fit", "resid_sd", "mae", "share_first_frame")
    groups: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["guidance"]), {})[row["seed"]] = row

    def mean_ci(values: list[float]) -> str:
        mean, half = seed_interval(values)
        return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"

    print("| arm | guidance | seeds | " + " | ".join(keys) + f" | Δ MAE vs {reference} (paired) |")
    print("|" + " --- |" * (len(keys) + 4))
    for (arm, guidance), by_seed in sorted(groups.items()):
        ref = groups.get((reference, guidance), {})
        paired = [by_seed[s]["mae"] - ref[s]["mae"] for s in by_seed if s in ref]
        diff = mean_ci(paired) + f" (n={len(paired)})" if paired and arm != reference else ""
        cells = [mean_ci([r[k] for r in by_seed.values()]) for k in keys]
        print(f"| {arm} | {guidance:g} | {sorted(by_seed)} | " + " | ".join(cells) + f" | {diff} |")
    for (arm, guidance), by_seed in sorted(groups.items()):  # one line per headline figure, for scripts
        ref = groups.get((reference, guidance), {})
        paired = [by_seed[s]["mae"] - ref[s]["mae"] for s in by_seed if s in ref]
        versus = f"; Δ vs {reference} {mean_ci(paired)}, paired" if paired and arm != reference else ""
        print(f"RESULT EF-following MAE, {arm} guidance {guidance:g}: {mean_ci([r['mae'] for r in by_seed.values()])} "
              f"(EF points, mean ± 95 % CI over {len(by_seed)} seeds{versus})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", help="name of this arm (required unless --summarize)")
    parser.add_argument("--summarize", metavar="REFERENCE_ARM",
                        help="print mean ± t 95 %% CI over seeds of --out/results.jsonl, paired to this arm; no run")
    parser.add_argument("--out", type=Path, default=Path("runs/ef_following"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ef-embedding", default="smooth", choices=["smooth", "fourier"])
    parser.add_argument("--balanced", action="store_true")
    parser.add_argument("--schedule", default="uniform", choices=["uniform", "logit_normal"])
    parser.add_argument("--cine-frames", type=int, default=32)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--first-frames", type=int, default=6)
    parser.add_argument("--efs", type=float, nargs="+", default=[20, 32, 44, 56, 68, 80])
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--meter-steps", type=int, default=500)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.out / "results.jsonl", reference=args.summarize)
        return
    if not args.arm:
        parser.error("--arm is required")
    torch.set_num_threads(1)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    roots = cohort(cache / f"train{args.cine_frames}", sites=3, patients=10, seed=0, frames=args.cine_frames)
    meter_roots = cohort(cache / "train32", sites=3, patients=10, seed=0, frames=32)
    test_roots = cohort(cache / "test32", sites=1, patients=10, seed=101, frames=32)
    splits = ("TRAIN", "VAL", "TEST")
    codec, meter = codec_and_meter(cache, load_sites(meter_roots, size=64, splits=splits),
                                   meter_steps=args.meter_steps)
    test = load_sites(test_roots, size=64, splits=splits)[0]
    real = torch.stack([clip_of(unit(v)) for v in test.videos]).transpose(1, 2)  # (V, 1, 16, 64, 64)
    exact = np.array([r.ef for r in test.records])
    recon = torch.stack([codec.decode(codec.encode(c.transpose(0, 1))).transpose(0, 1) for c in real])
    meter_report = {"real_clip_mae": float(np.abs(meter.ef(real).numpy() - exact).mean()),
                    "recon_clip_mae": float(np.abs(meter.ef(recon).numpy() - exact).mean()),
                    "recon_clip_bias": float((meter.ef(recon).numpy() - exact).mean())}

    train = load_sites(roots, size=64, splits=("TRAIN", "VAL"))
    latent = [replace(site, videos=[codec.encode(unit(v)).numpy() for v in site.videos]) for site in train]
    dataset = ClipDataset(latent, frames=16, fps=12.5)
    motion = torch.stack([dataset[i]["clip"] for i in range(len(dataset))])
    motion_scale = float((motion - motion[:, :, :1]).std())
    firsts = torch.stack([codec.encode(unit(v[:1]))[0] for v in test.videos[: args.first_frames]])
    ef_train = np.array([train_ef for train_ef in dataset.table.ef])

    for seed in args.seeds:
        began = time.time()
        torch.manual_seed(seed)
        net = LatentVideoFlow(channels=(32, 64), blocks=1, heads=4, patch=2, motion_scale=motion_scale,
                              ef_embedding=args.ef_embedding)
        stage = FlowStage("video_flow", net, target="x1", schedule=args.schedule, p_uncond=0.1)
        trainer = Trainer(stage, TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, ema_decay=0.999,
                                             seed=seed, log_every=args.steps))
        draw = (balanced_batches(dataset, batch_size=8) if args.balanced
                else random_batches(dataset, batch_size=8))
        last = trainer.fit(draw, quiet=True)
        model = cast(LatentVideoFlow, trainer.averaged_model()).eval()
        trained = time.time() - began
        n, m = len(firsts), len(args.efs)
        first = firsts.repeat_interleave(m, 0)
        requested = torch.tensor(args.efs).repeat(n)
        for guidance in args.guidance:
            generator = torch.Generator().manual_seed(1000 + seed)
            clips = animate(model, first, requested, frames=16, steps=args.sample_steps, guidance=guidance,
                            method="heun", target="x1", generator=generator)
            pixels = torch.stack([codec.decode(c.transpose(0, 1)).transpose(0, 1) for c in clips])
            measured = meter.ef(pixels).numpy()
            follow = asdict(following(measured.reshape(n, m), args.efs))
            line = stats.linregress(requested.numpy(), measured)
            row = {"arm": args.arm, "seed": seed, "guidance": guidance, "steps": args.steps,
                   "ef_embedding": args.ef_embedding, "balanced": args.balanced, "schedule": args.schedule,
                   "cine_frames": args.cine_frames, "train_loss": last.get("model"),
                   **follow, "r2_identity": follow["r2"], "r2_fit": float(line.rvalue**2),
                   "per_ef_abs_error": follow["per_ef_mae"], "meter": meter_report, "motion_scale": motion_scale,
                   "train_videos": len(dataset), "train_ef_quartiles": np.percentile(ef_train, [25, 50, 75]).tolist(),
                   "train_s": round(trained, 1), "total_s": round(time.time() - began, 1)}
            print(json.dumps(row), flush=True)
            with (args.out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
