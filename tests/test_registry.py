import pytest

from mmm.registry import Registry, RegistryError


def test_register_create_list_and_errors():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        def __init__(self, radius: float = 1.0, *, color: str = "red") -> None:
            self.radius, self.color = radius, color

    @reg.register("square")
    def make_square(side: int = 2):
        return ("square", side)

    assert reg.list() == ["round", "square"]
    assert reg.list("r*") == ["round"]
    assert "round" in reg
    w = reg.create("round", radius=2.5, color="blue")
    assert (w.radius, w.color) == (2.5, "blue")
    assert reg.create("square", side=3) == ("square", 3)

    with pytest.raises(RegistryError, match=r"unknown widget 'triangle'; known widgets: round, square"):
        reg.create("triangle")
    with pytest.raises(RegistryError, match=r"unknown argument\(s\) \['radiuz'\].*accepted: \['radius', 'color'\]"):
        reg.create("round", radiuz=1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("round")(make_square)


def test_project_registries_are_populated():
    import datasets_def  # noqa: F401
    import mmm.masking  # noqa: F401
    import mmm.model  # noqa: F401
    from mmm.registry import ATTENTION_BACKENDS, DATASETS, EMBEDDERS, MASKERS, OBJECTIVES, TOKENIZERS

    assert set(ATTENTION_BACKENDS.list()) == {"flex", "math", "sdpa", "xformers"}
    assert {"bert_random", "whole_word", "span", "ngram"} <= set(MASKERS.list())
    assert "mlm" in OBJECTIVES and "text" in EMBEDDERS and "text" in DATASETS
    assert {"wordpiece", "bpe"} <= set(TOKENIZERS.list())


# Every registry is complete whichever mmm module a fresh interpreter imports first: the benchmark
# suite once broke because its import path never reached the plugin packages.
_FRESH_LOOKUPS = {
    "embedder": "from mmm.registry import EMBEDDERS; EMBEDDERS.get('text'); EMBEDDERS.get('image')",
    "modality": "from mmm.registry import MODALITIES; assert {'text', 'image', 'dna', 'audio'} <= set(MODALITIES.list())",
    "tokenizer": "from mmm.registry import TOKENIZERS; assert 'dna_kmer' in TOKENIZERS",
    "masker": "from mmm.registry import MASKERS; MASKERS.get('bert_random')",
    "objective": "from mmm.registry import OBJECTIVES; OBJECTIVES.get('mlm')",
    "dataset": "from mmm.registry import DATASETS; DATASETS.get('text')",
    "position": "from mmm.registry import POSITIONS; POSITIONS.get('alibi')",
    "benchmark": "from benchmarks.text_mlm_step import BenchConfig, build_mmm; build_mmm(BenchConfig('t', depth=1, dim=16, "
                 "heads=2, mlp_hidden=32, max_len=8, batch=2, vocab=64))",
}


@pytest.mark.parametrize("what", sorted(_FRESH_LOOKUPS))
def test_registry_complete_in_a_fresh_interpreter(what):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FRESH_LOOKUPS[what]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plugins_load_once_and_unknown_names_still_fail():
    reg = Registry("gadget", plugins=("json",))  # any importable module: nothing registers, the lookup still reports
    with pytest.raises(RegistryError, match="unknown gadget 'x'; known gadgets: \\(none registered\\)"):
        reg.get("x")
    assert reg.list() == []
