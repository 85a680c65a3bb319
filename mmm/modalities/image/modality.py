"""The image modality in a run: patch embedder, patch maskers, image batches, visual-token codebook.

Modes (``model.image.drop_masked``): MAE (He et al. 2022) keeps hidden patches out of the
encoder, a light decoder reconstructs them (objective ``mae``); SimMIM (Xie et al. 2022) and BEiT
(Bao et al. 2022) replace them by a learned mask embedding inside the encoder (objectives
``simmim`` and ``visual_tokens``). BEiT's discrete targets come from a dVAE trained on 250M
images; offline and from the run's own data, mmm fits a k-means codebook over per-patch
standardised pixels instead (as VIOLET / E-ViLM-style masked visual-token modeling does with
their own tokenizers) -- an asset of the run, saved as JSON in the run folder and checkpoints.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from torch import nn

from mmm.checkpoint import load_weights
from mmm.config import ComponentConfig, EncoderConfig, ImageConfig, ModelConfig, ObjectiveConfig
from mmm.data.epoch import EpochCounter
from mmm.modalities.image.pipeline import ImageSettings, image_stages, read_image_sample, visual_token_features
from mmm.modalities.image.transforms import eval_transform
from mmm.data.tar import ReadOptions, read_samples
from mmm.modalities.base import Handler, Modality
from mmm.modalities.image.embedder import ImageEncoder, ImageEncoderConfig
from mmm.registry import EMBEDDERS, MODALITIES

logger = logging.getLogger("mmm.train")

CODEBOOK_FILE = "visual_codebook.json"


def codebook_to_json(codebook: Any) -> str:
    """A k-means :class:`~mmm.targets.kmeans.Codebook` as JSON text (checkpoint assets are text)."""
    data = {"centroids": codebook.centroids.tolist()}
    if codebook.mean is not None:
        data.update(mean=codebook.mean.tolist(), std=codebook.std.tolist())
    return json.dumps(data)


def codebook_from_json(text: str, where: str) -> Any:
    """Inverse of :func:`codebook_to_json`."""
    from mmm.targets.kmeans import Codebook, CodebookError

    try:
        data = json.loads(text)
        return Codebook(np.asarray(data["centroids"], dtype=np.float32),
                        None if data.get("mean") is None else np.asarray(data["mean"], dtype=np.float32),
                        None if data.get("std") is None else np.asarray(data["std"], dtype=np.float32))
    except (json.JSONDecodeError, KeyError, TypeError, CodebookError) as e:
        raise ValueError(f"{where}: the visual-token codebook cannot be read: {e}") from None


def iter_raw_samples(urls: List[str], options: Optional[ReadOptions] = None):
    """Raw ``{"__key__", field: bytes}`` samples of some shards, in order (no shuffling, no workers),
    read as training reads them (:func:`mmm.data.tar.read_samples` with ``options``)."""
    yield from read_samples(urls, options)


@MODALITIES.register("image")
class ImageModality(Modality):
    """Images as patch tokens (ViT, Dosovitskiy et al. 2021) for masked image modeling."""

    name = "image"
    order = 20
    config_class = ImageConfig
    asset_settings = ("visual_tokens", "codebook_images")
    config_help = "image modality"
    masks = ("patch",)
    masks_what = "image patches"

    @classmethod
    def downstream_inputs(cls) -> type:
        from mmm.modalities.image.downstream import ImageInputs

        return ImageInputs

    @classmethod
    def downstream_tasks(cls) -> Dict[str, Any]:
        from mmm.modalities.image.downstream import image_tasks

        return image_tasks()

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.image
        c = self.cfg
        if c.small_images not in ("upscale", "reject"):
            raise ValueError(f"model.image.small_images must be 'upscale' or 'reject', got {c.small_images!r}")
        if c.image_size % c.patch_size:
            raise ValueError(f"model.image.image_size={c.image_size} must be a multiple of "
                             f"model.image.patch_size={c.patch_size}")
        self.image_settings = ImageSettings(c.image_size, c.patch_size, c.cls_token, c.drop_masked, tuple(c.crop_scale),
                                      c.hflip, c.max_pixels, c.min_size, c.small_images)
        self.codebook: Optional[Any] = None

    # ------------------------------------------------------------------ assets

    def prepare(self, train_urls: List[str], run_dir: Path, options: Optional[ReadOptions] = None) -> None:
        if self.cfg.visual_tokens <= 0:
            return
        own = run_dir / "image" / CODEBOOK_FILE
        if own.is_file():  # a resumed run, or one prepared before: it must still fit the config
            self.codebook = codebook_from_json(own.read_text(encoding="utf-8"), str(own))
            self.check_codebook(self.codebook, str(own), reused=True)
            return
        self.codebook = self.fit_codebook(train_urls, options)
        own.parent.mkdir(parents=True, exist_ok=True)
        own.write_text(codebook_to_json(self.codebook), encoding="utf-8")

    def check_codebook(self, codebook: Any, where: str, reused: bool = False) -> None:
        """Refuse a codebook that does not fit ``model.image``: its size is ``visual_tokens`` and its
        features are one patch's standardised pixels (``3 * patch_size**2``)."""
        k, dim = codebook.centroids.shape
        want_dim = 3 * self.cfg.patch_size ** 2
        problems = []
        if k != self.cfg.visual_tokens:
            problems.append(f"it has {k} entries but model.image.visual_tokens is {self.cfg.visual_tokens}")
        if dim != want_dim:
            problems.append(f"its features have {dim} values but a {self.cfg.patch_size}-pixel patch has {want_dim} "
                            f"(3 * model.image.patch_size**2)")
        if problems:
            fix = (f"; keep the run's settings, use a new trainer.default_root_dir, or delete {where} to fit a new one"
                   if reused else "")
            raise ValueError(f"the visual-token codebook {where} does not fit the config: {'; '.join(problems)}{fix}")

    def fit_codebook(self, urls: List[str], options: Optional[ReadOptions] = None) -> Any:
        """k-means over per-patch standardised pixels of up to ``codebook_images`` training images. A bad
        image stops the fit, or is skipped and counted with ``data.skip_bad`` (as training treats it)."""
        import torch

        from mmm.modalities.image.decode import ImageDecodeError
        from mmm.targets.kmeans import Codebook

        images, bad = [], 0
        skip = options is not None and options.skip_bad
        for sample in iter_raw_samples(urls, options):
            try:
                img, _ = read_image_sample(sample, self.image_settings)
            except ImageDecodeError as e:
                if not skip:
                    raise ValueError(f"fitting the visual-token codebook: {e} (set data.skip_bad: true to skip and "
                                     f"count bad images)") from None
                bad += 1
                if options.max_errors is not None and bad > options.max_errors:
                    raise ValueError(f"fitting the visual-token codebook: too many bad images: {bad} > "
                                     f"data.max_errors={options.max_errors}; last: {e}") from None
                logger.warning("visual-token codebook: skipping a bad image: %s", e)
                continue
            images.append(eval_transform(img, self.cfg.image_size))
            if len(images) >= self.cfg.codebook_images:
                break
        if bad:
            logger.warning("visual-token codebook: %d bad image(s) skipped while fitting", bad)
        if not images:
            raise ValueError(f"no training images to fit the visual-token codebook on (shards: {urls[:3]})")
        feats = visual_token_features(torch.stack(images), self.cfg.patch_size).reshape(-1, 3 * self.cfg.patch_size ** 2)
        logger.info("fitting a %d-entry visual-token codebook on %d patches of %d images", self.cfg.visual_tokens,
                    len(feats), len(images))
        return Codebook.fit(feats, self.cfg.visual_tokens, seed=0)

    def assets(self) -> Dict[str, str]:
        return {CODEBOOK_FILE: codebook_to_json(self.codebook)} if self.codebook is not None else {}

    def load_assets(self, files: Dict[str, str], where: str) -> None:
        if CODEBOOK_FILE in files:
            self.codebook = codebook_from_json(files[CODEBOOK_FILE], where)
            self.check_codebook(self.codebook, f"{where} ({CODEBOOK_FILE})")
        elif self.cfg.visual_tokens > 0:
            raise ValueError(f"{where}: model.image.visual_tokens={self.cfg.visual_tokens} but the checkpoint holds "
                             f"no {CODEBOOK_FILE}")

    # ------------------------------------------------------------------ parts

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        c = self.cfg
        return EMBEDDERS.create("image", dim=encoder_cfg.dim, image_size=c.image_size, patch_size=c.patch_size,
                                in_chans=3, cls_token=c.cls_token, position=c.position, embed_norm=c.embed_norm,
                                norm_eps=encoder_cfg.norm_eps, dropout=encoder_cfg.dropout)

    def check_objectives(self, objectives: Sequence[ObjectiveConfig]) -> None:
        """MAE mode keeps hidden patches out of the encoder, so image batches carry no visual-token
        targets: a ``token_targets`` head on ``image_tokens`` would never train, and is refused."""
        if not self.cfg.drop_masked:
            return
        for o in objectives:
            if o.name == "token_targets" and o.args.get("target", "image_tokens") == "image_tokens":
                raise ValueError(f"objective {o.label or o.name!r} (token_targets on image_tokens) needs mask-token "
                                 f"mode: set model.image.drop_masked: false (MAE mode keeps hidden patches out of the "
                                 f"encoder, so image batches carry no visual-token targets and the head would never "
                                 f"train)")

    def token_targets(self) -> Dict[str, int]:
        """``image_tokens``: the visual-token codebook's ids, when ``model.image.visual_tokens`` asks for one."""
        return {"image_tokens": self.cfg.visual_tokens} if self.cfg.visual_tokens > 0 else {}

    def build_masker(self, masking: ComponentConfig) -> Any:
        return self.create_masker(masking)

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        self.reject_options(options)
        # MAE mode leaves hidden patches out of the encoder, so its batches carry no visual-token targets;
        # the codebook then serves only image-text streams (objective mvm), which mask in mask-token mode
        codebook = None if self.cfg.drop_masked else self.codebook
        return image_stages(self.image_settings, masker, batch_size=batch_size, seed=seed, handler=handler,
                            fixed_masking=fixed_masking, epochs=epochs, train=train, codebook=codebook,
                            modality=self.name)

    def settings(self) -> Dict[str, Any]:
        c = self.cfg
        return {"image_size": c.image_size, "patch_size": c.patch_size, "drop_masked": c.drop_masked}

    # ------------------------------------------------------------------ standalone encoder

    @classmethod
    def encoder_from_checkpoint(cls, contents: Any) -> nn.Module:
        """The :class:`~mmm.modalities.image.embedder.ImageEncoder` of a read checkpoint (eval mode)."""
        enc = ImageEncoder.from_config(image_encoder_config(contents.config.model))
        load_weights(enc, contents.modality_state(cls.name), contents.path)
        return contents.finish_encoder(enc, cls.name)

    @classmethod
    def load_saved_encoder(cls, directory: Path, meta: Dict[str, Any]) -> nn.Module:
        from mmm.encoders import load_saved_weights, parse_encoder_config

        return load_saved_weights(ImageEncoder.from_config(parse_encoder_config(ImageEncoderConfig, meta, directory)),
                                  directory)

    @classmethod
    def load_foreign_encoder(cls, source: Path, timm_model: Optional[str] = None,
                             timm_kwargs: Optional[Dict[str, Any]] = None) -> Optional[nn.Module]:
        """A timm ViT weights file (``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``) named by ``timm_model``
        (with ``timm_kwargs`` for ``timm.create_model``), through :mod:`mmm.interop.timm`."""
        if timm_model is not None or timm_kwargs is not None:
            if not source.is_file():
                raise ValueError("timm_model/timm_kwargs describe a timm ViT weights file: use them with "
                                 "modality='image' and a file path")
            from mmm.interop.timm import load_timm_encoder

            return load_timm_encoder(source, timm_model, timm_kwargs)
        from mmm.interop.timm import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

        if source.is_file() and source.suffix.lower() in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
            raise ValueError(f"{source} looks like a weights file: for a timm ViT pass timm_model='vit_...' "
                             "(and timm_kwargs if it is not the named model's default size)")
        return None


def image_encoder_config(cfg: ModelConfig) -> ImageEncoderConfig:
    """The standalone :class:`~mmm.modalities.image.embedder.ImageEncoderConfig` of a run's model config."""
    i, e = cfg.image, cfg.encoder
    return ImageEncoderConfig(encoder=e, image_size=i.image_size, patch_size=i.patch_size, in_chans=3,
                              cls_token=i.cls_token, position=i.position, embed_norm=i.embed_norm,
                              norm_eps=e.norm_eps, dropout=e.dropout)
