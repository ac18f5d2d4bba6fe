"""Table files and table names (issue 16.4): corrupt row data is an error naming the row, table
names cannot leave the store directory, failed writes leave nothing, bad dtypes get the store's
own error, old files a clear one."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from evssd.host.store import (EmbeddingStore, RowwiseInt8, StoreInputError, TableFileError, open_table_file,
                              verify_table_file, write_table_file)


def _flip(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


@pytest.mark.parametrize("mode", ["row", "page"])
def test_bit_flip_in_row_data_names_the_row(tmp_path, mode):
    t = np.arange(300 * 8, dtype=np.float32).reshape(300, 8)
    p = write_table_file(tmp_path / "t.evt", t)
    tf = open_table_file(p)
    _flip(p, tf.row_offset(200) + 5, bit=3)
    with EmbeddingStore.from_files({"t": p}, file_mode=mode, cache_fraction=None) as s:
        np.testing.assert_array_equal(s.gather("t", [199, 201]), t[[199, 201]])  # neighbours still served
        with pytest.raises(TableFileError, match=r"t\.evt: row 200 \(page 1, file offset \d+\) is corrupt"):
            s.pooled("t", [1, 200], [0, 2])
    with pytest.raises(TableFileError, match="row 200"):
        open_table_file(p, verify=True)
    with EmbeddingStore.from_files({"t": p}, file_mode=mode, cache_fraction=None, verify=False) as s:
        assert not np.array_equal(s.gather("t", [200]), t[[200]])  # unchecked: the flipped row


def test_corrupt_checksum_trailer_and_geometry(tmp_path):
    t = np.ones((40, 3), np.int8)
    p = write_table_file(tmp_path / "t.evt", t)
    tf = open_table_file(p)
    verify_table_file(tf)
    _flip(p, tf.crc_offset + 9)
    with pytest.raises(TableFileError, match="row-checksum trailer .* is corrupt"):
        open_table_file(p)


def test_version_1_files_are_refused_clearly(tmp_path):
    p = write_table_file(tmp_path / "t.evt", np.ones((4, 4), np.float32))
    head = bytearray(p.read_bytes()[:60])
    head[8:12] = struct.pack("<I", 1)
    with open(p, "r+b") as f:
        f.write(bytes(head) + struct.pack("<I", zlib.crc32(bytes(head))))
    with pytest.raises(TableFileError, match="version 1 has no row checksums .* rewrite the table"):
        open_table_file(p)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a\\b", "x\0y", ""])
@pytest.mark.parametrize("backend", ["file", "dram"])
def test_table_names_cannot_leave_the_store_directory(tmp_path, name, backend):
    d = tmp_path / "store"
    with pytest.raises(StoreInputError, match="table name"):
        EmbeddingStore.from_arrays({name: np.ones((2, 2), np.float32)}, backend,
                                   **({"path": d} if backend == "file" else {}))
    assert not (tmp_path / "evil.evt").exists()
    assert not d.exists() or not any(d.iterdir())


def test_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    import evssd.host.store.tablefile as tfm

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tfm, "row_crcs", boom)
    with pytest.raises(OSError, match="No space left"):
        write_table_file(tmp_path / "t.evt", np.ones((10, 4), np.float32))
    assert list(tmp_path.iterdir()) == []
    # through the store, with its own temporary directory: nothing left either
    with pytest.raises(OSError):
        EmbeddingStore.from_arrays({"t": np.ones((10, 4), np.float32)}, "file", path=tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []


def test_unsupported_dtypes_get_the_stores_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(StoreInputError, match="table 'b'.*unsupported element type.*bfloat16"):
        EmbeddingStore.from_arrays({"b": torch.ones((4, 4), dtype=torch.bfloat16)})
    with pytest.raises(StoreInputError, match="table 'c'.*unsupported element type complex64"):
        EmbeddingStore.from_arrays({"c": np.ones((4, 4), np.complex64)})
    with pytest.raises(StoreInputError, match="table 'c'.*unsupported element type"):
        EmbeddingStore.from_arrays({"c": torch.ones((4, 4), dtype=torch.complex64)})
    with pytest.raises(StoreInputError, match="int8_rowwise rows must be a 2-D uint8"):
        EmbeddingStore.from_arrays({"q": RowwiseInt8(np.ones((4, 8), np.int8))})


def test_rowwise_int8_table_file_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (50, 20), dtype=np.uint8)
    tf = open_table_file(write_table_file(tmp_path / "q.evt", RowwiseInt8(raw)))
    assert (tf.elem, tf.dim, tf.width) == ("int8_rowwise", 16, 20)
    np.testing.assert_array_equal(tf.read_all(), raw)


def test_unknown_backend_option_is_named():
    with pytest.raises(StoreInputError, match="backend 'dram' takes no option 'path'"):
        EmbeddingStore.from_arrays({"t": np.ones((2, 2), np.float32)}, "dram", path="/tmp/x")
