"""The embedded downstream tasks come from the modalities (``Modality.downstream_tasks``): the built-in ones in
their order, checked where they are collected, and named by ``mmm finetune --task`` and its help. Before, they
were a fixed table in ``benchmarks/downstream.py`` with a copy of its names as ``--task``'s argparse choices.
The plug-in side (a toy task fine-tuned and benchmarked, clashing names) is in ``tests/test_toy_modality.py``."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmm.cli import main
from mmm.downstream.tasks import DownstreamTask, downstream_tasks

BUILT_IN = {"stdlib-package": ("text", "real"), "docstring-signature": ("text", "real"), "digits": ("image", "real"),
            "shapes": ("image", "synthetic"), "dna-motifs": ("dna", "synthetic"), "audio-sounds": ("audio", "synthetic")}
"""The built-in tasks, in order, with their modality and kind of data."""


def test_the_built_in_modalities_offer_their_tasks_first_and_in_order() -> None:
    from mmm.registry import MODALITIES

    tasks = downstream_tasks()
    assert list(tasks)[:len(BUILT_IN)] == list(BUILT_IN)
    assert {name: (t.modality, t.data) for name, t in tasks.items() if name in BUILT_IN} == BUILT_IN
    later = {t.modality for t in list(tasks.values())[len(BUILT_IN):]}  # a plug-in's (the toy's, when it is imported)
    assert not later & {"text", "image", "dna", "audio", "image_text"}, later
    assert MODALITIES.get("image_text").downstream_tasks() == {}  # the base class's default
    assert tasks["digits"].what == "scikit-learn handwritten digits (10 classes)"


def test_a_task_with_an_unknown_kind_of_data_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"DownstreamTask.data is 'simulated' \(task for the 'dna' modality: w\); "
                                         r"expected one of \('real', 'synthetic'\)"):
        DownstreamTask("dna", "simulated", "w", lambda sizes: None)


def test_an_unknown_task_is_named_with_the_known_ones(tmp_path: Path, capsys) -> None:
    assert main(["finetune", str(tmp_path / "none.ckpt"), "--task", "no-such-task"]) == 2
    err = capsys.readouterr().err
    assert err.count("mmm finetune:") == 1, err  # one prefix (the message itself repeated it before)
    assert ("mmm finetune: error: unknown task 'no-such-task'; known tasks: stdlib-package, docstring-signature, digits, shapes, "
            "dna-motifs, audio-sounds") in err, err
    assert "a plug-in modality's tasks are known once it is loaded: mmm --plugin MODULE" in err


def test_finetune_help_lists_the_built_in_tasks(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    assert done.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps the help (at spaces and hyphens)
    for name, (modality, data) in BUILT_IN.items():
        assert f"{name}({modality},{data})" in text, name
    assert "mmm--pluginMODULE" in text


def test_the_task_list_is_built_when_the_help_is_shown_not_with_the_parser(monkeypatch) -> None:
    """Listing the tasks imports every modality (about a second); building the parser must not. The help was filled
    by overriding argparse's private ``_expand_help``, which Python 3.14 calls from ``add_argument``."""
    import mmm.downstream.commands as commands
    from mmm.cli import build_parser

    calls = []
    monkeypatch.setattr(commands, "task_help", lambda: calls.append(1) or "TASKS-LISTED-HERE 100%")
    parser = build_parser()
    assert calls == []
    finetune = next(a for a in parser._actions if a.dest == "cmd" or getattr(a, "choices", None) and
                    "finetune" in (a.choices or {})).choices["finetune"]
    text = finetune.format_help()
    assert calls == [1] and "TASKS-LISTED-HERE 100%" in text  # a '%' in a task's text is kept, not a format error


def test_mmm_list_task_lists_the_tasks(capsys) -> None:
    assert main(["list", "task"]) == 0
    assert capsys.readouterr().out.strip() == "task: " + ", ".join(downstream_tasks())


def test_a_plugins_tasks_are_in_the_help_when_it_is_named_with_the_command(tmp_path: Path) -> None:
    """``mmm --plugin M finetune --help`` printed the built-in tasks only: argparse prints a help while it parses,
    and the plug-ins were loaded after. A fresh process, since a test process may have imported the toy already."""
    import os
    import subprocess
    import sys

    toy = str(Path(__file__).resolve().parents[1] / "test_toy_modality.py")
    for args in (["--plugin", toy, "finetune", "--help"], ["finetune", f"--plugin={toy}", "-h"]):
        out = subprocess.run([sys.executable, "-m", "mmm.cli", *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "toy-parity(toy,synthetic)" in "".join(out.stdout.split()), (args, out.stdout)
    # a plug-in that fails to import (named on the line or by $MMM_PLUGINS) does not take the help away
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('half-written plug-in')\n")
    for args, env in ((["--plugin", str(broken), "finetune", "--help"], {}),
                      (["--help"], {"MMM_PLUGINS": "no_such_plugin_module_xyz"})):
        out = subprocess.run([sys.executable, "-m", "mmm.cli", *args], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0 and "usage: mmm" in out.stdout, out
        assert "mmm: warning: plug-in" in out.stderr and "built-in names only" in out.stderr, out.stderr
