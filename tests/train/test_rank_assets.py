"""Multi-process runs share rank 0's modality assets (a tokenizer trained once, not once per rank)."""
import pytest

from mmm.train.pretrain import _config_digest, global_rank_from_env, wait_for_assets


@pytest.mark.parametrize("env, rank", [({}, 0), ({"RANK": "3"}, 3), ({"SLURM_PROCID": "5"}, 5),
                                       ({"LOCAL_RANK": "1"}, 1), ({"LOCAL_RANK": "1", "NODE_RANK": "1"}, 0)])
def test_global_rank_from_launcher_variables(monkeypatch, env, rank):
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert global_rank_from_env() == rank


def test_other_ranks_wait_for_rank_zeros_assets_of_the_same_config(tmp_path):
    digest = _config_digest("model: {}\n")
    with pytest.raises(TimeoutError, match="rank 1: rank 0 did not prepare"):
        wait_for_assets(tmp_path, digest, rank=1, timeout=0.5)
    (tmp_path / ".assets_ready").write_text(_config_digest("another config"), encoding="utf-8")
    with pytest.raises(TimeoutError):  # a marker of another config does not count
        wait_for_assets(tmp_path, digest, rank=1, timeout=0.5)
    (tmp_path / ".assets_ready").write_text(digest, encoding="utf-8")
    wait_for_assets(tmp_path, digest, rank=1, timeout=0.5)
