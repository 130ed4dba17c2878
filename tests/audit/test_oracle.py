"""The federated audit is not an oracle: a curious server replays the basis-vector attack and learns decisions only.

The attack (issue 16): 128 basis-vector queries with k = N made a site return <e_j, x_i> = x_i[j] for every real
embedding x_i — all 500 of a site's embeddings recovered to 3e-8. A site must answer only decisions about a
generated set (over its τ or not; the similarity and id only when over), cap k at 1, answer a set once, stay within
a stated query budget, and calibrate without sending its held-out similarities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from echoflow.audit import build_index
from echoflow.audit.federated import InProcessTransport, RemoteSite, SiteAuditor, remote_calibration
from echoflow.errors import EchoFlowError
from tests.audit.synthetic import PatientSpace, near_copies

DIM, PATIENTS, FRAMES = 128, 50, 10  # 500 real embeddings


@pytest.fixture()
def site(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    space = PatientSpace.random(dim=DIM, factors=12, seed=0)
    real = space.frames(space.patients(PATIENTS, rng), FRAMES, rng)[0]
    heldout = space.frames(space.patients(10, rng), 5, rng)[0]
    SiteAuditor("site_a", build_index(real, kind="exact"), heldout).save(tmp_path / "site_a")
    return tmp_path / "site_a", real


def query(transport: InProcessTransport, queries: np.ndarray, *, k: int, threshold: float | None) -> RecordDict:
    config = ConfigRecord({"k": int(k)})
    if threshold is not None:
        config["threshold"] = float(threshold)
    content = RecordDict({"queries": ArrayRecord({"embeddings": Array(np.ascontiguousarray(queries, np.float32))}),
                          "config": config})
    return transport.send("site_a", "audit", content, timeout_s=None)


def reconstruction(reply: RecordDict, n: int) -> np.ndarray:
    """The attacker's best reconstruction of the site's embeddings from a reply to the D basis queries.

    Every finite similarity s at (query j, neighbour id i) is coordinate j of embedding i; unknowns stay 0.
    """
    answer = reply.array_records["answer"]
    similarity = np.atleast_2d(answer["similarity"].numpy().astype(np.float64).reshape(DIM, -1))
    ids = answer["ids"].numpy().reshape(DIM, -1) if "ids" in answer else np.full(similarity.shape, -1)
    guess = np.zeros((n, DIM))
    for j in range(DIM):
        for s, i in zip(similarity[j], ids[j], strict=True):
            if np.isfinite(s) and 0 <= i < n:
                guess[int(i), j] = s
    return guess


def test_the_basis_vector_attack_recovers_nothing_beyond_decisions(site: tuple[Path, np.ndarray]) -> None:
    folder, real = site
    transport = InProcessTransport.of_folders({"site_a": folder})
    basis = np.eye(DIM, dtype=np.float32)
    try:  # the attack as it was run: k = N, no threshold
        reply = query(transport, basis, k=len(real), threshold=None)
    except EchoFlowError as refused:
        assert "k" in str(refused)
        reply = query(transport, basis + 1e-6, k=1, threshold=-1.0)  # the best it may still ask: k=1, any τ
    guess = reconstruction(reply, len(real))
    cosine = (guess * real).sum(1) / np.maximum(np.linalg.norm(guess, axis=1) * np.linalg.norm(real, axis=1), 1e-12)
    assert (cosine < 0.5).all(), f"{(cosine >= 0.5).sum()} of {len(real)} real embeddings recovered"
    answer = reply.array_records["answer"]
    over = answer["over"].numpy()
    assert over.dtype == bool and over.shape == (DIM,) and not over.any()  # basis vectors are no copies
    assert not np.isfinite(answer["similarity"].numpy()).any()  # no similarity below the site's τ leaves it


def test_a_site_answers_a_generated_set_once_and_within_its_budget(site: tuple[Path, np.ndarray]) -> None:
    folder, real = site
    rng = np.random.default_rng(1)
    copies, source = near_copies(real, 5, noise=0.001, rng=rng)
    transport = InProcessTransport.of_folders({"site_a": folder}, query_budget=40)
    remote = RemoteSite("site_a", transport)
    found = remote.search(copies, k=1, threshold=None)
    assert (found.ids[:, 0] == source).all() and (found.similarity[:, 0] > 0.99).all()  # copies: over τ, named
    again = remote.search(copies, k=1, threshold=None)  # the same set at the same τ: the same answer, no charge
    assert np.array_equal(again.similarity, found.similarity) and np.array_equal(again.ids, found.ids)
    with pytest.raises(EchoFlowError, match="already answered"):
        remote.search(copies, k=1, threshold=0.999)  # the same set at another τ: a threshold search, refused
    remote.search(rng.standard_normal((35, DIM)).astype(np.float32), k=1, threshold=None)  # 5 + 35 = 40 rows
    with pytest.raises(EchoFlowError, match="budget"):
        remote.search(rng.standard_normal((1, DIM)).astype(np.float32), k=1, threshold=None)  # row 41


def test_calibration_sends_the_sites_threshold_not_its_heldout_similarities(site: tuple[Path, np.ndarray]) -> None:
    folder, _ = site
    transport = InProcessTransport.of_folders({"site_a": folder})
    cal = remote_calibration([RemoteSite("site_a", transport)], percentile=95.0)
    reply = transport.send("site_a", "calibrate", RecordDict({"config": ConfigRecord({"percentile": 95.0})}),
                           timeout_s=None)
    sizes = [reply.array_records[r][name].numpy().size for r in reply.array_records for name in reply.array_records[r]]
    assert sizes in ([], [1]) and len(cal.heldout_to_train["site_a"]) <= 1
    local = SiteAuditor.load(folder)
    own = local.index.search(local.heldout, k=1, threshold=None).similarity[:, 0]
    assert cal.site_threshold["site_a"] == pytest.approx(float(np.percentile(own, 95.0)))
