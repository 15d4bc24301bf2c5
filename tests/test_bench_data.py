"""`lmdir bench data` runs the real pipeline and reports a throughput."""

import re

from lmdir_jax.cli import main


def test_bench_data_reports_patches_per_second(capsys):
    code = main(["bench", "data", "--config", "tiny", "--batches", "2", "--no-kinds"])
    out = capsys.readouterr().out
    assert code == 0
    rate = re.search(r"([\d.]+) patches/s", out)
    assert rate and float(rate.group(1)) > 0
    assert "16 patches" in out  # 2 batches of the tiny config's 8


def test_bench_data_rejects_zero_batches(capsys):
    assert main(["bench", "data", "--config", "tiny", "--batches", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
