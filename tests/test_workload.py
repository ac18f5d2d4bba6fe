"""Trace generators: FBGEMM form, seeding, Meta-calibrated reuse, Criteo loading."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evssd.host import workload as wl

STATS_FILE = wl.default_locality_stats_path()
CRITEO = wl.shared_data_dir() / "criteo_sample.txt"


def test_load_locality_stats_reads_every_trace():
    stats = wl.load_locality_stats()
    assert len(stats) == 17
    first = stats[0]
    assert first.name == "fbgemm_t856_bs65536.pt"
    assert (first.n_batches, first.batch_size) == (1, 65536)
    assert first.n_indices == 887017990 and first.n_unique == 128435723
    assert first.avg_reuse == pytest.approx(6.906, abs=1e-3)
    assert first.unique_hist[:4].tolist() == [0.473, 0.152, 0.139, 0.112]
    assert first.lookup_hist[0] == 0.069 and first.lookup_hist[-1] == 0.019
    for s in stats:
        assert s.unique_hist.shape == s.lookup_hist.shape == (17,)
        assert abs(s.unique_hist.sum() - 1) < 0.01 and abs(s.lookup_hist.sum() - 1) < 0.01
    avg = wl.average_locality(stats)
    assert avg.unique_hist.sum() == pytest.approx(1.0)
    assert 0.42 < avg.unique_hist[0] < 0.48


def test_load_locality_stats_malformed(tmp_path):
    good = STATS_FILE.read_text().splitlines()
    bad = list(good)
    bad[7] = "(1, 2]: lots"
    p = tmp_path / "stats.txt"
    p.write_text("\n".join(bad))
    with pytest.raises(ValueError, match=r"stats.txt:8: bad share 'lots'"):
        wl.load_locality_stats(p)
    p.write_text("\n".join(good[:20]))
    with pytest.raises(ValueError, match="stats.txt"):
        wl.load_locality_stats(p)
    p.write_text("not a stats file\n")
    with pytest.raises(ValueError, match=r"stats.txt:1: expected a trace name"):
        wl.load_locality_stats(p)


def _check_fbgemm(batch, batch_size, pooling, n_rows):
    idx, off = batch
    assert idx.dtype == np.int64 and off.dtype == np.int64
    assert off.shape == (batch_size + 1,) and off[0] == 0 and off[-1] == len(idx)
    assert np.all(np.diff(off) == pooling)
    assert idx.min() >= 0 and idx.max() < n_rows


@pytest.mark.parametrize("n_rows, batch_size, pooling", [(1_000_000, 512, 20), (200_000, 2048, 8)])
def test_meta_calibrated_matches_the_histogram(n_rows, batch_size, pooling):
    target = wl.average_locality(wl.load_locality_stats())
    hists = []
    for batch in wl.meta_calibrated(n_rows, batch_size, pooling, seed=3, n_batches=8):
        _check_fbgemm(batch, batch_size, pooling, n_rows)
        uh, _ = wl.reuse_histogram(batch.indices)
        hists.append(uh)
        n_unique = len(np.unique(batch.indices))
        assert n_unique == round(batch_size * pooling / target.avg_reuse)
        # per batch, each bin within 0.01 of the file (rows of the first bins within 1/U)
        assert np.abs(uh - target.unique_hist).max() < 0.01
    mean = np.mean(hists, axis=0)
    assert np.abs(mean - target.unique_hist).max() < 0.005
    assert mean[0] == pytest.approx(target.unique_hist[0], abs=0.003)   # ~43% touched once


def test_meta_calibrated_has_cross_batch_reuse_and_is_seeded():
    a = list(wl.meta_calibrated(500_000, 512, 20, seed=7, n_batches=4))
    b = list(wl.meta_calibrated(500_000, 512, 20, seed=7, n_batches=4))
    c = list(wl.meta_calibrated(500_000, 512, 20, seed=8, n_batches=1))
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b))
    assert not np.array_equal(a[0].indices, c[0].indices)
    # the rows carrying most lookups in batch 0 come back in batch 1
    rows0, cnt0 = np.unique(a[0].indices, return_counts=True)
    hot0 = rows0[cnt0 >= 8]
    share_back = np.isin(hot0, a[1].indices).mean()
    assert share_back > 0.6
    # while rows touched once mostly do not
    once0 = rows0[cnt0 == 1]
    assert np.isin(once0, a[1].indices).mean() < 0.3


def test_zipf_and_uniform():
    n = 10_000
    zs = list(wl.zipf(n, 1.2, 256, 10, seed=1, n_batches=5))
    us = list(wl.uniform(n, 256, 10, seed=1, n_batches=5))
    for b in zs + us:
        _check_fbgemm(b, 256, 10, n)
    z = np.concatenate([b.indices for b in zs])
    u = np.concatenate([b.indices for b in us])
    _, zc = np.unique(z, return_counts=True)
    _, uc = np.unique(u, return_counts=True)
    # Zipf 1.2: the hottest row is rank 0, weight 1/H(n, 1.2) of all lookups
    h = np.sum(np.arange(1, n + 1, dtype=float) ** -1.2)
    assert zc.max() / len(z) == pytest.approx(1 / h, rel=0.1)
    assert uc.max() / len(u) < 0.002
    assert np.array_equal(next(wl.zipf(n, 1.2, 256, 10, seed=1)).indices, zs[0].indices)
    assert sum(1 for _ in wl.uniform(5, 1, 1, n_batches=3)) == 3


@pytest.mark.parametrize("call, match", [
    (lambda: next(wl.uniform(0, 4, 4)), "n_rows .* 0"),
    (lambda: next(wl.zipf(10, -1.0, 4, 4)), "alpha .* -1.0"),
    (lambda: next(wl.meta_calibrated(10, 0, 4)), "batch_size .* 0"),
    (lambda: next(wl.meta_calibrated(10, 4, 2.5)), "pooling_factor .* 2.5"),
])
def test_generator_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_load_criteo_sample():
    data = wl.load_criteo(CRITEO, rows_per_table=1000)
    assert len(data) == 200
    assert data.dense.shape == (200, 13) and data.dense.dtype == np.float32
    assert data.indices.shape == (26, 200) and data.indices.dtype == np.int64
    assert set(np.unique(data.labels).tolist()) <= {0.0, 1.0}
    # first row: 0,,3,260.0,,17668.0,... C1=05db9164
    assert data.labels[0] == 0
    assert data.dense[0, 0] == 0.0
    assert data.dense[0, 1] == pytest.approx(math.log1p(3))
    assert data.dense[0, 4] == pytest.approx(math.log1p(17668.0))
    assert data.indices[0, 0] == int("05db9164", 16) % 1000
    # second row has I2 = -1: clamped to 0
    assert data.dense[1, 1] == 0.0
    # C19 of row 0 is empty -> row 0
    assert data.indices[18, 0] == 0
    assert data.indices.max() < 1000 and data.indices.min() >= 0
    assert np.array_equal(data.offsets, np.arange(201))
    few = wl.load_criteo(CRITEO, n_tables=3, rows_per_table=[10, 20, 30])
    assert few.indices.shape == (3, 200)
    assert few.indices[1].max() < 20 and few.indices[2, 0] == int("9143c832", 16) % 30


def test_load_criteo_malformed(tmp_path):
    lines = CRITEO.read_text().splitlines()
    p = tmp_path / "crit.txt"
    p.write_text("\n".join(lines[:3] + [lines[3].replace(",", ";", 1)] + lines[4:6]) + "\n")
    with pytest.raises(ValueError, match=r"crit.txt:4: expected 40 fields"):
        wl.load_criteo(p)
    fields = lines[2].split(",")
    fields[14] = "xyz!"
    p.write_text("\n".join(lines[:2] + [",".join(fields)]) + "\n")
    with pytest.raises(ValueError, match=r"crit.txt:3: C1 = 'xyz!'"):
        wl.load_criteo(p)
    fields = lines[1].split(",")
    fields[3] = "abc"
    p.write_text("\n".join([lines[0], ",".join(fields)]) + "\n")
    with pytest.raises(ValueError, match=r"crit.txt:2: I3 = 'abc'"):
        wl.load_criteo(p)
    p.write_text("a,b,c\n")
    with pytest.raises(ValueError, match=r"crit.txt:1: expected the header"):
        wl.load_criteo(p)
    with pytest.raises(ValueError, match="n_tables .* 27"):
        wl.load_criteo(CRITEO, n_tables=27)
