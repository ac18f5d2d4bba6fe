"""Lookup traces for one embedding table, in the FBGEMM form: per batch ``(indices, offsets)``.

``indices`` is int64, ``offsets`` int64 of length ``batch_size + 1``; bag ``b`` is
``indices[offsets[b]:offsets[b+1]]``. Every generator is seeded and yields :class:`Batch` tuples
(``n_batches=None`` yields forever). Bags have a fixed length ``pooling_factor``.

* :func:`meta_calibrated` -- reuse calibrated to Meta's 2021 DLRM trace statistics
  (``dlrm_locality_stats_2021.txt``, see :func:`load_locality_stats`).
* :func:`zipf`, :func:`uniform` -- i.i.d. lookups.
* :func:`load_criteo` -- real Criteo rows (dense features, labels, hashed categorical indices).

The Meta-calibrated model
-------------------------
The statistics give, per batch of a table, how many distinct rows were touched once, twice,
3-4 times, 5-8 times, ... (the *within-batch reuse histogram*, 17 power-of-two bins) and the
average number of lookups per distinct row (6.9-7.6). They say nothing about which rows recur
from one batch to the next, which is what a cache lives on, so the model adds that part:

1. Per batch, ``L = batch_size * pooling_factor`` lookups over ``U = round(L / avg_reuse)``
   distinct rows (capped at ``n_rows``).
2. The ``U`` rows are split over the bins in proportion to the file's average histogram
   (largest-remainder rounding, so the histogram is matched to within ``1/U`` per bin); each row
   draws its count log-uniformly inside its bin. The file's histogram is printed to three
   decimals, so bins above ~512 read 0.000 although they carry 20-30% of the lookups; the
   lookups the printed bins leave over (``L - sum(counts)``, about a quarter of them) are split
   evenly over the ``k`` hottest rows, ``k`` just large enough that none of them gets more than
   ``max_row_share`` (3%) of the batch: the heavy hitters of the file's second histogram (share
   of lookups per bin: 2% of all lookups land on rows touched more than 32768 times in a batch of
   ~1M lookups per table, i.e. >= 3% each). Those few rows leave their bins, which moves the
   histogram by at most ``k/U`` (a few tenths of a percent at the default sizes). If the counts overshoot ``L`` they are trimmed from the
   largest rows, never below their bin.
3. Which rows: a fixed popularity ranking (a seeded random permutation of the table, so hot rows
   are scattered over the index space) with Zipf(``alpha``) weights over the ranks. A batch draws
   ``U`` distinct rows by sampling ranks with replacement until ``U`` distinct ones are seen, then
   hands the largest counts to the most popular of them (rank times a log-normal jitter of
   ``sigma=hot_jitter``, so the order is not perfectly stable). Popular rows therefore recur in
   every batch with high counts, while most once-touched rows come from the long tail and seldom
   return: the situation an admission filter is built for. ``alpha`` is the one free
   assumption (the file has no cross-batch information); 1.0 by default.
4. The multiset of indices is shuffled and cut into bags.

With ``U`` small (tiny batches) the histogram is matched only as well as ``U`` rows allow; with
``U`` capped by ``n_rows`` the average reuse rises above the file's.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Batch", "LocalityStats", "CriteoData", "BIN_EDGES", "BIN_LABELS", "shared_data_dir",
    "default_locality_stats_path", "load_locality_stats", "average_locality", "reuse_histogram",
    "meta_calibrated", "zipf", "uniform", "load_criteo",
]

# Bin i holds counts in (BIN_EDGES[i], BIN_EDGES[i+1]]; the last bin is (32768, inf).
BIN_EDGES = np.array([0] + [2**i for i in range(16)], dtype=np.int64)
N_BINS = len(BIN_EDGES)     # 17
BIN_LABELS = [f"({BIN_EDGES[i]}, {BIN_EDGES[i + 1]}]" for i in range(N_BINS - 1)] + [f"{BIN_EDGES[-1]}+"]
_BIN_LO = BIN_EDGES + 1                                  # smallest count in the bin
_BIN_HI = np.concatenate([BIN_EDGES[1:], [2 * BIN_EDGES[-1]]])   # largest (the open bin: 2x)


class Batch(NamedTuple):
    indices: np.ndarray     # int64 [offsets[-1]]
    offsets: np.ndarray     # int64 [batch_size + 1]


# ----------------------------------------------------------------------------------------------
# the locality statistics file


@dataclass(frozen=True)
class LocalityStats:
    """One trace's entry of ``dlrm_locality_stats_2021.txt``."""

    name: str
    n_batches: int
    batch_size: int
    n_indices: float          # lookups per batch (all tables)
    n_unique: float           # distinct (table, row) pairs per batch
    avg_reuse: float          # n_indices / n_unique
    unique_hist: np.ndarray   # share of distinct rows per reuse bin (17)
    lookup_hist: np.ndarray   # share of lookups per reuse bin (17)


