"""The pooling definition (evssd.host.pooling): the numba kernels against slow references built
from the bit-level adder model, per-sample weights, and FBGEMM's row-wise INT8 inference TBE."""
from __future__ import annotations

import numpy as np
import pytest

from evssd.host import pooling as P
from evssd.host.elements import ELEMS
from evssd.host.store import EmbeddingStore, RowwiseInt8, StoreInputError, quantize_rowwise_int8


def ref_fp32(rows_f32_bits, idx, offs, weights=None):
    """Sequential bag sum from -0.0 with the gateware adder's bit model (weighted: one-rounding fma,
    :func:`pooling.fma32_model`); empty bag +0.0; NaN canonical."""
    dim = rows_f32_bits.shape[1]
    out = np.zeros((len(offs) - 1, dim), np.uint32)
    for b in range(len(offs) - 1):
        acc = np.full(dim, 0x8000_0000, np.uint32)
        for k in range(offs[b], offs[b + 1]):
            x = rows_f32_bits[idx[k]]
            if weights is not None:
                acc = P.fma32_model(weights[k], x.view(np.float32), acc.view(np.float32)).view(np.uint32)
            else:
                acc = P.fp32_add_bits(acc, x)
        out[b] = P.canonicalize_nan(acc.view(np.float32)).view(np.uint32) if offs[b + 1] > offs[b] else 0
    return out


def special_fp32(rng, rows, dim):
    t = rng.standard_normal((rows, dim)).astype(np.float32)
    bits = t.view(np.uint32)
    bits[0] = 0x8000_0000                       # -0.0
    bits[1, 0], bits[1, 1] = 0x7FC0_1234, 0xFF80_0001  # NaN payloads (quiet, signalling)
    bits[2, 0], bits[3, 0] = 0x7F80_0000, 0xFF80_0000  # +inf, -inf
    bits[4] = 0x0000_0001                       # smallest subnormal
    bits[5] = 0x8070_0000                       # negative subnormal
    bits[6] = 0x7F7F_FFFF                       # max finite (overflow in a sum)
    return t


@pytest.mark.parametrize("parallel", [False, True])
def test_fp32_kernel_equals_adder_model(parallel):
    rng = np.random.default_rng(3)
    t = special_fp32(rng, 40, 7)
    idx = rng.integers(0, 40, 300)
    offs = np.concatenate([[0], np.sort(rng.integers(0, 301, 60)), [300]])
    got = P.pool(t, "fp32", idx, offs, parallel=parallel).view(np.uint32)
    np.testing.assert_array_equal(got, ref_fp32(t.view(np.uint32), idx, offs))
    w = rng.standard_normal(300).astype(np.float32)
    w[:5] = [-0.0, np.inf, 1e-30, -1.0, np.nan]
    gotw = P.pool(t, "fp32", idx, offs, per_sample_weights=w, parallel=parallel).view(np.uint32)
    np.testing.assert_array_equal(gotw, ref_fp32(t.view(np.uint32), idx, offs, w))


def test_one_row_bags_keep_the_row():
    t = special_fp32(np.random.default_rng(0), 8, 3)
    got = P.pool(t, "fp32", np.arange(8), np.arange(9)).view(np.uint32)
    want = t.view(np.uint32).copy()
    want[np.isnan(t)] = P.CANONICAL_NAN
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == 0x8000_0000 and got[1, 0] == got[1, 1] == P.CANONICAL_NAN


def test_every_fp16_value_widens_exactly():
    h = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    got = P.pool(h, "fp16", np.arange(65536), np.arange(65537)).view(np.uint32).ravel()
    want = P.fp16_to_fp32_bits(np.arange(65536, dtype=np.uint16))
    want[np.isnan(h.ravel())] = P.CANONICAL_NAN
    np.testing.assert_array_equal(got, want)


def test_int_sums_wrap_and_weights_convert():
    i32 = np.array([[2**31 - 1, -2**31], [1, -1], [2**24 + 1, 3]], np.int32)
    np.testing.assert_array_equal(P.pool(i32, "int32", [0, 1], [0, 2]), [[-2**31, 2**31 - 1]])
    i8 = np.array([[127, -128], [1, -1]], np.int8)
    np.testing.assert_array_equal(P.pool(i8, "int8", [0, 1, 0], [0, 3]), [[255, -257]])
    w = np.array([0.5, 2.0], np.float32)
    got = P.pool(i32, "int32", [2, 1], [0, 2], per_sample_weights=w)
    # int32 -> fp32 rounds 2**24+1 to 2**24 (RNE) before the weight
    np.testing.assert_array_equal(got, [[np.float32(2**23) + np.float32(2.0), np.float32(1.5) - np.float32(2.0)]])
    assert got.dtype == np.float32


