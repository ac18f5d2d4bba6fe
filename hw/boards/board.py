"""The EV-SSD on a board: BRAM flash channels, a BRAM host-memory window, the UART host link.

:class:`BoardCore` is everything except pins and clocks, with the serial line pair as ports, so
cocotb drives it with a bit-level UART model; :class:`BoardTop` wraps it for the ULX3S-85F
(PLL, reset button, FTDI UART, LEDs).

Inside :class:`BoardCore`::

    uart_rx -> UartRx -> UartAxiBridge -> BridgeDecoder -+-> [slice] -> EVSSD.s_axil (registers)
    uart_tx <- UartTx <-'                                 +-> board-info ROM
                                                          +-> window.s_axil --.
    EVSSD.m_axi_host --> [slice] ---------------------------> window.s_axi ---+- AxiBram (host memory)
    EVSSD.m_axi_ch[i] -> [slice] ---------------------------> AxiBram (flash channel i)

``[slice]`` is an :class:`~evssd.hw.lib.axi_slice.AXIRegisterSlice` (one register stage on each AXI
channel), so no combinational path runs between the device and the board's memories.

The bridge's 32-bit address map (``evssd.host.uart`` has the same constants):

| range | what |
| --- | --- |
| ``0x0000_0000 .. 0x0000_0FFF`` | EV-SSD registers (``hw/regmap.py``) |
| ``0x0F00_0000 .. 0x0F00_00FF`` | board info: magic "EVBD", window base, window bytes, clock Hz, UART divisor, version |
| ``0x1000_0000 ..`` | host-memory window (``window_bytes``); the device's DMA addresses are the same numbers |
| anything else | DECERR |
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, C, Mux, ClockDomain, ClockSignal, ResetSignal, Instance
from amaranth.lib import wiring
from amaranth.lib.cdc import ResetSynchronizer
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4LiteSignature, Resp
from ..lib.axi_slice import AXIRegisterSlice
from ..bridge_protocol import (BOARD_INFO_BASE, BOARD_INFO_BYTES, BOARD_MAGIC, BOARD_VERSION, MMIO_BASE,
                              WINDOW_BASE)  # noqa: F401 (re-exported: the board's address map)
from .bram import AxiBram
from ..device.mmio import MMIOManager, ADDR_WIDTH
from ..regmap import Params
from .uart import UartAxiBridge, UartRx, UartTx

__all__ = ["BoardCore", "BoardTop", "BridgeDecoder", "attach_device", "register_sliced", "MMIO_BASE", "BOARD_INFO_BASE", "WINDOW_BASE",
           "BOARD_MAGIC", "BOARD_VERSION", "BOARD_PARAMS", "board_params", "pll_params"]


# The ULX3S-85F build: 1 KiB pages, 32 pages (32 KiB of BRAM) per channel, 4 channels.
BOARD_PARAMS = dict(n_channels=4, host_data_bits=64, ch_data_bits=64, page_size=1024, ways=2,
                    max_tables=4, max_extents=4, pages_per_channel=32, max_inflight=2,
                    max_row_bytes=256)


def board_params(clock_hz: int = 100_000_000, **overrides) -> Params:
    return Params(**{**BOARD_PARAMS, "clock_hz": clock_hz, **overrides})


def _device_class():
    """The whole EV-SSD when it is in the tree; the MMIO manager alone otherwise (the board then
    identifies itself but cannot run commands)."""
    try:
        from ..device.top import EVSSD
        return EVSSD
    except ImportError:
        return None


class BridgeDecoder(wiring.Component):
    """Routes the bridge's AXI4-Lite master to the registers, the board-info ROM, the window.

    Each direction runs one transaction at a time: it takes the address (and the write data)
    into its own registers, decodes the target from them a cycle later, forwards the request
    from registers, and answers the bridge from a registered response. No combinational path
    crosses the decoder, and the targets' address and data inputs come straight from registers
    (the bridge is limited by the serial line, so the extra cycles cost nothing). Unmapped
    addresses answer DECERR; the ROM answers SLVERR to writes.
    """

    def __init__(self, *, window_bytes: int, info: list[int]):
        self.window_bytes = window_bytes
        self.info = list(info)
        super().__init__({
            "s_axil": In(AXI4LiteSignature(addr_width=32, data_width=32)),
            "m_mmio": Out(AXI4LiteSignature(addr_width=ADDR_WIDTH, data_width=32)),
            "m_window": Out(AXI4LiteSignature(addr_width=32, data_width=32)),
        })

    def _select(self, addr):
        return (addr < (1 << ADDR_WIDTH),
                (addr >= BOARD_INFO_BASE) & (addr < BOARD_INFO_BASE + BOARD_INFO_BYTES),
                (addr >= WINDOW_BASE) & (addr < WINDOW_BASE + self.window_bytes))

    def elaborate(self, platform):
        m = Module()
        s, mm, win = self.s_axil, self.m_mmio, self.m_window

        # data registers: no reset (only read while their valid says so)
        ar_addr = Signal(32, reset_less=True)
        aw_addr = Signal(32, reset_less=True)
        # the targets, decoded from the bridge's address register as it is taken
        ar_sel = [Signal(name=f"ar_sel_{n}") for n in ("mmio", "rom", "win")]
        aw_sel = [Signal(name=f"aw_sel_{n}") for n in ("mmio", "rom", "win")]
        w_data = Signal(32, reset_less=True)
        w_strb = Signal(4, reset_less=True)
        # Addresses and data go to every target unconditionally (only the handshakes are routed).
        m.d.comb += [mm.awaddr.eq(aw_addr), mm.wdata.eq(w_data), mm.wstrb.eq(w_strb), mm.araddr.eq(ar_addr),
                     win.awaddr.eq(aw_addr), win.wdata.eq(w_data), win.wstrb.eq(w_strb),
                     win.araddr.eq(ar_addr)]

        # ---- writes
        aw_have = Signal()
        w_have = Signal()
        awv = Signal()           # the forwarded AW / W are pending at the target
        wv = Signal()
        b_resp = Signal(2)
        m.d.comb += s.bresp.eq(b_resp)

        def forward_w(port, next_state):
            m.d.comb += [port.awvalid.eq(awv), port.wvalid.eq(wv)]
            with m.If(port.awready):
                m.d.sync += awv.eq(0)
            with m.If(port.wready):
                m.d.sync += wv.eq(0)
            with m.If((~awv | port.awready) & (~wv | port.wready)):
                m.next = next_state

        def take_b(port):
            m.d.comb += port.bready.eq(1)
            with m.If(port.bvalid):
                m.d.sync += b_resp.eq(port.bresp)
                m.next = "RESP"

        with m.FSM(name="wr"):
            with m.State("ADDR"):
                # AW and W in either order, each into its registers.
                m.d.comb += [s.awready.eq(~aw_have), s.wready.eq(~w_have)]
                with m.If(s.awvalid & ~aw_have):
                    m.d.sync += [aw_addr.eq(s.awaddr), aw_have.eq(1),
                                 Cat(*aw_sel).eq(Cat(*self._select(s.awaddr)))]
                with m.If(s.wvalid & ~w_have):
                    m.d.sync += [w_data.eq(s.wdata), w_strb.eq(s.wstrb), w_have.eq(1)]
                with m.If(aw_have & w_have):
                    m.next = "DECODE"
            with m.State("DECODE"):
                is_mmio, is_rom, is_win = aw_sel
                m.d.sync += [aw_have.eq(0), w_have.eq(0)]
                with m.If(is_mmio):
                    m.d.sync += [awv.eq(1), wv.eq(1)]
                    m.next = "MMIO_W"
                with m.Elif(is_win):
                    m.d.sync += [awv.eq(1), wv.eq(1)]
                    m.next = "WIN_W"
                with m.Else():
                    # ROM (SLVERR: read-only) or unmapped (DECERR)
                    m.d.sync += b_resp.eq(Mux(is_rom, Resp.SLVERR, Resp.DECERR))
                    m.next = "RESP"
            with m.State("MMIO_W"):
                forward_w(mm, "MMIO_B")
            with m.State("MMIO_B"):
                take_b(mm)
            with m.State("WIN_W"):
                forward_w(win, "WIN_B")
            with m.State("WIN_B"):
                take_b(win)
            with m.State("RESP"):
                m.d.comb += s.bvalid.eq(1)
                with m.If(s.bready):
                    m.next = "ADDR"

        # ---- reads
        r_data = Signal(32, reset_less=True)
        r_resp = Signal(2)
        m.d.comb += [s.rdata.eq(r_data), s.rresp.eq(r_resp)]
        # the ROM word is looked up as the address is taken (into r_data; DECODE keeps it for
        # the ROM, clears it otherwise)
        rom = Signal(32)
        with m.Switch(s.araddr[2:8]):
            for i, word in enumerate(self.info):
                with m.Case(i):
                    m.d.comb += rom.eq(word)

        def take_r(port):
            m.d.comb += port.rready.eq(1)
            with m.If(port.rvalid):
                m.d.sync += [r_data.eq(port.rdata), r_resp.eq(port.rresp)]
                m.next = "RESP"

        with m.FSM(name="rd"):
            with m.State("ADDR"):
                m.d.comb += s.arready.eq(1)
                with m.If(s.arvalid):
                    m.d.sync += [ar_addr.eq(s.araddr), Cat(*ar_sel).eq(Cat(*self._select(s.araddr))),
                                 r_data.eq(rom)]
                    m.next = "DECODE"
            with m.State("DECODE"):
                is_mmio, is_rom, is_win = ar_sel
                with m.If(is_mmio):
                    m.next = "MMIO_AR"
                with m.Elif(is_win):
                    m.next = "WIN_AR"
                with m.Elif(is_rom):
                    m.d.sync += r_resp.eq(Resp.OKAY)
                    m.next = "RESP"
                with m.Else():
                    m.d.sync += [r_data.eq(0), r_resp.eq(Resp.DECERR)]
                    m.next = "RESP"
            with m.State("MMIO_AR"):
                m.d.comb += mm.arvalid.eq(1)
                with m.If(mm.arready):
                    m.next = "MMIO_R"
            with m.State("MMIO_R"):
                take_r(mm)
            with m.State("WIN_AR"):
                m.d.comb += win.arvalid.eq(1)
                with m.If(win.arready):
                    m.next = "WIN_R"
            with m.State("WIN_R"):
                take_r(win)
            with m.State("RESP"):
                m.d.comb += s.rvalid.eq(1)
                with m.If(s.rready):
                    m.next = "ADDR"
        return m


class _Stretch:
    """A pulse made visible: the LED stays on for ``cycles`` after the last event."""

    @staticmethod
    def add(m, event, cycles):
        # The event is registered first: it is an OR of pulses and valids from all over the
        # design, and the counter's enable should not wait for them.
        event_q = Signal()
        m.d.sync += event_q.eq(event)
        count = Signal(range(cycles + 1))
        with m.If(event_q):
            m.d.sync += count.eq(cycles)
        with m.Elif(count != 0):
            m.d.sync += count.eq(count - 1)
        return count != 0



def register_sliced(m: Module, name: str, master):
    """``master`` (an AXI or AXI-Lite interface) through an :class:`AXIRegisterSlice` added to
    ``m`` as ``<name>_slice``; returns the slice's master side. Every link between the device
    and a board's memories goes through one, so the device's handshake logic and the memories'
    enables are timed separately."""
    reg = m.submodules[f"{name}_slice"] = AXIRegisterSlice(master.signature)
    wiring.connect(m, master, reg.s)
    return reg.m


def attach_device(m: Module, dec: "BridgeDecoder", p: Params, device_class, window_bytes: int):
    """The part both boards share behind their bridge's :class:`BridgeDecoder`: the EV-SSD
    (``device_class``) with its registers and its host-memory port through register slices to
    the decoder and to an :class:`AxiBram` window of ``window_bytes``, or, when
    ``device_class`` is None, the MMIO manager alone with a window only the bridge reaches.

    Returns ``(device, irq, activity)``: the device (None without one), its interrupt (0
    without one) and a signal that is high while it starts an AXI read or write on its
    host or channel ports (the board's activity LED). The caller connects the device's
    ``m_axi_ch<c>`` ports to its flash (through :func:`register_sliced`)."""
    if device_class is None:
        m.submodules.device = mmio = MMIOManager(p)
        wiring.connect(m, dec.m_mmio, mmio.s_axil)
        m.submodules.window = win = AxiBram(size=window_bytes, data_width=p.host_data_bits,
                                            addr_width=64, lite_port=True)
        wiring.connect(m, dec.m_window, win.s_axil)
        return None, C(0, 1), C(0, 1)
    m.submodules.device = dev = device_class(p)
    wiring.connect(m, register_sliced(m, "mmio", dec.m_mmio), dev.s_axil)
    host_sig = dev.signature.members["m_axi_host"].signature
    m.submodules.window = win = AxiBram(
        size=window_bytes, data_width=host_sig.data_width, addr_width=host_sig.addr_width,
        id_width=host_sig.id_width, lite_port=True)
    wiring.connect(m, register_sliced(m, "host", dev.m_axi_host), win.s_axi)
    wiring.connect(m, dec.m_window, win.s_axil)
    activity = dev.m_axi_host.arvalid | dev.m_axi_host.awvalid
    for c in range(p.n_channels):
        port = getattr(dev, f"m_axi_ch{c}")
        activity = activity | port.arvalid | port.awvalid
    return dev, dev.irq, activity


class BoardCore(wiring.Component):
    """The EV-SSD with BRAM flash channels, a BRAM host window and the UART bridge.

    Ports: ``uart_rx: In(1)`` (line into the board, idle high), ``uart_tx: Out(1)``,
    ``leds: Out(4)`` = heartbeat, irq, busy, error.

    ``divisor``: clock cycles per UART bit (4 in simulation; ``clock_hz // baud`` on a board).
    ``window_bytes``: host-memory window size (power of two). ``idle_timeout``: cycles of line
    silence that end a broken frame (default: 64 byte times).
    """

    def __init__(self, params: Params, *, divisor: int = 4, window_bytes: int = 16384,
                 idle_timeout: int | None = None, heartbeat_bits: int | None = None,
                 device: bool | None = None):
        Params.require(params)
        if window_bytes < 1024 or window_bytes & (window_bytes - 1):
            raise ValueError(f"window_bytes {window_bytes} must be a power of two >= 1024")
        if not isinstance(divisor, int) or divisor < 4:
            raise ValueError(f"divisor {divisor!r} must be an integer >= 4 cycles per bit")
        self.params = params
        self.divisor = divisor
        self.window_bytes = window_bytes
        self.idle_timeout = idle_timeout or divisor * 10 * 64
        hz = params.clock_hz
        self.heartbeat_bits = heartbeat_bits or (max(hz, 1 << 10).bit_length())
        self.stretch = max(hz // 8, 64)
        cls = _device_class() if device is not False else None
        if device and cls is None:
            raise RuntimeError("hw/device/top.py (EVSSD) is not available in this tree")
        self.device_class = cls
        super().__init__({
            "uart_rx": In(1, init=1),
            "uart_tx": Out(1, init=1),
            "leds": Out(4),
        })

    @property
    def info_words(self) -> list[int]:
        return [BOARD_MAGIC, WINDOW_BASE, self.window_bytes, self.params.clock_hz, self.divisor,
                BOARD_VERSION]

    def elaborate(self, platform):
        m = Module()
        p = self.params
        m.submodules.rx = rx = UartRx(self.divisor)
        m.submodules.tx = tx = UartTx(self.divisor)
        m.submodules.bridge = bridge = UartAxiBridge(idle_timeout=self.idle_timeout)
        m.submodules.decoder = dec = BridgeDecoder(window_bytes=self.window_bytes, info=self.info_words)
        m.d.comb += [rx.rx.eq(self.uart_rx), self.uart_tx.eq(tx.tx)]
        wiring.connect(m, rx.o_data, bridge.i_rx)
        wiring.connect(m, bridge.o_tx, tx.i_data)
        wiring.connect(m, bridge.m_axil, dec.s_axil)

        dev, irq, activity = attach_device(m, dec, p, self.device_class, self.window_bytes)
        activity = activity | bridge.active
        if dev is not None:
            for c in range(p.n_channels):
                sig = dev.signature.members[f"m_axi_ch{c}"].signature
                flash = AxiBram(size=p.channel_bytes, data_width=sig.data_width,
                                addr_width=sig.addr_width, id_width=sig.id_width)
                m.submodules[f"flash{c}"] = flash
                wiring.connect(m, register_sliced(m, f"ch{c}", getattr(dev, f"m_axi_ch{c}")),
                               flash.s_axi)

        beat = Signal(self.heartbeat_bits)
        m.d.sync += beat.eq(beat + 1)
        error = bridge.crc_error | bridge.bus_error | bridge.timeout | rx.frame_error | rx.overrun
        m.d.comb += self.leds.eq(Cat(beat[-1], irq,
                                     _Stretch.add(m, activity, self.stretch),
                                     _Stretch.add(m, error, self.stretch)))
        return m


def pll_params(f_in: float, f_out: float) -> dict:
    """EHXPLLL dividers for ``f_out`` from ``f_in`` (MHz): VCO 400..800 MHz, PFD >= 3.125 MHz;
    the closest achievable output frequency wins."""
    best = None
    for refdiv in range(1, 129):
        pfd = f_in / refdiv
        if pfd < 3.125:
            break
        for fbdiv in range(1, 81):
            fout = pfd * fbdiv
            for opdiv in range(1, 129):
                vco = fout * opdiv
                if 400 <= vco <= 800:
                    err = abs(fout - f_out)
                    if best is None or err < best[0]:
                        best = (err, refdiv, fbdiv, opdiv, fout)
    if best is None:
        raise ValueError(f"no PLL setting makes {f_out} MHz from {f_in} MHz")
    err, refdiv, fbdiv, opdiv, fout = best
    return {"CLKI_DIV": refdiv, "CLKFB_DIV": fbdiv, "CLKOP_DIV": opdiv, "f_out": fout}


class BoardTop(wiring.Component):
    """ULX3S-85F wrapper: 25 MHz -> PLL -> ``clock_hz``, reset on the PWR button or PLL unlock,
    the FTDI UART, LEDs 0..3 = heartbeat, irq, busy, error; LED 7 = PLL locked."""

    def __init__(self, params: Params | None = None, *, baud: int = 115200,
                 window_bytes: int = 16384, device: bool | None = None):
        self.params = params or board_params()
        if self.params.clock_hz <= 0:
            raise ValueError("BoardTop needs params.clock_hz (the PLL output frequency)")
        self.baud = baud
        self.divisor = self.params.clock_hz // baud
        if self.divisor < 4:
            raise ValueError(f"baud {baud} too high for {self.params.clock_hz} Hz (divisor {self.divisor})")
        self.window_bytes = window_bytes
        self.device = device
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        clk25 = platform.request("clk25", 0)
        f_out = self.params.clock_hz / 1e6
        pll = pll_params(25.0, f_out)
        if abs(pll["f_out"] - f_out) > 1e-6:
            raise ValueError(f"the PLL cannot make exactly {f_out} MHz from 25 MHz "
                             f"(closest {pll['f_out']:.3f} MHz); set clock_hz to that")
        clk = Signal()
        locked = Signal()
        m.submodules.pll = Instance(
            "EHXPLLL",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_CLKOP_ENABLE="ENABLED",
            p_CLKI_DIV=pll["CLKI_DIV"], p_CLKFB_DIV=pll["CLKFB_DIV"], p_CLKOP_DIV=pll["CLKOP_DIV"],
            p_CLKOP_CPHASE=pll["CLKOP_DIV"] - 1, p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP",
            i_CLKI=clk25.i, i_CLKFB=clk, o_CLKOP=clk, o_LOCK=locked,
            i_RST=0, i_STDBY=0, i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1,
            i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
            a_FREQUENCY_PIN_CLKI="25", a_FREQUENCY_PIN_CLKOP=str(int(f_out)) if f_out == int(f_out) else f"{f_out:.3f}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
            a_MFG_GMCREF_SEL="2",
        )
        m.domains.sync = ClockDomain("sync")
        m.domains.reset_src = ClockDomain("reset_src")
        m.d.comb += [ClockSignal("sync").eq(clk), ClockSignal("reset_src").eq(clk)]
        button = platform.request("button_pwr", 0)
        m.submodules.reset_sync = ResetSynchronizer(button.i | ~locked, domain="reset_src")
        # The synchronised reset reaches about 20,000 flip-flops: it goes onto a global clock
        # network through a DCCA buffer (a fixed ~3 ns to every load) rather than general
        # routing, where it was a 12.7-13.2 ns wire in two board builds (docs/synthesis.md).
        m.submodules.reset_buffer = Instance("DCCA", i_CLKI=ResetSignal("reset_src"), i_CE=1,
                                             o_CLKO=ResetSignal("sync"))
        # nextpnr derives the constraint of CLKOP from the PLL's FREQUENCY_PIN_CLKOP.

        m.submodules.core = core = BoardCore(self.params, divisor=self.divisor,
                                             window_bytes=self.window_bytes, device=self.device)
        uart = platform.request("uart", 0)
        m.d.comb += [core.uart_rx.eq(uart.rx.i), uart.tx.o.eq(core.uart_tx)]
        for i in range(4):
            m.d.comb += platform.request("led", i).o.eq(core.leds[i])
        m.d.comb += platform.request("led", 7).o.eq(locked)
        return m
