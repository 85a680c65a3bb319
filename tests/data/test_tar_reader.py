"""One tar reader for every path (mmm.data.tar): training, asset fitting and the dataset readers accept the
same url forms (local, ``pipe:``, ``http://``), apply the same member-size guard and read timeout, and group
members as WebDataset does."""
from __future__ import annotations

import functools
import http.server
import io
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datasets_def import audio as audiodef
from datasets_def import dna as dnadef
from datasets_def import image as imagedef
from datasets_def import image_text as imagetextdef
from datasets_def import text as textdef
from mmm.config import ConfigError, load_config
from mmm.data.shard_tools import check_shards
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline
from mmm.data.tar import ReadOptions, ShardTimeout, read_samples

REPO = Path(__file__).resolve().parents[2]
STALL = "pipe:sleep 30"  # a command that never writes


def write_tar(path: Path, members: List[tuple]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("text_src")
    for i in range(8):
        (src / f"d{i}.txt").write_text(f"Document {i} is about masked modeling of many modalities. " * 12)
    out = tmp_path_factory.mktemp("text_shards")
    textdef.build_shards(src, out, max_chars=200, samples_per_shard=6)
    return out


@pytest.fixture(scope="module")
def dna_shards(tmp_path_factory) -> Path:
    genome = dnadef.synthetic_genome(seed=2, n_records=5, segments_per_record=5, segment=64)
    src = tmp_path_factory.mktemp("dna_src")
    out = tmp_path_factory.mktemp("dna_shards")
    dnadef.build_shards(dnadef.write_fasta(genome.records, src / "g.fa"), out, window=64, samples_per_shard=40)
    return out


def piped(shard_dir: Path, split: str = "train") -> List[str]:
    return [f"pipe:cat {u}" for u in list_shards(shard_dir, split)]


# ------------------------------------------------------------------------------- url forms


def test_dataset_readers_take_pipe_urls(text_shards, dna_shards, tmp_path):
    assert list(textdef.iter_texts(piped(text_shards))) == list(textdef.iter_texts(text_shards)) != []
    assert list(dnadef.iter_samples(piped(dna_shards))) == list(dnadef.iter_samples(dna_shards)) != []
    img = tmp_path / "img"
    for i in range(3):
        (img / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + i, 8), (10 * i, 0, 0)).save(img / "c" / f"{i}.png")
    imagedef.build_shards(img, tmp_path / "img_shards")
    got = [m["source"] for _, m in imagedef.iter_images(piped(tmp_path / "img_shards"))]
    assert got == [m["source"] for _, m in imagedef.iter_images(tmp_path / "img_shards")] and len(got) == 3
    wav = tmp_path / "wav"
    wav.mkdir()
    import soundfile as sf

    sf.write(str(wav / "a.wav"), np.zeros(800, np.float32), 16000)
    audiodef.build_shards(wav, tmp_path / "wav_shards")
    (clip,) = audiodef.iter_clips(piped(tmp_path / "wav_shards"))
    assert clip.meta["source"] == "a.wav" and clip.waveform.shape == (1, 800)
    (shard,) = list_shards(tmp_path / "img_shards")
    assert [s["__key__"] for s in imagetextdef._raw_samples(f"pipe:cat {shard}")] == \
        [s["__key__"] for s in imagetextdef._raw_samples(shard)]


def test_http_urls_read_like_local_paths(text_shards):
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s):// urls with curl, which is not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(text_shards))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        urls = [f"http://127.0.0.1:{server.server_port}/{Path(u).name}" for u in list_shards(text_shards, "train")]
        assert list(textdef.iter_texts(urls)) == list(textdef.iter_texts(text_shards))
        missing = f"http://127.0.0.1:{server.server_port}/train-999999.tar"
        with pytest.raises(SampleError, match=r"train-999999.tar: the command exited with status 22 \(the server "
                                              r"answered with an HTTP error \(404 not found"):
            list(textdef.iter_texts([missing]))
    finally:
        server.shutdown()
        server.server_close()


def test_grouping_is_webdatasets(tmp_path):
    """Keys, fields (lower-cased, multi-dot), meta members, folders and extension-less names as webdataset."""
    shard = write_tar(tmp_path / "train-000000.tar", [
        ("__meta__/info.json", b"{}"), ("README", b"no extension"), ("a/x.json", b"1"), ("a/x.TXT", b"a"),
        ("a/y.seg.txt", b"b"), ("a/y.json", b"2"), ("z.json", b"3"), ("z.txt", b"c"),
    ])
    ours = list(read_samples([str(shard)]))
    theirs = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    assert ours == theirs and [s["__key__"] for s in ours] == ["a/x", "a/y", "z"]


