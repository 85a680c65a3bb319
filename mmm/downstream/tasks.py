"""Downstream tasks built locally with no download: what a task is, the modalities' tasks, and the text builders.

A :class:`DownstreamTask` names its modality, whether its data are real or synthetic, what it asks, and
how to load its train / dev / test splits at given :class:`DownstreamSizes`. Every modality offers its
own through :meth:`Modality.downstream_tasks <mmm.modalities.base.Modality.downstream_tasks>`, and
:func:`downstream_tasks` collects them for ``mmm finetune --task`` and ``mmm bench --suite downstream``,
so a plug-in modality's tasks are served like the built-in ones (``mmm/modalities/<name>/downstream.py``):

* ``stdlib-package`` (text, **real data**): docstrings of the Python standard library that runs
  this code, each labelled by the top-level package it comes from (``asyncio``, ``email``, ...).
  The split is by *module*: every module's docstrings go to one split only (train, dev or test),
  so a model cannot score by recognising a module it saw in training; a dev or test docstring that
  also occurs word for word in training (the same docstring in two modules) is dropped.
* ``docstring-signature`` (text pairs, **real data**): does this docstring belong to this function
  signature? Every documented function of the standard library gives one matching pair (its own
  signature and docstring, label 1) and one mismatched pair (its signature with the docstring of
  another function *of the same module*, label 0), so the labels are balanced, every signature
  occurs once with each label, and a negative cannot be told apart by its module's vocabulary.
  Split by module as well.
* Shard-based tasks (image digits, image shapes, DNA motifs, audio sounds) are read from the
  embedded shard sets ``datasets_def`` builds (:func:`shard_splits`); :func:`balanced_subsample` caps
  their size. The digits are real (scikit-learn's bundled handwritten digits); the rendered shapes,
  the DNA motif genome and the audio sounds are synthetic.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmm.downstream.split import Split

Splits = Tuple[Split, Split, Split]
"""A task's ``(train, dev, test)`` splits."""
TASK_DATA = ("real", "synthetic")


@dataclass
class DownstreamSizes:
    """How much work each task does.

    Args:
        name: the size's name in reports.
        train_per_class: training samples kept per class (a shard task draws a quarter more and holds out a
            fifth of the draw as dev).
        eval_per_class: test samples kept per class (and dev samples, for the tasks with a dev split of their own).
        epochs: fine-tuning epochs.
        seeds: seeds per score (``mmm bench --suite downstream``).
        lr: fine-tuning learning rate.
        batch_size: fine-tuning batch size.
        random_init: the benchmark also scores each checkpoint at its random initialisation.
    """

    name: str
    train_per_class: int
    eval_per_class: int
    epochs: int
    seeds: int
    lr: float = 3e-4
    batch_size: int = 32
    random_init: bool = True


SIZES = {
    "full": DownstreamSizes("full", 150, 50, 4, 3),
    "quick": DownstreamSizes("quick", 60, 30, 2, 3),
    "micro": DownstreamSizes("micro", 8, 6, 1, 2, batch_size=16),
}
"""``mmm finetune --task`` uses ``full`` (``quick`` with ``--quick``); the benchmark adds ``micro`` for smoke tests."""


@dataclass(frozen=True)
class DownstreamTask:
    """One labelled downstream task of one modality, built locally.

    Args:
        modality: the registered modality whose inputs the splits hold (the one that offers the task).
        data: ``real`` or ``synthetic``.
        what: one line for listings and reports.
        load: ``sizes → (train, dev, test)`` :class:`~mmm.downstream.split.Split` s; called when the task runs.
    """

    modality: str
    data: str
    what: str
    load: Callable[[DownstreamSizes], Splits]

    def __post_init__(self) -> None:
        if self.data not in TASK_DATA:
            raise ValueError(f"DownstreamTask.data is {self.data!r} (task for the {self.modality!r} modality: "
                             f"{self.what}); expected one of {TASK_DATA}")
        if not callable(self.load):
            raise ValueError(f"DownstreamTask.load is {self.load!r} (task for the {self.modality!r} modality); "
                             "expected a function sizes -> (train, dev, test) splits")


