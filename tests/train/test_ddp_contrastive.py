"""Two gloo ranks training ``itc`` on shards whose shares end in partial batches of different sizes: the head gathers
every rank's embeddings (equal shapes needed), so a partial contrastive batch is dropped in its worker, not
gathered."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import yaml

from conftest import REPO
from mmm.batch import ContrastiveTargets, PackedBatch
from mmm.core.packing import PackedSeqInfo
from mmm.train.gathered_batches import FullContrastiveBatches


def _itc_batch(pairs: int) -> PackedBatch:
    seq = PackedSeqInfo.from_seqlens([2] * (2 * pairs))
    t = ContrastiveTargets(torch.arange(pairs) * 2, torch.arange(pairs) * 2 + 2 * pairs, torch.arange(pairs))
    return PackedBatch(seq, {}, {"itc": t})


def test_partial_contrastive_batches_are_dropped_and_counted(caplog):
    stage = FullContrastiveBatches(4, "itc")
    with caplog.at_level("WARNING"):
        kept = list(stage(iter([_itc_batch(4), _itc_batch(3), _itc_batch(4), _itc_batch(1)])))
    assert [b.targets["itc"].count for b in kept] == [4, 4]
    assert (stage.dropped_batches, stage.dropped_pairs) == (2, 4)
    assert "1 partial contrastive batch(es) (3 pair(s)) dropped" in caplog.text
    other = PackedBatch(PackedSeqInfo.from_seqlens([3]), {}, {})  # no contrastive targets: passed through
    assert list(stage(iter([other]))) == [other]


def _split_shard(src: Path, out: Path, sizes) -> None:
    """The first samples of an image-text shard, re-packed into shards of ``sizes`` samples."""
    members = {}
    with tarfile.open(src) as tin:
        for m in tin.getmembers():
            members.setdefault(m.name.split(".")[0], []).append((m, tin.extractfile(m).read()))
    keys = sorted(members)
    out.mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):
        with tarfile.open(out / f"train-{i:06d}.tar", "w") as tout:
            for key in keys[start:start + n]:
                for m, data in members[key]:
                    tout.addfile(m, io.BytesIO(data))
        start += n


def test_two_ranks_train_itc_through_uneven_partial_batches(tmp_path):
    """It crashed at the end of the first epoch: 'Received data size doesn't match expected size' (gloo)."""
    from mmm.train.tasks import resolve_shards

    _split_shard(Path(resolve_shards("embedded", "image_text", "train")[0]), tmp_path / "shards", (10, 11))
    cfg = yaml.safe_load((REPO / "configs" / "vl_itc_soft_tiny.yaml").read_text())
    cfg["model"]["encoder"].update(dim=32, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0)
    cfg["model"]["text"].update(vocab_size=300, tokenizer_train_docs=18, max_len=32)
    cfg["data"].update(batch_size=4, num_workers=0, shuffle_buffer=0)
    for task in cfg["tasks"]:
        task.update(train=str(tmp_path / "shards"), val=None)
    cfg["trainer"].update(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, val_check_interval=300,
                          checkpoint_every_n_steps=300, enable_progress_bar=False, precision="32-true",
                          default_root_dir=str(tmp_path / "run"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PL_DISABLE_FORK": "1"}
    done = subprocess.run([sys.executable, "-m", "mmm.cli", "pretrain", "--config", str(tmp_path / "cfg.yaml")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "partial contrastive batch(es)" in done.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