def shared_data_dir() -> Path:
    """Where the external data files are: ``$EVSSD_SHARED_DATA`` if set, else the copies shipped in
    the package (``host/data``, see its README for provenance)."""
    env = os.environ.get("EVSSD_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data"


def default_locality_stats_path() -> Path:
    return shared_data_dir() / "dlrm_locality_stats_2021.txt"


def _parse_hist_line(line: str, where: str) -> float:
    label, sep, value = line.rpartition(":")
    if not sep or not label.strip().startswith("("):
        raise ValueError(f"{where}: expected a histogram line '(a, b]: share', got {line!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: bad share {value.strip()!r}") from None


def load_locality_stats(path: str | os.PathLike | None = None) -> list[LocalityStats]:
    """Parse the per-trace reuse statistics (default: :func:`default_locality_stats_path`).

    Each entry: a ``<trace>.pt`` line, ``Locality stats after processing N batches of size B``,
    ``Avg # of indices``, ``Avg # of unique cols``, ``Avg col size``, then two 17-line histograms
    (``Histogram of col sizes`` and ``Ratio of index distribution ...``), each followed by its
    bin edges and cumulative shares, which are ignored. Raises ``ValueError`` naming the file and
    line on anything else.
    """
    path = Path(path) if path is not None else default_locality_stats_path()
    lines = path.read_text().splitlines()
    out: list[LocalityStats] = []
    i = 0

    def where(k):
        return f"{path}:{k + 1}"

    def expect(k, prefix):
        if k >= len(lines) or not lines[k].startswith(prefix):
            got = lines[k] if k < len(lines) else "end of file"
            raise ValueError(f"{where(k)}: expected a line starting {prefix!r}, got {got!r}")
        return lines[k][len(prefix):].strip()

    def number(k, prefix):
        text = expect(k, prefix)
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where(k)}: bad number {text!r} after {prefix!r}") from None

    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        name = lines[i].strip()
        if not name.endswith(".pt"):
            raise ValueError(f"{where(i)}: expected a trace name ending in '.pt', got {name!r}")
        head = expect(i + 1, "Locality stats after processing ").split()
        try:      # "N batches of size B"
            n_batches, batch_size = int(head[0]), int(head[-1])
        except (ValueError, IndexError):
            raise ValueError(f"{where(i + 1)}: cannot read batch count and size from {lines[i + 1]!r}") from None
        n_indices = number(i + 2, "Avg # of indices:")
        n_unique = number(i + 3, "Avg # of unique cols:")
        number(i + 4, "Avg col size:")
        expect(i + 5, "Histogram of col sizes:")
        k = i + 6
        uh = [_parse_hist_line(lines[k + j], where(k + j)) for j in range(N_BINS)] \
            if k + N_BINS <= len(lines) else None
        if uh is None:
            raise ValueError(f"{where(len(lines) - 1)}: histogram cut short")
        k += N_BINS + 2                       # skip the edges and cumulative lines
        expect(k, "Ratio of index distribution")
        k += 1
        if k + N_BINS > len(lines):
            raise ValueError(f"{where(len(lines) - 1)}: histogram cut short")
        lh = [_parse_hist_line(lines[k + j], where(k + j)) for j in range(N_BINS)]
        k += N_BINS + 2
        if n_unique <= 0:
            raise ValueError(f"{where(i + 3)}: unique count must be positive, got {n_unique}")
        out.append(LocalityStats(name=name, n_batches=n_batches, batch_size=batch_size,
                                 n_indices=n_indices, n_unique=n_unique,
                                 avg_reuse=n_indices / n_unique,
                                 unique_hist=np.array(uh), lookup_hist=np.array(lh)))
        i = k
    if not out:
        raise ValueError(f"{path}: no locality statistics found")
    return out


