"""``mmm bench --suite downstream --quick`` at smoke size ($MMM_BENCH_MICRO) on two checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmm.cli import main


def test_downstream_suite_runs_every_applicable_task(ckpt: Path, image_ckpt: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.setenv("MMM_BENCH_MICRO", "1")
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "downstream", "--quick", "--out", str(out), str(ckpt), str(image_ckpt)]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = report["sections"]["downstream"]["results"]
    got = {(r["task"], r["model"]) for r in rows}
    for task, c in (("stdlib-package", ckpt), ("docstring-signature", ckpt), ("digits", image_ckpt),
                    ("shapes", image_ckpt)):
        assert (task, str(c)) in got and (task, f"{c} (random init)") in got
    assert not any(r["task"] in ("dna-motifs", "audio-sounds") for r in rows)  # no such encoder given
    for r in rows:
        for key in ("linear_probe", "knn", "finetune"):
            assert r[key]["n"] == 2 and len(r[f"{key}_seeds"]) == 2 and all(0 <= v <= 1 for v in r[f"{key}_seeds"])
            assert r[key]["mean"] == pytest.approx(sum(r[f"{key}_seeds"]) / 2)
    real = {r["task"]: r["data"] for r in rows}
    assert real == {"stdlib-package": "real", "docstring-signature": "real", "digits": "real", "shapes": "synthetic"}
    md = (out / "results.md").read_text()
    assert "## Downstream tasks" in md and "| stdlib-package | real |" in md and " ± " in md
    assert (out / "downstream.png").stat().st_size > 0


def test_downstream_suite_needs_a_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--suite", "downstream", "--out", str(tmp_path)]) == 2
    assert "needs checkpoints" in capsys.readouterr().err


def test_stdlib_task_splits_by_module() -> None:
    from mmm.downstream.tasks import stdlib_package_task

    s = stdlib_package_task(20, 10)
    mods = {k: {w.split("#")[0] for w in v.where} for k, v in s.items()}
    assert not (mods["train"] & mods["dev"]) and not (mods["train"] & mods["test"]) and not (mods["dev"] & mods["test"])
    assert set(s["dev"].labels) <= set(s["train"].labels) and len(set(s["train"].labels)) >= 4
    for split, v in s.items():
        for w, y in zip(v.where, v.labels):
            assert w.split(".")[0] == y  # the label is the module's top-level package


def test_finetune_on_an_embedded_task_by_name(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["finetune", str(ckpt), "--task", "stdlib-package", "--quick", "--seeds", "1", "--epochs", "1",
                 "--lr", "3e-4", "--out", str(tmp_path / "ft")]) == 0
    res = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert res["data"]["modality"] == "text" and len(res["labels"]["names"]) >= 4 and res["test"]["n"] == 1
    assert main(["finetune", str(ckpt), "--task", "digits", "--modality", "text"]) == 2
    assert "is for the image modality, not text" in capsys.readouterr().err


def test_random_init_rows_use_one_initialisation_per_seed(ckpt: Path) -> None:
    import torch

    from benchmarks.downstream import random_init_factory

    a, b, a2 = (random_init_factory(ckpt, "text", s)() for s in (0, 1, 0))
    wa, wb, wa2 = (e.embedder.tokens.weight for e in (a, b, a2))
    assert torch.equal(wa, wa2) and not torch.equal(wa, wb)
