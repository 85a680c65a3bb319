"""Multi-task runs: task sampling, config checks, one shared encoder over text + DNA, exact resume."""
import csv
import hashlib
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
    (lambda d: d["tasks"][0].update(objectives=["nope"]), "not heads of this run"),
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
