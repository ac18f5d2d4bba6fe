"""The ECPIX-5-85F board top: :class:`~evssd.hw.boards.ecpix5.Ecpix5Core` between the generated LiteDRAM
and LiteEth cores (:mod:`evssd.hw.boards.litex_cores`), on the pins of amaranth-boards'
``ECPIX585Platform``.

Clocks and resets: the 100 MHz oscillator feeds LiteDRAM's PLL; LiteDRAM's ``user_clk`` (75 MHz,
the controller's sys clock) and ``user_rst`` are the EV-SSD's ``sync`` domain and LiteEth's sys
clock, so the channels reach the controller without a clock-domain crossing; LiteEth crosses to
the RGMII clocks itself. The reset button resets LiteDRAM (and so everything).

The LiteX cores bring their own I/O primitives (TRELLIS_IO, DDR registers, delays), so their pads
are requested raw (``dir="-"``) and wired straight to the instances. LiteDRAM's ``ddram_reset_n`` and
``ddram_cs_n`` outputs stay unconnected: the DDR3 chip's RESET# and CS# are not FPGA pins in any
ECPIX-5 pin list (amaranth-boards' ``ddr3`` resource, litex-boards' ECPIX-5 platform in all its
history, microwatt's ECPIX-5 constraints), and LiteX's own ECPIX-5 target, the known-good
reference, works on hardware without driving either (presumably the board ties them; its
schematic was not at hand to check: docs/synthesis.md). LEDs (RGB LED 0..3, green):
heartbeat (blinks once the DDR3 is calibrated), irq, busy, error; RGB LED 0 red: DRAM
calibration failed; blue: the LiteDRAM PLL is locked.
"""
from __future__ import annotations

from amaranth import ClockDomain, ClockSignal, Const, Instance, Module, ResetSignal, Signal
from amaranth.lib import wiring

from ..lib.axil_wishbone import AXILiteToWishbone
from ..bridge_protocol import DRAM_CTRL_BYTES
from .ecpix5 import DRAM_BYTES, Ecpix5Core, ecpix5_params
from ..regmap import Params

__all__ = ["Ecpix5Top", "RGMII_RX_MHZ"]

RGMII_RX_MHZ = 125.0


