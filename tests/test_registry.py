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

    assert set(ATTENTION_BACKENDS.list()) == {"math", "sdpa", "xformers"}
    assert {"bert_random", "whole_word", "span", "ngram"} <= set(MASKERS.list())
    assert "mlm" in OBJECTIVES and "text" in EMBEDDERS and "text" in DATASETS
    assert {"wordpiece", "bpe"} <= set(TOKENIZERS.list())
