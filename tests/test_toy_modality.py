"""A brand-new modality defined entirely in this file, trained and loaded through the public API.

"toy" samples are strings of decimal digits (shard field ``digits``). Everything a modality
brings is here -- codec, embedder, masker, config section, standalone encoder, downstream inputs and a
downstream task, dataset definition with a shard builder, registration -- and nothing under ``mmm/`` names it:
the run builder, the config loader, checkpoints, :func:`mmm.load_encoder`, ``mmm embed``, ``mmm finetune``
(``--task`` too) and ``mmm bench --suite downstream`` find it through the registries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
import webdataset as wds
from torch import nn

import mmm
from mmm.batch import pack_masked
from mmm.config import (ComponentConfig, ConfigError, EncoderConfig, ModelConfig, PretrainConfig, _f, dump_config,
                        from_dict, load_config, to_dict)
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.data.epoch import SeededMap
from mmm.downstream.inputs import TokenIdInputs
from mmm.downstream.tasks import DownstreamTask, shard_splits
from mmm.masking.base import MaskedTokens
from mmm.modalities.base import Modality
from mmm.registry import DATASETS, EMBEDDERS, MASKERS, MODALITIES

PAD, MASK, FIRST_DIGIT = 0, 1, 2
VOCAB = FIRST_DIGIT + 10


# ----------------------------------------------------------------------------- codec


def digit_ids(text: str, where: str) -> np.ndarray:
    """Token ids of a string of ASCII decimal digits; ValueError names ``where``."""
    if not text or not (text.isascii() and text.isdigit()):
        raise ValueError(f"{where}: 'digits' must be non-empty decimal digits, got {text[:20]!r}")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0") + FIRST_DIGIT


def decode_digits(sample: Dict[str, Any]) -> np.ndarray:
    """Token ids of one shard sample (``digits``: ASCII decimal digits); ValueError names the key."""
    key = sample.get("__key__", "?")
    raw = sample.get("digits")
    if raw is None:
        raise ValueError(f"sample {key}: no 'digits' field")
    return digit_ids(bytes(raw).decode("ascii", errors="replace"), f"sample {key}")


def check_digits(sample: Dict[str, Any]) -> Optional[str]:
    try:
        decode_digits(sample)
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- config section, embedder, encoder


@dataclass
class ToyConfig:
    """The toy modality's ``model.toy`` section."""

    max_len: int = _f(16, "longest digit string in tokens", ge=1)


@EMBEDDERS.register("toy")
class ToyEmbedder(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tokens(ids) + self.positions(position_ids))  # (N, d)

    def fold_modality_vector(self, vector: torch.Tensor) -> None:
        self.norm.bias += vector


@dataclass
class ToyEncoderConfig:
    encoder: EncoderConfig = _f(default_factory=EncoderConfig, help="shared encoder")
    max_len: int = _f(16, "position table size")


