"""Frozen Stable Diffusion (our NNX UNet, VAE and CLIP text tower) driven by jitted DDIM steps.

LMDIR's third prior is a clean *reference image* of the scene, synthesised from its caption
(text-to-image) or from the image itself (image-to-image). The weights are a local diffusers folder
(`sd_weights`); the sampling loop:

- three compiled programs per (batch, size, steps): the start (text states, seeded noise, the
  image's noised latents), one DDIM step (the timestep's index traced, called once per timestep) and
  the VAE decode. The steps are a Python loop, not `lax.fori_loop`: XLA hoists loop-invariant work out
  of a loop, and on CPUs that includes the float32 copy of every bf16 weight (the whole UNet again,
  twice its bf16 size);
- classifier-free guidance with the unconditional and conditional halves in one UNet call;
- image i's noise comes only from its own seed, so batching, padding and sharding never change it;
- the batch is padded to a multiple of the device count and sharded over the mesh's 'data' axis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import CLIPTokenizer

from lmdir_jax.axes import DATA
from lmdir_jax.errors import UsageError
from lmdir_jax.priors import sd_weights
from lmdir_jax.priors.clip_model import (
    ClipTextConfig,
    ClipTextTransformer,
    abstract,
    save_text_encoder,
)
from lmdir_jax.priors.ddim import DDIM, DDIMConfig, load_ddim
from lmdir_jax.priors.tiny import save_tiny_tokenizer, tiny_clip_config
from lmdir_jax.priors.unet import UNet2DConditionModel, UNetConfig
from lmdir_jax.priors.vae import AutoencoderKL, VAEConfig

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = ("float32", "bfloat16")


class StableDiffusion:
    """A loaded Stable Diffusion: text-to-image and image-to-image with seeded, sharded DDIM.

    Build it with `load_sd(path)`. Parameters stay frozen; they are replicated once per mesh.
    """

    def __init__(
        self,
        *,
        unet: tuple[UNetConfig, nnx.GraphDef],
        unet_params: Any,
        vae: tuple[VAEConfig, nnx.GraphDef],
        vae_params: Any,
        text_encoder: Any,
        text_params: Any,
        tokenizer: Any,
        scheduler: DDIMConfig,
        dtype: str = "float32",
    ):
        (self.unet_config, self._unet_def), (self.vae_config, self._vae_def) = unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = DDIM(scheduler)
        self.dtype = dtype
        self.params = {"unet": unet_params, "vae": vae_params, "text": text_params}
        self._placed: dict[Any, Any] = {}
        self._round_trip_jit = jax.jit(self._round_trip)
        self._start_jit = jax.jit(self._start, static_argnames=("latent_hw", "steps", "use_cfg"))
        self._step_jit = jax.jit(self._step, static_argnames=("steps", "use_cfg"))
        self._decode_jit = jax.jit(self._decode)

    def unet(self, params: Any) -> UNet2DConditionModel:
        """Our NNX UNet holding `params` (e.g. `sd.params['unet']`)."""
        return nnx.merge(self._unet_def, params)

    def vae(self, params: Any) -> AutoencoderKL:
        """Our NNX VAE holding `params` (e.g. `sd.params['vae']`)."""
        return nnx.merge(self._vae_def, params)

    # ----------------------------------------------------------------------------- sizes
    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD 1.x/2.x)."""
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x UNet down-sampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet_config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The side the UNet was trained at, in pixels (512 for SD 1.5, 768 for SD 2.1)."""
        return int(self.unet_config.sample_size) * self.vae_scale_factor

    # ----------------------------------------------------------------------------- public API
    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int],
        steps: int = 25,
        guidance: float = 7.5,
        height: int = 512,
        width: int = 512,
        negative_prompt: str | Sequence[str] | None = None,
        mesh: Any = None,
    ) -> np.ndarray:
        """Images (B, height, width, 3) float32 in [0, 1] for the prompts, by DDIM from seeded noise.

        `seed` is one seed per prompt, or an int s meaning seeds s, s+1, ... Image i depends only on
        its prompt, its negative prompt and its seed.
        """
        prompts = _as_list(prompts)
        self._check_size(height, width)
        return self._generate(
            prompts, None, seed, steps, guidance, height, width, negative_prompt, 0, mesh
        )

    def image_to_image(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        *,
        strength: float = 0.5,
        seed: int | Sequence[int],
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        mesh: Any = None,
    ) -> np.ndarray:
        """Re-synthesise images (B, H, W, 3) in [0, 1] towards the prompts (SDEdit with DDIM).

        The VAE latent mean of each image is noised to the timestep `strength` of the way along the
        schedule and denoised from there: strength 0 gives the VAE round-trip, 1 ignores the image.
        """
        prompts = _as_list(prompts)
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UsageError(f"image_to_image wants images (B, H, W, 3), got shape {images.shape}")
        if images.shape[0] != len(prompts):
            raise UsageError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if not 0.0 <= strength <= 1.0:
            raise UsageError(f"strength must be in [0, 1], got {strength}")
        height, width = images.shape[1:3]
        self._check_size(height, width)
        _check_steps(steps)
        t_start = steps - min(int(steps * strength), steps)
        return self._generate(
            prompts, images, seed, steps, guidance, height, width, negative_prompt, t_start, mesh
        )

    def vae_round_trip(self, images: np.ndarray) -> np.ndarray:
        """decode(encode(images)) with the latent mean: what image_to_image gives at strength 0."""
        x = jnp.asarray(np.asarray(images, np.float32))
        return np.asarray(self._round_trip_jit(self.params["vae"], x))

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids (B, L) int32 padded/truncated to the tokenizer's model_max_length."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        )
        return tok.input_ids.astype(np.int32)

    # ----------------------------------------------------------------------------- internals
    def _check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise UsageError(
                f"height and width must be positive multiples of {m}, got {height}x{width}"
            )

    def _mesh_and_params(self, mesh: Any) -> tuple[Any, Any]:
        """The mesh to use (default: all local devices on 'data') and the params replicated on it."""
        if mesh is None:
            mesh = Mesh(np.array(jax.local_devices()), (DATA,))
        if DATA not in mesh.axis_names:
            raise UsageError(f"the mesh needs a {DATA!r} axis, it has {mesh.axis_names}")
        if mesh not in self._placed:
            self._placed[mesh] = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        return mesh, self._placed[mesh]

    def _generate(
        self,
        prompts: list[str],
        images: np.ndarray | None,
        seed: int | Sequence[int],
        steps: int,
        guidance: float,
        height: int,
        width: int,
        negative_prompt: str | Sequence[str] | None,
        t_start: int,
        mesh: Any,
    ) -> np.ndarray:
        _check_steps(steps)
        n = len(prompts)
        if n == 0:
            raise UsageError("no prompts given")
        seeds = _seeds(seed, n)
        negatives = _negatives(negative_prompt, n)
        mesh, params = self._mesh_and_params(mesh)
        per = mesh.shape[DATA]
        pad = (-n) % per
        batch = {
            "ids": self.encode_prompts(prompts),
            "neg_ids": self.encode_prompts(negatives),
            "seeds": seeds,
        }
        if images is not None:
            batch["images"] = images
        if pad:
            batch = {
                k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()
            }
        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA)))
        shape = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        use_cfg = float(guidance) != 1.0
        latents, context = self._start_jit(
            params, batch, latent_hw=shape, steps=steps, t_start=np.int32(t_start), use_cfg=use_cfg
        )
        for i in range(t_start, steps):
            latents = self._step_jit(
                params["unet"], latents, context, np.float32(guidance), np.int32(i),
                steps=steps, use_cfg=use_cfg,
            )
        return np.asarray(self._decode_jit(params["vae"], latents))[:n]

    def _round_trip(self, vae_params: Any, images: Any) -> Any:
        return self._decode(vae_params, self._encode(vae_params, images))

    def _encode(self, vae_params: Any, images: Any) -> Any:
        """Images (B,H,W,3) in [0,1] -> scaled latent means (B,C,h,w) float32."""
        mean = self.vae(vae_params).encode(images * 2.0 - 1.0)
        return jnp.transpose(mean.astype(jnp.float32), (0, 3, 1, 2)) * self._scaling

    def _decode(self, vae_params: Any, latents: Any) -> Any:
        """Scaled latents (B,C,h,w) -> images (B,H,W,3) float32 in [0,1]."""
        x = self.vae(vae_params).decode(jnp.transpose(latents / self._scaling, (0, 2, 3, 1)))
        return jnp.clip(x.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

    @property
    def _scaling(self) -> float:
        return float(self.vae_config.scaling_factor)

    def _start(
        self,
        params: Any,
        batch: dict[str, Any],
        *,
        latent_hw: tuple[int, int],
        steps: int,
        t_start: Any,
        use_cfg: bool,
    ) -> tuple[Any, Any]:
        """(latents, context) of one padded batch before the first DDIM step: seeded noise (or the
        image's latents noised to step `t_start`) and the text states (unconditional ones interleaved).

        Latents are (B, C, h, w), as diffusers draws its noise, so a seed gives diffusers' noise."""
        b = batch["seeds"].shape[0]
        cond = self.text_encoder(batch["ids"], params=params["text"])[0]
        if use_cfg:
            uncond = self.text_encoder(batch["neg_ids"], params=params["text"])[0]
            # Interleave (uncond_i, cond_i) so each device's shard holds both halves of its images.
            context = jnp.stack([uncond, cond], axis=1).reshape(2 * b, *cond.shape[1:])
        else:
            context = cond
        channels = self.unet_config.in_channels
        noise = jax.vmap(
            lambda s: jax.random.normal(jax.random.key(s), (channels, *latent_hw), jnp.float32)
        )(batch["seeds"])
        if "images" not in batch:
            return noise, context
        timesteps = jnp.asarray(self.scheduler.timesteps(steps))
        latents = self._encode(params["vae"], batch["images"])
        # t_start is traced (one program for every strength); t_start == steps: no noise.
        t0 = jnp.full((b,), timesteps[jnp.minimum(t_start, steps - 1)])
        noised = self.scheduler.add_noise(latents, noise, t0)
        return jnp.where(t_start < steps, noised, latents), context

    def _step(
        self, unet_params: Any, latents: Any, context: Any, guidance: Any, i: Any, *, steps: int,
        use_cfg: bool,
    ) -> Any:
        """One guided DDIM step: the latents at timestep index `i` -> the latents at the next one."""
        t = jnp.asarray(self.scheduler.timesteps(steps))[i]
        x = jnp.repeat(latents, 2, axis=0) if use_cfg else latents
        out = self.unet(unet_params)(jnp.transpose(x, (0, 2, 3, 1)), jnp.full((x.shape[0],), t), context)
        out = jnp.transpose(out.astype(jnp.float32), (0, 3, 1, 2))
        if use_cfg:
            out = out.reshape(latents.shape[0], 2, *out.shape[1:])
            out = out[:, 0] + guidance * (out[:, 1] - out[:, 0])
        return self.scheduler.step(out, t, latents, steps).astype(jnp.float32)


# --------------------------------------------------------------------------------- helpers
def _as_list(prompts: Sequence[str] | str) -> list[str]:
    return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]


