"""Burned-in PHI removed from ultrasound pixels: the Clean Pixel Data step of DICOM de-identification.

Scanners draw text into the image itself (patient name, ID, birth date, institution, date and time, operator),
which no header clean-up reaches; PS3.15 Annex E's Clean Pixel Data Option asks for it to be removed. It is
removed whatever the Burned In Annotation (0028,0301) flag says. `clean_pixels` does it in two steps:

* Crop to the ultrasound region: the largest 2D entry of SequenceOfUltrasoundRegions (0018,6011) when it lies
  inside the image (`ultrasound_region`), else the fan found from the pixels (`fan_box`). Text, patient banner,
  ECG trace and toolbar around the image are cut away.
* In a cine, blank every pixel that never changes: echo speckle always moves, overlays drawn inside the crop
  (text in the corners of the fan's box, depth marks, calipers) do not (``STILL_RANGE``, ``MIN_MOVING``).

The flag only matters when there is no ultrasound region and no motion (a single frame, or a still cine): a
file marked ``YES`` is then refused, since its text could not be told from the image. `read_ultrasound` in
`echoflow.data.dicom` applies this to every file it reads; the header elements read here
(SequenceOfUltrasoundRegions geometry, BurnedInAnnotation) are in the allow-list there, with their PS3.15
profile actions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from echoflow.errors import EchoFlowError

STILL_RANGE = 4  # grey levels: a pixel varying less over a cine is an overlay (text, calipers), not echo signal
MIN_MOVING = 0.2  # blank still pixels only when at least this share of the crop moves (else it is a still cine)


class UnusableDicom(EchoFlowError):
    """A file that cannot become a clip; ``reason`` is worded without any identifying header value.

    Defined here, the lowest module that raises it, and re-exported by `echoflow.data.dicom`.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def clean_pixels(ds: Dataset, gray: np.ndarray, coloured: np.ndarray, path: Path) -> np.ndarray:
    """Burned-in text removed from (T, H, W) ``gray``: the Clean Pixel Data step of de-identification.

    1. Crop to the ultrasound region (`ultrasound_region`), else to the fan found from the pixels (`fan_box`);
       text, patient banner, ECG trace and toolbar around the image are cut away.
    2. In a cine where at least ``MIN_MOVING`` of the crop moves, blank (set to 0) every pixel whose grey level
       varies by at most ``STILL_RANGE`` over the clip: echo speckle always changes, overlays drawn inside the
       crop (text in the corners of the fan's box, depth marks, calipers) do not.

    Raises:
        UnusableDicom: BurnedInAnnotation is ``YES`` but neither step applies (a single frame or a still cine
            without ultrasound region): the text could not be told from the image.
    """
    region = ultrasound_region(ds, *gray.shape[1:])
    y0, y1, x0, x1 = region if region is not None else fan_box(gray, coloured)
    frames = gray[:, y0:y1, x0:x1].copy()
    still = (frames.max(0) - frames.min(0)) <= STILL_RANGE
    if len(frames) > 1 and still.mean() <= 1.0 - MIN_MOVING:
        frames[:, still] = 0
    elif region is None and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise UnusableDicom(path, "burned-in annotation cannot be removed (no ultrasound region, no motion)")
    return frames


def ultrasound_region(ds: Dataset, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Crop box ``(y0, y1, x0, x1)`` (end-exclusive) of the largest 2D SequenceOfUltrasoundRegions entry.

    None when there is none inside the ``height`` x ``width`` image (files resized after acquisition keep the
    original coordinates).
    """
    regions = [r for r in ds.get("SequenceOfUltrasoundRegions", []) if r.get("RegionSpatialFormat", 0) == 1]
    boxes = [(int(r.RegionLocationMinY0), int(r.RegionLocationMaxY1) + 1, int(r.RegionLocationMinX0),
              int(r.RegionLocationMaxX1) + 1) for r in regions if "RegionLocationMaxY1" in r]
    inside = [b for b in boxes if 0 <= b[0] < b[1] <= height and 0 <= b[2] < b[3] <= width]
    return max(inside, key=lambda b: (b[1] - b[0]) * (b[3] - b[2])) if inside else None


def fan_box(gray: np.ndarray, coloured: np.ndarray) -> tuple[int, int, int, int]:
    """Crop box ``(y0, y1, x0, x1)`` (end-exclusive) of the fan in (T, H, W) ``gray``, found from the pixels.

    Pixels that change over time (any bright pixel for a single frame), colour excluded, reduced to the longest
    run of columns, then rows, holding at least 5 % of the peak activity, so static text and thin ECG bands drop
    out.
    """
    signal = np.where(coloured, 0, gray).astype(np.float32)
    active = signal.std(0) > 2.0 if len(gray) > 1 else signal[0] > 16.0
    if active.mean() < 0.01:  # a nearly still cine: fall back to brightness
        active = signal.mean(0) > 16.0
    x0, x1 = _longest_run(active.mean(0))
    y0, y1 = _longest_run(active[:, x0:x1].mean(1))
    return y0, y1, x0, x1


def _longest_run(profile: np.ndarray, *, level: float = 0.05) -> tuple[int, int]:
    """``(start, end)`` of the longest run where ``profile >= level * max``; the whole axis if flat zero."""
    if profile.max() <= 0:
        return 0, len(profile)
    above = np.concatenate([[False], profile >= level * profile.max(), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(above))
    starts, ends = edges[0::2], edges[1::2]
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best])