class ToyEncoder(nn.Module):
    modality = "toy"

    def __init__(self, config: ToyEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.encoder.dim
        self.embedder = ToyEmbedder(config.encoder.dim, config.max_len)
        self.encoder = TransformerEncoder(config.encoder)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids of equal-length strings → (B, T, d)."""
        b, t = ids.shape
        seq = PackedSeqInfo.from_seqlens([t] * b)
        return self.encoder(self.embedder(ids.reshape(-1), seq.position_ids), seq).view(b, t, -1)


# ----------------------------------------------------------------------------- masker


@MASKERS.register("toy_random")
class ToyMasker:
    masks = "toy"

    def __init__(self, ratio: float = 0.25) -> None:
        self.ratio = ratio

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> MaskedTokens:
        n = max(1, round(self.ratio * len(ids)))
        positions = np.sort(rng.choice(len(ids), size=n, replace=False)).astype(np.int64)
        corrupted = ids.copy()
        corrupted[positions] = MASK
        return MaskedTokens(corrupted, positions, ids[positions])


# ----------------------------------------------------------------------------- downstream inputs


class ToyInputs(TokenIdInputs):
    """Digit strings (a ``.txt`` line, a table cell, a shard sample) → packed ids → mean-pooled features."""

    modality = "toy"
    default_pooling = "mean"  # no [CLS] token
    default_column = "digits"
    file_suffixes = (".txt",)

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        self.max_len = encoder.config.max_len

    def prepare(self, raw: Any, where: str = "") -> np.ndarray:
        return self.cut(digit_ids(raw if isinstance(raw, str) else "", where), keep_last=False)

    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]):
        from mmm.data.fields import sample_json

        label = sample_json(sample, ValueError).get("label")  # None: an unlabelled sample
        return bytes(sample.get("digits", b"")).decode("ascii", errors="replace"), label

    @classmethod
    def read_file(cls, path: Path, rel: str, skip_bad: bool):
        from mmm.downstream.data import read_lines

        return read_lines(path, rel)


# ----------------------------------------------------------------------------- modality


def _decode(src, handler):
    for sample in src:
        try:
            yield decode_digits(sample)
        except ValueError as e:
            if handler(e):
                continue
            raise


class _Mask:
    def __init__(self, masker: ToyMasker, max_len: int) -> None:
        self.masker, self.max_len = masker, max_len

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> MaskedTokens:
        return self.masker(ids[:self.max_len], rng)


@MODALITIES.register("toy")
class ToyModality(Modality):
    name = "toy"
    config_class = ToyConfig
    config_help = "toy digit strings"
    masks = ("toy",)

    @classmethod
    def downstream_inputs(cls) -> type:
        return ToyInputs

    @classmethod
    def downstream_tasks(cls) -> Dict[str, DownstreamTask]:
        return {"toy-parity": DownstreamTask("toy", "synthetic", "random digit strings → is the last digit odd?",
                                             shard_splits(toy_parity_shards, "toy"))}

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        return EMBEDDERS.create("toy", dim=encoder_cfg.dim, max_len=self.model_cfg.toy.max_len)

    def build_masker(self, masking: ComponentConfig) -> Any:
        return self.create_masker(masking)

    def stages(self, masker, *, batch_size, seed, handler, fixed_masking, epochs, train, options=None) -> List:
        self.reject_options(options)
        return [wds.pipelinefilter(_decode)(handler),
                SeededMap(_Mask(masker, self.model_cfg.toy.max_len), seed, fixed_masking, epochs),
                wds.batched(batch_size, collation_fn=partial(pack_masked, modality="toy"), partial=True)]

    @classmethod
    def encoder_from_checkpoint(cls, contents) -> nn.Module:
        from mmm.checkpoint import load_weights

        cfg = contents.config.model
        enc = ToyEncoder(ToyEncoderConfig(cfg.encoder, cfg.toy.max_len))
        load_weights(enc, contents.modality_state("toy"), contents.path)
        return contents.finish_encoder(enc, "toy")

    @classmethod
    def load_saved_encoder(cls, directory: Path, meta: Dict[str, Any]) -> nn.Module:
        from mmm.encoders import load_saved_weights, parse_encoder_config

        return load_saved_weights(ToyEncoder(parse_encoder_config(ToyEncoderConfig, meta, directory)), directory)


# ----------------------------------------------------------------------------- dataset definition


def build_toy_shards(input_path: Path, output_dir: Path, *, val_fraction: float = 0.2, seed: int = 0,
                     skip_bad: bool = False, overwrite: bool = False, samples_per_shard: int = 16,
                     label_of: Optional[Callable[[str], int]] = None):
    """One digit string per line of a text file → ``train-*.tar`` / ``val-*.tar`` with a manifest, on the shared
    building helpers, with the signature ``mmm shards build`` calls; a bad line stops the build naming it, or is
    skipped and listed in the manifest with ``skip_bad``. ``label_of`` (Python only): each sample also carries
    ``json`` ``{"label": label_of(line)}``."""
    from datasets_def.building import BuildReport, ShardWriters, finish_build, prepare_output, stable_split

    out = Path(output_dir)
    prepare_output(out, overwrite, ValueError)
    skipped = []
    with ShardWriters(out, samples_per_shard=samples_per_shard, error=ValueError) as writers:
        for lineno, line in enumerate(Path(input_path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where, sample = f"{input_path}:{lineno}", {"__key__": f"{lineno:06d}", "digits": line.strip().encode()}
            problem = check_digits(sample)
            if problem is not None:
                if not skip_bad:
                    raise ValueError(f"{where}: {problem} (pass --skip_bad to skip and list such lines)")
                skipped.append((where, problem))
                continue
            if label_of is not None:
                sample["json"] = json.dumps({"label": label_of(line.strip())}).encode()
            writers.write(stable_split(val_fraction, seed, lineno), sample)
        shards = writers.close()
    samples = {s: writers.samples.get(s, 0) for s in shards}
    finish_build("toy", writers, {"dataset": "toy", "splits": {s: {"shards": shards[s], "samples": samples[s]}
                                                              for s in shards}}, skipped, ValueError)
    return BuildReport(output_dir=out, files=1, samples=samples, shards=shards, skipped=skipped)


def write_digit_lines(path: Path, count: int = 64, seed: int = 0) -> Path:
    """``count`` random digit strings of 4 to 12 digits, one per line (the toy builder's input)."""
    rng = np.random.default_rng(seed)
    path.write_text("".join("".join(map(str, rng.integers(0, 10, size=int(rng.integers(4, 13))))) + "\n"
                            for _ in range(count)), encoding="utf-8")
    return path


@DATASETS.register("toy")
class ToyDatasetDef:
    name = "toy"
    modality = "toy"
    fields = ("digits",)
    optional_fields = ("json",)  # a labelled sample's {"label": ...}
    build_shards = staticmethod(build_toy_shards)
    check_sample = staticmethod(check_digits)


# ----------------------------------------------------------------------------- downstream task


def last_digit_is_odd(digits: str) -> int:
    """The ``toy-parity`` class of a digit string: 1 when its last digit is odd, else 0."""
    return int(digits[-1]) % 2


def toy_parity_shards() -> Path:
    """The ``toy-parity`` task's labelled shards (160 digit strings, about a fifth of them in val), built once into
    the cache (``$MMM_CACHE_DIR``) with the toy's own shard builder."""
    from datasets_def.building import cached_build

    def build(folder: Path) -> str:
        lines = write_digit_lines(folder / "digits.txt", count=160, seed=1)
        report = build_toy_shards(lines, folder / "shards", label_of=last_digit_is_odd)
        return f"{sum(report.samples.values())} digit strings"

    return cached_build("toy-parity-v1", None, build, ValueError) / "shards"


# ----------------------------------------------------------------------------- the run


def _config(tmp_path: Path, shards: Path) -> Path:
    cfg = {
        "model": {"encoder": {"dim": 32, "depth": 1, "heads": 2, "mlp_hidden": 64, "dropout": 0.0,
                              "attn_dropout": 0.0},
                  "toy": {"max_len": 12}},
        "masking": {"name": "toy_random", "args": {"ratio": 0.3}},
        "objectives": [{"name": "mlm", "args": {"modality": "toy"}}],
        "data": {"dataset": "toy", "train": str(shards), "val": None, "batch_size": 8, "num_workers": 0,
                 "shuffle_buffer": 0},
        "trainer": {"max_steps": 2, "precision": "32-true", "log_every_n_steps": 1, "checkpoint_every_n_steps": 2,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


@pytest.fixture()
def toy_shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    DATASETS.create("toy").build_shards(write_digit_lines(tmp_path / "digits.txt"), out)
    return out


def test_the_config_holds_the_registered_section(tmp_path: Path, toy_shards: Path) -> None:
    cfg = load_config(_config(tmp_path, toy_shards), {"model.toy.max_len": 10})
    assert isinstance(cfg.model.toy, ToyConfig) and cfg.model.toy.max_len == 10
    assert "# toy digit strings\n  toy:\n    # longest digit string in tokens\n    max_len: 10" in dump_config(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.toy.width'; valid keys here: \['max_len'\]"):
        from_dict(PretrainConfig, {"model": {"toy": {"width": 3}}})
    with pytest.raises(ConfigError, match=r"unknown override --model.toy.width"):
        load_config(None, {"model.toy.width": 3})
    assert to_dict(ModelConfig(toy=ToyConfig(max_len=5)))["toy"] == {"max_len": 5}


def test_the_masker_is_checked_by_what_it_masks(tmp_path: Path) -> None:
    toy = ToyModality(ModelConfig())
    with pytest.raises(ValueError, match=r"'bert_random' does not mask toy inputs; use one of \('toy_random',\)"):
        toy.build_masker(ComponentConfig("bert_random", {}))
    with pytest.raises(ValueError, match=r"'toy_random' does not mask DNA; use one of \('dna_random', 'dna_span'\)"):
        MODALITIES.create("dna", model_cfg=ModelConfig()).build_masker(ComponentConfig("toy_random", {}))


def test_pretrain_save_and_load_a_new_modality(tmp_path: Path, toy_shards: Path) -> None:
    from mmm.encoders import save_encoder
    from mmm.train.pretrain import pretrain

    assert DATASETS.create("toy").check_sample({"digits": b"12a"}) is not None
    run = pretrain(load_config(_config(tmp_path, toy_shards)))
    ckpt = run.last_checkpoint
    assert ckpt.is_file()

    enc = mmm.load_encoder(ckpt, modality="toy")
    assert isinstance(enc, ToyEncoder) and not enc.training
    ids = torch.tensor([[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]])
    hidden = enc(ids)
    assert hidden.shape == (2, 5, 32) and torch.isfinite(hidden).all()
    # the encoder is the trained model's embedder + encoder: the same hidden states on one sequence
    model = run.module.model.eval()
    seq = PackedSeqInfo.from_seqlens([5])
    with torch.no_grad():
        expected = model.encoder(model.embedders["toy"](ids[0], seq.position_ids), seq)
    torch.testing.assert_close(hidden[0], expected)

    back = mmm.load_encoder(save_encoder(enc, tmp_path / "saved"), modality="toy")
    assert isinstance(back, ToyEncoder)
    torch.testing.assert_close(back(ids), hidden)
    with pytest.raises(ValueError, match=r"unknown modality 'toyz'; supported: \[.*'toy'"):
        mmm.load_encoder(ckpt, modality="toyz")


@pytest.mark.parametrize("mistake, match", [
    ("no_collate", r"modality 'toy': its stages yielded a .*MaskedTokens, not a mmm.batch.PackedBatch; a modality's "
                   r"stages end by collating"),
    ("wrong_key", r"modality 'toy': its batch has inputs \['prot'\], but the model's embedders are \['toy'\]"),
])
def test_a_plugins_stages_that_yield_no_batch_are_named(tmp_path: Path, toy_shards: Path, monkeypatch, mistake, match):
    """A plug-in's stages without a collate step, or keying the batch by another name, failed far from the
    mistake (a TypeError inside webdataset, a KeyError in the model); the error names the modality and the fix."""
    from mmm.train.pretrain import pretrain

    real = ToyModality.stages

    def broken(self, masker, **kw):
        stages = real(self, masker, **kw)
        if mistake == "no_collate":
            return stages[:-1]
        return stages[:-1] + [wds.batched(8, collation_fn=partial(pack_masked, modality="prot"), partial=True)]

    monkeypatch.setattr(ToyModality, "stages", broken)
    with pytest.raises(Exception, match=match):
        pretrain(load_config(_config(tmp_path, toy_shards)))


def test_a_modality_without_its_name_is_refused_naming_the_attribute(tmp_path: Path, toy_shards: Path, monkeypatch):
    from mmm.train.pretrain import build_run

    monkeypatch.setattr(ToyModality, "name", "")
    with pytest.raises(ValueError, match=r"modality 'toy' \(ToyModality\) has name '': set its class attribute "
                                         r"name = 'toy'"):
        build_run(load_config(_config(tmp_path, toy_shards)))


# ----------------------------------------------------------------------------- downstream inputs


def test_the_toy_adapters_contract_is_checked_by_name(tmp_path: Path, toy_shards: Path, monkeypatch) -> None:
    from mmm.downstream.inputs import InputAdapter, adapter_class

    class NoPooled(InputAdapter):
        modality = "toy"

        def prepare(self, raw, where=""):
            return raw

    monkeypatch.setattr(ToyModality, "downstream_inputs", classmethod(lambda cls: NoPooled))
    with pytest.raises(ValueError, match=r"modality 'toy': its adapter NoPooled does not define \['pooled'\]"):
        adapter_class("toy")
    monkeypatch.setattr(ToyModality, "downstream_inputs", classmethod(lambda cls: dict))
    with pytest.raises(ValueError, match=r"downstream_inputs\(\) gave <class 'dict'>, not an InputAdapter subclass"):
        adapter_class("toy")

    class NoMaxLen(ToyInputs):  # the toy's embedder has no max_len: an adapter that forgets to set it is named
        def __init__(self, encoder, source=""):
            TokenIdInputs.__init__(self, encoder, source)

    enc = ToyEncoder(ToyEncoderConfig(EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32), max_len=8))
    with pytest.raises(ValueError, match=r"NoMaxLen.max_len is 0: set it in __init__"):
        NoMaxLen(enc).features(["123"], "mean")
    assert ToyInputs(enc).features(["123", "4" * 20], "mean").shape == (2, 16)


def test_finetune_skip_bad_skips_an_input_the_adapter_refuses(tmp_path: Path, toy_shards: Path, capsys) -> None:
    """A row the encoder's adapter refuses (here a non-digit) stopped ``mmm finetune --skip_bad``; ``mmm embed
    --skip_bad`` skipped it."""
    from mmm.cli import main
    from mmm.train.pretrain import pretrain

    ckpt = pretrain(load_config(_config(tmp_path, toy_shards))).last_checkpoint
    rows = ["digits,label"] + [f"{'13579'[i % 5] * 3},odd" if i % 2 else f"{'2468'[i % 4] * 4},even" for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows + ["12a4,odd"]) + "\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:5]) + "\n", encoding="utf-8")
    argv = ["finetune", str(ckpt), "--modality", "toy", "--train", str(tmp_path / "train.csv"), "--dev",
            str(tmp_path / "dev.csv"), "--seeds", "1", "--epochs", "1", "--batch_size", "4"]
    capsys.readouterr()
    assert main(argv) == 2
    assert "train.csv:row 14: 'digits' must be non-empty decimal digits, got '12a4'" in capsys.readouterr().err
    assert main(argv + ["--skip_bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad row(s) (--skip_bad), e.g. " in out and "train.csv:row 14" in out, out


def test_shards_build_passes_every_option_to_a_builder_that_takes_options(tmp_path: Path, monkeypatch) -> None:
    """``build_shards(input, output, *, ..., **options)``, the README's signature, had every option refused."""
    from mmm.cli import main

    got = {}

    def build(input_path, output_dir, *, val_fraction=0.2, seed=0, skip_bad=False, overwrite=False, **options):
        got.update(options)
        return build_toy_shards(input_path, output_dir, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                                overwrite=overwrite)

    monkeypatch.setattr(ToyDatasetDef, "build_shards", staticmethod(build))
    lines = write_digit_lines(tmp_path / "digits.txt", count=8)
    assert main(["shards", "build", str(lines), str(tmp_path / "out"), "--dataset", "toy", "--labels", "inline",
                 "--samples_per_shard", "4"]) == 0
    assert got == {"labels": "inline", "samples_per_shard": 4}


# ----------------------------------------------------------------------------- downstream task


def test_a_plugins_task_is_fine_tuned_and_benchmarked_by_name(tmp_path: Path, toy_shards: Path, monkeypatch,
                                                              capsys) -> None:
    """The toy's ``Modality.downstream_tasks`` reaches ``mmm finetune --task`` and ``mmm bench --suite downstream``:
    both ran a fixed table of the built-in modalities' tasks, and ``--task`` refused any other name."""
    from mmm.cli import main
    from mmm.train.pretrain import pretrain

    ckpt = pretrain(load_config(_config(tmp_path, toy_shards))).last_checkpoint
    plugin = str(Path(__file__).resolve())  # already imported here: --plugin finds the same module
    capsys.readouterr()
    assert main(["--plugin", plugin, "finetune", str(ckpt), "--task", "toy-parity", "--quick", "--seeds", "1",
                 "--epochs", "1", "--out", str(tmp_path / "ft")]) == 0, capsys.readouterr().err
    assert "toy fine-tuning, 1 seed(s): dev accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert result["data"]["modality"] == "toy" and result["test"]["n"] == 1
    assert result["labels"]["names"] == ["0", "1"] and min(result["data"]["sizes"].values()) > 0

    monkeypatch.setenv("MMM_BENCH_MICRO", "1")
    out = tmp_path / "bench"
    assert main(["--plugin", plugin, "bench", "--suite", "downstream", "--quick", "--out", str(out), str(ckpt)]) == 0
    section = json.loads((out / "results.json").read_text())["sections"]["downstream"]
    assert [(r["task"], r["model"]) for r in section["results"]] == [("toy-parity", str(ckpt)),
                                                                     ("toy-parity", f"{ckpt} (random init)")]
    assert section["tasks"]["toy-parity"] == {"modality": "toy", "data": "synthetic",
                                              "what": "random digit strings → is the last digit odd?"}
    assert section["results"][0]["sizes"] == {"train": 16, "dev": 4, "test": 12}  # micro: 8 + 2 and 6 per class


def test_a_task_name_offered_twice_or_a_task_of_another_modality_is_named(monkeypatch) -> None:
    from mmm.downstream.tasks import downstream_tasks

    load = shard_splits(toy_parity_shards, "toy")
    monkeypatch.setattr(ToyModality, "downstream_tasks",
                        classmethod(lambda cls: {"digits": DownstreamTask("toy", "synthetic", "x", load)}))
    with pytest.raises(ValueError, match=r"downstream task 'digits' is offered by two modalities, 'image' and 'toy'; "
                                         r"a task name must be unique"):
        downstream_tasks()
    monkeypatch.setattr(ToyModality, "downstream_tasks",
                        classmethod(lambda cls: {"toy-text": DownstreamTask("text", "real", "x", load)}))
    with pytest.raises(ValueError, match=r"modality 'toy' offers task 'toy-text', whose modality is 'text'"):
        downstream_tasks()
    monkeypatch.setattr(ToyModality, "downstream_tasks", classmethod(lambda cls: [load]))
    with pytest.raises(ValueError, match=r"modality 'toy': downstream_tasks\(\) gave list, not a dict"):
        downstream_tasks()


def test_a_plugins_failing_task_hook_is_named_through_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    """A hook that raises used to surface as a bare ``RuntimeError`` (an 'unexpected error', exit 1) from every
    ``--task`` run, the built-in tasks' too, naming neither the modality nor its class."""
    from mmm.cli import main
    from mmm.downstream.tasks import downstream_tasks

    def broken(cls):
        raise RuntimeError("cannot find my data folder")

    monkeypatch.setattr(ToyModality, "downstream_tasks", classmethod(broken))
    with pytest.raises(ValueError, match=r"modality 'toy' \(.*ToyModality\): downstream_tasks\(\) failed: "
                                         r"RuntimeError: cannot find my data folder"):
        downstream_tasks()
    assert main(["finetune", str(tmp_path / "none.ckpt"), "--task", "digits"]) == 2
    assert "downstream_tasks() failed: RuntimeError: cannot find my data folder" in capsys.readouterr().err
