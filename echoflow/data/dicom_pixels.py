"""Burned-in PHI removed from ultrasound pixels: the Clean Pixel Data step of DICOM de-identification.

Scanners draw text into the image itself (patient name, ID, birth date, institution, date and time, operator),
which no header clean-up reaches; PS3.15 Annex E's Clean Pixel Data Option asks for it to be removed. It is
removed whatever the Burned In Annotation (0028,0301) flag says, and the policy fails closed (`clean_pixels`):

1. **Crop and mask to the fitted sector.** The search box is the largest 2D entry of SequenceOfUltrasoundRegions
   (0018,6011) when it lies inside the image (`ultrasound_region`), else the whole image. Inside it the sector
   is fitted (`fit_sector`): the convex hull of the largest connected area of moving pixels (colour excluded),
   thin strokes opened away. Everything outside that hull is set to 0 (echo background) and the
   output is cropped to the hull's box, so text in the corners of the fan's box, a banner over a region that is
   the whole screen, ECG traces and toolbars are gone.
2. **Find overlays inside the sector** (`find_overlays`), two detectors, united:
   * *still*: a pixel whose temporal standard deviation is under ``STILL_SHARE`` of its neighbourhood's and
     under ``STILL_MAX`` (speckle
     decorrelates as the heart moves; text, calipers and markers do not, even with +-8 grey levels of jitter or
     JPEG noise), or nearly still and far from its neighbourhood's brightness;
   * *strokes*: pixels of the temporal mean image that stand out from their 5x5 median (strokes up to 2 pixels
     wide) or from their neighbourhood's mean (larger marks) by ``STROKE_Z`` times what the speckle's own noise
     leaves in a mean of T frames, where the temporal std is also under ``STROKE_STD_SHARE`` of the
     neighbourhood's: see-through text moves with the speckle below it but shifts its mean and damps its
     motion, while a bright moving reflector (valve, pericardium) stands out with as much motion as around it.
3. **Fill them from their neighbourhood** (`fill_from_neighbourhood`: frame by frame, the mean of the known
   sector pixels in the smallest window that has some, mask grown by ``GROW`` pixels for anti-aliasing and JPEG
   ringing; linear time whatever the mask's size), not with 0, so black letters over speckle do not remain.

Refused with one line (`UnusableDicom`), unless the site's ingest accepts the risk (``accept_burned_in_risk``,
``echoflow data ingest --accept-burned-in-risk``): a single frame and a low-motion cine (less than
``MIN_MOVING`` of the sector moves, or no sector moves at all), since text cannot be told from a still image -
whatever BurnedInAnnotation says. With the risk accepted such files get steps 1 and 3 with a still-image stroke
detector (flat, bright 2x2 blocks: rendered text), which misses anti-aliased or jittered text.

`read_ultrasound` in `echoflow.data.dicom` applies this to every file it reads; the header elements read here
(SequenceOfUltrasoundRegions geometry) are in the allow-list there, with their PS3.15 profile actions.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

from echoflow.errors import EchoFlowError

MOVING_STD = 6.0  # grey levels of temporal std: a pixel above moves (echo signal), below is still
MIN_MOVING = 0.3  # a cine whose fitted sector moves less than this share is refused as low-motion
MIN_SECTOR = 256  # pixels: a moving area smaller than this is no ultrasound sector
OPEN = 5  # px: the square opening that removes text strokes from the activity map before the sector fit
STILL_SHARE, STILL_MAX = 0.35, 16.0  # temporal std under this share of the neighbourhood's (and under 16): overlay
NEAR_STILL_STD, NEAR_STILL_CONTRAST = 12.0, 24.0  # ... or with std under 12 and its mean 24 off the neighbours'
STROKE_Z, STROKE_MIN = 4.0, 16.0  # stroke contrast in the temporal mean: z-score over speckle noise, grey levels
STROKE_STD_SHARE = 0.8  # ... at a pixel whose temporal std is under this share of its neighbourhood's
NEIGHBOURHOOD = 21  # px: side of the window the neighbourhood statistics are taken over
MIN_OVERLAY = 4  # px: smaller connected overlay candidates are speckle noise
GROW = 1  # px the overlay mask grows by before it is filled (anti-aliasing, JPEG ringing)
FILL_WINDOWS = (5, 17, 65)  # px: windows whose known pixels' mean fills a hole pixel, smallest first
FLAT_BRIGHT = 200  # still image: flat 2x2 blocks at least this bright are rendered text


class UnusableDicom(EchoFlowError):
    """A file that cannot become a clip; ``reason`` is worded without any identifying header value.

    Defined here, the lowest module that raises it, and re-exported by `echoflow.data.dicom`.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def clean_pixels(ds: Dataset, gray: np.ndarray, coloured: np.ndarray, path: Path, *,
                 accept_burned_in_risk: bool = False) -> np.ndarray:
    """Burned-in text removed from (T, H, W) uint8 ``gray`` (overwritten): crop, mask, find, fill (module doc).

    Args:
        ds: the header (SequenceOfUltrasoundRegions is read).
        gray: the decoded luma; its crop is cleaned in place and returned as a view.
        coloured: (H, W) bool, pixels coloured in any frame (ECG traces, markers, colour Doppler).
        path: for error lines.
        accept_burned_in_risk: ingest single frames and low-motion cines with the still-image detector only.

    Raises:
        UnusableDicom: a single frame or a low-motion cine, unless ``accept_burned_in_risk``.
    """
    region = ultrasound_region(ds, *gray.shape[1:])
    y0, y1, x0, x1 = region if region is not None else (0, gray.shape[1], 0, gray.shape[2])
    frames, colour = gray[:, y0:y1, x0:x1], coloured[y0:y1, x0:x1]
    if len(frames) == 1 and not accept_burned_in_risk:
        raise UnusableDicom(path, "single frame: burned-in text cannot be told from the image "
                                  "(--accept-burned-in-risk to ingest)")
    mean, std = _temporal_stats(frames)
    moving = (std > MOVING_STD) & ~colour
    sector = fit_sector(moving) if len(frames) > 1 else None
    still = sector is None or moving[sector].mean() < MIN_MOVING
    if still and len(frames) > 1 and not accept_burned_in_risk:
        raise UnusableDicom(path, "low-motion cine: burned-in text cannot be told from the image "
                                  "(--accept-burned-in-risk to ingest)")
    if sector is None:
        sector = fit_sector((mean > 16.0) & ~colour)
    if sector is None:  # nothing bright either: an empty image, nothing to hide
        sector = np.ones(frames.shape[1:], dtype=bool)
    rows, columns = np.flatnonzero(sector.any(1)), np.flatnonzero(sector.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    out, sector, mean, std = frames[:, box[0], box[1]], sector[box], mean[box], std[box]
    out[:, ~sector] = 0
    overlay = (find_still_text(out, sector) if still else find_overlays(mean, std, len(out), sector))
    if overlay.any():
        hole = cv2.dilate(overlay.astype(np.uint8), np.ones((2 * GROW + 1, 2 * GROW + 1), np.uint8)) > 0
        fill_from_neighbourhood(out, hole & sector, sector)
    return out


def fill_from_neighbourhood(frames: np.ndarray, hole: np.ndarray, sector: np.ndarray) -> None:
    """Overwrite ``hole`` pixels of (T, H, W) uint8 ``frames`` with the mean of the known sector pixels around.

    Windows of ``FILL_WINDOWS`` pixels, smallest first: each hole pixel takes, in every frame, the mean over the
    smallest window holding a known pixel (what is left, the sector's mean). Which window serves which pixel is
    worked out once; each frame then costs a box filter per window: linear in the pixels, whatever the hole.
    """
    known = (sector & ~hole).astype(np.float32)
    plan, todo = [], hole.copy()
    for size in FILL_WINDOWS:
        count = cv2.boxFilter(known, -1, (size, size), normalize=False, borderType=cv2.BORDER_CONSTANT)
        ready = todo & (count >= 1.0)
        if ready.any():
            plan.append((size, ready, np.maximum(count, 1.0)))
        todo &= ~ready
        if not todo.any():
            break
    filled = np.zeros(hole.shape, dtype=np.float32)
    for frame in frames:
        values = frame.astype(np.float32) * known
        for size, ready, count in plan:
            total = cv2.boxFilter(values, -1, (size, size), normalize=False, borderType=cv2.BORDER_CONSTANT)
            np.divide(total, count, out=filled, where=ready)
        if todo.any():
            filled[todo] = float(values.sum() / max(float(known.sum()), 1.0))
        np.copyto(frame, np.clip(filled + 0.5, 0, 255).astype(np.uint8), where=hole)


def _temporal_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel temporal mean and standard deviation (float32), 2^22 values (16 MiB as float32) at a time."""
    chunk = max(1, 2**22 // max(1, frames[0].size))
    total = np.zeros(frames.shape[1:], dtype=np.float64)
    squares = np.zeros(frames.shape[1:], dtype=np.float64)
    for start in range(0, len(frames), chunk):
        block = frames[start : start + chunk].astype(np.float32)
        total += block.sum(0)
        squares += np.einsum("thw,thw->hw", block, block)
    mean = total / len(frames)
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / len(frames) - mean**2, 0.0)).astype(np.float32)


def fit_sector(active: np.ndarray) -> np.ndarray | None:
    """The ultrasound sector in an (H, W) activity map: convex hull of its largest connected area.

    Strokes thinner than ``OPEN`` pixels (text, calipers, ECG) are opened away to find that area; the hull is
    then taken over the active pixels within ``OPEN`` pixels of it, so the sector's own thin tips (apex, the
    ends of the arc) stay in. None when no area of at least ``MIN_SECTOR`` pixels is left.
    """
    opened = cv2.morphologyEx(active.astype(np.uint8), cv2.MORPH_OPEN, np.ones((OPEN, OPEN), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < MIN_SECTOR:
        return None
    near = cv2.dilate((labels == largest).astype(np.uint8), np.ones((2 * OPEN + 1, 2 * OPEN + 1), np.uint8))
    area = (near > 0) & active
    hull = np.zeros(active.shape, dtype=np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(area.astype(np.uint8))), 1)
    return hull.astype(bool) | area


def _local_mean(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the ``NEIGHBOURHOOD`` window, counting only ``inside`` pixels."""
    weight = inside.astype(np.float32)
    size = (NEIGHBOURHOOD, NEIGHBOURHOOD)
    total = cv2.boxFilter(values * weight, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
    count = cv2.boxFilter(weight, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
    return total / np.maximum(count, 1.0)


def find_overlays(mean: np.ndarray, std: np.ndarray, frames: int, sector: np.ndarray) -> np.ndarray:
    """(H, W) mask of burned-in overlays inside ``sector`` of a cine: still pixels and strokes (module doc).

    Two passes: the neighbourhood statistics of the second leave out what the first found, so a block of text
    does not shift its own reference (nor make the speckle around it look like an overlay).
    """
    found = np.zeros(sector.shape, dtype=bool)
    reference = sector
    for _ in range(2):
        mean_around, std_around = _local_mean(mean, reference), _local_mean(std, reference)
        contrast = np.abs(mean - mean_around)
        still = (std < np.minimum(STILL_SHARE * std_around, STILL_MAX)) | (
            (std < NEAR_STILL_STD) & (contrast > NEAR_STILL_CONTRAST))
        filled = np.where(sector, mean, mean_around).astype(np.float32)  # no false edge at the sector's border
        stroke = np.abs(filled - cv2.medianBlur(filled, 5))  # a stroke up to 2 pixels wide is under half of 5x5
        noise = std_around / np.sqrt(frames) + 1.0  # what the speckle leaves in a mean of ``frames`` frames
        strokes = (np.maximum(stroke, contrast) > np.maximum(STROKE_Z * noise, STROKE_MIN)) & (
            std < STROKE_STD_SHARE * std_around)  # drawn over the speckle, text dampens it; anatomy does not
        found = _drop_specks((still | strokes) & sector)
        grown = cv2.dilate(found.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        reference = sector & ~grown
        if reference.sum() < MIN_SECTOR:  # overlays everywhere: nothing left to compare with
            return sector.copy()
    return found


def find_still_text(frames: np.ndarray, sector: np.ndarray) -> np.ndarray:
    """(H, W) mask of rendered text in a still image, sampled over up to 8 of ``frames``.

    Flat 2x2 blocks of at least ``FLAT_BRIGHT``, grown into the bright pixels touching them (speckle is never
    flat over 2x2 pixels).
    """
    found = np.zeros(sector.shape, dtype=bool)
    for frame in frames[:: max(1, len(frames) // 8)]:
        low = cv2.erode(frame, np.ones((2, 2), np.uint8), anchor=(0, 0))
        high = cv2.dilate(frame, np.ones((2, 2), np.uint8), anchor=(0, 0))
        seeds = ((low == high) & (low >= FLAT_BRIGHT)).astype(np.uint8)
        grown = cv2.dilate(seeds, np.ones((2, 2), np.uint8), anchor=(1, 1)) > 0
        near = cv2.dilate(grown.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        found |= grown | (near & (frame >= FLAT_BRIGHT))
    return found & sector


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= MIN_OVERLAY)
    return np.isin(labels, keep[keep > 0])


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
