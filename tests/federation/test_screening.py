"""Update screening: wrong keys/shapes/dtypes, NaN/Inf and outlying update norms are rejected with a reason."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from echoflow.server.screening import check_update, delta_norm, screen_updates, site_order

GLOBAL = {"model.w": torch.zeros(3, 2), "model.b": torch.zeros(2), "model.steps": torch.tensor(4)}


def moved(by: float, *, seed: int = 0) -> dict[str, Tensor]:
    """The global weights plus a random step of norm ``by``."""
    step = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step = (step / step.norm() * by).float()
    return {"model.w": step[:6].reshape(3, 2), "model.b": step[6:], "model.steps": torch.tensor(4)}


@pytest.mark.parametrize(("bad", "reason"), [
    ({"model.w": torch.zeros(3, 2), "model.b": torch.zeros(2)}, "missing \\['model.steps'\\]"),
    (GLOBAL | {"model.extra": torch.zeros(1)}, "unexpected \\['model.extra'\\]"),
    (GLOBAL | {"model.w": torch.zeros(2, 3)}, "model.w has shape \\(2, 3\\)"),
    (GLOBAL | {"model.b": torch.zeros(2, dtype=torch.int64)}, "model.b has dtype torch.int64"),
    (GLOBAL | {"model.b": torch.tensor([0.0, float("nan")])}, "model.b holds NaN or Inf"),
    (GLOBAL | {"model.w": torch.full((3, 2), float("inf"))}, "model.w holds NaN or Inf"),
])
def test_an_update_that_does_not_fit_is_named(bad: dict[str, Tensor], reason: str) -> None:
    assert check_update(moved(1.0), GLOBAL) is None
    why = check_update(bad, GLOBAL)
    assert why is not None
    assert re.search(reason, why), why


def test_delta_norm_is_the_l2_norm_of_the_float_weights_moved() -> None:
    assert delta_norm(moved(2.5), GLOBAL) == pytest.approx(2.5, rel=1e-6)
    assert delta_norm(GLOBAL, GLOBAL) == 0.0


def test_a_scaled_update_is_rejected_against_the_rounds_median() -> None:
    updates = {str(i): moved(1.0 + 0.1 * i, seed=i) for i in range(4)} | {"4": moved(30.0, seed=4)}
    rejected = screen_updates(updates, GLOBAL, max_ratio=10.0)
    assert list(rejected) == ["4"]
    assert "x the round's median" in rejected["4"]
    assert screen_updates(updates, GLOBAL, max_ratio=0.0) == {}  # 0: norm screening off
    assert screen_updates(updates, GLOBAL, max_ratio=50.0) == {}  # x~25 is within a ratio of 50


def test_norm_screening_needs_three_fitting_updates() -> None:
    two = {"0": moved(1.0), "1": moved(100.0, seed=1)}
    assert screen_updates(two, GLOBAL, max_ratio=10.0) == {}
    # a NaN update does not count towards the three, and is rejected for its own reason
    three = two | {"2": GLOBAL | {"model.b": torch.tensor([float("nan"), 0.0])}}
    assert set(screen_updates(three, GLOBAL, max_ratio=10.0)) == {"2"}
    four = three | {"3": moved(1.2, seed=3)}
    assert set(screen_updates(four, GLOBAL, max_ratio=10.0)) == {"1", "2"}


def test_sites_sort_by_index_then_unknown_nodes() -> None:
    assert sorted(["10", "node-5", "2", "node-3"], key=site_order) == ["2", "10", "node-3", "node-5"]
