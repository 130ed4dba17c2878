"""Burned-in text fails closed: removed (an ingested text variant equals its text-free twin up to noise) or refused.

Each case is a cine of moving speckle in a circular sector (apex at the top, 80 degrees), saved as ultrasound
DICOM twice: with canary text drawn into the pixels, and without (its *twin*, the same speckle). Both are read by
`read_ultrasound`; the tolerances, stated once here, are what "equal up to noise" means:

* text gone: in the cleaned clip's temporal mean, text pixels differ from the ring of pixels around them by at
  most ``CONTRAST_LEFT`` grey levels (the drawn text differs by 40 to 215);
* text pixels no further from the twin than the twin is from itself one frame later (speckle decorrelates);
* everywhere else in the sector the two cleaned clips differ by at most ``ELSEWHERE`` grey levels on average
  (``ELSEWHERE_JPEG`` when both went through JPEG).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from echoflow.data.dicom import read_ultrasound
from echoflow.data.dicom_pixels import UnusableDicom
from tests.data.test_dicom import write_us

CONTRAST_LEFT = 10.0
ELSEWHERE, ELSEWHERE_JPEG = 1.0, 3.0
SIZE = (120, 160)
APEX, RADIUS, HALF_ANGLE = (8, 80), 100, np.deg2rad(40)
FRAMES = 24


def sector(size: tuple[int, int] = SIZE, apex: tuple[int, int] = APEX, radius: int = RADIUS) -> np.ndarray:
    rows, columns = np.mgrid[0 : size[0], 0 : size[1]]
    dy, dx = rows - apex[0], columns - apex[1]
    return (np.hypot(dy, dx) <= radius) & (np.abs(np.arctan2(dx, np.maximum(dy, 1e-9))) <= HALF_ANGLE) & (dy >= 0)


def speckle(frames: int, fan: np.ndarray, seed: int) -> np.ndarray:
    """Moving speckle (40-229, grains about 2 pixels) inside ``fan``, black outside."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(40, 230, (frames, *fan.shape)).astype(np.float32)
    grains = np.stack([cv2.GaussianBlur(f, (3, 3), 0.7) for f in raw])
    return np.where(fan, np.clip(grains, 0, 255), 0).round().astype(np.uint8)


def text_mask(size: tuple[int, int], text: str, origin: tuple[int, int], scale: float = 0.9,
              thickness: int = 1) -> np.ndarray:
    canvas = np.zeros(size, dtype=np.uint8)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_PLAIN, scale, 255, thickness, cv2.LINE_8)
    return canvas > 0


INSIDE = text_mask(SIZE, "CANARY 4711", (37, 82), scale=0.8)  # across the middle of the sector
CORNER = text_mask(SIZE, "CAN", (18, 20))  # inside the sector's bounding box, outside the sector


def draw(pixels: np.ndarray, mask: np.ndarray, how: str, seed: int = 1) -> np.ndarray:
    out = pixels.astype(np.float32)
    rng = np.random.default_rng(seed)
    if how == "opaque":
        out[:, mask] = 255
    elif how == "dark":
        out[:, mask] = 0
    elif how == "see-through":
        out[:, mask] = 0.5 * out[:, mask] + 0.5 * 255
    elif how == "jittered":  # +-8 grey levels per pixel and frame, and +-8 per frame
        out[:, mask] = 230 + rng.integers(-8, 9, (len(out), int(mask.sum()))) + rng.integers(-8, 9, (len(out), 1))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def ring(mask: np.ndarray, fan: np.ndarray) -> np.ndarray:
    kernel = np.ones((3, 3), np.uint8)
    outer = cv2.dilate(mask.astype(np.uint8), kernel, iterations=4) > 0
    inner = cv2.dilate(mask.astype(np.uint8), kernel, iterations=1) > 0
    return outer & ~inner & fan


