"""Phantom anatomy and motion: the four chambers of an apical four-chamber view, in centimetres.

Heart frame: origin at the LV cavity apex; ``v`` runs along the LV long axis towards the mitral annulus (down the
image), ``u`` across it towards the LV lateral wall (the viewer's right). The LV cavity is a polygon: 20 chords
perpendicular to the long axis (EchoNet's VolumeTracings layout), so its raster mask, its tracing and its
area–length volume all describe the same shape. The RV hangs on the left of the septum, the atria below the
valve planes, split by the interatrial septum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_CHORDS = 20  # chords per traced frame, as in EchoNet-Dynamic's VolumeTracings.csv
TAU = np.linspace(0.0, 1.0, N_CHORDS)  # chord positions along the LV long axis: 0 apex, 1 mitral annulus
BLOOD, MYOCARDIUM, PERICARDIUM, VALVE = 0.006, 0.7, 1.0, 1.1  # reflectivity before the ultrasound look


@dataclass(frozen=True)
class Anatomy:
    """A patient's fixed heart (cm, radians); it identifies the patient across visits.

    Attributes:
        lv_length: LV cavity long axis at end-diastole (ED), apex to mitral annulus midpoint, cm.
        lv_septal: LV cavity's largest half-width on the septal side at ED, cm.
        lv_lateral: LV cavity's largest half-width on the lateral side at ED, cm.
        annulus: mitral annulus half-width, cm.
        equator: where the LV is widest, fraction of the long axis from the apex (0-1).
        wall: LV wall and septum thickness at ED, cm.
        rv_width: RV cavity's largest width at ED, cm.
        rv_apex: RV apex depth below the LV apex, fraction of ``lv_length``.
        la_axes: left atrium (lateral, axial) semi-axes at ED, cm; ``ra_axes`` the same for the right atrium.
        tilt: long-axis angle from vertical, radians (positive: the base leans to the viewer's right).
        apex: LV apex position (x right of the probe, y depth), cm.
        texture_seed: seed of the myocardial texture, which moves with the heart.
    """

    lv_length: float
    lv_septal: float
    lv_lateral: float
    annulus: float
    equator: float
    wall: float
    rv_width: float
    rv_apex: float
    la_axes: tuple[float, float]
    ra_axes: tuple[float, float]
    tilt: float
    apex: tuple[float, float]
    texture_seed: int


@dataclass(frozen=True)
class Pose:
    """Where the heart sits in one video: the anatomy's pose plus the visit's probe jitter (cm, radians)."""

    apex: tuple[float, float]
    tilt: float

    def to_heart(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates (cm from the probe) -> heart coordinates ``(u, v)``, same shapes."""
        dx, dy = x - self.apex[0], y - self.apex[1]
        cos, sin = np.cos(self.tilt), np.sin(self.tilt)
        return dx * cos - dy * sin, dx * sin + dy * cos

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart coordinates ``(u, v)`` -> image coordinates (cm from the probe)."""
        cos, sin = np.cos(self.tilt), np.sin(self.tilt)
        return self.apex[0] + u * cos + v * sin, self.apex[1] - u * sin + v * cos


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's heart from adult ranges (LV 7-9 cm long, EDV roughly 80-170 mL)."""
    lv_septal = float(rng.uniform(2.0, 2.5))
    return Anatomy(
        lv_length=float(rng.uniform(7.0, 9.0)), lv_septal=lv_septal,
        lv_lateral=lv_septal * float(rng.uniform(1.0, 1.2)), annulus=float(rng.uniform(1.4, 1.8)),
        equator=float(rng.uniform(0.55, 0.7)), wall=float(rng.uniform(0.8, 1.2)),
        rv_width=float(rng.uniform(2.4, 3.3)), rv_apex=float(rng.uniform(0.2, 0.35)),
        la_axes=(float(rng.uniform(1.9, 2.4)), float(rng.uniform(2.6, 3.4))),
        ra_axes=(float(rng.uniform(1.6, 2.1)), float(rng.uniform(2.4, 3.2))),
        tilt=float(np.deg2rad(rng.uniform(5.0, 14.0))),
        apex=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(1.5, 2.3))),
        texture_seed=int(rng.integers(2**31)),
    )


