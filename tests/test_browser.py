"""The HTML reports in a real browser: headless Chromium renders them with no console errors, every image decoded.

Screenshots are kept as artifacts in ``test-artifacts/`` at the repository root (git-ignored; CI uploads it), or
in ``$ECHOFLOW_TEST_ARTIFACTS`` when set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echoflow.audit import build_index, build_report, calibrate, dcr_stats, decide_samples, write_report
from tests.audit.synthetic import PatientSpace
from tests.browser import find_chromium, render
from tests.ef_videos import write_ef_videos
from tests.test_summary import write_fake_summary

ARTIFACTS = Path(os.environ.get("ECHOFLOW_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")

NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install -y chromium)"
# Skipped on a developer machine without Chromium; in CI (the CI variable set) a missing Chromium fails instead.
pytestmark = pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"), reason=NO_CHROMIUM)


@pytest.fixture(autouse=True)
def _chromium_in_ci() -> None:
    if find_chromium() is None:
        pytest.fail(f"CI is set but there is {NO_CHROMIUM}", pytrace=False)


def small_audit_html(out: Path) -> Path:
    """An audit.html from the real report code: 2 sites x 40 patients x 10 frames, 5 copies + 40 fresh samples.

    With generated and real phantom videos in each EF range, so the page holds animated GIF previews.
    """
    rng = np.random.default_rng(0)
    space = PatientSpace.random(dim=16, factors=4, seed=0)
    train = {s: space.frames(space.patients(40, rng), 10, rng)[0] for s in ("a", "b")}
    heldout = {s: space.frames(space.patients(10, rng), 3, rng)[0] for s in ("a", "b")}
    indexes = {s: build_index(x, kind="exact") for s, x in train.items()}
    calibration = calibrate(indexes, heldout)
    generated = np.concatenate([train["a"][:5], space.frames(space.patients(40, rng), 1, rng)[0]])
    result = decide_samples(generated, indexes, calibration.thresholds())
    report = build_report(result, calibration, index_info={s: {"index": "exact", "ntotal": 400} for s in indexes},
                          dcr=dcr_stats(result.similarity, result.similarity - 0.1, n_train=800, n_heldout=60))
    pairs = [(rng.uniform(-1, 1, (1, 16, 16)), rng.uniform(-1, 1, (16, 16)), f"#{i} sim 0.99") for i in range(3)]
    generated = write_ef_videos(out.parent / "generated", [30.0, 47.0, 62.0], site="synthetic", seed=1)
    real = write_ef_videos(out.parent / "site_a", [25.0, 50.0, 70.0], site="site_a", size=112, seed=2)
    return write_report(report, calibration, result, out, pairs=pairs, generated_videos=generated,
                        real_videos=real)[1]


def rendered_page(html: Path, png: Path) -> np.ndarray:
    """Render ``html`` (no errors, every image decoded), keep the screenshot at ``png``, return it in grey."""
    png.parent.mkdir(parents=True, exist_ok=True)
    assert render(html, png) == []
    image = np.asarray(Image.open(png).convert("L"))
    assert image.shape[1] == 1280 and image.shape[0] >= 2000
    assert (image < 128).mean() > 0.005  # text and the inlined figures drew (a blank page is all white)
    return image


def test_audit_report_renders_without_errors(tmp_path: Path) -> None:
    html = small_audit_html(tmp_path / "audit")
    page = html.read_text()
    assert page.count("data:image/gif;base64,") == 6 and len(list((tmp_path / "audit" / "previews").glob("*.gif"))) == 6
    rendered_page(html, ARTIFACTS / "audit.png")


def test_summary_renders_without_errors(tmp_path: Path) -> None:
    html = write_fake_summary(tmp_path)
    assert html.read_text().count("data:image/gif;base64,") == 5  # no generated video in 40-55 %
    rendered_page(html, ARTIFACTS / "summary.png")


def test_render_reports_every_kind_of_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><img src='missing.png'><img alt='corrupt' src='data:image/gif;base64,R0lG'>"
                    "<script>console.log('fine');"
                    "console.error('boom'); setTimeout(() => { throw new Error('late'); }, 0); nope();"
                    "</script></body></html>")
    errors = render(page, tmp_path / "broken.png", width=400, height=300)
    assert any(e == "console.error: boom" for e in errors)
    assert any("ReferenceError: nope is not defined" in e for e in errors)
    assert any("Error: late" in e for e in errors)
    assert any("ERR_FILE_NOT_FOUND" in e and "missing.png" in e for e in errors)
    assert "img did not decode: corrupt" in errors
    assert any(e.startswith("img did not decode: ") and e.endswith("/missing.png") for e in errors)
    assert len(errors) == 6 and Image.open(tmp_path / "broken.png").size == (400, 300)
