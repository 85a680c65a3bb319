"""benchmarks.modality_quality: train a multi-task config, then score every modality against its initialisation."""
import json

import pytest

from benchmarks import modality_quality


@pytest.mark.slow
def test_multimodal_run_scores_every_modality_trained_and_untrained(tmp_path):
    out = tmp_path / "mq.json"
    modality_quality.main(["--config", "configs/multimodal_tiny.yaml", "--quick", "--out", str(out),
                           "--set", "trainer.max_steps=4", "--set", "data.num_workers=0",
                           "--set", f"trainer.default_root_dir={tmp_path / 'run'}"])
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and result["train_seconds"] > 0
    scores = result["scores"]
    datasets = {entry["dataset"]: entry for entry in scores.values()}
    for modality in ("image", "audio", "dna"):  # a probe of the same encoder, trained and at initialisation
        entry = datasets[modality]
        for model in ("trained", "untrained"):
            assert 0.0 <= entry[model]["probe"]["accuracy"] <= 1.0, (modality, model)
    text = datasets["text"]
    assert set(text["trained"]["held_out_loss"]) == set(text["untrained"]["held_out_loss"]) != set()
    itc = next(e for e in scores.values() if e["dataset"] == "image_text" and "trained" in e and "retrieval" in e["trained"])
    assert 0.0 <= itc["trained"]["retrieval"]["t2i"]["1"] <= 1.0


def test_config_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(SystemExit, match="give --config"):
        modality_quality.main(["--out", str(tmp_path / "x.json")])