def test_empty_bags_are_positive_zero_and_errors_name_the_argument():
    t = np.full((4, 2), -0.0, np.float32)
    got = P.pool(t, "fp32", [1], [0, 0, 1, 1])
    np.testing.assert_array_equal(got.view(np.uint32), [[0, 0], [0x8000_0000] * 2, [0, 0]])
    with pytest.raises(P.PoolingError, match="index 4 at position 1"):
        P.pool(t, "fp32", [0, 4], [0, 2])
    with pytest.raises(P.PoolingError, match="offsets not monotonic at position 2"):
        P.pool(t, "fp32", [0, 1], [0, 2, 1, 2])
    with pytest.raises(P.PoolingError, match="per_sample_weights need mode='sum'"):
        P.pool(t, "fp32", [0], [0, 1], per_sample_weights=[1.0], mode="mean")
    with pytest.raises(P.PoolingError, match="one weight per index"):
        P.pool(t, "fp32", [0], [0, 1], per_sample_weights=[1.0, 2.0])


def ref_rowwise(raw, idx, offs, weights=None):
    """FBGEMM's order: acc = fma(scale, q, acc + bias) from -0.0, computed exactly in float64."""
    with np.errstate(all="ignore"):
        return _ref_rowwise(raw, idx, offs, weights)


def _ref_rowwise(raw, idx, offs, weights):
    dim = raw.shape[1] - 4
    out = np.zeros((len(offs) - 1, dim), np.float32)
    for b in range(len(offs) - 1):
        acc = np.full(dim, -0.0, np.float32)
        for k in range(offs[b], offs[b + 1]):
            r = raw[idx[k]]
            s = np.float32(r[0:2].view(np.float16)[0])
            c = np.float32(r[2:4].view(np.float16)[0])
            if weights is not None:
                s, c = np.float32(s * weights[k]), np.float32(c * weights[k])
            acc = P.fma32_model(s, r[4:].astype(np.float32), acc + c)
        out[b] = P.canonicalize_nan(acc) if offs[b + 1] > offs[b] else 0
    return out


def random_rowwise(rng, rows, dim):
    raw = np.empty((rows, dim + 4), np.uint8)
    raw[:, 0:2] = (rng.standard_normal(rows) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[:, 2:4] = (rng.standard_normal(rows) * 0.5).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[:, 4:] = rng.integers(0, 256, (rows, dim), dtype=np.uint8)
    return raw


def test_rowwise_int8_kernel_against_reference():
    rng = np.random.default_rng(5)
    raw = random_rowwise(rng, 30, 9)
    idx = rng.integers(0, 30, 120)
    offs = np.concatenate([[0], np.sort(rng.integers(0, 121, 20)), [120]])
    w = rng.standard_normal(120).astype(np.float32)
    np.testing.assert_array_equal(P.pool(raw, "int8_rowwise", idx, offs), ref_rowwise(raw, idx, offs))
    np.testing.assert_array_equal(P.pool(raw, "int8_rowwise", idx, offs, per_sample_weights=w),
                                  ref_rowwise(raw, idx, offs, w))


def _fbgemm_int8(raw, idx, offs, weights=None):
    torch = pytest.importorskip("torch")
    inference = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_inference")
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    rows, dim = raw.shape[0], raw.shape[1] - 4
    tbe = inference.IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("t", rows, dim, SparseType.INT8, EmbeddingLocation.HOST)], device="cpu",
        pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
    tbe.initialize_weights()
    full = tbe.split_embedding_weights(split_scale_shifts=False)[0][0]
    full[:, :dim + 4].copy_(torch.from_numpy(raw))
    with torch.no_grad():
        out = tbe(torch.from_numpy(idx.astype(np.int32)), torch.from_numpy(offs.astype(np.int32)),
                  per_sample_weights=None if weights is None else torch.from_numpy(weights))
    return out.numpy()


