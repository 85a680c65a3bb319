"""End-to-end training on the embedded corpus: logs, learning, checkpoints, resume."""
import csv
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from mmm.train.pretrain import pretrain


def _rows(run):
    with (Path(run.csv_logger.log_dir) / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_training_logs_learns_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{
        "trainer.max_steps": 40, "trainer.log_every_n_steps": 5, "trainer.val_check_interval": 20,
        "trainer.limit_val_batches": 2, "trainer.checkpoint_every_n_steps": 20, "optim.warmup_steps": 5,
        "optim.lr": 3e-3, "data.batch_size": 16})
    run = pretrain(cfg)
    rows = _rows(run)
    cols = set(rows[0])
    for key in ("train/loss", "train/mlm_acc", "train/tokens_per_sec", "val/mlm_loss", "val/mlm_acc", "val/mlm_ppl"):
        assert key in cols, f"{key} not logged; columns: {sorted(cols)}"
    assert any(c.startswith("lr-") for c in cols)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.25, f"training did not reduce the loss: {losses}"
    assert (run.run_dir / "config.yaml").is_file() and (run.run_dir / "tokenizer" / "tokenizer.json").is_file()

    # the checkpoint is self-contained plain data: it loads without unpickling code
    ck = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 40 and ck["mmm"]["format"] == "mmm-pretrain-v1"
    assert "tokenizer.json" in ck["mmm"]["assets"]["text"] and ck["mmm"]["config"]["trainer"]["max_steps"] == 40

    # resume from last.ckpt and continue to 50 steps; the run's tokenizer is reused, not retrained
    tok_before = (run.run_dir / "tokenizer" / "tokenizer.json").read_text()
    cfg2 = tiny_config(tmp_path / "run", **{"trainer.max_steps": 50, "trainer.ckpt_path": "last", "data.val": None,
                                            "trainer.checkpoint_every_n_steps": 50})
    run2 = pretrain(cfg2)
    assert run2.trainer.global_step == 50
    assert (run.run_dir / "tokenizer" / "tokenizer.json").read_text() == tok_before
    assert torch.load(run2.last_checkpoint, map_location="cpu", weights_only=True)["global_step"] == 50
    # the resumed run logs to a new version; the first run's metrics are kept
    assert Path(run2.csv_logger.log_dir) != Path(run.csv_logger.log_dir) and _rows(run) == rows
    steps = [int(r["step"]) for r in _rows(run2) if r.get("train/loss")]
    assert steps and min(steps) >= 40


def test_missing_resume_checkpoint_is_named(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"trainer.max_steps": 1, "trainer.ckpt_path": str(tmp_path / "nope.ckpt")})
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        pretrain(cfg)


def test_missing_shard_folder_is_named(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"data.train": str(tmp_path / "no_such_shards")})
    with pytest.raises(FileNotFoundError, match="no_such_shards"):
        pretrain(cfg)


@pytest.mark.slow
def test_compiled_training_runs(tmp_path):
    """trainer.compile wraps each encoder block in torch.compile (slow: compilation on CPU)."""
    run = pretrain(tiny_config(tmp_path / "run", **{"trainer.max_steps": 3, "trainer.compile": True, "data.val": None}))
    assert run.trainer.global_step == 3
