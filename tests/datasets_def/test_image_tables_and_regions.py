"""Image and image-text builds: captions/labels tables (extra fields, encodings, bad rows with skip_bad),
region files shared by two images, and flat folders built from the CLI."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from datasets_def import image as image_def
from datasets_def import image_text as it
from mmm.cli import main


def images(root: Path, names: List[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (10 * i, 20, 30)).save(root / name)
    return root


def metas(out: Path) -> Dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    found[meta["source"]] = meta
    return found


def skipped(out: Path) -> List[List[str]]:
    return json.loads((out / "manifest.json").read_text())["skipped"]


# -- an unquoted comma: extra fields are a bad row, never silently dropped


@pytest.mark.parametrize("kind", ["image_text", "image"])
def test_an_extra_csv_field_is_a_bad_row_naming_line_and_counts(tmp_path: Path, kind: str) -> None:
    src = images(tmp_path / "in", ["x.png", "y.png"])
    caps = tmp_path / "caps.csv"
    caps.write_text('path,caption\nx.png,a red, round ball\ny.png,"a blue, square box"\n')
    build = it.build_shards if kind == "image_text" else image_def.build_shards
    with pytest.raises(image_def.ImageBuildError) as err:
        build(src, tmp_path / "out", captions=caps)
    msg = str(err.value)
    assert f"{caps}:2: found 3 fields, expected 2" in msg and "' round ball'" in msg and "quote" in msg
    report = build(src, tmp_path / "out", captions=caps, skip_bad=True)
    assert [w for w, _ in report.skipped][:1] == [f"{caps}:2"]
    assert skipped(tmp_path / "out")[0][0] == f"{caps}:2"
    got = metas(tmp_path / "out")
    assert (got["y.png"]["captions"] if kind == "image_text" else [got["y.png"]["caption"]]) == ["a blue, square box"]
    if kind == "image":  # x.png is kept, with no caption rather than a cut one
        assert got["x.png"]["caption"] is None
    else:  # x.png has no caption left: skipped and listed too
        assert "x.png" not in got and ("x.png" in dict(report.skipped))


def test_an_extra_field_in_a_labels_csv_is_named(tmp_path: Path) -> None:
    src = images(tmp_path / "in", ["x.png", "y.png"])
    (tmp_path / "labels.csv").write_text("path,label\nx.png,cat,dog\ny.png,dog\n")
    with pytest.raises(image_def.ImageBuildError, match=r"labels.csv:2: found 3 fields, expected 2"):
        image_def.build_shards(src, tmp_path / "out", labels=tmp_path / "labels.csv")


# -- a table that is not UTF-8 is named with its line and byte offset


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_latin1_captions_file_is_named_with_line_and_offset(tmp_path: Path, suffix: str) -> None:
    src = images(tmp_path / "in", ["x.png", "y.png"])
    caps = tmp_path / f"caps{suffix}"
    text = ("path,caption\ny.png,ok\nx.png,café\n" if suffix == ".csv"
            else '{"path": "y.png", "caption": "ok"}\n{"path": "x.png", "caption": "café"}\n')
    caps.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    for build, error in [(it.build_shards, it.ImageTextBuildError), (image_def.build_shards, image_def.ImageBuildError)]:
        with pytest.raises(error, match=rf"caps{suffix}:\d: the captions file is not UTF-8: byte b'\\xe9' at byte "
                                        rf"offset {offset}") as err:
            build(src, tmp_path / "out", captions=caps)
        assert str(err.value).startswith(f"{caps}:{2 if suffix == '.jsonl' else 3}:")


def test_utf16_and_latin1_labels_files_are_named(tmp_path: Path) -> None:
    src = images(tmp_path / "in", ["x.png"])
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\nx.png,ok\n", encoding="utf-16")
    with pytest.raises(it.ImageTextBuildError, match=r"caps.csv: the captions file is UTF-16"):
        it.build_shards(src, tmp_path / "out", captions=caps)
    caps.write_text("path,caption\nx.png,ok\n", encoding="utf-16-le")  # no byte-order mark
    with pytest.raises(it.ImageTextBuildError, match=r"caps.csv: the CSV header holds NUL bytes, so the file looks UTF-16"):
        it.build_shards(src, tmp_path / "out", captions=caps)
    labels = tmp_path / "labels.csv"
    labels.write_bytes("path,label\nx.png,café\n".encode("latin-1"))
    with pytest.raises(image_def.ImageBuildError, match=r"labels.csv:2: the labels file is not UTF-8"):
        image_def.build_shards(src, tmp_path / "out", labels=labels)


# -- bad table rows go through the skipper


def test_bad_rows_of_an_image_captions_or_labels_table_are_skipped_with_skip_bad(tmp_path: Path) -> None:
    src = images(tmp_path / "in", ["x.png", "y.png"])
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\nx.png,\ny.png,ok\n")
    with pytest.raises(image_def.ImageBuildError, match=r"caps.csv:2: missing or empty 'caption' for 'x.png'.*skip_bad"):
        image_def.build_shards(src, tmp_path / "out", captions=caps)
    report = image_def.build_shards(src, tmp_path / "out", captions=caps, skip_bad=True)
    assert report.skipped == [(f"{caps}:2", "missing or empty 'caption' for 'x.png'")]
    assert skipped(tmp_path / "out") == [[f"{caps}:2", "missing or empty 'caption' for 'x.png'"]]
    assert metas(tmp_path / "out")["y.png"]["caption"] == "ok" and report.total_samples == 2
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"path": "x.png", "label": "cat"}\n{"path": "x.png", "label": "dog"}\n{"path": "y.png", '
                      '"label": "dog"}\nnot json\n')
    report = image_def.build_shards(src, tmp_path / "out2", labels=labels, skip_bad=True)
    assert [w for w, _ in report.skipped] == [f"{labels}:2", f"{labels}:4"] and report.total_samples == 2


def test_jsonl_with_neither_or_both_caption_fields_is_skipped_with_skip_bad(tmp_path: Path) -> None:
    src = images(tmp_path / "in", ["x.png", "y.png", "z.png"])
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"path": "x.png", "caption": "a", "captions": ["b"]}\n{"path": "y.png"}\n'
                    '{"path": "z.png", "captions": ["ok"]}\n{"path": "z.png", "captions": "not a list"}\n')
    with pytest.raises(it.ImageTextBuildError, match=r"caps.jsonl:1: expected a JSON object with 'path' and one of"):
        it.build_shards(src, tmp_path / "out", captions=caps)
    report = it.build_shards(src, tmp_path / "out", captions=caps, skip_bad=True)
    where = [w for w, _ in report.skipped]
    assert where[:3] == [f"{caps}:1", f"{caps}:2", f"{caps}:4"] and {"x.png", "y.png"} <= set(where)
    assert "must be a list" in report.skipped[2][1]
    assert list(metas(tmp_path / "out")) == ["z.png"] and len(skipped(tmp_path / "out")) == 5


# -- two images, one region file


def test_two_images_mapping_to_one_region_file_are_bad_input_naming_both(tmp_path: Path) -> None:
    src = images(tmp_path / "in", ["x.jpg", "x.png", "y.png"])
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\nx.jpg,a jpg\nx.png,a png\ny.png,why\n")
    regions = tmp_path / "regions"
    regions.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("x", "y"):
        np.savez(regions / f"{stem}.npz", features=rng.standard_normal((2, 4)).astype(np.float32),
                 boxes=np.array([[0, 0, 4, 4], [1, 1, 8, 6]], np.float32))
    with pytest.raises(it.ImageTextBuildError) as err:
        it.build_shards(src, tmp_path / "out", captions=caps, regions=regions)
    assert "x.jpg" in str(err.value) and "'x.png'" in str(err.value) and "x.npz" in str(err.value)
    report = it.build_shards(src, tmp_path / "out", captions=caps, regions=regions, skip_bad=True)
    assert sorted(w for w, _ in report.skipped) == ["x.jpg", "x.png"]
    assert list(metas(tmp_path / "out")) == ["y.png"] and len(skipped(tmp_path / "out")) == 2


# -- a flat image folder from the CLI; --labels none


def test_cli_builds_a_flat_folder_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = images(tmp_path / "flat", ["a.png", "b.png", "c.png"])
    assert main(["shards", "build", str(src), str(tmp_path / "out"), "--dataset", "image"]) == 0
    got = metas(tmp_path / "out")
    assert sorted(got) == ["a.png", "b.png", "c.png"] and all(m["label"] is None for m in got.values())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["label_names"] is None
    assert main(["shards", "build", str(src), str(tmp_path / "out2"), "--dataset", "image", "--labels", "none"]) == 0
    assert len(metas(tmp_path / "out2")) == 3


def test_cli_labels_none_on_class_folders_and_a_mixed_folder_still_an_error(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    src = images(tmp_path / "tree", ["cat/a.png", "dog/b.png"])
    assert main(["shards", "build", str(src), str(tmp_path / "out"), "--dataset", "image", "--labels", "None"]) == 0
    assert all(m["label"] is None and m["label_name"] is None for m in metas(tmp_path / "out").values())
    assert main(["shards", "build", str(src), str(tmp_path / "out2"), "--dataset", "image"]) == 0
    assert {m["label_name"] for m in metas(tmp_path / "out2").values()} == {"cat", "dog"}
    images(src, ["loose.png"])
    capsys.readouterr()
    assert main(["shards", "build", str(src), str(tmp_path / "out3"), "--dataset", "image"]) == 2
    assert "loose.png: not inside a class folder" in capsys.readouterr().err
