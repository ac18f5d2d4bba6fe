"""evssd.host.kernel_cache: cached kernels are dropped when any kernel module's source changed."""
from __future__ import annotations

import re
from pathlib import Path

from evssd.host import kernel_cache as kc


def test_stale_kernels_are_removed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    dirs = kc._cache_dirs()
    assert all(str(d).startswith(str(tmp_path)) for d in dirs)
    host_dir = dirs[0]
    host_dir.mkdir(parents=True)
    ours = [host_dir / "cache._lookup_pool_kernel-458.py311.nbi", host_dir / "pooling._pool_serial-1.py311.nbc"]
    other = host_dir / "unrelated.f-3.py311.nbi"
    for f in (*ours, other):
        f.write_bytes(b"x")
    stamps = iter(["a", "a", "b"])
    monkeypatch.setattr(kc, "_stamp", lambda: next(stamps))
    assert kc.sync() is True                  # no stamp yet: clear, then remember "a"
    assert not any(f.exists() for f in ours) and other.exists()
    ours[0].write_bytes(b"x")
    assert kc.sync() is False                 # unchanged sources: the cache stays
    assert ours[0].exists()
    assert kc.sync() is True                  # a source changed: cleared again
    assert not ours[0].exists() and other.exists()
    assert (host_dir / kc._STAMP).read_text() == "b"


def test_every_kernel_module_is_listed():
    """Every host module that caches kernels is in the stamp (a new one must be added)."""
    host = Path(kc.__file__).parent
    found = {str(p.relative_to(host)) for p in host.rglob("*.py") if re.search(r"njit\(.*cache=True", p.read_text())}
    assert found == set(kc.KERNEL_MODULES)
