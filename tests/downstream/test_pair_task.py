"""The ``docstring-signature`` sentence-pair task: split by module, negatives from the same module, balanced."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmm.cli import main
from mmm.downstream.tasks import SPLIT_PATTERN, _functions, docstring_signature_task, write_stdlib_task


def _fake_stdlib(root: Path, modules: int = 10, functions: int = 4) -> Path:
    """``root/pkgK/modJ.py`` files, each with ``functions`` documented functions (one a method) and an undocumented one."""
    for m in range(modules):
        pkg = root / f"pkg{m % 3}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        body = [f"def f{m}_{i}(x, y={i}) -> int:\n    \"\"\"Module {m} function {i} adds x to y and returns it.\"\"\"\n"
                for i in range(functions - 1)]
        body.append(f"class C{m}:\n    def meth(self, *a, **kw):\n        \"\"\"The method of class C{m} in module "
                    f"{m}, it takes anything.\"\"\"\n")
        body.append("def undocumented(z):\n    return z\n")
        (pkg / f"mod{m}.py").write_text("\n".join(body))
    tests = root / "test"  # test suites are left out
    tests.mkdir()
    (tests / "test_x.py").write_text('def t(a):\n    """A test function that must not appear anywhere."""\n')
    return root


def test_signatures_and_docstrings_are_read_from_the_source(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path, modules=1, functions=3)
    got = _functions(root / "pkg0" / "mod0.py")
    assert got == [("f0_0(x, y=0) -> int", "Module 0 function 0 adds x to y and returns it."),
                   ("f0_1(x, y=1) -> int", "Module 0 function 1 adds x to y and returns it."),
                   ("C0.meth(self, *a, **kw)", "The method of class C0 in module 0, it takes anything.")]


def test_pairs_are_balanced_split_by_module_with_same_module_negatives(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path)
    splits = docstring_signature_task(None, None, stdlib=root)
    docs_of = {}  # module -> {signature: docstring}
    for f in root.rglob("*.py"):
        mod = f.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        docs_of[mod] = dict(_functions(f))
    modules = {k: {w.split("#")[0] for w in v.where} for k, v in splits.items()}
    assert not (modules["train"] & modules["dev"] or modules["train"] & modules["test"] or modules["dev"] & modules["test"])
    assert sum(len(m) for m in modules.values()) == 10 and not any("test" in m for ms in modules.values() for m in ms)
    assert [len(modules[s]) for s in ("dev", "test", "train")] == [SPLIT_PATTERN.count(s) * 2 for s in ("dev", "test", "train")]
    for split in splits.values():
        assert Counter(split.labels) == {"1": len(split) // 2, "0": len(split) // 2}
        seen = Counter()
        for (sig, doc), label, where in zip(split.inputs, split.labels, split.where):
            own = docs_of[where.split("#")[0]]
            assert sig in own and doc in own.values()  # signature and docstring both from this module
            assert (own[sig] == doc) == (label == "1")
            seen[(sig, label)] += 1
        assert set(seen.values()) == {1} and len(seen) == len(split)  # each signature once with each label
        assert Counter(sig for sig, _ in seen) == {sig: 2 for sig, _ in seen}
    again = docstring_signature_task(None, None, stdlib=root)
    assert all(again[k].inputs == splits[k].inputs and again[k].labels == splits[k].labels for k in splits)


def test_caps_keep_both_rows_of_a_function(tmp_path: Path) -> None:
    splits = docstring_signature_task(3, 2, stdlib=_fake_stdlib(tmp_path))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [6, 4, 4]
    for split in splits.values():
        assert Counter(split.labels) == {"1": len(split) // 2, "0": len(split) // 2}
        assert set(Counter(sig for sig, _ in split.inputs).values()) == {2}


def test_the_real_stdlib_task_and_its_tsv(tmp_path: Path) -> None:
    splits = docstring_signature_task(40, 20)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [80, 40, 40]
    modules = {k: {w.split("#")[0] for w in v.where} for k, v in splits.items()}
    assert not (modules["train"] & modules["test"]) and len(modules["train"]) > 5
    paths = write_stdlib_task(tmp_path, "docstring-signature", max_train_per_class=40, max_eval_per_class=20)
    header, first = paths["train"].read_text().splitlines()[:2]
    assert header == "signature\tdocstring\tlabel\tmodule" and first.split("\t")[2] in ("0", "1")
    with pytest.raises(ValueError, match="unknown stdlib task 'nope'"):
        write_stdlib_task(tmp_path, "nope")


def test_finetune_the_pair_task_by_name_and_from_its_tsv(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["finetune", str(ckpt), "--task", "docstring-signature", "--quick", "--seeds", "1", "--epochs", "1",
                 "--lr", "3e-4", "--out", str(tmp_path / "ft")]) == 0
    res = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert res["labels"]["names"] == ["0", "1"] and res["data"]["sizes"]["train"] == 120
    paths = write_stdlib_task(tmp_path / "tsv", "docstring-signature", max_train_per_class=16, max_eval_per_class=8)
    assert main(["finetune", str(ckpt), "--train", str(paths["train"]), "--dev", str(paths["dev"]), "--text_column",
                 "signature", "--text_pair_column", "docstring", "--seeds", "1", "--epochs", "1",
                 "--metric", "f1"]) == 0
    assert "dev f1:" in capsys.readouterr().out