def _check_steps(steps: int) -> None:
    if int(steps) < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")


def _seeds(seed: int | Sequence[int], n: int) -> np.ndarray:
    """Per-image seeds as uint32: a list of n, or an int s meaning s, s+1, ..., s+n-1."""
    seeds = [int(seed) + i for i in range(n)] if np.isscalar(seed) else [int(s) for s in seed]
    if len(seeds) != n:
        raise UsageError(f"{len(seeds)} seeds for {n} prompts")
    if any(not 0 <= s < 2**32 for s in seeds):
        raise UsageError("seeds must be in [0, 2**32)")
    return np.asarray(seeds, dtype=np.uint32)


def _negatives(negative: str | Sequence[str] | None, n: int) -> list[str]:
    if negative is None:
        return [""] * n
    if isinstance(negative, str):
        return [negative] * n
    negative = [str(s) for s in negative]
    if len(negative) != n:
        raise UsageError(f"{len(negative)} negative prompts for {n} prompts")
    return negative


# --------------------------------------------------------------------------------- loading
def load_sd(path: str | Path, dtype: str = "float32", kernels: str = "auto") -> StableDiffusion:
    """Load a local diffusers-layout SD 1.x/2.x folder (safetensors, or .bin with torch).

    The scheduler config is read as DDIM's whatever its class was (SD 1.5 ships PNDM's config: same
    betas). dtype 'bfloat16' casts all weights and computes in bf16; the latents and the DDIM
    arithmetic stay float32. `kernels` (auto / xla / cpu) picks the attention's form
    (`priors.attention`; auto: blocked on CPUs).
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"Stable Diffusion folder not found: {root}")
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise UsageError(
            f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/"
        )
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    unet_cfg, unet_def, unet_params = sd_weights.load_unet(root / "unet", dtype, kernels)
    vae_cfg, vae_def, vae_params = sd_weights.load_vae(root / "vae", dtype, kernels)
    text_encoder, text_params = sd_weights.load_text_encoder(root / "text_encoder", dtype)
    scheduler = load_ddim(root / "scheduler")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {root}: {e}") from None
    return StableDiffusion(
        unet=(unet_cfg, unet_def),
        unet_params=unet_params,
        vae=(vae_cfg, vae_def),
        vae_params=vae_params,
        text_encoder=text_encoder,
        text_params=text_params,
        tokenizer=tokenizer,
        scheduler=scheduler,
        dtype=dtype,
    )


# --------------------------------------------------------------------------------- tiny model
TINY_TEXT_LEN = 16
TINY_UNET = UNetConfig(
    sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    heads=(8, 8), cross_attention_dim=32,
)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16)


def save_tiny_sd(path: str | Path, seed: int = 0, *, unet: UNetConfig = TINY_UNET,
                 vae: VAEConfig = TINY_VAE, text: ClipTextConfig | None = None,
                 scheduler: DDIMConfig | None = None) -> Path:
    """Write a tiny random SD folder in the real diffusers layout (images 16-32 px, latent /2).

    UNet (32, 64) channels, VAE (32, 64), our NNX CLIP text tower of width 32 (written as transformers
    writes a CLIPTextModel), H4's tiny tokenizer, an SD-style DDIM config and model_index.json: the
    files diffusers' `StableDiffusionPipeline.from_pretrained` reads, and that `load_sd` reads back
    through the path real weights take. Weights are drawn with NumPy from `seed` (no XLA compile).
    `unet`, `vae`, `text` (its width = the UNet's cross-attention width) and `scheduler` give other
    shapes (e.g. SD 1.5's, for memory measurements).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    text_cfg = text or tiny_clip_config(text_dim=unet.cross_attention_dim).text
    if text_cfg.hidden_size != unet.cross_attention_dim:
        raise UsageError(f"text width {text_cfg.hidden_size} != the UNet's cross-attention width "
                         f"{unet.cross_attention_dim}")
    parts = (("unet", unet, lambda: UNet2DConditionModel(unet, rngs=nnx.Rngs(0))),
             ("vae", vae, lambda: AutoencoderKL(vae, rngs=nnx.Rngs(0))))
    for i, (name, cfg, build) in enumerate(parts):
        sd_weights.save_part(cfg, random_params(abstract(build)[1], seed * 3 + i), root / name)
    sched = scheduler or DDIMConfig()
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(sched.to_diffusers(), indent=2) + "\n", encoding="utf-8")
    text_def, text_shapes = abstract(lambda: ClipTextTransformer(text_cfg, rngs=nnx.Rngs(0)))
    text_model = nnx.merge(text_def, jax.tree.map(jnp.asarray, random_params(text_shapes, seed * 3 + 2)))
    save_text_encoder(text_model, text_cfg, root / "text_encoder")
    save_tiny_tokenizer(root / "tokenizer", model_max_length=TINY_TEXT_LEN)
    (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    return root


def random_params(shapes: Any, seed: int) -> Any:
    """Random weights for a pytree of shapes, drawn with numpy (no XLA compile, unlike `init`).

    Kernels ~ N(0, 1/fan_in) (LeCun, Flax's default), norm scales 1, biases 0.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any) -> np.ndarray:
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "bias":
            return np.zeros(shape, np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        std = 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))) if name == "kernel" else 0.02
        return (rng.standard_normal(shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.39.0",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# --------------------------------------------------------------------------------- benchmark
def benchmark_sd(
    sd: StableDiffusion,
    batch: int = 2,
    steps: int = 4,
    size: int | None = None,
    *,
    repeats: int = 2,
    mesh: Any = None,
) -> dict[str, Any]:
    """Time text_to_image: compile+first call, then `repeats` timed calls -> a dict of numbers."""
    size = size or sd.default_size
    prompts = [f"a photo of a city street {i}" for i in range(batch)]
    kwargs = dict(seed=0, steps=steps, height=size, width=size, mesh=mesh)
    t0 = time.perf_counter()
    sd.text_to_image(prompts, **kwargs)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        sd.text_to_image(prompts, **kwargs)
    elapsed = (time.perf_counter() - t0) / repeats
    return {
        "images_per_s": batch / elapsed,
        "s_per_batch": elapsed,
        "s_per_step_per_image": elapsed / (steps * batch),
        "first_call_s": first,
        "batch": batch,
        "steps": steps,
        "size": size,
        "dtype": sd.dtype,
        "devices": len(mesh.devices.flat) if mesh is not None else jax.local_device_count(),
        "platform": jax.devices()[0].platform,
    }
