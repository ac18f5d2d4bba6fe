"""Shared plumbing for benchmarks: where results go, how they are written, how time is taken."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

__all__ = ["results_dir", "write_results", "percentiles", "Timer", "peak_rss_bytes"]


def results_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``results/<name>/`` below ``root`` (default: ``$EVSSD_RESULTS`` or ``./results``)."""
    base = Path(root or os.environ.get("EVSSD_RESULTS", "results"))
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_results(name: str, data: dict, figure=None, *, command: str | None = None,
                  root: str | os.PathLike | None = None) -> Path:
    """Write ``<name>.json`` (and ``<name>.png`` when a matplotlib figure is given).

    The JSON carries the command line, git revision, host and time, so every number in
    docs/benchmarks.md can be traced to the run that made it. Returns the JSON path.
    """
    out = results_dir(name, root)
    meta = {
        "benchmark": name,
        "command": command,
        "git_rev": _git_rev(),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, **_jsonable(data)}, indent=2) + "\n")
    if figure is not None:
        figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    return path


def percentiles(samples, qs=(50, 99)) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


class Timer:
    """Wall-clock timer (``time.perf_counter``) usable as a context manager."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