def pair(tmp_path: Path, how: str, *, frames: int = FRAMES, jpeg: bool = False, jpeg_quality: int = 95,
         **tags: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cleaned text variant, cleaned twin, the original variant), both cleaned clips cropped the same way."""
    fan = sector()
    twin = speckle(frames, fan, seed=3)
    variant = draw(draw(twin, INSIDE, how), CORNER, "opaque")
    (tmp_path / how).mkdir()
    clean = [read_ultrasound(write_us(tmp_path / how / name, pixels, jpeg=jpeg, jpeg_quality=jpeg_quality, **tags), **(
        {"accept_burned_in_risk": True} if frames == 1 else {})).frames
        for name, pixels in (("text.dcm", variant), ("twin.dcm", twin))]
    return clean[0], clean[1], variant


def crop_of(clean: np.ndarray, original: np.ndarray) -> tuple[slice, slice]:
    """Where in ``original`` the cleaned clip was cropped from (best match of the clips' temporal means)."""
    scores = cv2.matchTemplate(original.mean(0).astype(np.float32), clean.mean(0).astype(np.float32), cv2.TM_SQDIFF)
    column, row = cv2.minMaxLoc(scores)[2]
    return slice(row, row + clean.shape[1]), slice(column, column + clean.shape[2])


def assert_fits_the_sector(clean: np.ndarray, original: np.ndarray, fan: np.ndarray, *, slack: int = 1
                           ) -> tuple[slice, slice]:
    """The crop is the sector's box, give or take its 1-pixel-wide tips: >= 99 % of the sector, at most ``slack``
    pixels beyond (JPEG rings up to half an 8x8 block past the fan's edge, and the ringing moves)."""
    rows, columns = crop_of(clean, original)
    box = bbox(fan)
    assert fan[rows, columns].sum() >= 0.99 * fan.sum()
    assert rows.start >= box[0].start - slack and rows.stop <= box[0].stop + slack
    assert columns.start >= box[1].start - slack and columns.stop <= box[1].stop + slack
    return rows, columns


def assert_text_gone(text: np.ndarray, twin: np.ndarray, original: np.ndarray, *, jpeg: bool = False) -> None:
    fan = sector()
    assert text.shape == twin.shape and len(text) == len(original)
    raw_twin = speckle(len(original), fan, seed=3)  # what `pair` drew the text on
    rows, columns = assert_fits_the_sector(twin, raw_twin, fan, slack=4 if jpeg else 1)
    inside, fan_crop, corner = INSIDE[rows, columns], fan[rows, columns], CORNER[rows, columns]
    around = ring(inside, fan_crop)
    drawn = abs(original[:, rows, columns][:, inside].mean() - original[:, rows, columns][:, around].mean())
    left = abs(float(text[:, inside].mean()) - float(text[:, around].mean()))
    assert drawn >= 40 and left <= CONTRAST_LEFT, (drawn, left)
    to_twin = np.abs(text[:, inside].astype(float) - twin[:, inside]).mean()
    if len(twin) > 1:  # the twin one frame later
        twin_noise = np.abs(np.diff(twin[:, inside].astype(float), axis=0)).mean()
    else:  # a single frame: the twin 4 pixels to the side
        shifted = inside[:, :-4]
        twin_noise = np.abs(twin[:, :, 4:][:, shifted].astype(float) - twin[:, :, :-4][:, shifted]).mean()
    assert to_twin <= twin_noise, (to_twin, twin_noise)
    elsewhere = fan_crop & ~(cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=4) > 0)
    assert np.abs(text[:, elsewhere].astype(float) - twin[:, elsewhere]).mean() <= (ELSEWHERE_JPEG if jpeg
                                                                                   else ELSEWHERE)
    assert not text[:, corner & ~fan_crop].any()  # outside the fitted sector, inside its box: masked


@pytest.mark.parametrize("how", ["opaque", "dark", "see-through", "jittered"])
def test_text_inside_the_fan_is_removed(tmp_path: Path, how: str) -> None:
    text, twin, original = pair(tmp_path, how)
    assert_text_gone(text, twin, original)


