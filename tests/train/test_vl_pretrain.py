"""Vision-language pretraining end to end with patch inputs: MRM targets from a frozen timm teacher
(a local safetensors file), MLM, ITM and contrastive tasks on the embedded image-text set; the text
and image encoders then load from the checkpoint."""
import torch
import yaml

from conftest import REPO
from mmm.config import load_config
from mmm.encoders import load_encoder
from mmm.train.pretrain import pretrain


def test_patch_inputs_with_a_teacher_train_every_task_and_encoders_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=7)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    spec = {"kind": "timm", "model": "vit_tiny_patch16_224", "path": str(tmp_path / "teacher.safetensors"),
            "kwargs": {"img_size": 32, "patch_size": 4, "num_classes": 7}}
    data = yaml.safe_load((REPO / "configs" / "vl_uniter_tiny.yaml").read_text())
    data["model"]["image_text"]["image_input"] = "patches"
    data["model"]["image"] = {"image_size": 32, "patch_size": 8, "drop_masked": False}
    data["model"]["encoder"].update(dim=32, depth=1, heads=2, mlp_hidden=64)
    for o in data["objectives"]:
        if o["name"] in ("mrfr", "mrc_kl"):
            o["args"] = {"teacher": spec}
    for t in data["tasks"]:
        if t["options"]["mode"] == "mrm":
            t["masking"] = {"name": "simmim_random", "args": {"ratio": 0.5}}
    data["data"].update(batch_size=8, shuffle_buffer=0)
    data["trainer"].update(max_steps=10, val_check_interval=1000, limit_val_batches=1, enable_progress_bar=False,
                           default_root_dir=str(tmp_path / "run"))
    (tmp_path / "vl.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    run = pretrain(load_config(tmp_path / "vl.yaml"))
    counts = run.datamodule.source_counts()
    assert sum(c["batches"] for c in counts.values()) == 10
    assert counts["mrfr"]["batches"] and counts["mrc_kl"]["batches"]  # the teacher path ran
    ckpt = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    assert not any("teacher" in k for k in ckpt["state_dict"])  # the frozen teacher never enters the checkpoint
    assert list(run.module.model.embedders) == ["text", "image"]
    image = load_encoder(run.last_checkpoint, modality="image")
    assert image(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)
    text = load_encoder(run.last_checkpoint, modality="text")
    batch = text.tokenizer.pad_batch(["a small red circle on the left"], max_len=24)
    assert text(batch["input_ids"], batch["attention_mask"]).shape[-1] == 32


def test_two_stream_layout_trains_with_cross_modality_layers(tmp_path):
    from mmm.batch import PackedBatch
    from mmm.evaluate_vl import evaluate_vl
    from mmm.train.tasks import resolve_shards

    data = yaml.safe_load((REPO / "configs" / "vl_uniter_tiny.yaml").read_text())
    data["model"]["image_text"].update(layout="two_stream", cross_layers=1)
    data["model"]["encoder"].update(dim=32, depth=1, heads=2, mlp_hidden=64)
    data["model"]["text"].update(vocab_size=200)
    data["data"].update(batch_size=8, shuffle_buffer=0)
    data["trainer"].update(max_steps=8, val_check_interval=1000, limit_val_batches=1, enable_progress_bar=False,
                           default_root_dir=str(tmp_path / "run"))
    (tmp_path / "vl.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    run = pretrain(load_config(tmp_path / "vl.yaml"))
    model = run.module.model.eval()
    assert model.fusion is not None and len(model.fusion.layers) == 1
    ckpt = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    assert any(k.startswith("model.fusion.") for k in ckpt["state_dict"])
    feed = run.modalities.feeds["itm"]
    urls = resolve_shards("embedded", "image_text", "val")
    score = evaluate_vl(model, feed, urls, max_batches=1)
    assert score.itm_pairs > 0 and score.retrieval.texts > 0
    model.train()  # scored in eval mode, handed back in training mode (dropout was left off for later steps)
    evaluate_vl(model, feed, urls, max_batches=1)
    assert model.training and all(m.training for m in model.modules())
    # the text encoder alone is the shared encoder before fusion (LXMERT's language encoder)
    text = load_encoder(run.last_checkpoint, modality="text")
    assert text.embedder is not None
    # a paired batch needs cross-modality layers
    import pytest

    from mmm.batch import TokenInput
    from mmm.core.packing import PackedSeqInfo

    model.fusion = None
    seq = PackedSeqInfo.from_seqlens([3, 3])
    paired = PackedBatch(seq, {"text": TokenInput(torch.tensor([2, 5, 3, 2, 6, 3]), seq.position_ids,
                                                  torch.arange(6))}, partners=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="layout: two_stream"):
        model.encode(paired)
