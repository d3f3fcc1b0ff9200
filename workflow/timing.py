"""Timing helpers of the benchmarks and reports: one timed call, cases measured round-robin, ratios
paired within rounds, and glibc's allocator kept from returning freed memory (page faults would
be timed otherwise)."""
import contextlib
import ctypes
import ctypes.util
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch


def measure_rounds(cases: Dict[str, Callable[[], None]], device, warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds of every call of every case, measured round-robin: per case one entry per round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, device))
    return times


def measure(cases: Dict[str, Callable[[], None]], device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per call of every case, measured round-robin."""
    return {name: statistics.median(t) for name, t in measure_rounds(cases, device, warmup, repeats).items()}


def paired_ratio(numerator: List[float], denominator: List[float]) -> Tuple[float, float, float]:
    """numerator / denominator of two cases timed in the same rounds: the median over rounds of the
    ratio within each round, and its quartiles. A change of the machine's speed that lasts a round
    (a noisy neighbour, a frequency step) moves both cases and cancels; the two cases' own medians
    may come from rounds of different speeds."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, middle, high = statistics.quantiles(ratios, n=4, method='inclusive')
    return middle, low, high


def inference(net: torch.nn.Module, images: torch.Tensor, autocast=contextlib.nullcontext) -> Callable[[], None]:
    """One forward of net on images without gradients, as a case of `measure`."""
    def run():
        with torch.no_grad(), autocast():
            net(images)
    return run


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to the values a training process reaches on its own.

    glibc raises both thresholds each time it frees a large mmap-ed block; a model's activations
    (tens of MB) take them to their maxima within the first step. A fresh process that only runs
    small kernels keeps the defaults and hands freed memory back to the OS, so the temporaries of
    the Pade root page-fault again (docs/benchmark.md measures it).
    Fixing the thresholds up front makes each part measure what it costs inside training, whatever
    ran before it. Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError, TypeError):
        return False


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn() takes, the device synchronised before and after (CUDA)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
