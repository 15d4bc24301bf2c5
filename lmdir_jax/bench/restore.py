"""`lmdir bench restore`: time and peak memory of tiled restoration of one large image.

A random-initialised network from a config (no checkpoint needed) restores a synthetic photo of
`--size` through `inference.restore_image`, so the measurement covers tiling, batching and blending.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np

from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.inference import _forward, restore_image, tile_starts
from lmdir_jax.models import Priors, build_model
from lmdir_jax.runtime import cpu_times, steal_note


def register(bsub) -> None:
    """Add `lmdir bench restore`."""
    p = bsub.add_parser("restore", help="time and peak RSS of tiled restoration of a large image")
    p.add_argument("--config", default="paper", help="config name or path (default paper)")
    p.add_argument("--size", default="3840x2160", help="WIDTHxHEIGHT (default 3840x2160)")
    p.add_argument("--tile", type=int, default=512, help="tile side (default 512)")
    p.add_argument("--tile-overlap", type=int, default=32)
    p.add_argument("--tile-batch", type=int, default=1)
    p.set_defaults(func=run)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT, e.g. 3840x2160, got {text}") from None
    if w < 8 or h < 8:
        raise UsageError(f"--size too small: {text}")
    return w, h


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(args) -> int:
    """Handler of `lmdir bench restore`."""
    w, h = _parse_size(args.size)
    config = load_config(args.config, args.config_overrides)
    t0 = time.perf_counter()
    model = build_model(config.model, int(config.seed))
    t_build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], axis=-1)
    img = np.clip(img + 0.05 * rng.standard_normal((h, w, 3), np.float32), 0, 1)
    del xx, yy
    priors = Priors.empty(1, int(config.model.text_dim), int(config.priors.max_text_len),
                          int(config.priors.ref_size))
    tile = args.tile or None
    n_tiles = 1 if tile is None else (
        len(tile_starts(max(h, tile), tile, args.tile_overlap))
        * len(tile_starts(max(w, tile), tile, args.tile_overlap))
    )
    rss_before = _peak_rss_gib()
    ticks = cpu_times()
    t0 = time.perf_counter()
    out = restore_image(model, img, priors, tile=tile, overlap=args.tile_overlap,
                        batch_size=args.tile_batch, progress=True)
    t_total = time.perf_counter() - t0
    stolen = steal_note(ticks, cpu_times())
    assert out.shape == img.shape
    # steady state: one more tile batch through the compiled function
    x = jax.numpy.asarray(img[None, : min(h, tile or h), : min(w, tile or w)].repeat(args.tile_batch, 0))
    fwd = _forward()
    fwd(model, x, priors).block_until_ready()
    t0 = time.perf_counter()
    fwd(model, x, priors).block_until_ready()
    t_batch = time.perf_counter() - t0
    print(f"config {config.name}  image {w}x{h}  tile {tile} overlap {args.tile_overlap} "
          f"batch {args.tile_batch}  tiles {n_tiles}  device {jax.devices()[0].platform}")
    print(f"model build {t_build:.1f} s  restore (incl. compile) {t_total:.1f} s  "
          f"steady tile batch {t_batch:.3f} s  ({args.tile_batch / t_batch:.2f} tiles/s, "
          f"{args.tile_batch * (tile or h) * (tile or w) / t_batch / 1e6:.2f} Mpix/s)"
          + (f"  cpu stolen during the restore {stolen}" if stolen else ""))
    print(f"peak RSS {_peak_rss_gib():.2f} GiB (before restore {rss_before:.2f} GiB)")
    return 0
