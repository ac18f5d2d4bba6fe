"""cocotb module behind `evssd bench rtl`: cycle counts of the RTL, measured in simulated cycles.

Configuration comes as JSON in ``EVSSD_BENCH_RTL`` and the report goes to the path in
``EVSSD_BENCH_RTL_REPORT``. No back-pressure on the bus models (this measures the device, not
the testbench): the host RAM and every channel RAM answer at full rate.
"""
import json
import os

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles
from cocotb.utils import get_sim_time
from cocotbext.axi import AxiBus, AxiRam

from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.hw.regmap import default_slots
from evssd.hw.regmap import Opcode
from evssd.sim.bench_rtl import gather_cycles, throughput_batches
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, quiet_cocotbext_axi, start_clock_and_reset

PERIOD_NS = 10


def _now_cycles():
    return int(get_sim_time("ns")) // PERIOD_NS


@cocotb.test()
async def bench(dut):
    cfg = json.loads(os.environ["EVSSD_BENCH_RTL"])
    p = load_meta()["params"]
    await start_clock_and_reset(dut, period_ns=PERIOD_NS)
    transport = CocotbTransport(dut, host_memory_bytes=4 << 20, poll_cycles=16)
    rams = [AxiRam(AxiBus.from_prefix(dut, f"m_axi_ch{c}", bus_separator="__"), dut.clk, dut.rst,
                   size=p.channel_bytes) for c in range(p.n_channels)]
    quiet_cocotbext_axi()
    dev = await AsyncDevice.open(transport, expect=p, sq_entries=16, cq_entries=16, timeout=3600)
    await dev.set_timing(t_r=cfg["t_r"])
    rng = np.random.default_rng(cfg["seed"])

    # One table spread over every page of the flash; rows written straight into the channel RAMs
    # (the bench measures lookups, not PROGRAM_PAGES).
    row_bytes = cfg["row_bytes"]
    rows_per_page = p.page_size // row_bytes
    n_pages = p.total_pages
    n_rows = n_pages * rows_per_page
    for lba in range(n_pages):
        page = rng.integers(0, 256, p.page_size, dtype=np.uint8).tobytes()
        rams[lba % p.n_channels].write((lba // p.n_channels) * p.page_size, page)
    await dev.configure_table(0, row_bytes, "fp32", [(0, n_rows, 0)])
    # The functional model runs the same lookups: its cycle estimate is compared with the RTL's.
    # (with the RTL build's reorder-buffer slots: a --slots build is not the default one)
    top_args = load_meta().get("top_args", {})
    n_slots = top_args.get("n_slots") or default_slots(p)
    model = await AsyncDevice.open(ModelTransport(p, host_memory_bytes=16 << 20, n_slots=n_slots,
                                                  read_queue=top_args.get("read_queue")),
                                   sq_entries=16, cq_entries=16)
    await model.set_timing(t_r=cfg["t_r"])
    flash = np.zeros((n_pages, p.page_size), np.uint8)
    for lba in range(n_pages):
        flash[lba] = np.frombuffer(rams[lba % p.n_channels].read((lba // p.n_channels) * p.page_size,
                                                                 p.page_size), np.uint8)
    await model.program_pages(0, flash)
    await model.configure_table(0, row_bytes, "fp32", [(0, n_rows, 0)])

    def model_cycles(batches):
        """The model's estimate for the same commands, submitted together like on the RTL."""
        return gather_cycles(model, batches)

    report = {"params": p.as_dict(), "t_r": cfg["t_r"], "row_bytes": row_bytes, "throughput": [],
              "amplification": {}, "latency": {}}

    # ---- sustained throughput: several large gathers in flight
    for n in cfg["throughput_sizes"]:
        c0 = await dev.counters()
        start = _now_cycles()
        batches = throughput_batches(n_rows, n, cfg["inflight"], cfg["seed"])
        handles = [await dev.submit_gather(0, idx) for idx in batches]
        for h in handles:
            await dev.finish(h)
        cycles = _now_cycles() - start
        m_cycles = await model_cycles(batches)
        c1 = await dev.counters()
        lookups = n * cfg["inflight"]
        report["throughput"].append({
            "lookups": lookups, "cycles": cycles, "lookups_per_cycle": lookups / cycles,
            "model_cycles": m_cycles, "model_over_rtl": m_cycles / cycles,
            "device_busy_cycles": c1["busy_cycles"] - c0["busy_cycles"],
            "tr_waits": sum(a["tr_waits"] - b["tr_waits"] for a, b in zip(c1["channels"], c0["channels"])),
        })

    # ---- read amplification: bytes over the channel buses per lookup, fine vs block mode
    n = cfg["amp_lookups"]
    idx = rng.integers(0, n_rows, n)
    for mode in ("fine", "block") if n else ():     # a sweep measures throughput only
        await dev.set_block_mode(mode == "block")
        c0 = await dev.counters()
        await dev.gather(0, idx)
        await ClockCycles(dut.clk, 4 * p.page_size // (p.ch_data_bits // 8) + 100)
        c1 = await dev.counters()
        moved = sum(a["bytes"] - b["bytes"] for a, b in zip(c1["channels"], c0["channels"]))
        report["amplification"][mode] = {"lookups": n, "channel_bytes": moved,
                                         "bytes_per_lookup": moved / n,
                                         "amplification": moved / (n * row_bytes)}
    await dev.set_block_mode(False)

    # ---- latency per batch (submit to completion seen by the driver), one batch at a time
    for size in cfg["latency_sizes"]:
        samples, m_samples = [], []
        for _ in range(cfg["latency_batches"]):
            idx = rng.integers(0, n_rows, size)
            start = _now_cycles()
            await dev.gather(0, idx)
            samples.append(_now_cycles() - start)
            m_samples.append(await model_cycles([idx]))
        report["latency"][str(size)] = {"samples": samples, "model_samples": m_samples,
                                        "model_p50": float(np.percentile(m_samples, 50)),
                                        "p50": float(np.percentile(samples, 50)),
                                        "p99": float(np.percentile(samples, 99))}
    report["counters"] = await dev.counters()
    with open(os.environ["EVSSD_BENCH_RTL_REPORT"], "w") as fh:
        json.dump(report, fh, indent=2)
