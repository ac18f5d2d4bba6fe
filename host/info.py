"""``evssd info``: open a device and print its identity, build parameters and counters."""
from __future__ import annotations

import argparse
import json

from evssd.hw import regmap
from evssd.host import cli_types as ct


def add_arguments(parser):
    parser.add_argument("--backend", default="model", choices=("model", "uart", "udp", "rtl"),
                        help="model (default), uart, udp, or rtl (the RTL in Verilator: the L2 tests' 4-channel build)")
    parser.add_argument("--port", help="serial port for the uart backend (e.g. /dev/ttyUSB0); "
                                       "UDP port for the udp backend (default 7788)")
    parser.add_argument("--host", help="the board's IP address for the udp backend")
    parser.add_argument("--baud", type=ct.positive_int, default=3_000_000, help="uart baud rate")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from evssd.host.device import Device
    kwargs = {}
    if args.backend == "uart":
        if not args.port:
            raise ct.UsageError("--backend uart needs --port (e.g. /dev/ttyUSB0)")
        kwargs = {"port": args.port, "baud": args.baud}
    elif args.backend == "udp":
        if not args.host:
            raise ct.UsageError("--backend udp needs --host (the board's IP address)")
        try:
            port = ct.port(args.port) if args.port else 7788
        except argparse.ArgumentTypeError as exc:
            raise ct.UsageError(f"--port: {exc}") from None
        if port == 0:
            raise ct.UsageError("--port 0 is not a UDP port (1..65535)")
        kwargs = {"host": args.host, "port": port}
    with Device.open(args.backend, **kwargs) as dev:
        info = {
            "backend": args.backend,
            "magic": f"0x{regmap.MAGIC:08x}",
            "regmap_version": ".".join(map(str, regmap.REGMAP_VERSION)),
            "regmap_hash": f"0x{regmap.REGMAP_HASH:08x}",
            "build_id": f"0x{dev.params.build_id:08x}",
            "params": dev.params.as_dict(),
            "flash_bytes": dev.params.total_pages * dev.params.page_size,
            "counters": dev.counters(),
        }
        dram = getattr(dev.transport, "dram", None)       # the udp backend's DDR3 bring-up
        if dram is not None:
            info["dram"] = dram.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"EV-SSD on {info['backend']}: regmap {info['regmap_version']} hash {info['regmap_hash']}, "
          f"build {info['build_id']}")
    for k, v in info["params"].items():
        print(f"  {k:18s} {v}")
    print(f"  {'flash':18s} {info['flash_bytes'] / 2**20:.0f} MiB")
    if "dram" in info:
        print(f"  {info['dram']}")
    c = info["counters"]
    print(f"  commands {c['commands']}, lookups {c['lookups']}, errors {c['errors']}, cycles {c['cycles']}")
    return 0
