"""Does the video flow follow the requested EF? A dose-response grid read by the independent EF meter.

N held-out real first frames are each animated at M requested EFs (the same noise seed for every cell), the
clips decoded and their EF read by the LV segmenter (`echoflow.study.meter`), which never saw the EF regressor.
Reported: slope, intercept, R² and residual SD of measured vs requested EF, the mean absolute error per
requested EF, and the share of the measured-EF variance explained by the first frame (row means of the N x M
grid) next to the share explained by the requested EF (column means). A video flow that follows EF has slope
near 1, a small residual SD, and most variance in the columns.

    echoflow evaluate video-flow workdir=runs/demo
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from scipy import stats
from torch import Tensor

from echoflow.data.phantom import read_lv_masks
from echoflow.data.sites import SiteData
from echoflow.errors import EchoFlowError
from echoflow.models.flow import Method, Target
from echoflow.models.segmenter import LVSegmenter
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.study.evaluate import measure_ef
from echoflow.study.generate import animate_frames, decode_clips
from echoflow.study.meter import fit_segmenter
from echoflow.study.models import Cohort, Models, stage_folder, trained_network

DEFAULT_EFS = (20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0)
"""Requested EFs of the dose-response grid, percent."""


@dataclass(frozen=True)
class Following:
    """Measured vs requested EF of generated clips.

    Attributes:
        slope, intercept: least-squares line measured = intercept + slope · requested (1 and 0 when followed).
        slope_low, slope_high: its 95 % confidence interval (t distribution).
        r2: R² of measured against the identity (1 - SSE/SST; negative when worse than the mean).
        resid_sd: residual SD about the fitted line, EF points. mae: mean |measured - requested|.
        per_ef_mae: mean |measured - requested| per requested EF (keys: the EF, e.g. ``"20"``).
        share_first_frame: variance of the grid's row means (first frames) over the total variance.
        share_requested_ef: the same for its column means (requested EFs).
        grid: (N first frames x M EFs) measured EF. efs: the requested EFs (M).
    """

    slope: float
    slope_low: float
    slope_high: float
    intercept: float
    r2: float
    resid_sd: float
    mae: float
    per_ef_mae: dict[str, float]
    share_first_frame: float
    share_requested_ef: float
    grid: list[list[float]]
    efs: list[float]


def following(grid: np.ndarray, efs: Sequence[float]) -> Following:
    """Summarise a dose-response grid (N first frames x M requested EFs) of measured EF."""
    grid = np.asarray(grid, dtype=np.float64)
    requested = np.broadcast_to(np.asarray(efs, dtype=np.float64), grid.shape)
    if grid.ndim != 2 or grid.shape[1] != len(efs) or grid.size < 3 or len(set(efs)) < 2:
        raise EchoFlowError(f"following: need an (N, M) grid over ≥ 2 distinct EFs, got {grid.shape} for {efs}")
    x, y = requested.ravel(), grid.ravel()
    line = stats.linregress(x, y)
    half = float(stats.t.ppf(0.975, len(x) - 2) * line.stderr)
    resid = y - (line.intercept + line.slope * x)
    total = float(y.var())

    def share(means: np.ndarray) -> float:
        return float(means.var() / total) if total > 0 else float("nan")

    return Following(
        slope=float(line.slope), slope_low=float(line.slope) - half, slope_high=float(line.slope) + half,
        intercept=float(line.intercept), r2=1.0 - float(np.sum((y - x) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12)),
        resid_sd=float(resid.std(ddof=2)), mae=float(np.abs(y - x).mean()),
        per_ef_mae={f"{ef:g}": float(np.abs(grid[:, j] - ef).mean()) for j, ef in enumerate(efs)},
        share_first_frame=share(grid.mean(1)), share_requested_ef=share(grid.mean(0)),
        grid=grid.tolist(), efs=[float(e) for e in efs])


def dose_response(video_flow: LatentVideoFlow, decode: Callable[[Tensor], Tensor], read_ef: Callable[[Tensor], Tensor],
                  firsts: Tensor, efs: Sequence[float], *, frames: int, steps: int, method: Method, target: Target,
                  guidance: float, seed: int = 0) -> np.ndarray:
    """Measured EF (N, M) of clips animated from ``firsts`` (N, C, h, w) latent frames at each of ``efs``.

    ``decode`` maps latent clips (B, C, T, h, w) to pixel clips (B, 1, T, H, W); ``read_ef`` pixel clips to EF (B,).
    """
    n, m = len(firsts), len(efs)
    first = firsts.repeat_interleave(m, 0)
    requested = torch.tensor(list(efs), dtype=torch.float32).repeat(n)
    generator = torch.Generator().manual_seed(seed)
    latents = animate_frames(video_flow, first, requested, frames=frames, window=frames, steps=steps, method=method,
                             target=target, guidance=guidance, generator=generator)
    return read_ef(decode(latents)).numpy().reshape(n, m)


def train_meter(train: Sequence[SiteData], vae: AdversarialVAE | None, folder: Path, *, steps: int,
                seed: int = 0) -> LVSegmenter:
    """The LV segmenter of a run, trained once on the TRAIN videos' LV masks and kept in ``folder``.

    With ``vae`` the meter also trains on the VAE's reconstructions of the same frames (same masks), so it
    reads decoded clips as it reads real ones.
    """
    path = folder / "model.safetensors"
    meter = LVSegmenter()
    if path.exists():
        meter.load_state_dict(load_file(path))
        return meter.eval()
    try:
        masks = np.concatenate([read_lv_masks(r.path) for site in train for r in site.records])
    except EchoFlowError as err:
        raise EchoFlowError(f"evaluate video-flow: the EF meter needs LV masks (the phantom writes them): {err}"
                            ) from err
    pixels = np.concatenate([video for site in train for video in site.videos])
    if masks.shape != pixels.shape:
        raise EchoFlowError(f"evaluate video-flow: LV masks {masks.shape} do not match the frames {pixels.shape}")
    frames, labels = pixels, masks
    if vae is not None:
        with torch.no_grad():
            unit = torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1)
            recon = torch.cat([vae.decode_latent(vae.encode_latent(c)).clamp(-1, 1) for c in unit.split(256)])
        frames = np.concatenate([pixels, ((recon[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()])
        labels = np.concatenate([masks, masks])
    meter = fit_segmenter(frames, labels, steps=steps, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(meter.state_dict(), path)
    return meter


def evaluate_video_flow(video_flow: LatentVideoFlow, vae: AdversarialVAE, meter: LVSegmenter,
                        held_out: Sequence[SiteData], *, first_frames: int, efs: Sequence[float], frames: int,
                        steps: int, method: Method, target: Target, guidance: float, seed: int = 0,
                        regressor: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
    """The dose-response grid on ``first_frames`` held-out real first frames, read by the meter (and regressor).

    Also reports the meter's own error on the held-out real clips (its first ``frames`` frames at 12.5 fps are
    what `first_clips` gives; here every 2nd frame of the 25-fps phantom), the floor under the numbers above.
    """
    videos = [(site, i) for site in held_out for i in range(len(site.videos))]
    if len(videos) < first_frames:
        raise EchoFlowError(f"evaluate video-flow: {len(videos)} held-out videos, fewer than {first_frames}")
    pick = np.random.default_rng(seed).choice(len(videos), first_frames, replace=False)
    pixels = [videos[i][0].videos[videos[i][1]] for i in pick]
    clips = torch.stack([torch.from_numpy(v[: 2 * frames - 1 : 2]).float().div(127.5).sub(1) for v in pixels])
    exact = np.array([videos[i][0].records[videos[i][1]].ef for i in pick])
    with torch.no_grad():
        firsts = vae.encode_latent(clips[:, :1])
    decoded: list[Tensor] = []

    def decode(latents: Tensor) -> Tensor:
        decoded.append(decode_clips(vae, latents))
        return decoded[-1]

    grid = dose_response(video_flow, decode, meter.ef, firsts, efs, frames=frames, steps=steps, method=method,
                         target=target, guidance=guidance, seed=seed)
    result: dict[str, Any] = {
        "meter": asdict(following(grid, efs)),
        "meter_error_on_real_clips": float(np.abs(meter.ef(clips.unsqueeze(1)).numpy() - exact).mean()),
        "first_frames": first_frames, "guidance": guidance,
    }
    if regressor is not None:
        result["regressor"] = asdict(following(regressor(decoded[-1]).numpy().reshape(grid.shape), efs))
    return result


def video_flow_report(cfg: DictConfig, models: Models, cohort: Cohort, *, first_frames: int, efs: Sequence[float],
                      guidance: float, meter_steps: int) -> dict[str, Any]:
    """`evaluate_video_flow` on a run: meter trained (once) on the TRAIN split, grid on VAL+TEST first frames.

    The regressor's reading is added when the run has a trained ``ef`` stage.
    """
    meter = train_meter(cohort.split("TRAIN"), models.vae, stage_folder(cfg, "meter"), steps=meter_steps,
                        seed=cfg.seed)
    regressor = None
    if (stage_folder(cfg, "ef") / "model.safetensors").exists():
        ef_net = trained_network(cfg, "ef")
        regressor = partial(measure_ef, ef_net)
    return evaluate_video_flow(models.video_flow, models.vae, meter, cohort.split("VAL", "TEST"),
                               first_frames=first_frames, efs=efs, frames=cfg.data.clip_frames,
                               steps=cfg.train.sampling.steps, method=cfg.train.sampling.method,
                               target=cfg.train.video_flow.loss.target, guidance=guidance, seed=cfg.seed,
                               regressor=regressor)
