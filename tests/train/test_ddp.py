"""Lightning DDP on CPU (two gloo processes): 2 ranks x B train like 1 rank x 2B, ranks read disjoint
samples, one-pass epochs end together on every rank although the ranks' shares differ in length,
and validation logs the same global, count-weighted means on every rank.

The DDP run is real (``strategy="ddp"``, launched the way torchrun-less Lightning launches it: the
script runs again for rank 1); it records each rank's batches, losses and the all-reduced
gradients of the first step. The reference is one process training on the union of both ranks'
batches of every step (2B sequences), from the same initial weights.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config
from datasets_def.text import build_shards
from mmm.batch import PackedBatch, TokenInput, TokenTargets
from mmm.core.packing import PackedSeqInfo
from mmm.data.stream import list_shards
from mmm.train.datamodule import StreamDataModule
from mmm.train.pretrain import build_run

BATCH, STEPS, COMPARED_STEPS = 4, 7, 3
TOL = 1e-5
WORDS = ("ranks read disjoint shards while gradients are averaged so the global masked token count decides "
         "how much each prediction weighs in one data parallel step").split()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """3 train shards: after the seeded shuffle one rank reads two of them, the other one."""
    rng = np.random.default_rng(1)
    src = tmp_path_factory.mktemp("ddp_docs")
    for i in range(30):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, int(rng.integers(8, 30)))) + ".",
                                             encoding="utf-8")
    out = tmp_path_factory.mktemp("ddp_shards")
    build_shards(src, out, max_chars=200, samples_per_shard=10, seed=0)
    assert len(list(out.glob("train-*.tar"))) == 3
    # 3 validation shards of 10, 10 and 5 samples: one rank validates on two of them, the other on one
    val_src, val_out = tmp_path_factory.mktemp("ddp_val_docs"), tmp_path_factory.mktemp("ddp_val_shards")
    for i in range(25):
        (val_src / f"val{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, int(rng.integers(8, 30)))) + ".",
                                                 encoding="utf-8")
    build_shards(val_src, val_out, max_chars=200, samples_per_shard=10, seed=0)
    for shard in sorted(val_out.glob("train-*.tar")):
        shard.rename(out / shard.name.replace("train-", "val-"))
    assert len(list(out.glob("val-*.tar"))) == 3
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sequences(step: dict) -> List[Tuple[int, ...]]:
    """The unmasked token sequences of a recorded batch (labels put back at the masked positions)."""
    ids = step["ids"].clone()
    ids[step["positions"]] = step["labels"]
    cu = step["cu_seqlens"].tolist()
    return [tuple(ids[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:])]


def _merge(a: dict, b: dict) -> PackedBatch:
    """One packed batch holding the sequences of ``a`` then ``b`` (2B sequences, their masks kept)."""
    lengths = [int(x) for s in (a, b) for x in s["cu_seqlens"].diff()]
    seq = PackedSeqInfo.from_seqlens(lengths)
    ids = torch.cat([a["ids"], b["ids"]])
    positions = torch.cat([a["positions"], b["positions"] + a["ids"].numel()])
    return PackedBatch(seq, {"text": TokenInput(ids, seq.position_ids)},
                       {"text": TokenTargets(positions, torch.cat([a["labels"], b["labels"]]))})


def _rank_stream(dm, epoch: int, rank: int, world: int, monkeypatch) -> List[List[Tuple[int, ...]]]:
    """Sequences per batch of one rank's full epoch, built in this process (rank taken from the env)."""
    with monkeypatch.context() as m:
        m.setenv("RANK", str(rank))
        m.setenv("WORLD_SIZE", str(world))
        batches = list(dm.task_loader(epoch=epoch))
    return [_sequences({"ids": b.inputs["text"].ids, "positions": b.targets["text"].positions,
                        "labels": b.targets["text"].labels, "cu_seqlens": b.seq.cu_seqlens}) for b in batches]


