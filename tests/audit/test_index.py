import numpy as np
import pytest

from echoflow.audit import BoundedIVFIndex, ExactIndex, bounded_ivf, build_index, load_index, prepare, threshold_recall
from echoflow.audit.index import build_bounded_ivf
from echoflow.errors import EchoFlowError
from tests.audit.synthetic import PatientSpace, near_copies


def test_pearson_is_cosine_of_centred() -> None:
    x = np.random.default_rng(0).standard_normal((5, 16))
    p = prepare(x, similarity="pearson")
    np.testing.assert_allclose(p @ p.T, np.corrcoef(x), atol=1e-5)


@pytest.mark.parametrize("two_level", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_ivf_never_misses_a_pair_over_tau(seed: int, two_level: bool) -> None:
    rng = np.random.default_rng(seed)
    space = PatientSpace.random(dim=32, factors=6, seed=seed)
    real = space.frames(space.patients(400, rng), 20, rng)[0]
    queries = np.concatenate([space.frames(space.patients(300, rng), 1, rng)[0],
                              near_copies(real, 50, noise=0.02, rng=rng)[0]])
    # faiss's k-means lists, or the two-level lists `build_index` uses (any assignment must keep the bound exact)
    build = build_bounded_ivf if two_level else BoundedIVFIndex.build
    ivf = build(real, nlist=128, seed=seed)
    truth = ExactIndex.build(real).search(queries, k=1).similarity[:, 0]
    skipped = []
    for tau in np.quantile(truth, [0.05, 0.3, 0.6, 0.9, 0.99]):  # from inside the data's range to its top
        got = ivf.search(queries, k=1, threshold=float(tau))
        assert np.array_equal(got.similarity[:, 0] >= tau, truth >= tau)
        over = truth >= tau
        np.testing.assert_allclose(got.similarity[over, 0], truth[over], atol=1e-5)
        assert np.all(got.similarity[:, 0] <= truth + 1e-5)  # below τ: lower bounds
        np.testing.assert_allclose(got.similarity[got.exact, 0], truth[got.exact], atol=1e-5)
        skipped.append(1 - got.scanned)
    assert skipped[-1] > 0.8  # high τ: most lists skipped
    assert threshold_recall(ivf, queries, threshold=float(np.quantile(truth, 0.6))) == 1.0


def test_exact_top_k_without_threshold() -> None:
    rng = np.random.default_rng(3)
    space = PatientSpace.random(dim=24, factors=5, seed=3)
    real = space.frames(space.patients(200, rng), 10, rng)[0]
    queries = space.frames(space.patients(100, rng), 1, rng)[0]
    got = BoundedIVFIndex.build(real, nlist=64).search(queries, k=3)
    want = ExactIndex.build(real).search(queries, k=3)
    assert got.exact.all()
    np.testing.assert_allclose(got.similarity, want.similarity, atol=1e-5)


@pytest.mark.parametrize("kind", ["exact", "bounded_ivf"])
def test_persist_and_load_give_same_answers(tmp_path, kind: str) -> None:
    rng = np.random.default_rng(4)
    real = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    index = build_index(real, kind=kind, similarity="pearson", nlist=32)
    index.save(tmp_path / "site.faiss")
    loaded = load_index(tmp_path / "site.faiss")
    assert (loaded.kind, loaded.similarity, loaded.ntotal) == (kind, "pearson", 2000)
    a, b = index.search(queries, k=2, threshold=0.5), loaded.search(queries, k=2, threshold=0.5)
    np.testing.assert_array_equal(a.similarity, b.similarity)
    np.testing.assert_array_equal(a.ids, b.ids)


def test_auto_picks_exact_for_small_sites_and_rejects_bad_input() -> None:
    assert build_index(np.eye(4, dtype=np.float32)).kind == "exact"
    with pytest.raises(EchoFlowError, match="dimension"):
        build_index(np.eye(4, dtype=np.float32)).search(np.ones((1, 3)), k=1)


def test_exact_top1_equals_faiss_flat_search() -> None:
    rng = np.random.default_rng(5)
    real, queries = rng.standard_normal((5000, 32)), rng.standard_normal((3000, 32))
    index = build_index(real, kind="exact")
    got = index.search(queries, k=1)
    want_sim, _ = index._cpu.search(prepare(queries, similarity="cosine"), 1)
    np.testing.assert_allclose(got.similarity, want_sim, atol=1e-6)
    chosen = np.einsum("ij,ij->i", prepare(queries, similarity="cosine"), index.vectors()[got.ids[:, 0]])
    np.testing.assert_allclose(chosen, want_sim[:, 0], atol=1e-6)  # the reported id holds the maximum


def tight_cluster(centre: np.ndarray, n: int, *, angle: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` prepared members exactly ``angle`` rad from ``centre``, each of float32 norm above 1 (rounding's
    worst case for a cone angle taken from arccos of a minimum cosine: every cosine rounds up to 1)."""
    kept: list[np.ndarray] = []
    while sum(map(len, kept)) < n:  # a few in a thousand candidates qualify: draw them in batches
        u = rng.standard_normal((4096, len(centre)))
        u -= (u @ centre)[:, None] * centre
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        x = prepare(np.cos(angle) * centre + np.sin(angle) * u, similarity="cosine")
        kept.append(x[np.linalg.norm(x.astype(np.float64), axis=1) > 1 + 2e-8])
    return np.concatenate(kept)[:n]


def test_bounded_ivf_never_misses_an_over_tau_pair_of_a_tight_list() -> None:
    """Lists whose members lie within 1e-4 rad of their centroid; queries just over τ beyond their edge.

    ``nprobe=0``: no list is probed for being nearest, so only the bounds decide (as for every list but the
    nearest one of a query in general).
    """
    rng = np.random.default_rng(5)
    dim, beta = 32, float(np.arccos(0.9))
    centres = prepare(rng.standard_normal((8, dim)), similarity="cosine").astype(np.float64)
    real = np.concatenate([tight_cluster(c, 48, angle=1e-4, rng=rng) for c in centres])
    ivf = BoundedIVFIndex.build(real, nlist=8, nprobe=0, seed=0)
    queries, taus = [], []
    for row in real:  # q: β beyond the member, on the side away from its cluster's centre
        x = row.astype(np.float64) / np.linalg.norm(row.astype(np.float64))
        centre = centres[np.argmax(centres @ x)]
        away = x - (x @ centre) * centre
        away -= (away @ x) * x
        q = prepare((np.cos(beta) * x + np.sin(beta) * away / np.linalg.norm(away))[None], similarity="cosine")[0]
        queries.append(q)
        taus.append(float(q @ row) - 1e-6)
    queries_ = np.stack(queries)
    missed, exact = 0, ExactIndex.build(real)
    for q, tau in zip(queries_, taus, strict=True):
        truth = exact.search(q[None], k=1, threshold=tau).similarity[0, 0]
        got = ivf.search(q[None], k=1, threshold=tau).similarity[0, 0]
        assert truth >= tau
        missed += int(got < tau)
    assert missed == 0, f"{missed} of {len(taus)} over-τ pairs missed"


def toward(centre: np.ndarray, member: np.ndarray, phi: float) -> np.ndarray:
    """The prepared unit query ``phi`` rad from ``centre`` on the great circle through ``member``."""
    x = member.astype(np.float64) / np.linalg.norm(member.astype(np.float64))
    w = x - (x @ centre) * centre
    return prepare((np.cos(phi) * centre + np.sin(phi) * w / np.linalg.norm(w))[None], similarity="cosine")


def test_shells_skip_members_a_query_cannot_reach_yet_decide_pairs_at_their_edge_exactly() -> None:
    """One list: a ring of members 0.4 rad from its centre (outer shells) and a core within 0.005 rad (inner shell).

    A query 0.25 rad out toward a ring member sits exactly on the ring shells' inner edge (α_lo − β = φ at τ =
    cos 0.15); τ just under and just over the pair must be decided as exact search decides. A query 0.9 rad out
    cannot reach the core, whose shells must be skipped: at τ 0.01 under its best pair (β ≈ 0.52 rad) every ring shell
    is reachable (0.9 ≤ 0.4 + β) and no core shell is (0.005 + β < 0.9), so exactly the ring's 96 of 128 rows are
    scanned.
    """
    rng = np.random.default_rng(6)
    centre = prepare(rng.standard_normal((1, 32)), similarity="cosine")[0].astype(np.float64)
    ring = tight_cluster(centre, 96, angle=0.4, rng=rng)
    real = np.concatenate([ring, tight_cluster(centre, 32, angle=0.005, rng=rng)])
    ivf, exact = BoundedIVFIndex.build(real, nlist=1, nprobe=0, seed=0), ExactIndex.build(real)
    for member in ring[:16]:
        for phi in (0.25, 0.3):
            q = toward(centre, member, phi)
            truth = exact.search(q, k=1).similarity[0, 0]
            assert np.isclose(truth, q[0] @ member, atol=1e-6)  # the ring member is the nearest
            for tau in (truth - 1e-6, truth + 1e-6):
                got = ivf.search(q, k=1, threshold=float(tau)).similarity[0, 0]
                assert (got >= tau) == (truth >= tau), (phi, tau - truth)
    far = toward(centre, ring[0], 0.9)
    truth = exact.search(far, k=1).similarity[0, 0]
    at_edge = ivf.search(far, k=1, threshold=float(truth - 1e-6))  # ring shells at the edge may be skipped too
    assert at_edge.similarity[0, 0] >= truth - 1e-6
    below = ivf.search(far, k=1, threshold=float(truth - 0.01))
    assert below.similarity[0, 0] >= truth - 1e-6
    assert below.scanned == 96 / 128  # the whole ring, none of the core


@pytest.mark.parametrize("seed", [0, 1])
def test_two_level_index_decides_planted_near_tau_pairs_exactly(seed: int) -> None:
    """Near copies of real frames as queries, τ 1e-6 under and over each copy's true maximum."""
    rng = np.random.default_rng(seed)
    space = PatientSpace.random(dim=32, factors=6, seed=seed)
    real = space.frames(space.patients(300, rng), 20, rng)[0]
    queries = near_copies(real, 40, noise=0.05, rng=rng)[0]
    ivf = build_bounded_ivf(real, nlist=48, seed=seed)
    truth = ExactIndex.build(real).search(queries, k=1).similarity[:, 0]
    for q, t in zip(queries, truth, strict=True):
        for tau in (t - 1e-6, t + 1e-6):
            assert (ivf.search(q[None], k=1, threshold=float(tau)).similarity[0, 0] >= tau) == (t >= tau)


def test_top_k_at_tau_in_a_small_bound_space_counts_each_member_once() -> None:
    """An 8-d bound space (loose: many pairs pass the filter) and k = 3: every pair over τ found exactly, the
    nearest list's estimated members and the filter's survivors merged without repeating a member."""
    rng = np.random.default_rng(7)
    space = PatientSpace.random(dim=32, factors=6, seed=7)
    real = space.frames(space.patients(200, rng), 10, rng)[0]
    queries = near_copies(real, 60, noise=0.02, rng=rng)[0]
    want = ExactIndex.build(real).search(queries, k=3)
    tau = float(np.quantile(want.similarity[:, 1], 0.5))
    got = build_bounded_ivf(real, nlist=16, dims=8).search(queries, k=3, threshold=tau)
    over = want.similarity >= tau
    assert over.sum() > 40
    np.testing.assert_allclose(got.similarity[over], want.similarity[over], atol=1e-5)
    np.testing.assert_array_equal(got.ids[over], want.ids[over])
    for row in got.ids:
        assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())


@pytest.mark.parametrize("nprobe", [0, 1, 3])
def test_probe_in_many_list_tiles_decides_planted_near_tau_pairs_and_top_k_exactly(monkeypatch, nprobe: int) -> None:
    """The probe reads the lists a tile at a time; with tiles of a few lists (so every query's nearest lists and
    shells are found across many tiles), pairs planted 1e-6 over and under τ are decided as exact search decides,
    and the exact top-3 without a threshold (nearest lists scanned whole, the others bounded) is the true one."""
    monkeypatch.setattr(bounded_ivf, "PROBE_ENTRIES", 256)  # 256 entries: 4 lists a tile for 60 queries
    rng = np.random.default_rng(8)
    space = PatientSpace.random(dim=32, factors=6, seed=8)
    real = space.frames(space.patients(200, rng), 10, rng)[0]
    queries = near_copies(real, 60, noise=0.03, rng=rng)[0]
    ivf = build_bounded_ivf(real, nlist=40, seed=8)
    ivf.nprobe = nprobe
    exact = ExactIndex.build(real)
    truth = exact.search(queries, k=1).similarity[:, 0]
    for shift in (-1e-6, 1e-6):
        tau = truth + shift  # each query's own τ: its true maximum is 1e-6 over (or under) it
        for q, t in zip(queries, tau, strict=True):
            got = ivf.search(q[None], k=1, threshold=float(t)).similarity[0, 0]
            assert (got >= t) == (shift < 0)
    got = ivf.search(queries, k=3, threshold=float(np.quantile(truth, 0.5)))
    over = truth >= np.quantile(truth, 0.5)
    np.testing.assert_allclose(got.similarity[over, 0], truth[over], atol=1e-5)
    want = exact.search(queries, k=3)
    full = ivf.search(queries, k=3)
    assert full.exact.all()
    np.testing.assert_allclose(full.similarity, want.similarity, atol=1e-5)