def average_locality(stats: Sequence[LocalityStats]) -> LocalityStats:
    """The mean of several traces' statistics (histograms averaged, then renormalised to 1)."""
    if not stats:
        raise ValueError("average_locality: no statistics given")
    uh = np.mean([s.unique_hist for s in stats], axis=0)
    lh = np.mean([s.lookup_hist for s in stats], axis=0)
    return LocalityStats(
        name=f"mean of {len(stats)}", n_batches=sum(s.n_batches for s in stats),
        batch_size=stats[0].batch_size, n_indices=float(np.mean([s.n_indices for s in stats])),
        n_unique=float(np.mean([s.n_unique for s in stats])),
        avg_reuse=float(np.mean([s.avg_reuse for s in stats])),
        unique_hist=uh / uh.sum(), lookup_hist=lh / lh.sum())


def reuse_histogram(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within-batch reuse of one batch: (share of distinct rows, share of lookups) per bin."""
    _, counts = np.unique(np.asarray(indices), return_counts=True)
    if counts.size == 0:
        return np.zeros(N_BINS), np.zeros(N_BINS)
    b = np.searchsorted(BIN_EDGES, counts, side="left") - 1
    rows = np.bincount(b, minlength=N_BINS).astype(np.float64)
    looks = np.bincount(b, weights=counts, minlength=N_BINS)
    return rows / rows.sum(), looks / looks.sum()


# ----------------------------------------------------------------------------------------------
# generators


def _check(name, value, lo, kind=int):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) if kind is int \
        else isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (kind is not int and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} >= {lo}, got {value!r}")


def _check_common(n_rows, batch_size, pooling_factor, n_batches):
    _check("n_rows", n_rows, 1)
    _check("batch_size", batch_size, 1)
    _check("pooling_factor", pooling_factor, 1)
    if n_batches is not None:
        _check("n_batches", n_batches, 0)


def _offsets(batch_size, pooling_factor):
    return np.arange(batch_size + 1, dtype=np.int64) * pooling_factor


class _ZipfRanks:
    """Zipf(alpha) over ranks 0..n-1 mapped through a seeded permutation of the rows."""

    def __init__(self, n_rows, alpha, rng):
        w = (np.arange(1, n_rows + 1, dtype=np.float64)) ** -float(alpha)
        self.cdf = np.cumsum(w)
        self.cdf /= self.cdf[-1]
        self.rows = rng.permutation(n_rows).astype(np.int64)

    def ranks(self, rng, size):
        r = np.searchsorted(self.cdf, rng.random(size), side="right")
        return np.minimum(r, len(self.cdf) - 1)


def uniform(n_rows: int, batch_size: int, pooling_factor: int, seed: int = 0, *,
            n_batches: int | None = None) -> Iterator[Batch]:
    """Every lookup uniform over the table: no locality (the cache's worst case)."""
    _check_common(n_rows, batch_size, pooling_factor, n_batches)
    rng = np.random.default_rng(seed)
    offsets = _offsets(batch_size, pooling_factor)
    b = 0
    while n_batches is None or b < n_batches:
        yield Batch(rng.integers(0, n_rows, batch_size * pooling_factor, dtype=np.int64), offsets.copy())
        b += 1


def zipf(n_rows: int, alpha: float, batch_size: int = 512, pooling_factor: int = 20,
         seed: int = 0, *, n_batches: int | None = None) -> Iterator[Batch]:
    """I.i.d. lookups, Zipf(``alpha``) over a seeded popularity ranking of the rows (rank r has
    weight ``(r+1)**-alpha``; the hot rows are scattered over the index space). ``alpha=0`` is
    uniform."""
    _check_common(n_rows, batch_size, pooling_factor, n_batches)
    _check("alpha", alpha, 0, float)
    rng = np.random.default_rng(seed)
    pop = _ZipfRanks(n_rows, alpha, rng)
    offsets = _offsets(batch_size, pooling_factor)
    b = 0
    while n_batches is None or b < n_batches:
        yield Batch(pop.rows[pop.ranks(rng, batch_size * pooling_factor)], offsets.copy())
        b += 1


def _bin_allocation(u, hist, max_count):
    """Distinct rows per bin: largest-remainder rounding of ``u * hist``; bins whose smallest
    count cannot fit in the batch fold into the highest bin that can."""
    feasible = _BIN_LO <= max_count
    h = np.where(feasible, hist, 0.0)
    top = int(np.flatnonzero(feasible)[-1])
    h[top] += hist[~feasible].sum()
    h = h / h.sum()
    exact = u * h
    n = np.floor(exact).astype(np.int64)
    short = u - int(n.sum())
    if short > 0:
        n[np.argsort(-(exact - n), kind="stable")[:short]] += 1
    return n


def _counts_for(u, total, hist, rng, max_row_share=0.03):
    """Per-row lookup counts, sorted descending: ``u`` rows in the histogram's bins, summing to
    ``total`` (see the module docstring, step 2)."""
    n_bin = _bin_allocation(u, hist, total - (u - 1))
    bins = np.repeat(np.arange(N_BINS), n_bin)
    lo = _BIN_LO[bins].astype(np.float64)
    hi = np.minimum(_BIN_HI[bins], total).astype(np.float64)
    c = np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))).astype(np.int64)
    c = np.clip(c, lo.astype(np.int64), hi.astype(np.int64))
    c = np.sort(c)[::-1].copy()
    bins_sorted = np.searchsorted(BIN_EDGES, c, side="left") - 1
    rest = total - int(c.sum())
    if rest > 0:                        # the tail the printed histogram rounds to 0.000
        k = min(u, max(1, math.ceil(rest / (max_row_share * total))))
        c[:k] += rest // k
        c[: rest % k] += 1
    elif rest < 0:                      # trim from the largest rows, keeping each in its bin
        slack = c - _BIN_LO[bins_sorted]
        take = np.minimum(slack, np.maximum(0, -rest - (np.cumsum(slack) - slack)))
        c -= take
        rest += int(take.sum())
        if rest < 0:                    # cannot stay in the bins: fall back to any row above 1
            slack = c - 1
            take = np.minimum(slack, np.maximum(0, -rest - (np.cumsum(slack) - slack)))
            c -= take
    return c


