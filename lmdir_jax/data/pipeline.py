"""The training input pipeline: grain MapDataset from a source to batches of degraded/clean patches.

source -> [seed, shuffle, repeat] -> random_map(crop, flips/rot90, degradation, priors)
       -> per-host slice -> batch -> to_iter_dataset -> mp_prefetch + OwnedBatches (workers > 0)

With `data.sources` (a mixture), each source gets its own seed (from config.seed and its name),
shuffle, repeat and transform, and grain's `MapDataset.mix` interleaves them by weight before the
per-host slice; each example then carries `source` (its name) and `source_id` (its index in
`source_names(config)`).

Every random choice of element i comes from (config.seed, i) through grain's per-element
Generator, so the batches are the same for any number of workers, and a restored iterator state
resumes on exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import sys
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from grain.multiprocessing import SharedMemoryArray

from lmdir_jax.data.sources import (
    ImageSource,
    PairedSource,
    SourceSpec,
    is_named_source,
    load_source,
    source_specs,
)
from lmdir_jax.degradations import apply_spec, parse_spec, sample_degradation
from lmdir_jax.degradations.label import kinds_in_text
from lmdir_jax.degradations.rain import ADDITIVE_SHARE
from lmdir_jax.errors import UsageError

log = logging.getLogger("lmdir_jax.data")


def pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an HxWxC image (both sides) so that each side is at least `size`."""
    h, w = img.shape[:2]
    while h < size or w < size:  # reflection can add at most side-1 pixels per pass
        ph, pw = max(0, size - h), max(0, size - w)
        ph, pw = min(ph, max(h - 1, 0)), min(pw, max(w - 1, 0))
        if (ph == 0 and h < size) or (pw == 0 and w < size):  # a 1-pixel side: repeat it
            img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="edge")
        else:
            img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
    return img


def random_crop(rng: np.random.Generator, size: int, *images: np.ndarray) -> list[np.ndarray]:
    """The same random size x size window of each image (padded first when smaller)."""
    images = tuple(pad_to(im, size) for im in images)
    h, w = images[0].shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return [im[y : y + size, x : x + size] for im in images]


def augment(rng: np.random.Generator, *images: np.ndarray) -> list[np.ndarray]:
    """The same random 90-degree rotation and horizontal flip of each image (the 8 dihedral views)."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for im in images:
        im = np.rot90(im, k)
        out.append(im[:, ::-1] if flip else im)
    return out


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an image to size x size (area filter when shrinking, cubic when enlarging)."""
    import cv2

    if img.shape[:2] == (size, size):
        return img.astype(np.float32)
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_CUBIC
    return np.clip(cv2.resize(img.astype(np.float32), (size, size), interpolation=interp), 0, 1)


class PriorAttacher:
    """Adds scene_states/scene_mask/reference/has_reference from a prior cache to an element.

    A missing key gets zeros with all masks False. `missing` lists the source keys without an entry.
    """

    def __init__(self, cache: Any, keys: list[str], ref_size: int, text_len: int, text_dim: int):
        self.cache = cache
        self.ref_size = ref_size
        self.missing: list[str] = []
        shape = None
        for key in keys:
            entry = cache.get(key)
            if entry is None:
                self.missing.append(key)
            elif shape is None:
                shape = np.asarray(entry["scene_states"]).shape
        self.states_shape = tuple(shape) if shape is not None else (text_len, text_dim)
        if self.missing:
            names = ", ".join(self.missing[:5]) + (", ..." if len(self.missing) > 5 else "")
            log.warning(
                "prior cache has no entry for %d of %d images (%s): their scene and reference "
                "priors are masked", len(self.missing), len(keys), names,
            )

    def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
        entry = self.cache.get(element["key"])
        r = self.ref_size
        if entry is None:
            element["scene_states"] = np.zeros(self.states_shape, np.float32)
            element["scene_mask"] = np.zeros(self.states_shape[:1], bool)
            element["reference"] = np.zeros((r, r, 3), np.float32)
            element["has_reference"] = np.bool_(False)
            return element
        element["scene_states"] = np.asarray(entry["scene_states"], np.float32)
        element["scene_mask"] = np.asarray(entry["scene_mask"], bool)
        ref = entry.get("reference")
        has_ref = ref is not None and np.asarray(ref).size > 0
        element["reference"] = resize_square(np.asarray(ref), r) if has_ref else np.zeros((r, r, 3), np.float32)
        element["has_reference"] = np.bool_(has_ref)
        return element


def source_names(config) -> list[str]:
    """The names of the mixture's sources, in `source_id` order ([] for a single source)."""
    return sorted((config.data.get("sources") or {}).keys())


def open_source(spec: SourceSpec, check: str = "auto") -> ImageSource:
    """The ImageSource of one mixture entry; a missing path is a UsageError naming the entry."""
    if not is_named_source(spec.path) and not Path(spec.path).expanduser().exists():
        raise UsageError(f"data.sources.{spec.name}: path not found: {spec.path}")
    try:
        if spec.degraded_dir or spec.clean_dir:
            return PairedSource(spec.path, check=check, degraded_dir=spec.degraded_dir,
                                clean_dir=spec.clean_dir)
        return load_source(spec.path, check=check)
    except UsageError as e:
        raise UsageError(f"data.sources.{spec.name}: {e}") from None


