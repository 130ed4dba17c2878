"""A finished run's released set drawn again under other sampling settings (guidance, EF source, size, seed).

Copies ``<src>``'s cohorts, trained models and their records into a new workdir ``<dst>``, then runs the pipeline's
own generation and audit steps there (`echoflow.study.run.generate` / `audit`, one MLflow run) under the config
overrides; the models are not retrained. Score the new set with `benchmarks/regressor_seeds.py`, e.g.

    python benchmarks/regenerate.py runs/parity_fed runs/parity_uni pipeline=parity pipeline.ef=uniform
    mkdir -p runs/parity_uni/regressor_seeds/uni && cp -r runs/parity_fed/regressor_seeds/p/real* $_  # of a --tag p
    python benchmarks/regressor_seeds.py runs/parity_uni --seeds 0 1 2 3 4 --arms real synthetic --tag uni \\
        pipeline=parity

With no override the new set is the run's own, byte for byte (the pipeline is deterministic).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import apply_runtime, load_config
from echoflow.stages import GENERATIVE
from echoflow.study.models import Cohort, Models
from echoflow.study.run import audit, embed_real, generate, once
from echoflow.tracking import start_run

COPIED = ("cohort", "test_cohort", "federation", *GENERATIVE, "ef", "pipeline/cohort.json", "pipeline/models.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a finished pipeline workdir")
    parser.add_argument("dst", type=Path, help="the new workdir (must not exist)")
    args, overrides = parser.parse_known_args()
    if not (args.src / "pipeline" / "models.json").exists():
        parser.error(f"{args.src}: no trained models (pipeline/models.json); give a finished pipeline workdir")
    if args.dst.exists():
        parser.error(f"{args.dst}: exists; give a new workdir")
    for name in COPIED:
        source, target = args.src / name, args.dst / name
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    cfg = load_config(with_pipeline([f"workdir={args.dst}", *overrides]))
    apply_runtime(cfg)
    cohort, models = Cohort.of(cfg), Models.load(cfg)
    real = embed_real(cfg, models, cohort)
    with start_run(cfg, "regenerate"):
        generated = once(cfg, "generate", lambda: generate(cfg, models, cohort, real))
        audited = once(cfg, "audit", lambda: audit(cfg, models, cohort, real))
    print(f"RESULT regenerated: {audited['released']} of {generated['animated']} animated videos "
          f"released in {args.dst}/audit/released")


if __name__ == "__main__":
    main()
