"""Tests for the image dataset definition: folder builds, bad files, labels/captions, embedded sets."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from datasets_def import image as imagedef
from datasets_def.image import (
    COLORS,
    HELD_OUT_COMBOS,
    SHAPES,
    ImageBuildError,
    ImageDatasetDef,
    build_shards,
    check_sample,
    embedded_default,
    embedded_default_digits,
    iter_images,
    shape_caption,
)
from mmm.registry import DATASETS


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_folder(root: Path) -> Dict[str, bytes]:
    """cat/ and dog/ class folders: RGB jpg, grey png, 16-bit png, webp, bmp, one corrupt jpg, one text file."""
    files = {
        "cat/a.jpg": encode(noise(20, 30, 0), "JPEG"),
        "cat/grey.png": encode(Image.new("L", (16, 12), 90), "PNG"),
        "cat/deep/sixteen.png": encode(Image.fromarray(np.full((10, 14), 40000, np.uint16)), "PNG"),
        "dog/b.webp": encode(noise(18, 18, 1), "WEBP"),
        "dog/c.bmp": encode(noise(9, 11, 2), "BMP"),
        "dog/d.PNG": encode(noise(8, 8, 3), "PNG"),
        "dog/bad.jpg": encode(noise(20, 20, 4), "JPEG")[:200],  # truncated
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    return files


def read_samples(shard_dir: Path, split: str) -> List[Dict[str, bytes]]:
    """Raw samples of one split, grouped by key, with no decoding."""
    samples: List[Dict[str, bytes]] = []
    for shard in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture
def folder(tmp_path: Path) -> Tuple[Path, Dict[str, bytes]]:
    root = tmp_path / "images"
    return root, write_folder(root)


def test_registered_definition() -> None:
    ds = DATASETS.create("image")
    assert isinstance(ds, ImageDatasetDef) and ds.name == "image"
    assert ds.fields == ("json",) and ds.image_fields == ("jpg", "png", "webp")


def test_corrupt_file_stops_the_build_naming_it(folder, tmp_path: Path) -> None:
    root, _ = folder
    out = tmp_path / "shards"
    with pytest.raises(ImageBuildError, match=r"dog/bad\.jpg: .*(?i:truncated).*skip_bad=True"):
        build_shards(root, out)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()


def test_skip_bad_builds_labels_and_keeps_original_bytes(folder, tmp_path: Path) -> None:
    root, files = folder
    out = tmp_path / "shards"
    report = build_shards(root, out, skip_bad=True, samples_per_shard=4)
    assert report.skipped and report.skipped[0][0] == "dog/bad.jpg"
    assert report.samples == {"train": 6, "val": 0} and report.files == 7 and report.ignored == 1
    assert report.label_names == ["cat", "dog"] and report.reencoded == 1
    assert report.shards["train"] == ["train-000000.tar", "train-000001.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"][0][0] == "dog/bad.jpg" and manifest["label_names"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["samples"] == 6 and manifest["splits"]["train"]["per_label"] == {"cat": 3, "dog": 3}

    samples = read_samples(out, "train")
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert set(by_source) == set(files) - {"dog/bad.jpg"}
    for rel, s in by_source.items():
        meta = json.loads(s["json"])
        assert check_sample(s) is None, (rel, check_sample(s))
        assert meta["label"] == (0 if rel.startswith("cat/") else 1) and meta["label_name"] == rel.split("/")[0]
        assert meta["caption"] is None
        ext = {"a.jpg": "jpg", "b.webp": "webp"}.get(rel.rsplit("/", 1)[1], "png")
        assert [f for f in ("jpg", "png", "webp") if f in s] == [ext]
        if rel != "dog/c.bmp":
            assert s[ext] == files[rel] and meta["reencoded_from"] is None  # original encoding kept
    bmp = json.loads(by_source["dog/c.bmp"]["json"])
    assert bmp["reencoded_from"] == "BMP" and (bmp["width"], bmp["height"]) == (11, 9)
    assert [s["__key__"] for s in samples] != sorted(s["__key__"] for s in samples)  # written shuffled

    decoded = {meta["source"]: (img, meta) for img, meta in iter_images(out, "train")}
    img, meta = decoded["cat/deep/sixteen.png"]
    assert img.mode == "RGB" and img.size == (14, 10) == (meta["width"], meta["height"])
    assert img.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255, not clipped
    assert decoded["cat/grey.png"][0].getpixel((3, 3)) == (90, 90, 90)


def test_shards_read_through_the_stream_pipeline(folder, tmp_path: Path) -> None:
    from mmm.modalities.image.decode import decode_image
    from mmm.data.stream import list_shards, make_pipeline

    root, _ = folder
    out = tmp_path / "shards"
    build_shards(root, out, skip_bad=True, samples_per_shard=4)
    samples = list(make_pipeline(list_shards(out, split="train"), stages=[], shuffle_buffer=0))
    assert len(samples) == 6
    for sample in samples:
        (ext,) = [f for f in ImageDatasetDef.image_fields if f in sample]
        meta = json.loads(sample["json"])
        assert decode_image(sample[ext], sample["__key__"]).size == (meta["width"], meta["height"])


def test_val_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(40):
        (root / f"img{i:02d}.png").write_bytes(encode(Image.new("RGB", (4, 4), (i, 0, 0)), "PNG"))
    splits = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        report = build_shards(root, out, labels=None, val_fraction=0.3, seed=3)
        assert report.total_samples == 40 and 0 < report.samples["val"] < 40
        splits.append({s: {json.loads(x["json"])["source"] for x in read_samples(out, s)} for s in ("train", "val")})
    assert splits[0] == splits[1]
    assert not splits[0]["train"] & splits[0]["val"]
    meta = json.loads(read_samples(tmp_path / "out0", "train")[0]["json"])
    assert meta["label"] is None and meta["label_name"] is None


def test_labels_csv_and_captions(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        (root / name).write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    (tmp_path / "labels.csv").write_text("path,label\nx.png,zebra\n./y.png,ant\nz.png,zebra\n")
    (tmp_path / "caps.jsonl").write_text('{"path": "x.png", "caption": "a zebra"}\n{"path": "gone.png", "caption": "?"}\n')
    report = build_shards(root, tmp_path / "out", labels=tmp_path / "labels.csv", captions=tmp_path / "caps.jsonl")
    assert report.label_names == ["ant", "zebra"]
    metas = {m["source"]: m for m in (json.loads(s["json"]) for s in read_samples(tmp_path / "out", "train"))}
    assert metas["x.png"]["label"] == 1 and metas["y.png"]["label_name"] == "ant"
    assert metas["x.png"]["caption"] == "a zebra" and metas["y.png"]["caption"] is None
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["captions_unmatched"] == 1

    (tmp_path / "caps.csv").write_text("path,caption\nx.png,one\n")
    (tmp_path / "ints.csv").write_text("path,label\nx.png,3\ny.png,0\n")
    with pytest.raises(ImageBuildError, match=r"z\.png: has no row in the labels file"):
        build_shards(root, tmp_path / "out2", labels=tmp_path / "ints.csv", captions=tmp_path / "caps.csv")
    report = build_shards(root, tmp_path / "out2", labels=tmp_path / "ints.csv", skip_bad=True, overwrite=True)
    assert report.label_names is None and report.total_samples == 2
    (tmp_path / "nomatch.csv").write_text("path,caption\nelsewhere/x.png,one\n")
    with pytest.raises(ImageBuildError, match="none of its 1 paths"):
        build_shards(root, tmp_path / "out3", labels=None, captions=tmp_path / "nomatch.csv")


def test_input_errors(folder, tmp_path: Path) -> None:
    root, _ = folder
    (root / "loose.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    with pytest.raises(ImageBuildError, match=r"loose\.png: not inside a class folder"):
        build_shards(root, tmp_path / "o1", skip_bad=False)
    with pytest.raises(FileNotFoundError):
        build_shards(tmp_path / "missing", tmp_path / "o2")
    out = tmp_path / "o3"
    build_shards(root, out, labels=None, skip_bad=True)
    with pytest.raises(ImageBuildError, match="overwrite=True"):
        build_shards(root, out, labels=None, skip_bad=True)
    report = build_shards(root, out, labels=None, skip_bad=True, overwrite=True, min_size=12, max_pixels=500)
    reasons = dict(report.skipped)
    assert "smaller than min_size=12" in reasons["dog/d.PNG"] and "max_pixels=500" in reasons["cat/a.jpg"]


def test_check_sample_reports_problems() -> None:
    png = encode(Image.new("RGB", (5, 4)), "PNG")
    meta = json.dumps({"source": "s", "width": 5, "height": 4}).encode()
    assert check_sample({"png": png, "json": meta}) is None
    assert "found none" in check_sample({"json": meta})
    assert "found 2" in check_sample({"png": png, "jpg": png, "json": meta})
    assert "holds PNG data" in check_sample({"jpg": png, "json": meta})
    assert "field 'png': " in check_sample({"png": png[:40], "json": meta})
    assert "field 'png': cannot decode" in check_sample({"png": png[:-13], "json": meta})
    assert "says 6x4" in check_sample({"png": png, "json": json.dumps({"width": 6, "height": 4}).encode()})
    assert "not UTF-8 JSON" in check_sample({"png": png, "json": b"{oops"})


# ------------------------------------------------------------------------------ embedded sets


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        path = embedded_default()
        assert embedded_default() == path  # cached: the DONE marker short-cuts the second call
    return path


def test_shapes_set_sizes_labels_captions(shapes_dir: Path) -> None:
    assert shapes_dir.name == "image-shapes-v1" and (shapes_dir / "DONE").is_file()
    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 6000 and manifest["splits"]["val"]["samples"] == 1008
    assert manifest["label_names"] == list(SHAPES)
    assert [tuple(c) for c in manifest["held_out_combos"]] == list(HELD_OUT_COMBOS)
    assert {s for s, _ in HELD_OUT_COMBOS} == set(SHAPES) and {c for _, c in HELD_OUT_COMBOS} == set(COLORS)

    train = [json.loads(s["json"]) for s in read_samples(shapes_dir, "train")]
    assert len(train) == 6000
    train_combos = {(m["shape"], m["color"]) for m in train}
    assert len(train_combos) == 30 and not train_combos & set(HELD_OUT_COMBOS)
    assert not any(m["unseen_combo"] for m in train)
    for m in train[:300]:
        assert m["label"] == SHAPES.index(m["shape"]) and m["label_name"] == m["shape"]
        words = f"{m['size']} {m['color']} {m['shape']}"
        assert words in m["caption"] and m["caption"] in {shape_caption(m["shape"], m["color"], m["size"], m["position"], t)
                                                          for t in range(3)}
    assert {m["position"] for m in train} == {"left", "right", "top", "bottom", "center"}

    val = list(iter_images(shapes_dir, "val"))
    assert len(val) == 1008
    unseen = [m for _, m in val if m["unseen_combo"]]
    assert len(unseen) == manifest["splits"]["val"]["unseen_combo_samples"] == 168
    assert {(m["shape"], m["color"]) for m in unseen} == set(HELD_OUT_COMBOS)
    assert all(((m["shape"], m["color"]) in HELD_OUT_COMBOS) == m["unseen_combo"] for _, m in val)
    img, meta = val[0]
    assert img.mode == "RGB" and img.size == (32, 32) == (meta["width"], meta["height"])
    assert shape_caption("circle", "red", "small", "left") == "a small red circle on the left"


def test_shapes_render_is_deterministic_and_looks_right(tmp_path: Path) -> None:
    for name in ("a", "b"):
        imagedef._build_shapes(tmp_path / name, train_per_combo=1, val_per_combo=1, samples_per_shard=50)
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    rng = np.random.default_rng(0)
    img, _ = imagedef.render_scene("square", "blue", "large", "center", rng)
    centre = np.asarray(img, dtype=int)[14:18, 14:18].mean(axis=(0, 1))
    assert centre[2] > 150 and centre[0] < 90  # the middle of a large centred blue square is blue
    left, _ = imagedef.render_scene("circle", "red", "small", "left", rng)
    arr = np.asarray(left, dtype=int)
    redness = arr[..., 0] - arr[..., 2]
    assert redness[:, :12].max() > 100 and redness[:, 20:].max() < 60


def test_digits_set(tmp_path: Path) -> None:
    path = embedded_default_digits(tmp_path)
    assert path == tmp_path / "datasets" / "image-digits-v1"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 1500 and manifest["splits"]["val"]["samples"] == 297
    images = list(iter_images(path, "val"))
    assert len(images) == 297
    labels = {m["label"] for _, m in images}
    assert labels == set(range(10))
    img, meta = images[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    assert meta["caption"].startswith("a handwritten digit ") and meta["label_name"] == str(meta["label"])