def meta_calibrated(n_rows: int, batch_size: int = 512, pooling_factor: int = 20, seed: int = 0,
                    *, n_batches: int | None = None, alpha: float = 1.0, hot_jitter: float = 0.5,
                    max_row_share: float = 0.03,
                    stats: LocalityStats | Sequence[LocalityStats] | str | os.PathLike | None = None,
                    ) -> Iterator[Batch]:
    """Batches whose within-batch reuse histogram matches Meta's DLRM 2021 traces, with Zipf
    popularity carrying hot rows across batches (model: module docstring).

    ``stats``: a :class:`LocalityStats`, a list of them (averaged), a path to a stats file, or
    None for the shared file's average over all traces.
    """
    _check_common(n_rows, batch_size, pooling_factor, n_batches)
    _check("alpha", alpha, 0, float)
    _check("hot_jitter", hot_jitter, 0, float)
    if not isinstance(max_row_share, (int, float)) or not 0 < max_row_share <= 1:
        raise ValueError(f"max_row_share must be in (0, 1], got {max_row_share!r}")
    if stats is None or isinstance(stats, (str, os.PathLike)):
        stats = average_locality(load_locality_stats(stats))
    elif not isinstance(stats, LocalityStats):
        stats = average_locality(list(stats))
    rng = np.random.default_rng(seed)
    pop = _ZipfRanks(n_rows, alpha, rng)
    total = batch_size * pooling_factor
    u = int(min(n_rows, max(1, round(total / stats.avg_reuse))))
    offsets = _offsets(batch_size, pooling_factor)
    b = 0
    while n_batches is None or b < n_batches:
        counts = _counts_for(u, total, stats.unique_hist, rng, max_row_share)
        # U distinct ranks, sampled with replacement until U distinct are seen
        seen = np.empty(0, dtype=np.int64)
        draw = max(2 * u, 64)
        while seen.size < u:
            cand = np.concatenate([seen, pop.ranks(rng, draw)])
            uniq, first = np.unique(cand, return_index=True)
            seen = uniq[np.argsort(first, kind="stable")]
            draw *= 2
        ranks = seen[:u]
        order = np.argsort(ranks * rng.lognormal(0.0, hot_jitter, u) if hot_jitter else ranks,
                           kind="stable")
        rows = pop.rows[ranks[order]]          # most popular first, gets the largest count
        indices = rng.permutation(np.repeat(rows, counts))
        yield Batch(indices, offsets.copy())
        b += 1


