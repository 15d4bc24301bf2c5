"""Tests of lmdir_jax.progress: whole lines in a log file, no carriage-return redraws."""

import io

from lmdir_jax.progress import is_terminal, progress_bar


def test_a_log_file_gets_whole_lines_not_redraws():
    log = io.StringIO()
    assert not is_terminal(log)
    seen = [i for i in progress_bar(range(50), desc="evaluate", unit="img", file=log)]
    assert seen == list(range(50))
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3  # the start, maybe one on the way (every 30 s), the end
    assert lines[-1].startswith("evaluate: 100%") and "50/50" in lines[-1]


def test_a_manual_bar_counts_updates_and_a_transient_one_leaves_nothing_behind():
    log = io.StringIO()
    bar = progress_bar(total=10, initial=4, desc="prior cache", unit="img", file=log)
    bar.update(6)
    bar.close()
    assert "10/10" in log.getvalue().splitlines()[-1]
    quiet = io.StringIO()
    bar = progress_bar(total=3, desc="tiles", file=quiet, disable=True)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""
