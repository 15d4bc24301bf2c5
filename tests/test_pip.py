"""PIP's prompt-in-prompt module (`model.prompt_module = "pip"`, models/pip.py): shapes, the top-k
selection, the orthogonality regulariser, training, the summary, the PyTorch / ONNX exports and
configs/pip_restormer.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdir_jax.config import load_config

# Tiny widths 4/8/16 against prompt widths 8/4/16: the three channel cases of prompt-to-feature
# (C < P: pad and reduce, C > P: split, C = P).
PIP = ["config.model.prompt_module=pip", "config.model.pip_prompt_dims=(8, 4, 16)",
       "config.model.pip_prompt_sizes=(8, 4, 2)", "config.model.pip_heads=2",
       "config.model.pip_prompt_heads=2"]
TOL = 1e-4


def tiny_pip(extra: list[str] = ()):
    """(config, model) of the tiny PIP network with seeded noise on every parameter (the output
    conv starts at zero)."""
    from lmdir_jax.models import build_model

    config = load_config("tiny", [*PIP, *extra])
    model = build_model(config.model, 0)
    rng = np.random.default_rng(1)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)),
        state))
    return config, model


@pytest.fixture(scope="module")
def pip_pair():
    return tiny_pip()


def weights(batch: int, kinds: int = 8) -> jnp.ndarray:
    """One-hot 'rain' for the first example, the average of 'haze' and 'noise' for the rest."""
    w = np.zeros((batch, kinds), np.float32)
    w[0, 0] = 1.0
    w[1:, 2] = w[1:, 6] = 0.5
    return jnp.asarray(w)


def test_forward_shapes_and_the_weights_matter(pip_pair):
    from lmdir_jax.models.priors import Priors

    config, model = pip_pair
    assert model.prompt is None and len(model.skip_prompts) == 3
    assert model.decoders[0].block(0).modulation is None  # no DATB without the LMDIR encoder
    lq = jax.random.uniform(jax.random.key(0), (2, 19, 21, 3))
    priors = Priors.empty(2, int(config.model.text_dim))
    told = model(lq, priors.replace(deg_weights=weights(2)))
    assert told.shape == (2, 19, 21, 3) and told.dtype == jnp.float32
    unknown = model(lq, priors)  # no weights: zeros
    np.testing.assert_array_equal(unknown, model(lq, priors.replace(deg_weights=jnp.zeros((2, 8)))))
    assert float(jnp.max(jnp.abs(told - unknown))) > 1e-4
    skip = jax.random.normal(jax.random.key(1), (2, 6, 10, 4))  # level 1: C = 4, P = 8
    level1 = model.skip_prompts[2]
    assert level1.prompt(skip, weights(2)).shape == (2, 6, 10, 8)
    assert level1(skip, weights(2)).shape == skip.shape


def test_topk_attention_keeps_the_k_largest_logits_per_row():
    from lmdir_jax.architecture import pip_topk
    from lmdir_jax.models.pip import ChannelCrossAttention, topk_mask

    assert pip_topk(64) == (32, 42, 48, 51) and pip_topk(6) == (3, 4, 4, 4)
    row = jnp.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.7])
    np.testing.assert_array_equal(topk_mask(row, 3), [False, True, False, True, False, True])
    with nnx.use_eager_sharding(False):
        attn = ChannelCrossAttention(6, 1, topk=True, rngs=nnx.Rngs(0))
    assert attn.topk == (3, 4, 4, 4)
    logits = jnp.broadcast_to(row, (1, 1, 6, 6))
    v = jnp.arange(6 * 5, dtype=jnp.float32).reshape(1, 1, 6, 5)
    mix = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    attn.mix[...] = jnp.asarray(mix)
    want = 0.0
    for m, k in zip(mix, (3, 4, 4, 4), strict=True):
        keep = np.argsort(-np.asarray(row))[:k]
        p = np.zeros(6)
        p[keep] = np.exp(np.asarray(row)[keep])
        want = want + m * (p / p.sum()) @ np.asarray(v[0, 0])
    np.testing.assert_allclose(attn.attention(logits, v)[0, 0, 0], want, rtol=1e-5)


def test_orthogonality_is_zero_for_orthogonal_prompts_only():
    from lmdir_jax.models.pip import orthogonality

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
    ortho = q[:5] * np.array([[0.5], [1.0], [2.0], [3.0], [7.0]])  # orthogonal, unequal lengths
    assert float(orthogonality(jnp.asarray(ortho))) < 1e-5
    skewed = ortho.copy()
    skewed[1] += 0.3 * skewed[0]
    assert float(orthogonality(jnp.asarray(skewed))) > 0.1


def test_train_steps_reduce_the_loss_and_the_regulariser():
    """The real train step (train/step.py) on one fixed batch: the loss (L1 + weight x
    orthogonality) and the regulariser both fall."""
    from lmdir_jax.data.pipeline import make_train_iterator
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib
    from lmdir_jax.train import step as step_lib

    config = load_config("tiny", [*PIP, "config.data.patch_size=16", "config.train.lr=3e-3",
                                  "config.train.warmup_steps=0", "config.train.steps=8",
                                  "config.train.pip_orthogonality=0.01"])
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)

    def regulariser(state):
        return float(nnx.merge(setup.model_graphdef, state["model"]).regulariser())

    reg0 = regulariser(state)
    fn = step_lib.make_train_step(config, setup)
    batch = mesh_lib.global_batch(next(make_train_iterator(config)), mesh)
    assert "deg_vector" in batch
    losses = []
    for _ in range(8):
        state, metrics = fn(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert regulariser(state) < reg0


def test_kind_weights_one_hot_or_averaged():
    from lmdir_jax.degradations.label import KIND_INDEX, kinds_in_text
    from lmdir_jax.models.priors import kind_weights

    v = np.zeros((3, 8), np.float32)
    v[0, 1] = 0.7
    v[1, [0, 6]] = (0.2, 0.9)
    w = np.asarray(kind_weights(jnp.asarray(v)))
    np.testing.assert_array_equal(w[0], np.eye(8)[1])
    np.testing.assert_array_equal(w[1], (np.eye(8)[0] + np.eye(8)[6]) / 2)
    np.testing.assert_array_equal(w[2], 0.0)  # clean: no degradation-aware prompt
    rain = kinds_in_text("rain streaks")
    assert rain[KIND_INDEX["rain"]] > 0 and rain.sum() == rain[KIND_INDEX["rain"]]
    assert np.flatnonzero(kinds_in_text("grain")).tolist() == [KIND_INDEX["noise"]]
    assert np.flatnonzero(kinds_in_text("motion blur")).tolist() == [KIND_INDEX["blur"]]


def test_summary_lists_the_pip_parameters(capsys):
    from lmdir_jax.cli import main
    from lmdir_jax.models import build_model
    from lmdir_jax.models.summary import count_params

    config = load_config("tiny", PIP)
    counts = count_params(build_model(config.model, 0))
    assert counts["PIP prompts"] > 0 and counts["PIP prompt-to-feature"] > 0
    assert counts["prompt encoder"] == 0 and counts["DATB modulation"] == 0
    assert sum(n for k, n in counts.items() if k != "total") == counts["total"]
    overrides = ["--" + o for o in PIP]
    assert main(["model", "summary", "--config", "tiny", "--size", "16", *overrides]) == 0
    out = capsys.readouterr().out
    assert "prompt module pip" in out
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in out.splitlines()[1:]}
    assert rows["PIP prompts"] == f"{counts['PIP prompts']:,d}"
    assert rows["PIP prompt-to-feature"] == f"{counts['PIP prompt-to-feature']:,d}"


def test_torch_mirror_matches_jax(pip_pair, tmp_path):
    pytest.importorskip("torch")
    from lmdir_jax.export import check
    from lmdir_jax.export.convert import export_torch, self_check, torch_mirror

    config, model = pip_pair
    out = export_torch(model, tmp_path / "export", config=config)  # what `lmdir export torch` writes
    assert self_check(model, config, out) <= TOL
    tm = torch_mirror(model, config.model)
    for kinds in (8, 0):  # told / mixed weights, and none given (unknown)
        inputs = check.random_inputs(int(config.model.text_dim), batch=2, height=37, width=45,
                                     ref_size=int(config.priors.ref_size), seed=3, kinds=kinds)
        a, b = check.run_jax(model, inputs), check.run_torch(tm, inputs)
        assert b.shape == (2, 37, 45, 3)
        assert np.max(np.abs(a - b)) <= TOL
        assert np.max(np.abs(b - inputs["lq"])) > 1e-2


@pytest.mark.slow
def test_onnx_export_runs_and_matches(pip_pair, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lmdir_jax.export import check, graph
    from lmdir_jax.export.convert import torch_mirror

    config, model = pip_pair
    path = graph.export_onnx(torch_mirror(model, config.model), tmp_path / "pip.onnx", "text",
                             ref_size=int(config.priors.ref_size))
    for h, w in ((37, 45), (24, 19)):
        inputs = check.random_inputs(int(config.model.text_dim), batch=2, height=h, width=w,
                                     ref=False, ref_size=int(config.priors.ref_size), seed=4,
                                     kinds=8)
        assert np.max(np.abs(graph.run_onnx(path, inputs) - check.run_jax(model, inputs))) <= TOL


def test_pip_restormer_config_builds_abstractly():
    from lmdir_jax.models.lmdir import LMDIR
    from lmdir_jax.models.summary import count_params

    config = load_config("configs/pip_restormer.py")
    assert config.model.prompt_module == "pip" and config.model.width == 48
    assert tuple(config.model.pip_prompt_dims) == (64, 128, 256)
    model = nnx.eval_shape(lambda: LMDIR(config.model, rngs=nnx.Rngs(0)))
    dims = [p.degradation_prompts.shape for p in model.skip_prompts]
    assert dims == [(8, 256), (8, 128), (8, 64)]
    assert model.skip_prompts[0].basic_prompt.shape == (16, 16, 256)
    assert count_params(model)["PIP prompts"] > 0


def test_restore_priors_carry_the_told_kinds():
    """`lmdir restore --degradation TEXT` on a PIP network weights the kinds TEXT names (no CLIP
    needed); other networks get no kind weights, and a PIP network told nothing gets none."""
    from lmdir_jax.degradations.label import KIND_INDEX
    from lmdir_jax.inference import build_priors

    image = np.full((12, 10, 3), 0.5, np.float32)
    config = load_config("tiny", PIP)
    priors, choice = build_priors(image, config, None, degradation="rain streaks and noise")
    want = np.zeros((1, 8), np.float32)
    want[0, [KIND_INDEX["rain"], KIND_INDEX["noise"]]] = 0.5
    np.testing.assert_array_equal(priors.deg_weights, want)
    assert choice.mode == "text" and not bool(priors.deg_mask.any())
    assert build_priors(image, config, None)[0].deg_weights is None
    with pytest.raises(ValueError, match="needs CLIP"):
        build_priors(image, load_config("tiny", []), None, degradation="rain")