class Ecpix5Top(wiring.Component):
    """``Ecpix5Top(params, verilog={"dram": path, "eth": path})``: the paths of the generated cores
    (the build adds them to the plan)."""

    def __init__(self, params: Params | None = None, *, window_bytes: int = 65536, device: bool | None = None):
        self.params = params or ecpix5_params()
        self.window_bytes = window_bytes
        self.device = device
        self.divisor = 0          # no UART (the build manifest records the ULX3S's divisor here)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        clk100 = platform.request("clk100", 0)
        rst = platform.request("rst", 0)
        ddr = platform.request("ddr3", 0, dir="-")
        eth = platform.request("eth_rgmii", 0, dir="-")

        m.domains.sync = ClockDomain("sync")
        user_clk, user_rst = Signal(), Signal()
        init_done, init_error, pll_locked = Signal(), Signal(), Signal()
        m.d.comb += [ClockSignal("sync").eq(user_clk), ResetSignal("sync").eq(user_rst)]

        m.submodules.core = core = Ecpix5Core(self.params, window_bytes=self.window_bytes,
                                              dram_addr_width=(DRAM_BYTES - 1).bit_length(), device=self.device)
        m.d.comb += core.dram_ready.eq(init_done & ~init_error)
        m.submodules.ctrl = ctrl = AXILiteToWishbone(addr_width=(DRAM_CTRL_BYTES - 1).bit_length())
        wiring.connect(m, core.m_dram_ctrl, ctrl.s_axil)

        a, wb = core.m_axi_dram, ctrl.m_wb
        axi = {}
        for name in ("awaddr", "awburst", "awid", "awlen", "awvalid", "wdata", "wlast", "wstrb", "wvalid",
                     "bready", "araddr", "arburst", "arid", "arlen", "arvalid", "rready"):
            axi[f"i_user_port_axi_0_{name}"] = getattr(a, name)
        axi["i_user_port_axi_0_awsize"] = a.awsize.as_unsigned() | Const(0, 4)
        axi["i_user_port_axi_0_arsize"] = a.arsize.as_unsigned() | Const(0, 4)
        for name in ("awready", "wready", "bid", "bresp", "bvalid", "arready", "rdata", "rid", "rlast",
                     "rresp", "rvalid"):
            axi[f"o_user_port_axi_0_{name}"] = getattr(a, name)
        m.submodules.litedram = Instance(
            "litedram_core",
            i_clk=clk100.i, i_rst=rst.i,
            o_user_clk=user_clk, o_user_rst=user_rst,
            o_init_done=init_done, o_init_error=init_error, o_pll_locked=pll_locked,
            o_ddram_a=ddr.a.io, o_ddram_ba=ddr.ba.io, o_ddram_ras_n=ddr.ras.io, o_ddram_cas_n=ddr.cas.io,
            o_ddram_we_n=ddr.we.io, o_ddram_cke=ddr.clk_en.io, o_ddram_odt=ddr.odt.io, o_ddram_dm=ddr.dm.io,
            o_ddram_clk_p=ddr.clk.p, io_ddram_dq=ddr.dq.io, io_ddram_dqs_p=ddr.dqs.p,
            i_wb_ctrl_adr=wb.adr, i_wb_ctrl_dat_w=wb.dat_w, o_wb_ctrl_dat_r=wb.dat_r, i_wb_ctrl_sel=wb.sel,
            i_wb_ctrl_cyc=wb.cyc, i_wb_ctrl_stb=wb.stb, i_wb_ctrl_we=wb.we, o_wb_ctrl_ack=wb.ack,
            o_wb_ctrl_err=wb.err, i_wb_ctrl_cti=0, i_wb_ctrl_bte=0,
            **axi,
        )

        rx, tx = core.i_udp, core.o_udp
        m.submodules.liteeth = Instance(
            "liteeth_core",
            i_sys_clock=user_clk, i_sys_reset=user_rst,
            i_rgmii_clocks_rx=eth.rx_clk.io, o_rgmii_clocks_tx=eth.tx_clk.io,
            i_rgmii_rx_ctl=eth.rx_ctrl.io, i_rgmii_rx_data=eth.rx_data.io,
            o_rgmii_tx_ctl=eth.tx_ctrl.io, o_rgmii_tx_data=eth.tx_data.io,
            o_rgmii_mdc=eth.mdc.io, io_rgmii_mdio=eth.mdio.io, o_rgmii_rst_n=eth.rst.io, i_rgmii_int_n=1,
            o_evssd_source_valid=rx.valid, i_evssd_source_ready=rx.ready, o_evssd_source_data=rx.data,
            o_evssd_source_last=rx.last, o_evssd_source_error=rx.error, o_evssd_source_ip_address=rx.ip_address,
            o_evssd_source_src_port=rx.src_port, o_evssd_source_dst_port=rx.dst_port,
            o_evssd_source_length=rx.length,
            i_evssd_sink_valid=tx.valid, o_evssd_sink_ready=tx.ready, i_evssd_sink_data=tx.data,
            i_evssd_sink_last=tx.last, i_evssd_sink_last_be=1, i_evssd_sink_ip_address=tx.ip_address,
            i_evssd_sink_src_port=tx.src_port, i_evssd_sink_dst_port=tx.dst_port, i_evssd_sink_length=tx.length,
        )

        for i in range(4):
            led = platform.request("rgb_led", i)
            m.d.comb += led.g.o.eq(core.leds[i])
            if i == 0:
                m.d.comb += [led.r.o.eq(init_error), led.b.o.eq(pll_locked)]
        return m


def prepare(platform, build_dir, *, device: bool | None = None, **prepare_args) -> tuple["Ecpix5Top", object]:
    """The board's build plan: the generated cores (under ``build_dir``) added to the platform, the
    top elaborated; ``prepare_args`` go to ``platform.prepare`` (nextpnr options, the yosys
    script). The RGMII receive clock gets its 125 MHz constraint here; the PLL's outputs carry
    their frequencies on the instance."""
    from .litex_cores import check_dram_data, generate
    for kind in ("dram", "eth"):
        path = generate(kind, build_dir)
        if kind == "dram":
            check_dram_data(path)       # the host's DDR3 bring-up data belong to this core
        platform.add_file(path.name, path.read_text())
    top = Ecpix5Top(device=device)
    # The one-hot FSM recoding of the EV-SSD's own FSMs (YOSYS_AFTER_READ) must not reach the
    # LiteX cores: their state registers rely on init values in domains of their own.
    script = prepare_args.pop("script_after_read", "")
    script = "; ".join(filter(None, [script, "setattr -unset fsm_encoding litedram_core/w:* liteeth_core/w:*"]))
    prefs = f'FREQUENCY PORT "eth_rgmii_0__rx_clk__io" {RGMII_RX_MHZ} MHz;'
    return top, platform.prepare(top, add_preferences=prefs, script_after_read=script, **prepare_args)
