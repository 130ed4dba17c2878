"""Update screening: a site's training reply reaches the strategy only if its weights fit and are sane.

Before aggregation the server rejects, with a reason, every update that

1. does not carry exactly the global weights' keys, shapes and kinds of dtype (a stale or foreign model), or a
   weighting ``num-examples`` that is not a positive finite number;
2. holds a NaN or an infinity (a diverged site);
3. moves the weights much further than the others: its delta norm ``||w_site - w_global||`` exceeds
   ``max_ratio`` x the round's median delta norm (a scaled, poisoned or exploding update). Only with at least
   `MIN_UPDATES_FOR_NORM` fitting updates: with two, a median is their mean and a x10 outlier pulls it along.

A rejected update is never aggregated. Scaled updates below ``max_ratio`` pass; against those a robust
strategy (FedMedian, Krum, FedTrimmedAvg) bounds what a minority of sites can do.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from flwr.app import Message
from torch import Tensor

log = logging.getLogger(__name__)

MIN_UPDATES_FOR_NORM = 3


def check_update(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """Why ``update`` cannot be averaged with ``reference`` (the global weights), or None when it can."""
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"keys differ from the global weights (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in update.items():
        expected = reference[key]
        if value.shape != expected.shape:
            return f"{key} has shape {tuple(value.shape)}, the global weights {tuple(expected.shape)}"
        if value.is_floating_point() != expected.is_floating_point():  # FedAdam's global weights are float64
            return f"{key} has dtype {value.dtype}, the global weights {expected.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or Inf"
    return None


def delta_norm(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """L2 norm of ``update - reference`` over every floating-point tensor (in float64: no overflow)."""
    squares = sum(float((update[k].double() - v.double()).square().sum())
                  for k, v in reference.items() if v.is_floating_point())
    return math.sqrt(squares)


def screen_updates(
    updates: Mapping[str, Mapping[str, Tensor]], reference: Mapping[str, Tensor], *, max_ratio: float
) -> dict[str, str]:
    """The updates to reject, as site label -> reason; the others may be aggregated.

    Args:
        updates: site label -> its returned weights.
        reference: the global weights the sites started from.
        max_ratio: reject a delta norm above this multiple of the round's median (0 = no norm screening).
    """
    rejected = {site: why for site, update in updates.items() if (why := check_update(update, reference))}
    norms = {site: delta_norm(update, reference) for site, update in updates.items() if site not in rejected}
    if max_ratio > 0 and len(norms) >= MIN_UPDATES_FOR_NORM:
        median = statistics.median(norms.values())
        if median > 0:  # every site returned the global weights: nothing to compare against
            rejected |= {site: f"update norm {norm:.3g} is {norm / median:.1f}x the round's median {median:.3g} "
                               f"(federation.max_update_ratio {max_ratio:g})"
                         for site, norm in norms.items() if norm > max_ratio * median}
    return rejected


def screen_replies(
    replies: Sequence[Message], labels: Sequence[str], reference: Mapping[str, Tensor], *, max_ratio: float,
    server_round: int,
) -> tuple[list[Message], dict[str, str]]:
    """Split training replies (with weights) into those to aggregate and the rejected ones (label -> reason).

    The accepted replies come back ordered by site label, so the strategy's floating-point sums do not depend
    on the order replies arrived in: a resumed federation then repeats an uninterrupted one bit for bit.
    """
    by_label = dict(zip(labels, replies, strict=True))
    updates: dict[str, dict[str, Tensor]] = {}
    rejected: dict[str, str] = {}
    for label, reply in by_label.items():
        weight = float(reply.content["metrics"].get("num-examples", float("nan")))  # type: ignore[arg-type]
        if "arrays" not in reply.content.array_records:
            rejected[label] = "sent no weights"
        elif not (math.isfinite(weight) and weight > 0):
            rejected[label] = f"num-examples is {weight}, not a positive number"
        else:
            updates[label] = reply.content.array_records["arrays"].to_torch_state_dict()
    rejected |= screen_updates(updates, reference, max_ratio=max_ratio)
    for label, why in sorted(rejected.items()):
        log.warning("round %d: rejected the update of site %s: %s", server_round, label, why)
    accepted = [by_label[label] for label in sorted(updates, key=site_order) if label not in rejected]
    return accepted, {label: rejected[label] for label in sorted(rejected, key=site_order)}


def site_order(label: str) -> tuple[int, str]:
    """Sort key of a site label: site indices numerically, then unknown nodes (``node-<id>``) by name."""
    return (int(label), "") if label.isdigit() else (1 << 62, label)
