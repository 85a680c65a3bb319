"""Shards read through WebDataset's url openers (``pipe:``) give the same samples as local paths."""
import pytest

from datasets_def.text import build_shards
from mmm.data.stream import SampleError, list_shards, make_pipeline


def _keys(urls, **kw):
    return [s["__key__"] for s in make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0, **kw)]


@pytest.mark.parametrize("max_member_bytes", [1 << 20, None])  # mmm's reader with and without the size limit
def test_pipe_urls_read_like_local_paths(tmp_path, max_member_bytes):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text(f"document {i} " * 40, encoding="utf-8")
    build_shards(src, tmp_path / "shards", max_chars=120, samples_per_shard=5)
    local = list_shards(tmp_path / "shards", "train")
    piped = list_shards([f"pipe:cat {u}" for u in local])  # remote specs pass through unchecked
    assert piped == [f"pipe:cat {u}" for u in local]
    assert _keys(piped, max_member_bytes=max_member_bytes) == _keys(local, max_member_bytes=max_member_bytes)


def test_a_failing_pipe_names_the_url(tmp_path):
    with pytest.raises(SampleError, match="pipe:cat /nonexistent/shard.tar"):
        _keys(["pipe:cat /nonexistent/shard.tar"], max_member_bytes=1 << 20)
