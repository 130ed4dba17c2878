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
from echoflow.audit.page import tally
from tests.audit.synthetic import PatientSpace
from tests.audit.test_run import as_generated, audit_of, world  # noqa: F401 (world: a fixture)
from tests.browser import find_chromium, open_page, render
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
    """Render ``html`` at 1280 px (no errors, every image decoded, no sideways overflow), keep the screenshot at
    ``png``, return it in grey."""
    png.parent.mkdir(parents=True, exist_ok=True)
    shown = open_page(html.resolve().as_uri(), png)
    assert shown.errors == []
    assert shown.scroll_width <= 1280, f"{html.name} overflows: {shown.scroll_width} px wide"
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


def test_audit_page_counts_videos_frames_and_canaries_apart(world: dict, tmp_path: Path) -> None:  # noqa: F811
    """A real audit (2 phantom sites, fresh patients as generated videos, every 2nd frame, 12 canaries)."""
    out = tmp_path / "out"
    outcome = audit_of(world, as_generated(tmp_path / "gen", [world["fresh"]]), out, canaries=12, every=2)
    videos = len(list((tmp_path / "gen" / "Videos").glob("*.avi")))
    released = len(list((out / "released" / "Videos").glob("*.avi")))
    counted = tally(outcome.report)
    assert (counted.videos, counted.videos_released) == (videos, released) and 0 < released <= videos
    assert counted.frames == sum(d.frames for d in outcome.decisions) == videos * 6  # 12 frames, every 2nd
    assert (counted.canaries, counted.every) == (12, 2) and counted.frames + 12 == len(outcome.report["samples"])
    shown = open_page((out / "audit.html").as_uri(), ARTIFACTS / "audit_run.png")
    assert shown.errors == [] and shown.scroll_width <= 1280
    assert f"Audit passed: {released} of {videos} generated videos released" in shown.text
    assert f"{counted.frames_withheld} / {videos * 6}" in shown.text  # frames: canaries not among them
    canaries = shown.text[shown.text.index("Canaries (not generated"):]
    assert f"all\t12\t{counted.canaries_caught}\t" in canaries


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


def test_a_page_wider_than_the_window_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "wide.html"
    page.write_text("<html><body><img alt='wide' width='1900' height='10' src='data:image/gif;base64,"
                    "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7'></body></html>")
    assert open_page(page.as_uri(), tmp_path / "wide.png").scroll_width >= 1900
