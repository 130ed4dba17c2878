"""`echoflow evaluate models|video-flow|texture`: trained models measured on held-out real data, printed, logged.

Each composes the ``pipeline`` config group like `echoflow pipeline` (default ``demo``), so a pipeline's workdir is
measured under the settings it ran with (e.g. its sampling guidance); pass ``pipeline=parity`` for that one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import typer
from rich.console import Console
from rich.table import Table

from echoflow.cli.common import OVERRIDES
from echoflow.cli.pipeline import with_pipeline
from echoflow.config import apply_runtime, load_config, plain
from echoflow.stages.networks import load_network
from echoflow.study.ef_following import DEFAULT_EFS, video_flow_report
from echoflow.study.evaluate import evaluate_models
from echoflow.study.models import Cohort, Models
from echoflow.study.texture import LABELS, texture_figure, texture_report
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
    cfg = load_config(with_pipeline(overrides or []))
    apply_runtime(cfg)
    with start_run(cfg, "evaluate-models"):
        results = evaluate_models(cfg, Models.load(cfg), Cohort.of(cfg), samples=samples, fd_samples=fd_samples)
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


@evaluate_app.command("video-flow")
def video_flow(
    overrides: list[str] | None = OVERRIDES,
    first_frames: int = typer.Option(8, help="Held-out real first frames (grid rows)."),
    efs: str = typer.Option(",".join(f"{e:g}" for e in DEFAULT_EFS), help="Requested EFs (grid columns), percent."),
    guidance: float | None = typer.Option(None, help="Guidance scale (default train.sampling.guidance)."),
    meter_steps: int = typer.Option(600, help="Training steps of the LV-segmenter EF meter (trained once per run)."),
) -> None:
    """Does the video flow follow EF? A dose-response grid read by an LV segmenter, not by the EF regressor.

    Animates N held-out first frames at M requested EFs; prints slope (95 % CI), intercept, R², residual SD
    and MAE of measured vs requested EF, the error per requested EF, and the share of variance due to the first
    frame vs the requested EF; the regressor's reading too when the run has one. Writes
    <workdir>/video_flow_ef.json and logs to MLflow. The meter needs LV masks (the phantom's LVMasks/).
    """
    cfg = load_config(with_pipeline(overrides or []))
    apply_runtime(cfg)
    requested = [float(e) for e in efs.split(",")]
    scale = cfg.train.sampling.guidance if guidance is None else guidance
    with start_run(cfg, "evaluate-video-flow"):
        results = video_flow_report(cfg, Models.load(cfg), Cohort.of(cfg), first_frames=first_frames,
                                    efs=requested, guidance=scale, meter_steps=meter_steps)
        scalars = {f"{reader}.{key}": float(value) for reader in ("meter", "regressor") if reader in results
                   for key, value in results[reader].items() if isinstance(value, float)}
        mlflow.log_metrics(scalars | {"meter_error_on_real_clips": results["meter_error_on_real_clips"]})
        path = Path(cfg.workdir) / "video_flow_ef.json"
        path.write_text(json.dumps(results, indent=2))
        mlflow.log_artifact(str(path))
    table = Table("measured by", "slope [95 % CI]", "intercept", "R²", "resid SD", "MAE", "var: first frame",
                  "var: EF", title=f"EF following, guidance {scale:g} ({cfg.workdir})")
    for reader in ("meter", "regressor"):
        if reader in results:
            r = results[reader]
            table.add_row(reader, f"{r['slope']:.2f} [{r['slope_low']:.2f}, {r['slope_high']:.2f}]",
                          f"{r['intercept']:.1f}", f"{r['r2']:.2f}", f"{r['resid_sd']:.1f}", f"{r['mae']:.1f}",
                          f"{r['share_first_frame']:.2f}", f"{r['share_requested_ef']:.2f}")
    Console().print(table)
    per_ef = "  ".join(f"{ef}: {err:.1f}" for ef, err in results["meter"]["per_ef_mae"].items())
    Console().print(f"meter |error| per requested EF: {per_ef}; meter's own error on real clips: "
                    f"{results['meter_error_on_real_clips']:.2f}")


@evaluate_app.command("texture")
def texture(
    overrides: list[str] | None = OVERRIDES,
    videos: Path | None = typer.Option(None, help="Released videos (default <workdir>/audit/released)."),
    figure: Path | None = typer.Option(None, help="Side-by-side PNG (default <workdir>/texture.png)."),
    regressor: Path | None = typer.Option(None, help="Folder of the real-trained EF regressor (default <workdir>/ef; "
                                          "the pipeline's pooled one: <workdir>/parity/real)."),
) -> None:
    """Do the VAE and the released videos keep real texture (speckle, fan edges)? Spectra vs held-out real frames.

    Radially averaged power spectrum distance to real TEST frames of: VAE reconstructions, the released videos,
    and real VAL frames (the floor); the real-trained EF regressor's MAE on reconstructions vs originals.
    Writes <workdir>/texture.json and the figure, logs both to MLflow.
    """
    cfg = load_config(with_pipeline(overrides or []))
    apply_runtime(cfg)
    workdir = Path(cfg.workdir)
    released, png = videos or workdir / "audit" / "released", figure or workdir / "texture.png"
    ef_folder = regressor or workdir / "ef"
    ef_model = load_network("ef", plain(cfg.model), ef_folder / "model.safetensors")
    cohort = Cohort.of(cfg)
    with start_run(cfg, "evaluate-texture"):
        report = texture_report(Models.load(cfg).vae, ef_model, cohort.split("TEST"), cohort.split("VAL"),
                                cohort.sites([released], "TRAIN"), frames=cfg.data.clip_frames,
                                fps=cfg.data.clip_fps)
        mlflow.log_metrics(report.scalars())
        path = workdir / "texture.json"
        path.write_text(json.dumps(report.to_json() | {"released": str(released), "regressor": str(ef_folder)},
                                   indent=2))
        texture_figure(report, png)
        for artifact in (path, png):
            mlflow.log_artifact(str(artifact))
    table = Table("vs real TEST frames", "RAPSD distance, all rings", "high-frequency half", "frames",
                  title=f"Texture ({cfg.workdir}; {report.frames['real']} real frames)")
    for name, distance in report.distance.items():
        table.add_row(LABELS[name], f"{distance.all:.3f}", f"{distance.high:.3f}", str(report.frames[name]))
    Console().print(table)
    ef = report.vae_ef
    Console().print(f"real-trained EF regressor ({ef_folder}) MAE: originals {ef['mae_original']:.2f}, "
                    f"VAE reconstructions {ef['mae_reconstructed']:.2f} (between them {ef['mae_between']:.2f}); "
                    f"figure: {png}")
