"""The LV segmenter, an EF meter independent of the EF regressor: area–length EF from masks, and a trained meter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from echoflow.data.phantom import generate_cohort, read_lv_masks, render_video, sample_visit
from echoflow.data.phantom_anatomy import sample_anatomy
from echoflow.data.phantom_look import sample_site_style
from echoflow.data.sites import load_sites
from echoflow.errors import EchoFlowError
from echoflow.models.segmenter import (
    LVSegmenter,
    area_length_volumes,
    augment_frames,
    ef_from_volumes,
    segmentation_loss,
)
from echoflow.study.meter import fit_segmenter


def test_area_length_ef_of_the_phantom_masks_is_the_phantom_ef() -> None:
    """The meter's read-out on perfect masks: the phantom's own EF, to within 2 points, over the EF range."""
    rng = np.random.default_rng(7)
    anatomy, style = sample_anatomy(rng), sample_site_style(rng)
    for target in (20.0, 45.0, 70.0):
        video = render_video(anatomy, sample_visit(rng, patient_ef=target, frames=32), style, frames=32, rng=rng)
        ef = float(ef_from_volumes(area_length_volumes(torch.from_numpy(video.lv_mask))))
        assert abs(ef - video.ef) < 2.0, (ef, video.ef)


def test_volume_is_area_squared_over_length_and_ef_compares_the_extremes() -> None:
    mask = torch.zeros(2, 20, 20)
    mask[0, 2:18, 8:12] = 1  # 16 x 4 rectangle: A = 64, L = 16
    mask[1, 4:16, 8:11] = 1  # 12 x 3: A = 36, L = 12
    volumes = area_length_volumes(mask)
    expected = torch.tensor([8 * 64**2 / (3 * np.pi * 16), 8 * 36**2 / (3 * np.pi * 12)])
    assert torch.allclose(volumes, expected.float(), rtol=1e-4)
    assert float(ef_from_volumes(volumes)) == pytest.approx(100 * (1 - expected[1] / expected[0]), rel=1e-4)
    assert float(ef_from_volumes(area_length_volumes(torch.zeros(3, 8, 8)))) == 0.0  # no cavity anywhere


def test_segmenter_maps_frames_to_mask_logits_and_clips_to_one_ef_each() -> None:
    net = LVSegmenter(channels=(8, 16))
    assert net(torch.zeros(3, 1, 32, 32)).shape == (3, 1, 32, 32)
    assert net.ef(torch.zeros(2, 1, 5, 32, 32)).shape == (2,)
    with pytest.raises(EchoFlowError, match="clips"):
        net.ef(torch.zeros(2, 5, 32, 32))
    with pytest.raises(EchoFlowError, match="divisible"):
        net(torch.zeros(1, 1, 33, 33))


def test_loss_is_lower_for_the_right_mask_and_augmentation_keeps_range() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    assert segmentation_loss(20 * (2 * masks - 1), masks) < 0.1 < segmentation_loss(-20 * (2 * masks - 1), masks)
    frames = torch.rand(4, 1, 16, 16) * 2 - 1
    out = augment_frames(frames, torch.Generator().manual_seed(0))
    assert out.shape == frames.shape and out.min() >= -1 and out.max() <= 1 and not torch.equal(out, frames)


def test_missing_lv_masks_are_a_readable_error(tmp_path: Path) -> None:
    with pytest.raises(EchoFlowError, match="no readable LV mask"):
        read_lv_masks(tmp_path / "Videos" / "x.avi")


@pytest.mark.slow
def test_trained_segmenter_reads_ef_of_held_out_real_clips_within_3_points(tmp_path: Path) -> None:
    """Trained on one cohort's masks, read on an unseen cohort (other patients, another site style).

    Clips are 16 frames at 12.5 fps (every 2nd of the 25-fps cine), as the video flow generates them. The
    benchmark ``benchmarks/ef_following.py`` trains the same meter longer on more data (its ``meter`` field).
    """
    torch.set_num_threads(1)
    train = load_sites(generate_cohort(tmp_path / "a", sites=3, patients_per_site=5, seed=3),
                       size=64, splits=("TRAIN", "VAL", "TEST"))
    frames = np.concatenate([v for site in train for v in site.videos])
    masks = np.concatenate([read_lv_masks(r.path) for site in train for r in site.records])
    net = fit_segmenter(frames, masks, steps=400, batch_size=16, seed=0)  # 1/3 of the default's work
    test = load_sites(generate_cohort(tmp_path / "b", sites=1, patients_per_site=8, seed=11),
                      size=64, splits=("TRAIN", "VAL", "TEST"))[0]
    clips = torch.stack([torch.from_numpy(v[0:31:2]).float().div(127.5).sub(1) for v in test.videos]).unsqueeze(1)
    error = np.abs(net.ef(clips).numpy() - np.array([r.ef for r in test.records]))
    assert error.mean() < 3.0 and np.mean(error < 3.0) >= 0.8, error.round(1)
