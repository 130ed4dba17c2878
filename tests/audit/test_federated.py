"""The federated audit: only generated queries go to a site; only decisions (and, over τ, similarity and id) return.

Uses clustered patient-like embeddings (no networks needed) and real Flower messages through each site's
ClientApp; one slow test runs the same sites as SuperNodes in Flower's simulation engine.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from echoflow.audit import build_index, calibrate, decide_samples
from echoflow.audit.federated import InProcessTransport, RemoteSite, SiteAuditor, remote_calibration, serve_simulation
from echoflow.errors import EchoFlowError
from tests.audit.synthetic import PatientSpace, near_copies

DIM, TRAIN_ROWS = 24, 240


@pytest.fixture()
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two sites' audit folders (12 train patients × 20 frames, 6 held-out × 5), fresh and copied queries."""
    rng = np.random.default_rng(3)
    space = PatientSpace.random(dim=DIM, factors=6, seed=3)
    root = tmp_path_factory.mktemp("fed")
    train, folders = {}, {}
    for name in ("site_a", "site_b"):
        train[name] = space.frames(space.patients(12, rng), 20, rng)[0]
        heldout = space.frames(space.patients(6, rng), 5, rng)[0]
        folders[name] = root / name
        SiteAuditor(name, build_index(train[name], kind="exact"), heldout).save(folders[name])
    copies, source = near_copies(train["site_b"], 10, noise=0.001, rng=rng)
    fresh = space.frames(space.patients(30, rng), 1, rng)[0]
    return {"train": train, "folders": folders, "queries": np.concatenate([copies, fresh]), "copied": source}


class Recording:
    """A transport that keeps every reply a site sends."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner, self.replies = inner, []

    def send(self, site: str, action: str, content: RecordDict, *, timeout_s: float | None) -> RecordDict:
        reply = self.inner.send(site, action, content, timeout_s=timeout_s)
        self.replies.append((site, action, reply))
        return reply


def test_only_decisions_leave_a_site(sites: dict) -> None:
    transport = Recording(InProcessTransport.of_folders(sites["folders"]))
    remote = {n: RemoteSite(n, transport) for n in sites["folders"]}
    cal = remote_calibration(list(remote.values()), percentile=95.0)
    result = decide_samples(sites["queries"], remote, cal.thresholds())
    assert not result.release[:10].any() and set(result.site[:10]) == {"site_b"}
    np.testing.assert_array_equal(result.real_id[:10], sites["copied"])
    assert result.release[10:].mean() >= 0.8
    assert {a for _, a, _ in transport.replies} == {"audit", "calibrate"}
    real_rows = np.concatenate(list(sites["train"].values()))
    for site, action, reply in transport.replies:
        assert set(reply.keys()) <= {"answer", "meta"}
        for record in reply.array_records.values():
            for name in record:
                array = record[name].numpy()
                assert array.ndim <= 2 and DIM not in array.shape[1:], (site, action, name, array.shape)
                assert TRAIN_ROWS not in array.shape, (site, action, name, array.shape)
                if array.dtype.kind == "f" and array.ndim == 2:  # no real embedding row, at any precision
                    assert not np.isclose(array[:, None, :], real_rows[None, :, : array.shape[1]]).all(-1).any()


def test_matches_the_local_audit(sites: dict) -> None:
    local = {n: SiteAuditor.load(f).index for n, f in sites["folders"].items()}
    remote = {n: RemoteSite(n, InProcessTransport.of_folders(sites["folders"])) for n in sites["folders"]}
    tau = {n: 0.99 for n in local}
    a, b = decide_samples(sites["queries"], local, tau), decide_samples(sites["queries"], remote, tau)
    np.testing.assert_array_equal(a.release, b.release)
    withheld = ~a.release
    assert withheld.sum() >= 10  # the copies: only there do the similarity and the real id leave a site
    np.testing.assert_array_equal(a.real_id[withheld], b.real_id[withheld])
    np.testing.assert_allclose(a.similarity[withheld], b.similarity[withheld])
    assert not np.isfinite(b.similarity[~withheld]).any() and (b.real_id[~withheld] == -1).all()
    heldout = {n: SiteAuditor.load(f).heldout for n, f in sites["folders"].items()}
    own = calibrate(local, heldout).site_threshold
    assert remote_calibration(list(remote.values()), percentile=95.0).site_threshold == pytest.approx(own)


def test_a_broken_site_fails_the_audit_closed(sites: dict, tmp_path: Path) -> None:
    folders = dict(sites["folders"]) | {"site_c": tmp_path / "site_c"}  # never prepared: its handler raises
    remote = {n: RemoteSite(n, InProcessTransport.of_folders(folders)) for n in folders}
    result = decide_samples(sites["queries"], remote, 0.99)
    assert result.failed and set(result.failures) == {"site_c"} and not result.release.any()
    with pytest.raises(EchoFlowError, match="site_c"):
        remote_calibration(list(remote.values()), percentile=95.0)


@pytest.mark.slow
def test_flower_simulation(sites: dict) -> None:
    def job(transport: object) -> tuple:
        remote = {n: RemoteSite(n, transport) for n in sites["folders"]}  # type: ignore[arg-type]
        return decide_samples(sites["queries"], remote, 0.99).release, transport.nodes  # type: ignore[attr-defined]

    release, nodes = serve_simulation(sites["folders"], job, timeout_s=120)
    assert set(nodes) == set(sites["folders"]) and not release[:10].any() and release[10:].mean() >= 0.8
