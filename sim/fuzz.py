"""Fuzz the command path: random descriptors, valid and invalid, through the real driver.

One body for every backend (like :mod:`evssd.sim.scenarios`): ``tests/test_fuzz.py`` runs it on
the functional model (thousands of commands), ``sim/tb_fuzz.py`` on the RTL in Verilator (a few
hundred, each also run on the model in lockstep). Every command is built from a random *recipe*
(opcode, table, sizes, LBA, offsets, index values, and how each address is spoilt: misaligned,
outside the host window) and submitted with :meth:`AsyncDevice.submit_raw`. Checks per command:

- it completes with a status, and the status is the one :class:`evssd.hw.regmap.Status`'s rules
  give for this descriptor (decided here independently of the model);
- guard bytes around every buffer are intact, and a status that writes nothing left the result
  buffer untouched;
- a GATHER/GATHER_POOLED that ran has the numpy golden's rows/sums and n_bad/first_bad;
- with a ``twin`` device (the model beside the RTL): the same status, n_bad, first_bad and result
  bytes.

Afterwards host memory and the queues are back at their starting state and ordinary requests
are served correctly. No cocotb import here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evssd.hw.regmap import NO_BAD_POSITION, Command, Opcode, Status
from evssd.host.device import AsyncDevice
from evssd.host.pooling import pool_rows
from evssd.sim.scenarios import load, place_tables

__all__ = ["fuzz_commands", "FuzzStats"]

GUARD = 64
GUARD_BYTE = 0xEE
FILL_BYTE = 0xCD
VALID_OPS = [int(o) for o in Opcode]
NO_WRITE = {Status.BAD_OPCODE, Status.BAD_ADDRESS, Status.TABLE_DISABLED, Status.RESULT_OVERFLOW,
            Status.BAD_OFFSETS, Status.BAD_LBA}


@dataclass
class FuzzStats:
    commands: int = 0
    statuses: dict = field(default_factory=dict)

    def add(self, status):
        self.commands += 1
        name = Status(status).name if status in Status._value2member_map_ else hex(status)
        self.statuses[name] = self.statuses.get(name, 0) + 1


class _Buffer:
    """A device-visible buffer with guard bytes on both sides (one allocation)."""

    def __init__(self, dev: AsyncDevice, size: int):
        self.dev, self.size = dev, size
        self.base = dev.transport.alloc(size + 2 * GUARD)
        self.addr = self.base + GUARD

    async def fill(self, data: bytes = b""):
        body = bytes(data) + bytes([FILL_BYTE]) * (self.size - len(data))
        await self.dev.transport.mem_write(self.base, bytes([GUARD_BYTE]) * GUARD + body +
                                           bytes([GUARD_BYTE]) * GUARD)

    async def read(self):
        raw = await self.dev.transport.mem_read(self.base, self.size + 2 * GUARD)
        return raw[:GUARD], raw[GUARD:GUARD + self.size], raw[GUARD + self.size:]

    def free(self):
        self.dev.transport.free(self.base)


def _recipe(rng, params, tables, *, in_window_only: bool, max_count: int):
    """A random descriptor, as plain numbers (materialised per device by :func:`_materialise`)."""
    r = {}
    u = rng.random()
    if u < 0.35:
        r["opcode"] = int(Opcode.GATHER)
    elif u < 0.65:
        r["opcode"] = int(Opcode.GATHER_POOLED)
    elif u < 0.75:
        r["opcode"] = int(Opcode.READ_PAGES)
    elif u < 0.80:
        r["opcode"] = int(Opcode.PROGRAM_PAGES)
    elif u < 0.85:
        r["opcode"] = int(Opcode.NOP)
    else:
        r["opcode"] = int(rng.choice([o for o in range(256) if o not in VALID_OPS]))
    u = rng.random()
    configured = [t.slot for t in tables]
    if u < 0.8:
        r["table"] = int(rng.choice(configured))
    elif u < 0.9:
        free = [s for s in range(params.max_tables) if s not in configured]
        r["table"] = int(rng.choice(free)) if free else int(params.max_tables)
    else:
        r["table"] = int(rng.integers(params.max_tables, 256))
    r["count"] = int(rng.integers(0, max_count + 1))
    r["n_bags"] = int(rng.integers(0, 9))
    if not in_window_only and r["opcode"] == Opcode.GATHER and rng.random() < 0.05:
        # a count whose result no 32-bit dst_bytes can hold: RESULT_OVERFLOW before any read
        r["count"] = int(rng.choice([1 << 31, (1 << 32) - 1]))
    # page commands: mostly inside the flash, some running past its end
    total = params.total_pages
    r["lba"] = int(rng.integers(0, total)) if rng.random() < 0.8 else int(rng.integers(total - 2, total + 3))
    r["page_count"] = int(rng.integers(0, 4))
    if rng.random() < 0.05 and not in_window_only:
        r["lba"] = int(rng.choice([total, (1 << 32) - 1]))
    # indices: mostly good, some past the table, some 0xFFFFFFFF
    t = next((t for t in tables if t.slot == r["table"]), tables[0])
    idx = rng.integers(0, t.rows, max(r["count"], 0) if r["count"] <= max_count else 0)
    bad = rng.random(idx.size) < (0.1 if rng.random() < 0.4 else 0.0)
    idx[bad] = rng.choice([t.rows, t.rows + 7, 0xFFFF_FFFF], int(bad.sum()))
    r["indices"] = idx.astype("<u4")
    # offsets: valid bags, or decreasing, or past the count
    n = min(r["count"], max_count)
    cuts = np.sort(rng.integers(0, n + 1, r["n_bags"])) if r["n_bags"] else np.array([], np.int64)
    offs = np.concatenate([[0], cuts]).astype(np.int64)
    if r["n_bags"]:
        offs[-1] = n if rng.random() < 0.7 else offs[-1]
    u = rng.random()
    if u < 0.08 and offs.size > 2:
        k = int(rng.integers(1, offs.size))
        offs[k - 1], offs[k] = offs[k] + 1, offs[k - 1]  # decreasing
    elif u < 0.14:
        offs[-1] = n + int(rng.integers(1, 5))            # past the count
    r["offsets"] = offs.astype("<u4")
    # per address: "ok", "misaligned" or "outside" the window
    r["spoil"] = {}
    for which in ("src", "offsets", "dst"):
        u = rng.random()
        r["spoil"][which] = ("misaligned" if u < 0.04 else
                             "outside" if u < 0.07 and not in_window_only else "ok")
    r["misalign"] = int(rng.choice([4, 8, 32, 60]))
    r["dst_slack"] = int(rng.choice([0, 0, 0, -4, -64, 64, 128])) if rng.random() < 0.5 else 0
    return r


def _sizes(r, params, tables):
    """(out_bytes, src_bytes) the device would need for the recipe (0 where not used)."""
    op = r["opcode"]
    t = next((t for t in tables if t.slot == r["table"]), None)
    ps = params.page_size
    if op == Opcode.GATHER:
        return (r["count"] * t.row_bytes if t else r["count"] * 4), 4 * len(r["indices"])
    if op == Opcode.GATHER_POOLED:
        return (r["n_bags"] * t.elem.itemsize and r["n_bags"] * (t.row_bytes // t.elem.itemsize) * 4
                if t else r["n_bags"] * 4), 4 * len(r["indices"])
    if op == Opcode.READ_PAGES:
        return r["page_count"] * ps, 0
    if op == Opcode.PROGRAM_PAGES:
        return 0, r["page_count"] * ps
    return 0, 0


async def _materialise(dev, r, params, tables, pages):
    """Buffers and the Command for one device; returns (command, buffers dict)."""
    op = r["opcode"]
    out_bytes, src_bytes = _sizes(r, params, tables)
    ps = params.page_size
    bufs = {}
    if op in (Opcode.GATHER, Opcode.GATHER_POOLED):
        src_data = r["indices"].tobytes()
    elif op == Opcode.PROGRAM_PAGES:
        # write back what the flash holds already, so the tables stay as they are
        src_data = b"".join(pages.get(r["lba"] + k, np.zeros(ps, np.uint8)).tobytes()
                            for k in range(r["page_count"]))
    else:
        src_data = b""
    bufs["src"] = _Buffer(dev, max(len(src_data), 4) + 64)
    await bufs["src"].fill(src_data)
    bufs["offsets"] = _Buffer(dev, max(4 * len(r["offsets"]), 4) + 64)
    await bufs["offsets"].fill(r["offsets"].tobytes())
    dst_size = max(out_bytes, 4) if out_bytes <= 1 << 16 else 256  # huge results: a small buffer
    bufs["dst"] = _Buffer(dev, dst_size + 128)
    await bufs["dst"].fill()
    mem = dev.transport.memory
    addr = {}
    # An address outside the window only where the command moves bytes through it (whether a
    # zero-length access is a bus error is not part of the device's contract).
    count = r["page_count"] if op in (Opcode.READ_PAGES, Opcode.PROGRAM_PAGES) else r["count"]
    moved = {"src": src_bytes if op != Opcode.GATHER_POOLED else 4 * count,
             "offsets": 4 * (r["n_bags"] + 1), "dst": out_bytes}
    if op == Opcode.GATHER:
        moved["src"] = 4 * count
    for which in r["spoil"]:
        if r["spoil"][which] == "outside" and not moved[which]:
            r["spoil"][which] = "ok"
    for which, buf in bufs.items():
        a = buf.addr
        spoil = r["spoil"][which]
        if spoil == "misaligned":
            a += r["misalign"]
        elif spoil == "outside":
            a = mem.base + mem.size + 64 * 4096
        addr[which] = a
    dst_bytes = max(0, min(out_bytes + r["dst_slack"], dst_size + 128))
    lba = r["lba"] if op in (Opcode.READ_PAGES, Opcode.PROGRAM_PAGES) else 0
    cmd = Command(opcode=op, table=r["table"], count=count, n_bags=r["n_bags"], lba=lba,
                  src_addr=addr["src"], offsets_addr=addr["offsets"], dst_addr=addr["dst"],
                  dst_bytes=dst_bytes)
    return cmd, bufs, out_bytes


def _expected(r, cmd, params, tables, out_bytes):
    """(status, n_bad, first_bad, result bytes or None) by Status's rules, from the recipe."""
    op = cmd.opcode
    ok = lambda which: r["spoil"][which] != "outside"  # noqa: E731
    if op not in VALID_OPS:
        return Status.BAD_OPCODE, 0, NO_BAD_POSITION, None
    if op == Opcode.NOP:
        return Status.OK, 0, NO_BAD_POSITION, None
    used = {Opcode.GATHER: ("src", "dst"), Opcode.GATHER_POOLED: ("src", "offsets", "dst"),
            Opcode.PROGRAM_PAGES: ("src",), Opcode.READ_PAGES: ("dst",)}[op]
    if any(r["spoil"][w] == "misaligned" for w in used):
        return Status.BAD_ADDRESS, 0, NO_BAD_POSITION, None
    ps = params.page_size
    if op in (Opcode.PROGRAM_PAGES, Opcode.READ_PAGES):
        if op == Opcode.READ_PAGES and cmd.count * ps > cmd.dst_bytes:
            return Status.RESULT_OVERFLOW, 0, NO_BAD_POSITION, None
        if cmd.lba + cmd.count > params.total_pages:
            return Status.BAD_LBA, 0, NO_BAD_POSITION, None
        if cmd.count and not ok(used[0]):
            return Status.BUS_ERROR, 0, NO_BAD_POSITION, None
        return Status.OK, 0, NO_BAD_POSITION, None
    t = next((t for t in tables if t.slot == cmd.table), None)
    if t is None:
        return Status.TABLE_DISABLED, 0, NO_BAD_POSITION, None
    if out_bytes > cmd.dst_bytes:
        return Status.RESULT_OVERFLOW, 0, NO_BAD_POSITION, None
    pooled = op == Opcode.GATHER_POOLED
    idx = r["indices"].astype(np.int64)
    if pooled:
        if not ok("offsets"):
            return Status.BUS_ERROR, 0, NO_BAD_POSITION, None
        offs = r["offsets"].astype(np.int64)
        if np.any(np.diff(offs) < 0) or offs[-1] > cmd.count:
            return Status.BAD_OFFSETS, 0, NO_BAD_POSITION, None
    if (cmd.count and not ok("src")) or (out_bytes and not ok("dst")):
        return Status.BUS_ERROR, 0, NO_BAD_POSITION, None
    used_pos = np.zeros(idx.size, bool)
    if pooled:
        for b in range(cmd.n_bags):
            used_pos[offs[b]:offs[b + 1]] = True
    else:
        used_pos[:] = True
    bad = used_pos & (idx >= t.rows)
    n_bad = int(bad.sum())
    first = int(np.flatnonzero(bad)[0]) if n_bad else NO_BAD_POSITION
    status = Status.BAD_INDEX if n_bad else Status.OK
    good_idx = np.where(idx < t.rows, idx, 0)
    rows = t.data[good_idx].copy()
    rows[idx >= t.rows] = 0
    if pooled:
        out = [np.asarray(pool_rows(t.data[idx[offs[b]:offs[b + 1]][idx[offs[b]:offs[b + 1]] < t.rows]], t.elem))
               for b in range(cmd.n_bags)]
        dt = np.dtype(t.elem.pooled_dtype)
        result = (np.stack(out).astype(dt, copy=False) if out else np.zeros((0, 1), dt)).tobytes()
    else:
        result = rows.view(np.uint8).tobytes()
    return status, n_bad, first, result


