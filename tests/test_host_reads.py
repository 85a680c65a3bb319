"""The CPU stand-in for CUDA's sync debug mode (mmm.host_reads), and what it finds in each tiny config.

CI has no GPU, so ``torch.cuda.set_sync_debug_mode("error")`` never runs there. The detector
records, on the CPU, each call that would make a CUDA step wait for the host; the per-config test
runs one training step of every tiny config under it and fails on any read but the per-step loss
check.
"""
from pathlib import Path

import pytest
import torch

from mmm.batch import PackedBatch, TokenTargets
from mmm.config import load_config
from mmm.core.packing import PackedSeqInfo
from mmm.host_reads import HostReadDetector, on_host
from mmm.train.step_reads import step_host_reads
from mmm.registry import OBJECTIVES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _reads(fn):
    with HostReadDetector() as d:
        fn()
    return [r.what for r in d.found]


def test_each_kind_of_host_read_is_recorded():
    x, mask, reps = torch.randn(6), torch.tensor([True, False] * 3), torch.tensor([1, 2, 0])
    assert _reads(lambda: x.sum().item()) == ["Tensor.item()"]
    assert _reads(lambda: bool(x.sum() > 0)) == ["bool(tensor)"]
    assert _reads(lambda: int(x.argmax())) == ["int(tensor)"]
    assert _reads(lambda: x.tolist()) == ["Tensor.tolist()"]
    assert _reads(lambda: mask.nonzero()) == ["nonzero (value-dependent size)"]
    assert _reads(lambda: x[mask]) == ["boolean-mask indexing (value-dependent size)"]
    assert _reads(lambda: x.clone().__setitem__(mask, 0.0)) == ["boolean-mask indexing (value-dependent size)"]
    assert _reads(lambda: torch.repeat_interleave(torch.arange(3), reps)) == ["repeat_interleave without output_size"]
    assert _reads(lambda: torch.where(mask)) == ["torch.where(condition) (value-dependent size)"]
    assert _reads(lambda: torch.unique(reps)) == ["unique (value-dependent size)"]
    assert _reads(lambda: torch.bincount(reps)) == ["bincount (its size depends on the largest value)"]


def test_sync_free_equivalents_are_not_recorded():
    x, mask, reps = torch.randn(6), torch.tensor([True, False] * 3), torch.tensor([1, 2, 0])
    assert _reads(lambda: x.index_select(0, torch.tensor([0, 2]))) == []
    assert _reads(lambda: torch.repeat_interleave(torch.arange(3), reps, output_size=3)) == []
    assert _reads(lambda: torch.where(mask, x, 0.0)) == []
    assert _reads(lambda: x[1:4] + x.max()) == []
    assert _reads(lambda: x.masked_fill(mask, 0.0)) == []


def test_reads_inside_on_host_are_not_recorded():
    x = torch.randn(4)

    def check():
        with on_host():
            float(x.max())
        float(x.min())

    assert _reads(check) == ["float(tensor)"]


def test_a_read_is_placed_at_the_innermost_mmm_frame():
    from mmm.modalities.image.embedder import visible_slots

    with HostReadDetector() as d:  # without a count, visible_slots -> mask_positions -> nonzero
        visible_slots(torch.tensor([[True, False], [False, False]]), prefix=1)
    assert [str(r).split(":")[0] for r in d.sites()] == ["nonzero (value-dependent size) at mmm/core/packing.py"]
    assert d.sites()[0].where.endswith("in mask_positions")


NEED_A_TEACHER_RUN = {"dna_distill_tiny.yaml", "text_distill_tiny.yaml"}  # load another run's checkpoint
TINY = sorted(p.name for p in CONFIGS.glob("*_tiny.yaml") if p.name not in NEED_A_TEACHER_RUN)