@pytest.mark.parametrize("how", ["opaque", "jittered"])
def test_text_across_the_sector_edge_is_removed_on_both_sides(tmp_path: Path, how: str) -> None:
    """Jittered text just outside the fan moves a little, so the sector fit may take it in: it is found there."""
    fan = sector()
    across = text_mask(SIZE, "CANARY 4711", (52, 62))
    assert (across & ~fan).sum() > 50 and (across & fan).sum() > 200
    twin = speckle(FRAMES, fan, seed=3)
    text = read_ultrasound(write_us(tmp_path / "text.dcm", draw(twin, across, how))).frames
    clean_twin = read_ultrasound(write_us(tmp_path / "twin.dcm", twin)).frames
    rows, columns = crop_of(clean_twin, twin)
    mask, fan_crop = across[rows, columns], fan[rows, columns]
    assert text.shape == clean_twin.shape
    assert abs(float(text[:, mask & fan_crop].mean()) - float(text[:, ring(mask, fan_crop)].mean())) <= CONTRAST_LEFT
    assert text[:, mask & ~fan_crop].max() < 200  # drawn at 222-255: masked to 0 or filled from the speckle


@pytest.mark.parametrize(("how", "quality"), [("opaque", 75), ("see-through", 75), ("jittered", 75), ("dark", 50)])
def test_jpeg_compressed_text_is_removed(tmp_path: Path, how: str, quality: int) -> None:
    """Text and twin both JPEG-compressed frame by frame (Pillow, the given quality)."""
    text, twin, original = pair(tmp_path, how, jpeg=True, jpeg_quality=quality)
    assert_text_gone(text, twin, original, jpeg=True)


def test_a_name_banner_around_a_small_fan_in_a_whole_image_region_is_removed(tmp_path: Path) -> None:
    """The region is the whole 240x320 screen; the fan is 3 % of it; a big static banner runs across the top."""
    size = (240, 320)
    fan = sector(size, apex=(100, 160), radius=60)
    twin = speckle(FRAMES, fan, seed=5)
    banner = text_mask(size, "CANARY^PHYLLIS 19450607", (20, 30), scale=1.2, thickness=2)
    variant = draw(twin, banner, "opaque")
    whole = (0, size[0] - 1, 0, size[1] - 1)
    text = read_ultrasound(write_us(tmp_path / "text.dcm", variant, regions=whole)).frames
    clean_twin = read_ultrasound(write_us(tmp_path / "twin.dcm", twin, regions=whole)).frames
    assert fan.mean() < 0.05 and banner.sum() > 500
    assert_fits_the_sector(clean_twin, twin, fan)
    np.testing.assert_array_equal(text, clean_twin)


def test_single_frames_are_refused_unless_the_site_accepts_the_risk(tmp_path: Path) -> None:
    fan = sector()
    frame = draw(speckle(1, fan, seed=7), INSIDE, "opaque")
    path = write_us(tmp_path / "single.dcm", frame)
    with pytest.raises(UnusableDicom, match="single frame: burned-in text cannot be told from the image"):
        read_ultrasound(path)
    text, twin, original = pair(tmp_path, "opaque", frames=1)
    assert_text_gone(text, twin, original)  # the stroke detector alone removed the drawn text


def test_still_cines_are_refused_unless_the_site_accepts_the_risk(tmp_path: Path) -> None:
    fan = sector()
    still = np.repeat(draw(speckle(1, fan, seed=8), INSIDE, "opaque"), FRAMES, axis=0)
    path = write_us(tmp_path / "still.dcm", still, BurnedInAnnotation="YES")
    with pytest.raises(UnusableDicom, match="low-motion cine: burned-in text cannot be told from the image"):
        read_ultrasound(path)
    clip = read_ultrasound(path, accept_burned_in_risk=True).frames
    assert len(clip) == FRAMES and clip.max() < 255  # flat 255 strokes found by the stroke detector


def test_cli_flag_accepts_the_risk(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from echoflow.cli import app

    src = tmp_path / "in"
    src.mkdir()
    write_us(src / "single.dcm", draw(speckle(1, sector(), seed=7), INSIDE, "opaque"))
    args = ["data", "ingest", str(src), "--out", str(tmp_path / "site"), "--size", "16",
            "--salt", "a-site-secret-of-32-characters!!"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 0 and "input #1: single frame: burned-in text cannot be told" in refused.output
    accepted = CliRunner().invoke(app, [*args, "--accept-burned-in-risk"])
    assert accepted.exit_code == 0 and "ingested 1 clips" in accepted.output
