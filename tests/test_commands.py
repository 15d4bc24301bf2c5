"""`lmdir model summary`, `bench model`, `bench priors` and `priors caption`: what they print is
what they measured (parsed back and checked against the library)."""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from lmdir_jax.cli import main
from lmdir_jax.data.io import write_image


def test_model_summary_prints_the_counts_and_flops(capsys):
    from lmdir_jax.config import load_config
    from lmdir_jax.models import build_model

    assert main(["model", "summary", "--config", "tiny", "--size", "32",
                 "--config.model.width=8"]) == 0
    out = capsys.readouterr().out
    assert "width 8" in out  # the override reached the model
    counts = {m[0].strip(): int(m[1].replace(",", ""))
              for m in re.findall(r"^  ([a-zA-Z][\w /-]*?)\s+([\d,]+)$", out, re.M)}
    model = build_model(load_config("tiny", ["config.model.width=8"]).model, 0)
    assert counts["total"] == sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    flops = float(re.search(r"forward GFLOPs at 1x32x32: ([\d.]+)", out).group(1))
    assert flops > 0
    assert main(["model", "summary", "--config", "tiny", "--size", "4"]) == 2


def test_bench_model_times_forward_and_backward(capsys):
    assert main(["bench", "model", "--config", "tiny", "--size", "16", "--batch", "1",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    fwd = float(re.search(r"forward\s+([\d.]+) ms/batch", out).group(1))
    both = float(re.search(r"forward\+backward\s+([\d.]+) ms/batch", out).group(1))
    assert fwd > 0 and both > 0
    assert re.search(r"config tiny: [\d,]+ params", out)


def test_bench_priors_reports_clip_and_sd_rates(clip_dir, capsys):
    assert main(["bench", "priors", "--clip", str(clip_dir), "--batch", "1", "--repeats", "1",
                 "--steps", "1", "--size", "32"]) == 0
    out = capsys.readouterr().out
    clip = re.search(r"CLIP .*: ([\d.]+) texts/s, ([\d.]+) images/s, automatic prior ([\d.]+) images/s", out)
    assert clip and all(float(v) > 0 for v in clip.groups())
    sd = re.search(r"SD tiny .*1 steps, 32px\): ([\d.]+) images/s", out)
    assert sd and float(sd.group(1)) > 0
    assert main(["bench", "priors", "--batch", "0"]) == 2


def test_priors_caption_is_deterministic_and_names_each_file(clip_dir, tmp_path, capsys):
    from lmdir_jax.priors.cache import clip_input
    from lmdir_jax.priors.clip import load_clip

    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    write_image(a, rng.random((30, 40, 3)))
    write_image(b, rng.random((50, 20, 3)))
    assert main(["priors", "caption", str(a), str(b), "--clip", str(clip_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(a), str(b)]
    captions = [ln.split("\t")[1] for ln in lines]
    assert all(captions)
    # the caption is the library's zero-shot caption of that image
    from lmdir_jax.data.io import read_image

    clip = load_clip(str(clip_dir))
    want = clip.caption(np.stack([clip_input(read_image(a), clip.image_size)]), top_k=2)[0]
    assert captions[0] == want
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["priors", "caption", str(tmp_path / "bad.png"), "--clip", str(clip_dir)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["priors", "caption", str(a), "--clip", str(tmp_path / "no-clip")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmdir: error:") and "\n" not in err