def lv_profile(anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """ED half-widths (septal, lateral) of the LV cavity at the chords ``TAU``, each (N_CHORDS,) cm.

    An elliptic cap from the apex to the equator, then a quadratic taper to the mitral annulus.
    """
    eq = anatomy.equator
    cap = np.sqrt(np.clip(1.0 - ((eq - TAU) / eq) ** 2, 0.0, 1.0))
    taper = ((TAU - eq) / (1.0 - eq)) ** 2
    widths = []
    for largest in (anatomy.lv_septal, anatomy.lv_lateral):
        widths.append(np.where(TAU <= eq, largest * cap, largest + (anatomy.annulus - largest) * taper))
    return widths[0], widths[1]


def cardiac_cycle(
    *, heart_rate: float, ed_frame: int, systole_frames: int, frames: int, fps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Contraction and valve opening per frame, each (T,) in [0, 1].

    Contraction is 0 at end-diastole (exactly at ``ed_frame``) and 1 at end-systole (exactly at
    ``ed_frame + systole_frames``); filling ends two thirds into diastole (diastasis). AV valves open in diastole.
    """
    period = fps * 60.0 / heart_rate
    since_ed = np.mod(np.arange(frames) - ed_frame, period)
    diastole = np.clip((since_ed - systole_frames) / (period - systole_frames), 0.0, 1.0)
    contraction = np.where(
        since_ed < systole_frames,
        0.5 - 0.5 * np.cos(np.pi * since_ed / systole_frames),
        0.5 + 0.5 * np.cos(np.pi * np.clip(diastole / 0.67, 0.0, 1.0)),
    )
    opening = np.where(since_ed < systole_frames, 0.0, np.sin(np.pi * diastole) ** 0.5)
    return contraction, opening


@dataclass(frozen=True)
class LVMotion:
    """The LV cavity over a video: the ED polygon scaled about the apex, per frame.

    Attributes:
        septal, lateral: ED half-widths at the chords ``TAU``, (N_CHORDS,) cm.
        length: long axis per frame, (T,) cm; ``width``: half-width scale per frame, (T,).
    """

    septal: np.ndarray
    lateral: np.ndarray
    length: np.ndarray
    width: np.ndarray


def lv_motion(anatomy: Anatomy, *, ef: float, contraction: np.ndarray, preload: float = 1.0) -> LVMotion:
    """Shorten and narrow the LV so that ESV/EDV = 1 - ef/100 exactly under the area–length method.

    V = 8A²/(3πL) with A ∝ length·width gives V ∝ length·width²; a fifth of the volume change is longitudinal.
    ``preload`` scales the whole ED cavity (a visit's filling state, about 1 ± 0.03).
    """
    ratio = 1.0 - ef / 100.0
    length_es, width_es = ratio**0.2, ratio**0.4
    septal, lateral = lv_profile(anatomy)
    return LVMotion(septal * preload, lateral * preload,
                    preload * anatomy.lv_length * (1.0 - (1.0 - length_es) * contraction),
                    1.0 - (1.0 - width_es) * contraction)


def lv_tracing(motion: LVMotion, frame: int) -> np.ndarray:
    """EchoNet tracing of one frame in heart coordinates, (1 + N_CHORDS, 4) rows of (u1, v1, u2, v2), cm.

    Row 0 is the long axis (apex to annulus midpoint); the chords follow from apex to annulus, septal end first.
    """
    v = TAU * motion.length[frame]
    scale = motion.width[frame]
    chords = np.stack([-motion.septal * scale, v, motion.lateral * scale, v], axis=1)
    axis = np.array([[0.0, 0.0, 0.0, motion.length[frame]]])
    return np.concatenate([axis, chords])


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """Inside-ness of a signed distance (negative inside): 1 inside, 0 outside, a linear ramp ``2·edge`` wide."""
    return np.clip(0.5 - distance / (2.0 * edge), 0.0, 1.0)


def _segment_glow(u: np.ndarray, v: np.ndarray, start: tuple[np.ndarray, np.ndarray],
                  end: tuple[np.ndarray, np.ndarray], width: float) -> np.ndarray:
    """Brightness of a line segment (a valve leaflet) per pixel, 1 on the segment; endpoints (T,) each."""
    su, sv = start[0][:, None, None], start[1][:, None, None]
    du, dv = end[0][:, None, None] - su, end[1][:, None, None] - sv
    t = np.clip(((u - su) * du + (v - sv) * dv) / (du**2 + dv**2 + 1e-9), 0.0, 1.0)
    return np.clip(1.0 - np.hypot(u - su - t * du, v - sv - t * dv) / width, 0.0, 1.0)


def _leaflets(u: np.ndarray, v: np.ndarray, hinges: tuple[np.ndarray, np.ndarray], depth: np.ndarray,
              opening: np.ndarray, width: float) -> np.ndarray:
    """Two AV-valve leaflets hinged at u = hinges at heart depth ``depth`` (all (T,)); open ones point apically."""
    half = 0.5 * (hinges[1] - hinges[0])
    glow = np.zeros_like(u)
    for hinge, side in ((hinges[0], 1.0), (hinges[1], -1.0)):
        angle = opening * np.deg2rad(75.0)  # 0: closed across the annulus, 75°: open towards the apex
        tip = (hinge + side * half * np.cos(angle), depth - half * np.sin(angle) - 0.15)
        glow = np.maximum(glow, _segment_glow(u, v, (hinge, depth), tip, width))
    return glow


def _right_heart(anatomy: Anatomy, septum: np.ndarray, length: np.ndarray, u: np.ndarray, v: np.ndarray,
                c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances (cm, negative inside) of the RV cavity and its epicardium, each (T, H, W).

    The RV's septal side is the LV's septal epicardium ``septum``; it shares the long-axis shortening (TAPSE).
    """
    top, base = anatomy.rv_apex * anatomy.lv_length, 0.95 * length
    tau = np.clip((v - top) / (base - top), 0.0, 1.0)
    shape = np.where(tau < 0.6, np.sqrt(np.clip(1.0 - ((0.6 - tau) / 0.6) ** 2, 0.0, 1.0)),
                     1.0 - 0.25 * ((tau - 0.6) / 0.4) ** 2)
    free_wall = septum - anatomy.rv_width * (1.0 - 0.3 * c) * shape
    cavity = np.maximum(np.maximum(free_wall - u, u - septum), np.maximum(top - v, v - base))
    epi = np.maximum(np.maximum(free_wall - 0.45 - u, u - septum), np.maximum(top - 0.45 - v, v - base))
    return cavity, epi


def _atria(anatomy: Anatomy, length: np.ndarray, u: np.ndarray, v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Signed distance (cm) of both atrial cavities, (T, H, W); they fill while the ventricles contract.

    Each atrium is a half-ellipse hanging from its valve plane; the interatrial septum (0.4 cm) continues the
    interventricular one.
    """
    septum = -anatomy.annulus - 0.5 * anatomy.wall
    atria = []
    for axes, centre, top, side in ((anatomy.la_axes, 0.3, length + 0.25, 1.0),
                                    (anatomy.ra_axes, septum - anatomy.ra_axes[0], 0.95 * length + 0.25, -1.0)):
        a_u, a_v = axes[0] * (1.0 + 0.1 * c), axes[1] * (1.0 + 0.25 * c)
        radius = np.sqrt(((u - centre) / a_u) ** 2 + ((v - top) / a_v) ** 2)
        ellipse = np.maximum((radius - 1.0) * np.minimum(a_u, a_v), top - v)
        atria.append(np.maximum(ellipse, side * (septum - u) + 0.2))
    return np.minimum(atria[0], atria[1])


def _texture(seed: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The patient's myocardial texture on heart coordinates: six plane waves of 1-3 cm, mean 0, about ±2."""
    rng = np.random.default_rng(seed)
    waves, phases = rng.normal(0.0, 2.5, (6, 2)), rng.uniform(0.0, 2.0 * np.pi, 6)
    texture = np.zeros(np.broadcast_shapes(u.shape, v.shape))
    for (k_u, k_v), phase in zip(waves, phases, strict=True):
        texture += np.cos(k_u * u + k_v * v + phase)
    return texture


def _wall(anatomy: Anatomy, width: np.ndarray) -> np.ndarray:
    """LV wall and septum thickness for an LV width scale (1 at ED), cm: the myocardium thickens in systole."""
    return anatomy.wall * (1.0 + 1.5 * (1.0 - width))


def _valve_planes(anatomy: Anatomy, motion: LVMotion,
                  contraction: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Mitral and tricuspid annuli per frame: (left hinge u, right hinge u, depth v), each (T,) cm."""
    mitral_septal = -motion.septal[-1] * motion.width
    tricuspid_septal = mitral_septal - _wall(anatomy, motion.width)
    tricuspid_free = tricuspid_septal - 0.75 * anatomy.rv_width * (1.0 - 0.3 * contraction)
    return [(mitral_septal, motion.lateral[-1] * motion.width, motion.length),
            (tricuspid_free, tricuspid_septal, 0.95 * motion.length)]


def heart_echogenicity(anatomy: Anatomy, motion: LVMotion, u: np.ndarray, v: np.ndarray, *,
                       background: np.ndarray, contraction: np.ndarray, opening: np.ndarray,
                       edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue reflectivity and the LV cavity mask on heart coordinates ``u, v`` (1, H, W), cm.

    Args:
        anatomy: the patient's heart.
        motion: the LV cavity over the video (:func:`lv_motion`).
        u: heart coordinate across the long axis, (1, H, W) cm.
        v: heart coordinate along the long axis, (1, H, W) cm.
        background: reflectivity around the heart, broadcastable to (T, H, W).
        contraction: (T,) from :func:`cardiac_cycle`.
        opening: (T,) AV-valve opening from :func:`cardiac_cycle`.
        edge: soft-edge width, cm (about half a pixel).

    Returns:
        echogenicity (T, H, W) float (blood ``BLOOD``, myocardium about ``MYOCARDIUM``, valves ``VALVE``) and the
        LV cavity mask (T, H, W) bool: the traced polygon at pixel centres.
    """
    c = contraction[:, None, None]
    length, scale = motion.length[:, None, None], motion.width[:, None, None]
    tau = v / length
    septal, lateral = np.interp(tau, TAU, motion.septal) * scale, np.interp(tau, TAU, motion.lateral) * scale
    lv = np.maximum(np.maximum(-septal - u, u - lateral), np.maximum(-v, v - length))
    wall = _wall(anatomy, scale)
    epi = np.maximum(np.maximum(-septal - wall - u, u - lateral - wall), np.maximum(-v - wall, v - length))
    rv, rv_epi = _right_heart(anatomy, -septal - wall, length, u, v, c)
    atria = _atria(anatomy, length, u, v, c)

    heart = np.minimum(np.minimum(epi, rv_epi), atria - 0.3)
    tissue, pericardium = _soft(heart, edge), _soft(heart - 0.2, edge)
    cavity = np.maximum(np.maximum(_soft(lv, edge), _soft(rv, edge)), _soft(atria, edge))
    leaflets = np.zeros_like(cavity)
    for left, right, depth in _valve_planes(anatomy, motion, contraction):
        lo, hi, at = left[:, None, None], right[:, None, None], depth[:, None, None]
        orifice = np.maximum(np.maximum(lo - u, u - hi), np.maximum(at - 0.3 - v, v - at - 0.35))
        cavity = np.maximum(cavity, _soft(orifice, edge))  # ventricle and atrium meet; the leaflets divide them
        leaflets = np.maximum(leaflets, _leaflets(u, v, (left, right), depth, opening, 0.12 + edge))
    myocardium = MYOCARDIUM * (1.0 + 0.08 * _texture(anatomy.texture_seed, u, v))
    echo = background + pericardium * (PERICARDIUM - background)
    echo = echo + tissue * (myocardium - echo)
    echo = echo + cavity * (BLOOD - echo)
    return np.maximum(echo, VALVE * leaflets), lv <= 0.0