# ----------------------------------------------------------------------------------------------
# Criteo


@dataclass
class CriteoData:
    """Criteo rows: ``dense`` float32 [N, 13] (log(1 + max(x, 0)), missing -> 0), ``labels``
    float32 [N], ``indices`` int64 [n_tables, N] (one lookup per sample and table; pass
    ``offsets`` = ``arange(N + 1)`` to an FBGEMM-style lookup)."""

    dense: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    rows_per_table: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.arange(self.labels.shape[0] + 1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


N_DENSE, N_SPARSE = 13, 26


def load_criteo(path: str | os.PathLike | None = None, n_tables: int = N_SPARSE,
                rows_per_table: int | Sequence[int] = 100_000) -> CriteoData:
    """Read a Criteo CSV (header ``label,I1..I13,C1..C26``; empty fields allowed).

    Categorical ``C1..C<n_tables>`` become row indices ``int(hex, 16) % rows_per_table[t]`` (a
    stable hash: the same string gives the same row in every run); a missing categorical maps to
    row 0. Dense: negative values (I2 has -1s) clamp to 0, then ``log(1 + x)``. Raises
    ``ValueError`` naming the file and line for a wrong header, field count or value.
    Default path: ``criteo_sample.txt`` in :func:`shared_data_dir`.
    """
    path = Path(path) if path is not None else shared_data_dir() / "criteo_sample.txt"
    _check("n_tables", n_tables, 1)
    if n_tables > N_SPARSE:
        raise ValueError(f"n_tables must be at most {N_SPARSE} (C1..C26), got {n_tables}")
    rpt = np.broadcast_to(np.asarray(rows_per_table, dtype=object), (n_tables,)) \
        if np.ndim(rows_per_table) == 0 else np.asarray(rows_per_table, dtype=object)
    if rpt.shape != (n_tables,):
        raise ValueError(f"rows_per_table must be an integer or {n_tables} integers, got {len(rpt)}")
    for r in rpt:
        _check("rows_per_table", r, 1)
    rpt = rpt.astype(np.int64)
    header = ["label"] + [f"I{i}" for i in range(1, N_DENSE + 1)] + [f"C{i}" for i in range(1, N_SPARSE + 1)]
    labels, dense, cats = [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or [h.strip() for h in first] != header:
            raise ValueError(f"{path}:1: expected the header label,I1..I13,C1..C26, got {first!r}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            try:
                lab = float(row[0])
            except ValueError:
                raise ValueError(f"{path}:{line}: label {row[0]!r} is not a number") from None
            if lab not in (0.0, 1.0):
                raise ValueError(f"{path}:{line}: label must be 0 or 1, got {row[0]!r}")
            d = []
            for j, v in enumerate(row[1:1 + N_DENSE]):
                if v.strip() == "":
                    d.append(0.0)
                    continue
                try:
                    x = float(v)
                except ValueError:
                    raise ValueError(f"{path}:{line}: I{j + 1} = {v!r} is not a number") from None
                if not math.isfinite(x):
                    raise ValueError(f"{path}:{line}: I{j + 1} = {v!r} is not finite")
                d.append(math.log1p(max(x, 0.0)))
            c = []
            for t in range(n_tables):
                v = row[1 + N_DENSE + t].strip()
                if v == "":
                    c.append(0)
                    continue
                try:
                    h = int(v, 16)
                except ValueError:
                    raise ValueError(f"{path}:{line}: C{t + 1} = {v!r} is not a hex string") from None
                c.append(h % int(rpt[t]))
            labels.append(lab)
            dense.append(d)
            cats.append(c)
    n = len(labels)
    return CriteoData(
        dense=np.array(dense, dtype=np.float32).reshape(n, N_DENSE),
        labels=np.array(labels, dtype=np.float32),
        indices=np.array(cats, dtype=np.int64).reshape(n, n_tables).T.copy(),
        rows_per_table=rpt)