def test_the_check_covers_every_other_tiny_config():
    assert len(TINY) >= 28 and {"text_mlm_tiny.yaml", "image_mae_tiny.yaml", "audio_mam_tiny.yaml",
                                "vl_uniter_tiny.yaml", "text_d2v_tiny.yaml"} <= set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_a_training_step_of_each_tiny_config_reads_nothing_back(name, tmp_path):
    """Nothing but the per-step loss check (mmm.train.step_reads.BY_DESIGN) in training_step or backward,
    for one batch of each task of a multi-task config."""
    cfg = load_config(CONFIGS / name, {"data.batch_size": 4, "data.num_workers": 0,
                                       "trainer.default_root_dir": str(tmp_path)})
    reads = step_host_reads(cfg)
    assert sorted(reads.tasks) == sorted(t.name for t in cfg.tasks) or reads.tasks == [""]  # a batch of every task
    assert reads.unplanned() == [], reads.report()
    # the loss check reads the loss unless the optimizer skips a bad step on the device (fused AdamW, the default)
    read_every_step = cfg.optim.name != "adamw" or cfg.optim.args.get("fused") is False
    expected = ["admit"] if read_every_step else []
    assert [r.where.rsplit(" in ", 1)[-1] for r in dict.fromkeys(reads.forward)] == expected, reads.report()
    assert reads.backward == []


def test_a_training_step_of_the_text_distillation_config_reads_nothing_back(ckpt, tmp_path):
    """text_distill_tiny.yaml loads a teacher run's checkpoint: here the session's 3-step tiny run (its sizes)."""
    from tests.conftest import TINY_OVERRIDES

    run_dir = ckpt.parent.parent
    sizes = {k: v for k, v in TINY_OVERRIDES.items() if k.startswith("model.encoder.") or k == "model.text.max_len"}
    cfg = load_config(CONFIGS / "text_distill_tiny.yaml", {
        **sizes, "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 0,
        "model.init_from": str(ckpt), "model.text.tokenizer_path": str(run_dir / "tokenizer"),
        "objectives.1.args.teacher": str(ckpt), "trainer.default_root_dir": str(tmp_path)})
    reads = step_host_reads(cfg)
    assert reads.unplanned() == [], reads.report()
    assert reads.backward == []


def _vtok_batch(labels):
    seq = PackedSeqInfo.from_seqlens([3, 3])
    positions = torch.arange(len(labels))
    return PackedBatch(seq, {}, {"image_tokens": TokenTargets(positions, torch.tensor(labels))})


def test_token_target_ids_are_checked_on_the_host_and_named():
    head = OBJECTIVES.create("token_targets", dim=8, embedders={}, num_classes=5)
    head.check_batch(_vtok_batch([0, 4, 2]))  # in range: fine
    with pytest.raises(ValueError, match=r"target 'image_tokens' has ids in \[0, 7\] but num_classes=5"):
        head.check_batch(_vtok_batch([0, 7, 2]))
    with pytest.raises(ValueError, match=r"ids in \[-1, 2\]"):
        head.check_batch(_vtok_batch([-1, 2]))
    with HostReadDetector() as d:  # on the CPU forward checks too, inside on_host: nothing recorded
        head(torch.randn(6, 8), _vtok_batch([0, 4, 2]))
    assert d.found == []
    with pytest.raises(ValueError, match=r"has ids in \[0, 7\]"):
        head(torch.randn(6, 8), _vtok_batch([0, 7, 2]))


def test_the_model_checks_a_cpu_batch_in_forward_and_a_gpu_bound_batch_before_the_copy(monkeypatch, tmp_path):
    from mmm.train.pretrain import build_run

    cfg = load_config(CONFIGS / "text_mlm_tiny.yaml", {"data.batch_size": 4, "data.num_workers": 0,
                                                       "trainer.default_root_dir": str(tmp_path)})
    run = build_run(cfg)
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    model = run.module.model
    checked = []
    real_check = model.check_batch
    monkeypatch.setattr(model, "check_batch", lambda b, heads=None: checked.append(b) or real_check(b, heads))
    monkeypatch.setattr(PackedBatch, "to", lambda self, device: self)  # no GPU here: the copy itself is not tested
    run.module.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    assert checked == [batch]
    run.module.transfer_batch_to_device(batch, torch.device("cpu"), 0)  # a CPU batch: each head checks in forward
    assert checked == [batch]