async def _run_one(dev, r, params, tables, pages, *, golden: bool):
    cmd, bufs, out_bytes = await _materialise(dev, r, params, tables, pages)
    cpl = await dev.submit_raw(cmd)
    contents = {w: await b.read() for w, b in bufs.items()}
    for b in bufs.values():
        b.free()
    what = f"{dev.transport.name}: {cmd} -> {cpl}"
    for w, (lo, body, hi) in contents.items():
        assert set(lo) == {GUARD_BYTE} and set(hi) == {GUARD_BYTE}, f"{what}: guard bytes of {w} overwritten"
    dst = contents["dst"][1]
    if golden:
        status, n_bad, first, result = _expected(r, cmd, params, tables, out_bytes)
        assert cpl.status == status, f"{what}: expected {Status(status).name}"
        if status in (Status.OK, Status.BAD_INDEX) and cmd.opcode in (Opcode.GATHER, Opcode.GATHER_POOLED):
            assert (cpl.n_bad, cpl.first_bad) == (n_bad, first), f"{what}: expected n_bad {n_bad} first {first}"
            assert dst[:len(result)] == result, f"{what}: result differs from numpy"
            assert set(dst[len(result):]) <= {FILL_BYTE}, f"{what}: wrote past its result"
    if cpl.status in NO_WRITE or cmd.opcode in (Opcode.NOP, Opcode.PROGRAM_PAGES) \
            or cmd.opcode not in VALID_OPS:
        assert set(dst) == {FILL_BYTE}, f"{what}: a command that writes nothing wrote its buffer"
    return cpl, dst


