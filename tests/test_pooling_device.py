"""INT8_ROWWISE tables and weighted GATHER_POOLED through the real driver on the functional
model, bit for bit against host/pooling.py (the definition), bad indices included; the driver's
argument checks and the CAPS register."""
import numpy as np
import pytest

from evssd.host.device import Device, DeviceCapabilityError, DeviceError
from evssd.host.elements import ELEMS
from evssd.host.model import ModelTransport
from evssd.host.pooling import pool
from evssd.hw.regmap import ElemType, Params, pooled_row_bytes

PARAMS = Params(n_channels=2, page_size=4096, pages_per_channel=64, max_row_bytes=512)


def rowwise_rows(rng, n, dim):
    """FBGEMM row-wise INT8 rows: fp16 scale and bias (specials and subnormals now and then),
    then dim uint8 codes."""
    scale = rng.normal(0, 0.05, n).astype(np.float16)
    bias = rng.normal(0, 1, n).astype(np.float16)
    scale[rng.random(n) < 0.05] = np.float16(6e-8)              # subnormal scale
    bias[rng.random(n) < 0.05] = -scale[rng.random(n) < 1][:1]  # cancellation
    rows = np.empty((n, dim + 4), np.uint8)
    rows[:, 0:2] = scale.view(np.uint8).reshape(n, 2)
    rows[:, 2:4] = bias.view(np.uint8).reshape(n, 2)
    rows[:, 4:] = rng.integers(0, 256, (n, dim), dtype=np.uint8)
    return rows


