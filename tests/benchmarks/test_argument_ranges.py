"""Benchmark command lines refuse counts that would run nothing: ``--steps 0`` was a bare StatisticsError after the
run, and ``e2e_pretrain``/``recipes`` silently replaced a 0 by their default (``--skip 0`` timed 40 steps, not 50)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.report import at_least
from conftest import REPO


def test_at_least_is_one_usage_error_naming_the_bound():
    import argparse

    assert at_least(1)("3") == 3 and at_least(0)("0") == 0
    for text, match in (("0", "must be >= 1, got 0"), ("-2", "must be >= 1, got -2"), ("2.5", "whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            at_least(1)(text)


@pytest.mark.parametrize("module, argv, message", [
    ("text_mlm_step", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("e2e_pretrain", ["--skip", "0"], "argument --skip: must be >= 1, got 0"),
    ("recipes", ["--modality", "text", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
])
def test_a_count_that_runs_nothing_is_refused_before_the_run(module, argv, message):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_mmm_list_refuses_arguments_it_does_not_take(capsys):
    from mmm.cli import main

    assert main(["list", "masker", "--bogus", "x"]) == 2
    assert "unexpected arguments ['--bogus', 'x']" in capsys.readouterr().err


def test_recipes_merge_refuses_the_options_only_a_part_reads(tmp_path, capsys):
    """``--merge`` joins results that already ran; ``--quick``/``--only``/``--seeds`` given with it were silently
    ignored, so a user who asked for two seeds got a report of whatever the parts ran."""
    from benchmarks.recipes import main

    with pytest.raises(SystemExit) as stop:
        main(["--merge", str(tmp_path), "--quick", "--seeds", "2", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--quick, --seeds set how a part runs and would be ignored" in err and not (tmp_path / "out").exists()