@pytest.mark.parametrize("seed", range(5))
def test_mask_positions_equals_nonzero_without_reading_back(seed):
    from mmm.core.packing import mask_positions

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(40, generator=g) < (0.1 + 0.2 * seed)
    mask[0] = bool(seed % 2)  # a mask starting with True and one starting with False
    count = int(mask.sum())
    with HostReadDetector() as d:
        got = mask_positions(mask, count)
    assert d.found == []
    assert got.tolist() == mask.nonzero().squeeze(1).tolist()
    assert mask_positions(torch.zeros(3, dtype=torch.bool), 0).tolist() == []
    with pytest.raises(ValueError, match="1-D bool mask"):
        mask_positions(mask.float(), count)


def test_next_token_positions_and_mean_pool_read_nothing_back():
    from mmm.objectives.clm import next_token_positions
    from mmm.objectives.contrastive import mean_pool

    seq = PackedSeqInfo.from_seqlens([3, 1, 2])
    with HostReadDetector() as d:
        positions = next_token_positions(seq)
        pooled = mean_pool(torch.ones(5, 2), torch.tensor([0, 0, 2, 2, 2]), 4)
    assert d.found == []
    assert positions.tolist() == [0, 1, 4]
    assert pooled[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # an owner without tokens pools to zero
    assert next_token_positions(PackedSeqInfo.from_seqlens([1, 1])).tolist() == []


def _image_embedder(cls_token):
    from mmm.registry import EMBEDDERS

    return EMBEDDERS.create("image", dim=16, image_size=16, patch_size=4, cls_token=cls_token)


@pytest.mark.parametrize("cls_token", [True, False])
def test_image_gathers_at_a_host_count_equal_the_boolean_mask_ones(cls_token):
    from mmm.batch import ImageInput
    from mmm.modalities.image.embedder import visible_slots

    torch.manual_seed(0)
    emb = _image_embedder(cls_token)
    pixels, mask = torch.randn(3, 3, 16, 16), torch.rand(3, 16) < 0.6
    mask[:, 0] = False  # every image keeps a patch
    inp = ImageInput(pixels, mask, drop_masked=True)
    assert inp.hidden_count == int(mask.sum())
    with HostReadDetector() as d:
        fast, lengths = emb(pixels, mask, True, hidden_count=inp.hidden_count)
        rows = inp.hidden_positions()
        slots = visible_slots(mask, emb.num_prefix_tokens, count=fast.shape[0])
    assert d.found == []
    slow, slow_lengths = emb(pixels, mask, True)  # the boolean-mask path
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert lengths.tolist() == slow_lengths.tolist()
    assert rows.tolist() == mask.flatten().nonzero().squeeze(1).tolist()
    assert slots.tolist() == visible_slots(mask, emb.num_prefix_tokens).tolist()


def test_image_input_refuses_a_stale_hidden_count():
    import dataclasses

    from mmm.batch import ImageInput

    mask = torch.tensor([[True, False, False, False]])
    inp = ImageInput(torch.zeros(1, 3, 8, 8), mask)
    assert inp.hidden_count == 1
    with pytest.raises(ValueError, match="ImageInput: hidden_count 1 but the mask hides 3"):
        dataclasses.replace(inp, mask=torch.tensor([[True, True, True, False]]))
    assert dataclasses.replace(inp, pixels=torch.ones(1, 3, 8, 8)).hidden_count == 1  # moves and copies keep it


def test_copies_to_the_host_and_other_hidden_reads_are_recorded():
    x, reps = torch.randn(4), torch.tensor([2, 1])
    assert _reads(lambda: x.cpu()) == ["Tensor.cpu() (a copy to the host)"]
    assert _reads(lambda: x.to("cpu")) == ["Tensor.to('cpu') (a copy to the host)"]
    assert _reads(lambda: x.to(torch.float64)) == []
    assert _reads(lambda: torch.nn.functional.one_hot(reps)) == [
        "one_hot without num_classes (its size depends on the largest value)"]
    assert _reads(lambda: torch.nn.functional.one_hot(reps, 3)) == []
    assert _reads(lambda: torch.repeat_interleave(reps)) == ["repeat_interleave without output_size"]
    assert _reads(lambda: x.new_tensor([1.0])) == ["Tensor.new_tensor(values) (a blocking copy on CUDA)"]
    assert _reads(lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0))) == [
        "boolean-mask indexing (value-dependent size)"]


