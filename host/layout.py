"""Table layout: embedding tables -> extents and flash pages on the EV-SSD.

A table ``[rows, dim]`` of fp32/fp16/int8/int32 gets ``row_bytes = dim * itemsize`` rounded up to a
multiple of 4 (the pad bytes are zero) and ``rows_per_page = page_size // row_bytes``; rows never
straddle pages. Its rows are cut into one or more extents ``(first_index, n_rows, start_lba)``
(``max_rows_per_extent`` forces several so that the translator's multi-extent path is used); every
extent starts on a fresh page, and extents and tables take consecutive LBAs from ``base_lba``.
The device translates ``i`` in an extent to ``lba = start_lba + (i - first_index) // rows_per_page``
and ``offset = ((i - first_index) % rows_per_page) * row_bytes`` (see DESIGN.md).

A :class:`Layout` is plain data and serialises to JSON, with a CRC-32 of every extent's page
image, so a server can reopen and verify a device it did not write::

    layout = Layout.plan({"user": u, "item": "item.npy"}, device=dev, max_rows_per_extent=10000)
    layout.write(dev)                   # PROGRAM_PAGES, then configure the table slots
    layout.verify(dev)                  # READ_PAGES and compare
    layout.save("tables.layout.json")
    Layout.load("tables.layout.json").configure(other_dev)
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from evssd.host.elements import DEVICE_ELEMS

__all__ = ["Layout", "TablePlacement", "Extent", "LayoutError", "load_table", "ELEMS"]

#: element types the device knows: name -> numpy dtype (derived from hw.regmap.ElemType)
ELEMS: dict[str, np.dtype] = {name: el.storage for name, el in DEVICE_ELEMS.items()}
FORMAT = "evssd-layout"
VERSION = 1


class LayoutError(ValueError):
    """A table cannot be placed on the device, or the device does not hold what the layout says."""


class Extent(NamedTuple):
    first_index: int
    n_rows: int
    start_lba: int


def _elem_of(name: str, dtype) -> str:
    dt = np.dtype(dtype)
    for elem, d in ELEMS.items():
        if dt.kind == d.kind and dt.itemsize == d.itemsize:
            return elem
    raise LayoutError(f"table {name!r}: unsupported element type {dt} (supported: {', '.join(ELEMS)})")


def load_table(name: str, source) -> np.ndarray:
    """A table as a 2-D numpy array from an array, a ``.npy`` path, a torch tensor or a module
    with ``.weight`` (``nn.Embedding`` / ``nn.EmbeddingBag``). torch is never imported here."""
    obj = source
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.suffix != ".npy":
            raise LayoutError(f"table {name!r}: {p}: only .npy files are read")
        try:
            obj = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LayoutError(f"table {name!r}: cannot load {p}: {exc}") from exc
    weight = getattr(obj, "weight", None)
    if weight is not None and not isinstance(obj, np.ndarray):
        obj = weight
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor / Parameter
        obj = obj.detach().cpu().numpy()
    arr = np.asarray(obj)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise LayoutError(f"table {name!r}: expected a non-empty 2-D table [rows, dim], got shape {arr.shape}")
    _elem_of(name, arr.dtype)
    return arr


@dataclass
class TablePlacement:
    name: str
    table_id: int
    rows: int
    dim: int
    elem: str
    row_bytes: int
    rows_per_page: int
    extents: list[Extent]
    crc32: list[int] = field(default_factory=list)  # per extent, of its page image
    #: CRC-32 of the geometry (:meth:`seal`) when the pages were made (None: not planned here)
    geometry_crc32: int | None = None

    def seal(self) -> int:
        """CRC-32 of everything that decides how the pages are read (name, slot, rows, dim,
        element type, row size, extents): an edit of any of them after the pages were written
        no longer matches."""
        geometry = [self.name, self.table_id, self.rows, self.dim, self.elem, self.row_bytes,
                    self.rows_per_page, [list(map(int, e)) for e in self.extents]]
        return zlib.crc32(json.dumps(geometry, separators=(",", ":")).encode())

    @property
    def dtype(self) -> np.dtype:
        return ELEMS[self.elem]

    @property
    def data_bytes(self) -> int:
        """Bytes of one row's data (row_bytes minus the pad)."""
        return self.dim * self.dtype.itemsize

    def extent_pages(self, e: Extent) -> int:
        return -(-e.n_rows // self.rows_per_page)

    @property
    def n_pages(self) -> int:
        return sum(self.extent_pages(e) for e in self.extents)

    def locate(self, index: int) -> tuple[int, int]:
        """(lba, byte offset) of row ``index``: the translator's arithmetic."""
        for e in self.extents:
            if e.first_index <= index < e.first_index + e.n_rows:
                rel = index - e.first_index
                return e.start_lba + rel // self.rows_per_page, (rel % self.rows_per_page) * self.row_bytes
        raise LayoutError(f"table {self.name!r}: index {index} is in no extent")


class Layout:
    """Where every table lives on the device; plain data, JSON-serialisable."""

    def __init__(self, page_size: int, tables: list[TablePlacement], *, base_lba: int = 0,
                 capacity_pages: int | None = None, arrays: Mapping[str, np.ndarray] | None = None):
        self.page_size = page_size
        self.tables = list(tables)
        self.base_lba = base_lba
        self.capacity_pages = capacity_pages
        self._arrays = dict(arrays or {})

    # -- planning -------------------------------------------------------------------------------

    @classmethod
    def plan(cls, tables: Mapping[str, object], *, device=None, params=None, page_size: int | None = None,
             max_tables: int | None = None, max_extents: int | None = None, capacity_pages: int | None = None,
             max_row_bytes: int | None = None, max_rows_per_extent: int | None = None,
             base_lba: int = 0, first_table_id: int = 0) -> "Layout":
        """Place ``tables`` (name -> array / .npy path / torch weight) on a device.

        Limits come from ``device.params`` (or ``params``); explicit arguments override them.
        Without either, the defaults of DESIGN.md apply (4 KiB pages, 16 tables, 8 extents) and the
        capacity is unbounded.
        """
        p = params if params is not None else getattr(device, "params", None)
        if p is not None:
            page_size = page_size or p.page_size
            max_tables = max_tables or p.max_tables
            max_extents = max_extents or p.max_extents
            if capacity_pages is None:
                capacity_pages = p.n_channels * p.pages_per_channel
            max_row_bytes = max_row_bytes or getattr(p, "max_row_bytes", None)
        page_size = page_size or 4096
        max_tables = max_tables or 16
        max_extents = max_extents or 8
        max_row_bytes = max_row_bytes or page_size
        if page_size < 4 or page_size & (page_size - 1):
            raise LayoutError(f"page_size must be a power of two, got {page_size}")
        if max_rows_per_extent is not None and max_rows_per_extent < 1:
            raise LayoutError(f"max_rows_per_extent must be >= 1, got {max_rows_per_extent}")
        if not tables:
            raise LayoutError("no tables given")
        if first_table_id + len(tables) > max_tables:
            raise LayoutError(f"{len(tables)} tables (ids from {first_table_id}) do not fit in the "
                              f"device's {max_tables} table slots")
        arrays: dict[str, np.ndarray] = {}
        placed: list[TablePlacement] = []
        lba = base_lba
        for k, (name, source) in enumerate(tables.items()):
            name = str(name)
            arr = load_table(name, source)
            arrays[name] = arr
            elem = _elem_of(name, arr.dtype)
            rows, dim = arr.shape
            row_bytes = -(-dim * arr.dtype.itemsize // 4) * 4
            if row_bytes > page_size:
                raise LayoutError(f"table {name!r}: row of {row_bytes} bytes ({dim} x {elem}) does not fit "
                                  f"in a {page_size}-byte page (rows never straddle pages)")
            if row_bytes > max_row_bytes:
                raise LayoutError(f"table {name!r}: row of {row_bytes} bytes exceeds the device's "
                                  f"max_row_bytes {max_row_bytes}")
            rpp = page_size // row_bytes
            per = max_rows_per_extent or rows
            n_ext = -(-rows // per)
            if n_ext > max_extents:
                raise LayoutError(f"table {name!r}: {rows} rows in extents of at most {per} rows need "
                                  f"{n_ext} extents; the device has {max_extents} per table")
            extents = []
            for first in range(0, rows, per):
                n = min(per, rows - first)
                extents.append(Extent(first, n, lba))
                lba += -(-n // rpp)
            placed.append(TablePlacement(name, first_table_id + k, rows, dim, elem, row_bytes, rpp, extents))
            if capacity_pages is not None and lba > capacity_pages:
                raise LayoutError(f"table {name!r}: needs pages up to LBA {lba}, beyond the flash "
                                  f"capacity of {capacity_pages} pages ({capacity_pages * page_size} bytes)")
        layout = cls(page_size, placed, base_lba=base_lba, capacity_pages=capacity_pages, arrays=arrays)
        for t in layout.tables:
            t.crc32 = [zlib.crc32(layout.extent_image(t, e)) for e in t.extents]
            t.geometry_crc32 = t.seal()
        return layout

    # -- page images ----------------------------------------------------------------------------

    @property
    def end_lba(self) -> int:
        return self.base_lba + sum(t.n_pages for t in self.tables)

    @property
    def n_pages(self) -> int:
        return self.end_lba - self.base_lba

    def table(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise LayoutError(f"no table {name!r} in the layout (tables: {[t.name for t in self.tables]})")

    def extent_image(self, t: TablePlacement, e: Extent) -> np.ndarray:
        """Pages ``[n_pages, page_size]`` (uint8) of one extent; padding is zero."""
        arr = self._arrays.get(t.name)
        if arr is None:
            raise LayoutError(f"table {t.name!r}: the layout holds no data (loaded from JSON); "
                              "plan it from the arrays to write pages")
        n_pages = t.extent_pages(e)
        rows = np.ascontiguousarray(arr[e.first_index:e.first_index + e.n_rows], dtype=t.dtype)
        buf = np.zeros((n_pages * t.rows_per_page, t.row_bytes), np.uint8)
        buf[:e.n_rows, :t.data_bytes] = rows.view(np.uint8).reshape(e.n_rows, t.data_bytes)
        pages = np.zeros((n_pages, self.page_size), np.uint8)
        pages[:, :t.rows_per_page * t.row_bytes] = buf.reshape(n_pages, t.rows_per_page * t.row_bytes)
        return pages

    def pages(self, name: str | None = None) -> np.ndarray:
        """Page images ``[n_pages, page_size]`` of one table, or of the whole layout (LBA order)."""
        tables = [self.table(name)] if name is not None else self.tables
        parts = [self.extent_image(t, e) for t in tables for e in t.extents]
        return np.concatenate(parts) if parts else np.zeros((0, self.page_size), np.uint8)

    def iter_pages(self, chunk_pages: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """(lba, pages) runs of at most ``chunk_pages`` pages covering the layout."""
        for t in self.tables:
            for e in t.extents:
                img = self.extent_image(t, e)
                for p0 in range(0, img.shape[0], chunk_pages):
                    yield e.start_lba + p0, img[p0:p0 + chunk_pages]

    # -- the device -----------------------------------------------------------------------------

    def check_device(self, device) -> None:
        p = getattr(device, "params", None)
        if p is None:
            return
        if p.page_size != self.page_size:
            raise LayoutError(f"layout page size {self.page_size} != device page size {p.page_size}")
        cap = p.n_channels * p.pages_per_channel
        if self.end_lba > cap:
            raise LayoutError(f"layout needs {self.end_lba} pages; the device has {cap}")
        for t in self.tables:
            if t.table_id >= p.max_tables:
                raise LayoutError(f"table {t.name!r}: id {t.table_id} >= device max_tables {p.max_tables}")
            if len(t.extents) > p.max_extents:
                raise LayoutError(f"table {t.name!r}: {len(t.extents)} extents > device max_extents {p.max_extents}")
            mrb = getattr(p, "max_row_bytes", None)
            if mrb is not None and t.row_bytes > mrb:
                raise LayoutError(f"table {t.name!r}: row_bytes {t.row_bytes} > device max_row_bytes {mrb}")

    def configure(self, device) -> None:
        """Program the table slots (row_bytes, elem, extents) and enable them."""
        self.check_device(device)
        for t in self.tables:
            device.configure_table(t.table_id, t.row_bytes, t.elem,
                                   [tuple(e) for e in t.extents], enable=True)

    def write(self, device, chunk_pages: int = 256) -> int:
        """PROGRAM_PAGES every page, then :meth:`configure`. Returns the number of pages written."""
        self.check_device(device)
        n = 0
        for lba, pages in self.iter_pages(chunk_pages):
            device.program_pages(lba, np.ascontiguousarray(pages))
            n += pages.shape[0]
        self.configure(device)
        return n

    def verify(self, device, chunk_pages: int = 256) -> int:
        """READ_PAGES every extent and compare with the data (or, for a layout loaded from JSON,
        with the stored CRC-32s). Raises :class:`LayoutError` naming table, extent and LBA.

        Before any page is read it checks that the geometry still agrees with itself and with
        the seal taken when the pages were made, that the data (if held) has the layout's shape
        and element type, and that the device's table slots are configured as the layout says."""
        self.check_device(device)
        _check_layout(self)
        for t in self.tables:
            if t.geometry_crc32 is not None and t.seal() != t.geometry_crc32:
                raise LayoutError(f"table {t.name!r}: geometry (rows/dim/elem/row_bytes/extents) "
                                  f"differs from the one its pages were written with")
            arr = self._arrays.get(t.name)
            if arr is not None:
                if tuple(arr.shape) != (t.rows, t.dim):
                    raise LayoutError(f"table {t.name!r}: data shape {tuple(arr.shape)} != layout "
                                      f"({t.rows}, {t.dim})")
                if _elem_of(t.name, arr.dtype) != t.elem:
                    raise LayoutError(f"table {t.name!r}: data element type {arr.dtype} != layout elem {t.elem!r}")
            _check_slot(device, t)
        n = 0
        for t in self.tables:
            for k, e in enumerate(t.extents):
                n_pages = t.extent_pages(e)
                got = np.concatenate([
                    np.asarray(device.read_pages(e.start_lba + p0, min(chunk_pages, n_pages - p0)),
                               dtype=np.uint8).reshape(-1, self.page_size)
                    for p0 in range(0, n_pages, chunk_pages)])
                n += n_pages
                if t.name in self._arrays:
                    want = self.extent_image(t, e)
                    bad = np.flatnonzero((got != want).any(axis=1))
                    if bad.size:
                        pg = int(bad[0])
                        col = int(np.flatnonzero(got[pg] != want[pg])[0])
                        raise LayoutError(f"table {t.name!r} extent {k}: LBA {e.start_lba + pg} differs at "
                                          f"byte {col} ({got[pg, col]:#04x} != {want[pg, col]:#04x}); "
                                          f"{bad.size} bad pages")
                elif t.crc32:
                    crc = zlib.crc32(np.ascontiguousarray(got))
                    if crc != t.crc32[k]:
                        raise LayoutError(f"table {t.name!r} extent {k} (LBA {e.start_lba}..{e.start_lba + n_pages - 1}): "
                                          f"CRC-32 {crc:#010x} != layout's {t.crc32[k]:#010x}")
        return n

    def forget_data(self) -> None:
        """Drop the references to the tables' arrays (after :meth:`write`); :meth:`verify` then
        checks the CRC-32s, as for a layout loaded from JSON."""
        self._arrays.clear()

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "page_size": self.page_size,
            "base_lba": self.base_lba, "end_lba": self.end_lba, "capacity_pages": self.capacity_pages,
            "tables": [dict(asdict(t), extents=[list(e) for e in t.extents]) for t in self.tables],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """A layout from its JSON form, checked against the schema (:func:`_parse_layout`):
        every error names the field (``tables[1].dim``)."""
        return _parse_layout(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout JSON is malformed: {exc}") from exc
        return cls.from_dict(d)

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path_or_text) -> "Layout":
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            return cls.from_json(s)
        return cls.from_json(Path(s).read_text())

    def __eq__(self, other):
        return isinstance(other, Layout) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return (f"Layout(page_size={self.page_size}, tables={[t.name for t in self.tables]}, "
                f"lba={self.base_lba}..{self.end_lba})")


# -- schema ------------------------------------------------------------------------------------
# The JSON form, field by field. Each check names the field with its path, so a hand-edited or
# truncated file says what is wrong instead of failing with KeyError/TypeError deep inside.

_U32 = (1 << 32) - 1


def _get(obj: dict, key: str, path: str, kind: str, *, lo: int | None = 0, hi: int | None = _U32,
         required: bool = True, default=None):
    where = f"{path}.{key}" if path else key
    if key not in obj:
        if required:
            raise LayoutError(f"layout JSON: {where}: missing")
        return default
    v = obj[key]
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise LayoutError(f"layout JSON: {where}: expected an integer, got {type(v).__name__} {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise LayoutError(f"layout JSON: {where}: {v} out of range {lo}..{hi}")
    elif kind == "str":
        if not isinstance(v, str) or not v:
            raise LayoutError(f"layout JSON: {where}: expected a non-empty string, got {v!r}")
    elif kind == "list":
        if not isinstance(v, list):
            raise LayoutError(f"layout JSON: {where}: expected a list, got {type(v).__name__}")
    elif kind == "int?":
        if v is not None:
            return _get(obj, key, path, "int", lo=lo, hi=hi)
    return v


def _parse_layout(cls, d) -> "Layout":
    if not isinstance(d, dict):
        raise LayoutError(f"layout JSON: expected an object at the top, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise LayoutError(f"not an evssd layout (format {d.get('format')!r})")
    if d.get("version") != VERSION:
        raise LayoutError(f"unsupported layout version {d.get('version')!r} (this reader knows {VERSION})")
    page_size = _get(d, "page_size", "", "int", lo=4)
    base_lba = _get(d, "base_lba", "", "int", required=False, default=0)
    capacity = _get(d, "capacity_pages", "", "int?", required=False)
    tables = []
    for k, td in enumerate(_get(d, "tables", "", "list")):
        path = f"tables[{k}]"
        if not isinstance(td, dict):
            raise LayoutError(f"layout JSON: {path}: expected an object, got {type(td).__name__}")
        name = _get(td, "name", path, "str")
        path = f"tables[{k}] ({name!r})"
        elem = _get(td, "elem", path, "str")
        if elem not in ELEMS:
            raise LayoutError(f"layout JSON: {path}.elem: unknown element type {elem!r} "
                              f"(known: {', '.join(ELEMS)})")
        extents = []
        for j, e in enumerate(_get(td, "extents", path, "list")):
            if (not isinstance(e, list) or len(e) != 3
                    or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U32 for v in e)):
                raise LayoutError(f"layout JSON: {path}.extents[{j}]: expected [first_index, n_rows, "
                                  f"start_lba] of integers in 0..2**32-1, got {e!r}")
            extents.append(Extent(*e))
        crc = _get(td, "crc32", path, "list", required=False, default=[])
        for j, c in enumerate(crc):
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= _U32:
                raise LayoutError(f"layout JSON: {path}.crc32[{j}]: expected a 32-bit integer, got {c!r}")
        tables.append(TablePlacement(
            name, _get(td, "table_id", path, "int", hi=255), _get(td, "rows", path, "int", lo=1),
            _get(td, "dim", path, "int", lo=1), elem, _get(td, "row_bytes", path, "int", lo=4),
            _get(td, "rows_per_page", path, "int", lo=1), extents, list(crc),
            _get(td, "geometry_crc32", path, "int")))
    layout = cls(page_size, tables, base_lba=base_lba, capacity_pages=capacity)
    _check_layout(layout)
    if "end_lba" in d and layout.end_lba != d["end_lba"]:
        raise LayoutError(f"layout JSON: end_lba: {d['end_lba']!r} disagrees with the extents "
                          f"(which end at {layout.end_lba})")
    for t in layout.tables:
        if t.geometry_crc32 is not None and t.seal() != t.geometry_crc32:
            raise LayoutError(f"layout JSON: table {t.name!r}: geometry (rows/dim/elem/row_bytes/extents) "
                              f"was edited after its pages were written (geometry_crc32 does not match)")
    return layout


def _padded_row_bytes(elem: str, dim: int) -> int:
    """Bytes of a row of ``dim`` ``elem`` elements, padded to whole 32-bit words (the one place
    the schema reads an element's size)."""
    return -(-dim * ELEMS[elem].itemsize // 4) * 4


def _check_layout(layout: "Layout") -> None:
    """The geometry agrees with itself: row size from dim and element type, rows per page from
    the page size, extents covering the rows once, no two extents on the same pages."""
    ps = layout.page_size
    if ps < 4 or ps & (ps - 1):
        raise LayoutError(f"layout: page_size {ps} is not a power of two >= 4")
    names, ids, spans = set(), set(), []
    for t in layout.tables:
        where = f"table {t.name!r}"
        if t.name in names:
            raise LayoutError(f"{where}: name used twice")
        if t.table_id in ids:
            raise LayoutError(f"{where}: table_id {t.table_id} used twice")
        names.add(t.name)
        ids.add(t.table_id)
        if t.elem not in ELEMS:
            raise LayoutError(f"{where}: unknown elem {t.elem!r}")
        want = _padded_row_bytes(t.elem, t.dim)
        if t.row_bytes != want:
            raise LayoutError(f"{where}: row_bytes {t.row_bytes} != {want} for dim {t.dim} x {t.elem}")
        if t.row_bytes > ps:
            raise LayoutError(f"{where}: row_bytes {t.row_bytes} > page_size {ps}")
        if t.rows_per_page != ps // t.row_bytes:
            raise LayoutError(f"{where}: rows_per_page {t.rows_per_page} != {ps // t.row_bytes} "
                              f"(page_size {ps} // row_bytes {t.row_bytes})")
        if not t.extents:
            raise LayoutError(f"{where}: no extents")
        nxt = 0
        for j, e in enumerate(t.extents):
            if e.first_index != nxt or e.n_rows < 1:
                raise LayoutError(f"{where} extent {j}: {tuple(e)} does not continue the rows at {nxt} "
                                  f"(extents must cover rows 0..{t.rows - 1} in order)")
            nxt += e.n_rows
            if e.start_lba < layout.base_lba:
                raise LayoutError(f"{where} extent {j}: start_lba {e.start_lba} < base_lba {layout.base_lba}")
            spans.append((e.start_lba, e.start_lba + t.extent_pages(e), t.name, j))
        if nxt != t.rows:
            raise LayoutError(f"{where}: extents hold {nxt} rows, rows is {t.rows}")
        if t.crc32 and len(t.crc32) != len(t.extents):
            raise LayoutError(f"{where}: {len(t.crc32)} crc32 values for {len(t.extents)} extents")
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise LayoutError(f"table {b[2]!r} extent {b[3]} (LBA {b[0]}..{b[1] - 1}) overlaps table {a[2]!r} "
                              f"extent {a[3]} (LBA {a[0]}..{a[1] - 1})")
    if layout.capacity_pages is not None and layout.end_lba > layout.capacity_pages:
        raise LayoutError(f"layout: extents end at LBA {layout.end_lba}, beyond capacity_pages "
                          f"{layout.capacity_pages}")


def _check_slot(device, t: TablePlacement) -> None:
    """The device's table slot holds what the layout says (when the device reports its slots,
    as :class:`evssd.host.device.Device` does through ``tables``)."""
    slots = getattr(device, "tables", None)
    if not isinstance(slots, Mapping):
        return
    cfg = slots.get(t.table_id)
    if cfg is None:
        raise LayoutError(f"table {t.name!r}: slot {t.table_id} is not configured on the device "
                          f"(call configure() first)")
    elem = getattr(getattr(cfg, "elem", None), "name", str(getattr(cfg, "elem", ""))).lower()
    got = (cfg.row_bytes, elem, [tuple(map(int, e)) for e in cfg.extents])
    want = (t.row_bytes, t.elem, [tuple(e) for e in t.extents])
    if got != want:
        raise LayoutError(f"table {t.name!r}: the device's slot {t.table_id} holds row_bytes {got[0]}, "
                          f"elem {got[1]}, extents {got[2]}; the layout says {want[0]}, {want[1]}, {want[2]}")