async def fuzz_commands(dev: AsyncDevice, rng: np.random.Generator, n_commands: int, *,
                        twin: AsyncDevice | None = None, in_window_only: bool = False,
                        max_count: int = 48, n_tables: int = 3, check_every: int = 50) -> FuzzStats:
    """Run ``n_commands`` random descriptors on ``dev`` (and on ``twin`` in lockstep)."""
    params = dev.params
    tables, pages = place_tables(params, rng, min(n_tables, params.max_tables - 1), max_rows=200)
    devs = [dev] + ([twin] if twin is not None else [])
    for d in devs:
        await load(d, tables, pages)
    start = [(d.transport.memory.free_bytes, len(d._inflight)) for d in devs]
    before = (await dev.counters())["commands"]
    stats = FuzzStats()
    for k in range(n_commands):
        r = _recipe(rng, params, tables, in_window_only=in_window_only, max_count=max_count)
        cpl, dst = await _run_one(dev, r, params, tables, pages, golden=True)
        stats.add(cpl.status)
        if twin is not None:
            cpl2, dst2 = await _run_one(twin, r, params, tables, pages, golden=False)
            assert (cpl.status, cpl.n_bad, cpl.first_bad) == (cpl2.status, cpl2.n_bad, cpl2.first_bad), \
                f"{r}: {dev.transport.name} {cpl} != {twin.transport.name} {cpl2}"
            if cpl.status in (Status.OK, Status.BAD_INDEX):
                assert dst == dst2, f"{r}: result bytes differ between the devices"
        if (k + 1) % check_every == 0 or k + 1 == n_commands:
            await _ordinary_requests(dev, rng, tables)
    after = (await dev.counters())["commands"]
    assert after - before >= n_commands, (before, after)
    for d, (free, inflight) in zip(devs, start):
        assert (d.transport.memory.free_bytes, len(d._inflight)) == (free, inflight), \
            f"{d.transport.name}: host memory or queue slots not back to their starting state"
    return stats


async def _ordinary_requests(dev, rng, tables):
    for t in tables:
        idx = rng.integers(0, t.rows, 12).astype(np.uint32)
        got = await dev.gather(t.slot, idx)
        assert got.tobytes() == t.data[idx].view(np.uint8).tobytes(), "ordinary GATHER wrong after fuzzing"