def test_simmim_reads_the_hidden_rows_of_the_stream_as_the_boolean_mask_did():
    import torch.nn.functional as F

    from mmm.batch import ImageInput
    from mmm.objectives.mim import patchify

    torch.manual_seed(0)
    emb = _image_embedder(cls_token=True)
    head = OBJECTIVES.create("simmim", dim=16, embedders={"image": emb})
    pixels, mask = torch.randn(3, 3, 16, 16), torch.rand(3, 16) < 0.5
    seq = PackedSeqInfo.from_seqlens([17] * 3)
    batch = PackedBatch(seq, {"image": ImageInput(pixels, mask)})
    hidden = torch.randn(51, 16)
    with HostReadDetector() as d:
        out = head(hidden, batch)
    assert d.found == []
    grid = hidden.view(3, 17, 16)[:, 1:]  # the old gather: the patch grid under the boolean mask
    pred, target = head.pred(grid[mask]), patchify(pixels, 4)[mask]
    want = F.l1_loss(pred, target, reduction="sum") / pred.shape[-1] / int(mask.sum())
    torch.testing.assert_close(out.loss, want)


def test_region_inputs_count_their_hidden_regions_on_the_host_and_mto_uses_the_count():
    from mmm.batch import RegionInput
    from mmm.masking.mto import mask_token_rows

    mask = torch.tensor([False, True, False, True, True, False])
    regions = RegionInput(torch.randn(6, 5), torch.rand(6, 7), torch.arange(6), mask, index=torch.arange(2, 8))
    assert regions.hidden_count == 3
    batch = PackedBatch(PackedSeqInfo.from_seqlens([4, 4]), {"regions": regions})
    with HostReadDetector() as d:
        rows = regions.hidden_positions()
        flags = mask_token_rows(batch, {})
    assert d.found == []
    assert rows.tolist() == [1, 3, 4]
    assert flags.nonzero().squeeze(1).tolist() == [3, 5, 6]  # the rows moved to their stream positions
    with pytest.raises(ValueError, match="RegionInput: hidden_count 2 but the mask hides 3"):
        RegionInput(regions.features, regions.boxes, regions.position_ids, mask, hidden_count=2)
    with pytest.raises(ValueError, match="no hidden regions"):
        RegionInput(regions.features, regions.boxes, regions.position_ids).hidden_positions()


def _loop_config(name, run_root, **overrides):
    return load_config(CONFIGS / name, {"data.batch_size": 4, "data.num_workers": 0, "trainer.enable_progress_bar": True,
                                        "trainer.default_root_dir": str(run_root), **overrides})


def test_the_checks_leave_the_config_s_run_folder_alone(tmp_path):
    """check-syncs runs in a temporary folder: a run folder's config.yaml and last.ckpt stay as they were."""
    from mmm.train.step_reads import loop_host_reads

    run_dir = tmp_path / "run"
    cfg = _loop_config("text_mlm_tiny.yaml", run_dir)
    step_host_reads(cfg)
    loop_host_reads(cfg, steps=8)
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="at least 8 steps"):
        loop_host_reads(cfg, steps=6)


