"""Multi-task runs: task sampling, config checks, one shared encoder over text + DNA, exact resume."""
import csv
import dataclasses
import hashlib
import io
import itertools
import tarfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from mmm.config import ConfigError, load_config
from mmm.train.mixture import TaskSampler
from mmm.train.pretrain import build_run, resolve_ckpt_path
from mmm.train.tasks import task_configs

TEXT_DNA = {
    "model": {
        "encoder": {"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64, "dropout": 0.0, "attn_dropout": 0.0},
        "text": {"vocab_size": 300, "tokenizer_train_docs": 50, "max_len": 48},
        "dna": {"tokenizer": "dna_char", "max_len": 64},
    },
    "objectives": [
        {"name": "mlm", "label": "mlm_text", "args": {"modality": "text"}},
        {"name": "mlm", "label": "mlm_dna", "args": {"modality": "dna"}},
    ],
    "tasks": [
        {"name": "text", "dataset": "text", "weight": 2.0, "objectives": ["mlm_text"], "val": None,
         "masking": {"name": "bert_random", "args": {"ratio": 0.15}}},
        {"name": "dna", "dataset": "dna", "weight": 1.0, "objectives": ["mlm_dna"],
         "masking": {"name": "dna_random", "args": {"ratio": 0.15}}},
    ],
    "data": {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, "seed": 1},
    "optim": {"warmup_steps": 2, "schedule": "constant"},  # a stop at step 4 must not change the lr of steps 1-4
    "trainer": {"max_steps": 6, "enable_progress_bar": False, "log_every_n_steps": 1, "val_check_interval": 4,
                "limit_val_batches": 1, "checkpoint_every_n_steps": 1000},
}


def _cfg(tmp_path: Path, name: str, tokenizer=None, **trainer):
    data = yaml.safe_load(yaml.safe_dump(TEXT_DNA))
    data["trainer"].update(default_root_dir=str(tmp_path / name), **trainer)
    if tokenizer is not None:  # HF tokenizers training is not bit-reproducible across runs: share one
        data["model"]["text"]["tokenizer_path"] = str(tokenizer)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path)