def shard_splits(folder: Callable[[], Path], modality: str) -> Callable[[DownstreamSizes], Splits]:
    """The ``load`` of a task read from a labelled shard folder (``train-*.tar`` / ``val-*.tar`` whose samples
    carry a json ``label``), decoded by ``modality``'s input adapter.

    Training takes up to ``train_per_class`` plus a quarter more per class from the ``train`` shards (a seeded
    draw) and holds out the first fifth of them as dev (early stopping, model selection); the test split is up to
    ``eval_per_class`` per class of the ``val`` shards.

    Args:
        folder: returns the shard folder when the task runs (e.g. builds it into a cache on first use).
        modality: the task's modality.
    """

    def load(sizes: DownstreamSizes) -> Splits:
        from mmm.downstream.data import read_shards

        root = folder()
        train_all = balanced_subsample(read_shards(root, modality, "train"), sizes.train_per_class + sizes.train_per_class // 4)
        test = balanced_subsample(read_shards(root, modality, "val"), sizes.eval_per_class, seed=1)
        n_dev = len(train_all) // 5
        dev = Split(f"{root}:train[dev]", train_all.inputs[:n_dev], train_all.labels[:n_dev], train_all.where[:n_dev])
        train = Split(f"{root}:train", train_all.inputs[n_dev:], train_all.labels[n_dev:], train_all.where[n_dev:])
        return train, dev, Split(f"{root}:val", test.inputs, test.labels, test.where)

    return load


def embedded_shards(dataset: str, builder: str = "embedded_default") -> Callable[[], Path]:
    """A ``folder`` for :func:`shard_splits`: the shard folder that dataset definition ``dataset``'s ``builder``
    (e.g. ``embedded_default``) builds into the cache on first use and returns afterwards."""

    def folder() -> Path:
        from mmm.registry import DATASETS

        return Path(getattr(DATASETS.create(dataset), builder)())

    return folder


def downstream_tasks() -> Dict[str, DownstreamTask]:
    """``{name: task}`` of every registered modality's :meth:`~mmm.modalities.base.Modality.downstream_tasks`.

    Modalities come in their listing order (``order``, then name: the built-in ones use 10..60, a plug-in 100
    unless it sets its own), each one's tasks in the order it gives them: ``stdlib-package``,
    ``docstring-signature``, ``digits``, ``shapes``, ``dna-motifs``, ``audio-sounds``, then the plug-ins'.

    Raises:
        ValueError: a hook that fails (naming its modality and class) or returns something else than a dict of
            :class:`DownstreamTask`, a task whose ``modality`` is not the modality offering it, or one name
            offered by two modalities (naming both).
    """
    from mmm.registry import MODALITIES

    tasks: Dict[str, DownstreamTask] = {}
    offered_by: Dict[str, str] = {}
    for modality in sorted(MODALITIES.list(), key=lambda n: (MODALITIES.get(n).order, n)):
        hook = MODALITIES.get(modality)
        try:
            offered = hook.downstream_tasks()
        except Exception as err:  # a plug-in's broken hook is named, not a bare error from inside it
            raise ValueError(f"modality {modality!r} ({hook.__module__}.{hook.__qualname__}): downstream_tasks() "
                             f"failed: {type(err).__name__}: {err}") from err
        if not isinstance(offered, dict):
            raise ValueError(f"modality {modality!r}: downstream_tasks() gave {type(offered).__name__}, not a dict "
                             "{task name: DownstreamTask} (mmm.downstream.tasks)")
        for name, task in offered.items():
            if not isinstance(task, DownstreamTask):
                raise ValueError(f"modality {modality!r}: downstream_tasks() gave {task!r} for task {name!r}, not a "
                                 "DownstreamTask (mmm.downstream.tasks)")
            if task.modality != modality:
                raise ValueError(f"modality {modality!r} offers task {name!r}, whose modality is {task.modality!r}: a "
                                 f"modality offers tasks on its own inputs (DownstreamTask({modality!r}, ...))")
            if name in offered_by:
                raise ValueError(f"downstream task {name!r} is offered by two modalities, {offered_by[name]!r} and "
                                 f"{modality!r}; a task name must be unique: rename one")
            offered_by[name] = modality
            tasks[name] = task
    return tasks


# ----------------------------------------------------------------------------- the stdlib text tasks

PACKAGE_CANDIDATES = ("asyncio", "email", "unittest", "xml", "multiprocessing", "importlib", "http", "concurrent",
                      "json", "logging", "urllib", "sqlite3", "ctypes", "idlelib", "tkinter", "lib2to3")
"""Top-level stdlib packages tried, in order; the first :data:`NUM_PACKAGES` with enough modules and docstrings are used."""
NUM_PACKAGES = 6
MIN_MODULES = 3
MIN_CHARS = 40
MAX_CHARS = 400
SPLIT_PATTERN = ("dev", "test", "train", "train", "train")
"""Split of a package's i-th module (ordered by a hash of its name), repeating: each split gets modules of every class."""


def _docstrings(path: Path) -> List[str]:
    """Module, class and function docstrings of one source file (whitespace collapsed, cut to MAX_CHARS)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                text = " ".join(doc.split())
                if len(text) >= MIN_CHARS:
                    out.append(text[:MAX_CHARS])
    return out


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _package_modules(root: Path) -> List[Tuple[str, Path, str, List[str]]]:
    """``(package, module file, split, docstrings)`` of the ``stdlib-package`` task: the first :data:`NUM_PACKAGES`
    usable packages of :data:`PACKAGE_CANDIDATES`, each package's modules in hash order split by :data:`SPLIT_PATTERN`."""
    out: List[Tuple[str, Path, str, List[str]]] = []
    used = 0
    for pkg in PACKAGE_CANDIDATES:
        d = root / pkg
        if not (d / "__init__.py").is_file():
            continue
        modules = sorted((p for p in d.rglob("*.py") if "test" not in p.relative_to(d).parts[0].lower()
                          or p.parent == d), key=lambda p: _stable(p.relative_to(root).as_posix()))
        docs = {m: _docstrings(m) for m in modules}
        modules = [m for m in modules if docs[m]]
        if len(modules) < MIN_MODULES or sum(len(v) for v in docs.values()) < 30:
            continue
        used += 1
        out += [(pkg, m, SPLIT_PATTERN[i % len(SPLIT_PATTERN)], docs[m]) for i, m in enumerate(modules)]
        if used == NUM_PACKAGES:
            break
    if used < 2:
        raise RuntimeError(f"{root}: found {used} usable standard-library package(s); the task needs 2")
    return out


def stdlib_package_task(max_train_per_class: Optional[int] = 150, max_eval_per_class: Optional[int] = 50,
                        stdlib: Optional[Union[str, Path]] = None) -> Dict[str, Split]:
    """The ``stdlib-package`` task: ``{"train", "dev", "test"}`` splits of (docstring, package).

    Dev and test leave out docstrings that occur verbatim among the training candidates (after
    the caps, so the rest of each split is unchanged).

    Args:
        max_train_per_class: cap on training docstrings per package (a seeded choice); None = all.
        max_eval_per_class: cap per package on dev and test.
        stdlib: the standard-library folder (default: this interpreter's).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rows: Dict[str, List[Tuple[str, str, str]]] = {s: [] for s in ("train", "dev", "test")}
    for pkg, m, split, docs in _package_modules(root):
        rel = m.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        rows[split] += [(doc, pkg, rel) for doc in docs]
    out = {}
    train_texts = {t for t, _, _ in rows["train"]}  # every training candidate, whatever the cap keeps
    for split, items in rows.items():
        cap = max_train_per_class if split == "train" else max_eval_per_class
        items = balanced_rows(items, cap, seed={"train": 0, "dev": 1, "test": 2}[split])
        if split != "train":  # no held-out text that training could have seen verbatim
            items = [r for r in items if r[0] not in train_texts]
        out[split] = Split(f"stdlib-package:{split}", [t for t, _, _ in items], [p for _, p, _ in items],
                           [f"{mod}#{i}" for i, (_, _, mod) in enumerate(items)])
    return out


PAIR_EXCLUDED = ("site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                 "__phello__")
"""Path parts of stdlib files the ``docstring-signature`` task skips (test suites, GUI code, vendored files)."""
PAIR_MIN_CHARS = 20
PAIR_MAX_CHARS = 300


def _functions(path: Path) -> List[Tuple[str, str]]:
    """``(signature, docstring)`` of the documented functions and methods of one source file.

    The signature is ``Qual.name(arguments) -> annotation`` as written in the source (``ast.unparse``);
    the docstring has its whitespace collapsed and is cut to :data:`PAIR_MAX_CHARS`.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out: List[Tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                text = " ".join(doc.split()) if doc else ""
                if len(text) >= PAIR_MIN_CHARS:
                    sig = f"{prefix}{child.name}({ast.unparse(child.args)})"
                    if child.returns is not None:
                        sig += f" -> {ast.unparse(child.returns)}"
                    out.append((sig, text[:PAIR_MAX_CHARS]))
                visit(child, f"{prefix}{child.name}.")  # nested functions keep their own docstrings

    visit(tree, "")
    return out


def _module_pairs(module: str, functions: Sequence[Tuple[str, str]]) -> List[Tuple[Tuple[str, str], str, str]]:
    """One matching and one mismatched pair per function of ``module`` (``((signature, docstring), label, module)``).

    The mismatched docstring is drawn (seeded by the module and the signature) from the functions of the
    same module whose docstring and signature both differ from this one's, so no negative repeats a
    positive's text; a function with no such partner is left out (with its positive, to keep the balance).
    """
    rows = []
    for sig, doc in functions:
        others = sorted({d for s, d in functions if d != doc and s != sig})
        if not others:
            continue
        wrong = others[_stable(f"{module}:{sig}") % len(others)]
        rows += [((sig, doc), "1", module), ((sig, wrong), "0", module)]
    return rows


def _pair_modules(root: Path) -> List[Tuple[Path, str, List[Tuple[Tuple[str, str], str, str]]]]:
    """``(module file, split, rows)`` of the ``docstring-signature`` task: the files with documented functions, in
    hash order, split by :data:`SPLIT_PATTERN`."""
    files = sorted((p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(PAIR_EXCLUDED)),
                   key=lambda p: _stable(p.relative_to(root).as_posix()))
    out = []
    for f in files:
        rows = _module_pairs(f.relative_to(root).with_suffix("").as_posix().replace("/", "."), _functions(f))
        if rows:
            out.append((f, SPLIT_PATTERN[len(out) % len(SPLIT_PATTERN)], rows))
    return out


def _if_buildable(build: Callable[[], List]) -> List:
    """``build()``, or nothing when this Python's standard library cannot give the task (it raises RuntimeError:
    too few packages or functions); a task that cannot be built holds nothing out of pretraining."""
    try:
        return build()
    except RuntimeError:
        return []


def held_out_stdlib_modules(stdlib: Optional[Union[str, Path]] = None) -> frozenset:
    """The standard-library files (paths relative to ``stdlib``, ``/``-separated) whose text is in a dev or test split
    of a text task (``stdlib-package``, ``docstring-signature``). The embedded pretraining corpus leaves them out
    (:mod:`datasets_def.text`), so no pretrained encoder or fitted tokenizer has read a task's held-out inputs."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    held = [m for _, m, split, _ in _if_buildable(lambda: _package_modules(root)) if split != "train"]
    held += [f for f, split, _ in _if_buildable(lambda: _pair_modules(root)) if split != "train"]
    return frozenset(p.relative_to(root).as_posix() for p in held)


def held_out_stdlib_texts(stdlib: Optional[Union[str, Path]] = None) -> List[str]:
    """Every dev or test input text of the text tasks at full size (``stdlib-package`` docstrings,
    ``docstring-signature`` docstrings and signatures), whitespace collapsed: what pretraining text must not contain
    (none for a task this Python cannot build)."""
    texts: List[str] = []
    for build in (lambda: stdlib_package_task(None, None, stdlib), lambda: docstring_signature_task(None, None, stdlib)):
        for task in _if_buildable(lambda: [build()]):
            for split in ("dev", "test"):
                texts += [t for x in task[split].inputs for t in ((x,) if isinstance(x, str) else x)]
    return sorted(set(texts))


def docstring_signature_task(max_train_per_class: Optional[int] = 300, max_eval_per_class: Optional[int] = 100,
                             stdlib: Optional[Union[str, Path]] = None) -> Dict[str, Split]:
    """The ``docstring-signature`` sentence-pair task: ``{"train", "dev", "test"}`` splits of
    ``((signature, docstring), "1" | "0")``, split by module (:data:`SPLIT_PATTERN` over modules in hash order).

    Args:
        max_train_per_class: functions kept in train (a seeded choice; each gives one row of each label); None = all.
        max_eval_per_class: the same for dev and test.
        stdlib: the standard-library folder (default: this interpreter's).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    per_split: Dict[str, List[List[Tuple[Tuple[str, str], str, str]]]] = {s: [] for s in ("train", "dev", "test")}
    for _, split, rows in _pair_modules(root):
        per_split[split] += [rows[j:j + 2] for j in range(0, len(rows), 2)]  # (positive, negative) of one function
    if any(not v for v in per_split.values()):
        raise RuntimeError(f"{root}: too few documented functions for the docstring-signature task "
                           f"({ {k: len(v) for k, v in per_split.items()} } per split)")
    out = {}
    for split, functions in per_split.items():
        cap = max_train_per_class if split == "train" else max_eval_per_class
        rng = np.random.default_rng({"train": 0, "dev": 1, "test": 2}[split])
        keep = range(len(functions)) if cap is None or len(functions) <= cap else rng.choice(len(functions), cap,
                                                                                             replace=False)
        items = [row for j in keep for row in functions[j]]
        items = [items[j] for j in rng.permutation(len(items))]
        out[split] = Split(f"docstring-signature:{split}", [x for x, _, _ in items], [y for _, y, _ in items],
                           [f"{mod}#{j}" for j, (_, _, mod) in enumerate(items)])
    return out


def balanced_rows(rows: Sequence[Tuple], cap: Optional[int], seed: int, label_index: int = 1) -> List[Tuple]:
    """At most ``cap`` rows per label (a seeded choice), in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    by: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        by.setdefault(str(r[label_index]), []).append(i)
    keep = []
    for _, idx in sorted(by.items()):
        keep += idx if cap is None or len(idx) <= cap else rng.choice(idx, cap, replace=False).tolist()
    return [rows[i] for i in rng.permutation(keep)]


def balanced_subsample(split: Split, per_class: Optional[int], seed: int = 0) -> Split:
    """At most ``per_class`` samples of each label of ``split`` (seeded), shuffled; None keeps all."""
    rows = list(zip(split.inputs, split.labels, split.where))
    kept = balanced_rows(rows, per_class, seed)
    return Split(split.path, [r[0] for r in kept], [r[1] for r in kept], [r[2] for r in kept], list(split.skipped))


def write_stdlib_task(out_dir: Union[str, Path], task: str = "stdlib-package", **kw) -> Dict[str, Path]:
    """Write a stdlib task's splits as ``train.tsv``, ``dev.tsv``, ``test.tsv``; returns the paths.

    ``stdlib-package`` has columns ``text``, ``label``, ``module`` (``mmm finetune --text_column text``);
    ``docstring-signature`` has ``signature``, ``docstring``, ``label``, ``module``
    (``--text_column signature --text_pair_column docstring``).
    """
    makers = {"stdlib-package": stdlib_package_task, "docstring-signature": docstring_signature_task}
    if task not in makers:
        raise ValueError(f"unknown stdlib task {task!r}; choose from {sorted(makers)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, s in makers[task](**kw).items():
        p = out / f"{name}.tsv"
        header = "text\tlabel\tmodule" if task == "stdlib-package" else "signature\tdocstring\tlabel\tmodule"
        lines = [header]
        for x, y, w in zip(s.inputs, s.labels, s.where):
            cells = [x] if isinstance(x, str) else list(x)
            lines.append("\t".join([c.replace(chr(9), " ") for c in cells] + [str(y), w.split("#")[0]]))
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[name] = p
    return paths
