"""A finished run redone from one step on: its released set drawn again, or one stage re-trained, under overrides.

Copies ``<src>``'s cohorts, trained models and their records into a new workdir ``<dst>``, leaving out what
``--redo`` names (repeatable; ``cohort``: the cohorts, generated again by the data config; a stage, e.g.
``video_flow``: its weights and federation checkpoints, trained again), then runs the pipeline's own steps there
(`echoflow.study.run.train_models`, which re-trains only what is missing, then `generate` and `audit`; one MLflow
run) under the config overrides, stopping after ``--until``. Score a new set with `benchmarks/regressor_seeds.py`,
a re-trained video flow with `echoflow evaluate video-flow`, e.g.

    python benchmarks/regenerate.py runs/parity_fed runs/parity_uni pipeline=parity pipeline.ef=uniform
    mkdir -p runs/parity_uni/regressor_seeds/uni && cp -r runs/parity_fed/regressor_seeds/p/real* $_  # of a --tag p
    python benchmarks/regressor_seeds.py runs/parity_uni --seeds 0 1 2 3 4 --arms real synthetic --tag uni \\
        pipeline=parity
    python benchmarks/regenerate.py runs/parity_fed runs/vf_big --redo video_flow --until models pipeline=parity \\
        'model.video_flow.channels=[64,128]'
    echoflow evaluate video-flow --first-frames 24 pipeline=parity workdir=runs/vf_big \\
        'model.video_flow.channels=[64,128]'

With no ``--redo`` and no override the new set is the run's own, byte for byte (the pipeline is deterministic).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from echoflow.cli.pipeline import with_pipeline
from echoflow.config import apply_runtime, load_config
from echoflow.stages import GENERATIVE
from echoflow.study.models import Cohort, Models
from echoflow.study.run import audit, embed_real, generate, once, train_models
from echoflow.tracking import start_run

COPIED = ("cohort", "test_cohort", "federation", *GENERATIVE, "ef", "meter", "pipeline/cohort.json",
          "pipeline/models.json")
REDONE = {"cohort": ("cohort", "test_cohort", "meter", "pipeline/cohort.json"),
          **{stage: (stage, f"federation/{stage}", "pipeline/models.json") for stage in (*GENERATIVE, "ef")}}
REDONE["vae"] += ("meter",)
"""What each ``--redo`` choice leaves out of the copy, for the pipeline to make again (the LV meter of `echoflow
evaluate video-flow` is trained on the cohort's frames and their VAE reconstructions, so it goes with either)."""


def copy_run(src: Path, dst: Path, redo: list[str]) -> None:
    """Copy ``COPIED`` from ``src`` to ``dst``, then remove the ``REDONE`` paths of ``redo``."""
    for name in COPIED:
        source, target = src / name, dst / name
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for path in {dst / path for choice in redo for path in REDONE[choice]}:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a finished pipeline workdir")
    parser.add_argument("dst", type=Path, help="the new workdir (must not exist)")
    parser.add_argument("--redo", action="append", default=[], choices=sorted(REDONE),
                        help="make this again instead of copying it (cohort, or a stage to re-train); repeatable")
    parser.add_argument("--until", choices=("models", "audit"), default="audit",
                        help="the last step to run (models: stop once the re-trained stages are written)")
    args, overrides = parser.parse_known_args()
    if not (args.src / "pipeline" / "models.json").exists():
        parser.error(f"{args.src}: no trained models (pipeline/models.json); give a finished pipeline workdir")
    if args.dst.exists():
        parser.error(f"{args.dst}: exists; give a new workdir")
    copy_run(args.src, args.dst, args.redo)
    cfg = load_config(with_pipeline([f"workdir={args.dst}", *overrides]))
    apply_runtime(cfg)
    cohort = Cohort.of(cfg)
    once(cfg, "cohort", lambda: {"sites": [str(root) for root in cohort.roots]})
    with start_run(cfg, "regenerate"):
        once(cfg, "models", lambda: train_models(cfg, cohort))
        if args.until == "models":
            print(f"RESULT re-trained {' '.join(args.redo) or 'nothing'} in {args.dst}")
            return
        models = Models.load(cfg)
        real = embed_real(cfg, models, cohort)
        generated = once(cfg, "generate", lambda: generate(cfg, models, cohort, real))
        audited = once(cfg, "audit", lambda: audit(cfg, models, cohort, real))
    print(f"RESULT regenerated: {audited['released']} of {generated['animated']} animated videos "
          f"released in {args.dst}/audit/released")


if __name__ == "__main__":
    main()
