"""Audit speed and threshold-recall: automatic path vs exact FAISS vs numpy vs the reference filter.

Synthetic patient-like re-id embeddings (`tests/audit/synthetic.py`): per site, patients with many
near-duplicate frames on a low-rank patient manifold; held-out patients for τ; generated = fresh patients plus
0.5 % near-copies of real training frames. Everything runs on one thread (faiss, BLAS, torch) so ratios are
comparable on a shared machine. Threshold recall = share of generated samples with a real neighbour ≥ τ (by exact
search) that the method withholds; the automatic path must score exactly 1.0 with no extra withholds.

    python benchmarks/audit.py            # 1,000,000 real x 10,000 generated, 128-d, 4 sites (minutes)
    python benchmarks/audit.py --quick    # 200,000 x 2,000 (< 40 s)
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from echoflow.audit import build_index, calibrate, decide_samples, prepare
from tests.audit.synthetic import PatientSpace, near_copies


def make_data(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(args.seed)
    space = PatientSpace.random(dim=args.dim, seed=args.seed)
    per_site = args.real // args.sites // args.frames
    train = {f"site{i}": space.frames(space.patients(per_site, rng), args.frames, rng)[0] for i in range(args.sites)}
    heldout = {s: space.frames(space.patients(200, rng), 5, rng)[0] for s in train}
    n_copies = max(1, args.gen // 200)
    copies = [near_copies(x, n_copies // args.sites + 1, noise=0.005, rng=rng)[0] for x in train.values()]
    fresh = space.frames(space.patients(args.gen, rng), 1, rng)[0]
    generated = np.concatenate([*copies, fresh])[: args.gen]
    return train, heldout, generated


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def numpy_max(q: np.ndarray, real: np.ndarray, chunk: int = 65536) -> np.ndarray:
    best = np.full(len(q), -np.inf, dtype=np.float32)
    for start in range(0, len(real), chunk):
        best = np.maximum(best, (q @ real[start : start + chunk].T).max(axis=1))
    return best


def reference_max(gen: np.ndarray, real: np.ndarray) -> np.ndarray:
    """EchoNet-Synthetic's filter: Pearson correlation via torch.corrcoef of the stacked embeddings."""
    x = torch.from_numpy(np.concatenate([gen, real]))
    return torch.corrcoef(x)[: len(gen), len(gen) :].max(dim=1).values.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--real", type=int, default=1_000_000)
    parser.add_argument("--gen", type=int, default=10_000)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--frames", type=int, default=50, help="near-duplicate frames per patient")
    parser.add_argument("--reference-gib", type=float, default=0.5, help="memory for torch.corrcoef's (n x n)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.real, args.gen, args.reference_gib = 200_000, 2_000, 0.1
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    threadpool_limits(1)

    train, heldout, generated = make_data(args)
    print(f"{args.real:,} real ({args.sites} sites) x {len(generated):,} generated, {args.dim}-d, 1 thread")
    auto, t_build = timed(lambda: {s: build_index(x, kind="auto") for s, x in train.items()})
    exact, t_build_exact = timed(lambda: {s: build_index(x, kind="exact") for s, x in train.items()})
    calibration, t_cal = timed(lambda: calibrate(auto, heldout))
    tau = calibration.global_threshold
    print(f"build: auto ({next(iter(auto.values())).kind}) {t_build:.1f} s, exact {t_build_exact:.1f} s; "
          f"calibration {t_cal:.1f} s, tau = {tau:.4f}")

    result, t_auto = timed(lambda: decide_samples(generated, auto, tau))
    truth, t_exact = timed(lambda: np.max([i.search(generated, k=1).similarity[:, 0] for i in exact.values()], 0))
    q = prepare(generated, similarity="cosine")
    brute, t_numpy = timed(lambda: np.max([numpy_max(q, i.vectors()) for i in exact.values()], 0))
    must = truth >= tau
    withheld = ~result.release
    recall = float((withheld & must).sum() / max(must.sum(), 1))
    print(f"pairs over tau: {int(must.sum())} samples; auto withholds {int(withheld.sum())}, "
          f"threshold-recall {recall:.4f}, extra withholds {int((withheld & ~must).sum())}, "
          f"scanned {np.mean(list(result.scanned.values())):.4%} of pairs")
    print(f"numpy vs exact faiss decisions agree: {bool(np.array_equal(brute >= tau, must))}")

    real_all = np.concatenate(list(train.values()))
    n_ref = int(np.sqrt(args.reference_gib * 2**30 / 4)) - len(generated)
    n_ref = max(1000, min(n_ref, len(real_all)))
    g_ref = min(len(generated), n_ref)
    _, t_ref = timed(lambda: reference_max(generated[:g_ref], real_all[:n_ref]))
    t_ref_full = t_ref * (len(generated) * len(real_all)) / (g_ref * n_ref)
    print(f"reference torch.corrcoef at {g_ref:,} x {n_ref:,}: {t_ref:.2f} s "
          f"(≈ {t_ref_full:.0f} s scaled by pairs to the full size; its (n x n) matrix does not fit)")

    best_brute = min(t_exact, t_numpy)
    rows = [("auto (audit)", t_auto), ("exact faiss IndexFlatIP", t_exact), ("chunked numpy", t_numpy),
            ("reference corrcoef (scaled)", t_ref_full)]
    for name, t in rows:
        print(f"  {name:28s} {t:8.2f} s   best brute force / this = {best_brute / t:6.2f}x")
    print(f"RESULT auto speed-up vs best brute force: {best_brute / t_auto:.1f}x, threshold-recall {recall:.4f}")
    if recall != 1.0:
        raise SystemExit("threshold-recall below 1.0")


if __name__ == "__main__":
    main()
