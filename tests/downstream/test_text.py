"""``mmm embed`` and ``mmm finetune`` on a tiny text encoder (a real 3-step pretraining checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.cli import main
from mmm.encoders import load_encoder, save_encoder
from tests.downstream.helpers import check_cls_last_block, keyword_rows, write_table

LINES = ["Return the list of values.", "Raise an error when the file is missing.", "A short docstring.",
         "The quick brown fox returns a string.", "Open the socket and read bytes from it."]


@pytest.fixture(scope="module")
def saved(ckpt: Path, tmp_path_factory) -> Path:
    return save_encoder(load_encoder(ckpt), tmp_path_factory.mktemp("enc") / "text")


def test_embed_text_file_matches_the_encoder(saved: Path, ckpt: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES[:2]) + "\n\n" + "\n".join(LINES[2:]) + "\n")
    assert main(["embed", str(saved), str(src), str(tmp_path / "out"), "--modality", "text", "--pooling", "cls",
                 "--batch_size", "2"]) == 0
    feats = np.load(tmp_path / "out" / "features.npy")
    keys = (tmp_path / "out" / "keys.txt").read_text().splitlines()
    assert feats.shape == (5, 64) and keys == ["in.txt:row1", "in.txt:row2", "in.txt:row4", "in.txt:row5", "in.txt:row6"]
    enc = load_encoder(ckpt)
    batch = enc.tokenizer.pad_batch(LINES, max_len=64)
    with torch.no_grad():
        ref = enc(batch["input_ids"], batch["attention_mask"])[:, 0]
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)
    assert json.loads((tmp_path / "out" / "embed.json").read_text())["pooling"] == "cls"
    assert "embedded 5 input(s)" in capsys.readouterr().out


def test_embed_mean_pooling_to_safetensors(ckpt: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    table = write_table(tmp_path / "t.jsonl", ["text"], [[s] for s in LINES])
    out = tmp_path / "f.safetensors"
    assert main(["embed", str(ckpt), str(table), str(out), "--modality", "text", "--text_column", "text"]) == 0
    with safe_open(str(out), "pt") as f:
        feats = f.get_tensor("features")
        keys = json.loads(f.metadata()["keys"])
    enc = load_encoder(ckpt)
    batch = enc.tokenizer.pad_batch(LINES, max_len=64)
    with torch.no_grad():
        h = enc(batch["input_ids"], batch["attention_mask"])
    m = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(feats, (h * m).sum(1) / m.sum(1), atol=1e-5, rtol=0)
    assert keys[0] == "t.jsonl:row1" and len(keys) == 5


def test_embed_refuses_wrong_modality(ckpt: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("x\n")
    assert main(["embed", str(ckpt), str(tmp_path / "a.txt"), str(tmp_path / "o"), "--modality", "image"]) == 2
    assert "no 'image' embedder" in capsys.readouterr().err


def _task(tmp_path: Path, suffix: str = ".tsv"):
    train = write_table(tmp_path / f"train{suffix}", ["sentence", "label"], keyword_rows(96, 0))
    dev = write_table(tmp_path / f"dev{suffix}", ["sentence", "label"], keyword_rows(40, 1))
    return train, dev


def test_finetune_text_classification_learns_and_keeps_the_best(saved: Path, tmp_path: Path, capsys) -> None:
    train, dev = _task(tmp_path)
    out = tmp_path / "ft"
    assert main(["finetune", str(saved), "--train", str(train), "--dev", str(dev), "--test", str(dev),
                 "--text_column", "sentence", "--seeds", "2", "--epochs", "6", "--lr", "1e-3", "--batch_size", "16",
                 "--metric", "matthews", "--out", str(out)]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["metric"] == "matthews" and len(res["seeds"]) == 2 and res["labels"]["names"] == ["neg", "pos"]
    assert res["dev"]["mean"] > 0.8, res["dev"]  # keyword classes are easy to separate
    assert res["dev"]["std"] >= 0 and res["dev"]["n"] == 2
    for s in res["seeds"]:
        assert s["test"]["matthews"] == pytest.approx(s["dev"]["matthews"])  # test = dev file, best state restored
    # the kept checkpoint reloads and reproduces the dev score
    from mmm.downstream.data import Labels, encode_labels, read_table
    from mmm.downstream.finetune import ClassificationHead, FinetuneModel, predict
    from mmm.downstream.inputs import load_adapter
    from mmm.downstream.metrics import matthews
    from safetensors.torch import load_file

    best = res["seeds"][0]
    adapter = load_adapter(best["checkpoint"], "text")
    head = ClassificationHead(64, 2)
    head.load_state_dict(load_file(str(Path(best["checkpoint"]) / "head.safetensors")))
    model = FinetuneModel(adapter, head, "cls")
    d = read_table(dev, ["sentence"], "label")
    gold = encode_labels(d, Labels("classification", ["neg", "pos"]))
    pred = predict(model, [adapter.prepare(x) for x in d.inputs], "classification", 64)
    assert matthews(pred, np.asarray(gold)) == pytest.approx(best["dev"]["matthews"])
    assert "dev matthews:" in capsys.readouterr().out


def test_finetune_regression_on_pairs(saved: Path, tmp_path: Path) -> None:
    from mmm.downstream.data import read_table
    from mmm.downstream.finetune import FinetuneConfig, finetune

    rows = keyword_rows(64, 2)
    partners = [rows[(i + (2 if i % 3 == 0 else 1)) % len(rows)] for i in range(len(rows))]  # same or other label
    pairs = [(a, b, f"{(la == 'pos') + (lb == 'pos'):.1f}") for (a, la), (b, lb) in zip(rows, partners)]
    assert len({p[2] for p in pairs[48:]}) > 1  # the targets vary (they were all 1.0: nothing to correlate with)
    train = write_table(tmp_path / "tr.csv", ["s1", "s2", "score"], pairs[:48])
    dev = write_table(tmp_path / "dv.csv", ["s1", "s2", "score"], pairs[48:])
    cfg = FinetuneConfig(task_type="regression", metric="spearman", lr=1e-3, batch_size=16, epochs=2, seeds=1)
    res = finetune(saved, "text", read_table(train, ["s1", "s2"], "score"), read_table(dev, ["s1", "s2"], "score"),
                   cfg=cfg, log=lambda s: None)
    assert res.metric == "spearman" and set(res.seeds[0].dev) == {"pearson", "spearman"}
    assert np.isfinite(res.dev["mean"]) and res.seeds[0].steps == 6


@pytest.mark.parametrize("case, message", [
    ("missing_column", "no column(s) ['sentence']"),
    ("unseen_label", "label 'maybe' never occurs in the training split"),
    ("empty", "the file is empty"),
    ("single_class", "single class"),
    ("not_numeric", "regression target 'high' is not a number"),
    ("empty_cell", "field 'sentence' is empty"),
])
def test_finetune_bad_input_names_file_row_field(saved: Path, tmp_path: Path, capsys, case: str, message: str) -> None:
    rows = keyword_rows(8, 0)
    train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows)
    dev = write_table(tmp_path / "dev.tsv", ["sentence", "label"], rows)
    extra = []
    if case == "missing_column":
        train = write_table(tmp_path / "train.tsv", ["text", "label"], rows)
    elif case == "unseen_label":
        dev = write_table(tmp_path / "dev.tsv", ["sentence", "label"], rows[:3] + [("some words", "maybe")])
    elif case == "empty":
        dev.write_text("")
    elif case == "single_class":
        train = write_table(tmp_path / "train.tsv", ["sentence", "label"], [(s, "pos") for s, _ in rows])
    elif case == "not_numeric":
        train = write_table(tmp_path / "train.tsv", ["sentence", "label"], [(rows[0][0], "0.5"), (rows[1][0], "high")])
        extra = ["--task_type", "regression"]
    elif case == "empty_cell":
        train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows[:2] + [("", "pos")])
    rc = main(["finetune", str(saved), "--train", str(train), "--dev", str(dev), "--text_column", "sentence",
               "--seeds", "1", "--epochs", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    bad_file = {"unseen_label": dev, "empty": dev}.get(case, train)
    assert str(bad_file) in err
    if case in ("unseen_label", "not_numeric", "empty_cell"):
        assert ":row " in err


def test_finetune_skip_bad_counts_rows(saved: Path, tmp_path: Path, capsys) -> None:
    rows = keyword_rows(16, 0)
    train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows + [("", "pos"), ("x y", "")])
    assert main(["finetune", str(saved), "--train", str(train), "--dev", str(train), "--text_column", "sentence",
                 "--seeds", "1", "--epochs", "1", "--skip_bad"]) == 0
    assert "skipped 4 bad row(s)" in capsys.readouterr().out  # 2 rows, read as train and as dev


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_pooling_equals_the_padded_encoder(ckpt: Path, pooling: str) -> None:
    from mmm.downstream.inputs import load_adapter, pool_padded

    adapter = load_adapter(str(ckpt), "text")
    items = [adapter.prepare(x) for x in LINES] + [adapter.prepare(("A pair's first text.", LINES[3]))]
    with torch.no_grad():
        hidden, mask = adapter.forward(items)  # the padded path: TextEncoder on a (B, T) batch
        ref = pool_padded(hidden, mask, pooling)
        got = adapter.pooled(items, pooling)
        flat, seq = adapter.encode_packed(items)
    assert flat.shape == (sum(len(x) for x in items), 64) and seq.seqlens == [len(x) for x in items]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_cls_pooling_runs_the_last_block_for_cls_alone_with_the_same_logits_and_gradients(ckpt: Path) -> None:
    """``cls_last_block`` (MosaicBERT's final-layer subset) changes no number: logits and every gradient
    of a fine-tuning step equal those of the whole last block; only [CLS] rows reach the last MLP."""
    from mmm.downstream.finetune import ClassificationHead, FinetuneModel
    from mmm.downstream.inputs import load_adapter

    adapter = load_adapter(str(ckpt), "text")
    items = [adapter.prepare(x) for x in LINES] + [adapter.prepare(("A pair's first text.", LINES[3]))]
    torch.manual_seed(0)
    model = FinetuneModel(adapter, ClassificationHead(64, 3, 0.0), "cls").train()
    rows_seen = check_cls_last_block(model, model.encoder.encoder.blocks[-1].mlp, items)
    assert rows_seen == [len(items), sum(len(x) for x in items)]
