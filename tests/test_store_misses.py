"""The miss list (:func:`evssd.host.misses.miss_order`) against numpy's definition on
random inputs: small tables, rows either side of 2**31 (the packed sort and the indirect one), beyond 2**40 (more radix passes, up to all eight),
empty and all-hit lists."""
import numpy as np
import pytest

from evssd.host.misses import miss_order


def _reference(uniq, slots):
    miss = np.flatnonzero(slots < 0)
    return miss[np.argsort(uniq[miss], kind="stable")]


@pytest.mark.parametrize("seed", range(6))
def test_miss_order_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(0, 600))
        top = [50, 100_000, 2 ** 31 - 1, 2 ** 31 + 1, 2 ** 40, 2 ** 62][int(rng.integers(0, 6))]
        uniq = rng.choice(top, size=min(n, top), replace=False).astype(np.int64)
        p_miss = rng.choice([0.0, 0.3, 1.0])
        slots = np.where(rng.random(uniq.size) < p_miss, -1, rng.integers(0, 1000, uniq.size)).astype(np.int32)
        got = miss_order(uniq, slots)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, _reference(uniq, slots))
        assert np.all(np.diff(uniq[got]) > 0)
