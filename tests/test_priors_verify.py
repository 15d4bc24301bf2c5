"""`lmdir priors verify` / `embed` / `export-daclip` against tiny models that transformers and
open_clip build and save with their own constructors, on real photos; DA-CLIP's layout round trip."""

import json

import numpy as np
import pytest
import torch

from lmdir_jax.cli import main
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.controller import Controller, save_daclip
from lmdir_jax.priors.verify import TOLERANCE
from lmdir_jax.train.controller import load_controller

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _perturbed(model, seed):
    """open_clip's init leaves biases and layer norms at 0/1: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def openclip_files(tmp_path_factory):
    """An OpenCLIP checkpoint (standard layout) with its model-config JSON, and one with
    open_clip's custom_text layout (text.*) whose model name is in the file name."""
    import open_clip

    root = tmp_path_factory.mktemp("openclip")
    torch.save(_perturbed(open_clip.CLIP(**TINY), 0).state_dict(), root / "tiny.pt")
    (root / "tiny.json").write_text(json.dumps(TINY))
    torch.save(_perturbed(open_clip.CustomTextCLIP(**TINY), 1).state_dict(), root / "custom.pt")
    return root


@pytest.fixture(scope="module")
def daclip_file(tmp_path_factory):
    """A checkpoint in DA-CLIP's release layout ({'state_dict'}, `module.` prefix, clip.*, visual.*,
    visual_control.* with transformer.transformer.resblocks and non-zero zero_modules, logit_scale)
    built from a tiny open_clip CustomTextCLIP and a perturbed copy of its visual tower."""
    import open_clip

    root = tmp_path_factory.mktemp("daclip")
    clip = _perturbed(open_clip.CustomTextCLIP(**TINY), 2)
    control = _perturbed(open_clip.CustomTextCLIP(**TINY), 3).visual
    g = torch.Generator().manual_seed(4)
    sd = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    sd.update({f"visual.{k}": v for k, v in clip.visual.state_dict().items()})
    sd.update({"visual_control." + k.replace("transformer.resblocks", "transformer.transformer.resblocks"): v
               for k, v in control.state_dict().items()})
    for i in range(2):
        sd[f"visual_control.transformer.zero_modules.{i}.weight"] = torch.randn(32, 32, generator=g) * 0.05
        sd[f"visual_control.transformer.zero_modules.{i}.bias"] = torch.randn(32, generator=g) * 0.05
    sd["logit_scale"] = torch.tensor(4.2)
    path = root / "daclip_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return path


def _lines(capsys):
    return capsys.readouterr().out.strip().splitlines()


def test_verify_a_hugging_face_clip_folder(clip_dir, photos, capsys):
    assert main(["priors", "verify", str(clip_dir), "--image", str(photos[0])]) == 0
    out = _lines(capsys)
    assert [line.split()[0] for line in out[:-1]] == ["image_embeds", "text_embeds", "text_states"]
    assert all(float(line.split()[-1]) <= TOLERANCE for line in out[:-1])
    assert out[-1] == "ok: 3 of 3 outputs within 0.0001"


def test_verify_exits_1_when_ours_differs(clip_dir, photos, capsys, monkeypatch):
    """A wrong activation in our CLIP (gelu for quick_gelu) is caught on the photo."""
    from lmdir_jax.priors import clip_model

    real = clip_model.activation
    monkeypatch.setattr(clip_model, "activation", lambda name: real("gelu"))
    assert main(["priors", "verify", str(clip_dir), "--image", str(photos[0]), "--prompt", "a dog"]) == 1
    out = _lines(capsys)
    assert out[-1].startswith("FAIL") and "> 1e-4" in "\n".join(out)


def test_verify_openclip_checkpoints(openclip_files, photos, capsys):
    cfg = str(openclip_files / "tiny.json")
    assert main(["priors", "verify", str(openclip_files / "tiny.pt"), "--model", cfg, "--image", str(photos[1])]) == 0
    out = _lines(capsys)
    names = [line.split()[0] for line in out[:-1]]
    assert names == ["image_embeds", "text_embeds", "tokens"] and out[-1].startswith("ok")
    # custom_text layout (text.*), OpenCLIP's BPE vocabulary through transformers' tokenizer
    assert main(["priors", "verify", str(openclip_files / "custom.pt"), "--model", cfg, "--image", str(photos[2]),
                 "--prompt", "A noisy, blurry photo of 2 cats!"]) == 0
    assert _lines(capsys)[-1].startswith("ok")


def test_verify_daclip_checkpoint(daclip_file, photos, capsys):
    cfg = str(daclip_file.parent / "tiny.json")
    assert main(["priors", "verify", str(daclip_file), "--model", cfg, "--image", str(photos[0])]) == 0
    out = _lines(capsys)
    names = [line.split()[0] for line in out[:-1]]
    assert names == ["image_embeds", "text_embeds", "tokens", "degradation_embeds", "controlled_image_embeds"]
    assert out[-1].startswith("ok: 5 of 5")


