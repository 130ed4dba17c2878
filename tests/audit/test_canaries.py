import numpy as np

from echoflow.audit import dcr_stats, plant_canaries


def test_canaries_are_planted_tracked_and_scored() -> None:
    rng = np.random.default_rng(0)
    generated = rng.uniform(-1, 1, (30, 1, 16, 16)).astype(np.float32)
    real = rng.uniform(-1, 1, (40, 1, 16, 16)).astype(np.float32)
    mixed, plan = plant_canaries(generated, real, n=10, seed=1)
    assert mixed.shape == (40, 1, 16, 16)
    np.testing.assert_array_equal(mixed[plan.generated_mask()], generated)
    for pos, src, name in zip(plan.positions, plan.source_ids, plan.transforms, strict=True):
        frame, orig = mixed[pos], real[src]
        assert frame.min() >= -1 and frame.max() <= 1
        if name == "exact":
            np.testing.assert_array_equal(frame, orig)
        elif name == "mirror":
            np.testing.assert_array_equal(frame, orig[..., ::-1])
        elif name == "shift":  # equals the original moved by 1-3 pixels, uncovered border black
            moves = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                     if np.array_equal(frame[..., 3:-3, 3:-3], orig[..., 3 - dy : 13 - dy, 3 - dx : 13 - dx])]
            assert len(moves) == 1 and moves[0] != (0, 0) and (frame == -1).any()
        else:
            assert 0 < np.abs(frame - orig).mean() < 0.5
    withheld = np.zeros(40, dtype=bool)
    withheld[plan.positions[:7]] = True
    score = plan.score(withheld)
    assert score["all"] == (7, 10) and sum(p for t, (c, p) in score.items() if t != "all") == 10


def test_dcr_share() -> None:
    stats = dcr_stats(np.array([0.9, 0.5, 0.7, 0.2]), np.array([0.1, 0.6, 0.3, 0.3]), n_train=100, n_heldout=100)
    assert stats.share_closer_to_train == 0.5 and stats.expected_share == 0.5
