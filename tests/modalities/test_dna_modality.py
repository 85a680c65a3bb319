"""DNA modality: tokenizer built / trained / reused / loaded, checkpoint assets, maskers, a short pretrain."""
import csv
from pathlib import Path

import numpy as np
import pytest

import datasets_def.dna as dnadef
import mmm.modalities.dna.modality  # noqa: F401  (registers "dna")
from mmm.config import ComponentConfig, EncoderConfig, ModelConfig, load_config
from mmm.data.stream import list_shards
from mmm.modalities.dna import codec as dna_codec
from mmm.modalities.dna.modality import TOKENIZER_DIR, DNAModality
from mmm.modalities.dna.tokenizer import HF_FILE, META_FILE, DNAKmerTokenizer
from mmm.registry import MODALITIES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A small labelled synthetic genome in 128-bp windows, split into train and val by record."""
    genome = dnadef.synthetic_genome(seed=1, n_records=8, segments_per_record=10, segment=128)
    src = tmp_path_factory.mktemp("dna_src")
    fasta = dnadef.write_fasta(genome.records, src / "g.fa")
    bed = src / "labels.bed"
    bed.write_text("".join(f"{r}\t{s}\t{e}\t{n}\n" for r, s, e, n in genome.segments))
    out = tmp_path_factory.mktemp("dna_shards")
    report = dnadef.build_shards(fasta, out, window=128, labels=bed, samples_per_shard=20, val_fraction=0.25, seed=3)
    assert report.windows["train"] and report.windows["val"]
    return out


def _model_cfg(**dna) -> ModelConfig:
    cfg = ModelConfig()
    for k, v in dna.items():
        setattr(cfg.dna, k, v)
    return cfg


def test_registered_and_config_checked():
    assert "dna" in MODALITIES.list()
    with pytest.raises(ValueError, match="model.dna.tokenizer must be one of"):
        DNAModality(_model_cfg(tokenizer="wordpiece"))
    with pytest.raises(ValueError, match="reverse_complement"):
        DNAModality(_model_cfg(reverse_complement=2.0))


def test_kmer_tokenizer_is_saved_reused_and_checked(shard_dir, tmp_path):
    urls = list_shards(shard_dir, "train")
    m = DNAModality(_model_cfg(tokenizer="dna_kmer", k=4, overlapping=False))
    with pytest.raises(RuntimeError, match="prepare"):
        m.build_masker(ComponentConfig("dna_span", {}))
    m.prepare(urls, tmp_path)
    assert isinstance(m.tokenizer, DNAKmerTokenizer) and (m.tokenizer.k, m.tokenizer.overlapping) == (4, False)
    assert (tmp_path / TOKENIZER_DIR / META_FILE).is_file() and set(m.assets()) == {META_FILE}
    emb = m.build_embedder(EncoderConfig(dim=32))
    assert emb.tokens.num_embeddings == m.tokenizer.vocab_size == 10 + 4 ** 4 and emb.max_len == m.cfg.max_len
    # a later run in the same folder with another k is refused, not silently mixed
    with pytest.raises(ValueError, match="does not match model.dna: it has k=4"):
        DNAModality(_model_cfg(tokenizer="dna_kmer", k=6)).prepare(urls, tmp_path)
    with pytest.raises(ValueError, match="it is 'dna_kmer', the config asks for 'dna_char'"):
        DNAModality(_model_cfg(tokenizer="dna_char")).prepare(urls, tmp_path)


def test_bpe_is_trained_on_at_most_tokenizer_train_docs_and_reused(shard_dir, tmp_path, monkeypatch):
    urls = list_shards(shard_dir, "train")
    seen = []
    real = dna_codec.iter_sequences

    def counting(*args, **kw):
        for s in real(*args, **kw):
            seen.append(s)
            yield s

    monkeypatch.setattr(dna_codec, "iter_sequences", counting)
    m = DNAModality(_model_cfg(tokenizer="dna_bpe", vocab_size=48, tokenizer_train_docs=7))
    m.prepare(urls, tmp_path)
    assert len(seen) == 7
    assert m.tokenizer.vocab_size <= 48 and set(m.assets()) == {META_FILE, HF_FILE}
    # resuming in the same folder reuses the saved vocabulary instead of training another
    seen.clear()
    again = DNAModality(_model_cfg(tokenizer="dna_bpe", vocab_size=48, tokenizer_train_docs=20))
    again.prepare(urls, tmp_path)
    assert not seen and again.assets() == m.assets()


def test_tokenizer_path_and_assets_round_trip(shard_dir, tmp_path):
    urls = list_shards(shard_dir, "train")
    first = DNAModality(_model_cfg(tokenizer="dna_bpe", vocab_size=40, tokenizer_train_docs=20))
    first.prepare(urls, tmp_path / "a")
    given = DNAModality(_model_cfg(tokenizer="dna_bpe", tokenizer_path=str(tmp_path / "a" / TOKENIZER_DIR)))
    given.prepare(urls, tmp_path / "b")
    assert given.assets() == first.assets() and (tmp_path / "b" / TOKENIZER_DIR / HF_FILE).is_file()
    restored = DNAModality(_model_cfg(tokenizer="dna_bpe"))
    restored.load_assets(first.assets(), "ckpt.ckpt")
    for seq, _ in dnadef.iter_samples(shard_dir, "val"):
        np.testing.assert_array_equal(restored.tokenizer.encode(seq).ids, first.tokenizer.encode(seq).ids)
    with pytest.raises(ValueError, match=f"ckpt.ckpt: the DNA tokenizer files hold no {META_FILE}"):
        restored.load_assets({"x.txt": "hi"}, "ckpt.ckpt")
    with pytest.raises(ValueError, match="not a plain file name"):
        restored.load_assets({META_FILE: "{}", "../x": ""}, "ckpt.ckpt")


def test_only_dna_maskers_are_accepted(shard_dir, tmp_path):
    m = DNAModality(_model_cfg(tokenizer="dna_char"))
    m.prepare(list_shards(shard_dir, "train"), tmp_path)
    masker = m.build_masker(ComponentConfig("dna_span", {"ratio": 0.2, "span_bases": 3}))
    assert masker.ratio == 0.2 and masker.vocab == m.tokenizer.vocab()
    with pytest.raises(ValueError, match=r"'bert_random' does not mask DNA; use one of \('dna_random', 'dna_span'\)"):
        m.build_masker(ComponentConfig("bert_random", {}))
    assert m.settings() == {"max_len": m.cfg.max_len, "reverse_complement": m.cfg.reverse_complement}


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP barrier waits on a busy shared CPU (10x here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_pretrain_learns_and_the_checkpoint_restores_the_tokenizer(shard_dir, tmp_path, one_thread):
    from mmm.encoders import read_checkpoint
    from mmm.probe import extract_features
    from mmm.train.pretrain import modality_from_checkpoint, pretrain

    cfg = load_config(REPO / "configs" / "dna_mlm_tiny.yaml", {
        "model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
        "model.dna.tokenizer": "dna_bpe", "model.dna.vocab_size": 32, "model.dna.tokenizer_train_docs": 200,
        "model.dna.max_len": 48,  # 128-bp windows are cut into pieces
        "masking.name": "dna_random", "masking.args": {"ratio": 0.15},
        "data.train": str(shard_dir), "data.val": str(shard_dir), "data.batch_size": 8, "data.num_workers": 0,
        "data.shuffle_buffer": 0, "optim.lr": 5e-3, "optim.warmup_steps": 3,
        "trainer.max_steps": 20, "trainer.log_every_n_steps": 2, "trainer.val_check_interval": 20,
        "trainer.limit_val_batches": 1, "trainer.checkpoint_every_n_steps": 20, "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": str(tmp_path / "run"),
    })
    run = pretrain(cfg)
    with (Path(run.csv_logger.log_dir) / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert np.mean(losses[-3:]) < losses[0] - 0.15, f"training did not reduce the loss: {losses}"
    assert any(r.get("val/mlm_acc") for r in rows)

    contents = read_checkpoint(run.last_checkpoint)
    assert set(contents.assets["dna"]) == {META_FILE, HF_FILE}
    assert contents.assets["dna"] == run.modality.assets()
    restored = modality_from_checkpoint(contents)
    assert restored.name == "dna" and restored.tokenizer.vocab_size == run.modality.tokenizer.vocab_size
    for seq, _ in dnadef.iter_samples(shard_dir, "val"):
        np.testing.assert_array_equal(restored.tokenizer.encode(seq).ids, run.modality.tokenizer.encode(seq).ids)

    # unmasked probe features: one per piece, each with its window's label
    x, y = extract_features(run.module.model, restored, list_shards(shard_dir, "val"), batch_size=8)
    labels = dnadef.labels_of(shard_dir, "val")
    assert x.shape == (len(y), 32) and len(y) >= len(labels) and set(y.tolist()) <= set(labels.tolist())

    from mmm.encoders import load_encoder  # asking for a modality the run lacks names the ones it has
    for other in ("audio", "image"):
        with pytest.raises(ValueError, match=rf"has no '{other}' embedder \(modalities: \['dna'\]\)"):
            load_encoder(run.last_checkpoint, modality=other)


def test_tokenizer_path_is_kept_on_resume_and_a_different_one_refused(shard_dir, tmp_path, caplog):
    """One order for every token modality (mmm.modalities.tokenizer_asset): a run started from a
    tokenizer_path resumes with it even where it differs from model.dna (warned once, at the start),
    and a resume naming a different tokenizer_path is refused."""
    from mmm.config import ConfigError

    urls = list_shards(shard_dir, "train")
    given = tmp_path / "k4"
    DNAKmerTokenizer(4, overlapping=False).save(given)
    first = DNAModality(_model_cfg(tokenizer="dna_kmer", k=3, tokenizer_path=str(given)))
    with caplog.at_level("WARNING", logger="mmm.train"):
        first.prepare(urls, tmp_path / "run")
    assert "is used as given" in caplog.text and first.tokenizer.k == 4
    resumed = DNAModality(_model_cfg(tokenizer="dna_kmer", k=3, tokenizer_path=str(given)))
    resumed.prepare(urls, tmp_path / "run")  # the run folder's tokenizer is the one it started with
    assert resumed.assets() == first.assets()
    other = tmp_path / "k5"
    DNAKmerTokenizer(5, overlapping=False).save(other)
    with pytest.raises(ConfigError, match="tokenizer_path .*k5 differs from the DNA tokenizer the run folder"):
        DNAModality(_model_cfg(tokenizer="dna_kmer", k=3, tokenizer_path=str(other))).prepare(urls, tmp_path / "run")
