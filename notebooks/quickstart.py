# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LMDIR quick start: all-in-one image restoration with large-model priors (JAX / Flax NNX)
#
# **LMDIR** (Large-Model-Driven Image Restoration, arXiv 2407.13181) restores images with many kinds of
# degradation (noise, blur, rain, haze, low light, JPEG, low resolution and their mixtures) with **one**
# network. It is guided by three priors from large *frozen* models:
#
# 1. a **degradation description** ("heavy rain streaks and gaussian noise"), encoded by the CLIP text
#    tower, from the user or chosen automatically by CLIP from the image itself;
# 2. a **scene caption**, encoded by CLIP;
# 3. a **reference image** of the scene synthesised by Stable Diffusion.
#
# This notebook runs the whole `lmdir-jax` pipeline on Colab, Kaggle or your own machine:
#
# 1. installs the repository and detects the accelerator (CPU / GPU / TPU), sizing the run to it;
# 2. synthesises degradations on sample photos;
# 3. makes tiny random CLIP / Stable Diffusion priors (no download; give real weights folders as
#    parameters) and builds the prior cache;
# 4. trains the quick-start model with a live loss curve (resumable: rerun the cell to continue);
# 5. restores images in automatic and text-guided modes and shows before / after with PSNR;
# 6. evaluates PSNR / SSIM on a small benchmark;
# 7. exports the network to PyTorch and checks that both frameworks agree.
#
# With tiny random priors the guidance carries no real knowledge; the network still learns to
# restore from the images alone. See `docs/priors.md` for real CLIP and Stable Diffusion weights.

# %% tags=["parameters"]
# Parameters (papermill-style: this cell is tagged "parameters"; override them there or with
# `papermill -p NAME VALUE`).
TINY = False  # True: tiny model, a few steps, small crops (what the test suite runs, ~1-2 min on CPU)
INSTALL = True  # pip install the repository when `lmdir_jax` is not importable yet
REPO_URL = "https://github.com/YOUR-ACCOUNT/lmdir-jax.git"  # your clone (Colab / Kaggle clone it)
WORKDIR = "runs/notebook"  # everything this notebook writes; relative = to the repository root
CONFIG = ""  # "" = quick-start model sized to the accelerator; or a config name / path ("bsds")
STEPS = 0  # training steps; 0 = sized to the accelerator
CLIP_DIR = ""  # local Hugging Face CLIP folder; "" = tiny random CLIP made here
SD_DIR = ""  # local diffusers Stable Diffusion folder; "" = tiny random SD (none when CLIP_DIR given)
TRAIN_DATA = "skimage"  # clean training images: skimage, a folder, a paired folder, tfds:NAME:SPLIT
EVAL_DIR = "../shared/data/test/CBSD68"  # optional clean test folder (skipped when absent)
SEED = 0

# %% [markdown]
# ## 1. Install
#
# On Colab / Kaggle the repository is cloned from `REPO_URL` (Kaggle: turn *Internet* on in the
# notebook settings) and installed with `pip install -e`. Run from a checkout (`notebooks/` inside
# the repository), it is installed from the parent folder. Nothing is installed when `lmdir_jax` is
# already importable or when `INSTALL = False`.

# %%
import importlib.util
import subprocess
import sys
from pathlib import Path


def find_repo() -> Path | None:
    """The repository root: this folder or a parent that holds pyproject.toml and lmdir_jax/."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "pyproject.toml").is_file() and (folder / "lmdir_jax").is_dir():
            return folder
    return None


REPO = find_repo()
if importlib.util.find_spec("lmdir_jax") is None:
    if not INSTALL:
        raise RuntimeError("lmdir_jax is not importable: set INSTALL = True or install the repository")
    if REPO is None:  # Colab / Kaggle: clone first
        if "YOUR-ACCOUNT" in REPO_URL:
            raise ValueError("set REPO_URL (parameters cell) to the git URL of your lmdir-jax clone")
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "lmdir-jax"], check=True)
        REPO = Path("lmdir-jax").resolve()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
    sys.path.insert(0, str(REPO))  # the editable install's .pth is only read by new interpreters
    importlib.invalidate_caches()

import lmdir_jax  # noqa: E402

if REPO is None:  # installed elsewhere: use its checkout when it is one
    candidate = Path(lmdir_jax.__file__).resolve().parents[1]
    REPO = candidate if (candidate / "pyproject.toml").is_file() else None
ROOT = REPO or Path.cwd()


def resolve(path: str) -> Path:
    """A user path: absolute as given, relative to the repository root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (ROOT / p).resolve()


