"""image_text dataset definition: shard build from a folder (good and bad input), embedded default, checks."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

import datasets_def  # noqa: F401  (registers every definition)
from datasets_def import image as image_def
from datasets_def import image_text as it
from mmm.data.shard_tools import check_shards
from mmm.registry import DATASETS

F = 16


def _scene(i: int):
    shape, color = image_def.SHAPES[i % 6], list(image_def.COLORS)[i % 6]
    img, _ = image_def.render_scene(shape, color, "large", "center", np.random.default_rng(i))
    return img, f"a large {color} {shape} in the center"


def make_folder(root: Path, n: int = 6, regions: bool = True, captions_per_image: int = 2):
    """``root/img``: n PNG scenes; ``root/captions.csv``; ``root/regions``: one .npz per image (pixel xyxy boxes)."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img, cap = _scene(i)
        img.save(root / "img" / f"s{i}.png")
        rows += [(f"s{i}.png", cap if k == 0 else f"{cap} number {k}") for k in range(captions_per_image)]
    with (root / "captions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    if regions:
        (root / "regions").mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            soft = rng.dirichlet(np.ones(7), size=3).astype(np.float32)
            np.savez(root / "regions" / f"s{i}.npz", features=rng.standard_normal((3, F)).astype(np.float32),
                     boxes=np.array([[0, 0, 32, 32], [4, 4, 20, 28], [10, 2, 12, 9]], dtype=np.float32), soft=soft)
    return root / "img", root / "captions.csv", (root / "regions" if regions else None)


def _read(shard_dir: Path):
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        out += list(it._raw_samples(str(shard)))
    return out


def test_registered_with_modality_and_fields():
    ds = DATASETS.create("image_text")
    assert ds.modality == "image_text" and set(ds.fields) == {"json", "txt"}
    assert {"features.npy", "boxes.npy", "soft.npy", "png"} <= set(ds.optional_fields)


def test_build_from_folder_writes_captions_txt_and_regions(tmp_path):
    img, caps, regs = make_folder(tmp_path / "in")
    report = it.build_shards(img, tmp_path / "out", captions=caps, regions=regs)
    assert report.total_samples == 6 and sum(report.captions.values()) == 12
    assert report.feature_dim == F and report.soft_dim == 7 and report.boxes_converted == 6
    samples = _read(tmp_path / "out")
    s = samples[0]
    meta = json.loads(s["json"])
    assert len(meta["captions"]) == 2 and s["txt"].decode() == "\n".join(meta["captions"])
    boxes = np.load(io.BytesIO(s["boxes.npy"]))
    assert boxes.shape == (3, 7) and np.allclose(boxes[0], [0, 0, 1, 1, 1, 1, 1])
    assert np.allclose(boxes[1], [4 / 32, 4 / 32, 20 / 32, 28 / 32, 16 / 32, 24 / 32, 16 * 24 / 32 ** 2])
    assert np.load(io.BytesIO(s["features.npy"])).shape == (3, F)
    assert check_shards(tmp_path / "out", dataset="image_text").ok
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dataset"] == "image_text" and manifest["skipped"] == [] and manifest["feature_dim"] == F


def test_jsonl_captions_list_and_no_regions(tmp_path):
    img, _, _ = make_folder(tmp_path / "in", n=3, regions=False)
    jl = tmp_path / "caps.jsonl"
    jl.write_text("\n".join(json.dumps({"path": f"s{i}.png", "captions": [f"cap {i} a", f"cap {i} b", f"cap {i} c"]})
                            for i in range(3)) + "\n")
    report = it.build_shards(img, tmp_path / "out", captions=jl)
    assert sum(report.captions.values()) == 9
    assert all("features.npy" not in s for s in _read(tmp_path / "out"))


def _edit_csv(path: Path, rows):
    with path.open("a", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize("kind", ["empty_caption", "lossy_caption", "caption_without_image", "image_without_caption",
                                  "missing_region_file", "features_rank", "features_nan", "feature_dim",
                                  "soft_sum", "boxes_shape", "boxes_outside", "boxes_normalised", "corrupt_image"])
def test_bad_input_names_file_and_field_or_is_skipped_and_listed(tmp_path, kind):
    img, caps, regs = make_folder(tmp_path / "in")
    rng = np.random.default_rng(1)
    good = dict(features=rng.standard_normal((3, F)).astype(np.float32),
                boxes=np.array([[0, 0, 32, 32], [1, 1, 3, 3], [5, 5, 9, 9]], np.float32),
                soft=np.full((3, 7), 1 / 7, np.float32))
    expect = {"empty_caption": "empty caption", "lossy_caption": "empty caption for 's1.png' (only whitespace, control, "
              "format or replacement (U+FFFD) characters)", "caption_without_image": "not an image file",
              "image_without_caption": "has no caption", "missing_region_file": "no region file",
              "features_rank": "'features' must be 2-D", "features_nan": "NaN", "feature_dim": f"expected {F}",
              "soft_sum": "'soft' row 0 sums to", "boxes_shape": "'boxes' has shape", "boxes_outside": "inside the 32x32",
              "boxes_normalised": "boxes normalised to the image size, but (R, 4) boxes are x1, y1, x2, y2 in pixels",
              "corrupt_image": "s5.png"}[kind]
    if kind == "empty_caption":
        _edit_csv(caps, [["s1.png", "   "]])
    elif kind == "lossy_caption":
        _edit_csv(caps, [["s1.png", "\ufffd \ufffd"]])
    elif kind == "caption_without_image":
        _edit_csv(caps, [["nope.png", "a caption"]])
    elif kind == "image_without_caption":
        img_extra, _ = _scene(7)
        img_extra.save(img / "extra.png")
        np.savez(regs / "extra.npz", **good)
    elif kind == "missing_region_file":
        (regs / "s2.npz").unlink()
    elif kind == "corrupt_image":
        (img / "s5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    else:
        bad = dict(good)
        if kind == "features_rank":
            bad["features"] = good["features"].reshape(-1)
        elif kind == "features_nan":
            bad["features"] = good["features"].copy()
            bad["features"][1, 2] = np.nan
        elif kind == "feature_dim":
            bad["features"] = rng.standard_normal((3, F + 1)).astype(np.float32)
        elif kind == "soft_sum":
            bad["soft"] = np.full((3, 7), 0.5, np.float32)
        elif kind == "boxes_shape":
            bad["boxes"] = np.zeros((3, 5), np.float32)
        elif kind == "boxes_outside":
            bad["boxes"] = np.array([[0, 0, 40, 32], [1, 1, 3, 3], [5, 5, 9, 9]], np.float32)
        elif kind == "boxes_normalised":
            bad["boxes"] = np.array([[0, 0, 1, 1], [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]], np.float32)
        # the dataset's sizes are set by the first image written; make every s5 file the bad one
        np.savez(regs / "s5.npz", **bad)
    with pytest.raises(it.ImageTextBuildError, match="skip_bad") as err:
        it.build_shards(img, tmp_path / "out", captions=caps, regions=regs, feature_dim=F)
    assert expect in str(err.value)
    report = it.build_shards(img, tmp_path / "out2", captions=caps, regions=regs, feature_dim=F, skip_bad=True)
    assert len(report.skipped) == 1 and expect in report.skipped[0][1] + report.skipped[0][0]
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 1
    written = sum(report.samples.values())
    lost_image = kind not in ("empty_caption", "lossy_caption", "caption_without_image", "image_without_caption")
    assert written == 6 - lost_image  # an image without a caption is the extra one: the six others are written


def test_region_file_naming_no_image_is_reported(tmp_path):
    img, caps, regs = make_folder(tmp_path / "in")
    (regs / "orphan.npz").write_bytes((regs / "s0.npz").read_bytes())
    with pytest.raises(it.ImageTextBuildError, match="orphan.npz"):
        it.build_shards(img, tmp_path / "out", captions=caps, regions=regs)


def test_captions_are_required(tmp_path):
    img, _, _ = make_folder(tmp_path / "in", n=2, regions=False)
    with pytest.raises(it.ImageTextBuildError, match="captions"):
        it.build_shards(img, tmp_path / "out")


def test_check_sample_reports_bad_region_and_txt():
    img, cap = _scene(0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    meta = {"captions": [cap], "width": 32, "height": 32}
    sample = {"png": buf.getvalue(), "json": json.dumps(meta).encode(), "txt": cap.encode(),
              "features.npy": it.npy_bytes(np.zeros((2, 4), np.float32)),
              "boxes.npy": it.npy_bytes(np.zeros((2, 7), np.float32))}
    assert it.check_sample(sample) is None
    assert "differs" in it.check_sample({**sample, "txt": b"other"})
    assert "'boxes.npy' has shape" in it.check_sample({**sample, "boxes.npy": it.npy_bytes(np.zeros((3, 7), np.float32))})
    assert "without both" in it.check_sample({k: v for k, v in sample.items() if k != "boxes.npy"})


def test_embedded_default_regions_and_held_out_pairs_only_in_val():
    root = it.embedded_default()
    assert it.embedded_default() == root  # cached
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["feature_dim"] == 64 and manifest["soft_dim"] == 7 and manifest["object_box_not_found"] == 0
    assert manifest["splits"]["train"]["samples"] == 6000 and manifest["splits"]["val"]["unseen_combo_samples"] == 168
    held = {tuple(c) for c in manifest["held_out_combos"]}
    seen = {"train": set(), "val": set()}
    for split in ("train", "val"):
        samples = (s for shard in sorted(root.glob(f"{split}-*.tar")) for s in it._raw_samples(str(shard)))
        for n, s in enumerate(samples):
            meta = json.loads(s["json"])
            seen[split].add((meta["shape"], meta["color"]))
            if n < 20:
                feats, boxes, soft = (np.load(io.BytesIO(s[f])) for f in ("features.npy", "boxes.npy", "soft.npy"))
                assert feats.shape == (4, 64) and feats.dtype == np.float16
                assert boxes.shape == (4, 7) and soft.shape == (4, 7)
                assert np.allclose(soft.sum(1), 1, atol=1e-5)
                obj = meta["object_region"]
                assert soft[obj].argmax() == image_def.SHAPES.index(meta["shape"])
                assert len(meta["captions"]) == 2 and meta["captions"][0] != meta["captions"][1]
                assert s["txt"].decode() == "\n".join(meta["captions"])
                assert it.check_sample(s) is None
    assert not (seen["train"] & held) and held <= seen["val"]


def test_simulated_features_come_from_the_pixels():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    boxes = np.array([[0, 0, 32, 32], [3, 4, 5, 9], [10, 10, 11, 11]])
    f = it.simulated_region_features(px, boxes)
    x = px.astype(np.float64) / 255
    assert f.shape == (3, 64)
    assert np.allclose(f[0, 48:51], x.reshape(-1, 3).mean(0), atol=1e-6)
    assert np.allclose(f[0, :3], x[:8, :8].reshape(-1, 3).mean(0), atol=1e-6)
    assert np.allclose(f[2, :48], np.tile(x[10, 10], 16), atol=1e-6)
    batched = it.simulated_region_features(np.stack([px, px[::-1]]), np.stack([boxes, boxes]))
    assert np.allclose(batched[0], f)


def test_soft_labels_for_every_image_or_none(tmp_path):
    img, caps, regs = make_folder(tmp_path / "in")
    with np.load(regs / "s3.npz") as z:
        np.savez(regs / "s3.npz", features=z["features"], boxes=z["boxes"])
    report = it.build_shards(img, tmp_path / "out", captions=caps, regions=regs, skip_bad=True)
    assert len(report.skipped) in (1, 5) and "array 'soft' is" in report.skipped[0][1]


def test_cli_build_and_check(tmp_path, capsys):
    from mmm.cli import main

    img, caps, _ = make_folder(tmp_path / "in", n=4, regions=False)
    assert main(["shards", "build", str(img), str(tmp_path / "out"), "--dataset", "image_text", "--captions",
                 str(caps), "--val_fraction", "0.3"]) == 0
    assert "samples" in capsys.readouterr().out
    assert main(["shards", "check", str(tmp_path / "out"), "--dataset", "image_text"]) == 0


def test_cli_build_with_region_files(tmp_path, capsys):
    from mmm.cli import main

    img, caps, regs = make_folder(tmp_path / "in", n=4, regions=True)
    assert main(["shards", "build", str(img), str(tmp_path / "out"), "--dataset", "image_text", "--captions",
                 str(caps), "--regions", str(regs)]) == 0
    capsys.readouterr()
    assert main(["shards", "check", str(tmp_path / "out"), "--dataset", "image_text"]) == 0
    import json
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["feature_dim"] is not None
    # a wrong expected feature size is an error naming the region file
    assert main(["shards", "build", str(img), str(tmp_path / "bad"), "--dataset", "image_text", "--captions",
                 str(caps), "--regions", str(regs), "--feature_dim", "3"]) == 2
    assert ".npz" in capsys.readouterr().err