# ------------------------------------------------------------------------------- asset fitting


def _text_cfg(tmp_path: Path, train, **more):
    return load_config(REPO / "configs" / "text_mlm_tiny.yaml", {
        "data.train": train, "data.val": None, "model.text.vocab_size": 80, "model.text.tokenizer_train_docs": 40,
        "trainer.default_root_dir": str(tmp_path / "run"), **more})


def test_tokenizer_fitting_reads_pipe_urls(text_shards, dna_shards, tmp_path):
    from mmm.train.tasks import prepare_run_assets

    n = len(list_shards(text_shards, "train"))
    pattern = f"pipe:cat {text_shards}/train-{{000000..{n - 1:06d}}}.tar"  # every training shard, piped
    mods = prepare_run_assets(_text_cfg(tmp_path / "text", pattern))
    assert mods.base["text"].tokenizer.vocab_size > 20
    cfg = load_config(REPO / "configs" / "dna_mlm_tiny.yaml", {
        "data.train": piped(dna_shards)[0], "data.val": None, "model.dna.tokenizer": "dna_bpe",
        "model.dna.vocab_size": 40, "model.dna.tokenizer_train_docs": 50,
        "trainer.default_root_dir": str(tmp_path / "dna" / "run")})
    mods = prepare_run_assets(cfg)
    assert mods.base["dna"].tokenizer.kind == "dna_bpe"


def test_asset_fitting_refuses_an_oversized_member_naming_shard_and_member(tmp_path):
    from mmm.train.tasks import prepare_run_assets

    shard = write_tar(tmp_path / "train-000000.tar", [
        ("a.json", b"{}"), ("a.txt", b"a small document about tokens"),
        ("big.json", b"{}"), ("big.txt", b"word " * 2000),  # 10,000 bytes
    ])
    cfg = _text_cfg(tmp_path, str(shard), **{"data.max_member_bytes": 1000})
    with pytest.raises(SampleError) as info:
        prepare_run_assets(cfg)
    for part in (str(shard), "'big.txt'", "10000 bytes", "max_member_bytes=1000"):
        assert part in str(info.value)
    assert not (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    # with data.skip_bad the sample is skipped, as training skips it
    mods = prepare_run_assets(_text_cfg(tmp_path / "skip", str(shard), **{"data.max_member_bytes": 1000,
                                                                           "data.skip_bad": True}))
    assert mods.base["text"].tokenizer is not None


def test_image_and_audio_asset_readers_apply_the_guard(tmp_path):
    from mmm.modalities.audio.modality import iter_training_clips
    from mmm.modalities.image.modality import iter_raw_samples

    shard = write_tar(tmp_path / "train-000000.tar", [("a.json", b"{}"), ("a.png", b"x" * 5000)])
    for reader in (lambda o: list(iter_raw_samples([str(shard)], o)),
                   lambda o: list(iter_training_clips([str(shard)], 10, o))):
        with pytest.raises(SampleError, match=r"'a.png', not read"):
            reader(ReadOptions(max_member_bytes=1000))


# ------------------------------------------------------------------------------- read timeout


def test_a_stalled_pipe_times_out_naming_the_url():
    start = time.monotonic()
    with pytest.raises(SampleError, match=r"ShardTimeout in shard pipe:sleep 30: no data from pipe:sleep 30 for 1 s"):
        list(make_pipeline([STALL], stages=[], shuffle_buffer=0, read_timeout_s=1))
    with pytest.raises(SampleError, match="pipe:sleep 30"):
        list(textdef.iter_texts([STALL], options=ReadOptions(read_timeout_s=1.5)))
    assert time.monotonic() - start < 15
    handler = SampleErrorHandler(skip_bad=True)  # skip_bad: the stalled shard is skipped and counted
    assert list(make_pipeline([STALL], stages=[], shuffle_buffer=0, read_timeout_s=1, handler=handler)) == []
    assert handler.summary()["by_type"] == {"ShardTimeout": 1}


def test_a_stall_after_some_data_times_out_and_check_lists_it(tmp_path):
    members = [m for i in range(40) for m in ((f"{i:03d}.json", b"{}"), (f"{i:03d}.txt", b"t" * 400))]
    shard = write_tar(tmp_path / "train-000000.tar", members)  # 80 members of 1 KiB in the tar
    url = f"pipe:head -c 40000 {shard}; sleep 30"  # part of the shard, then nothing
    handler = SampleErrorHandler(skip_bad=True)
    got = list(make_pipeline([url], stages=[], shuffle_buffer=0, read_timeout_s=1, handler=handler))
    assert 0 < len(got) < 40 and handler.summary()["by_type"] == {"ShardTimeout": 1}
    assert "while reading member" in handler.summary()["messages"][0] or "after member" in handler.summary()["messages"][0]
    report = check_shards([STALL], read_timeout_s=1)
    assert len(report.problems) == 1 and "no data from pipe:sleep 30 for 1 s" in report.problems[0].problem


def test_read_timeout_is_a_checked_data_setting(tmp_path):
    cfg = _text_cfg(tmp_path, "embedded", **{"data.read_timeout_s": 2})
    assert ReadOptions.from_config(cfg.data).read_timeout_s == 2.0
    assert _text_cfg(tmp_path, "embedded", **{"data.read_timeout_s": None}).data.read_timeout_s is None
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="read_timeout_s"):
            _text_cfg(tmp_path, "embedded", **{"data.read_timeout_s": bad})
    with pytest.raises(ValueError, match="read_timeout_s must be a positive number"):
        ReadOptions(read_timeout_s=0)
    with pytest.raises(ValueError, match="read_timeout_s must be a positive number"):
        make_pipeline(["x.tar"], stages=[], read_timeout_s=float("nan"))


