"""The child process of the ``rtl`` backend: build the device with Verilator (if needed) and run
the server bench (:mod:`evssd.sim.tb_rtl_server`) until the host closes the link.

``python -m evssd.sim.rtl_child CONFIG_JSON``; started by
:class:`evssd.sim.rtl_transport.RtlTransport`, which reads this process's output (the build and
simulator log) when something fails. Exit status: 0 when the bench ended cleanly, 1 when the
simulation failed (a cocotb failure), 2 when the build or the simulator process failed.
"""
from __future__ import annotations

import json
import sys
import traceback


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m evssd.sim.rtl_child CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        cfg = json.loads(argv[0])
        from evssd.hw.regmap import Params
        from evssd.sim import runner
        from evssd.sim.rtl_protocol import CONFIG_ENV
        params = Params(**cfg.pop("params"))
        run_dir = cfg.pop("run_dir")
    except Exception:
        traceback.print_exc()
        return 2
    try:
        runner.run("evssd.sim.tb_rtl_server", "device", params, run_dir=run_dir,
                   extra_env={CONFIG_ENV: json.dumps(cfg)})
    except runner.SimulationFailed as exc:
        print(f"rtl child: the simulation failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        print("rtl child: the build or the simulator failed:", file=sys.stderr)
        traceback.print_exc()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
