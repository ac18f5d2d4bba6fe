"""The registry of device backends: name -> the transport that reaches it.

The interface (:mod:`evssd.host.transport`) knows no implementation; this module sits beside the
implementations and imports each one only when it is asked for, so ``import evssd.host.transport``
stays free of the model, pyserial and cocotb, and no module imports the one that imports it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from evssd.host.transport import Transport

__all__ = ["Backend", "BACKENDS", "open_transport"]


@dataclass(frozen=True)
class Backend:
    """One backend: what it is, and where its transport class lives (``module:Class``); a
    backend without a factory exists only inside a harness (``hint`` says how to reach it)."""
    description: str
    factory: str | None = None
    hint: str = ""


BACKENDS: dict[str, Backend] = {
    "model": Backend("functional + timing model of the device in host/ (no simulator needed)",
                     "evssd.host.model:ModelTransport"),
    "uart": Backend("a board running the gateware behind the UART-to-AXI-Lite bridge (pyserial)",
                    "evssd.host.uart:UartTransport"),
    "udp": Backend("a board running the gateware behind the UDP bridge (ECPIX-5 Gigabit Ethernet)",
                   "evssd.host.udp:UdpTransport"),
    "rtl": Backend("the whole device's RTL in Verilator, in a child process (cocotb bench serving a socket)",
                   "evssd.sim.rtl_transport:RtlTransport"),
    "cocotb": Backend("the RTL in a cocotb test (cocotbext-axi bus models); only inside a cocotb test",
                      None,
                      "backend 'cocotb' only exists inside a cocotb test: build it there with "
                      "evssd.sim.transport.CocotbTransport(dut); outside a test use backend 'rtl' (the RTL in a child process)"),
}


def open_transport(backend: str, **kwargs) -> Transport:
    """Make a transport by backend name (``model``, ``uart``, ``udp``, ``rtl``); ``kwargs`` go to its constructor."""
    entry = BACKENDS.get(backend) if isinstance(backend, str) else None
    if entry is None:
        known = ", ".join(f"{k} ({v.description})" for k, v in BACKENDS.items())
        raise ValueError(f"unknown backend {backend!r}; known backends: {known}")
    if entry.factory is None:
        raise ValueError(entry.hint)
    module, cls = entry.factory.split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