def test_two_ddp_ranks_match_one_rank_with_twice_the_batch(shard_dir, tmp_path, monkeypatch):
    # the reference process: trains the shared tokenizer and holds the same model
    cfg = tiny_config(tmp_path / "ref", **{"data.train": str(shard_dir), "data.val": None, "data.batch_size": BATCH,
                                           "data.seed": 3, "trainer.max_steps": STEPS, "optim.warmup_steps": 1})
    ref = build_run(cfg)
    tok = ref.run_dir / "tokenizer"
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PL_DISABLE_FORK": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "ddp_run.py"), str(out), str(shard_dir),
                           str(tok), "2", str(BATCH), str(STEPS)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"DDP run (2 CPU processes, {STEPS} steps) took {time.perf_counter() - t0:.1f} s")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) == STEPS

    # (a) same loss and gradients as one rank on the union of both ranks' batches
    model = ref.module.model
    model.load_state_dict(r0["initial"])
    model.train()
    opt_cfg = ref.module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    for i in range(COMPARED_STEPS):
        a, b = r0["steps"][i], r1["steps"][i]
        assert a["labels"].numel() != b["labels"].numel()  # per-rank means would weigh tokens unequally
        opt.zero_grad()
        loss, _ = model(_merge(a, b))
        loss.backward()
        # the logged per-rank losses are sum / (global count / 2): their mean is the global mean
        assert abs((a["loss"] + b["loss"]) / 2 - loss.item()) <= TOL, f"step {i}"
        if i == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert set(grads) == set(r0["grads"]) == set(r1["grads"])
            for n, g in grads.items():
                torch.testing.assert_close(r0["grads"][n], r1["grads"][n], rtol=0, atol=0)  # DDP: one average
                torch.testing.assert_close(r0["grads"][n], g, rtol=1e-4, atol=TOL, msg=lambda m: f"{n}: {m}")
        opt.step()
        sched.step()

    # (b) disjoint shares; one-pass epochs end together, cut to the shorter rank's share
    dm = ref.datamodule
    streams = [_rank_stream(dm, 0, r, 2, monkeypatch) for r in (0, 1)]
    lengths = [len(s) for s in streams]
    assert lengths[0] != lengths[1], f"the test needs unequal rank shares, got {lengths}"
    seen = [set(q for s in stream for q in s) for stream in streams]
    assert not seen[0] & seen[1], "the ranks' shares of an epoch overlap"
    whole = set(q for s in _rank_stream(dm, 0, 0, 1, monkeypatch) for q in s)
    assert seen[0] | seen[1] == whole  # and together they are the whole epoch of one process
    # every epoch is cut to its shorter share, on both ranks, and starts the next one fresh
    per_epoch = [streams] + [[_rank_stream(dm, e, r, 2, monkeypatch) for r in (0, 1)] for e in (1, 2)]
    cuts = [min(len(s) for s in ss) for ss in per_epoch]
    expected = [e for e, c in enumerate(cuts) for _ in range(c)][:STEPS]
    assert len(expected) == STEPS and expected[-1] >= 1
    epochs = [[s["epoch"] for s in r["steps"]] for r in (r0, r1)]
    assert epochs[0] == epochs[1] == expected, (epochs, lengths)
    for r, rec in enumerate((r0, r1)):
        for e in sorted(set(expected)):
            trained = [_sequences(s) for s in rec["steps"] if s["epoch"] == e]
            assert trained == per_epoch[e][r][:len(trained)], f"rank {r}, epoch {e}: not a prefix of its share"

    # (c) validation: both ranks log the mean over every rank's validation batches, weighted by masked tokens
    assert r0["val_batches"] != r1["val_batches"], "the test needs unequal validation shares"
    model.load_state_dict(r0["val_weights"])
    model.eval()
    val_dm = StreamDataModule(dm.cfg, [dataclasses.replace(dm.tasks[0], val_urls=list_shards(shard_dir, "val"))])
    sums, count, rank_means = {"loss": 0.0, "acc": 0.0}, 0, []
    for r, rec in enumerate((r0, r1)):
        with monkeypatch.context() as m:  # rank r's shards (split by RANK) and masks (drawn with its rank)
            m.setenv("RANK", str(r))
            m.setenv("WORLD_SIZE", "2")
            m.setattr(torch.distributed, "is_initialized", lambda: True)
            m.setattr(torch.distributed, "get_rank", lambda group=None, rank=r: rank)
            m.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
            batches = list(val_dm.val_dataloader())
        assert len(batches) == rec["val_batches"]
        rank_loss, rank_count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                out = model(b)[1]["mlm"]
                sums["loss"] += float(out.loss) * out.count
                sums["acc"] += float(out.metrics["acc"]) * out.count
                count += out.count
                rank_loss, rank_count = rank_loss + float(out.loss) * out.count, rank_count + out.count
        rank_means.append(rank_loss / rank_count)
    loss = sums["loss"] / count
    expected = {"val/mlm_loss": loss, "val/mlm_acc": sums["acc"] / count, "val/loss": loss,
                "val/mlm_ppl": float(np.exp(loss))}
    assert min(abs(m - loss) for m in rank_means) > 1e-3  # one rank's mean would not do
    for r, rec in enumerate((r0, r1)):
        for key, value in expected.items():
            assert abs(rec["val_metrics"][key] - value) <= 1e-5 * max(1.0, abs(value)), (r, key, rec["val_metrics"])


def test_two_gloo_ranks_on_parts_of_an_image_mae_and_an_audio_batch_match_one_process(tmp_path):
    """Exact data-parallel losses beyond text MLM: MAE pixel regression, and audio masked-feature
    regression plus HuBERT-style cluster prediction, with the ranks holding unequal numbers of hidden
    patches / frames. DDP's averaged gradients and the mean of the ranks' losses equal one process's
    on the whole batch."""
    from ddp_heads import CASES, PARTS, step

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    script = str(REPO / "tests" / "train" / "ddp_heads.py")
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path)], env={**env, "RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-4000:]
    for name, (make_model, make_batch) in CASES.items():
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        whole = step(make_model(), make_batch((PARTS[0][0], PARTS[-1][1])))
        for head, (loss, count) in whole["heads"].items():
            counts = [r["heads"][head][1] for r in ranks]
            assert sum(counts) == count and counts[0] != counts[1], (name, head, counts)
            # each rank's head loss is its sum / (global count / 2): their mean is the whole batch's mean
            assert abs(sum(r["heads"][head][0] for r in ranks) / 2 - loss) <= TOL, (name, head)
        assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - whole["loss"]) <= TOL, name
        assert set(whole["grads"]) <= set(ranks[0]["grads"]) and whole["grads"], name
        for n, g in ranks[0]["grads"].items():
            torch.testing.assert_close(ranks[1]["grads"][n], g, rtol=0, atol=0)  # DDP: one average
            ref = whole["grads"].get(n, torch.zeros_like(g))  # a parameter no head used has no gradient
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=TOL, msg=lambda m: f"{name} {n}: {m}")