def test_rowwise_int8_matches_fbgemm_inference_tbe_bit_for_bit(tmp_path):
    """FBGEMM's IntNBit TBE (SparseType.INT8, fp32 output): row = fp16 scale, fp16 bias, codes;
    our store (dram, file, evssd gather + host pool, with and without a cache) gives its bits."""
    rng = np.random.default_rng(11)
    raw = random_rowwise(rng, 500, 64)
    idx = rng.integers(0, 500, 64 * 20)
    offs = np.arange(65) * 20
    idx = np.delete(idx, np.arange(80, 100))  # bag 4 empty
    offs[5:] -= 20
    w = rng.standard_normal(idx.size).astype(np.float32)
    want = _fbgemm_int8(raw, idx, offs)
    want_w = _fbgemm_int8(raw, idx, offs, w)
    np.testing.assert_array_equal(P.pool(raw, "int8_rowwise", idx, offs), want)
    np.testing.assert_array_equal(P.pool(raw, "int8_rowwise", idx, offs, per_sample_weights=w), want_w)
    for backend, kw in [("dram", {}), ("dram", {"cache_fraction": 0.1}), ("file", {"path": tmp_path / "f"}),
                        ("rocksdb", {"path": tmp_path / "r"}), ("evssd", {"cache_fraction": None}),
                        ("evssd", {"cache_fraction": 0.1})]:
        with EmbeddingStore.from_arrays({"q": RowwiseInt8(raw)}, backend, **kw) as s:
            assert s.tables["q"].dim == 64 and s.tables["q"].elem == "int8_rowwise"
            np.testing.assert_array_equal(s.pooled("q", idx, offs), want, err_msg=f"{backend} {kw}")
            got = s.lookup_many({"q": (idx, offs, w)})["q"]
            np.testing.assert_array_equal(got, want_w, err_msg=f"{backend} {kw} weighted")
            np.testing.assert_array_equal(s.gather("q", idx[:7]), raw[idx[:7]])


def test_quantize_rowwise_int8_round_trips_within_half_a_step():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    q = quantize_rowwise_int8(x)
    deq = P.pool(q.data, "int8_rowwise", np.arange(50), np.arange(51))
    step = (x.max(1) - x.min(1)) / 255
    assert np.all(np.abs(deq - x) <= step[:, None] * 0.5 + np.abs(x) * 2e-3 + 1e-3)


def _paths(tmp_path):
    yield "dram", {}
    yield "dram-evcache", {"cache_fraction": 0.5}
    yield "dram-lru", {"cache_fraction": 0.5, "cache": "lru"}
    yield "file", {"path": tmp_path / "f"}
    yield "rocksdb", {"path": tmp_path / "r", "cache_fraction": None}
    yield "evssd", {"cache_fraction": None}
    yield "evssd-evcache", {"cache_fraction": 0.5}


def test_negative_zero_and_nan_payload_on_every_path(tmp_path):
    """The issue's bug: a one-row bag of -0.0 and a NaN payload gave different bits through the
    device (no cache) and through the host (with a cache)."""
    t = special_fp32(np.random.default_rng(0), 16, 4)
    idx = np.array([0, 1, 0, 0, 4, 5, 6, 6])
    offs = np.array([0, 1, 2, 4, 4, 6, 8])
    want = ref_fp32(t.view(np.uint32), idx, offs)
    assert want[0, 0] == 0x8000_0000 and want[1, 0] == P.CANONICAL_NAN
    for name, kw in _paths(tmp_path):
        backend = name.split("-")[0]
        with EmbeddingStore.from_arrays({"t": t}, backend, **kw) as s:
            for _ in range(2):  # second round: cache hits
                got = s.pooled("t", idx, offs).view(np.uint32)
                np.testing.assert_array_equal(got, want, err_msg=name)
            w = np.linspace(-2, 2, idx.size).astype(np.float32)
            np.testing.assert_array_equal(s.pooled("t", idx, offs, per_sample_weights=w).view(np.uint32),
                                          ref_fp32(t.view(np.uint32), idx, offs, w), err_msg=name)


def test_store_weight_and_out_errors():
    t = np.ones((4, 2), np.float32)
    with EmbeddingStore.from_arrays({"t": t}) as s:
        with pytest.raises(StoreInputError, match="'t'.*one weight per index"):
            s.lookup_many({"t": ([0, 1], [0, 2], [1.0])})
        with pytest.raises(StoreInputError, match="per_sample_weights need mode='sum'"):
            s.pooled("t", [0], [0, 1], "mean", per_sample_weights=[1.0])
        out = np.empty((1, 2), np.float32)
        assert s.pooled("t", [0, 1], [0, 2], out=out) is out
        np.testing.assert_array_equal(out, [[2, 2]])
        with pytest.raises(StoreInputError, match="out must be"):
            s.pooled("t", [0, 1], [0, 2], out=np.empty((1, 2), np.float64))


