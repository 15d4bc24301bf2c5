"""Tiny random CLIP saved and loaded through the real path: tokenizer, text states, zero-shot priors."""

import json

import jax
import numpy as np
import pytest

from lmdir_jax.errors import UsageError
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.tiny import save_tiny_tokenizer

VOCAB = [
    ("clean", "a clean photo"),
    ("noise", "a noisy photo"),
    ("rain", "a photo with rain streaks"),
    ("haze", "a hazy photo of fog"),
]


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, max_text_len=16, degradation_vocab=VOCAB, scene_vocab=["a cat", "a dog", "a city street"])


def test_tiny_tokenizer_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    ids = tok("A photo of a zebra, in heavy rain!")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id == max(tok.get_vocab().values())  # CLIP pools at argmax(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a zebra , in heavy rain !"
    assert tok.unk_token_id not in ids[1:-1]  # every ASCII character is covered


def test_encode_text_shapes_and_mask(clip):
    states, mask = clip.encode_text(["a cat", "a photo of a dog in heavy rain and fog"])
    assert states.shape == (2, 16, 32) and states.dtype == np.float32
    assert mask.dtype == bool and mask.shape == (2, 16)
    n = mask.sum(axis=1)
    assert n[0] == 4 and n[1] > n[0]  # <start> a cat <end>
    for row, k in zip(mask, n, strict=True):  # right padding: a prefix of True
        assert row[:k].all() and not row[k:].any()
    long, long_mask = clip.encode_text(["word " * 50])
    assert long_mask.all() and long.shape == (1, 16, 32)  # truncated to max_text_len
    assert clip.text_dim == 32


def test_pure_text_states_match_and_jit(clip):
    ids, mask = clip.tokenize(["a city street", "noise"])
    pure = jax.jit(clip.text_states)(clip.params, ids, mask)
    np.testing.assert_allclose(np.asarray(pure), clip.encode_text(["a city street", "noise"])[0], atol=1e-6)
    # The causal text tower: a token's state does not depend on later tokens.
    ids2, mask2 = clip.tokenize(["a city street at night"])
    s2 = np.asarray(clip.text_states(clip.params, ids2, mask2))
    np.testing.assert_allclose(s2[0, :4], np.asarray(pure)[0, :4], atol=1e-5)


def test_transformers_reads_the_tiny_folder_and_agrees(clip_dir, clip, photos):
    """The tiny folder is a real transformers CLIPModel folder: PyTorch's CLIPModel loads it and
    gives our text states and embeddings (float32, 1e-4) on a real photo."""
    import torch
    from transformers import CLIPModel

    from lmdir_jax.data.io import read_image

    ref = CLIPModel.from_pretrained(str(clip_dir)).eval()
    ids, mask = clip.tokenize(["a photo of a cat in heavy rain", "noise"])
    photo = read_image(photos[0])[None]
    pixels = np.asarray(clip.preprocess(photo))
    with torch.no_grad():
        t = ref.text_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)))
        t_emb = ref.text_projection(t.pooler_output).numpy()
        i_emb = ref.visual_projection(ref.vision_model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output).numpy()
    states = np.asarray(clip.text_states(clip.params, ids, mask))
    assert np.abs(states - t.last_hidden_state.numpy())[mask].max() <= 1e-4
    assert np.abs(np.asarray(clip.text_embeds(clip.params, ids, mask)) - t_emb).max() <= 1e-4
    assert np.abs(np.asarray(clip.bind(clip.params).image_embeds(pixels)) - i_emb).max() <= 1e-4


def test_weights_load_as_saved_in_every_layout_and_a_missing_one_is_named(tmp_path, clip_dir, clip):
    """model.safetensors is read as written (PyTorch layout -> ours), pytorch_model.bin and a
    Flax-only flax_model.msgpack give the same parameters, and a missing weight is one UsageError
    naming it."""
    import shutil

    import torch
    from flax.serialization import msgpack_serialize
    from safetensors.numpy import load_file, save_file

    from lmdir_jax.priors.clip_weights import flatten, to_hf

    saved = load_file(str(clip_dir / "model.safetensors"))
    ours = to_hf(jax.device_get(clip.params))
    assert ours.keys() == saved.keys()
    assert all(np.array_equal(ours[k], saved[k]) for k in saved)
    flat = {p: np.asarray(v) for p, v in flatten(jax.device_get(clip.params))}

    def same(folder):
        got = {p: np.asarray(v) for p, v in flatten(load_clip(folder, max_text_len=16).params)}
        return got.keys() == flat.keys() and all(np.array_equal(got[k], flat[k]) for k in flat)

    shutil.copytree(clip_dir, tmp_path / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in saved.items()}, tmp_path / "bin" / "pytorch_model.bin")
    assert same(tmp_path / "bin")
    shutil.copytree(clip_dir, tmp_path / "flax", ignore=shutil.ignore_patterns("model.safetensors"))
    strs = {}
    for p, v in flat.items():
        node = strs
        for k in p[:-1]:
            node = node.setdefault(str(k), {})
        node[p[-1]] = v
    (tmp_path / "flax" / "flax_model.msgpack").write_bytes(msgpack_serialize(strs))
    assert same(tmp_path / "flax")
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    del saved["logit_scale"]
    save_file(saved, str(broken / "model.safetensors"))
    with pytest.raises(UsageError, match="1 weights missing .first: logit_scale"):
        load_clip(broken, max_text_len=16)


