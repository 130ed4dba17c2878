"""Procedural apical-four-chamber (A4C) phantom cohort: patients, visits with known EF, site styles.

The model, in four layers:

- **Anatomy** (:class:`~echoflow.data.phantom_anatomy.Anatomy`, per patient): LV length and septal/lateral
  widths, mitral annulus, wall thickness, RV width and apex height, atrial sizes, the heart's tilt and position
  under the probe, and a myocardial texture seed. It is fixed for a patient and identifies them across visits.
- **Visit** (:class:`Visit`, per video): target EF, heart rate, the frame of end-diastole (phase) and a small
  probe jitter. Each patient has 2-4 visits with different EF, so re-identification has true positives.
- **Motion and EF**: one contraction curve drives everything (ED at exactly ``ed_frame``, ES exactly
  ``systole_frames`` later). The LV cavity is a 20-chord polygon scaled about its apex: length by r^0.2 and
  width by r^0.4 at ES, r = 1 - EF/100, so the area–length volume V = 8A²/(3πL) gives ESV/EDV = r exactly.
  FileList's EF/EDV/ESV are computed from the very tracings written to VolumeTracings.csv. The myocardium
  thickens, the RV shortens with the LV (TAPSE), the atria fill in systole, the AV valves open in diastole.
- **Look and site style** (:mod:`~echoflow.data.phantom_look`): Rayleigh speckle, PSF blur, depth attenuation,
  noise floor, log compression and gain inside a sector fan with its apex at the top; each site draws its own
  gain, fan angle, depth, speckle, blur and noise floor. Apex at the top, LV on the viewer's right, RV left,
  atria at the bottom.

Every random draw comes from a ``numpy.random.Generator`` seeded by (seed, stream, site, patient, visit), so a
video does not depend on what else is generated or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from echoflow.data.echonet import write_avi
from echoflow.data.phantom_anatomy import (
    Anatomy,
    Pose,
    cardiac_cycle,
    heart_echogenicity,
    lv_motion,
    lv_tracing,
    sample_anatomy,
)
from echoflow.data.phantom_look import PixelGrid, SiteStyle, background_reflectivity, sample_site_style, ultrasound_look
from echoflow.errors import EchoFlowError

FPS = 25.0  # frames per second; 32 frames hold a full cycle down to 47 bpm
SPLIT_CUTS = (0.70, 0.85)  # TRAIN | VAL | TEST, by patient
_ANATOMY, _STYLE, _VISIT, _SPLIT = range(4)  # independent random streams


@dataclass(frozen=True)
class Visit:
    """One video of a patient.

    Attributes:
        ef: target ejection fraction, percent (15-80).
        heart_rate: beats per minute (50-110).
        ed_frame: index of the end-diastolic frame; ES is ``ed_frame + systole_frames``.
        systole_frames: systole duration, frames.
        shift: probe jitter of the heart's position (x, y), cm; ``tilt``: jitter of its angle, radians.
        preload: scale of the ED LV cavity on this visit (about 1 ± 0.03).
    """

    ef: float
    heart_rate: float
    ed_frame: int
    systole_frames: int
    shift: tuple[float, float]
    tilt: float
    preload: float


@dataclass(frozen=True)
class PhantomVideo:
    """A rendered visit.

    Attributes:
        frames: (T, H, W) uint8 B-mode cine.
        lv_mask: (T, H, W) bool LV cavity, the traced polygon at pixel centres.
        tracings: ``{frame: (21, 4) float}`` EchoNet rows (X1, Y1, X2, Y2) in pixels for the ES and ED frames;
            row 0 is the long axis, then 20 chords from apex to annulus.
        ed_frame, es_frame: frame indices of end-diastole and end-systole.
        ef: percent; ``edv``, ``esv``: mL, all from the tracings by the area–length method.
    """

    frames: np.ndarray
    lv_mask: np.ndarray
    tracings: dict[int, np.ndarray]
    ed_frame: int
    es_frame: int
    ef: float
    edv: float
    esv: float


def stream_rng(seed: int, stream: int, site: int, patient: int = 0, visit: int = 0) -> np.random.Generator:
    """The generator for one (seed, stream, site, patient, visit); fixed-length keys never collide."""
    return np.random.default_rng([seed, stream, site, patient, visit])


def area_length_volume(tracing: np.ndarray, *, spacing: float = 1.0) -> float:
    """LV volume V = 8A²/(3πL) from an EchoNet tracing (21, 4), in spacing³ units (mL for cm).

    A is the area of the polygon through the chord ends (EchoNet's construction), L the long axis (row 0).
    """
    x = np.concatenate([tracing[1:, 0], tracing[::-1, 2][:-1]]) * spacing
    y = np.concatenate([tracing[1:, 1], tracing[::-1, 3][:-1]]) * spacing
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    length = float(np.hypot(tracing[0, 2] - tracing[0, 0], tracing[0, 3] - tracing[0, 1])) * spacing
    return 8.0 * area**2 / (3.0 * np.pi * length)


def sample_visit(rng: np.random.Generator, *, patient_ef: float, frames: int, fps: float = FPS) -> Visit:
    """Draw a visit: EF around the patient's own, heart rate, and the ED frame so that ES lies in the video."""
    heart_rate = float(rng.uniform(50.0, 110.0))
    systole_frames = max(4, round((0.36 - 0.0012 * (heart_rate - 60.0)) * fps))
    if frames <= systole_frames:
        raise EchoFlowError(f"frames: {frames} frames cannot hold a systole of {systole_frames} frames")
    period = fps * 60.0 / heart_rate
    return Visit(
        ef=float(np.clip(patient_ef + rng.normal(0.0, 6.0), 15.0, 80.0)), heart_rate=heart_rate,
        ed_frame=int(rng.integers(0, min(int(period), frames - 1 - systole_frames) + 1)),
        systole_frames=systole_frames, shift=(float(rng.normal(0.0, 0.15)), float(rng.normal(0.0, 0.15))),
        tilt=float(np.deg2rad(rng.normal(0.0, 1.5))), preload=float(rng.normal(1.0, 0.03)),
    )


def sample_patient_ef(rng: np.random.Generator) -> float:
    """A patient's usual EF, percent: mostly normal (58 ± 8), a fifth with reduced function (15-45)."""
    ef = rng.normal(58.0, 8.0) if rng.random() < 0.8 else rng.uniform(15.0, 45.0)
    return float(np.clip(ef, 15.0, 80.0))


def render_video(anatomy: Anatomy, visit: Visit, style: SiteStyle, *, size: int = 64, frames: int = 32,
                 fps: float = FPS, rng: np.random.Generator) -> PhantomVideo:
    """Render one visit in memory: cine, LV masks, ED/ES tracings and area–length EF.

    Args:
        anatomy: the patient's heart (:func:`sample_anatomy`).
        visit: EF, heart rate and phase of this video (:func:`sample_visit`, drawn for the same ``frames``).
        style: the site's scanner style (:func:`sample_site_style`).
        size: frame height = width, pixels.
        frames: T, frames in the video.
        fps: frames per second.
        rng: draws the speckle and noise (the anatomy, visit and style are already drawn).
    """
    if size < 16 or frames <= visit.ed_frame + visit.systole_frames:
        raise EchoFlowError(f"phantom: size {size} < 16 or {frames} frames miss the ES frame of this visit")
    grid = PixelGrid.square(size, style.depth)
    pose = Pose((anatomy.apex[0] + visit.shift[0], anatomy.apex[1] + visit.shift[1]), anatomy.tilt + visit.tilt)
    contraction, opening = cardiac_cycle(heart_rate=visit.heart_rate, ed_frame=visit.ed_frame,
                                         systole_frames=visit.systole_frames, frames=frames, fps=fps)
    motion = lv_motion(anatomy, ef=visit.ef, contraction=contraction, preload=visit.preload)
    u, v = pose.to_heart(grid.x, grid.y)
    background = background_reflectivity(grid, np.random.default_rng([anatomy.texture_seed, 1]))
    reflectivity, lv_mask = heart_echogenicity(anatomy, motion, u, v, background=background,
                                               contraction=contraction, opening=opening, edge=0.5 * grid.spacing)
    es_frame = visit.ed_frame + visit.systole_frames
    tracings = {}
    for frame in (es_frame, visit.ed_frame):  # EchoNet lists the small (ES) trace first, the large (ED) last
        heart = lv_tracing(motion, frame)
        x1, y1 = grid.to_pixels(*pose.to_image(heart[:, 0], heart[:, 1]))
        x2, y2 = grid.to_pixels(*pose.to_image(heart[:, 2], heart[:, 3]))
        tracings[frame] = np.stack([x1, y1, x2, y2], axis=1)
    edv = area_length_volume(tracings[visit.ed_frame], spacing=grid.spacing)
    esv = area_length_volume(tracings[es_frame], spacing=grid.spacing)
    return PhantomVideo(ultrasound_look(reflectivity, style, grid, rng), lv_mask, tracings, visit.ed_frame,
                        es_frame, 100.0 * (edv - esv) / edv, edv, esv)


def read_lv_masks(video: Path) -> np.ndarray:
    """The LV cavity masks (T, H, W) bool written beside a phantom video (``<site>/LVMasks/<stem>.npz``)."""
    path = video.parent.parent / "LVMasks" / f"{video.stem}.npz"
    try:
        with np.load(path) as data:
            return np.asarray(data["mask"], dtype=bool)
    except (OSError, KeyError, ValueError) as err:
        raise EchoFlowError(f"{path}: no readable LV mask ({err})") from err


def split_of_patients(patients: int, rng: np.random.Generator) -> list[str]:
    """TRAIN/VAL/TEST per patient, about 70/15/15, in a random order."""
    cuts = [round(fraction * patients) for fraction in SPLIT_CUTS]
    labels = ["TRAIN"] * cuts[0] + ["VAL"] * (cuts[1] - cuts[0]) + ["TEST"] * (patients - cuts[1])
    return [labels[i] for i in rng.permutation(patients)]


def write_site(out: Path, *, site: int, patients: int, seed: int, size: int = 64, frames: int = 32,
               first_patient: int = 0, split: str | None = None) -> Path:
    """Write one site's cohort in the EchoNet-Dynamic layout under ``out/site_XX``; returns that folder.

    Patients ``first_patient ...`` (a later number is another patient of the same site style), split about
    70/15/15 TRAIN/VAL/TEST, or all in ``split``. Files: ``Videos/<FileName>.avi``, ``FileList.csv`` (FileName,
    EF, ESV, EDV, FrameHeight, FrameWidth, FPS, NumberOfFrames, Split, PatientID, Site), ``VolumeTracings.csv``
    (FileName with ``.avi``, X1, Y1, X2, Y2, Frame) and ``LVMasks/<FileName>.npz`` (key ``mask``: (T, H, W) bool).
    """
    folder, name = out / f"site_{site:02d}", f"site_{site:02d}"
    style = sample_site_style(stream_rng(seed, _STYLE, site))
    splits = [split] * patients if split else split_of_patients(patients, stream_rng(seed, _SPLIT, site))
    rows, traces = [], []
    for patient in range(first_patient, first_patient + patients):
        rng = stream_rng(seed, _ANATOMY, site, patient)
        anatomy, patient_ef, visits = sample_anatomy(rng), sample_patient_ef(rng), int(rng.integers(2, 5))
        patient_id = f"S{site:02d}P{patient:04d}"
        for index in range(visits):
            rng = stream_rng(seed, _VISIT, site, patient, index)
            visit = sample_visit(rng, patient_ef=patient_ef, frames=frames)
            video = render_video(anatomy, visit, style, size=size, frames=frames, rng=rng)
            file_name = f"{patient_id}V{index}"
            write_avi(folder / "Videos" / f"{file_name}.avi", video.frames, FPS)
            (folder / "LVMasks").mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / "LVMasks" / f"{file_name}.npz", mask=video.lv_mask)
            rows.append({"FileName": file_name, "EF": video.ef, "ESV": video.esv, "EDV": video.edv,
                         "FrameHeight": size, "FrameWidth": size, "FPS": int(FPS), "NumberOfFrames": frames,
                         "Split": splits[patient - first_patient], "PatientID": patient_id, "Site": name})
            for frame, tracing in video.tracings.items():
                traces += [(f"{file_name}.avi", *map(float, row), frame) for row in tracing]
    pd.DataFrame(rows).to_csv(folder / "FileList.csv", index=False)
    pd.DataFrame(traces, columns=["FileName", "X1", "Y1", "X2", "Y2", "Frame"]).to_csv(
        folder / "VolumeTracings.csv", index=False)
    return folder


def generate_cohort(out: Path, *, sites: int, patients_per_site: int, seed: int, size: int = 64,
                    frames: int = 32, first_patient: int = 0, split: str | None = None) -> list[Path]:
    """Write ``sites`` site folders ``out/site_00 ...`` of ``patients_per_site`` patients each; returns them.

    Same arguments -> identical FileList.csv bytes and identical pixels (see :func:`write_site` for the files,
    ``first_patient`` and ``split``).
    """
    if sites < 1 or patients_per_site < 1 or seed < 0:
        raise EchoFlowError(f"phantom: need sites >= 1, patients >= 1, seed >= 0 (got {sites}, "
                            f"{patients_per_site}, {seed})")
    return [write_site(out, site=site, patients=patients_per_site, seed=seed, size=size, frames=frames,
                       first_patient=first_patient, split=split) for site in range(sites)]
