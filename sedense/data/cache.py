"""The memory the decoded-image cache may take, filling it within that, and how many loader processes to run."""

from __future__ import annotations

import os
import time

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def available_memory() -> float:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; elsewhere the total, or 8 GB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8.0 * 2**30


def default_num_workers() -> int:
    """One loader worker per core (affinity-aware), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def fill_caches(datasets, limit: float) -> None:
    """Cache every image of ``datasets`` that fits in ``limit`` bytes; say how many did not (they are decoded when
    used)."""
    start, nbytes = time.perf_counter(), 0
    estimates = [d.estimate_cache_bytes() for d in datasets]
    need = sum(estimates)
    share = min(1.0, limit / need) if need > 0 else 1.0
    if share < 1.0:
        rank_zero_warn(
            f"data.cache: the decoded images would take about {need / 2**30:.1f} GB, over the limit of "
            f"{limit / 2**30:.1f} GB (data.cache_limit_gb; by default half the free memory): caching "
            f"{share:.0%} of them, decoding the rest when used"
        )
    for dataset in datasets:
        nbytes += dataset.fill_cache(int(len(dataset) * share))
    n = sum(int(len(d) * share) for d in datasets)
    rank_zero_info(f"Cached {n} decoded images ({nbytes / 2**20:.0f} MB) in {time.perf_counter() - start:.1f} s")