WORK = resolve(WORKDIR)
WORK.mkdir(parents=True, exist_ok=True)
print(f"lmdir_jax from {Path(lmdir_jax.__file__).parent}; writing to {WORK}")

# %% [markdown]
# ## 2. Accelerator and run size
#
# `jax.default_backend()` says what JAX runs on. The run is sized for it: on a CPU a short run of the
# quick-start model on 64-pixel patches; on a GPU / TPU longer, with bigger patches and batches and
# bfloat16 compute. The global batch is a multiple of the device count (it is split over all of them).

# %%
import jax
import numpy as np

from lmdir_jax.config import load_config

BACKEND = jax.default_backend()
DEVICES = jax.devices()
N_DEV = len(DEVICES)
KINDS = sorted({d.device_kind for d in DEVICES})
print(f"JAX {jax.__version__}: backend {BACKEND}, {N_DEV} device(s): {', '.join(KINDS)}")
# Compiled programs are kept on disk: rerunning the notebook (or a training chunk) skips compiling.
# A cache you already set (JAX_COMPILATION_CACHE_DIR) is kept.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(WORK / "jax-cache"))
print(f"compilation cache: {jax.config.jax_compilation_cache_dir}")


def round_up(x: int, n: int) -> int:
    """The smallest multiple of n that is >= x."""
    return max(n, -(-x // n) * n)


if TINY:  # the test suite: configs/tiny.py, a few steps
    RUN = dict(config="tiny", steps=6, chunk=3, batch=round_up(8, N_DEV), patch=32, crop=64,
               eval_images=2, tile=64, overlap=8, sd_steps=2, dtype="float32")
elif BACKEND == "cpu":
    RUN = dict(config="quickstart", steps=800, chunk=100, batch=round_up(8, N_DEV), patch=64,
               crop=192, eval_images=4, tile=192, overlap=32, sd_steps=10, dtype="float32")
else:  # gpu / tpu
    RUN = dict(config="quickstart", steps=3000, chunk=250, batch=round_up(8 * N_DEV, N_DEV),
               patch=128, crop=256, eval_images=8, tile=256, overlap=32, sd_steps=25,
               dtype="bfloat16")
if CONFIG:
    RUN["config"] = CONFIG
if STEPS:
    RUN["steps"] = int(STEPS)
    RUN["chunk"] = max(1, int(STEPS) // 6)

config = load_config(RUN["config"], [])
config.seed = SEED
config.data.source = TRAIN_DATA
config.data.batch_size = RUN["batch"]
config.data.patch_size = RUN["patch"]
config.model.dtype = RUN["dtype"]
config.train.val_every = 0  # the notebook evaluates below
config.train.plot_every = 0  # and draws its own live curve
print({k: v for k, v in RUN.items()})

# %% [markdown]
# ## 3. Degradation synthesis
#
# Training pairs are made on the fly: a clean crop, one degradation (or a mixture, applied in a
# physically sensible order) drawn at random, and a text label that becomes the degradation prior.
# A *spec* such as `noise:25` (σ on 0-255) or `rain+haze` fixes the degradation; `lmdir degrade`
# does the same from the command line (see `docs/degradations.md`).

# %%
import textwrap

import matplotlib.pyplot as plt
from IPython.display import display

from lmdir_jax.data.evaluation import center_crop
from lmdir_jax.data.sources import load_source
from lmdir_jax.degradations import apply_spec, sample_degradation

SPECS = ["noise:25", "blur", "jpeg:15", "rain", "haze", "lowlight", "rain+noise:15"]
samples = load_source("skimage")
rows = [center_crop(samples[i]["clean"], RUN["crop"]) for i in (0, 2)]
rng = np.random.default_rng(SEED)
fig, axes = plt.subplots(len(rows), len(SPECS) + 2, figsize=(2.0 * (len(SPECS) + 2), 2.3 * len(rows)))
for r, clean in enumerate(rows):
    panels = [(clean, "clean")]
    for spec in SPECS:
        img, label = apply_spec(clean, spec, rng)
        panels.append((img, f"{spec}\n{label.text()}"))
    img, label = sample_degradation(clean, rng, config.data.tasks.to_dict(), mix_prob=0.5)
    panels.append((img, f"random\n{label.text()}"))
    for ax, (img, title) in zip(axes[r], panels, strict=True):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title("\n".join(textwrap.wrap(title, 24)), fontsize=7)
        ax.axis("off")
fig.tight_layout()
display(fig)
plt.close(fig)

# %% [markdown]
# ## 4. Priors: CLIP, Stable Diffusion and the prior cache
#
# The large models are frozen. Captions, their CLIP text states and one Stable Diffusion reference
# image per training photo are computed once and stored in a prior cache, which the data loader reads.
# Without `CLIP_DIR` the notebook makes tiny **random** CLIP and SD models (`lmdir priors make-tiny`),
# so everything runs offline; their captions and references are noise, not knowledge.

# %%
from lmdir_jax.priors.cache import PriorCache, build_cache
from lmdir_jax.priors.clip import load_clip

if CLIP_DIR:
    clip_dir, sd_dir = resolve(CLIP_DIR), (resolve(SD_DIR) if SD_DIR else None)
else:
    from lmdir_jax.priors.diffusion import save_tiny_sd
    from lmdir_jax.priors.tiny import save_tiny_clip

    tiny = WORK / "priors-tiny"
    clip_dir, sd_dir = tiny / "clip", tiny / "sd"
    if not (clip_dir / "config.json").is_file():
        save_tiny_clip(clip_dir, text_dim=32, seed=SEED)
    if not (sd_dir / "model_index.json").is_file():
        save_tiny_sd(sd_dir, seed=SEED)

clip = load_clip(str(clip_dir), max_text_len=int(config.priors.max_text_len))
config.model.text_dim = clip.text_dim  # the network reads CLIP's text states
config.priors.clip = str(clip_dir)
cache_dir = WORK / "prior-cache"
cache_summary = build_cache(
    TRAIN_DATA, clip_dir, cache_dir, sd_path=sd_dir, ref_size=int(config.priors.ref_size),
    seed=SEED, steps=RUN["sd_steps"], max_text_len=int(config.priors.max_text_len), clip=clip,
)
config.priors.cache = str(cache_dir)
cache = PriorCache(cache_dir)
print(f"prior cache {cache_dir}: {len(cache)} images, {cache_summary['references']} references")
keys = cache.keys()[:4]
fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.8))
for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
    item = cache.get(key)
    ax.imshow(np.clip(item["reference"], 0, 1))
    ax.set_title("\n".join(textwrap.wrap(f"{key}: {item['caption']}", 28)), fontsize=7)
    ax.axis("off")
fig.suptitle("scene captions and reference images from the prior cache", fontsize=9)
fig.tight_layout()
display(fig)
plt.close(fig)

# %% [markdown]
# ## 5. Training, with a live loss curve
#
# `train(config, workdir)` is what `lmdir train` runs: grain data pipeline, one jitted step sharded
# over all devices, orbax checkpoints. Here it runs in chunks: each call raises `config.train.steps`
# and resumes exactly from the last checkpoint (model, optimizer and data position), then the curve is
# redrawn from `metrics.jsonl`. Rerun this cell (or raise `STEPS`) to continue training. The
# warm-up + cosine learning-rate schedule is compiled into the train step; `train.schedule_steps`
# is set to the whole run, so every chunk follows one schedule and reuses the step the first chunk
# traced and compiled (without it the schedule would span each chunk's `train.steps`, and each
# chunk would compile its own step).

# %%
import math

from IPython.display import clear_output

from lmdir_jax.train.loop import read_metrics, train

TRAIN_DIR = WORK / "train"
config.train.steps = RUN["steps"]
config.train.log_every = max(1, min(int(config.train.log_every), RUN["chunk"]))
config.train.ckpt_every = RUN["chunk"]
total = RUN["steps"]
config.train.schedule_steps = total  # one learning-rate schedule (and one compiled step) for all chunks


def show_curve(records: list[dict], total: int) -> None:
    """Plot the training loss logged so far (log scale when positive) and display it in place."""
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, losses, "o-", ms=3)
    ax.set_xlim(0, total)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{config.train.loss} loss")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"training {config.name}: step {steps[-1] if steps else 0} / {total}")
    fig.tight_layout()
    clear_output(wait=True)
    display(fig)
    plt.close(fig)


