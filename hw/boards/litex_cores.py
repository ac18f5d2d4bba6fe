"""The ECPIX-5's two LiteX cores, generated as Verilog at build time (never committed).

- **LiteDRAM** (``litedram_core``): the DDR3 controller for the board's MT41K256M16 (x16, 512 MiB)
  with LiteDRAM's ``ECP5DDRPHY`` and its clock generator (PLL from the 100 MHz oscillator, the
  sys clock at :data:`SYS_CLK_HZ` = the EV-SSD's clock, DDR3 at 2x sys), the settings of LiteX's
  own ECPIX-5 target; one 64-bit AXI4 user port (the channels' :class:`~evssd.hw.lib.axi_arbiter.AXIArbiter`
  output, ID width 3); no CPU: its control/status registers (``wb_ctrl``, Wishbone) are the path
  for DRAM initialisation and read levelling.
- **LiteEth** (``liteeth_core``): UDP/IP with ``LiteEthECP5PHYRGMII``, a fixed MAC and IP
  address, ARP and ICMP answered in gateware, and one raw 8-bit UDP port listening on
  :data:`~evssd.hw.udp_protocol.DEFAULT_PORT` (the :class:`~evssd.hw.boards.udp_bridge.UdpAxiBridge`).
  ``liteeth_gen``'s own raw port listens on the port its *transmit* side names (the peer's port
  for a bridge that answers), so this module builds the core with the listening port fixed.

:func:`generate` runs each generator in a child Python process (Migen and LiteX never enter the
evssd process) and rewrites the output only when the configuration changed. ``python -m
evssd.hw.boards.litex_cores {dram,eth} CONFIG.json OUTDIR`` is that child.

The generated Verilog is part of the board's build digest, so it must be a function of the
configuration and the generator versions alone. LiteX writes three things that are not: a
header with the date and the git revision of whatever repository its package sits in, and a
hierarchy tree in a comment whose order follows Python's string hashing (it changes from run to
run). The child runs with ``PYTHONHASHSEED=0``, and :func:`normalise_verilog` removes every
comment from the generated files (yosys never reads them), so two generations give the same
bytes (tests/hw/test_litex_cores.py).

The LiteDRAM child also writes :data:`DRAM_DATA`: what the host needs to bring the DDR3 up
without a CPU (:mod:`evssd.host.dram_init`): the control/status register map of the generated
core (its ``csr.json``), LiteDRAM's own DDR3 init sequence and mode-register values
(``litedram.init``, the data its generated ``sdram_phy.h`` is written from) and the PHY's
levelling parameters. A copy is committed beside this file (:data:`COMMITTED_DRAM_DATA`) for the
host; :func:`check_dram_data` refuses a board build whose generated data differ from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ..udp_protocol import DEFAULT_PORT

__all__ = ["SYS_CLK_HZ", "DRAM_CONFIG", "ETH_CONFIG", "DRAM_DATA", "COMMITTED_DRAM_DATA", "generate",
           "normalise_verilog", "check_dram_data", "core_ports"]

SYS_CLK_HZ = 75_000_000     # LiteX's ECPIX-5 target runs its DDR3 controller here
DEVICE = "LFE5UM5G-85F-8BG554I"

DRAM_CONFIG = {
    "device": DEVICE,
    "cpu": None,
    "memtype": "DDR3",
    "sdram_module": "MT41K256M16",
    "sdram_module_nb": 2,          # byte groups of the x16 chip
    "sdram_rank_nb": 1,
    "sdram_phy": "ECP5DDRPHY",
    "input_clk_freq": 100e6,
    "sys_clk_freq": float(SYS_CLK_HZ),
    "init_clk_freq": 25e6,
    "cmd_buffer_depth": 16,
    "user_ports": {"axi_0": {"type": "axi", "id_width": 3, "data_width": 64}},
}

ETH_CONFIG = {
    "device": DEVICE,
    "phy": "LiteEthECP5PHYRGMII",
    "vendor": "lattice",
    "toolchain": "trellis",
    "clk_freq": SYS_CLK_HZ,
    # RGMII clock delays made in the FPGA (LiteEth's ECP5 defaults, as LiteX's ECPIX-5 target):
    # the first setting to look at when the link is up but no frame passes (docs/synthesis.md)
    "phy_tx_delay": 2e-9,
    "phy_rx_delay": 2e-9,
    "core": "udp",
    "mac_address": 0x10E2_D5E5_5D00,
    "ip_address": "192.168.1.50",
    "udp_port": DEFAULT_PORT,
    # A register stage (stream.Buffer) on the sys side of the MAC's receive clock-domain crossing:
    # without it the received frame's ready runs combinationally from the IP/ICMP/ARP depacketizers
    # back into the crossing FIFO's read port, 14.1 ns routed against the 13.3 ns of the 75 MHz sys
    # clock. Not on the transmit crossing: there the stage sits in the 125 MHz RGMII domain and
    # its path into the FIFO missed that clock by 0.3 ns.
    "rx_cdc_buffered": True,
}

NAMES = {"dram": "litedram_core", "eth": "liteeth_core"}

# The generators' child runs with a fixed string-hash seed (LiteX orders some output by it).
GENERATOR_ENV = {"PYTHONHASHSEED": "0"}
# Bumped whenever the post-processing of the generated Verilog changes: it is part of the cache key,
# so a core generated and post-processed by an older evssd is generated again.
POSTPROCESS_VERSION = 2

DRAM_DATA = "evssd_dram.json"           # written by the LiteDRAM child next to csr.json
COMMITTED_DRAM_DATA = Path(__file__).with_name("ecpix5_dram.json")   # the host's copy


def _key(kind: str, config: dict) -> str:
    from importlib.metadata import version
    pkg = {"dram": "litedram", "eth": "liteeth"}[kind]
    text = json.dumps({"config": config, "version": version(pkg), "litex": version("litex"),
                       "post": POSTPROCESS_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate(kind: str, build_dir: str | Path, config: dict | None = None, *, timeout: float = 600) -> Path:
    """Generate core ``kind`` (``dram`` or ``eth``) under ``build_dir``; returns its Verilog file.
    Reuses an earlier output of the same configuration and generator versions."""
    if kind not in NAMES:
        raise ValueError(f"core kind {kind!r}: choose one of {', '.join(NAMES)}")
    config = dict(config or (DRAM_CONFIG if kind == "dram" else ETH_CONFIG))
    try:
        key = _key(kind, config)
    except Exception as exc:  # PackageNotFoundError
        raise RuntimeError(f"the {kind} core needs the LiteX packages: pip install 'evssd[board]' ({exc})") from None
    out = Path(build_dir).resolve() / f"{NAMES[kind]}-{key}"
    verilog = out / "gateware" / f"{NAMES[kind]}.v"
    if verilog.exists():
        return verilog
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.json"
    cfg.write_text(json.dumps(config, indent=2, sort_keys=True))
    proc = subprocess.run([sys.executable, "-m", "evssd.hw.boards.litex_cores", kind, str(cfg), str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=out,
                          env={**os.environ, **GENERATOR_ENV})
    if proc.returncode != 0 or not verilog.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"generating {NAMES[kind]} failed (exit {proc.returncode}):\n{tail}")
    verilog.write_text(normalise_verilog(verilog.read_text()))
    return verilog


def normalise_verilog(text: str) -> str:
    """The generated Verilog as the build uses it: comments removed (LiteX's header carries the
    date and a git revision, its hierarchy comment an order that varies between runs), trailing
    blanks and runs of empty lines dropped, and the two fixes below applied."""
    return _fix_inouts(_drop_repeated_assigns(_strip_comments(text)))


_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|/\*.*?\*/|//[^\n]*', re.S)


def _strip_comments(text: str) -> str:
    """Remove ``/* */`` and ``//`` comments outside string literals; then trailing blanks and
    repeated empty lines."""
    text = _TOKEN.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)
    lines = [line.rstrip() for line in text.splitlines()]
    out = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def check_dram_data(verilog: str | Path) -> Path:
    """The DDR3 data (:data:`DRAM_DATA`) written with a generated LiteDRAM core (``verilog``, as
    :func:`generate` returns it) must equal the committed copy the host reads; returns its path.
    A difference means the host would initialise the board's DRAM with another core's registers
    or mode-register values: refused, with the command that updates the copy."""
    generated = Path(verilog).resolve().parent.parent / DRAM_DATA
    if not generated.exists():
        raise RuntimeError(f"{generated} is missing: the LiteDRAM core was generated without its DDR3 data")
    if not COMMITTED_DRAM_DATA.exists() or generated.read_text() != COMMITTED_DRAM_DATA.read_text():
        raise RuntimeError(f"the DDR3 initialisation data of the generated LiteDRAM core ({generated}) differ "
                           f"from the committed copy the host reads ({COMMITTED_DRAM_DATA}); if the core's "
                           f"configuration changed on purpose: cp {generated} {COMMITTED_DRAM_DATA}")
    return generated


def _drop_repeated_assigns(text: str) -> str:
    """LiteX writes some ``assign`` statements twice in a row (the same driver twice); yosys then
    reports multiple drivers. Keep one."""
    out, prev = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("assign ") and line == prev:
            continue
        out.append(line)
        prev = line
    return "".join(out)


def _fix_inouts(text: str) -> str:
    """The generators declare a pad that an I/O primitive drives both ways (``TRELLIS_IO``'s
    ``B``, e.g. the DDR3 ``dq``/``dqs``) as an ``input`` of the core; make those ports ``inout``."""
    import re
    pads = set(re.findall(r"\.B\s*\(\s*(\w+)", text))
    def fix(m):
        return m.group(0).replace("input ", "inout ", 1) if m.group(2) in pads else m.group(0)
    return re.sub(r"^(\s*input\s+wire\s*(?:\[\d+:\d+\])?\s*)(\w+)", fix, text, flags=re.M)


def core_ports(verilog: str | Path, module: str) -> dict[str, tuple[str, int]]:
    """``{port: (direction, width)}`` of ``module`` in a generated Verilog file (ANSI headers)."""
    import re
    text = Path(verilog).read_text()
    start = text.index(f"module {module}")
    header = text[start:text.index(");", start)]
    ports = {}
    for m in re.finditer(r"(input|output|inout)\s+wire\s*(?:\[(\d+):(\d+)\])?\s*(\w+)", header):
        d, hi, lo, name = m.groups()
        ports[name] = (d, int(hi) - int(lo) + 1 if hi else 1)
    return ports


# ------------------------------------------------------------------------------------------------
# The child process: runs the LiteX generators (imports Migen/LiteX).

def _gen_dram(config: dict, out: Path):
    from litedram import gen
    yml = out / "litedram.yml"
    # the generator reads YAML; JSON is YAML, None spelled as the generator expects
    yml.write_text(json.dumps(config).replace("null", '"None"'))
    sys.argv = ["litedram_gen", str(yml), "--output-dir", str(out), "--name", NAMES["dram"]]
    socs = []

    class KeepSoC(gen.Builder):
        """``litedram_gen``'s builder, keeping the SoC it builds (its DRAM settings are wanted)."""

        def __init__(self, soc, *args, **kwargs):
            socs.append(soc)
            super().__init__(soc, *args, **kwargs)

    gen.Builder = KeepSoC
    gen.main()
    data = _dram_data(socs[0], json.loads((out / "csr.json").read_text()), config)
    (out / DRAM_DATA).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _dram_data(soc, csr: dict, config: dict) -> dict:
    """The host's DDR3 bring-up data of a generated LiteDRAM core (see the module docstring)."""
    from litedram.init import get_sdram_phy_init_sequence, get_sdram_phy_py_header
    settings = soc.sdram.controller.settings
    phy, timing, geom = settings.phy, settings.timing, settings.geom
    # LiteDRAM's Python header defines the DFII control and command bits (dfii_control_cke = 0x02 ...)
    consts = {}
    for m in re.finditer(r"^(dfii_(?:control|command)_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)\s*$",
                         get_sdram_phy_py_header(phy, timing), re.M):
        consts[m.group(1)] = int(m.group(2), 0)
    steps = []
    sequence, _ = get_sdram_phy_init_sequence(phy, timing)
    for comment, address, bank, expr, delay in sequence:
        names = [n.strip().lower() for n in expr.split("|")]
        kind = "control" if all(n.startswith("dfii_control_") for n in names) else "command"
        value = 0
        for n in names:
            value |= consts[n]
        steps.append({"comment": comment, "address": address, "bank": bank, "kind": kind, "value": value,
                      "delay_cycles": delay})

    def plain(v):
        return int(v.reset.value) if hasattr(v, "reset") else int(v)

    return {
        "format": 1,
        "module": config["sdram_module"],
        "sys_clk_hz": int(config["sys_clk_freq"]),
        "csr_data_width": csr["constants"]["config_csr_data_width"],
        "registers": {name: {"addr": r["addr"], "words": r["size"], "access": r["type"]}
                      for name, r in csr["csr_registers"].items()},
        "dfii_control": {k[len("dfii_control_"):]: v for k, v in consts.items() if k.startswith("dfii_control_")},
        "dfii_command": {k[len("dfii_command_"):]: v for k, v in consts.items() if k.startswith("dfii_command_")},
        "init_sequence": steps,
        "phy": {"type": phy.phytype, "memtype": phy.memtype, "nphases": phy.nphases,
                "rdphase": plain(phy.rdphase), "wrphase": plain(phy.wrphase), "databits": phy.databits,
                "dfi_databits": phy.dfi_databits, "strobes": phy.strobes, "delays": phy.delays,
                "bitslips": phy.bitslips, "read_leveling": bool(phy.read_leveling),
                "write_leveling": bool(phy.write_leveling), "cl": phy.cl, "cwl": phy.cwl},
        "geometry": {"bankbits": geom.bankbits, "rowbits": geom.rowbits, "colbits": geom.colbits},
    }


