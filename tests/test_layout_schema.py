"""Layout JSON against its schema: every malformed field is named (no KeyError, TypeError,
AttributeError, ZeroDivisionError), and verify() checks geometry, element type and the device's
table slots, not only the page CRCs."""
import copy
import json

import numpy as np
import pytest

from evssd.host.layout import Layout, LayoutError


def _layout():
    rng = np.random.default_rng(0)
    tabs = {"x": rng.standard_normal((300, 8)).astype(np.float32),
            "y": rng.integers(-9, 9, (70, 12)).astype(np.int8)}
    return Layout.plan(tabs, page_size=1024, capacity_pages=128, max_rows_per_extent=128), tabs


def _good():
    return json.loads(_layout()[0].to_json())


def _set(d, path, value):
    obj = d
    for key in path[:-1]:
        obj = obj[key]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()

CASES = [
    (("page_size",), _DELETE, r"page_size: missing"),
    (("page_size",), "4096", r"page_size: expected an integer, got str"),
    (("page_size",), 0, r"page_size: 0 out of range"),
    (("page_size",), 1000, r"page_size 1000 is not a power of two"),
    (("tables",), _DELETE, r"tables: missing"),
    (("tables",), {"x": 1}, r"tables: expected a list"),
    (("tables", 0), "x", r"tables\[0\]: expected an object"),
    (("tables", 0, "name"), _DELETE, r"tables\[0\]\.name: missing"),
    (("tables", 0, "name"), 7, r"tables\[0\]\.name: expected a non-empty string"),
    (("tables", 0, "dim"), _DELETE, r"tables\[0\] \('x'\)\.dim: missing"),
    (("tables", 0, "dim"), 8.0, r"\.dim: expected an integer, got float"),
    (("tables", 0, "dim"), True, r"\.dim: expected an integer, got bool"),
    (("tables", 0, "rows"), -5, r"\.rows: -5 out of range"),
    (("tables", 0, "rows_per_page"), 0, r"\.rows_per_page: 0 out of range"),
    (("tables", 0, "rows_per_page"), 31, r"rows_per_page 31 != 32"),
    (("tables", 0, "row_bytes"), 0, r"\.row_bytes: 0 out of range"),
    (("tables", 0, "row_bytes"), 36, r"row_bytes 36 != 32 for dim 8 x fp32"),
    (("tables", 0, "elem"), "bf16", r"\.elem: unknown element type 'bf16'"),
    (("tables", 0, "elem"), None, r"\.elem: expected a non-empty string"),
    (("tables", 0, "table_id"), 300, r"\.table_id: 300 out of range 0..255"),
    (("tables", 1, "table_id"), 0, r"table_id 0 used twice"),
    (("tables", 1, "name"), "x", r"name used twice"),
    (("tables", 0, "extents"), "0,300,0", r"\.extents: expected a list"),
    (("tables", 0, "extents", 0), [0, 128], r"\.extents\[0\]: expected \[first_index, n_rows, start_lba\]"),
    (("tables", 0, "extents", 0), [0, 128, -1], r"\.extents\[0\]"),
    (("tables", 0, "extents", 0), [0, 128.5, 0], r"\.extents\[0\]"),
    (("tables", 0, "extents", 1), [100, 128, 4], r"extent 1: \(100, 128, 4\) does not continue the rows at 128"),
    (("tables", 0, "extents", 2, 1), 40, r"extents hold 296 rows, rows is 300"),
    (("tables", 1, "extents", 0, 2), 0, r"extent 0 \(LBA 0\.\.\d+\) overlaps table"),
    (("tables", 0, "crc32"), [1, 2], r"2 crc32 values for 3 extents"),
    (("tables", 0, "crc32", 0), "x", r"\.crc32\[0\]: expected a 32-bit integer"),
    (("tables", 0, "geometry_crc32"), _DELETE, r"\.geometry_crc32: missing"),
    (("end_lba",), 99, r"end_lba: 99 disagrees with the extents"),
    (("capacity_pages",), 5, r"beyond capacity_pages 5"),
    (("capacity_pages",), "x", r"capacity_pages: expected an integer"),
    (("base_lba",), -1, r"base_lba: -1 out of range"),
]


