"""``val: same`` (the default) validates on the val split of the training source: a run on the user's shards used
to validate on the built-in embedded set, because ``val`` defaulted to ``embedded`` whatever ``train`` named."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmm.config import ConfigError, PretrainConfig, TaskConfig
from mmm.train.tasks import resolve_shards, resolve_val_shards, scoring_val_shards


def _tar(path: Path) -> Path:
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass
    return path


def test_same_is_the_default_and_reads_the_training_folders_val_split(tmp_path: Path, caplog):
    assert PretrainConfig().data.val == "same" and TaskConfig().val == "same"
    _tar(tmp_path / "shards" / "train-000000.tar")
    val = _tar(tmp_path / "shards" / "val-000000.tar")
    task = TaskConfig(name="t", dataset="text", train=str(tmp_path / "shards"))
    assert resolve_val_shards(task) == [str(val)]
    embedded = TaskConfig(name="t", dataset="text", train="embedded")
    assert resolve_val_shards(embedded) == resolve_shards("embedded", "text", "val")
    _tar(tmp_path / "only_train" / "train-000000.tar")
    lonely = TaskConfig(name="t", dataset="text", train=str(tmp_path / "only_train"))
    assert resolve_val_shards(lonely) is None and "no val-*.tar shards in the training folder" in caplog.text
    assert scoring_val_shards(lonely) == resolve_shards("embedded", "text", "val")  # scoring falls back, named
    assert resolve_val_shards(TaskConfig(name="t", train=str(tmp_path / "shards"), val=None)) is None
    assert resolve_val_shards(TaskConfig(name="t", train=f"file:{tmp_path / 'shards'}")) == [str(val)]  # a url


def test_same_with_a_training_pattern_is_refused(tmp_path: Path):
    task = TaskConfig(name="t", train=str(tmp_path / "shards" / "train-{000000..000003}.tar"))
    with pytest.raises(ConfigError, match=r"task 't': val is 'same' .* is not a shard folder; set val to the "
                                          r"validation shards"):
        resolve_val_shards(task)


def test_a_multi_task_config_from_before_same_still_loads():
    """Checkpoints and run folders of multi-task runs store data.val: embedded, the default before 'same'."""
    from conftest import REPO
    from mmm.config import load_config
    from mmm.train.tasks import task_configs

    cfg = load_config(REPO / "configs" / "vl_uniter_tiny.yaml", {"trainer.default_root_dir": "unused",
                                                                 "data.val": "embedded"})
    assert [t.name for t in task_configs(cfg)][:2] == ["mlm", "mrfr"]
