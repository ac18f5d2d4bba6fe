"""The ``evssd`` backend: the EV-SSD through :class:`evssd.host.device.Device` (any transport),
tables placed by :mod:`evssd.host.layout`. Unweighted bags of the device's element types are
pooled on the device (``GATHER_POOLED``; int8_rowwise tables too when the device's CAPS says it
pools them: their slots are then configured as INT8_ROWWISE); everything else is gathered
(``GATHER``) and pooled on the host. A multi-table batch submits one command per table before waiting for any."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from evssd.host.store.backend import Backend, Tables
from evssd.host.store.tables import DTYPES, TableInfo
from evssd.hw.regmap import pooled_row_bytes

__all__ = ["EvssdBackend"]


def _device_runner(device):
    """How to run a coroutine of the driver's async core on ``device``: the driver's public,
    thread-safe ``Device.run`` (None for a device object without one, e.g. a test double)."""
    return getattr(device, "run", None)


class EvssdBackend(Backend):
    """The EV-SSD through the driver. ``bytes_read`` counts result bytes returned by DMA."""
    name = "evssd"
    thread_safe = False  # the driver's sync facade runs one private event loop

    def __init__(self, device, layout, owns_device: bool = False, device_pooling: bool = True):
        """``layout`` must already be on ``device``; ``owns_device``: close it in :meth:`close`."""
        super().__init__()
        self.device_pooling = device_pooling
        self.device = device
        self.layout = layout
        self.owns_device = owns_device
        self._ids = {t.name: t for t in layout.tables}
        self._rowwise_names: set[str] = set()   # int8_rowwise tables the device pools

    def read_rows(self, info, indices):
        if len(indices) == 0:
            return np.zeros((0, info.dim), info.dtype)
        raw = self.device.gather(self._ids[info.name].table_id, indices.astype(np.uint32))
        self._count(1, 0, 0)
        return self._rows_view(info, raw, len(indices))

    @classmethod
    def create(cls, tables: Tables, *, device=None, layout_options: Mapping | None = None,
               device_pooling: bool = True) -> "EvssdBackend":
        """Place the tables (:meth:`evssd.host.layout.Layout.plan`) on ``device`` and write them;
        without a device, open the functional model (its flash is sparse and large enough for
        any table set)."""
        from evssd.host.device import Device
        from evssd.host.layout import Layout
        owns = device is None
        # int8_rowwise rows are placed as raw int8 bytes (no dtype names them)
        placed = {n: (a.view(np.int8) if el.extra else a) for n, (a, el, _) in tables.items()}
        if owns:
            device = Device.open("model")
        try:
            layout = Layout.plan(placed, device=device, **(layout_options or {}))
            layout.write(device)
            rowwise = [t for t in layout.tables if tables[t.name][1].extra]
            if rowwise and device_pooling and device.supports("int8_rowwise"):
                for t in rowwise:  # same pages; the slot now pools them as row-wise INT8
                    device.configure_table(t.table_id, t.row_bytes, "int8_rowwise",
                                           [tuple(e) for e in t.extents])
            layout.forget_data()  # the device holds the rows now; do not pin the arrays
        except BaseException:
            if owns:
                device.close()
            raise
        backend = cls(device, layout, owns_device=owns, device_pooling=device_pooling)
        backend._rowwise_names = {t.name for t in rowwise} if device_pooling and rowwise and \
            device.supports("int8_rowwise") else set()
        return backend

    def table_infos(self) -> dict[str, TableInfo]:
        return {t.name: TableInfo(t.name, t.rows, t.dim, DTYPES[t.elem]) for t in self.layout.tables}

    def pools(self, info):
        if info.el.extra:
            return self.device_pooling and info.name in self._rowwise_names
        return self.device_pooling and info.el.device is not None

    def read_pooled(self, info, indices, offsets):
        if len(indices) == 0:  # nothing for the device to do: every bag is empty
            return np.zeros((len(offsets) - 1, info.dim), info.acc_dtype)
        raw = self.device.gather_pooled(self._ids[info.name].table_id, indices.astype(np.uint32),
                                        offsets.astype(np.uint32))
        self._count(1, 0, 0)
        return self._pooled_view(info, raw, len(offsets) - 1, len(indices))

    def _rows_view(self, info, raw, n, count: bool = True):
        row_bytes = self._ids[info.name].row_bytes  # padded to a multiple of 4 by the layout
        raw = np.asarray(raw, dtype=np.uint8).reshape(n, row_bytes)
        if count:
            self._count(0, n, raw.nbytes)
        if row_bytes == info.row_bytes:  # no padding: the driver's array is the rows (no copy)
            return raw.view(info.dtype).reshape(n, info.width)
        return np.ascontiguousarray(raw[:, :info.row_bytes]).view(info.dtype).reshape(n, info.width)

    def _pooled_view(self, info, raw, n_bags, n):
        # pad elements widen too; a row-wise INT8 header gives no output
        width = pooled_row_bytes(self._ids[info.name].row_bytes, info.el.device)
        raw = np.asarray(raw, dtype=np.uint8).reshape(n_bags, width)
        self._count(0, n, raw.nbytes)
        return np.ascontiguousarray(raw[:, :info.dim * 4]).view(info.acc_dtype).reshape(n_bags, info.dim)

    def read_many(self, jobs):
        """Submit every command of the batch before waiting for the first, so the device
        overlaps them (one command per table); through the driver's async core."""
        aio = getattr(self.device, "aio", None)
        run = _device_runner(self.device)
        if aio is None or run is None or len(jobs) < 2 or any(len(j[2]) == 0 for j in jobs):
            return super().read_many(jobs)

        requests = []
        for kind, info, idx, offs in jobs:
            tid = self._ids[info.name].table_id
            requests.append((tid, idx.astype(np.uint32)) if kind == "rows" else
                            (tid, idx.astype(np.uint32), offs.astype(np.uint32)))
        # all or nothing: a table that fails leaves none of the others in flight; the driver
        # hands the batch to the device with one doorbell
        raws = run(aio.gather_many(requests))
        out, rows, nbytes = [], 0, 0
        for (kind, info, idx, offs), raw in zip(jobs, raws):
            if kind == "rows":
                out.append(self._rows_view(info, raw, len(idx), count=False))
                rows += len(idx)
                nbytes += raw.nbytes
            else:
                out.append(self._pooled_view(info, raw, len(offs) - 1, len(idx)))
        self._count(len(jobs), rows, nbytes)
        return out

    def close(self):
        if self.owns_device:
            self.device.close()