def test_fma32_is_one_rounding_where_float64_rounds_twice():
    """A constructed double-rounding case: a*b + c is exactly 1 + 2**-24 + 2**-60 (just above a
    binary32 tie): float64 rounds it to the tie 1 + 2**-24 and then to even 1.0; one rounding gives
    1 + 2**-23. The kernel's intrinsic and the numpy model agree on it and on random data."""
    import numba
    a, b = np.float32(-(2**-24) * (1 + 2**-18)), np.float32(1 - 2**-18)  # a*b = -2**-24 + 2**-60
    c = np.float32(1 + 2**-23)
    exact = np.float32(1 + 2**-23)
    twice = np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    kern = numba.njit(lambda x, y, z: P.fma32(x, y, z))
    assert P.fma32_model(a, b, c) == exact and kern(a, b, c) == exact
    rng = np.random.default_rng(9)
    x, y, z = (rng.standard_normal(5000).astype(np.float32) for _ in range(3))
    got = np.array([kern(*t) for t in zip(x, y, z)], np.float32)
    assert np.array_equal(got.view(np.uint32), P.fma32_model(x, y, z).view(np.uint32))
    assert twice == np.float32(1.0)  # the float64 route rounds twice here


def _ref_any(el, t, idx, offs, w):
    """The definition for ``t`` (``el``'s storage) by the slow references above."""
    if el == "int8_rowwise":
        return ref_rowwise(t, idx, offs, w)
    if el in ("int8", "int32") and w is None:   # int32 wrap-around by Python-width sums
        out = np.zeros((len(offs) - 1, t.shape[1]), np.int64)
        for b in range(len(offs) - 1):
            out[b] = t[idx[offs[b]:offs[b + 1]]].astype(np.int64).sum(axis=0)
        return ((out + 2**31) % 2**32 - 2**31).astype(np.int32)
    f = t.astype(np.float32)                    # fp16 widens exactly; ints convert for weights
    return ref_fp32(f.view(np.uint32), idx, offs, w).view(np.float32)


@pytest.mark.parametrize("dim", [7, 64, 128, 300])
@pytest.mark.parametrize("el", ["fp32", "fp16", "int8", "int32", "int8_rowwise"])
def test_every_bag_loop_width_gives_the_definition(el, dim):
    """The bag loops compiled for a width (64, 128), the general one (7) and the general one in
    blocks of columns (300 > pooling._BLOCK): one-table serial and parallel, and the two-source
    kernel, with and without weights, on rows holding -0.0, NaN payloads, infinities,
    subnormals, int extremes; empty bags and duplicates."""
    assert 300 > P._BLOCK
    rng = np.random.default_rng(dim)
    rows = 24
    if el == "int8_rowwise":
        t = random_rowwise(rng, rows, dim)
    elif el in ("fp32", "fp16"):
        with np.errstate(over="ignore"):   # the max finite fp32 becomes inf in fp16
            t = special_fp32(rng, rows, dim).astype(np.float32 if el == "fp32" else np.float16)
    else:
        info = np.iinfo(np.int8 if el == "int8" else np.int32)
        t = rng.integers(info.min, info.max, (rows, dim), endpoint=True).astype(info.dtype)
        t[0], t[1] = info.max, info.min
    n = 160
    idx = rng.integers(0, rows, n)
    offs = np.concatenate([[0], np.sort(rng.integers(0, n + 1, 30)), [n]])   # empty bags too
    w = rng.standard_normal(n).astype(np.float32)
    w[:4] = [-0.0, np.inf, 1e-30, np.nan]
    elem = ELEMS[el]
    # the two-source split: even rows in the "cache", odd rows fetched
    uniq = np.arange(rows)
    csrc = np.ascontiguousarray(t[0::2])
    msrc = np.ascontiguousarray(t[1::2])
    loc = np.where(uniq % 2 == 0, uniq // 2, -1 - uniq // 2).astype(np.int32)
    for weights in (None, w):
        want = _ref_any(el, t, idx, offs, weights)
        for parallel in (False, True):
            got = P.pool(t, el, idx, offs, per_sample_weights=weights, parallel=parallel)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                          err_msg=f"one-table parallel={parallel} weighted={weights is not None}")
        out = np.empty_like(want)
        assert P.pool_two_sources(P.kernel_source(csrc, elem), P.kernel_source(msrc, elem), elem, idx, loc,
                                  offs, out, weights) == -1
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32),
                                      err_msg=f"two sources weighted={weights is not None}")
