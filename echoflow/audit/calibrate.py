"""The release threshold τ, from real data only.

As in the reference filter (EchoNet-Synthetic, ``echosyn/privacy/apply.py``): a real patient the model never saw
is, by definition, not a copy of a training patient, so how close *held-out* real samples come to the training
set says how close an honest new sample may come. Exactly:

1. For each real held-out sample h of a site, s(h) = max over that site's training samples x of sim(h, x)
   (exact nearest neighbour; the index answers with ``threshold=None``).
2. τ_site = the p-th percentile (default 95, numpy's linear interpolation) of {s(h)} over the site's held-out set.
3. τ_global = the p-th percentile over all sites' held-out samples of max over *all* sites' training samples.
   This sends held-out embeddings to other sites, as the audit sends generated ones; per-site τ does not.

A generated sample is withheld when its similarity reaches τ: it is as close to a training patient as only the
closest 5 % of genuinely new patients come.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from echoflow.audit.decide import AuditFailedError, query_sites
from echoflow.audit.neighbours import SiteSearcher
from echoflow.errors import EchoFlowError


@dataclass(frozen=True)
class Calibration:
    """Thresholds and the distributions they came from (for the report's histograms).

    Attributes:
        percentile: p, 0-100.
        site_threshold: site → τ_site from its own held-out→train similarities.
        global_threshold: τ over all sites' held-out samples against all sites' training sets.
        heldout_to_train: site → (H_site,) float32 each held-out sample's max similarity to its own site's train.
        heldout_to_all: (H,) float32 each held-out sample's max similarity to any site's train (sites in order).
    """

    percentile: float
    site_threshold: dict[str, float]
    global_threshold: float
    heldout_to_train: dict[str, np.ndarray]
    heldout_to_all: np.ndarray

    def thresholds(self, scope: Literal["global", "site"] = "global") -> dict[str, float]:
        """τ per site for `audit`: the global τ for every site, or each site's own."""
        if scope == "site":
            return dict(self.site_threshold)
        return {name: self.global_threshold for name in self.site_threshold}


def calibrate(
    sites: Mapping[str, SiteSearcher], heldout: Mapping[str, np.ndarray], *, percentile: float = 95.0,
    timeout_s: float | None = None,
) -> Calibration:
    """Compute τ per site and globally from each site's real training index and held-out real embeddings.

    Args:
        sites: site name → index of its real *training* embeddings.
        heldout: site name → (H, D) raw embeddings of its real held-out split (patients not in training).
        percentile: p in (0, 100].
        timeout_s: deadline per query round; a site that fails makes calibration fail (no τ, no release).
    """
    if not 0.0 < percentile <= 100.0:
        raise EchoFlowError(f"audit.percentile: expected 0 < p ≤ 100, got {percentile}")
    if set(sites) != set(heldout):
        raise EchoFlowError(f"audit.heldout: sites {sorted(heldout)} ≠ indexed sites {sorted(sites)}")
    own: dict[str, np.ndarray] = {}
    to_all: list[np.ndarray] = []
    for name, queries in heldout.items():
        answers, failures = query_sites(sites, queries, thresholds=dict.fromkeys(sites), timeout_s=timeout_s)
        if failures:
            raise AuditFailedError(f"calibration failed at site(s) {failures}")
        own[name] = answers[name].similarity[:, 0].astype(np.float32)
        to_all.append(np.max([a.similarity[:, 0] for a in answers.values()], axis=0).astype(np.float32))
    all_sims = np.concatenate(to_all)
    return Calibration(
        percentile=percentile,
        site_threshold={n: float(np.percentile(s, percentile)) for n, s in own.items()},
        global_threshold=float(np.percentile(all_sims, percentile)),
        heldout_to_train=own,
        heldout_to_all=all_sims,
    )