def test_a_failing_command_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(SampleError, match=r"pipe:exit 3: the command exited with status 3"):
        list(read_samples(["pipe:exit 3"]))
    with pytest.raises(SampleError, match="nope.tar"):
        list(read_samples([str(tmp_path / "nope.tar")]))


# ------------------------------------------------------------------------------- shard tools


def test_check_lists_an_oversized_member_without_reading_it(tmp_path):
    write_tar(tmp_path / "train-000000.tar", [("a.json", b'{"doc": 0}'), ("a.txt", b"fine text"),
                                              ("b.json", b'{"doc": 1}'), ("b.txt", b"y" * 5000)])
    report = check_shards(tmp_path, max_member_bytes=1000)
    assert [(p.where, p.problem) for p in report.problems] == [
        ("b.txt", "5000 bytes, over max_member_bytes=1000: readers refuse sample 'b' (member not read)")]
    assert check_shards(tmp_path, max_member_bytes=None).ok


def test_stats_apply_the_guard(tmp_path):
    from mmm.data.shard_tools import shard_stats

    write_tar(tmp_path / "train-000000.tar", [("a.json", b"{}"), ("a.txt", b"y " * 3000)])
    with pytest.raises(ValueError, match=r"'a.txt', not read"):
        shard_stats(tmp_path, max_member_bytes=1000)
    assert shard_stats(tmp_path).total_units == 3000


def test_options_from_config_carry_every_read_setting(tmp_path):
    cfg = _text_cfg(tmp_path, "embedded", **{"data.max_member_bytes": 4096, "data.skip_bad": True,
                                             "data.max_errors": 3, "data.read_timeout_s": 5.5})
    opts = ReadOptions.from_config(cfg.data)
    assert opts == ReadOptions(max_member_bytes=4096, read_timeout_s=5.5, skip_bad=True, max_errors=3)
    handler = opts.handler()
    assert handler.skip_bad and handler.max_errors == 3
    assert isinstance(ShardTimeout("x", "(stream)"), ValueError)
    from mmm.train.tasks import build_modalities, task_configs

    mods = build_modalities(cfg, task_configs(cfg))
    assert mods.read_options == opts



def _ten_member_tar(path: Path) -> bytes:
    write_tar(path, [(f"k{i:02d}.txt", f"text {i}".encode()) for i in range(10)])
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["zeroed header", "concatenated"])
def test_a_zero_block_inside_a_shard_is_an_error_not_its_end(tmp_path, damage):
    """tarfile stops at the first zero block; a zeroed member header (or a second tar appended with `cat`)
    would end the shard there silently, dropping every later sample."""
    data = _ten_member_tar(tmp_path / "good.tar")
    if damage == "zeroed header":
        bad = bytearray(data)
        bad[5 * 1024:5 * 1024 + 512] = bytes(512)  # member 5's header (each member: a header block and a data block)
        bad = bytes(bad)
        where = "a zero block at byte 5120 (after member 'k04.txt')"
    else:
        bad = data + data
        where = "a zero block at byte 10240 (after member 'k09.txt')"
    (tmp_path / "bad.tar").write_bytes(bad)
    with pytest.raises(SampleError, match=re.escape(where) + ".*data follows at byte"):
        list(read_samples([str(tmp_path / "bad.tar")], ReadOptions()))
    assert any("data follows" in p.problem for p in check_shards(tmp_path / "bad.tar").problems)
    # the end-of-archive blocks and the record padding after them are zeros: a whole tar reads as before
    assert [s["__key__"] for s in read_samples([str(tmp_path / "good.tar")], ReadOptions())] == \
        [f"k{i:02d}" for i in range(10)]
    assert not any("data follows" in p.problem for p in check_shards(tmp_path / "good.tar").problems)