def test_embed_hugging_face_clip_matches_transformers(clip_dir, photos, tmp_path, capsys):
    from transformers import CLIPModel

    out = tmp_path / "e.npz"
    args = ["priors", "embed", str(clip_dir), str(photos[1]), str(photos[0]), "--text", "a cat", "--text",
            "a photo of a dog in heavy rain", "--output", str(out)]
    assert main(args) == 0
    got = np.load(out)
    assert sorted(got.files) == ["image", "text"] and got["image"].dtype == np.float32
    assert got["image"].shape == (2, 32) and got["text"].shape == (2, 32)
    clip = load_clip(clip_dir)
    ref = CLIPModel.from_pretrained(str(clip_dir)).eval()
    from lmdir_jax.data.io import read_image

    pixels = np.asarray(clip.preprocess(np.stack([read_image(p) for p in photos[:2]])))  # file-name order
    ids, mask = clip.tokenize(["a cat", "a photo of a dog in heavy rain"], 77)
    with torch.no_grad():
        img = ref.visual_projection(ref.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).pooler_output)
        txt = ref.text_projection(ref.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                                 attention_mask=torch.from_numpy(mask.astype(np.int64))).pooler_output)
    assert np.abs(got["image"] - img.numpy()).max() <= TOLERANCE
    assert np.abs(got["text"] - txt.numpy()).max() <= TOLERANCE
    assert main(args) == 0  # an existing .npz output is replaced whole; the inputs never
    assert main([*args[:-1], str(photos[0])]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_embed_daclip_gives_degradation_and_controlled_image(daclip_file, photos, tmp_path):
    cfg = str(daclip_file.parent / "tiny.json")
    out = tmp_path / "d.npz"
    assert main(["priors", "embed", str(daclip_file), "--model", cfg, str(photos[0]), "--text", "rain",
                 "--output", str(out)]) == 0
    got = np.load(out)
    assert sorted(got.files) == ["degradation", "image", "text"]
    assert got["degradation"].shape == got["image"].shape == (1, 16)
    clip = load_clip(daclip_file, model=cfg)
    plain = np.asarray(clip.bind(clip.params).image_embeds(clip.preprocess(np.stack([_read(photos[0])]))))
    assert np.abs(got["image"] - plain).max() > 1e-3  # the zero modules steer the frozen tower


def _read(path):
    from lmdir_jax.data.io import read_image

    return read_image(path)


def test_daclip_layout_round_trip(daclip_file, tmp_path):
    """DA-CLIP's checkpoint -> our controller -> DA-CLIP's layout gives back every tensor; a
    controller of ours written in that layout loads back unchanged."""
    from flax import nnx
    from safetensors.numpy import load_file

    from lmdir_jax.priors.clip_weights import read_checkpoint_file

    cfg = str(daclip_file.parent / "tiny.json")
    clip = load_clip(daclip_file, model=cfg)
    ctrl = load_controller(daclip_file, clip).controller
    written = save_daclip(ctrl, clip, tmp_path / "again.pt")
    original = {k.removeprefix("module."): v for k, v in read_checkpoint_file(daclip_file).items()}
    again = read_checkpoint_file(written)
    assert again.keys() == original.keys()
    assert all(np.allclose(again[k], original[k], atol=1e-7, rtol=0) for k in original)
    # ours (in DA-CLIP's wiring), with links that are not zero, through .safetensors
    mine = Controller.from_clip(clip, seed=3)
    for link in mine.zero_links:
        link.kernel[...] = np.random.default_rng(0).normal(size=link.kernel.shape).astype(np.float32) * 0.1
    path = save_daclip(mine, clip, tmp_path / "mine.safetensors")
    assert "visual_control.transformer.zero_modules.1.weight" in load_file(str(path))
    back = load_controller(path, clip).controller
    for a, b in zip(nnx.to_flat_state(nnx.state(mine)), nnx.to_flat_state(nnx.state(back)), strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))


def test_export_daclip_refuses_in_order_wiring_and_misuse(clip_dir, photos, tmp_path, capsys):
    from lmdir_jax.errors import UsageError
    from lmdir_jax.priors.controller import daclip_state_dict

    clip = load_clip(clip_dir)
    with pytest.raises(UsageError, match="in-order wiring"):
        daclip_state_dict(Controller.from_clip(clip, reverse=False), clip)
    for argv, needle in [
        (["priors", "verify", str(clip_dir)], "--image"),
        (["priors", "verify", str(tmp_path / "x.pt"), "--image", str(photos[0])], "not found"),
        (["priors", "embed", str(clip_dir), str(photos[0]), "--output", str(tmp_path / "e.txt")], ".npz"),
        (["priors", "embed", str(tmp_path / "w.pt"), str(photos[0]), "--output", str(tmp_path / "e.npz")],
         "not found"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_restore_takes_a_daclip_checkpoint_as_controller(clip_dir, tmp_path, photos):
    """`lmdir restore --controller daclip.pt`: a checkpoint in DA-CLIP's layout for the run's CLIP
    (here the tiny CLIP with a controller whose links are not zero) drives the automatic mode."""
    import restore_fixtures
    from flax import nnx

    from lmdir_jax.data.io import read_image, write_image
    from lmdir_jax.inference import load_restorer

    workdir = restore_fixtures.write_workdir(tmp_path / "wd", [f"config.priors.clip={clip_dir}"])
    clip = load_clip(clip_dir)
    mine = Controller.from_clip(clip, seed=5)
    for link in mine.zero_links:
        link.kernel[...] = np.random.default_rng(1).normal(size=link.kernel.shape).astype(np.float32) * 0.1
    daclip = save_daclip(mine, clip, tmp_path / "daclip_tiny.pt")
    r = load_restorer(str(workdir), controller=str(daclip))
    loaded = r.clip.controller.controller
    for a, b in zip(nnx.to_flat_state(nnx.state(mine)), nnx.to_flat_state(nnx.state(loaded)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))
    write_image(tmp_path / "in.png", read_image(photos[0])[:48, :64])
    assert main(["restore", str(tmp_path / "in.png"), "--checkpoint", str(workdir), "--output",
                 str(tmp_path / "out"), "--controller", str(daclip)]) == 0
    assert (tmp_path / "out" / "in.png").is_file()
