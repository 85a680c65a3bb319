"""The progress bar counts optimizer steps out of trainer.max_steps, not epochs of unknown length."""
import re

from mmm.train.pretrain import pretrain
from conftest import tiny_config


def test_bar_shows_steps_done_out_of_max_steps(tmp_path, capfd):
    pretrain(tiny_config(tmp_path, **{"trainer.max_steps": 3, "trainer.enable_progress_bar": True, "data.val": None}))
    captured = capfd.readouterr()
    text = captured.out + captured.err  # Lightning's bars write to stdout
    assert re.search(r"step: 100%\|[^\n\r]*\| 3/3 ", text), text[-2000:]
    assert "Epoch" not in text and "/-" not in text
