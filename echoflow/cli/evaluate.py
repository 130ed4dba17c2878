"""`echoflow evaluate models`: the trained models measured on held-out real data, printed and logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import mlflow
import typer
from rich.console import Console
from rich.table import Table

from echoflow.centralized import encode_sites, load_network, load_split
from echoflow.cli.common import OVERRIDES, apply_runtime
from echoflow.config import load_config
from echoflow.evaluation import ef_regression, image_flow_fd, reid_auc, vae_ef_gap, video_flow_ef
from echoflow.models.vae import AdversarialVAE
from echoflow.tracking import start_run

evaluate_app = typer.Typer(help="Measure trained models on held-out real data.", no_args_is_help=True)


@evaluate_app.command("models")
def models(
    overrides: list[str] | None = OVERRIDES,
    samples: int = typer.Option(128, help="Generated clips to measure EF on."),
    fd_samples: int = typer.Option(1024, help="Latent frames per Fréchet distance (fewer inflate it: 128-d)."),
) -> None:
    """Measure every trained stage of <workdir> on the VAL+TEST patients (never seen in training).

    Prints and logs to MLflow: EF regressor MAE/R²; EF MAE on VAE reconstructions vs originals; re-id
    verification AUC on unseen patients; image-flow Fréchet distance in re-id space vs the real floor and a
    Gaussian baseline; R² of requested vs measured EF for generated videos. Writes <workdir>/evaluation.json.
    """
    cfg = load_config(overrides)
    apply_runtime(cfg)
    clip = {"frames": cfg.data.clip_frames, "fps": cfg.data.clip_fps}
    sampling = {"steps": cfg.train.sampling.steps, "method": cfg.train.sampling.method}
    vae, ef_model = cast(AdversarialVAE, load_network("vae", cfg)), load_network("ef", cfg)
    with start_run(cfg, "evaluate-models"):
        held_out, train = load_split(cfg, ["VAL", "TEST"]), load_split(cfg, ["TRAIN"])
        latent_held_out, latent_train = encode_sites(vae, held_out), encode_sites(vae, train)
        regressor = ef_regression(ef_model, held_out, **clip)
        video, _, _ = video_flow_ef(load_network("video_flow", cfg), vae, ef_model, latent_held_out, n=samples,
                                    frames=cfg.data.clip_frames, target=cfg.train.video_flow.loss.target,
                                    guidance=cfg.train.sampling.guidance, **sampling)
        results: dict[str, Any] = {
            "ef_regressor": {"mae": regressor.mae, "rmse": regressor.rmse, "r2": regressor.r2, "n": regressor.n},
            "vae_ef": vae_ef_gap(vae, ef_model, held_out, **clip),
            "reid_auc_unseen_patients": reid_auc(load_network("reid", cfg), latent_held_out),
            "image_flow_fd": image_flow_fd(load_network("image_flow", cfg), load_network("reid", cfg), latent_train,
                                           latent_held_out, n=fd_samples, target=cfg.train.image_flow.loss.target,
                                           **sampling),
            "video_flow_ef": {"r2": video.r2, "mae": video.mae, "n": video.n},
        }
        results["vae_ef"]["mae_gap"] = results["vae_ef"]["mae_reconstructed"] - results["vae_ef"]["mae_original"]
        flat = {f"{group}.{key}" if isinstance(values, dict) else group: value
                for group, values in results.items()
                for key, value in (values.items() if isinstance(values, dict) else [("", values)])}
        mlflow.log_metrics({k: float(v) for k, v in flat.items()})
        path = Path(cfg.workdir) / "evaluation.json"
        path.write_text(json.dumps(results, indent=2))
        mlflow.log_artifact(str(path))
    table = Table("measure", "value", title=f"EchoFlow models on held-out real patients ({cfg.workdir})")
    for key, value in flat.items():
        table.add_row(key, f"{value:.4g}")
    Console().print(table)
