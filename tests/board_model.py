"""The ULX3S board's bus behind the UART bridge, over the functional device model.

One definition of the board's address map as the tests see it (``hw/boards/board.py`` is the gateware;
``hw/bridge_protocol.py`` the constants): registers below 0x1000, the read-only board-info ROM
(writes answer SLVERR), the host-memory window, DECERR elsewhere. Used by the in-memory link tests
(tests/test_uart_link.py) and the pty board (tests/hw/test_uart.py).
"""
from __future__ import annotations

from evssd.host.model import ModelTransport
from evssd.host.uart import BOARD_INFO_BASE, BOARD_MAGIC, WINDOW_BASE, BridgeModel

OKAY, SLVERR, DECERR = 0, 2, 3


class ModelBoardBus:
    """The bridge's golden model in front of the board's bus decoding and the device model.

    ``run_on_write``: run the device model inside a register write (an in-memory link that answers
    at once) or leave it to :meth:`run_pending` after the answer went out (a board on a line, where
    the bridge answers the AXI write before the device works on the command).
    """

    def __init__(self, params, window_bytes: int = 16384, *, run_on_write: bool = True):
        self.model = ModelTransport(params, host_memory_bytes=window_bytes, host_base=WINDOW_BASE)
        self.info = [BOARD_MAGIC, WINDOW_BASE, window_bytes, 0, 868, 1]
        self.window_bytes = window_bytes
        self.run_on_write = run_on_write
        self.bridge = BridgeModel(self._read, self._write)
        self.bus_writes = 0
        self._pending = False

    def _read(self, addr):
        if addr < 0x1000:
            return self.model.device.regs.read(addr)
        if BOARD_INFO_BASE <= addr < BOARD_INFO_BASE + 0x100:
            i = (addr - BOARD_INFO_BASE) // 4
            return (self.info[i] if i < len(self.info) else 0), OKAY
        if WINDOW_BASE <= addr < WINDOW_BASE + self.window_bytes:
            off = addr - WINDOW_BASE
            return int.from_bytes(self.model.host[off:off + 4], "little"), OKAY
        return 0, DECERR

    def _write(self, addr, value, strb):
        self.bus_writes += 1
        if addr < 0x1000:
            resp = self.model.device.regs.write(addr, value, strb)
            self._pending = True
            if self.run_on_write:
                self.run_pending()
            return resp
        if BOARD_INFO_BASE <= addr < BOARD_INFO_BASE + 0x100:
            return SLVERR
        if WINDOW_BASE <= addr < WINDOW_BASE + self.window_bytes:
            off = addr - WINDOW_BASE
            for i in range(4):
                if strb >> i & 1:
                    self.model.host[off + i] = (value >> 8 * i) & 0xFF
            return OKAY
        return DECERR

    def run_pending(self) -> None:
        """Let the device model work on what the last register writes started."""
        if self._pending:
            self._pending = False
            self.model.device.run()
