"""``evssd bench synth``: resource estimates of the EV-SSD core for ECP5 and UltraScale+.

For each configuration the device (``hw/device/top.py`` ``EVSSD``) is elaborated and synthesized with
yosys ``synth_ecp5`` and ``synth_xilinx -family xcup -flatten -noiopad`` (YoWASP); a few
configurations also go through ``nextpnr-ecp5 --85k --out-of-context`` for Fmax. Results go to
``results/synth/synth.json`` and ``synth.png`` (``evssd.host.bench.common.write_results``).

Default sweep (``--quick`` halves it): channels 1, 2, 4, 8 at a 64-bit host bus and host widths
128, 256, 512 at 4 channels (every other parameter at its default); Fmax for 1 and 4 channels
at 64 bits.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from evssd.host import cli_types as ct

CHANNELS = (1, 2, 4, 8)
WIDTHS = (64, 128, 256, 512)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="channels 1, 4 and widths 64, 256 only")
    parser.add_argument("--no-fmax", action="store_true", help="skip nextpnr out-of-context runs")
    parser.add_argument("--families", default="ecp5,xcup", type=ct.choice_list(("ecp5", "xcup")), help="comma list of ecp5, xcup")
    parser.add_argument("--work-dir", default="build/bench-synth", help="yosys/nextpnr work directory")
    parser.add_argument("--results", default=None, help="results root (default results/)")
    parser.add_argument("--reuse", action="store_true",
                        help="take numbers from an earlier run's files in --work-dir where they exist")
    parser.add_argument("--top", default="device", choices=["device", "mmio"],
                        help="what to synthesize (mmio: the register file alone, for a quick look)")


def configs(quick: bool):
    """Most informative first (results are written after every configuration)."""
    chans = (1, 4) if quick else CHANNELS
    widths = (64, 256) if quick else WIDTHS
    out = [(4, 64)] + [(c, 64) for c in chans if c != 4] + [(4, w) for w in widths if w != 64]
    fmax = {(1, 64), (4, 64)}
    return out, fmax


def _component(top: str, params):
    if top == "mmio":
        from evssd.hw.device.mmio import MMIOManager
        return MMIOManager(params)
    from evssd.hw.device.top import EVSSD
    return EVSSD(params)


def run(args) -> int:
    try:
        from evssd.hw import synth
        from evssd.hw.regmap import Params
    except ImportError as exc:
        print(f"evssd bench synth: needs the gateware extras ({exc}): pip install 'evssd[synth]'",
              file=sys.stderr)
        return 2
    if args.top == "device":
        try:
            import evssd.hw.device.top  # noqa: F401
        except ImportError as exc:
            print(f"evssd bench synth: the EV-SSD top (hw/device/top.py) is not available: {exc}", file=sys.stderr)
            return 2
    from evssd.host.bench.common import write_results
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    bad = [f for f in families if f not in ("ecp5", "xcup")]
    if bad:
        print(f"evssd bench synth: unknown families {bad}; use ecp5, xcup", file=sys.stderr)
        return 2
    cfgs, fmax_cfgs = configs(args.quick)
    rows = []
    tools = synth.tool_versions()
    t_all = time.monotonic()
    for n_ch, width in cfgs:
        params = Params(n_channels=n_ch, host_data_bits=width)
        name = f"evssd_{args.top}_{n_ch}ch_{width}b"
        print(f"{name}: synthesizing ...", flush=True)
        try:
            res = synth.estimate(_component(args.top, params), name, Path(args.work_dir) / name,
                                 families=families, reuse=args.reuse,
                                 fmax=("ecp5" in families and not args.no_fmax and (n_ch, width) in fmax_cfgs))
        except synth.SynthError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            res = {"name": name, "error": str(exc)}
        res.update({"n_channels": n_ch, "host_data_bits": width, "params": params.as_dict()})
        rows.append(res)
        # Partial results after every configuration: a long sweep that is stopped keeps its numbers.
        data = {"top": args.top, "configs": rows, "families": list(families), "tools": tools,
                "complete": len(rows) == len(cfgs), "seconds": round(time.monotonic() - t_all, 1)}
        fig = _plot(rows)
        path = write_results("synth", data, fig,
                             command=" ".join(["evssd bench synth"] + sys.argv[3:]), root=args.results)
        if fig is not None:
            import matplotlib.pyplot as plt
            plt.close(fig)
    print(_table(rows))
    print(f"results: {path}")
    return 0


def _table(rows) -> str:
    lines = ["| channels | host bits | ECP5 LUT4 | ECP5 FF | DP16KD | MULT18 | xcup LUT | xcup FF | RAMB36/18 | DSP48E2 | ECP5 OOC Fmax MHz |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        e, x = r.get("ecp5", {}), r.get("xcup", {})
        fm = r.get("ecp5_pnr", {}).get("fmax", {})
        fmax = ", ".join(f"{v['achieved_mhz']:.1f}" for v in fm.values()) or "-"
        lines.append(f"| {r['n_channels']} | {r['host_data_bits']} | {e.get('LUT4', '-')} | {e.get('FF', '-')} | "
                     f"{e.get('BRAM', '-')} | {e.get('DSP', '-')} | {x.get('LUT', '-')} | {x.get('FF', '-')} | "
                     f"{x.get('BRAM36', '-')}/{x.get('BRAM18', '-')} | {x.get('DSP', '-')} | {fmax} |")
    return "\n".join(lines)


def _plot(rows):
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "n_channels", "host bus 64 bits"), (axes[1], "host_data_bits", "4 channels")):
        sel = [r for r in rows if (r["host_data_bits"] == 64 if key == "n_channels" else r["n_channels"] == 4)]
        sel.sort(key=lambda r: r[key])
        xs = [r[key] for r in sel]
        for fam, cell, label in (("ecp5", "LUT4", "ECP5 LUT4"), ("ecp5", "FF", "ECP5 FF"),
                                 ("xcup", "LUT", "UltraScale+ LUT"), ("xcup", "FF", "UltraScale+ FF")):
            ys = [r.get(fam, {}).get(cell) for r in sel]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("flash channels" if key == "n_channels" else "host data bits")
        ax.set_ylabel("cells")
        ax.set_title(f"EV-SSD core, {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
