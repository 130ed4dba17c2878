"""`echoflow evaluate models`: the trained models measured on held-out real data, printed and logged."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import typer
from rich.console import Console
from rich.table import Table

from echoflow.cli.common import OVERRIDES, apply_runtime
from echoflow.config import load_config
from echoflow.study.evaluate import evaluate_models
from echoflow.study.models import Cohort, Models
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