def _source_seed(seed: int, name: str) -> int:
    """A source's own shuffle/transform seed: a pure function of (config.seed, source name)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]).generate_state(1)[0])


def kind_options(data_config) -> dict[str, dict[str, float]]:
    """The degradation kinds' keyword options a data config sets (`mixture.KindOptions`): rain's
    share of the additive (Rain100L) style, `data.rain_additive_share`."""
    return {"rain": {"additive_share": float(data_config.get("rain_additive_share", ADDITIVE_SHARE))}}


class TrainTransform:
    """random_map function: crop, augment and degrade one source item into a training example.

    `source` (a mixture entry) overrides the task weights (its `tasks`), draws one of its fixed
    `specs` instead of sampling, gives its pairs its `text`, and tags examples with its name and
    `source_id`.
    """

    def __init__(self, data_config, priors: PriorAttacher | None = None,
                 source: SourceSpec | None = None, source_id: int = 0):
        self.patch = int(data_config.patch_size)
        self.augment = bool(data_config.augment)
        self.weights = {k: float(v) for k, v in dict(data_config.tasks).items()}
        self.mix_prob = float(data_config.mix_prob)
        self.max_kinds = int(data_config.max_kinds)
        self.random_phrasing = float(data_config.get("random_phrasing", 0.0))
        self.noun_text = float(data_config.get("noun_text", 0.0))
        self.kind_options = kind_options(data_config)
        self.paired_text = str(data_config.get("paired_text", ""))
        self.priors = priors
        self.source, self.source_id = source, int(source_id)
        self.specs: list = []
        if source is not None:
            if source.tasks:
                self.weights = dict(source.tasks)
            if source.text:
                self.paired_text = source.text
            self.specs = [parse_spec(x) for x in source.specs]  # UsageError for a bad spec
        # A pair's label: the kinds its source's text names, at an unknown (moderate) severity.
        self.paired_vector = kinds_in_text(self.paired_text)

    def __call__(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "degraded" in item:
            lq, gt = random_crop(rng, self.patch, item["degraded"], item["clean"])
            if self.augment:
                lq, gt = augment(rng, lq, gt)
            vector, text = self.paired_vector.copy(), self.paired_text
        else:
            (gt,) = random_crop(rng, self.patch, item["clean"])
            if self.augment:
                (gt,) = augment(rng, gt)
            gt = np.ascontiguousarray(gt, dtype=np.float32)
            if self.specs:
                items = self.specs[int(rng.integers(len(self.specs)))]
                lq, label = apply_spec(gt, items, rng, self.kind_options)
            else:
                lq, label = sample_degradation(gt, rng, self.weights, self.mix_prob, self.max_kinds,
                                               self.kind_options)
            vector = np.asarray(label.vector(), np.float32)
            if self.noun_text and rng.random() < self.noun_text:
                text = label.noun_text()
            else:
                text = label.text(rng) if rng.random() < self.random_phrasing else label.text()
        out = {
            "lq": np.ascontiguousarray(lq, dtype=np.float32),
            "gt": np.ascontiguousarray(gt, dtype=np.float32),
            "deg_vector": vector,
            "deg_text": np.str_(text),
            "key": np.str_(item["key"]),
        }
        if self.source is not None:
            out["source"] = np.str_(self.source.name)
            out["source_id"] = np.int32(self.source_id)
        return self.priors(out) if self.priors is not None else out


def _init_worker(worker_index: int, worker_count: int) -> None:
    """grain worker start-up: one OpenCV thread per worker process (the workers are the parallelism)."""
    import cv2

    cv2.setNumThreads(1)


def _check_tasks(weights: dict[str, float], where: str) -> None:
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise UsageError(f"{where} needs at least one positive weight and no negative one")


def _validate(config, process_count: int) -> int:
    d = config.data
    if d.patch_size < 8:
        raise UsageError(f"data.patch_size must be >= 8, got {d.patch_size}")
    if d.batch_size < 1 or d.batch_size % process_count:
        raise UsageError(
            f"data.batch_size {d.batch_size} must be a positive multiple of the {process_count} processes"
        )
    if d.read_threads < 1 or d.prefetch < 0:
        raise UsageError(
            f"data.read_threads must be >= 1 and data.prefetch >= 0, got {d.read_threads} and {d.prefetch}"
        )
    _check_tasks({k: float(v) for k, v in dict(d.tasks).items()}, "data.tasks")
    for name in ("rain_additive_share", "noun_text", "random_phrasing"):
        value = float(d.get(name, 0.0))
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"data.{name} must be in [0, 1], got {value:g}")
    for spec in source_specs(d):
        if spec.tasks:
            _check_tasks(dict(spec.tasks), f"data.sources.{spec.name}.tasks")
    return d.batch_size // process_count


def _attacher(config, prior_cache, src: ImageSource) -> PriorAttacher | None:
    if prior_cache is None:
        return None
    return PriorAttacher(
        prior_cache, src.keys(), int(config.priors.ref_size),
        int(config.priors.max_text_len), int(config.model.text_dim),
    )


def make_dataset(
    config,
    *,
    source: ImageSource | None = None,
    prior_cache: Any = None,
    process_index: int = 0,
    process_count: int = 1,
    sources: list[ImageSource] | None = None,
):
    """The grain MapDataset of per-host batches (infinite); see `make_train_iterator`.

    With `data.sources` set, `sources` may pass the opened sources (in `source_specs` order).
    """
    per_host = _validate(config, process_count)
    specs = source_specs(config.data) if source is None else []
    if specs:
        srcs = [open_source(s) for s in specs] if sources is None else list(sources)
        parts, missing = [], []
        for i, (spec, src) in enumerate(zip(specs, srcs, strict=True)):
            priors = _attacher(config, prior_cache, src)
            missing += [] if priors is None else priors.missing
            part = grain.MapDataset.source(src).seed(_source_seed(config.seed, spec.name))
            part = part.shuffle().repeat().random_map(TrainTransform(config.data, priors, spec, i))
            parts.append(part)
        ds = grain.MapDataset.mix(parts, [s.weight for s in specs])
    else:
        src = load_source(config.data.source) if source is None else source
        priors = _attacher(config, prior_cache, src)
        missing = [] if priors is None else priors.missing
        ds = grain.MapDataset.source(src).seed(int(config.seed)).shuffle().repeat()
        ds = ds.random_map(TrainTransform(config.data, priors))
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.batch(per_host, drop_remainder=True)
    ds.missing_priors = missing
    return ds


def _read_options(data) -> Any:
    """grain.ReadOptions from data.read_threads / data.prefetch (batches read ahead)."""
    return grain.ReadOptions(num_threads=int(data.read_threads), prefetch_buffer_size=int(data.prefetch))


def _own_memory(batch: Any) -> Any:
    """A batch whose arrays live in this process's memory: each shared-memory array from a grain
    worker is copied, and its block unlinked at once, so none outlives the batch (a block still
    named at exit is what Python's resource_tracker reports as leaked)."""
    if isinstance(batch, dict):
        return {k: _own_memory(v) for k, v in batch.items()}
    if isinstance(batch, SharedMemoryArray) and batch.shm is not None:
        owned = np.array(batch)
        batch._unlink_on_del = False  # unlinked here; grain's __del__ then only unmaps it
        batch.shm.unlink()
        return owned
    return batch


def _wait_for_shared_memory_release() -> None:
    """Let grain's background deleter finish unlinking the shared-memory blocks dropped so far
    (it runs on a daemon thread that stops, its queue undone, when the interpreter exits)."""
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None and not sys.is_finalizing():  # at exit its thread no longer runs
        # one thread, first in first out: once this no-op has run, every earlier deletion has
        pool.apply_async(int).wait(timeout=60)


try:
    from grain import DatasetIterator as _DatasetIterator
except ImportError:  # grain < 0.2.12 has it under grain.python
    from grain.python import DatasetIterator as _DatasetIterator


class OwnedBatches(_DatasetIterator):
    """The iterator of a multi-worker pipeline: batches in private memory (`_own_memory`), and a
    `close` that returns when the workers are joined and their shared memory is released."""

    def __next__(self) -> dict[str, Any]:
        return _own_memory(next(self._parent))

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        """Stop the worker processes and release every shared-memory block they made (once;
        grain calls it again when the iterator is collected)."""
        if self._closed:
            return
        self._closed = True
        self._parent.close()
        _wait_for_shared_memory_release()


def make_train_iterator(
    config,
    *,
    prior_cache: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source: ImageSource | None = None,
):
    """A grain DatasetIterator of training batches for this host.

    Batches are dicts: lq/gt (b,P,P,3) f32, deg_vector (b,len(KINDS)) f32, deg_text and key (b,)
    str, and with a prior cache scene_states/scene_mask/reference/has_reference. b is the per-host
    batch (config.data.batch_size / process_count); process index/count default to JAX's.
    The iterator supports get_state/set_state and grain.checkpoint.CheckpointSave/Restore; its
    attribute `missing_priors` lists the source keys absent from the prior cache. Call its
    `close()` when done: it joins the worker processes and releases their shared memory.
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    ds = make_dataset(
        config, source=source, prior_cache=prior_cache,
        process_index=process_index, process_count=process_count,
    )
    missing = ds.missing_priors
    it_ds = ds.to_iter_dataset(_read_options(config.data))
    workers = int(config.data.num_workers)
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain 0.2.18 reads absl flags in mp_prefetch
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_init_worker
        )
    it = iter(it_ds) if workers == 0 else OwnedBatches(iter(it_ds))
    try:
        it.missing_priors = missing
    except AttributeError:
        pass
    return it