def test_task_sampler_is_a_seeded_function_of_the_step():
    s = TaskSampler([2.0, 1.0, 1.0], seed=3)
    seq = [s(i) for i in range(10_000)]
    assert seq == [TaskSampler([2.0, 1.0, 1.0], seed=3)(i) for i in range(10_000)]
    assert seq != [TaskSampler([2.0, 1.0, 1.0], seed=4)(i) for i in range(10_000)]
    freq = np.bincount(seq, minlength=3) / len(seq)
    assert np.allclose(freq, [0.5, 0.25, 0.25], atol=0.02)
    for n in (0, 1, 4095, 4096, 4097, 9999):
        assert s.counts(n).tolist() == np.bincount(seq[:n], minlength=3).tolist()


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tasks"][0].update(objectives=["nope"]), "'nope' is not a head of this run"),
    (lambda d: d["tasks"][1].update(objectives=["mlm_text"]), "trained by no task"),
    (lambda d: d["tasks"][1].update(name="text"), "used by two tasks"),
    (lambda d: d["tasks"][0].update(weight=0), "weight must be > 0"),
    (lambda d: d["tasks"][0].update(name="a b"), "identifier"),
])
def test_task_config_errors_name_the_task_and_field(tmp_path, change, message):
    data = yaml.safe_load(yaml.safe_dump(TEXT_DNA))
    change(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        task_configs(load_config(path))


def test_unknown_task_key_is_a_config_error(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(TEXT_DNA))
    data["tasks"][0]["wieght"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="tasks\\[0\\].wieght"):
        load_config(path)


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: List[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        inp = batch.inputs[batch.task]
        h = hashlib.sha1(inp.ids.numpy().tobytes() + batch.seq.cu_seqlens.numpy().tobytes()).hexdigest()
        self.steps.append((trainer.global_step, batch.task, h, float(outputs["loss"])))


def _fit(cfg, rec: Recorder):
    run = build_run(cfg)
    run.trainer.callbacks.append(rec)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resolve_ckpt_path(cfg, run.run_dir))
    return run


def test_text_and_dna_train_one_shared_encoder_and_resume_exactly(tmp_path):
    ref = Recorder()
    run = _fit(_cfg(tmp_path, "ref", max_steps=8), ref)
    model = run.module.model
    assert list(model.embedders) == ["text", "dna"] and model.modality_embed is not None
    tasks = [t for _, t, _, _ in ref.steps]
    assert len(tasks) == 8 and set(tasks) == {"text", "dna"}
    assert tasks == [("text", "dna")[TaskSampler([2.0, 1.0], 1)(i)] for i in range(8)]
    # per-task metrics and source counts are logged; only the dna task has validation shards
    rows = list(csv.DictReader(open(next((run.run_dir / "logs").glob("version_*/metrics.csv")))))
    keys = set().union(*rows)
    assert {"train/text/mlm_text_loss", "train/dna/mlm_dna_loss", "train/task_batches/text",
            "val/dna/mlm_dna_loss", "train/loss"} <= keys
    last = [r for r in rows if r.get("train/task_batches/text")][-1]
    assert float(last["train/task_batches/text"]) + float(last["train/task_batches/dna"]) == 8

    # stop after 4 steps, resume to 8: the same tasks, batches and losses
    first = Recorder()
    tok = run.run_dir / "tokenizer"
    _fit(_cfg(tmp_path, "part", tok, max_steps=4), first)
    second = Recorder()
    _fit(_cfg(tmp_path, "part", tok, max_steps=8, ckpt_path="last"), second)
    resumed = first.steps + second.steps
    assert [s[:3] for s in resumed] == [s[:3] for s in ref.steps]
    assert max(abs(a[3] - b[3]) for a, b in zip(resumed, ref.steps)) <= 1e-5, [(a[3], b[3]) for a, b in zip(resumed, ref.steps)]
    ckpt = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["mmm"]["modalities"] == ["text", "dna"] and set(ckpt["mmm"]["assets"]) == {"text", "dna"}


def test_each_modality_encoder_loads_from_the_multitask_checkpoint_and_matches_the_model(tmp_path):
    from mmm.batch import PackedBatch, TokenInput
    from mmm.core.packing import PackedSeqInfo
    from mmm.encoders import load_encoder

    run = _fit(_cfg(tmp_path, "mm", max_steps=2), Recorder())
    run.trainer.save_checkpoint(str(run.last_checkpoint))
    model = run.module.model.eval()
    with torch.no_grad():  # make the modality rows clearly non-zero so folding them is tested
        model.modality_embed.weight.normal_(0, 0.5)
    run.trainer.save_checkpoint(str(run.last_checkpoint))
    for modality, ids in (("text", [[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]]), ("dna", [[2, 5, 6, 7, 8], [2, 6, 5, 3, 0]])):
        enc = load_encoder(run.last_checkpoint, modality=modality)
        x = torch.tensor(ids)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        out = enc(x, mask)  # (2, 5, d)
        seq = PackedSeqInfo.from_seqlens([5, 4])
        flat = x[mask.bool()]
        ref = model.encode(PackedBatch(seq, {modality: TokenInput(flat, seq.position_ids)}))  # (9, d)
        assert torch.allclose(out[mask.bool()], ref, atol=1e-5), modality
        without = model.encoder(model.embedders[modality](flat, seq.position_ids), seq)
        assert not torch.allclose(without, ref, atol=1e-3)  # the modality embedding matters


def test_an_untagged_batch_is_refused_by_a_multitask_model_with_the_tasks_named():
    from mmm.batch import PackedBatch, TokenInput
    from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
    from mmm.core.packing import PackedSeqInfo
    from mmm.model import build_model
    from mmm.registry import EMBEDDERS

    cfg = ModelConfig(encoder=EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32))
    emb = {m: EMBEDDERS.create("text", vocab_size=20, dim=16, max_len=8) for m in ("text", "dna")}
    model = build_model(cfg, [ObjectiveConfig("mlm", label="a", args={"modality": "text"}),
                              ObjectiveConfig("mlm", label="b", args={"modality": "dna"})], emb, {"t": ["a"], "d": ["b"]})
    seq = PackedSeqInfo.from_seqlens([4])
    batch = PackedBatch(seq, {"text": TokenInput(torch.tensor([2, 5, 6, 3]), seq.position_ids)})
    with pytest.raises(ValueError, match=r"several tasks \(\['d', 't'\]\).*set batch.task"):
        model(batch)
    batch.task = "t"
    _, outputs = model(batch)
    assert list(outputs) == ["a"]


