"""The image-text modality in a run: UNITER-style pairs in one stream, fed to the text and image embedders.

UNITER (Chen et al. 2020, "UNITER: UNiversal Image-TExt Representation Learning") reads an image
and its caption as one sequence and trains it with several tasks -- masked language modeling
conditioned on the image (``mlm``), masked region modeling conditioned on the caption (``mrm``),
image-text matching (``itm``) -- to which CLIP's contrastive task (``itc``, Radford et al. 2021)
is added here. Each task of a run is one stream of this modality with ``options: {mode: ...}``.

``image_text`` is a *composite*: it has no embedder of its own. Its batches feed the ``text``
embedder and either the ``image`` patch embedder or the ``regions`` embedder
(``model.image_text.image_input``), whose modalities the run builder creates and hands over with
:meth:`ImageTextModality.bind`. The text modality trains the tokenizer on the same shards (their
``txt`` field holds the captions), and with ``model.image.visual_tokens`` the image modality fits
its k-means visual-token codebook on them too (masked visual-token modeling, objective ``mvm``),
so this modality has no assets of its own.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from mmm.config import ComponentConfig, EncoderConfig, ImageTextConfig, ModelConfig
from mmm.data.epoch import EpochCounter
from mmm.modalities.image.pipeline import ImageSettings
from mmm.modalities.image_text.pipeline import IMAGE_INPUTS, MODES, ImageTextSettings, image_text_stages
from mmm.modalities.base import Handler, Modality, masker_kind, maskers_for
from mmm.registry import MODALITIES

OPTIONS = ("mode",)


@MODALITIES.register("image_text")
class ImageTextModality(Modality):
    """Image-caption pairs as one sequence (text, then patches or regions) for mlm / mrm / itm / itc tasks."""

    name = "image_text"
    order = 60
    config_class = ImageTextConfig
    config_help = "image-text pairs (vision-language)"

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.image_text
        c = self.cfg
        if c.image_input not in IMAGE_INPUTS:
            raise ValueError(f"model.image_text.image_input must be one of {IMAGE_INPUTS}, got {c.image_input!r}")
        if isinstance(c.max_text_len, bool) or not isinstance(c.max_text_len, int) or c.max_text_len < 3:
            raise ValueError(f"model.image_text.max_text_len must be an int >= 3, got {c.max_text_len!r}")
        if c.max_text_len > model_cfg.text.max_len:
            raise ValueError(f"model.image_text.max_text_len={c.max_text_len} exceeds model.text.max_len="
                             f"{model_cfg.text.max_len} (the text embedder's position table)")
        if not 0.0 <= c.itm_negatives <= 1.0:
            raise ValueError(f"model.image_text.itm_negatives must be in [0, 1], got {c.itm_negatives!r}")
        self.vision_name = "image" if c.image_input == "patches" else "regions"
        self.parts: Dict[str, Modality] = {}

    # ------------------------------------------------------------------ composition

    def uses(self) -> Tuple[str, ...]:
        return ("text", self.vision_name)

    def bind(self, parts: Dict[str, Modality]) -> None:
        missing = [n for n in self.uses() if n not in parts]
        if missing:
            raise ValueError(f"modality 'image_text' (image_input: {self.cfg.image_input}) needs the base modalities "
                             f"{list(self.uses())}; missing {missing} (got {sorted(parts)})")
        self.parts = {n: parts[n] for n in self.uses()}

    def _part(self, name: str) -> Modality:
        if name not in self.parts:
            raise RuntimeError(f"modality 'image_text': call bind() with the {list(self.uses())} modalities first")
        return self.parts[name]

    # ------------------------------------------------------------------ parts

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        raise ValueError(f"modality 'image_text' is a composite and has no embedder of its own; its batches feed the "
                         f"embedders of {list(self.uses())} (build those modalities' embedders)")

    def _vision_kind(self) -> str:
        return "patch" if self.vision_name == "image" else "region"

    def build_masker(self, masking: ComponentConfig) -> Any:
        """A token masker (the caption, built by the text modality) or a patch / region masker (the
        image, built by the vision modality), told apart by the masker's ``masks`` declaration."""
        name, kind = masking.name, masker_kind(masking.name)
        if kind == "token":
            return self._part("text").build_masker(masking)
        if kind in ("patch", "region"):
            if kind != self._vision_kind():
                raise ValueError(f"masking.name {name!r} does not fit model.image_text.image_input: "
                                 f"{self.cfg.image_input}; image tokens are masked with one of "
                                 f"{maskers_for(self._vision_kind())}")
            return self._part(self.vision_name).build_masker(masking)
        raise ValueError(f"masking.name {name!r} is not an image-text masker; use a token masker "
                         f"{maskers_for('token')} (mode mlm) or {maskers_for('patch', 'region')} (mode mrm)")

    def settings_for(self, mode: str) -> ImageTextSettings:
        """The data stages' settings for one task mode.

        Args:
            mode: ``mlm`` | ``mrm`` | ``itm`` | ``itc``.
        """
        c, m = self.cfg, self.model_cfg
        image: Optional[ImageSettings] = None
        codebook = None
        if self.vision_name == "image":
            image = self._part("image").image_settings
            if mode == "mrm":  # masked visual-token targets from the image modality's own codebook (one fit per run)
                codebook = getattr(self._part("image"), "codebook", None)
        r = m.regions
        return ImageTextSettings(mode, c.image_input, c.max_text_len, float(c.itm_negatives), image, r.feature_dim,
                                 r.box_dim, r.max_regions, c.layout, codebook)

    def check_options(self, options: Optional[Dict[str, Any]]) -> str:
        """The task's ``mode``; raises on a missing or unknown mode or any other option.

        Args:
            options: the task's ``options``.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"modality 'image_text': unknown task option(s) {unknown}; accepted: {list(OPTIONS)}")
        if "mode" not in options:
            raise ValueError(f"modality 'image_text' needs the task option 'mode' (one of {list(MODES)}), e.g. "
                             "options: {mode: itm}")
        mode = options["mode"]
        if mode not in MODES:
            raise ValueError(f"modality 'image_text': options.mode must be one of {list(MODES)}, got {mode!r}")
        return mode

    def check_masker(self, mode: str, masker: Any) -> None:
        """Raise unless ``masker`` masks what ``mode`` hides (mlm: text tokens; mrm: patches or regions).

        Args:
            mode: the task's mode.
            masker: from :meth:`build_masker` (ignored by itm and itc).
        """
        kind = getattr(masker, "masks", None)
        if mode == "mlm" and kind != "token":
            raise ValueError(f"image_text mode mlm masks the caption: it needs a token masker {maskers_for('token')}, "
                             f"got {type(masker).__name__}")
        if mode == "mrm":
            want = self._vision_kind()
            if kind != want:
                raise ValueError(f"image_text mode mrm masks the image ({self.cfg.image_input}): it needs a {want} "
                                 f"masker {maskers_for(want)}, got {type(masker).__name__}")

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        mode = self.check_options(options)
        self.check_masker(mode, masker)
        tokenizer = getattr(self._part("text"), "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("modality 'image_text': the text modality has no tokenizer yet (prepare it first)")
        return image_text_stages(self.settings_for(mode), tokenizer, masker, batch_size=batch_size, seed=seed,
                                 handler=handler, fixed_masking=fixed_masking, epochs=epochs)

    def settings(self) -> Dict[str, Any]:
        c = self.cfg
        return {"image_input": c.image_input, "max_text_len": c.max_text_len, "itm_negatives": float(c.itm_negatives),
                "layout": c.layout,
                **{f"{n}.{k}": v for n in self.uses() if n in self.parts for k, v in self.parts[n].settings().items()}}
