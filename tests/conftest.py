"""Shared test set-up: GPU tests skip cleanly without CUDA; caches go to a per-session tmp dir; under
pytest-xdist (``-n``, set in pyproject.toml) each worker gets its share of the cores and starts on its share of
the README chains, the longest tests; the slowest README commands are listed at the end of the run."""
import os
from pathlib import Path

import pytest
import torch

README_CHAIN_TEST = "tests/test_readme_commands.py::test_every_readme_command_runs_at_smoke_size"

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # one worker per core: no worker's thread pool oversubscribes them
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # for the processes tests start


@pytest.hookimpl(trylast=True)  # after `-m 'not slow'` has deselected: the order of the tests that run
def pytest_collection_modifyitems(config, items):
    _long_tests_first_on_every_worker(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _long_tests_first_on_every_worker(items) -> None:
    """Deal the README chains (minutes each; most commands first) to the fronts of the blocks that xdist's
    ``--dist worksteal`` hands the workers at the start (consecutive, sizes as below), the other tests after them:
    each worker starts on its share of the long tests, and a worker that runs out steals short tests from the
    end of another's block. The same order in every worker (xdist requires it): it depends on the items only."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    chains = sorted((it for it in items if it.nodeid.startswith(README_CHAIN_TEST)),
                    key=lambda it: -len(it.callspec.params["chain"].commands))
    rest = [it for it in items if not it.nodeid.startswith(README_CHAIN_TEST)]
    order, left = [], len(items)
    for k in range(workers):
        size = left // (workers - k)
        left -= size
        dealt = chains[k::workers]
        take = max(0, size - len(dealt))
        order += dealt + rest[:take]
        rest = rest[take:]
    items[:] = order + rest


def pytest_terminal_summary(terminalreporter):
    """The slowest README commands (wall and CPU seconds), from the ``readme_seconds`` each chain test records."""
    reports = terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
    rows = [tuple(row) for report in reports if report.when == "call"
            for name, value in report.user_properties if name == "readme_seconds" for row in value]
    if not rows:
        return
    rows.sort(reverse=True)
    terminalreporter.write_sep("=", f"slowest README commands (wall s, CPU s) of {len(rows)}; "
                                    f"all: {sum(r[0] for r in rows):.0f} s wall, {sum(r[1] for r in rows):.0f} s CPU")
    for wall, cpu, text in rows[:15]:
        terminalreporter.write_line(f"{wall:7.1f} {cpu:7.1f}  {text}")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the embedded corpus cache of a test session out of the user's ~/.cache."""
    if "MMM_CACHE_DIR" not in os.environ:
        os.environ["MMM_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmm_cache"))
    yield


REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {
    "trainer.enable_progress_bar": False, "data.batch_size": 8, "data.num_workers": 0, "data.shuffle_buffer": 0,
    "model.text.vocab_size": 500, "model.text.tokenizer_train_docs": 50, "model.text.max_len": 64,
    "model.encoder.dim": 64, "model.encoder.depth": 2, "model.encoder.mlp_hidden": 128,
}


def tiny_argv(run_dir: Path, **overrides) -> list:
    """``mmm pretrain`` arguments of the tiny text config with :data:`TINY_OVERRIDES` (what the ``ckpt`` run used)."""
    import json

    argv = ["pretrain", "--config", str(REPO / "configs" / "text_mlm_tiny.yaml"), "--trainer.default_root_dir",
            str(run_dir), "--data.val", "null"]
    for k, v in {**TINY_OVERRIDES, **overrides}.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return argv


def tiny_config(run_dir: Path, **overrides):
    """configs/text_mlm_tiny.yaml shrunk to seconds on CPU (the embedded corpus, a 500-token vocabulary)."""
    from mmm.config import load_config

    return load_config(REPO / "configs" / "text_mlm_tiny.yaml",
                       {**TINY_OVERRIDES, "trainer.default_root_dir": str(run_dir), **overrides})


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A real 3-step mmm pretraining checkpoint, trained once per test session."""
    from mmm.train.pretrain import pretrain

    run_dir = tmp_path_factory.mktemp("tiny_run")
    run = pretrain(tiny_config(run_dir, **{"trainer.max_steps": 3, "data.val": None}))
    assert run.last_checkpoint.is_file()
    return run.last_checkpoint


@pytest.fixture
def run_copy(ckpt, tmp_path) -> Path:
    """A copy of the session's tiny 3-step run folder (config.yaml, tokenizer/, checkpoints/last.ckpt), to resume
    or break without touching the shared one."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(ckpt.parents[1], dst, ignore=shutil.ignore_patterns("logs"))
    return dst


def error_line(capsys, command: str = "pretrain") -> str:
    """The single ``mmm <command>: error: ...`` line on stderr, which must be the last thing printed (log lines
    before it are allowed, a traceback is not)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"mmm {command}: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip().endswith(lines[0]), "the error line must be the last thing printed"
    return lines[0]


TINY_IMAGE_OVERRIDES = {
    "trainer.enable_progress_bar": False, "data.batch_size": 16, "data.num_workers": 0, "data.shuffle_buffer": 0,
    "model.encoder.dim": 32, "model.encoder.depth": 2, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
    "model.image.image_size": 16, "trainer.val_check_interval": 1000, "trainer.limit_val_batches": 1,
}


def tiny_image_config(run_dir: Path, **overrides):
    """configs/image_mae_tiny.yaml shrunk to seconds on CPU (embedded shapes at 16x16, a 2-block ViT)."""
    from mmm.config import load_config

    return load_config(REPO / "configs" / "image_mae_tiny.yaml",
                       {**TINY_IMAGE_OVERRIDES, "trainer.default_root_dir": str(run_dir), **overrides})


@pytest.fixture(scope="session")
def image_ckpt(tmp_path_factory) -> Path:
    """A real 3-step MAE checkpoint on the embedded images, trained once per test session."""
    from mmm.train.pretrain import pretrain

    run_dir = tmp_path_factory.mktemp("tiny_image_run")
    run = pretrain(tiny_image_config(run_dir, **{"trainer.max_steps": 3, "data.val": None}))
    assert run.last_checkpoint.is_file()
    return run.last_checkpoint


def fit_head(head, hidden, batch, steps: int = 30, lr: float = 1e-2):
    """Train ``head`` and the ``hidden`` states it reads on one batch with Adam; the last step's output (a head
    that can learn its targets drives the loss well below where it started)."""
    opt = torch.optim.Adam([hidden, *head.parameters()], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = head(hidden, batch)
        out.loss.backward()
        opt.step()
    return out