def _gen_eth(config: dict, out: Path):
    from litex.build.generic_platform import Pins, Subsignal
    from litex.build.lattice.platform import LatticePlatform
    from litex.soc.integration.builder import Builder
    from liteeth import gen, phy as liteeth_phys

    class BridgeUDPCore(gen.UDPCore):
        """``liteeth_gen``'s UDP core with one raw 8-bit port listening on a fixed UDP port."""

        def __init__(self, platform, core_config):
            port = core_config.pop("udp_port")
            super().__init__(platform, core_config)
            platform.add_extension(gen.get_udp_raw_port_ios("evssd", 8))
            pads = platform.request("evssd")
            user = self.core.udp.crossbar.get_port(port, dw=8)
            rx, tx = user.source, user.sink
            self.comb += [
                tx.valid.eq(pads.sink_valid), tx.last.eq(pads.sink_last), pads.sink_ready.eq(tx.ready),
                tx.data.eq(pads.sink_data), tx.last_be.eq(pads.sink_last_be),
                tx.src_port.eq(pads.sink_src_port), tx.dst_port.eq(pads.sink_dst_port),
                tx.ip_address.eq(pads.sink_ip_address), tx.length.eq(pads.sink_length),
                pads.source_valid.eq(rx.valid), pads.source_last.eq(rx.last), rx.ready.eq(pads.source_ready),
                pads.source_data.eq(rx.data), pads.source_last_be.eq(rx.last_be),
                pads.source_src_port.eq(rx.src_port), pads.source_dst_port.eq(rx.dst_port),
                pads.source_ip_address.eq(rx.ip_address), pads.source_length.eq(rx.length),
                pads.source_error.eq(rx.error),
            ]

    config = dict(config)
    config["phy"] = getattr(liteeth_phys, config["phy"])
    platform = LatticePlatform(config["device"], io=[], toolchain=config["toolchain"])
    platform.add_extension(gen._io)
    soc = BridgeUDPCore(platform, config)
    builder = Builder(soc, output_dir=str(out), compile_gateware=False, csr_csv=str(out / "csr.csv"))
    builder.build(build_name=NAMES["eth"])


if __name__ == "__main__":
    kind, cfg_path, out_dir = sys.argv[1:4]
    cfg = json.loads(Path(cfg_path).read_text())
    {"dram": _gen_dram, "eth": _gen_eth}[kind](cfg, Path(out_dir))