@pytest.mark.parametrize("name", ["text_mlm_tiny.yaml", "vl_uniter_tiny.yaml"])
def test_the_training_loop_reads_nothing_back_between_logging_steps(name, tmp_path):
    """Lightning's loop with mmm's callbacks (throughput, progress bar, LR monitor, the multi-task mixture
    monitor), gradient clipping and fused AdamW: between logging steps, no host read at all."""
    from mmm.train.step_reads import loop_host_reads

    loop = loop_host_reads(_loop_config(name, tmp_path), steps=12)
    assert loop.logged == [0, 6, 12] and loop.quiet_steps() == [2, 3, 4, 8, 9, 10]
    assert loop.between_logging() == [], loop.report()
    for k in loop.quiet_steps():  # fused AdamW skips a non-finite step itself, so nothing is read at all
        assert loop.by_step.get(k, []) == [], loop.report()
    at_logging = [r.where for r in loop.by_step[6]]  # the detector does see Lightning's own reads when it logs
    assert any(w.startswith("lightning/") for w in at_logging) and any("bar_metrics" in w for w in at_logging)


def test_a_callback_logging_a_python_number_every_step_is_found(monkeypatch, tmp_path):
    """What the loop check is for: Lightning copies a Python number given to self.log to the module's device."""
    from mmm.train.callbacks import ThroughputMonitor
    from mmm.train.step_reads import loop_host_reads

    def floats(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("train/tokens_per_sec", float(batch.num_tokens), on_step=True, batch_size=1)

    monkeypatch.setattr(ThroughputMonitor, "on_train_batch_end", floats)
    between = loop_host_reads(_loop_config("text_mlm_tiny.yaml", tmp_path), steps=8).between_logging()
    assert [r.what for r in between] == ["Python values copied to a tensor's device (a blocking copy on CUDA)"]
    assert between[0].where.startswith("lightning/pytorch/core/module.py")  # Lightning's copy, in a test's callback


def test_the_progress_bar_shows_the_loss_accuracy_and_throughput_read_when_it_redraws():
    from mmm.train.host_metrics import bar_metrics, log_host_value

    metrics = {"train/loss": torch.tensor(2.5), "train/mlm_acc": torch.tensor(0.25), "train/tokens_per_sec": 900.0,
               "train/mlm_loss": torch.tensor(2.5), "train/electra_generator_acc": torch.tensor(0.5),
               "val/loss": torch.tensor(3.0)}
    assert bar_metrics(metrics, ["train/mlm_acc"]) == {"train/loss": 2.5, "train/tokens_per_sec": 900.0,
                                                       "train/mlm_acc": 0.25}
    assert bar_metrics({}, ["train/mlm_acc"]) == {}  # nothing logged yet
    logged = {}

    class Module:
        def log(self, name, value, **kwargs):
            logged[name] = (value, kwargs)

    log_host_value(Module(), "train/phase", 2)
    value, kwargs = logged["train/phase"]
    assert value.device.type == "cpu" and value.dtype == torch.float32 and float(value) == 2.0
    assert kwargs == {"on_step": True, "batch_size": 1}


def test_the_dna_distillation_preset_trains_and_its_step_reads_nothing_back(tmp_path):
    """dna_distill_tiny.yaml (HAD-shaped: a 2 x 32 student, the 2 x 64 dna_mlm_tiny model as the frozen
    teacher reading the unmasked window): its teacher is a 2-step run of dna_mlm_tiny.yaml at the preset's
    own sizes; the student's step reads nothing back, and two steps of the preset train through pretrain."""
    from mmm.train.pretrain import pretrain

    small = {"data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 0, "data.val": None,
             "trainer.max_steps": 2, "trainer.enable_progress_bar": False, "trainer.checkpoint_every_n_steps": 2}
    teacher = pretrain(load_config(CONFIGS / "dna_mlm_tiny.yaml", {
        **small, "trainer.default_root_dir": str(tmp_path / "teacher")})).last_checkpoint
    student = {**small, "objectives.1.args.teacher": str(teacher), "trainer.default_root_dir": str(tmp_path / "student")}
    reads = step_host_reads(load_config(CONFIGS / "dna_distill_tiny.yaml", student))
    assert reads.unplanned() == [], reads.report()
    assert reads.backward == []
    run = pretrain(load_config(CONFIGS / "dna_distill_tiny.yaml", student))
    assert run.trainer.global_step == 2 and run.last_checkpoint.is_file()
    assert run.module.model.objectives["distill"]._frozen is not None  # training loaded the teacher's file