done = max([r["step"] for r in read_metrics(TRAIN_DIR)] or [0])
chunks = []  # (first step, last step) of each train() call
for target in [*range(RUN["chunk"], total, RUN["chunk"]), total]:
    if target <= done:
        continue
    config.train.steps = target
    train_summary = train(config, TRAIN_DIR, progress=False)
    chunks.append((train_summary["start_step"], train_summary["step"]))
    show_curve(read_metrics(TRAIN_DIR), total)
    print(f"step {train_summary['step']}: loss {train_summary['loss']:.4f}, "
          f"{train_summary['images_per_s']:.1f} images/s, {train_summary['params']:,} parameters")
records = read_metrics(TRAIN_DIR)
final_loss = [r["loss"] for r in records if "loss" in r][-1]
assert math.isfinite(final_loss), "training diverged"
print(f"trained {config.name} to step {records[-1]['step']} in {TRAIN_DIR}")

# %% [markdown]
# ## 6. Restore: automatic and text-guided
#
# `load_restorer(workdir)` loads the trained network (EMA weights when present) and its CLIP prior.
# *Automatic* mode lets CLIP pick the degradation description from the image (zero-shot over a
# vocabulary); *text-guided* mode uses your words (here the synthesis label, e.g. "moderate gaussian
# noise"). `lmdir restore` does this for files and folders, tiled for any image size.

