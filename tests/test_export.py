"""The PyTorch export: the mirror equals the Flax network, the converter and `lmdir export torch`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def perturbed(model, seed: int, scale: float = 0.05):
    """Add seeded noise to every parameter (so the zero-initialised output conv is non-zero)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    noisy = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32)),
        state,
    )
    nnx.update(model, noisy)
    return model


def mirror(model, config_model):
    """The PyTorch mirror of an nnx model, through the converter."""
    from flax import nnx

    from lmdir_jax.export.convert import flax_to_torch_state, model_config_dict
    from lmdir_jax.export.torch_model import LMDIRTorch

    state = flax_to_torch_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tm = LMDIRTorch(model_config_dict(config_model))
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return tm.eval()


@pytest.fixture(scope="module", params=["tiny", "quickstart"])
def pair(request):
    """(config, perturbed Flax model, its PyTorch mirror) for a repo config."""
    from lmdir_jax.config import load_config
    from lmdir_jax.models import build_model

    config = load_config(request.param, [])
    model = perturbed(build_model(config.model, 0), seed=1)
    return config, model, mirror(model, config.model)


PRIOR_CASES = {
    "all": {},
    "no_degradation": {"deg": False},
    "no_scene": {"scene": False},
    "no_reference": {"ref": False},
    "none": {"deg": False, "scene": False, "ref": False},
}


@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_torch_mirror_matches_jax(pair, case):
    from lmdir_jax.export import check

    config, model, tm = pair
    inputs = check.random_inputs(int(config.model.text_dim), batch=2, height=37, width=45,
                                 ref_size=int(config.priors.ref_size), seed=3,
                                 **PRIOR_CASES[case])
    a, b = check.run_jax(model, inputs), check.run_torch(tm, inputs)
    assert b.shape == (2, 37, 45, 3) and b.dtype == np.float32
    assert np.max(np.abs(a - b)) <= TOL
    # The residual branch is live (the comparison is not identity vs identity).
    assert np.max(np.abs(b - inputs["lq"])) > 1e-2


def test_priors_change_the_torch_output(pair):
    from lmdir_jax.export import check

    config, _, tm = pair
    kw = dict(batch=1, height=16, width=24, ref_size=int(config.priors.ref_size), seed=4)
    base = check.run_torch(tm, check.random_inputs(int(config.model.text_dim), **kw))
    for off in ({"deg": False}, {"scene": False}, {"ref": False}):
        other = check.run_torch(tm, check.random_inputs(int(config.model.text_dim), **kw, **off))
        assert np.max(np.abs(base - other)) > 1e-4, off


def test_masked_priors_are_ignored_and_missing_equals_masked(pair):
    from lmdir_jax.export import check

    config, _, tm = pair
    d = int(config.model.text_dim)
    inputs = check.random_inputs(d, batch=2, height=20, width=20, seed=5, deg=False, scene=False,
                                 ref=False, ref_size=int(config.priors.ref_size))
    masked = check.run_torch(tm, inputs)
    noisy = dict(inputs)
    for k in ("deg_states", "scene_states", "reference"):
        noisy[k] = inputs[k] * 100.0 + 7.0
    np.testing.assert_array_equal(check.run_torch(tm, noisy), masked)
    with torch.no_grad():
        missing = tm(torch.from_numpy(inputs["lq"])).numpy()
    np.testing.assert_allclose(missing, masked, atol=1e-6)


def test_converter_layouts():
    from lmdir_jax.export.convert import flax_to_torch_state

    conv = np.arange(3 * 3 * 2 * 5, dtype=np.float32).reshape(3, 3, 2, 5)
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = flax_to_torch_state({"a": {"0": {"conv": {"kernel": conv, "bias": np.zeros(5)}},
                                     "lin": {"kernel": dense}, "norm": {"scale": np.ones(4)}},
                               "pos": np.ones((4, 2))})
    assert set(out) == {"a.0.conv.weight", "a.0.conv.bias", "a.lin.weight", "a.norm.weight", "pos"}
    w = out["a.0.conv.weight"]
    assert w.shape == (5, 2, 3, 3) and w[4, 1, 2, 0] == conv[2, 0, 1, 4]
    np.testing.assert_array_equal(out["a.lin.weight"], dense.T)
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in out.values())


