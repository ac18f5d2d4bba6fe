"""Layout: extents, page images, padding, limits, JSON; written to a device and read back."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from evssd.host.layout import Extent, Layout, LayoutError

HAVE_DEVICE = importlib.util.find_spec("evssd.host.device") is not None
NP = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int32": np.int32}


def make_table(rows, dim, elem, seed=0):
    rng = np.random.default_rng(seed)
    if elem.startswith("fp"):
        return rng.standard_normal((rows, dim)).astype(NP[elem])
    return rng.integers(-100, 100, (rows, dim)).astype(NP[elem])


@dataclass
class Params:
    n_channels: int = 4
    page_size: int = 4096
    ways: int = 4
    max_tables: int = 16
    max_extents: int = 8
    pages_per_channel: int = 64
    max_row_bytes: int = 4096


class FakeDevice:
    """Flash as a byte array plus the translator of DESIGN.md: an independent golden model."""

    def __init__(self, **kw):
        self.params = Params(**kw)
        p = self.params
        self.flash = np.full((p.n_channels * p.pages_per_channel, p.page_size), 0xA5, np.uint8)
        self.slots = {}

    def program_pages(self, lba, data):
        pages = np.frombuffer(bytes(data), np.uint8).reshape(-1, self.params.page_size)
        self.flash[lba:lba + len(pages)] = pages

    def read_pages(self, lba, n):
        return self.flash[lba:lba + n].reshape(-1).copy()

    def configure_table(self, tid, row_bytes, elem, extents, enable=True):
        assert row_bytes % 4 == 0 and len(extents) <= self.params.max_extents
        self.slots[tid] = (row_bytes, elem, list(extents))

    def gather(self, tid, indices):
        row_bytes, _, extents = self.slots[tid]
        rpp = self.params.page_size // row_bytes
        out = np.zeros((len(indices), row_bytes), np.uint8)
        for k, i in enumerate(indices.tolist()):
            (first, n, lba), = [e for e in extents if e[0] <= i < e[0] + e[1]]
            page = self.flash[lba + (i - first) // rpp]
            off = ((i - first) % rpp) * row_bytes
            out[k] = page[off:off + row_bytes]
        return out


def test_geometry_padding_and_extents():
    tabs = {"a": make_table(1000, 3, "fp16"),   # 6 B -> 8 B rows, 512 rows/page
            "b": make_table(100, 33, "int8"),   # 33 B -> 36 B rows, 113 rows/page
            "c": make_table(10, 1024, "fp32")}  # 4096 B: exactly one row per page
    lay = Layout.plan(tabs, max_rows_per_extent=300)
    a, b, c = lay.tables
    assert (a.row_bytes, a.rows_per_page, b.row_bytes, b.rows_per_page, c.rows_per_page) == (8, 512, 36, 113, 1)
    assert a.extents == [Extent(0, 300, 0), Extent(300, 300, 1), Extent(600, 300, 2), Extent(900, 100, 3)]
    assert b.extents == [Extent(0, 100, 4)]
    assert c.extents == [Extent(0, 10, 5)]
    assert lay.end_lba == 15 and lay.n_pages == 15
    assert [t.table_id for t in lay.tables] == [0, 1, 2]
    pages = lay.pages()
    assert pages.shape == (15, 4096) and pages.dtype == np.uint8
    # padding: bytes 6..7 of every fp16 row and the page tail past 113*36 are zero
    pa = lay.pages("a").reshape(4, 512, 8)
    assert not pa[:, :, 6:].any()
    np.testing.assert_array_equal(pa[0, :300, :6].reshape(-1).view(np.float16).reshape(300, 3), tabs["a"][:300])
    assert not pa[0, 300:].any()  # an extent starts on a fresh page; the rest of its last page is zero
    pb = lay.pages("b")
    assert not pb[:, 113 * 36:].any()
    for t in lay.tables:
        for i in (0, t.rows - 1, t.rows // 2):
            lba, off = t.locate(i)
            row = pages[lba - lay.base_lba, off:off + t.data_bytes].view(tabs[t.name].dtype)
            np.testing.assert_array_equal(row, tabs[t.name][i])


@pytest.mark.parametrize("elem", list(NP))
def test_write_verify_gather_on_golden_device(elem):
    dev = FakeDevice()
    tabs = {"x": make_table(777, 5, elem, 1), "y": make_table(50, 17, elem, 2)}
    lay = Layout.plan(tabs, device=dev, max_rows_per_extent=100, base_lba=3)
    assert lay.write(dev) == lay.n_pages
    assert lay.verify(dev) == lay.n_pages
    for t in lay.tables:
        idx = np.arange(t.rows, dtype=np.uint32)[::-1].copy()
        raw = dev.gather(t.table_id, idx)
        got = np.ascontiguousarray(raw[:, :t.data_bytes]).view(t.dtype).reshape(-1, t.dim)
        np.testing.assert_array_equal(got, tabs[t.name][idx])


def test_verify_detects_corruption_and_json_roundtrip(tmp_path):
    dev = FakeDevice()
    tabs = {"x": make_table(300, 8, "fp32")}
    lay = Layout.plan(tabs, device=dev, max_rows_per_extent=128)
    lay.write(dev)
    path = lay.save(tmp_path / "l.json")
    again = Layout.load(path)
    assert again == lay and again.tables[0].extents == lay.tables[0].extents
    assert again.verify(dev) == 3  # checked by CRC, no data needed
    with pytest.raises(LayoutError, match="holds no data"):
        again.write(dev)
    dev.flash[1, 100] ^= 0xFF
    with pytest.raises(LayoutError, match=r"table 'x' extent 1: LBA 1 differs at byte 100"):
        lay.verify(dev)
    with pytest.raises(LayoutError, match=r"table 'x' extent 1 .*CRC-32"):
        again.verify(dev)
    # a fresh device configured from the JSON serves the same rows after its pages are copied
    dev2 = FakeDevice()
    dev2.flash[:] = dev.flash
    again.configure(dev2)
    assert dev2.slots[0] == dev.slots[0]
    with pytest.raises(LayoutError, match="not an evssd layout"):
        Layout.from_json('{"format": "x"}')
    with pytest.raises(LayoutError, match="malformed"):
        Layout.from_json("{")


def test_limits():
    small = FakeDevice(n_channels=1, pages_per_channel=4, max_tables=2, max_extents=2, max_row_bytes=256)
    t = make_table(10, 4, "fp32")
    with pytest.raises(LayoutError, match="3 tables .* 2 table slots"):
        Layout.plan({"a": t, "b": t, "c": t}, device=small)
    with pytest.raises(LayoutError, match="table 'a': 10 rows in extents of at most 3 rows need 4 extents"):
        Layout.plan({"a": t}, device=small, max_rows_per_extent=3)
    with pytest.raises(LayoutError, match=r"table 'big': needs pages up to LBA 5, beyond the flash capacity of 4"):
        Layout.plan({"big": make_table(5, 1024, "fp32")}, page_size=4096, capacity_pages=4)
    with pytest.raises(LayoutError, match="exceeds the device's max_row_bytes 256"):
        Layout.plan({"w": make_table(2, 100, "fp32")}, device=small)
    with pytest.raises(LayoutError, match="does not fit in a 4096-byte page"):
        Layout.plan({"w": make_table(2, 1025, "fp32")})
    with pytest.raises(LayoutError, match="table 'f': unsupported element type float64"):
        Layout.plan({"f": np.zeros((2, 2))})
    with pytest.raises(LayoutError, match="expected a non-empty 2-D table"):
        Layout.plan({"v": np.zeros(3, np.float32)})


def test_npy_and_torch_sources(tmp_path):
    t = make_table(20, 6, "fp16")
    np.save(tmp_path / "t.npy", t)
    lay = Layout.plan({"t": tmp_path / "t.npy"})
    np.testing.assert_array_equal(lay.pages("t")[0, :20 * 12].view(np.float16).reshape(20, 6), t)
    with pytest.raises(LayoutError, match="only .npy"):
        Layout.plan({"t": tmp_path / "t.csv"})
    torch = pytest.importorskip("torch")
    bag = torch.nn.EmbeddingBag(30, 4, mode="sum")
    lay = Layout.plan({"bag": bag})
    w = bag.weight.detach().numpy()
    np.testing.assert_array_equal(lay.pages("bag")[0, :30 * 16].view(np.float32).reshape(30, 4), w)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(1, 400), min_size=1, max_size=4),
       dim=st.integers(1, 40), elem=st.sampled_from(list(NP)), per=st.integers(50, 400))
def test_every_row_locates_to_its_bytes(rows, dim, elem, per):
    tabs = {f"t{k}": make_table(r, dim, elem, k) for k, r in enumerate(rows)}
    lay = Layout.plan(tabs, page_size=1024, max_rows_per_extent=per)
    pages = lay.pages()
    lbas = [e.start_lba for t in lay.tables for e in t.extents]
    assert lbas == sorted(lbas) and len(set(lbas)) == len(lbas)  # consecutive, no overlap
    for t in lay.tables:
        assert t.row_bytes % 4 == 0 and t.rows_per_page * t.row_bytes <= 1024
        assert sum(e.n_rows for e in t.extents) == t.rows
        ii = np.arange(t.rows)
        got = np.stack([pages[lba, off:off + t.data_bytes] for lba, off in map(t.locate, ii)])
        np.testing.assert_array_equal(got.view(t.dtype).reshape(t.rows, t.dim), tabs[t.name])


@pytest.mark.skipif(not HAVE_DEVICE, reason="evssd.host.device not available yet")
def test_write_verify_on_model_device():
    from evssd.host.device import Device
    dev = Device.open("model", pages_per_channel=64)
    tabs = {"x": make_table(600, 7, "fp16", 1), "y": make_table(90, 16, "int8", 2)}
    lay = Layout.plan(tabs, device=dev, max_rows_per_extent=200)
    lay.write(dev)
    assert lay.verify(dev) == lay.n_pages
    t = lay.table("x")
    idx = np.array([599, 0, 200, 199, 401], np.uint32)
    raw = np.asarray(dev.gather(t.table_id, idx)).reshape(len(idx), -1)
    np.testing.assert_array_equal(np.ascontiguousarray(raw[:, :14]).view(np.float16), tabs["x"][idx])


def test_torch_like_sources_without_torch():
    """The torch path is duck-typed (torch is optional): a module with .weight holding a tensor."""
    w = make_table(12, 4, "fp32")

    class Tensor:
        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return w

        def __array__(self, dtype=None, copy=None):
            return w

    class EmbeddingBag:
        weight = Tensor()

    for src in (EmbeddingBag(), Tensor()):
        lay = Layout.plan({"bag": src})
        np.testing.assert_array_equal(lay.pages("bag")[0, :12 * 16].view(np.float32).reshape(12, 4), w)
