"""The release decision: ask every site for its nearest real sample, withhold anything at or over τ.

Each site answers a batch of generated embeddings with (max similarity, local sample id) per query; real
embeddings never leave a site, so a federated audit wraps `SiteSearcher.search` in a remote call and reuses
`audit` unchanged. Fail closed: a site that raises, times out or answers malformed makes the whole audit fail,
and then nothing is releasable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from echoflow.audit.neighbours import Neighbours, SiteSearcher
from echoflow.errors import EchoFlowError


class AuditFailedError(EchoFlowError):
    """The audit could not hear from every site; nothing may be released."""


def query_sites(
    sites: Mapping[str, SiteSearcher], queries: np.ndarray, *, thresholds: Mapping[str, float | None],
    timeout_s: float | None = None,
) -> tuple[dict[str, Neighbours], dict[str, str]]:
    """Send ``queries`` (Q, D) to every site in parallel (k = 1) and check each answer.

    Returns:
        (answers by site, failures by site as one-line reasons). A site is failed when it raises, runs past
        ``timeout_s`` seconds, or answers with wrong shapes or non-finite similarities.
    """
    answers: dict[str, Neighbours] = {}
    failures: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(sites)))
    futures = {name: pool.submit(site.search, queries, k=1, threshold=thresholds[name]) for name, site in sites.items()}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for name, future in futures.items():
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            answer = future.result(timeout=left)
        except FutureTimeout:
            failures[name] = f"no answer within {timeout_s} s"
            continue
        except Exception as error:  # any site error must fail the audit closed, whatever its type
            failures[name] = f"{type(error).__name__}: {error}"
            continue
        shape = (len(queries), 1)
        if answer.similarity.shape != shape or answer.ids.shape != shape or answer.exact.shape != shape[:1]:
            failures[name] = f"answer shapes {answer.similarity.shape}/{answer.ids.shape}, expected {shape}"
        elif np.isnan(answer.similarity).any():
            failures[name] = "answer contains NaN similarities"
        else:
            answers[name] = answer
    pool.shutdown(wait=False, cancel_futures=True)
    return answers, failures


@dataclass(frozen=True)
class AuditResult:
    """Per generated sample, the decision and the evidence; all arrays have length G.

    Attributes:
        release: (G,) bool; all False when the audit failed.
        site: (G,) str, the site closest to triggering (largest similarity − τ_site).
        real_id: (G,) int64 local sample id of that site's nearest real sample (-1 if none).
        similarity: (G,) float32 that site's max similarity (exact when ≥ τ, else possibly a lower bound).
        threshold: (G,) float32 τ of that site.
        exact: (G,) bool, True where ``similarity`` is exact: always for withheld samples (any value ≥ τ is exact,
            and a site's lower bound < τ can only hide a true value < τ), and for released ones when every site's
            maximum is exact.
        failures: site → reason, for sites that did not answer; non-empty means the audit failed.
        sites: names of all sites asked; ``thresholds``: τ per site as used.
        scanned: per site, share of pairs compared (0-1).
        seconds: wall time of the fan-out.
    """

    release: np.ndarray
    site: np.ndarray
    real_id: np.ndarray
    similarity: np.ndarray
    threshold: np.ndarray
    exact: np.ndarray
    failures: dict[str, str]
    sites: tuple[str, ...]
    thresholds: dict[str, float]
    scanned: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """True when any site did not answer: nothing is releasable."""
        return bool(self.failures)

    def released_ids(self) -> np.ndarray:
        """(n,) int64 indices of releasable generated samples; raises `AuditFailedError` if the audit failed."""
        if self.failed:
            raise AuditFailedError(f"audit failed, nothing released: {self.failures}")
        return np.flatnonzero(self.release)


def decide_samples(
    generated: np.ndarray, sites: Mapping[str, SiteSearcher], thresholds: float | Mapping[str, float], *,
    timeout_s: float | None = None,
) -> AuditResult:
    """Decide release/withhold for each generated embedding against every site's real embeddings.

    Args:
        generated: (G, D) raw generated re-id embeddings (each site prepares them with its similarity).
        sites: site name → searcher (a local `SiteIndex` or a remote client).
        thresholds: τ for all sites, or per site (see `Calibration.thresholds`). A sample is withheld when its
            max similarity at any site is ≥ that site's τ.
        timeout_s: per-audit deadline for all site answers; ``None`` waits.
    """
    if not sites:
        raise EchoFlowError("audit.sites: no sites to audit against")
    taus = {n: float(thresholds) for n in sites} if isinstance(thresholds, float | int) else dict(thresholds)
    if missing := sorted(set(sites) - set(taus)):
        raise EchoFlowError(f"audit.thresholds: no τ for site(s) {missing}")
    start = time.perf_counter()
    answers, failures = query_sites(sites, generated, thresholds=taus, timeout_s=timeout_s)
    names = tuple(sites)
    g = len(generated)
    if failures:
        return AuditResult(
            release=np.zeros(g, dtype=bool), site=np.full(g, "", dtype=object), real_id=np.full(g, -1),
            similarity=np.full(g, np.nan, dtype=np.float32), threshold=np.full(g, np.nan, dtype=np.float32),
            exact=np.zeros(g, dtype=bool), failures=failures, sites=names, thresholds=taus,
            seconds=time.perf_counter() - start,
        )
    sim = np.stack([answers[n].similarity[:, 0] for n in names], axis=1)  # (G, S)
    tau = np.array([taus[n] for n in names], dtype=np.float32)
    best = np.argmax(sim - tau, axis=1)
    withheld = np.asarray((sim >= tau).any(axis=1), dtype=bool)
    rows = np.arange(g)
    return AuditResult(
        release=~withheld,
        site=np.array(names, dtype=object)[best],
        real_id=np.stack([answers[n].ids[:, 0] for n in names], axis=1)[rows, best],
        similarity=sim[rows, best].astype(np.float32),
        threshold=tau[best],
        exact=np.asarray(withheld | np.stack([answers[n].exact for n in names], axis=1).all(axis=1), dtype=bool),
        failures={},
        sites=names,
        thresholds=taus,
        scanned={n: answers[n].scanned for n in names},
        seconds=time.perf_counter() - start,
    )