def test_an_empty_tar_is_a_problem_for_shards_check(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(bytes(10240))  # a valid tar with no member
    assert list(read_samples([str(tmp_path / "train-000000.tar")], ReadOptions())) == []
    report = check_shards(tmp_path)
    assert [p.problem for p in report.problems] == ["holds no sample (an empty tar): training reads nothing from it"]


def test_shard_lists_take_file_urls_and_globs_inside_braces(tmp_path):
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        write_tar(tmp_path / name, [("a.txt", b"x")])
    one = str(tmp_path / "train-000000.tar")
    assert list_shards(f"file:{one}") == list_shards(f"file://{one}") == [one]
    assert list_shards(str(tmp_path / "{train,val}-*.tar")) == [
        str(tmp_path / n) for n in ("train-000000.tar", "train-000001.tar", "val-000000.tar")]
    with pytest.raises(FileNotFoundError, match=r"test-\*\.tar \(matches no file\)"):
        list_shards(str(tmp_path / "{train,test}-*.tar"))


@pytest.mark.parametrize("codec", ["gz", "bz2", "xz"])
def test_compressed_tars_concatenated_are_an_error_not_their_first_part(tmp_path, codec):
    """`cat a.tar.gz b.tar.gz` is a valid multi-stream file; tarfile reads only its first stream."""
    import bz2
    import gzip
    import lzma

    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec]
    first = _ten_member_tar(tmp_path / "a.tar")
    second = write_tar(tmp_path / "b.tar", [("z.txt", b"later")]).read_bytes()
    (tmp_path / f"whole.tar.{codec}").write_bytes(compress(first) + bytes(64))  # zero padding after it is fine
    assert len(list(read_samples([str(tmp_path / f"whole.tar.{codec}")], ReadOptions()))) == 10
    (tmp_path / f"cat.tar.{codec}").write_bytes(compress(first) + compress(second))
    with pytest.raises(SampleError, match=f"compressed data follows the end of its first {codec} stream"):
        list(read_samples([str(tmp_path / f"cat.tar.{codec}")], ReadOptions()))


def test_a_break_in_the_next_sample_keeps_the_sample_read_whole(tmp_path):
    """The reader hands a sample on when the next key arrives: a shard cut inside the next sample's first member
    lost the finished sample before it, uncounted."""
    write_tar(tmp_path / "good.tar", [("a.txt", b"alpha" * 10), ("a.json", b"{}"), ("b.txt", b"B" * 5000),
                                      ("b.json", b"{}")])
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:4 * 512 + 512 + 1000])  # inside b.txt's data
    handler = ReadOptions(skip_bad=True).handler()
    samples = list(read_samples([str(tmp_path / "cut.tar")], handler=handler))
    assert [s["__key__"] for s in samples] == ["a"] and samples[0]["json"] == b"{}"
    assert handler.total == 1 and "while reading member 'b.txt'" in handler.messages[0]
    # cut between two members of one sample: that sample may go on past the break, so it is dropped, and named
    (tmp_path / "cut2.tar").write_bytes(data[:2 * 512] + b"\x01" * 512)  # a.txt whole, then a garbage header
    handler = ReadOptions(skip_bad=True).handler()
    assert list(read_samples([str(tmp_path / "cut2.tar")], handler=handler)) == []
    assert handler.total == 1 and "sample 'a' is dropped too" in handler.messages[0]


def test_link_members_are_refused_by_name_not_skipped(tmp_path):
    """A streamed tar cannot follow a hard or symbolic link back to an earlier member; such a sample vanished from
    training without a count, even in strict mode, while `mmm shards check` flagged it."""
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("a.txt", b"the first document")
        for name, kind in (("b.txt", tarfile.LNKTYPE), ("c.txt", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.txt"
            tf.addfile(info)
        add("d.txt", b"the fourth document")
    with pytest.raises(SampleError, match=r"sample 'b' field 'txt': tar member 'b.txt' is not a regular file "
                                          r"\(a hard link to 'a.txt'\)"):
        list(read_samples([str(path)], ReadOptions()))
    handler = ReadOptions(skip_bad=True).handler()
    assert [s["__key__"] for s in read_samples([str(path)], handler=handler)] == ["a", "d"]
    assert handler.total == 2 and "a symbolic link to 'a.txt'" in handler.messages[1]
    problems = [p.problem for p in check_shards(path).problems]
    assert any("hard link to 'a.txt'); readers refuse its sample" in p for p in problems), problems
