"""Keeps numba's on-disk kernel cache consistent with the host's kernel sources.

numba keys a cached kernel by the modification time and size of the file that defines it, not
of the files whose functions it inlines: a kernel of :mod:`evssd.host.cache` that inlines a bag
loop of :mod:`evssd.host.pooling` is loaded from the cache unchanged after ``pooling.py``
alone changed (a ``git pull`` or an edit in a source checkout), and then computes by the old
code. This module keeps one stamp over every kernel module's source; when it differs from the
stamp stored beside the cache, the cached kernels of all of them are removed before the first
kernel is loaded, so each recompiles once. (An installed release changes every file at once,
which numba's own key catches.)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["KERNEL_MODULES", "sync"]

_HOST = Path(__file__).resolve().parent

#: the modules defining ``cache=True`` kernels, relative to ``evssd/host``
KERNEL_MODULES = ("pooling.py", "dedupe.py", "misses.py", "cache.py", "model.py", "timing.py",
                  "sparse_flash.py", "store/store.py", "rowmem.py")

_STAMP = "evssd-kernels.stamp"


def _stamp() -> str:
    h = hashlib.sha256()
    for rel in KERNEL_MODULES:
        st = (_HOST / rel).stat()
        h.update(f"{rel}:{st.st_mtime_ns}:{st.st_size};".encode())
    return h.hexdigest()


def _cache_dirs() -> list[Path]:
    """Where numba keeps the kernels of :data:`KERNEL_MODULES`: ``__pycache__`` beside each
    module, or under ``NUMBA_CACHE_DIR`` (numba mirrors the source path there)."""
    root = os.environ.get("NUMBA_CACHE_DIR")
    dirs = {(_HOST / rel).parent for rel in KERNEL_MODULES}
    if root:
        return sorted({Path(root) / d.relative_to(d.anchor) for d in dirs})
    return sorted(d / "__pycache__" for d in dirs)


def sync() -> bool:
    """Remove the cached kernels of every kernel module when any of their sources changed
    since the last call (on any process). Returns whether it removed them. Never raises: a
    read-only or missing cache directory leaves numba's own behaviour."""
    try:
        now = _stamp()
        dirs = _cache_dirs()
        stamp = dirs[0] / _STAMP
        try:
            if stamp.read_text() == now:
                return False
        except OSError:
            pass
        names = {Path(rel).stem for rel in KERNEL_MODULES}
        for d in dirs:
            if not d.is_dir():
                continue
            for f in d.iterdir():
                if f.suffix in (".nbi", ".nbc") and f.name.split(".", 1)[0] in names:
                    f.unlink(missing_ok=True)
        dirs[0].mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(now)
            os.replace(tmp, stamp)
        finally:
            tmp.unlink(missing_ok=True)   # gone after the replace; left over only if it failed
        return True
    except OSError:
        return False