def test_bfloat16_model_checks_through_float32_twin(tmp_path):
    from lmdir_jax.config import load_config
    from lmdir_jax.export.convert import export_torch, self_check
    from lmdir_jax.models import build_model

    config = load_config("tiny", ["config.model.dtype=bfloat16"])
    model = perturbed(build_model(config.model, 0), seed=2)
    out = export_torch(model, tmp_path / "bf16", config=config)
    assert json.loads((out / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    assert self_check(model, config, out) <= TOL


def _write_workdir(path: Path):
    """A tiny-config workdir with one checkpoint whose EMA differs from the raw parameters.

    Returns (workdir, raw model, EMA model).
    """
    from flax import nnx

    from lmdir_jax.config import config_to_json, load_config
    from lmdir_jax.train.checkpoints import make_manager, save
    from lmdir_jax.train.state import build_model

    config = load_config("tiny", [])
    path.mkdir(parents=True)
    (path / "config.json").write_text(config_to_json(config))
    model = perturbed(build_model(config), seed=7)
    ema_model = perturbed(build_model(config), seed=8)
    manager = make_manager(path, async_save=False)
    save(manager, 2, {"model": nnx.state(model), "opt": nnx.state(model, nnx.Param),
                      "ema": nnx.state(ema_model, nnx.Param)})
    manager.wait_until_finished()
    manager.close()
    return path, model, ema_model


def test_export_cli_round_trip(tmp_path, capsys):
    from lmdir_jax.cli import main
    from lmdir_jax.export import check
    from lmdir_jax.export.torch_model import load

    wd, raw_model, ema_model = _write_workdir(tmp_path / "wd")
    out = tmp_path / "export"
    assert main(["export", "torch", "--checkpoint", str(wd), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "self-check: max |jax - torch|" in printed and "(ok," in printed
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    meta = json.loads((out / "config.json").read_text())
    assert meta["priors"] == {"text_dim": 32, "max_text_len": 16, "ref_size": 32}

    tm = load(out)
    inputs = check.random_inputs(32, batch=2, height=33, width=40, ref_size=32, seed=9)
    got = check.run_torch(tm, inputs)
    assert np.max(np.abs(got - check.run_jax(ema_model, inputs))) <= TOL
    assert np.max(np.abs(got - check.run_jax(raw_model, inputs))) > 1e-3  # EMA was exported

    # An existing export is never overwritten silently.
    assert main(["export", "torch", "--checkpoint", str(wd), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "torch", "--checkpoint", str(wd), "--output", str(out), "--force",
                 "--no-ema", "--no-check"]) == 0
    with torch.no_grad():
        raw_out = load(out)(torch.from_numpy(inputs["lq"])).numpy()
    raw_ref = check.run_jax(raw_model, {**check.random_inputs(
        32, batch=2, height=33, width=40, ref_size=32, seed=9, deg=False, scene=False, ref=False)})
    assert np.max(np.abs(raw_out - raw_ref)) <= TOL


def test_export_cli_missing_checkpoint(tmp_path, capsys):
    from lmdir_jax.cli import main

    code = main(["export", "torch", "--checkpoint", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmdir: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_torch_model_imports_without_jax(tmp_path):
    from lmdir_jax.config import load_config
    from lmdir_jax.export.convert import model_config_dict

    cfg = json.dumps(model_config_dict(load_config("tiny", []).model))
    code = (
        "import sys, json\n"
        "for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'grain', 'ml_collections'):\n"
        "    sys.modules[m] = None\n"
        "import torch\n"
        "from lmdir_jax.export.torch_model import LMDIRTorch, load\n"
        f"m = LMDIRTorch(json.loads({cfg!r}))\n"
        "y = m(torch.rand(1, 11, 13, 3))\n"
        "assert y.shape == (1, 11, 13, 3), y.shape\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# --- graph exports: torch.export, torch.compile, ONNX (dynamic batch, height, width) -------------


@pytest.fixture(scope="module")
def tiny_pair():
    """(config, perturbed tiny Flax model, its PyTorch mirror)."""
    from lmdir_jax.config import load_config
    from lmdir_jax.export.convert import torch_mirror
    from lmdir_jax.models import build_model

    config = load_config("tiny", [])
    model = perturbed(build_model(config.model, 0), seed=11)
    return config, model, torch_mirror(model, config.model)


def test_reflect_index_equals_numpy_pad():
    from lmdir_jax.export.torch_model import _reflect_index

    for n in range(1, 12):
        for pad in range(0, 9):
            np.testing.assert_array_equal(_reflect_index(n, n + pad, "cpu").numpy(),
                                          np.pad(np.arange(n), (0, pad), mode="reflect"))


def test_torch_export_program_is_dynamic(tiny_pair):
    from lmdir_jax.export import check, graph

    config, _, tm = tiny_pair
    program = graph.export_program(tm, "text", int(config.priors.ref_size))
    # check_guards=False: the CPU conv's memory-format choice guards on batch > 1 (values are
    # the same for any batch, as compared here).
    run = program.module(check_guards=False)
    for batch, h, w in ((1, 16, 24), (3, 41, 19)):
        inputs = check.random_inputs(32, batch=batch, height=h, width=w, seed=w, ref=False)
        args = [torch.from_numpy(inputs[n]) for n in graph.PRIOR_SETS["text"]]
        with torch.no_grad():
            got = run(*args).numpy()
        want = check.run_torch(tm, {n: inputs[n] for n in graph.PRIOR_SETS["text"]})
        assert got.shape == (batch, h, w, 3)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_torch_compile_goes_dynamic_after_one_recompile(tiny_pair):
    """`torch.compile(model)` as users write it: the first size compiles a static graph, the
    second recompiles once with dynamic height and width, and further sizes run on that graph."""
    from torch._dynamo.utils import counters

    from lmdir_jax.export import check

    config, _, tm = tiny_pair
    # fullgraph: no graph break, i.e. no Python branch on tensor values. aot_eager traces what
    # inductor would compile without its (minutes-long on CPU) C++ code generation.
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tm, fullgraph=True, backend="aot_eager")
    for h, w in ((16, 24), (21, 13), (40, 36)):
        inputs = check.random_inputs(32, batch=2, height=h, width=w, seed=h,
                                     ref_size=int(config.priors.ref_size))
        np.testing.assert_allclose(check.run_torch(compiled, inputs),
                                   check.run_torch(tm, inputs), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # the static graph, then the dynamic one


def test_export_onnx_cli_runs_at_any_size(tmp_path, capsys, monkeypatch):
    """`lmdir export onnx` (every prior input, EMA weights): onnxruntime runs the file at any
    batch, height and width within TOL of the JAX model; misuse is one line, exit 2. One export
    serves both checks (an ONNX export of the tiny mirror takes about a minute on 2 cores)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from lmdir_jax.cli import main
    from lmdir_jax.export import check, graph

    wd, _, ema_model = _write_workdir(tmp_path / "wd")
    out = tmp_path / "m.onnx"
    argv = ["export", "onnx", "--checkpoint", str(wd), "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "inputs: lq, deg_states" in printed and "self-check: max |jax - onnxruntime|" in printed
    assert "(ok," in printed and out.is_file()
    names = [i.name for i in ort.InferenceSession(str(out)).get_inputs()]
    assert names == list(graph.PRIOR_SETS["all"])
    ref_size = int(json.loads((wd / "config.json").read_text())["priors"]["ref_size"])
    for batch, h, w in ((3, 32, 32), (1, 123, 157)):  # and the export's self-check: 2 x 37 x 45
        inputs = check.random_inputs(32, batch=batch, height=h, width=w, text_len=3 + batch,
                                     ref_size=ref_size, seed=h)
        got = graph.run_onnx(out, inputs)
        assert got.shape == (batch, h, w, 3)
        assert np.max(np.abs(got - check.run_jax(ema_model, inputs))) <= TOL, (h, w)
    # Existing file, output inside the run, onnx missing: one line, exit 2, nothing written.
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    inside = wd / "m.onnx"
    assert main(argv[:5] + [str(inside)]) == 2 and not inside.exists()
    assert "overlaps the checkpoint folder" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(argv + ["--force"]) == 2
    err = capsys.readouterr().err
    assert "needs onnx" in err and len(err.strip().splitlines()) == 1


def test_export_torch_refuses_output_overlapping_the_run(tmp_path, capsys):
    from lmdir_jax.cli import main

    wd, _, _ = _write_workdir(tmp_path / "wd")
    before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    for out in (wd, wd / "export", tmp_path):
        code = main(["export", "torch", "--checkpoint", str(wd), "--output", str(out), "--force"])
        err = capsys.readouterr().err
        assert code == 2 and "overlaps the checkpoint folder" in err, out
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before


def test_export_tolerance_decides_the_exit_status(tmp_path, capsys):
    from lmdir_jax.cli import main

    wd, _, _ = _write_workdir(tmp_path / "wd")
    argv = ["export", "torch", "--checkpoint", str(wd), "--output", str(tmp_path / "e")]
    assert main(argv + ["--tolerance", "0"]) == 1
    assert "MISMATCH, tolerance 0)" in capsys.readouterr().out
    assert main(argv + ["--force", "--tolerance", "1"]) == 0
    assert "(ok, tolerance 1)" in capsys.readouterr().out


def test_restormer_layout_mirror_matches_jax():
    from flax import nnx

    from lmdir_jax.config import load_config
    from lmdir_jax.export import check
    from lmdir_jax.export.convert import torch_mirror
    from lmdir_jax.models import build_model

    config = load_config("tiny", ["config.model.layout=restormer",
                                  "config.model.layernorm=bias_free",
                                  "config.model.embed_bias=False", "config.model.output_bias=False"])
    from lmdir_jax.models.stacking import unstack_blocks

    model = perturbed(build_model(config.model, 0), seed=12)
    params = unstack_blocks(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # blocks/0/... either way
    width = int(config.model.width)
    assert len(params["reduces"]) == 2 and "bias" not in params["output"]
    assert params["output"]["kernel"].shape == (3, 3, 2 * width, 3)
    assert "bias" not in params["embed"] and "bias" not in params["decoders"][2]["blocks"][0]["norm1"]
    tm = torch_mirror(model, config.model)
    inputs = check.random_inputs(32, batch=2, height=37, width=45, seed=13,
                                 ref_size=int(config.priors.ref_size))
    a, b = check.run_jax(model, inputs), check.run_torch(tm, inputs)
    assert np.max(np.abs(a - b)) <= TOL and np.max(np.abs(b - inputs["lq"])) > 1e-2


# --- lmdir import restormer -----------------------------------------------------------------------

RESTORMER_TINY = ["--config", "tiny", "--config.model.layout=restormer",
                  "--config.model.embed_bias=False", "--config.model.output_bias=False"]


def _restormer_pth(path: Path, kind: str, seed: int = 0, dim: int = 4):
    """A Restormer-named checkpoint {'params': state_dict} with seeded random weights."""
    from restormer_reference import Restormer

    torch.manual_seed(seed)
    net = Restormer(dim=dim, kind=kind).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({"params": net.state_dict()}, str(path))
    return net


def test_import_restormer_equals_restormer(tmp_path, capsys):
    from lmdir_jax.cli import main
    from lmdir_jax.export import check
    from lmdir_jax.train.checkpoints import load_for_inference

    net = _restormer_pth(tmp_path / "r.pth", "BiasFree")
    wd = tmp_path / "wd"
    argv = ["import", "restormer", str(tmp_path / "r.pth"), *RESTORMER_TINY,
            "--config.model.layernorm=bias_free", "--output", str(wd)]
    assert main(argv) == 0, capsys.readouterr().err
    model, config = load_for_inference(wd)
    assert config.model.layout == "restormer"
    inputs = check.random_inputs(32, batch=2, height=32, width=40, seed=3,
                                 ref_size=int(config.priors.ref_size))  # priors present
    with torch.no_grad():
        want = net(torch.from_numpy(inputs["lq"]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = check.run_jax(model, inputs)
    assert np.max(np.abs(got - want)) <= TOL and np.max(np.abs(want - inputs["lq"])) > 1e-2
    # An existing workdir is never overwritten.
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err


def test_import_restormer_bad_input(tmp_path, capsys):
    from lmdir_jax.cli import main

    _restormer_pth(tmp_path / "r.pth", "WithBias")
    sd = torch.load(str(tmp_path / "r.pth"), weights_only=True)["params"]
    torch.save({"params": {"encoder_level1.0.attn.foo.weight": torch.zeros(1), **sd}},
               str(tmp_path / "foreign.pth"))
    cases = [
        ("foreign.pth", [], "'encoder_level1.0.attn.foo.weight' does not fit"),
        ("r.pth", ["--config.model.width=8"], "width mismatch"),
        ("r.pth", ["--config.model.blocks=(2,1,1,1)"], "not in the checkpoint"),
        ("r.pth", ["--config.model.layernorm=bias_free"], "has no place in the config"),
    ]
    for i, (name, extra, message) in enumerate(cases):
        out = tmp_path / f"wd{i}"
        code = main(["import", "restormer", str(tmp_path / name), *RESTORMER_TINY, *extra,
                     "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists()
