"""Per-kind synthesis time, so `lmdir bench data` can show where the data pipeline spends its time."""

from __future__ import annotations

import time

import numpy as np

from lmdir_jax.degradations.label import KINDS
from lmdir_jax.degradations.mixture import KIND_FUNCTIONS, sample_degradation


def time_kinds(size: int = 128, n: int = 200, seed: int = 0, cpu: bool = False) -> dict[str, float]:
    """Mean milliseconds per call of each kind (severities spread over [0.1, 1]) on size x size
    images, plus 'mixture' (sample_degradation, uniform weights, mix_prob 0.3, up to 3 kinds).

    Wall-clock time by default; `cpu=True` measures this process's CPU time instead, which is the
    steadier number on a machine shared with other jobs.
    """
    clock = time.process_time if cpu else time.perf_counter
    rng = np.random.default_rng(seed)
    images = [rng.random((size, size, 3), dtype=np.float32) for _ in range(4)]
    severities = np.linspace(0.1, 1.0, n)
    out: dict[str, float] = {}
    for kind in KINDS:
        fn = KIND_FUNCTIONS[kind]
        fn(images[0], rng, 0.5)  # warm-up (OpenCV lazy initialisation)
        t0 = clock()
        for i in range(n):
            fn(images[i % 4], rng, float(severities[i]))
        out[kind] = (clock() - t0) * 1e3 / n
    weights = dict.fromkeys(KINDS, 1.0)
    t0 = clock()
    for i in range(n):
        sample_degradation(images[i % 4], rng, weights, 0.3, 3)
    out["mixture"] = (clock() - t0) * 1e3 / n
    return out
