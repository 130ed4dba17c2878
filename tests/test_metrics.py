import numpy as np

from echoflow.study.evaluate import frechet_distance, regression


def test_regression_perfect_and_shifted() -> None:
    truth = np.linspace(20, 75, 50)
    perfect = regression(truth, truth)
    assert perfect.mae == 0 and perfect.r2 == 1
    shifted = regression(truth, truth + 3)
    assert abs(shifted.mae - 3) < 1e-9 and abs(shifted.rmse - 3) < 1e-9
    noisy = regression(truth, truth + np.random.default_rng(0).normal(0, 5, 50))
    assert noisy.mae_ci[0] < noisy.mae < noisy.mae_ci[1]


def test_frechet_distance_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(2, 1, (20000, 3))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, b) - 12.0) < 0.3  # |mu|^2 = 3 * 2^2, equal covariances