@pytest.mark.parametrize("path,value,message", CASES, ids=[f"{'.'.join(map(str, c[0]))}={'DELETE' if c[1] is _DELETE else repr(c[1])}"[:60]
                              for c in CASES])
def test_malformed_field_is_named(path, value, message):
    d = _good()
    _set(d, path, value)
    with pytest.raises(LayoutError, match=message):
        Layout.from_dict(d)


@pytest.mark.parametrize("field,value", [("elem", "int32"), ("dim", 4), ("rows", 299)])
def test_edited_geometry_is_refused_even_when_it_is_self_consistent(field, value):
    d = _good()
    t = d["tables"][0]
    t[field] = value
    if field == "dim":  # keep the file self-consistent: only the seal can tell
        t["row_bytes"], t["rows_per_page"] = 16, 64
    if field == "rows":
        t["extents"][-1][1] -= 1
    del d["end_lba"]  # optional; a shorter table may end earlier
    with pytest.raises(LayoutError, match="edited after its pages were written"):
        Layout.from_dict(d)


def test_random_mutations_never_escape_as_other_errors():
    rng = np.random.default_rng(7)
    good = _good()
    values = [None, True, -1, 0, 1, 2 ** 40, 1.5, "x", "", [], {}, [0, 1, 2], [[0, 1, 2]]]
    outcomes = {"loaded": 0, "refused": 0}

    def paths(obj, prefix=()):
        yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for k, v in enumerate(obj):
                yield from paths(v, prefix + (k,))
    all_paths = [p for p in paths(good) if p]
    for _ in range(1500):
        d = copy.deepcopy(good)
        for _ in range(int(rng.integers(1, 3))):
            live = [p for p in paths(d) if p]
            path = live[int(rng.integers(len(live)))]
            try:
                if rng.random() < 0.3 and isinstance(path[-1], str):
                    _set(d, path, _DELETE)
                else:
                    _set(d, path, values[int(rng.integers(len(values)))])
            except (KeyError, IndexError, TypeError):
                pass
        try:
            Layout.from_dict(d)
            outcomes["loaded"] += 1
        except LayoutError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 1000 and len(all_paths) > 30, outcomes


def test_verify_checks_geometry_element_type_data_and_device_slots():
    from evssd.host.device import Device
    lay, tabs = _layout()
    with Device.open("model", page_size=1024, pages_per_channel=64) as dev:
        lay.write(dev)
        assert lay.verify(dev) == lay.n_pages
        again = Layout.from_json(lay.to_json())
        assert again.verify(dev) == lay.n_pages
        # the device's slot was reconfigured behind the layout's back
        dev.configure_table(0, 32, "int32", [tuple(e) for e in lay.table("x").extents])
        with pytest.raises(LayoutError, match=r"table 'x': the device's slot 0 holds row_bytes 32, elem int32"):
            again.verify(dev)
        lay.configure(dev)
        # an in-memory edit of the element type (same row size) no longer matches the seal
        again.table("x").elem = "int32"
        with pytest.raises(LayoutError, match="geometry .* differs from the one its pages were written with"):
            again.verify(dev)
        # the element type edited along with the data: caught by the data check
        lay._arrays["x"] = tabs["x"].view(np.int32)
        with pytest.raises(LayoutError, match="data element type int32 != layout elem 'fp32'"):
            lay.verify(dev)
        lay._arrays["x"] = tabs["x"][:, :4]
        with pytest.raises(LayoutError, match=r"data shape \(300, 4\) != layout \(300, 8\)"):
            lay.verify(dev)
    with Device.open("model", page_size=1024, pages_per_channel=64) as fresh:
        with pytest.raises(LayoutError, match="slot 0 is not configured on the device"):
            Layout.from_json(lay.to_json()).verify(fresh)


def test_load_names_non_object_json():
    with pytest.raises(LayoutError, match="expected an object at the top, got list"):
        Layout.from_json("[1, 2]")
    with pytest.raises(LayoutError, match="unsupported layout version"):
        Layout.from_json('{"format": "evssd-layout", "version": "1"}')
