"""Our NNX Stable Diffusion against diffusers' own PyTorch models: tiny SD 1.x- and 2.x-shaped
pipelines built with diffusers' and transformers' constructors and saved with
`StableDiffusionPipeline.save_pretrained`, checked through `lmdir priors verify` on a real photo, a
whole text-to-image run against diffusers' pipeline from the same noise, and our DDIM against
diffusers' `DDIMScheduler`."""

import json

import jax
import numpy as np
import pytest
import torch

from lmdir_jax.cli import main
from lmdir_jax.errors import UsageError
from lmdir_jax.priors import sd_weights
from lmdir_jax.priors.ddim import DDIM, DDIMConfig
from lmdir_jax.priors.diffusion import TINY_TEXT_LEN, load_sd
from lmdir_jax.priors.tiny import save_tiny_tokenizer, tiny_clip_config
from lmdir_jax.priors.verify import TOLERANCE

diffusers = pytest.importorskip("diffusers")

# SD 1.x: conv proj_in/proj_out, a head count per model; SD 2.x: linear projections, 64-wide heads
# (heads per block), v prediction. Cross-attention width = the text tower's.
SHAPES = {
    "sd1": dict(unet=dict(use_linear_projection=False, attention_head_dim=4), prediction="epsilon"),
    "sd2": dict(unet=dict(use_linear_projection=True, attention_head_dim=(2, 4)), prediction="v_prediction"),
}


def _perturbed(model, seed):
    """diffusers' init leaves norms at 1/0 and some convolutions at zero: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _diffusers_pipeline(root, shape: str):
    """A tiny StableDiffusionPipeline made of diffusers' / transformers' own modules, saved by it."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SHAPES[shape]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, **spec["unet"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(text_dim=32).text.to_hf()))
    save_tiny_tokenizer(root / "tok", model_max_length=TINY_TEXT_LEN)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=spec["prediction"])
    pipe = StableDiffusionPipeline(
        vae=_perturbed(vae, 1), text_encoder=_perturbed(text, 2), tokenizer=CLIPTokenizer.from_pretrained(
            str(root / "tok")), unet=_perturbed(unet, 0), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(root / shape), safe_serialization=True)
    return pipe, root / shape


@pytest.fixture(scope="module", params=sorted(SHAPES))
def diffusers_sd(request, tmp_path_factory):
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    return _diffusers_pipeline(tmp_path_factory.mktemp("sd"), request.param)


def _lines(capsys):
    return capsys.readouterr().out.strip().splitlines()


def test_verify_a_diffusers_folder(diffusers_sd, photos, capsys):
    _, folder = diffusers_sd
    assert main(["priors", "verify", str(folder), "--image", str(photos[0])]) == 0
    out = _lines(capsys)
    assert [line.split()[0] for line in out[:-1]] == ["text_states", "vae_encode", "vae_decode", "unet"]
    assert all(float(line.split()[-1]) <= TOLERANCE for line in out[:-1])
    assert out[-1] == "ok: 4 of 4 outputs within 0.0001"


def test_verify_exits_1_when_our_unet_differs(diffusers_sd, photos, capsys, monkeypatch):
    """The timestep embedding in the other order (sin first) is caught on the photo."""
    from lmdir_jax.priors import unet

    real = unet.timestep_embedding
    monkeypatch.setattr(unet, "timestep_embedding", lambda t, d, flip, shift: real(t, d, not flip, shift))
    _, folder = diffusers_sd
    assert main(["priors", "verify", str(folder), "--image", str(photos[1])]) == 1
    out = _lines(capsys)
    assert out[-1] == "FAIL: 3 of 4 outputs within 0.0001"
    assert any(line.startswith("unet") and "> 1e-4" in line for line in out)


def test_text_to_image_equals_diffusers_pipeline_from_the_same_noise(diffusers_sd):
    """Our whole sampler (text states, classifier-free guidance, DDIM, VAE decode) against diffusers'
    StableDiffusionPipeline fed our seeded noise as its latents."""
    pipe, folder = diffusers_sd
    sd = load_sd(folder)
    prompts, seeds, steps, size = ["a photo of a cat", "a city street at night"], [3, 4], 3, 16
    ours = sd.text_to_image(prompts, seed=seeds, steps=steps, guidance=5.0, height=size, width=size,
                            negative_prompt="blurry")
    noise = np.stack([np.asarray(jax.random.normal(jax.random.key(s), (4, size // 2, size // 2))) for s in seeds])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                      negative_prompt=["blurry"] * 2, latents=torch.from_numpy(noise), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours.std() > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_equals_diffusers_scheduler(spacing, prediction):
    from diffusers import DDIMScheduler

    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction, timestep_spacing=spacing)
    ref = DDIMScheduler(**kw)
    ours = DDIM(DDIMConfig.from_diffusers(dict(ref.config)))
    steps = 7
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal((2, 4, 3, 3)).astype(np.float32), rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    for t in ref.timesteps.numpy():
        want = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x)).prev_sample.numpy()
        np.testing.assert_allclose(np.asarray(ours.step(out, np.int32(t), x, steps)), want, atol=1e-5)
    t = np.array([999, 10], np.int32)
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(t.astype(np.int64))).numpy()
    np.testing.assert_allclose(np.asarray(ours.add_noise(x, out, t)), want, atol=1e-6)


def test_old_vae_attention_names_and_fp16_weights_load(diffusers_sd, tmp_path):
    """A VAE saved before diffusers renamed its attention (query/key/value/proj_attn), in float16."""
    from safetensors.numpy import load_file, save_file

    _, folder = diffusers_sd
    new = load_file(str(folder / "vae" / sd_weights.WEIGHTS))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old[k] = v.astype(np.float16)
    assert any(".query." in k for k in old)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((folder / "vae" / "config.json").read_text())
    save_file(old, str(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    _, _, a = sd_weights.load_vae(folder / "vae")
    _, _, b = sd_weights.load_vae(tmp_path / "vae")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-3, err_msg=str(path))


def test_unsupported_or_broken_parts_are_one_line(diffusers_sd, tmp_path):
    _, folder = diffusers_sd
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    with pytest.raises(UsageError, match="class_embed_type"):
        sd_weights.UNetConfig.from_diffusers({**cfg, "class_embed_type": "timestep"})
    with pytest.raises(UsageError, match="unsupported UNet block 'SimpleCrossAttnDownBlock2D'"):
        sd_weights.UNetConfig.from_diffusers({**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 2})
    part = tmp_path / "unet"
    part.mkdir()
    (part / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="no weights"):
        sd_weights.load_unet(part)
    (part / sd_weights.FLAX_WEIGHTS).write_bytes(b"x")
    with pytest.raises(UsageError, match="removed Flax format"):
        sd_weights.load_unet(part)
    (part / sd_weights.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="cannot read"):
        sd_weights.load_unet(part)


@pytest.mark.parametrize("t, s", [(2048, 2048), (1536, 1024), (64, 77)])
def test_blocked_attention_equals_the_plain_form(t, s):
    """The CPU form (per image, head and block of queries) computes the same attention."""
    from lmdir_jax.priors.attention import attention, attention_blocked, attention_fn

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, t, 64)).astype(np.float32)
    k, v = (rng.standard_normal((2, s, 64)).astype(np.float32) for _ in range(2))
    want = np.asarray(attention(q, k, v, 4))
    np.testing.assert_allclose(np.asarray(attention_blocked(q, k, v, 4)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(attention_fn("cpu"), static_argnums=3)(q, k, v, 4)), want,
                               atol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        attention_fn("gpu")
