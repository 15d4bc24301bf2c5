"""`lmdir bench train` and `lmdir bench compare-torch` run the real step and report what they time."""

import re

import pytest

from lmdir_jax.cli import main


def test_bench_train_reports_step_time_and_flops(capsys):
    code = main(["bench", "train", "--config", "tiny", "--steps", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    step = re.search(r"step time: ([\d.]+) ms", out)
    flops = re.search(r"FLOPs/step: ([\d.]+) GFLOP", out)
    assert step and float(step.group(1)) > 0
    # Counted on the lowered program: every convolution's FLOPs are in it, so never zero or NaN.
    assert flops and float(flops.group(1)) > 0
    assert "MFU: n/a" in out  # no known peak for a CPU


def test_bench_train_rejects_zero_steps(capsys):
    assert main(["bench", "train", "--config", "tiny", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_compare_torch_times_both_and_prints_the_ratio(capsys):
    pytest.importorskip("torch")
    code = main(["bench", "compare-torch", "--config", "tiny", "--size", "16", "--steps", "2",
                 "--warmup", "0", "--rounds", "2", "--torch-device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    rows = dict(re.findall(r"^\s+(jax \(jit\)|pytorch)\s+[\d.]+\s+([\d.]+)", out, re.M))
    assert set(rows) == {"jax (jit)", "pytorch"} and all(float(v) > 0 for v in rows.values())
    assert "torch cpu" in out
    per_round = re.search(r"ratio per round \(2 rounds of 2 steps each\): ([\d.]+)x ([\d.]+)x", out)
    assert per_round and all(float(r) > 0 for r in per_round.groups())
    ratio = re.search(r"ratio pytorch/jax step time, median over rounds: ([\d.]+)x", out)
    assert ratio and float(ratio.group(1)) == pytest.approx(
        sum(float(r) for r in per_round.groups()) / 2, abs=0.011)


def test_compare_torch_rejects_zero_rounds(capsys):
    assert main(["bench", "compare-torch", "--config", "tiny", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_compare_torch_without_cuda_rejects_torch_device_cuda(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["bench", "compare-torch", "--config", "tiny", "--torch-device", "cuda"])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err
