"""`lmdir bench train`, `compare-torch` and `restore` run the real thing and report what they time."""

import re

import pytest

from lmdir_jax.cli import main


def test_bench_train_reports_step_time_and_flops(capsys):
    # The program of tests/test_train.py's runs (16-pixel patches): the suite compiles it once.
    code = main(["bench", "train", "--config", "tiny", "--steps", "2", "--warmup", "0",
                 "--config.data.patch_size=16"])
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
                 "--warmup", "0", "--rounds", "2", "--torch-device", "cpu", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bfloat16" in out and "bf16 autocast" in out
    assert len(re.findall(r"^  (jax|torch) block \d: median [\d.]+ s/step$", out, re.M)) == 4
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


def test_bench_restore_tiles_a_larger_image_and_reports_time_and_memory(capsys):
    code = main(["bench", "restore", "--config", "tiny", "--size", "96x80", "--tile", "64",
                 "--tile-overlap", "16"])
    out = capsys.readouterr().out
    assert code == 0
    tiles = re.search(r"image 96x80  tile 64 overlap 16 batch 1  tiles (\d+)", out)
    assert tiles and int(tiles.group(1)) >= 4  # 2 x 2 at least: the image is larger than a tile
    steady = re.search(r"steady tile batch ([\d.]+) s", out)
    assert steady and float(steady.group(1)) > 0
    rss = re.search(r"peak RSS ([\d.]+) GiB", out)
    assert rss and float(rss.group(1)) > 0


@pytest.mark.parametrize("size", ["4k", "4x4", "100x"])
def test_bench_restore_rejects_a_bad_size(capsys, size):
    assert main(["bench", "restore", "--config", "tiny", "--size", size]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size" in err[0]


def test_compare_torch_warms_up_before_every_block():
    """Each timed block starts with its own untimed warm-up steps (a framework's first step after
    the other's ran can be slower in one process), and only the timed steps are recorded."""
    from lmdir_jax.bench.compare_torch import _Timer

    calls = []
    timer = _Timer(lambda: calls.append(len(calls)), "stub")
    timer.block(3, 2)
    timer.block(3, 2)
    assert len(calls) == 10 and [len(b) for b in timer.blocks] == [3, 3]
    timer.block(1)
    assert len(calls) == 11