def test_preprocess_resizes_crops_and_normalises(clip):
    img = np.full((2, 40, 24, 3), 0.5, np.float32)
    x = np.asarray(clip.preprocess(img))
    assert x.shape == (2, clip.image_size, clip.image_size, 3)
    np.testing.assert_allclose(x[0, 3, 5], (0.5 - clip.mean) / clip.std, atol=1e-4)


def test_auto_degradation_follows_planted_similarity(clip, monkeypatch):
    feats, states, mask = clip.degradation_bank()
    planted = [2, 0, 3]  # image b looks exactly like prompt planted[b]
    monkeypatch.setattr(clip, "image_features", lambda params, images: feats[np.array(planted)])
    w, s, m = jax.jit(clip.auto_degradation_fn)(clip.params, np.zeros((3, 8, 8, 3), np.float32))
    w, s, m = np.asarray(w), np.asarray(s), np.asarray(m)
    assert w.shape == (3, len(VOCAB))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert list(w.argmax(axis=1)) == planted
    logits = clip.logit_scale * np.asarray(feats)[planted] @ np.asarray(feats).T
    expect = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(w, expect / expect.sum(1, keepdims=True), rtol=1e-4)
    # the network is told each image's most likely entry, as the automatic mode tells it
    np.testing.assert_allclose(s, np.asarray(states)[planted], atol=1e-6)
    assert (m == np.asarray(mask)[planted]).all() and m.shape == (3, clip.max_text_len)


def test_auto_degradation_eager_and_default_vocabulary(clip_dir):
    from lmdir_jax.degradations import vocabulary

    prior = load_clip(clip_dir, max_text_len=8)
    images = np.random.default_rng(0).random((2, 20, 28, 3)).astype(np.float32)
    w, s, m = prior.auto_degradation(images)
    assert w.shape == (2, len(vocabulary())) and s.shape == (2, 8, 32) and m.shape == (2, 8)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert all(name in dict(vocabulary()) for name in prior.classify_degradation(images))


def test_auto_degradation_retraces_without_leaked_tracers(clip_dir):
    """issue 19: the vocabulary bank first asked for inside a trace must not cache tracers; batch
    sizes that do not divide evenly and two image sizes in one process each retrace."""
    prior = load_clip(clip_dir, max_text_len=8)
    rng = np.random.default_rng(1)
    inside = jax.jit(lambda p, x: prior.auto_degradation_fn(p, x)[0])  # bank built in this trace
    first = np.asarray(inside(prior.params, rng.random((3, 32, 32, 3), np.float32)))
    assert isinstance(prior.degradation_bank()[0], jax.Array)
    assert not isinstance(prior.degradation_bank()[0], jax.core.Tracer)
    for shape in ((3, 32, 32, 3), (2, 32, 32, 3), (1, 40, 24, 3), (5, 40, 24, 3)):
        images = rng.random(shape, np.float32)
        w = prior.auto_degradation(images)[0]
        assert w.shape == (shape[0], len(prior.degradation_vocab))
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(inside(prior.params, images)), w, atol=1e-5)
    assert first.shape == (3, len(prior.degradation_vocab))
    # Captions of two image sizes after those traces: the best scene phrases of a fresh prior's
    # eager embeddings, so no bank or trace of an earlier shape leaked into them.
    fresh = load_clip(clip_dir, max_text_len=8)
    phrases = fresh._scene_vocab()
    for shape in ((3, 32, 32, 3), (1, 24, 24, 3)):
        images = rng.random(shape, np.float32)
        sims = np.asarray(fresh.image_features(fresh.params, images)) @ np.asarray(fresh.scene_bank()).T
        best = np.argsort(-sims, axis=-1, kind="stable")[:, :2]
        assert prior.caption(images) == [", ".join(phrases[j] for j in row) for row in best]


def test_caption_picks_best_scene_phrases(clip, monkeypatch):
    bank = np.asarray(clip.scene_bank())
    monkeypatch.setattr(clip, "encode_images", lambda images: bank[[2, 1]])
    caps = clip.caption(np.zeros((2, 8, 8, 3), np.float32), top_k=1)
    assert caps == ["a city street", "a dog"]
    two = clip.caption(np.zeros((2, 8, 8, 3), np.float32), top_k=2)
    assert two[0].startswith("a city street, ") and two[0].count(", ") == 1


