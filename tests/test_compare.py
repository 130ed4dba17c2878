from pathlib import Path

import mlflow
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.runs import compare_runs, find_runs


def log_pipeline(uri: str, *, dp: str, workdir: str, mae: float) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("echoflow")
    with mlflow.start_run(run_name="pipeline"):
        mlflow.log_params({"dp.enabled": dp, "workdir": workdir, "seed": "0", "federation.checkpoint_dir": workdir})
        mlflow.log_metrics({"parity.real.pooled.mae": 3.0, "parity.synthetic.pooled.mae": mae, "consistency_r2": 0.5,
                            "parity.synthetic.site_00.mae": 9.0})
        with mlflow.start_run(run_name="pipeline", nested=True):  # a nested run of the same name is not a row
            mlflow.log_params({"dp.enabled": "nested"})


def test_compare_lines_up_differing_config_and_headline_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    log_pipeline(uri, dp="False", workdir="runs/a", mae=6.0)
    log_pipeline(uri, dp="True", workdir="runs/b", mae=9.5)

    runs = find_runs(uri, "echoflow", run_name="pipeline", limit=10)
    result = compare_runs(runs)

    assert len(runs) == 2 and result.params == ["dp.enabled"]  # locations and equal keys are left out
    assert result.metrics == ["consistency_r2", "parity.real.pooled.mae", "parity.synthetic.pooled.mae"]
    assert [v["dp.enabled"] for v in result.values] == ["False", "True"]  # oldest first
    assert [v["parity.synthetic.pooled.mae"] for v in result.values] == ["6", "9.5"]

    shown = CliRunner().invoke(app, ["runs", "compare", f"mlflow.tracking_uri={uri}", "--metric", "*synthetic.pooled*"])
    assert shown.exit_code == 0, shown.output
    assert "dp.enabled" in shown.output and "9.5" in shown.output and "consistency" not in shown.output