# %%
from lmdir_jax.data.io import read_image
from lmdir_jax.data.sources import list_images
from lmdir_jax.inference import load_restorer
from lmdir_jax.metrics import psnr

restorer = load_restorer(str(TRAIN_DIR))
eval_dir = resolve(EVAL_DIR) if EVAL_DIR else None
if eval_dir is not None and eval_dir.is_dir():  # a test photo the network has never seen
    photo_path = list_images(eval_dir)[0]
    photo, photo_name = read_image(photo_path), photo_path.name
else:  # a held-out skimage photo: never in the `skimage` training source
    heldout = load_source("skimage-heldout")
    photo, photo_name = heldout[0]["clean"], heldout.keys()[0]
clean = center_crop(photo, RUN["crop"])
RESTORE_SPECS = ["noise:25", "rain", "haze"]
restore_psnr = {}
fig, axes = plt.subplots(len(RESTORE_SPECS), 4, figsize=(10, 2.7 * len(RESTORE_SPECS)))
for row, spec in zip(axes, RESTORE_SPECS, strict=True):
    lq, label = apply_spec(clean, spec, np.random.default_rng(SEED))
    auto_priors, auto_choice = restorer.priors_for(lq)
    text_priors, _ = restorer.priors_for(lq, degradation=label.text())
    auto_out = restorer.restore(lq, auto_priors)
    text_out = restorer.restore(lq, text_priors)
    scores = {"input": psnr(lq, clean), "auto": psnr(auto_out, clean), "text": psnr(text_out, clean)}
    restore_psnr[spec] = scores
    panels = [
        (lq, f"{spec}: {scores['input']:.2f} dB"),
        (auto_out, f"auto '{auto_choice.degradation}': {scores['auto']:.2f} dB"),
        (text_out, f"text '{label.text()}': {scores['text']:.2f} dB"),
        (clean, f"clean {photo_name}"),
    ]
    for ax, (img, title) in zip(row, panels, strict=True):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title("\n".join(textwrap.wrap(title, 34)), fontsize=8)
        ax.axis("off")