# ------------------------------------------------------------------ data settings a mixture honours

BAD = 3  # undecodable samples in the corrupt text shard


def _mixture_cfg(tmp_path: Path, name: str, data: dict, tokenizer=None, text_train=None, **trainer):
    raw = yaml.safe_load(yaml.safe_dump(TEXT_DNA))
    raw["data"].update(data)
    raw["trainer"].update(default_root_dir=str(tmp_path / name), **trainer)
    if tokenizer is not None:
        raw["model"]["text"]["tokenizer_path"] = str(tokenizer)
    if text_train is not None:
        raw["tasks"][0]["train"] = str(text_train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


def _fingerprint(batch) -> tuple:
    inp = batch.inputs[batch.task]
    return batch.task, hashlib.sha1(inp.ids.numpy().tobytes() + batch.seq.cu_seqlens.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def resampled_run(tmp_path_factory):
    """A built (untrained) text + DNA mixture with data.resampled and 3-batch epochs."""
    tmp = tmp_path_factory.mktemp("mix_resampled")
    return build_run(_mixture_cfg(tmp, "run", {"resampled": True, "epoch_batches": 3}))


def test_resampled_mixture_epochs_are_epoch_batches_long_and_continue_the_streams(resampled_run, monkeypatch):
    from mmm.train.datamodule import StreamDataModule

    dm = resampled_run.datamodule
    assert isinstance(dm, StreamDataModule) and dm.sampler is not None  # the one data module, with two tasks
    loader = dm.train_dataloader()
    e0 = [_fingerprint(b) for b in itertools.islice(loader, 5)]
    state = dm.state_dict()
    e1 = [_fingerprint(b) for b in itertools.islice(loader, 5)]
    assert len(e0) == len(e1) == 3 and state["batches_done"] == 3
    names = [t.name for t in dm.tasks]
    assert [t for t, _ in e0 + e1] == [names[dm.sampler(i)] for i in range(6)]
    assert state["settings"]["resampled"] is True and state["settings"]["epoch_batches"] == 3
    loader.close()
    # a resumed run at batch 3 draws the same next epoch as the streams that went on
    again = StreamDataModule(dm.cfg, dm.tasks)
    again.load_state_dict(state)
    resumed = again.train_dataloader()
    assert [_fingerprint(b) for b in itertools.islice(resumed, 5)] == e1
    resumed.close()
    # shards are drawn with replacement by every rank: rank 7 of 8 has data although the text task has one shard
    assert len(dm.tasks[0].train_urls) == 1
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    other = StreamDataModule(dm.cfg, dm.tasks).train_dataloader()
    assert len([_fingerprint(b) for b in itertools.islice(other, 5)]) == 3
    other.close()


def test_mixture_refuses_half_a_resampling_setting(resampled_run):
    from mmm.train.datamodule import StreamDataModule

    dm = resampled_run.datamodule
    with pytest.raises(ValueError, match="needs data.epoch_batches"):
        StreamDataModule(dataclasses.replace(dm.cfg, epoch_batches=None), dm.tasks)
    with pytest.raises(ValueError, match="applies to data.resampled"):
        StreamDataModule(dataclasses.replace(dm.cfg, resampled=False), dm.tasks)


def _text_shards_with_a_corrupt_one(out: Path) -> Path:
    from datasets_def.text import build_shards

    docs = out / "docs"
    docs.mkdir(parents=True)
    words = "a mixture counts the bad samples of every task stream and logs them".split()
    for i in range(16):
        (docs / f"doc{i:02d}.txt").write_text(" ".join(words[i % 5:] + words[:i % 5]) + ".", encoding="utf-8")
    shards = out / "shards"
    build_shards(docs, shards, max_chars=200, samples_per_shard=8, seed=0)
    with tarfile.open(shards / "train-000099.tar", "w") as tar:
        members = [(f"bad{i}", b"\xff\xfe\xfa not text") for i in range(BAD)]
        members += [(f"good{i}", " ".join(words[i:i + 6]).encode()) for i in range(4)]
        for key, data in members:
            info = tarfile.TarInfo(f"{key}.txt")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return shards


def test_mixture_counts_bad_samples_of_its_task_streams_and_the_trainer_logs_them(resampled_run, tmp_path):
    shards = _text_shards_with_a_corrupt_one(tmp_path / "text")
    cfg = _mixture_cfg(tmp_path, "bad", {"skip_bad": True, "num_workers": 2}, tokenizer=resampled_run.run_dir / "tokenizer",
                       text_train=shards, max_steps=8, val_check_interval=1000)
    run = build_run(cfg)
    loader = run.datamodule.train_dataloader()
    seen = [b.extras["data_errors_total"] for b in itertools.islice(loader, 12)]
    # running totals; workers prefetch, so a later pass over the text shards may already be counted
    assert seen == sorted(seen) and BAD in seen and seen[-1] % BAD == 0 and seen[-1] == loader.data_errors()
    loader.close()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    with open(Path(run.csv_logger.log_dir) / "metrics.csv") as fh:
        logged = [float(r["train/data_errors"]) for r in csv.DictReader(fh) if r.get("train/data_errors")]
    # running totals over both workers and every pass over the text shards (each meets the corrupt samples again)
    assert len(logged) == 8 and logged == sorted(logged) and all(v >= BAD and v % BAD == 0 for v in logged)


def test_one_data_module_for_one_task_or_several_refuses_the_other_kinds_state(resampled_run):
    """A single-task run is the same data module with one task: epoch positions; several tasks: a batch count.
    A checkpoint's data state of the other kind is refused by name, not misread."""
    from mmm.train.datamodule import DataPosition, StreamDataModule

    mixture = resampled_run.datamodule
    single = StreamDataModule(mixture.cfg, mixture.tasks[:1])
    assert single.sampler is None and single.position() == DataPosition(0, 0) and isinstance(mixture.position(), int)  # a batch count (the fixture run may have advanced it)
    state = single.state_dict()
    assert (state["epoch"], state["batches_done"], "kind" in state) == (0, 0, False)
    assert state["settings"]["shards"] == len(mixture.tasks[0].train_urls)
    with pytest.raises(ValueError, match="not a task-mixture state.*written by a single-task run"):
        mixture.load_state_dict(state)
    with pytest.raises(ValueError, match="not a single-task state.*written by a multi-task run"):
        single.load_state_dict(mixture.state_dict())


def test_a_warm_start_from_a_run_with_another_modality_order_loads_by_modality_name(tmp_path):
    """The modality-embedding rows and the modality experts are numbered by the order of `tasks:`; loaded by
    tensor name alone, a source trained text-then-DNA gave a DNA-then-text run's text tokens the DNA vector and
    the DNA expert MLP, reported as "loaded"."""
    from mmm.encoders import read_checkpoint
    from mmm.train.pretrain import pretrain

    def cfg(name, reverse, **model):
        data = yaml.safe_load(yaml.safe_dump(TEXT_DNA))
        data["model"]["encoder"]["experts"] = True
        data["model"].update(model)
        if reverse:
            data["tasks"] = data["tasks"][::-1]
        data["trainer"].update(default_root_dir=str(tmp_path / name), max_steps=2)
        for t in data["tasks"]:
            t["val"] = None
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return load_config(path)

    source_run = pretrain(cfg("source", reverse=False))
    source = read_checkpoint(source_run.last_checkpoint)
    assert source.modality_order == ["text", "dna"]
    target_cfg = cfg("target", reverse=True)
    target_cfg.model.text.tokenizer_path = str(source_run.run_dir / "tokenizer")
    target_cfg.model.init_from = str(source_run.last_checkpoint)
    model = build_run(target_cfg).module.model
    assert list(model.modality_ids) == ["dna", "text"]
    theirs, ours = source.state_dict, model.state_dict()
    for name, j in model.modality_ids.items():
        i = source.modality_order.index(name)
        assert torch.equal(ours["modality_embed.weight"][j], theirs["modality_embed.weight"][i]), name
        assert torch.equal(ours[f"encoder.blocks.1.mlp.experts.{j}.fc1.weight"],
                           theirs[f"encoder.blocks.1.mlp.experts.{i}.fc1.weight"]), name
