"""The audio modality in a run: log-mel front end and k-means codebooks as assets, span/patch maskers.

Masked acoustic modeling in mask-token mode: hidden tokens are replaced by a learned mask
embedding inside the encoder (wav2vec 2.0, Baevski et al. 2020; HuBERT, Hsu et al. 2021), and
heads predict, at the hidden positions, the k-means cluster ids of acoustic features (HuBERT's
first iteration clusters MFCCs; MERT, Li et al. 2023, adds a musical target set -- here a chroma
codebook) with ``token_targets``, and/or the features themselves with ``masked_features``
(AudioMAE-style regression, Huang et al. 2022).

Assets, fitted on the training shards at the start of a run and saved as JSON text in
``run_dir/audio/`` (and inside every checkpoint): the front end's normalisation statistics
(``audio_frontend.json``) and one codebook per target kind (``kmeans_<kind>.json``).
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from torch import nn

from mmm.checkpoint import load_weights
from mmm.config import AudioConfig, ComponentConfig, EncoderConfig, ModelConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions, read_decoded
from mmm.modalities.audio.embedder import AudioEncoder, AudioEncoderConfig  # (importing it registers the "audio" embedder)
from mmm.modalities.audio.frontend import FRONTEND_FILE, AudioDecodeError, AudioFrontend, AudioFrontendConfig
from mmm.modalities.base import Handler, Modality
from mmm.registry import EMBEDDERS, MODALITIES

logger = logging.getLogger("mmm.train")

ASSET_DIR = "audio"
TARGET_KINDS = ("mfcc", "logmel", "chroma")


def codebook_file(kind: str) -> str:
    """Asset file name of the k-means codebook of one target kind."""
    return f"kmeans_{kind}.json"


def frontend_config(cfg: AudioConfig) -> AudioFrontendConfig:
    """The front end of ``model.audio``. ``max_seconds`` is not applied there (the front end would cut
    long clips); the data stages split long clips into several sequences instead."""
    return AudioFrontendConfig(sample_rate=cfg.sample_rate, n_mels=cfg.n_mels, win_ms=cfg.win_ms, hop_ms=cfg.hop_ms,
                               token=cfg.token, frames_per_token=cfg.frames_per_token, patch_freq=cfg.patch_freq,
                               patch_time=cfg.patch_time, max_seconds=None, norm=cfg.norm)


def iter_training_clips(urls: List[str], limit: int, options: Optional[ReadOptions] = None,
                        frontend: Optional[AudioFrontend] = None) -> Iterator[Tuple[np.ndarray, int]]:
    """``(waveform, sample_rate)`` of up to ``limit`` clips of ``urls`` in order, read as training reads them
    (:func:`mmm.data.tar.read_samples` with ``options``).

    A clip that cannot be decoded, or that ``frontend`` refuses (:meth:`AudioFrontend.checked_mono`: a sample rate
    far off, NaN samples), is a bad sample as in training: it stops the fit, naming the shard and key, or with
    ``options.skip_bad`` it is skipped and counted.
    """
    from mmm.modalities.audio.pipeline import read_audio_sample

    def clip(sample: Dict[str, Any]) -> Tuple[np.ndarray, int]:
        try:
            wav, sr, _ = read_audio_sample(sample)
            if frontend is not None:
                frontend.checked_mono(wav, sr)
        except ValueError as e:  # AudioDecodeError is one
            raise AudioDecodeError(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {e}") from None
        return wav, sr

    return itertools.islice(read_decoded(urls, options, clip, "(set data.skip_bad: true to skip and count bad clips)"),
                            limit)


@MODALITIES.register("audio")
class AudioModality(Modality):
    """Audio as log-mel feature tokens (time slices or AudioMAE patches) for masked acoustic modeling."""

    name = "audio"
    order = 40
    config_class = AudioConfig
    asset_settings = ("sample_rate", "n_mels", "win_ms", "hop_ms", "token", "frames_per_token", "patch_freq",
                      "patch_time", "norm", "stats_clips", "targets", "target_clusters", "target_clips")
    config_help = "audio modality"
    masks = ("audio",)
    masks_what = "audio tokens"
    masker_hint = " (time_span: wav2vec 2.0 / HuBERT spans over time; spec_patch: AudioMAE patches)"

    @classmethod
    def downstream_inputs(cls) -> type:
        from mmm.modalities.audio.downstream import AudioInputs

        return AudioInputs

    @classmethod
    def downstream_tasks(cls) -> Dict[str, Any]:
        from mmm.modalities.audio.downstream import audio_tasks

        return audio_tasks()

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.audio
        c = self.cfg
        try:
            self.frontend_config = frontend_config(c)
        except ValueError as e:
            raise ValueError(f"model.audio: {e}") from None
        unknown = [k for k in c.targets if k not in TARGET_KINDS]
        if unknown or len(set(c.targets)) != len(c.targets):
            raise ValueError(f"model.audio.targets must be distinct kinds from {TARGET_KINDS}, got {c.targets}")
        if c.targets and c.target_clusters < 2:
            raise ValueError(f"model.audio.target_clusters must be >= 2, got {c.target_clusters}")
        if c.max_seconds <= 0:
            raise ValueError(f"model.audio.max_seconds must be > 0, got {c.max_seconds}")
        rows = 1 if c.token == "time" else c.n_mels // c.patch_freq
        if c.max_tokens < rows:
            raise ValueError(f"model.audio.max_tokens={c.max_tokens} is smaller than one time column of patch tokens "
                             f"({rows} frequency patches)")
        self.frontend: Optional[AudioFrontend] = None
        self.codebooks: Dict[str, Any] = {}

    def token_targets(self) -> Dict[str, int]:
        """``<name>_<kind>`` for each of ``model.audio.targets``: k-means ids of ``target_clusters`` classes."""
        return {f"{self.name}_{kind}": self.cfg.target_clusters for kind in self.cfg.targets}

    # ------------------------------------------------------------------ assets

    def prepare(self, train_urls: List[str], run_dir: Path, options: Optional[ReadOptions] = None) -> None:
        from mmm.modalities.audio.pipeline import single_thread

        with single_thread():
            self._prepare(train_urls, run_dir / ASSET_DIR, options)

    def _prepare(self, train_urls: List[str], own: Path, options: Optional[ReadOptions] = None) -> None:
        if (own / FRONTEND_FILE).is_file():
            self.frontend = self._frontend_from_text((own / FRONTEND_FILE).read_text(encoding="utf-8"),
                                                     str(own / FRONTEND_FILE))
        else:
            self.frontend = self.fit_frontend(train_urls, options)
            self.frontend.save(own)
        missing = []
        for kind in self.cfg.targets:
            path = own / codebook_file(kind)
            if path.is_file():
                self.codebooks[kind] = self._codebook_from_text(path.read_text(encoding="utf-8"), str(path))
            else:
                missing.append(kind)
        if missing:
            for kind, codebook in self.fit_codebooks(train_urls, missing, options).items():
                self.codebooks[kind] = codebook
                (own / codebook_file(kind)).write_text(codebook.to_json(), encoding="utf-8")

    def fit_frontend(self, urls: List[str], options: Optional[ReadOptions] = None) -> AudioFrontend:
        """Log-mel normalisation statistics over up to ``stats_clips`` training clips."""
        logger.info("fitting audio normalisation statistics on up to %d clips", self.cfg.stats_clips)
        frontend = AudioFrontend(self.frontend_config)
        read = [0]

        def clips():
            for clip in iter_training_clips(urls, self.cfg.stats_clips, options, frontend):
                read[0] += 1
                yield clip

        try:
            return frontend.fit_stats(clips())
        except AudioDecodeError:  # a bad clip, already named by shard and key
            raise
        except ValueError as e:
            if read[0]:  # the statistics' own error, about clips that were read
                raise
            raise ValueError(f"no training audio to fit the front-end statistics on (shards: {urls[:3]}): "
                             f"{e}") from None

    def fit_codebooks(self, urls: List[str], kinds: List[str], options: Optional[ReadOptions] = None) -> Dict[str, Any]:
        """One k-means codebook per target kind (``target_clusters``, seed 0) over the per-token
        features of up to ``target_clips`` training clips (read once for all kinds)."""
        from mmm.targets.kmeans import Codebook

        probe = AudioFrontend(self.frontend_config)  # acoustic features need no statistics
        feats: Dict[str, List[np.ndarray]] = {kind: [] for kind in kinds}
        clips = 0
        for wav, sr in iter_training_clips(urls, self.cfg.target_clips, options, probe):
            clips += 1
            for kind in kinds:
                feats[kind].append(probe.acoustic_features(wav, sr, kind))
        codebooks = {}
        for kind in kinds:
            rows = sum(len(f) for f in feats[kind])
            if rows < self.cfg.target_clusters:
                raise ValueError(f"model.audio.target_clusters={self.cfg.target_clusters} but the {clips} training "
                                 f"clip(s) read give only {rows} tokens to cluster ({kind}); lower target_clusters or "
                                 f"raise target_clips")
            logger.info("fitting a %d-cluster %s codebook on %d tokens of %d clips", self.cfg.target_clusters, kind,
                        rows, clips)
            codebooks[kind] = Codebook.fit(np.concatenate(feats[kind]), self.cfg.target_clusters, seed=0)
        return codebooks

    def _frontend_from_text(self, text: str, where: str) -> AudioFrontend:
        try:
            frontend = AudioFrontend.from_dict(json.loads(text))
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: the audio front end cannot be read: {e}") from None
        if frontend.config != self.frontend_config:
            raise ValueError(f"{where}: the saved audio front end {frontend.config} does not match model.audio "
                             f"({self.frontend_config}); use a new run folder or delete the saved assets")
        if not frontend.fitted:
            raise ValueError(f"{where}: the saved audio front end has no normalisation statistics")
        return frontend

    def _codebook_from_text(self, text: str, where: str) -> Any:
        from mmm.targets.kmeans import Codebook, CodebookError

        try:
            codebook = Codebook.from_json(text)
        except CodebookError as e:
            raise ValueError(f"{where}: {e}") from None
        if codebook.k != self.cfg.target_clusters:
            raise ValueError(f"{where}: the codebook has {codebook.k} clusters but model.audio.target_clusters="
                             f"{self.cfg.target_clusters}")
        return codebook

    def assets(self) -> Dict[str, str]:
        if self.frontend is None:
            return {}
        files = {FRONTEND_FILE: json.dumps(self.frontend.to_dict())}
        files.update({codebook_file(kind): cb.to_json() for kind, cb in self.codebooks.items()})
        return files

    def load_assets(self, files: Dict[str, str], where: str) -> None:
        if FRONTEND_FILE not in files:
            raise ValueError(f"{where}: the checkpoint holds no audio front end ({FRONTEND_FILE}); has {sorted(files)}")
        self.frontend = self._frontend_from_text(files[FRONTEND_FILE], where)
        missing = [codebook_file(k) for k in self.cfg.targets if codebook_file(k) not in files]
        if missing:
            raise ValueError(f"{where}: model.audio.targets={self.cfg.targets} but the checkpoint lacks {missing}")
        self.codebooks = {k: self._codebook_from_text(files[codebook_file(k)], where) for k in self.cfg.targets}

    # ------------------------------------------------------------------ parts

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        c = self.cfg
        return EMBEDDERS.create("audio", feature_dim=self.frontend_config.token_dim, dim=encoder_cfg.dim,
                                max_len=c.max_tokens, position=c.position, embed_norm=c.embed_norm,
                                norm_eps=encoder_cfg.norm_eps, dropout=encoder_cfg.dropout)

    def build_masker(self, masking: ComponentConfig) -> Any:
        masker = self.create_masker(masking)
        if masking.name == "spec_patch" and self.cfg.token == "time" and masker.structure in ("freq", "time_freq"):
            raise ValueError(f"masking spec_patch with structure {masker.structure!r} hides frequency rows, but "
                             "model.audio.token is 'time' (one row: everything would be hidden); use token: patch, "
                             "or structure none/time")
        return masker

    def _columns(self) -> int:
        from mmm.modalities.audio.pipeline import max_columns

        return max_columns(self._frontend(), self.cfg.max_seconds, self.cfg.max_tokens)

    def _frontend(self) -> AudioFrontend:
        if self.frontend is None:
            raise RuntimeError("audio modality: call prepare() or load_assets() first (no fitted front end yet)")
        return self.frontend

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        """Audio has no augmentation: training and evaluation streams differ only in their masks."""
        self.reject_options(options)
        from mmm.modalities.audio.pipeline import audio_stages

        missing = [k for k in self.cfg.targets if k not in self.codebooks]
        if masker is not None and missing:
            raise RuntimeError(f"audio modality: no codebook for target(s) {missing}; call prepare() first")
        return audio_stages(self._frontend(), self.codebooks, masker, columns=self._columns(),
                            max_len=self.cfg.max_tokens, batch_size=batch_size,
                            seed=seed, handler=handler, fixed_masking=fixed_masking, epochs=epochs, modality=self.name)

    def settings(self) -> Dict[str, Any]:
        c = self.cfg
        return {"token": c.token, "token_dim": self.frontend_config.token_dim, "hop_ms": c.hop_ms,
                "max_seconds": c.max_seconds, "max_tokens": c.max_tokens, "targets": list(c.targets)}

    # ------------------------------------------------------------------ standalone encoder

    @classmethod
    def encoder_from_checkpoint(cls, contents: Any) -> nn.Module:
        """The :class:`~mmm.modalities.audio.embedder.AudioEncoder` of a read checkpoint, with its fitted
        front end (eval mode)."""
        state = contents.modality_state(cls.name)  # first: names the checkpoint's modalities when audio is not one
        modality = contents.modality(cls.name)
        enc = AudioEncoder.from_config(audio_encoder_config(contents.config.model), modality.frontend)
        load_weights(enc, state, contents.path)
        return contents.finish_encoder(enc, cls.name)

    @classmethod
    def encoder_meta(cls, encoder: nn.Module) -> Dict[str, Any]:
        """The front end's file name (or None without one); a front end must be fitted and fit the embedder."""
        if encoder.frontend is not None and not encoder.frontend.fitted:
            raise ValueError("save_encoder: the audio encoder's front end has no normalisation statistics; fit it "
                             "(AudioFrontend.fit_stats) or detach it (frontend=None) before saving")
        if encoder.frontend is not None and encoder.frontend.token_dim != encoder.embedder.feature_dim:
            raise ValueError(f"save_encoder: the front end gives {encoder.frontend.token_dim} values per token but "
                             f"the encoder expects {encoder.embedder.feature_dim}")
        return {"frontend": FRONTEND_FILE if encoder.frontend is not None else None}

    @classmethod
    def save_encoder_files(cls, encoder: nn.Module, directory: Path) -> None:
        if encoder.frontend is not None:
            encoder.frontend.save(directory)

    @classmethod
    def load_saved_encoder(cls, directory: Path, meta: Dict[str, Any]) -> nn.Module:
        from mmm.encoders import ENCODER_META_FILE, load_saved_weights, parse_encoder_config

        meta_path = directory / ENCODER_META_FILE
        acfg = parse_encoder_config(AudioEncoderConfig, meta, directory)
        frontend = None
        name = meta.get("frontend")
        if name is not None:
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{meta_path}: 'frontend' must be a file name in the folder, got {name!r}")
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{meta_path} names the audio front end {name}, but {directory / name} is missing")
            frontend = AudioFrontend.load(directory / name)
            if not frontend.fitted:
                raise ValueError(f"{directory / name}: the audio front end has no normalisation statistics")
            if frontend.token_dim != acfg.feature_dim:
                raise ValueError(f"{directory / name}: the front end gives {frontend.token_dim} values per token but "
                                 f"{meta_path} says feature_dim={acfg.feature_dim}")
        return load_saved_weights(AudioEncoder.from_config(acfg, frontend), directory)


def audio_encoder_config(model_cfg: ModelConfig) -> AudioEncoderConfig:
    """The standalone :class:`~mmm.modalities.audio.embedder.AudioEncoderConfig` of a run's :class:`~mmm.config.ModelConfig`."""
    a, e = model_cfg.audio, model_cfg.encoder
    front = frontend_config(a)
    return AudioEncoderConfig(encoder=e, feature_dim=front.token_dim, max_len=a.max_tokens,
                              position=a.position, embed_norm=a.embed_norm, norm_eps=e.norm_eps, dropout=e.dropout,
                              max_seconds=a.max_seconds,
                              grid_rows=1 if front.token == "time" else front.n_mels // front.patch_freq)