def test_text_dim_mismatch_is_a_usage_error(clip):
    clip.check_text_dim(32)
    with pytest.raises(UsageError, match="text_dim=64"):
        clip.check_text_dim(64)


def test_bad_folders_are_usage_errors(tmp_path, clip_dir):
    with pytest.raises(UsageError, match="not found"):
        load_clip(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_clip(tmp_path / "empty")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="not a CLIP"):
        load_clip(other)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(UsageError, match="no CLIP weights"):
        load_clip(noweights)
    with pytest.raises(UsageError, match="max_text_len"):
        load_clip(clip_dir, max_text_len=500)


@pytest.mark.parametrize("act, eos", [("quick_gelu", 98), ("gelu", 2)])
def test_nnx_clip_equals_transformers_in_both_variants(tmp_path, photos, act, eos):
    """transformers' own CLIPModel (quick_gelu pooling at the end-of-text id; gelu with the old
    eos_token_id 2, pooling at argmax) saved by transformers loads into our NNX CLIP with the same
    outputs (1e-4), and its text tower written by save_text_encoder is a CLIPTextModel folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    from lmdir_jax.data.io import read_image
    from lmdir_jax.priors.clip_model import load_clip_model, load_text_encoder, save_text_encoder

    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, hidden_act=act, eos_token_id=eos, bos_token_id=97, pad_token_id=0),
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=8)
    torch.manual_seed(0)
    ref = CLIPModel(cfg).eval()
    ref.save_pretrained(str(tmp_path / "hf"))
    ours, config = load_clip_model(tmp_path / "hf")
    assert config.text.argmax_pooling == (eos == 2)
    ids = np.array([[97, 5, 6, 98, 0, 0], [97, 7, 98, 0, 0, 0]])  # 98 is also the largest id
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    photo = read_image(photos[2])[:32, :32]
    pixels = ((photo - 0.45) / 0.27)[None].astype(np.float32)
    with torch.no_grad():
        t = ref.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
        v = ref.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        want_text = ref.text_projection(t.pooler_output).numpy()
        want_image = ref.visual_projection(v.pooler_output).numpy()
    assert np.abs(np.asarray(ours.text_embeds(ids, mask)) - want_text).max() <= 1e-4
    assert np.abs(np.asarray(ours.image_embeds(pixels)) - want_image).max() <= 1e-4
    assert np.abs(np.asarray(ours.text_states(ids, mask)) - t.last_hidden_state.numpy())[mask].max() <= 1e-4
    save_text_encoder(ours.text_model, config.text, tmp_path / "te")
    te = CLIPTextModel.from_pretrained(str(tmp_path / "te")).eval()
    with torch.no_grad():
        pooled = te(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).pooler_output
    np.testing.assert_allclose(pooled.numpy(), t.pooler_output.numpy(), atol=1e-6)
    back, back_cfg = load_text_encoder(tmp_path / "te")
    assert back_cfg == config.text
    np.testing.assert_array_equal(np.asarray(back(ids, mask)[1]), np.asarray(ours.text_model(ids, mask)[1]))


def test_safetensors_read_tensor_by_tensor_in_every_dtype_and_damage_named(tmp_path):
    """Our reader (no memory map) returns what safetensors wrote, dtype and all; a truncated file or
    a damaged header is one UsageError naming the file."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from lmdir_jax.priors.clip_weights import LazyTensors, SafetensorsFile

    rng = np.random.default_rng(0)
    want = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 2, 3)).astype(jnp.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "w.safetensors"
    save_file(want, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(want)
    for k, v in want.items():
        got = f.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)
    lazy = LazyTensors([path])
    assert lazy["bf16"].dtype == np.float32 and len(lazy) == len(want)
    np.testing.assert_array_equal(lazy["bf16"], want["bf16"].astype(np.float32))

    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    with pytest.raises(UsageError, match="cannot read .* from .*short.safetensors"):
        SafetensorsFile(tmp_path / "short.safetensors")
    n = int.from_bytes(data[:8], "little")
    (tmp_path / "head.safetensors").write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(UsageError, match="cannot read .*head.safetensors: damaged header"):
        SafetensorsFile(tmp_path / "head.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(UsageError, match="cannot read .*tiny.safetensors"):
        SafetensorsFile(tmp_path / "tiny.safetensors")


def test_bf16_clip_holds_bf16_weights_and_agrees_with_float32(clip_dir, clip):
    """dtype bfloat16 casts the weights as they are read (half the memory), and the outputs stay
    close to the float32 model's."""
    import jax.numpy as jnp

    half = load_clip(clip_dir, dtype="bfloat16", max_text_len=clip.max_text_len)
    dtypes = {a.dtype for a in jax.tree.leaves(half.params) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    want, _ = clip.encode_text(["a photo of a cat"])
    got, _ = half.encode_text(["a photo of a cat"])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
