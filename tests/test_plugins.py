"""The ``mmm`` command loads third-party plug-ins (:mod:`mmm.plugins`): ``--plugin``, ``MMM_PLUGINS`` and the
``mmm.plugins`` entry points. Before, no ``mmm`` command could train a modality defined outside mmm, and a
checkpoint written while a plug-in was imported could not be read without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

TOY = REPO / "tests" / "test_toy_modality.py"  # a whole modality in one file (it registers "toy" on import)


def _mmm(*args: str, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture()
def toy_run(tmp_path: Path):
    from test_toy_modality import _config, write_digit_lines

    lines = write_digit_lines(tmp_path / "digits.txt")
    with lines.open("a", encoding="utf-8") as fh:
        fh.write("12a4\n")  # a bad line: skipped and listed
    built = _mmm("--plugin", str(TOY), "shards", "build", str(lines), str(tmp_path / "shards"), "--dataset", "toy",
                 "--skip_bad")
    assert built.returncode == 0 and "skipped 1 bad input(s)" in built.stdout, built.stderr[-2000:]
    return _config(tmp_path, tmp_path / "shards"), tmp_path / "shards"


def test_the_cli_trains_and_checks_a_plugin_modality(toy_run, tmp_path: Path):
    config, shards = toy_run
    refused = _mmm("pretrain", "--config", str(config))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "unknown config key 'model.toy'" in refused.stderr and "mmm --plugin MODULE" in refused.stderr
    done = _mmm("pretrain", "--config", str(config), "--plugin", str(TOY))  # after the command, as a file
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    checked = _mmm("shards", "check", str(shards), env={"MMM_PLUGINS": str(TOY)})  # the manifest says "toy"
    assert checked.returncode == 0 and "ok: no problems found" in checked.stdout, checked.stderr[-2000:]


def test_a_plugin_that_fails_to_import_is_one_error_naming_it(tmp_path: Path):
    missing = _mmm("list", "modality", env={"MMM_PLUGINS": "no_such_plugin_module"})
    assert missing.returncode == 2
    assert ("plug-in 'no_such_plugin_module' (from MMM_PLUGINS) failed to import: ModuleNotFoundError"
            in missing.stderr), missing.stderr[-2000:]
    clash = tmp_path / "clash_plugin.py"
    clash.write_text("from mmm.registry import MODALITIES\n\n@MODALITIES.register('dna')\nclass Mine:\n    pass\n")
    clashed = _mmm("--plugin", str(clash), "list", "modality")
    assert clashed.returncode == 2
    assert "failed to import: RegistryError: modality 'dna' is already registered by" in clashed.stderr, clashed.stderr


def test_a_checkpoint_keeps_loading_without_a_plugin_its_model_does_not_use(toy_run, tmp_path: Path):
    """A run's config holds a section for every registered modality, so a checkpoint written while a plug-in was
    imported named ``model.<plugin>``; reading it without the plug-in failed even when the model never used it."""
    from mmm.checkpoint import read_checkpoint
    from mmm.config import load_config
    from mmm.train.pretrain import pretrain

    config, _ = toy_run
    ckpt = pretrain(load_config(config)).last_checkpoint
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    raw["mmm"]["config"]["model"]["protein"] = {"max_len": 64}  # a plug-in not imported in this process
    unused = tmp_path / "unused.ckpt"
    torch.save(raw, unused)
    assert read_checkpoint(unused).config.model.toy.max_len == 12
    raw["mmm"]["modalities"] = [*raw["mmm"]["modalities"], "protein"]
    used = tmp_path / "used.ckpt"
    torch.save(raw, used)
    with pytest.raises(ValueError, match=r"modality section\(s\) \['protein'\], which no registered modality "
                                         r"declares: a plug-in's; import the module"):
        read_checkpoint(used)


def test_plugins_are_found_on_the_command_line_in_the_environment_and_as_entry_points(monkeypatch):
    from importlib import metadata

    from mmm import plugins

    class EntryPoint:
        name, value = "protein", "mmm_protein:register"

    monkeypatch.setenv("MMM_PLUGINS", "a_mod, b_mod,,a_mod")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [EntryPoint()] if group == "mmm.plugins" else [])
    assert plugins.requested_plugins(["c_mod"]) == [
        ("c_mod", "--plugin"), ("a_mod", "MMM_PLUGINS"), ("b_mod", "MMM_PLUGINS"),
        ("mmm_protein:register", "entry point 'protein' of group mmm.plugins")]


def test_a_plugin_file_is_imported_under_a_name_no_other_module_has(tmp_path: Path):
    """``--plugin code.py`` silently imported the standard library's ``code``; ``my.toy.py`` failed on module ``my``;
    one plug-in named as a path and as a module registered its parts twice."""
    for name, message in (("code.py", "its module name 'code' is already taken"),
                          ("my.toy.py", "a plug-in file's name must be a Python identifier")):
        (tmp_path / name).write_text(TOY.read_text(encoding="utf-8"), encoding="utf-8")
        done = _mmm("--plugin", str(tmp_path / name), "list", "modality")
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    twice = _mmm("--plugin", "tests/test_toy_modality.py", "--plugin", "tests.test_toy_modality", "list", "modality",
                 env={"PYTHONPATH": str(REPO)})
    assert twice.returncode == 0 and "toy" in twice.stdout, twice.stderr[-2000:]


def test_a_plugin_modality_is_embedded_and_fine_tuned_through_the_cli(toy_run, tmp_path: Path):
    """``mmm embed`` and ``mmm finetune`` read a plug-in's inputs through its ``Modality.downstream_inputs`` (they
    knew only text, DNA, image and audio); without the plug-in the modality is named with the way to load it."""
    import numpy as np

    import mmm
    from test_toy_modality import digit_ids

    config, _ = toy_run
    assert _mmm("pretrain", "--config", str(config), "--plugin", str(TOY)).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    lines = tmp_path / "embed_in" / "digits.txt"
    lines.parent.mkdir()
    lines.write_text("123\n\n4567\n" + "9" * 20 + "\n", encoding="utf-8")  # a blank line; one longer than max_len 12
    refused = _mmm("embed", str(ckpt), str(lines.parent), str(tmp_path / "emb"), "--modality", "toy")
    assert refused.returncode == 2
    assert "unknown modality 'toy'; supported: ['audio', 'dna', 'image', 'text']" in refused.stderr
    assert "mmm --plugin MODULE" in refused.stderr
    no_inputs = _mmm("embed", str(ckpt), str(lines.parent), str(tmp_path / "emb"), "--modality", "image_text")
    assert no_inputs.returncode == 2 and "modality 'image_text' reads no downstream inputs" in no_inputs.stderr
    done = _mmm("--plugin", str(TOY), "embed", str(ckpt), str(lines.parent), str(tmp_path / "emb"), "--modality", "toy")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "embedded 3 input(s) → 32-d mean-pooled features (1 cut to the encoder length)" in done.stdout
    assert (tmp_path / "emb" / "keys.txt").read_text().split() == ["digits.txt:row1", "digits.txt:row3",
                                                                   "digits.txt:row4"]
    feats = np.load(tmp_path / "emb" / "features.npy")
    enc = mmm.load_encoder(ckpt, modality="toy")
    with torch.no_grad():  # the mean of the encoder's hidden states of each string, cut to 12 digits
        want = [enc(torch.from_numpy(digit_ids(s, "x")[:12])[None])[0].mean(0) for s in ("123", "4567", "9" * 20)]
    np.testing.assert_allclose(feats, torch.stack(want).numpy(), atol=1e-5, rtol=1e-5)

    rows = ["digits,label"] + [f"{'13579'[i % 5] * (3 + i % 4)},odd" if i % 2 else f"{'2468'[i % 4] * 4},even"
                               for i in range(24)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:9]) + "\n", encoding="utf-8")
    tuned = _mmm("finetune", str(ckpt), "--modality", "toy", "--train", str(tmp_path / "train.csv"), "--dev",
                 str(tmp_path / "dev.csv"), "--seeds", "1", "--epochs", "1", "--batch_size", "8", "--json",
                 env={"MMM_PLUGINS": str(TOY)})
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "toy fine-tuning, 1 seed(s): dev accuracy" in tuned.stdout, tuned.stdout[-2000:]
    result = json.loads(tuned.stdout[tuned.stdout.index("{"):])
    assert result["config"]["pooling"] == "mean" and result["data"]["sizes"] == {"train": 24, "dev": 8}
