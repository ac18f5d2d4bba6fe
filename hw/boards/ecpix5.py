"""The EV-SSD on the LambdaConcept ECPIX-5: flash channels in DDR3, the host link over UDP.

:class:`Ecpix5Core` is everything except the I/O primitives and the two LiteX-generated cores
(the seam, so Verilator runs it): the UDP side is one raw UDP port of a LiteEth core
(``i_udp``/``o_udp``, 8 bits, the signals ``liteeth_gen`` exports), the DRAM side is one AXI4
user port of a LiteDRAM controller (``m_axi_dram``). A cocotb bench drives the UDP port at the
payload level and puts a bus model (cocotbext-axi ``AxiRam``) on ``m_axi_dram``;
:mod:`evssd.hw.boards.ecpix5_top` wraps it with the generated cores for the board.

Inside::

    i_udp -> UdpAxiBridge -> AXILiteSplit -> BridgeDecoder -+-> [slice] -> EVSSD.s_axil (registers)
    o_udp <-'                   |                            +-> board-info ROM
                                '-> m_dram_ctrl              +-> window.s_axil --.
    EVSSD.m_axi_host --> [slice] -----------------> window.s_axi --+- AxiBram (host memory)
    EVSSD.m_axi_ch[i] -> [slice] -> AXIArbiter.s_axi[i] -> m_axi_dram (channel i: region i)

The address map behind the bridge is the ULX3S board's (:mod:`evssd.hw.bridge_protocol`), so the
driver's :class:`~evssd.host.bridge_transport.BridgeTransport` serves both; the info block's
``divisor`` word is 0 (no UART). One window more, ``DRAM_CTRL_BASE``, reaches the DRAM
controller's control/status registers (``m_dram_ctrl``; the board top converts it to LiteDRAM's
Wishbone ``wb_ctrl``): the host initialises and levels the DDR3 through it. Everything runs in one clock domain, the DRAM controller's user
clock (LiteDRAM's ``user_clk``), so no clock-domain crossing is needed between the channels and
the controller; LiteEth crosses to its RGMII clocks itself. tR and the page registers stay in the
channel controllers: the DRAM only holds the bytes.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4LiteSignature, AXI4Signature
from ..lib.axi_arbiter import AXIArbiter
from .board import BridgeDecoder, _Stretch, _device_class, attach_device, register_sliced
from ..lib.axil_split import AXILiteSplit
from ..bridge_protocol import BOARD_MAGIC, BOARD_VERSION, DRAM_CTRL_BASE, DRAM_CTRL_BYTES, WINDOW_BASE
from ..device.channel import channel_addr_width
from ..regmap import Params
from .udp_bridge import UdpAxiBridge, UdpStreamSignature
from ..udp_protocol import DEFAULT_PORT

__all__ = ["Ecpix5Core", "ECPIX5_PARAMS", "ecpix5_params", "DRAM_BYTES", "region_bytes"]

DRAM_BYTES = 512 << 20      # one MT41K256M16 (x16, 4 Gbit) on the ECPIX-5

# 4 channels of 64 MiB (16,384 pages of 4 KiB) in the board's 512 MiB of DDR3; the channel bus is
# 64 bits wide, the width of the LiteDRAM user port the core generator is asked for.
ECPIX5_PARAMS = dict(n_channels=4, host_data_bits=64, ch_data_bits=64, page_size=4096, ways=2,
                     max_tables=8, max_extents=8, pages_per_channel=16384, max_inflight=2,
                     max_row_bytes=512)


def ecpix5_params(clock_hz: int = 75_000_000, **overrides) -> Params:
    """The board's build (75 MHz: LiteX's ECPIX-5 target runs its DDR3 controller there)."""
    return Params(**{**ECPIX5_PARAMS, "clock_hz": clock_hz, **overrides})


def region_bytes(params: Params) -> int:
    """Bytes of DRAM address space per channel: the channel's bytes rounded up to a power of two."""
    return 1 << max(12, (params.channel_bytes - 1).bit_length())


