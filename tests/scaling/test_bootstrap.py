"""Bootstrap draws resample whole configurations, then seeds, reproducibly."""

import numpy as np

from scaling import bootstrap


def test_draws_resample_configurations_then_their_seeds():
    ids = np.repeat(np.arange(10), 3)  # ten configurations, three seeds each
    W = bootstrap.cluster_weights(ids, 500, np.random.default_rng(0))
    assert W.shape == (500, 30)
    assert np.all(W.sum(axis=1) == 30)  # as many runs as the data has
    per_config = W.reshape(500, 10, 3).sum(axis=2)
    assert np.all(per_config % 3 == 0)  # a configuration is drawn with all its seed slots
    # A configuration left out leaves all its seeds out; a drawn one resamples its seeds.
    assert np.any(per_config == 0)
    assert np.any((W.reshape(500, 10, 3) == 0) & (per_config[:, :, None] > 0))


def test_draws_are_reproducible_from_the_seed():
    ids = np.arange(12)
    a = bootstrap.cluster_weights(ids, 50, np.random.default_rng(3))
    b = bootstrap.cluster_weights(ids, 50, np.random.default_rng(3))
    c = bootstrap.cluster_weights(ids, 50, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_percentile_interval_ignores_non_finite_draws():
    lo, hi = bootstrap.interval(np.r_[np.arange(101.0), np.nan, np.inf], 0.9)
    assert np.allclose((lo, hi), (5.0, 95.0))
