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
