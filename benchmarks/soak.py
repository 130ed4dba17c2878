"""Soak test: a long simulated federation (one Ray start) with random site faults; does it finish, and leak?

The toy stage on ``--sites`` simulated sites for ``--rounds`` rounds; every site crashes or sends NaN weights
in a round with probability ``--rate`` (seeded). Printed: rounds completed, faults planned and survived
(sites missing or rejected), and the memory of the whole simulation (driver + Ray processes, RSS) at the
end of each round, with its least-squares slope per round after a warm-up (goal: flat, ~0 MiB/round).

Run from the repository root: ``python benchmarks/soak.py [--rounds 50 --sites 10 --rate 0.1]``;
``--rounds 10`` takes a couple of minutes on 2 cores.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.federation.toy

from federation import tree_rss_mib  # benchmarks/federation.py: both run as scripts from benchmarks/

from echoflow.checkpoints import LATEST
from echoflow.clients.faults import random_fault_plan
from echoflow.federation.simulation import SimulationConfig, simulate
from tests.federation.conftest import toy_run_config


def round_end_rss(checkpoints: Path, done: threading.Event, into: dict[int, float]) -> None:
    """Record the simulation's RSS (MiB) each time a new round checkpoint appears, until ``done``."""
    pointer, last = checkpoints / LATEST, ""
    while not done.is_set():
        name = pointer.read_text().strip() if pointer.exists() else ""
        if name and name != last:
            into[int(name.split("_")[-1])] = tree_rss_mib(os.getpid())
            last = name
        time.sleep(0.05)


def slope(points: dict[int, float]) -> float:
    """Least-squares slope of RSS over round number (MiB per round)."""
    if len(points) < 2:
        return 0.0
    rounds, values = list(points), list(points.values())
    return statistics.linear_regression(rounds, values).slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.1, help="chance a site fails in a round")
    parser.add_argument("--kinds", default="crash,nan", help="fault kinds (echoflow.clients.faults.KINDS)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="rounds left out of the slope (actors start)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plan = random_fault_plan(sites=args.sites, rounds=args.rounds, faulty=args.sites, rate=args.rate,
                             kinds=args.kinds.split(","), seed=args.seed)
    rss: dict[int, float] = {}
    done = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        config = toy_run_config(Path(tmp), rounds=args.rounds, **{"fault-plan": json.dumps(plan), "min-sites": 1,
                                                                  "timeout-s": 600.0, "resume": False})
        monitor = threading.Thread(target=round_end_rss, args=(Path(config["checkpoint-dir"]), done, rss))
        monitor.start()
        started = time.perf_counter()
        try:
            state = simulate(config, SimulationConfig(sites=args.sites, num_cpus=args.num_cpus))
        finally:
            done.set()
            monitor.join()
        wall = time.perf_counter() - started
    planned = sum(len(rounds) for rounds in plan.values())
    survived = sum(len(e["missing"]) + len(e["rejected"]) for e in state.history)
    steady = {r: v for r, v in sorted(rss.items()) if r > args.warmup}
    print(f"soak: {args.sites} sites x {args.rounds} rounds (toy stage, {args.num_cpus} Ray CPUs, one Ray start), "
          f"{wall:.0f} s ({wall / max(state.round, 1):.1f} s/round)")
    print(f"rounds completed {state.round}/{args.rounds}; faults planned {planned} (rate {args.rate}, "
          f"{args.kinds}), sites missing or rejected {survived}")
    print(f"RESULT soak rounds completed: {state.round}/{args.rounds} (faults survived {survived} of {planned} "
          "planned)")
    if steady:
        first, last = next(iter(steady.values())), list(steady.values())[-1]
        print(f"RSS driver + Ray at round ends: round {args.warmup + 1} {first:.0f} MiB, round {max(steady)} "
              f"{last:.0f} MiB; slope {slope(steady):+.2f} MiB/round over {len(steady)} rounds (goal ~0)")
        print(f"RESULT soak memory growth: {slope(steady):+.2f} MiB/round (round {args.warmup + 1} {first:.0f} MiB "
              f"-> round {max(steady)} {last:.0f} MiB; goal ~0)")


if __name__ == "__main__":
    main()
