"""Downstream input checks and scoring details: F1 by the task's class count, malformed CSV / JSONL,
``--skip_bad`` counting, encodings, ``mmm embed`` tables and partial labels, pair truncation as HF,
probe labels, and the ``stdlib-package`` split hygiene."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmm.cli import main
from mmm.downstream.data import DownstreamDataError, read_raw_inputs, read_table
from tests.downstream.helpers import keyword_rows, write_table

# ----------------------------------------------------------------------------- 1. F1


def test_f1_is_chosen_by_the_task_class_count_and_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    from mmm.downstream.metrics import f1, score_all

    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 30))
        present = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)  # often a class is absent
        gold, pred = rng.choice(present, n), rng.choice(present, n)
        want = f1_score(gold, pred, average="binary" if k == 2 else "macro", zero_division=0)
        assert f1(pred, gold, num_classes=k) == pytest.approx(want), (k, gold, pred)
    # a 3-class split without class 2: still macro F1, not the F1 of class 1
    gold, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    assert f1(pred, gold, 3) == pytest.approx(f1_score(gold, pred, average="macro"))
    assert f1(pred, gold, 3) != pytest.approx(f1_score(gold, pred, average="binary"))
    assert score_all(pred.astype(float), gold, "classification", 3)["f1"] == pytest.approx(f1(pred, gold, 3))
    with pytest.raises(ValueError, match="number of classes"):
        f1(pred, gold)
    with pytest.raises(ValueError, match="not all class ids of a 2-class task"):
        f1(np.array([0, 2]), np.array([0, 1]), 2)


# ----------------------------------------------------------------------------- 2, 3, 10. CSV


def test_unclosed_csv_quote_is_an_error_naming_the_line(tmp_path: Path) -> None:
    rows = [f"w{i} x y,{'ab'[i % 2]}" for i in range(30)]
    rows[5] = 'w5 x y,"a'  # line 7 of the file (the header is line 1)
    bad = tmp_path / "unclosed.csv"
    bad.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    for skip in (False, True):  # row boundaries are lost: never skipped
        with pytest.raises(DownstreamDataError, match=r"line 7\b.*never closed") as e:
            read_table(bad, ["sentence"], "label", skip_bad=skip)
        assert str(bad) in str(e.value)
    # a second stray quote closes it: the label then spans lines, which no label may
    rows[20] = 'w20 x y,b"'
    bad.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DownstreamDataError, match=r"row 7: the label 'label' holds a line break.*stray"):
        read_table(bad, ["sentence"], "label", skip_bad=True)
    # a malformed quote reports the file and line too
    (tmp_path / "m.csv").write_text('sentence,label\nok,a\n"x"y,b\n')
    with pytest.raises(DownstreamDataError, match=r"m\.csv: line 3: malformed CSV"):
        read_table(tmp_path / "m.csv", ["sentence"], "label")


def test_csv_fields_longer_than_the_csv_default_limit(tmp_path: Path) -> None:
    long = "ACGT" * 50_000  # 200000 characters; csv's default limit is 131072
    p = write_table(tmp_path / "long.csv", ["sequence", "label"], [(long, 0), ("ACGT", 1)])
    s = read_table(p, ["sequence"], "label")
    assert s.inputs[0] == long and s.labels == ["0", "1"]


def test_row_numbers_are_file_lines_after_a_multi_line_field(tmp_path: Path) -> None:
    p = tmp_path / "ml.csv"
    p.write_text('sentence,label\n"multi\nline\ntext",a\n"ok",b\n"bad",\n')
    with pytest.raises(DownstreamDataError, match=r"ml\.csv:row 6: field 'label'"):
        read_table(p, ["sentence"], "label")
    s = read_table(p, ["sentence"], "label", skip_bad=True)
    assert s.where == [f"{p}:row 2", f"{p}:row 5"] and s.skipped == [(f"{p}:row 6", "field 'label' (the label) "
                                                                                    "is empty or missing")]


# ----------------------------------------------------------------------------- 5, 11. skip_bad, JSONL values


def test_skip_bad_skips_and_counts_wrong_cell_counts_and_bad_json(tmp_path: Path) -> None:
    tsv = tmp_path / "short.tsv"
    tsv.write_text("sentence\tlabel\na b\tpos\nonly text\nc d\tneg\n")
    with pytest.raises(DownstreamDataError, match=r"short\.tsv: row 3: 1 cell\(s\), the header has 2.*--skip_bad"):
        read_table(tsv, ["sentence"], "label")
    s = read_table(tsv, ["sentence"], "label", skip_bad=True)
    assert s.inputs == ["a b", "c d"] and [w for w, _ in s.skipped] == [f"{tsv}:row 3"]

    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"sentence": "a b", "label": "pos"}\n{"sentence": "x", "label"\n[1, 2]\n'
                  '{"sentence": "c d", "label": "neg"}\n')
    with pytest.raises(DownstreamDataError, match=r"bad\.jsonl:row 2: not valid JSON"):
        read_table(jl, ["sentence"], "label")
    s = read_table(jl, ["sentence"], "label", skip_bad=True)
    assert s.inputs == ["a b", "c d"]
    assert s.skipped == [(f"{jl}:row 2", "not valid JSON (Expecting ':' delimiter)"),
                         (f"{jl}:row 3", "expected a JSON object, got list")]


def test_non_string_jsonl_values_are_named(tmp_path: Path) -> None:
    p = write_table(tmp_path / "d.jsonl", ["sentence", "label"], [("a b", "x"), (5, "y"), ("c", ["z"])])
    with pytest.raises(DownstreamDataError, match=r"row 2: field 'sentence' is 5 \(int\); a string was expected"):
        read_table(p, ["sentence"], "label")
    s = read_table(p, ["sentence"], "label", skip_bad=True)
    assert s.inputs == ["a b"] and [r for _, r in s.skipped] == [
        "field 'sentence' is 5 (int); a string was expected",
        "field 'label' (the label) is ['z'] (list); a string or a number was expected"]


def test_finetune_skip_bad_counts_short_rows_and_bad_json(ckpt: Path, tmp_path: Path, capsys) -> None:
    rows = keyword_rows(16, 0)
    train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows) + "{oops\n")
    argv = ["finetune", str(ckpt), "--train", str(train), "--dev", str(dev), "--text_column", "sentence",
            "--seeds", "1", "--epochs", "1"]
    assert main(argv) == 2 and f"{dev}:row 17: not valid JSON" in capsys.readouterr().err
    assert main(argv + ["--skip_bad"]) == 0
    assert f"skipped 1 bad row(s) (--skip_bad), e.g. {dev}:row 17: not valid JSON" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 6, 7, 8. raw inputs for embed


def test_raw_inputs_bom_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "bom.fa").write_bytes(b"\xef\xbb\xbf>r1 first\nacgt\nAC\n>r2\nGG\n")
    s = read_raw_inputs(tmp_path / "bom.fa", "dna")
    assert s.inputs == ["ACGTAC", "GG"] and s.where == ["bom.fa:r1", "bom.fa:r2"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello world\r\nsecond line\r\n")
    assert read_raw_inputs(tmp_path / "bom.txt", "text").inputs == ["hello world", "second line"]
    (tmp_path / "latin.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DownstreamDataError, match=r"latin\.txt: not UTF-8 text \(byte 8, line 2"):
        read_raw_inputs(tmp_path / "latin.txt", "text")
    (tmp_path / "latin.fa").write_bytes(b"\xef\xbb\xbf>r1\nAC\xff\n")
    with pytest.raises(DownstreamDataError, match=r"latin\.fa: not UTF-8 text \(byte 9, line 2"):
        read_raw_inputs(tmp_path / "latin.fa", "dna")
    (tmp_path / "folder").mkdir()  # --skip_bad: an unreadable file is skipped and listed, the others are read
    (tmp_path / "folder" / "latin.txt").write_bytes(b"fine\ncaf\xe9\n")
    (tmp_path / "folder" / "ok.txt").write_text("kept\n")
    s = read_raw_inputs(tmp_path / "folder", "text", skip_bad=True)
    assert s.inputs == ["kept"] and s.where == ["ok.txt:row1"]
    assert [w for w, _ in s.skipped] == ["latin.txt"] and "not UTF-8 text (byte 8, line 2" in s.skipped[0][1]
    (tmp_path / "folder" / "latin.tsv").write_bytes(b"sentence\nfine\ncaf\xe9\n")  # a table too
    s = read_raw_inputs(tmp_path / "folder", "text", text_column="sentence", skip_bad=True)
    assert s.inputs == ["kept"] and [w for w, _ in s.skipped] == ["latin.tsv", "latin.txt"]
    with pytest.raises(DownstreamDataError, match=r"latin\.tsv: not UTF-8 text"):
        read_raw_inputs(tmp_path / "folder", "text", text_column="sentence")


def test_embed_input_folder_with_tables_needs_text_column(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one line\n")
    write_table(tmp_path / "in" / "b.tsv", ["sentence", "label"], [("from a table", "x")])
    with pytest.raises(DownstreamDataError, match=r"1 table file\(s\) \['b\.tsv'\] need --text_column"):
        read_raw_inputs(tmp_path / "in", "text")
    s = read_raw_inputs(tmp_path / "in", "text", text_column="sentence")
    assert s.inputs == ["one line", "from a table"] and s.where == ["a.txt:row1", "b.tsv:row2"]


def test_embed_skip_bad_skips_and_counts_what_the_error_names(ckpt: Path, tmp_path: Path, capsys) -> None:
    """The error told the user to pass --skip_bad, which mmm embed did not take ("unexpected arguments")."""
    table = write_table(tmp_path / "t.tsv", ["sentence", "label"], [("hello world", "1"), ("", "0"), ("foo", "0")])
    argv = ["embed", str(ckpt), str(table), str(tmp_path / "out"), "--modality", "text", "--text_column", "sentence"]
    assert main(argv) == 2
    assert "row 3: field 'sentence' is empty or missing (pass --skip_bad" in capsys.readouterr().err
    assert main(argv + ["--skip_bad"]) == 0
    assert "skipped 1 bad input(s) (--skip_bad), e.g. " in capsys.readouterr().out
    assert (tmp_path / "out" / "keys.txt").read_text().split() == ["t.tsv:row2", "t.tsv:row4"]
    info = json.loads((tmp_path / "out" / "embed.json").read_text())
    assert info["samples"] == 2 and info["skipped"] == 1 and np.load(tmp_path / "out" / "features.npy").shape[0] == 2
    (tmp_path / "in").mkdir()  # raw files: an undecodable image, a FASTA record without a sequence
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "in" / "ok.fa").write_text(">r1\nACGT\n>r2\n>r3\nGG\n")
    with pytest.raises(DownstreamDataError, match=r"record 'r2' has no sequence \(pass --skip_bad"):
        read_raw_inputs(tmp_path / "in", "dna")
    dna = read_raw_inputs(tmp_path / "in", "dna", skip_bad=True)
    assert dna.inputs == ["ACGT", "GG"] and dna.skipped == [("ok.fa:r2", "the record has no sequence")]
    import gzip  # gzipped and .fas FASTA read as the DNA shard builder reads them; a bare '>' is named
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "g.fa.gz").write_bytes(gzip.compress(b">z1\nACGTAC\n"))
    (tmp_path / "gz" / "h.fas").write_text(">h1\nTTTT\n")
    got = read_raw_inputs(tmp_path / "gz", "dna")
    assert got.inputs == ["ACGTAC", "TTTT"] and got.where == ["g.fa.gz:z1", "h.fas:h1"]
    (tmp_path / "gz" / "bare.fa").write_text(">r1\nAC\n>\nGG\n")
    with pytest.raises(DownstreamDataError, match=r"bare\.fa: line 3: a '>' header without a record name"):
        read_raw_inputs(tmp_path / "gz", "dna")
    with pytest.raises(ValueError):
        read_raw_inputs(tmp_path / "in", "image")
    with pytest.raises(DownstreamDataError, match="no image inputs found"):
        read_raw_inputs(tmp_path / "in", "image", skip_bad=True)  # skipped and counted, then nothing is left


# ----------------------------------------------------------------------------- 9. embed with partial labels


def _text_shard(path: Path, samples) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, text, meta in samples:
            for ext, data in (("txt", text.encode()), ("json", json.dumps(meta).encode() if meta is not None else None)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_embed_keeps_labels_when_some_samples_have_none(ckpt: Path, tmp_path: Path, capsys) -> None:
    from mmm.downstream.embed import label_array

    shard = _text_shard(tmp_path / "train-000000.tar", [("k0", "first text", {"label": 1}),
                                                        ("k1", "second text", {}), ("k2", "third", {"label": 0})])
    out = tmp_path / "emb"
    assert main(["embed", str(ckpt), str(shard), str(out), "--modality", "text"]) == 0
    assert "1 of 3 sample(s) carry no label" in capsys.readouterr().out
    assert np.load(out / "labels.npy").tolist() == [1, -1, 0]
    info = json.loads((out / "embed.json").read_text())
    assert info["labels"] is True and info["unlabelled"] == 1
    assert label_array([None, None])[0] is None and label_array([True, -2, 3])[0].tolist() == [-1, -1, 3]


# ----------------------------------------------------------------------------- 4. pair truncation


def test_longest_first_split_of_a_pair() -> None:
    from mmm.downstream.inputs import longest_first

    assert longest_first([10, 80], 61) == [10, 51] and longest_first([80, 10], 61) == [51, 10]  # short one kept
    assert longest_first([39, 35], 61) == [31, 30]  # both cut: the longer keeps the odd token
    assert longest_first([39, 43], 61) == [30, 31]
    assert longest_first([40, 40], 61) == [30, 31]  # a tie: the second keeps it
    assert longest_first([40, 40], 60) == [30, 30] and longest_first([5, 6], 20) == [5, 6]
    assert longest_first([70], 61) == [61]


def test_pair_truncation_matches_the_hf_tokenizer_of_the_export(ckpt: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from mmm.downstream.inputs import load_adapter
    from mmm.interop.hf import export_hf_bert

    adapter = load_adapter(str(ckpt), "text")
    export_hf_bert(adapter.encoder, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    words_a = ("the quick brown fox jumps over the lazy dog " * 10).split()
    words_b = ("import os and sys then print the result " * 10).split()
    cases = [(" ".join(words_a[:i]), " ".join(words_b[:j])) for i in range(4, 60, 5) for j in range(4, 60, 7)]
    cases += [(" ".join(words_a[:i]),) * 2 for i in range(10, 60, 9)]  # equal lengths
    cut = 0
    for a, b in cases:
        want = tok(a, b, truncation="longest_first", max_length=adapter.max_len)["input_ids"]
        cut += len(tok(a, b)["input_ids"]) > adapter.max_len
        assert adapter.prepare((a, b)).tolist() == want, (a, b)
    assert cut > 20  # most cases were cut, ties and both orders among them


# ----------------------------------------------------------------------------- 12. probe labels


def test_knn_and_linear_probe_take_integral_float_labels_and_refuse_others() -> None:
    from mmm.downstream.knn import knn_probe
    from mmm.probe import linear_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    xt, yt = rng.normal(size=(20, 8)).astype(np.float32), np.arange(20) % 3
    assert knn_probe((x, y.astype(float)), (xt, yt.astype(float))) == knn_probe((x, y), (xt, yt))
    assert linear_probe((x, y.astype(float)), (xt, yt.astype(np.float32))) == linear_probe((x, y), (xt, yt))
    for bad, message in ((0.5, r"training labels\[0\] is 0.5"), (np.nan, "integer class ids"),
                         (-1.0, "non-negative")):
        yb = y.astype(float)
        yb[0] = bad
        for probe in (knn_probe, linear_probe):
            with pytest.raises(ValueError, match=message):
                probe((x, yb), (xt, yt))
    with pytest.raises(ValueError, match="test labels must be integer class ids, got dtype <U1"):
        knn_probe((x, y), (xt, np.array(["a"] * 20)))


# ----------------------------------------------------------------------------- 13. stdlib-package hygiene


def test_stdlib_package_drops_held_out_texts_seen_in_training(tmp_path: Path) -> None:
    from mmm.downstream.tasks import stdlib_package_task

    shared = "This docstring is shared word for word by every module of the package here."
    for pkg in ("json", "email"):
        (tmp_path / pkg).mkdir()
        for m in range(6):
            funcs = "".join(f'def f{i}():\n    """{pkg} module {m} function {i} has a docstring long enough."""\n\n'
                            for i in range(6))
            name = "__init__" if m == 0 else f"mod{m}"
            (tmp_path / pkg / f"{name}.py").write_text(f'"""{shared}"""\n\n{funcs}')
    s = stdlib_package_task(None, None, stdlib=tmp_path)
    assert shared in s["train"].inputs
    for split in ("dev", "test"):
        assert s[split].inputs and shared not in s[split].inputs
    real = stdlib_package_task()  # this Python's standard library
    train = set(real["train"].inputs)
    assert not any(t in train for split in ("dev", "test") for t in real[split].inputs)


@pytest.mark.parametrize("flag, value, wanted", [
    ("batch_size", "0", "an integer >= 1"), ("batch_size", "-4", "an integer >= 1"), ("epochs", "0", "an integer >= 1"),
    ("max_steps", "0", r"an integer >= 1 \(or left out\)"), ("eval_every", "-1", r"an integer >= 1 \(or left out\)"),
    ("patience", "0", "an integer >= 1"), ("warmup", "5", r"a fraction of the planned steps in \[0, 1\)"),
    ("lr", "0", "a number > 0"), ("seeds", "0", "an integer >= 1"), ("seed", "-1", "an integer >= 0"),
    ("dropout", "1.5", r"in \[0, 1\) \(or left out\)"),
])
def test_finetune_refuses_settings_that_would_train_nothing_or_not_what_they_say(
        ckpt: Path, tmp_path: Path, capsys, flag, value, wanted) -> None:
    """--epochs 0 or --batch_size -4 trained 0 steps and still reported a dev score and wrote 'best' checkpoints;
    --batch_size 0 was a bare ZeroDivisionError; --warmup 5 kept the rate under a fifth of --lr."""
    rows = keyword_rows(16, 0)
    train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows)
    argv = ["finetune", str(ckpt), "--train", str(train), "--dev", str(train), "--text_column", "sentence",
            "--out", str(tmp_path / "out"), f"--{flag}", value]
    assert main(argv) == 2
    assert f"--{flag} " in capsys.readouterr().err
    from mmm.downstream.finetune import FinetuneConfig

    field = {"seed": "first_seed"}.get(flag, flag)
    with pytest.raises(ValueError, match=rf"--{flag} \(FinetuneConfig.{field}\) must be {wanted}, got"):
        FinetuneConfig(**{field: float(value) if flag in ("warmup", "lr", "dropout") else int(value)})
    assert not (tmp_path / "out").exists()


def test_jsonl_number_labels_are_one_class_by_value_string_labels_by_their_text(tmp_path: Path) -> None:
    """JSON 1 in train and 1.0 in dev were two classes ("label 1.0 never occurs in the training split")."""
    from mmm.downstream.data import Labels, encode_labels

    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text('{"s": "a b", "label": 1}\n{"s": "c d", "label": 0}\n')
    dev.write_text('{"s": "a b", "label": 1.0}\n{"s": "c d", "label": 0.0}\n')
    tr, dv = read_table(train, ["s"], "label"), read_table(dev, ["s"], "label")
    labels = Labels.fit(tr, "classification")
    assert labels.names == ["0", "1"] and encode_labels(dv, labels) == [1, 0]
    text = tmp_path / "dev.tsv"
    text.write_text("s\tlabel\na b\t1.0\n")  # a table's "1.0" is text, not the number 1
    with pytest.raises(DownstreamDataError, match=r"label '1.0' never occurs in the training split"):
        encode_labels(read_table(text, ["s"], "label"), labels)


def test_embed_refuses_a_batch_size_below_one(ckpt: Path, tmp_path: Path, capsys) -> None:
    """It was a bare 'range() arg 3 must not be zero'."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world\n")
    assert main(["embed", str(ckpt), str(tmp_path / "in"), str(tmp_path / "out"), "--modality", "text",
                 "--batch_size", "0"]) == 2
    assert "--batch_size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_check_inputs_hook_that_returns_a_new_split_is_used_by_embed_and_finetune_readers(tmp_path: Path,
                                                                                             monkeypatch) -> None:
    from mmm.downstream.data import Split, load_split
    from mmm.modalities.text.downstream import TextInputs
    from mmm.modalities.text.modality import TextModality

    class NoBaz(TextInputs):
        @classmethod
        def check_inputs(cls, split, skip_bad):
            keep = [i for i, x in enumerate(split.inputs) if x != "baz"]
            return Split(split.path, [split.inputs[i] for i in keep], [split.labels[i] for i in keep],
                         [split.where[i] for i in keep], split.skipped)

    monkeypatch.setattr(TextModality, "downstream_inputs", classmethod(lambda cls: NoBaz))
    write_table(tmp_path / "t.tsv", ["sentence", "label"], [("foo bar", "1"), ("baz", "0")])
    assert read_raw_inputs(tmp_path / "t.tsv", "text", text_column="sentence").inputs == ["foo bar"]
    assert load_split(tmp_path / "t.tsv", "text", columns=["sentence"]).inputs == ["foo bar"]


def test_a_dna_table_whose_every_row_is_skipped_is_named(tmp_path: Path) -> None:
    """The DNA alphabet check ran after the table's 'no rows' check: an emptied split reached fine-tuning (a test
    split was then silently dropped, a dev split failed with numpy's 'need at least one array')."""
    from mmm.downstream.data import load_split

    write_table(tmp_path / "bad.csv", ["sequence", "label"], [("AC-T", "0"), ("GGU", "1")])
    with pytest.raises(DownstreamDataError, match=r"bad.csv: no usable rows \(2 skipped, e.g. .*row 2: invalid DNA "
                                                  r"character '-' at position 2\)"):
        load_split(tmp_path / "bad.csv", "dna", columns=["sequence"], skip_bad=True)