fig.tight_layout()
display(fig)
plt.close(fig)
for spec, scores in restore_psnr.items():
    print(f"{spec:>10}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))

# %% [markdown]
# ## 7. Evaluate
#
# PSNR / SSIM (RGB and Y) of the restored images against the clean ones, with the degraded input's
# scores for reference. Clean folders are degraded by a spec at a fixed seed; paired folders
# (`degraded/` + `clean/`, e.g. Rain100L, SOTS) are used as they are. `lmdir evaluate` is the
# command-line version; `docs/datasets.md` lists the standard benchmarks and published numbers.

# %%
from lmdir_jax.evaluate import EvalSet, evaluate, format_table

sets = [EvalSet("skimage-heldout", spec) for spec in ("noise:25", "rain", "haze")]
if eval_dir is not None and eval_dir.is_dir():
    sets.append(EvalSet(str(eval_dir), "noise:25"))
report = evaluate(restorer, sets, seed=SEED, max_images=RUN["eval_images"], tile=RUN["tile"],
                  overlap=RUN["overlap"], progress=False)
print(format_table(report))
print("(skimage-heldout: photos kept out of the `skimage` training source; two photos, a sanity "
      "check rather than a benchmark)")

# %% [markdown]
# ## 8. Export to PyTorch
#
# `export_torch` writes the network as a PyTorch `nn.Module` (defined in
# `lmdir_jax/export/torch_model.py`, importable without JAX) plus a safetensors state dict;
# `lmdir export torch` is the command. Both frameworks run the last restoration's input and priors.

# %%
torch_max_diff = None
if importlib.util.find_spec("torch") is None:
    print("PyTorch is not installed (pip install torch): export skipped")
else:
    from lmdir_jax.export import check
    from lmdir_jax.export.convert import export_torch
    from lmdir_jax.export.torch_model import load as load_torch

    export_dir = export_torch(TRAIN_DIR, WORK / "export-torch", force=True)
    torch_model = load_torch(export_dir)
    fields = ("deg_states", "deg_mask", "scene_states", "scene_mask", "reference", "has_reference")
    inputs = {"lq": np.asarray(lq[None], np.float32)}
    inputs.update({f: np.asarray(getattr(text_priors, f)) for f in fields})
    jax_out = check.run_jax(check.float32_twin(restorer.model, restorer.config.model), inputs)
    torch_out = check.run_torch(torch_model, inputs)
    torch_max_diff = float(np.max(np.abs(jax_out - torch_out)))
    print(f"exported to {export_dir}: {sorted(p.name for p in export_dir.iterdir())}")
    print(f"max |JAX - PyTorch| = {torch_max_diff:.2e}; PyTorch output PSNR "
          f"{psnr(np.clip(torch_out[0], 0, 1), clean):.2f} dB")

# %%
import json

summary = {
    "python": sys.executable,
    "backend": BACKEND,
    "devices": N_DEV,
    "config": config.name,
    "steps": records[-1]["step"],
    "final_loss": final_loss,
    "chunks": chunks,
    "restore_psnr": restore_psnr,
    "eval": report.summary(),
    "eval_average": report.average(),
    "torch_max_diff": torch_max_diff,
    "workdir": str(WORK),
}
print("NOTEBOOK_SUMMARY " + json.dumps(summary, default=float))

# %% [markdown]
# ## Where to go next
#
# - `README.md`: the command-line tour (`lmdir degrade / train / restore / evaluate / export`).
# - `docs/notebook.md`: this notebook's parameters, Colab and Kaggle.
# - `docs/datasets.md`: the 3-task and 5-task all-in-one protocols and their public datasets.
# - `docs/priors.md`: real CLIP and Stable Diffusion weights, building the prior cache.
# - `docs/training.md`: configs, multi-device and multi-host training, checkpoints and resume.
# - `docs/degradations.md`: every degradation, the spec grammar and the text labels.
# - `configs/`: `tiny`, `quickstart`, `bsds`, `paper` model sizes; set `CONFIG` to train another one.