class Ecpix5Core(wiring.Component):
    """The EV-SSD behind the UDP bridge, its channels on one DRAM port.

    Ports: ``i_udp: In(UdpStreamSignature())``, ``o_udp: Out(UdpStreamSignature())``,
    ``m_axi_dram: Out(AXI4Signature(addr_width=dram_addr_width, data_width=ch_data_bits,
    id_width=1 + index bits))``, ``dram_ready: In(1)`` (the controller calibrated: LiteDRAM's
    ``init_done & ~init_error``; it only lights an LED, the controller itself holds its port
    until then), ``m_dram_ctrl: Out(AXI4LiteSignature(addr_width=16))`` (the controller's
    registers), ``leds: Out(4)`` = heartbeat, irq, busy, error.

    ``window_bytes``: the BRAM host-memory window (power of two). ``dram_addr_width``: byte address
    bits of the DRAM port (29 for the board's 512 MiB; a simulation passes what its memory
    model covers). ``device=False`` builds the MMIO manager alone (fast link tests).
    """

    def __init__(self, params: Params, *, udp_port: int = DEFAULT_PORT, window_bytes: int = 65536,
                 dram_addr_width: int | None = None, heartbeat_bits: int | None = None,
                 device: bool | None = None):
        Params.require(params)
        if window_bytes < 1024 or window_bytes & (window_bytes - 1):
            raise ValueError(f"window_bytes {window_bytes} must be a power of two >= 1024")
        self.params = params
        self.udp_port = udp_port
        self.window_bytes = window_bytes
        self.region_bytes = region_bytes(params)
        need = (params.n_channels * self.region_bytes - 1).bit_length()
        self.dram_addr_width = need if dram_addr_width is None else dram_addr_width
        if self.dram_addr_width < need:
            raise ValueError(f"dram_addr_width {dram_addr_width} cannot hold {params.n_channels} channels "
                             f"of {self.region_bytes} bytes (needs {need} bits)")
        hz = params.clock_hz
        self.heartbeat_bits = heartbeat_bits or (max(hz, 1 << 10).bit_length())
        self.stretch = max(hz // 8, 64)
        cls = _device_class() if device is not False else None
        if device and cls is None:
            raise RuntimeError("hw/device.py (EVSSD) is not available in this tree")
        self.device_class = cls
        index_bits = max((params.n_channels - 1).bit_length(), 1)
        super().__init__({
            "i_udp": In(UdpStreamSignature()),
            "o_udp": Out(UdpStreamSignature()),
            "m_axi_dram": Out(AXI4Signature(addr_width=self.dram_addr_width, data_width=params.ch_data_bits,
                                            id_width=1 + index_bits)),
            "dram_ready": In(1),
            "m_dram_ctrl": Out(AXI4LiteSignature(addr_width=(DRAM_CTRL_BYTES - 1).bit_length(), data_width=32)),
            "leds": Out(4),
        })

    @property
    def info_words(self) -> list[int]:
        return [BOARD_MAGIC, WINDOW_BASE, self.window_bytes, self.params.clock_hz, 0, BOARD_VERSION]

    def elaborate(self, platform):
        m = Module()
        p = self.params
        m.submodules.bridge = bridge = UdpAxiBridge(port=self.udp_port)
        m.submodules.decoder = dec = BridgeDecoder(window_bytes=self.window_bytes, info=self.info_words)
        wiring.connect(m, wiring.flipped(self.i_udp), bridge.i_udp)
        wiring.connect(m, bridge.o_udp, wiring.flipped(self.o_udp))
        m.submodules.split = split = AXILiteSplit(base=DRAM_CTRL_BASE, size=DRAM_CTRL_BYTES)
        wiring.connect(m, bridge.m_axil, split.s_axil)
        wiring.connect(m, split.m_rest, dec.s_axil)
        wiring.connect(m, split.m_window, wiring.flipped(self.m_dram_ctrl))

        dev, irq, activity = attach_device(m, dec, p, self.device_class, self.window_bytes)
        activity = activity | bridge.active
        if dev is not None:
            m.submodules.arbiter = arb = AXIArbiter(
                p.n_channels, region_bytes=self.region_bytes, data_width=p.ch_data_bits,
                in_addr_width=channel_addr_width(p), out_addr_width=self.dram_addr_width, id_width=1)
            for c in range(p.n_channels):
                wiring.connect(m, register_sliced(m, f"ch{c}", getattr(dev, f"m_axi_ch{c}")),
                               arb.port(c))
            wiring.connect(m, register_sliced(m, "dram", arb.m_axi), wiring.flipped(self.m_axi_dram))

        beat = Signal(self.heartbeat_bits)
        m.d.sync += beat.eq(beat + 1)
        error = bridge.dropped | bridge.refused | bridge.bus_error
        # heartbeat blinks only once the DRAM is calibrated: a steady LED 0 means "check DDR3"
        m.d.comb += self.leds.eq(Cat(beat[-1] & self.dram_ready, irq,
                                     _Stretch.add(m, activity, self.stretch),
                                     _Stretch.add(m, error, self.stretch)))
        return m