def put_table(dev, table, rows_bytes, elem, lba=0):
    """Write ``rows_bytes`` (uint8 [n, row_bytes]) as whole rows per page from ``lba``."""
    n, rb = rows_bytes.shape
    rpp = PARAMS.page_size // rb
    n_pages = -(-n // rpp)
    pages = np.zeros((n_pages, PARAMS.page_size), np.uint8)
    for p in range(n_pages):
        chunk = rows_bytes[p * rpp:(p + 1) * rpp]
        pages[p, :chunk.size] = chunk.ravel()
    dev.program_pages(lba, pages.tobytes())
    dev.configure_table(table, rb, elem, [(0, n, lba)])
    return lba + n_pages


def bags(rng, n_rows, n_bags, bad_rate=0.0):
    lengths = rng.integers(0, 9, n_bags)
    lengths[0] = 0                                       # an empty bag
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
    idx = rng.integers(0, n_rows, int(offsets[-1])).astype(np.int64)
    bad = rng.random(idx.size) < bad_rate
    idx[bad] = n_rows + 5                                # in no extent: left out of the sum
    return idx.astype(np.uint32), offsets, ~bad


def pooled(dev, table, idx, offsets, good, weights=None):
    """The device's sums; with bad indices the command completes BAD_INDEX and the result (the
    good rows' sums) comes with the error."""
    if good.all():
        return dev.gather_pooled(table, idx, offsets, weights=weights)
    with pytest.raises(DeviceError) as err:
        dev.gather_pooled(table, idx, offsets, weights=weights)
    assert err.value.status.name == "BAD_INDEX"
    assert err.value.completion.n_bad == int((~good).sum())
    return err.value.result


def reference(src, elem, idx, offsets, good, weights=None):
    keep = np.flatnonzero(good)
    counts = [int(good[offsets[b]:offsets[b + 1]].sum()) for b in range(len(offsets) - 1)]
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return pool(src, elem, idx[keep].astype(np.int64), offs,
                per_sample_weights=None if weights is None else weights[keep])


def weights_for(rng, n):
    w = rng.normal(0, 2, n).astype(np.float32)
    w[rng.random(n) < 0.05] = 0.0
    w[rng.random(n) < 0.03] = -0.0
    w[rng.random(n) < 0.03] = np.float32(1e-40)          # subnormal weight
    return w


@pytest.mark.parametrize("weighted", [False, True])
def test_rowwise_int8_pooled_on_the_model(weighted):
    rng = np.random.default_rng(18 + weighted)
    dim = 20                                             # 24-byte rows
    rows = rowwise_rows(rng, 700, dim)
    with Device.open(ModelTransport(PARAMS)) as dev:
        assert dev.supports("int8_rowwise") and dev.supports("weighted")
        put_table(dev, 3, rows, "int8_rowwise")
        idx, offsets, good = bags(rng, 700, 60, bad_rate=0.05)
        w = weights_for(rng, idx.size) if weighted else None
        raw = pooled(dev, 3, idx, offsets, good, w)
        assert raw.shape == (60, pooled_row_bytes(24, ElemType.INT8_ROWWISE)) == (60, 4 * dim)
        got = raw.view("<f4")
        exp = reference(rows, ELEMS["int8_rowwise"], idx, offsets, good, w)
        assert np.array_equal(got.view("<u4"), exp.view("<u4"))
        assert np.all(got[0] == 0) and not np.signbit(got[0]).any()   # empty bag: +0.0
        # GATHER returns the stored rows, header included
        assert np.array_equal(dev.gather(3, idx[good][:10]), rows[idx[good][:10]])


@pytest.mark.parametrize("elem", ["fp32", "fp16", "int8", "int32"])
def test_weighted_pooled_on_the_model(elem):
    rng = np.random.default_rng(len(elem))
    el = ELEMS[elem]
    dim = 16
    if el.storage.kind == "f":
        vals = rng.normal(0, 10, (500, dim)).astype(el.storage)
        vals[rng.random((500, dim)) < 0.01] = np.inf
        vals[rng.random((500, dim)) < 0.01] = -np.inf    # inf - inf: canonical NaN
    else:
        info = np.iinfo(el.storage)
        vals = rng.integers(info.min, info.max, (500, dim), dtype=el.storage, endpoint=True)
    with Device.open(ModelTransport(PARAMS)) as dev:
        put_table(dev, 1, np.ascontiguousarray(vals).view(np.uint8).reshape(500, -1), elem)
        idx, offsets, good = bags(rng, 500, 80, bad_rate=0.05)
        w = weights_for(rng, idx.size)
        got = pooled(dev, 1, idx, offsets, good, w.astype(np.float64)).view("<f4")
        exp = reference(vals, el, idx, offsets, good, w)
        assert np.array_equal(got.view("<u4"), exp.view("<u4"))
        # fma(1, x, acc) is acc + x: weights of 1 give the unweighted float sums exactly
        if el.storage.kind == "f":
            ones = pooled(dev, 1, idx, offsets, good, np.ones(idx.size, np.float32))
            assert np.array_equal(ones, pooled(dev, 1, idx, offsets, good))


def test_weights_are_checked_and_capabilities_respected():
    with Device.open(ModelTransport(PARAMS)) as dev:
        put_table(dev, 0, np.zeros((10, 16), np.uint8), "fp32")
        idx, offs = np.arange(4, dtype=np.uint32), np.array([0, 2, 4], np.uint32)
        with pytest.raises(ValueError, match="weights"):
            dev.gather_pooled(0, idx, offs, weights=np.ones(3, np.float32))
        with pytest.raises(ValueError, match="weights"):
            dev.gather_pooled(0, idx, offs, weights=np.ones(4, np.int32))
        with pytest.raises(ValueError, match="element type"):
            dev.configure_table(1, 16, "int4_rowwise", [(0, 10, 0)])
        with pytest.raises(ValueError, match="no device element type"):
            dev.configure_table(1, 16, np.uint8, [(0, 10, 0)])     # never inferred as rowwise
    # a device without the capabilities (the gateware until its merger pools them)
    t = ModelTransport(PARAMS)
    t.device.regs.fields["caps_int8_rowwise"] = t.device.regs.fields["caps_weighted"] = 0
    with Device.open(t) as dev:
        assert not dev.supports("weighted")
        with pytest.raises(DeviceCapabilityError, match="INT8_ROWWISE"):
            dev.configure_table(0, 16, "int8_rowwise", [(0, 10, 0)])
        dev.configure_table(0, 16, "fp32", [(0, 10, 0)])
        with pytest.raises(DeviceCapabilityError, match="weighted"):
            dev.gather_pooled(0, [0, 1], [0, 2], weights=[1.0, 2.0])


def test_store_pools_rowwise_int8_on_the_device():
    """The evssd backend configures int8_rowwise slots as INT8_ROWWISE and pools them with
    GATHER_POOLED (no rows gathered), bit for bit as the dram backend pools them on the host."""
    from evssd.host.store import EmbeddingStore, RowwiseInt8
    rng = np.random.default_rng(5)
    rows = rowwise_rows(rng, 300, 28)
    idx, offsets, _ = bags(rng, 300, 40)
    with EmbeddingStore.from_arrays({"q": RowwiseInt8(rows)}, "evssd", cache_fraction=None) as dev_store, \
            EmbeddingStore.from_arrays({"q": RowwiseInt8(rows)}, "dram") as host_store:
        backend = dev_store.backend
        assert "q" in backend._rowwise_names
        assert backend.device.tables[backend._ids["q"].table_id].elem is ElemType.INT8_ROWWISE
        got = dev_store.pooled("q", idx.astype(np.int64), offsets.astype(np.int64))
        # one GATHER_POOLED: the result bytes are the bags' sums, not rows
        assert backend.stats()["requests"] == 1 and backend.bytes_read == 40 * 28 * 4
        exp = host_store.pooled("q", idx.astype(np.int64), offsets.astype(np.int64))
        assert np.array_equal(got.view("<u4"), exp.view("<u4"))
