"""What a run trains: its tasks, the modalities they feed, and the embedders those modalities build.

A run has one or more *tasks* (:class:`~mmm.config.TaskConfig`). A task names a dataset
definition, a masker and the heads its batches train; each training step of a multi-task run
draws one task by weight (UNITER's task sampling, Chen et al. 2020) and trains on a batch of that
task only. A config without ``tasks`` is one implicit task made of ``data``, ``masking`` and all
``objectives``, which is how every single-modality preset is written.

The dataset of a task feeds a :class:`~mmm.modalities.base.Modality`. A *base* modality (text,
image, regions, audio, DNA) owns an embedder and its assets; a *composite* one (``image_text``)
feeds the embedders of several base modalities (:meth:`~mmm.modalities.base.Modality.uses`) and
gets them through :meth:`~mmm.modalities.base.Modality.bind`. One instance of each modality
serves every task that uses it, so text MLM and image-text MLM share one tokenizer and one token
embedding, and every task shares the one encoder: a multi-task run trains **one shared encoder**
(ONE-PEACE, data2vec: one model for all modalities).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


import mmm.masking  # noqa: F401  (registers maskers)
import mmm.modalities.builtin  # noqa: F401  (registers modalities)
from mmm.config import ComponentConfig, ConfigError, PretrainConfig, TaskConfig
from mmm.data.stream import list_shards, local_path
from mmm.data.tar import ReadOptions
from mmm.model import check_head_selection, head_name
from mmm.modalities.base import Modality
from mmm.masking.base import TokenVocab
from mmm.registry import DATASETS, MASKERS, MODALITIES, OBJECTIVES, RegistryError

logger = logging.getLogger(__name__)


def resolve_shards(spec: str, dataset: str, split: str) -> List[str]:
    """Shard urls for a data spec: ``embedded`` (the dataset's built-in default), a folder, or a pattern.

    Args:
        spec: ``embedded``, a directory, a brace pattern or a single shard path.
        dataset: dataset definition name (for ``embedded``).
        split: ``train`` or ``val``.
    """
    if spec == "embedded":
        spec = str(DATASETS.create(dataset).embedded_default())
    return list_shards(spec, split=split)  # the split filters folder listings (also ~/x and file:x ones) only


SAME_AS_TRAIN = "same"
"""``val: same``: validate on the val split of the training source (its folder's ``val-*.tar``, or the embedded set's)."""


def resolve_val_shards(task: TaskConfig) -> Optional[List[str]]:
    """The validation shard urls of ``task`` (None: no validation). ``val: same`` takes the val split of ``train``:
    the embedded set's, or the ``val-*.tar`` shards of the training folder (none there: no validation, logged).

    Raises:
        ConfigError: ``val: same`` with a training pattern, file or url, whose val split cannot be told apart.
    """
    if task.val is None:
        return None
    where = f"task {task.name!r}" if task.name else "data"
    if task.val != SAME_AS_TRAIN:
        return resolve_shards(task.val, task.dataset, "val")
    if task.train != "embedded" and not Path(local_path(task.train)).expanduser().is_dir():
        raise ConfigError(f"{where}: val is 'same' (the val split of train), but train {task.train!r} is not a shard "
                          f"folder; set val to the validation shards (a folder, a pattern) or null")
    try:
        return resolve_shards(task.train, task.dataset, "val")
    except FileNotFoundError:
        logger.warning("%s: no val-*.tar shards in the training folder %s (val: same): this run has no validation for "
                       "it; set val to validation shards to have some", where, task.train)
        return None


def scoring_val_shards(task: TaskConfig) -> List[str]:
    """The held-out shards to score a trained ``task`` on: its validation shards (:func:`resolve_val_shards`), or the
    embedded set's val split when it validates on nothing."""
    return resolve_val_shards(dataclasses.replace(task, val=task.val or "embedded")) or \
        resolve_shards("embedded", task.dataset, "val")


def masking_field(task: TaskConfig, index: int) -> str:
    """The config field of a task's masking entry, for messages: ``masking``, or ``tasks[i].masking (task 'x')``."""
    return "masking" if not task.name else f"tasks[{index}].masking (task {task.name!r})"


STAND_IN_VOCAB = TokenVocab(size=64, mask_id=4, special_ids=frozenset(range(5)))
"""The vocabulary :func:`check_masking_args` builds token maskers with before the real one is fitted."""


def check_masking_args(tasks: List[TaskConfig], objectives: List[ComponentConfig]) -> None:
    """Build every task's masker once with :data:`STAND_IN_VOCAB`, before any tokenizer is fitted, so a bad
    masking name, argument name or value is refused in seconds instead of after the assets' fit; then let
    each head the task trains refuse a masker it cannot learn from (an objective's ``check_masker``).

    Raises:
        ConfigError: naming the task's masking field and what the masker or the head refused.
    """
    heads = {head_name(o): o for o in objectives}
    for i, t in enumerate(tasks):
        try:
            fn = MASKERS.get(t.masking.name)
            injected = {"vocab": STAND_IN_VOCAB} if "vocab" in inspect.signature(fn).parameters else {}
            masker = MASKERS.create(t.masking.name, **injected, **t.masking.args)
            for head in t.objectives:
                check = getattr(OBJECTIVES.get(heads[head].name), "check_masker", None) if head in heads else None
                if check is not None:
                    check(masker)
        except (ValueError, TypeError, RegistryError) as exn:
            raise ConfigError(f"{masking_field(t, i)}: {exn}") from None


def build_maskers(tasks: List[TaskConfig], feeds: Dict[str, Modality]) -> Dict[str, Any]:
    """Each task's masker, built by the modality its dataset feeds (after the assets are fitted).

    Raises:
        ConfigError: naming the task's masking field and what the modality or the masker refused.
    """
    out = {}
    for i, t in enumerate(tasks):
        try:
            out[t.name] = feeds[t.name].build_masker(t.masking)
        except ConfigError:
            raise
        except (ValueError, TypeError, RegistryError) as exn:
            raise ConfigError(f"{masking_field(t, i)}: {exn}") from None
    return out


def modality_of(dataset: str) -> str:
    """The modality a dataset definition feeds (its ``modality`` attribute, else its name)."""
    return getattr(DATASETS.get(dataset), "modality", dataset)


def task_configs(cfg: PretrainConfig) -> List[TaskConfig]:
    """The run's tasks, checked: ``cfg.tasks``, or the one implicit task of a single-task config.

    The implicit task has the empty name, so its batches run every head (and metric names carry
    no task prefix, as in every single-modality preset).
    """
    heads = [head_name(o) for o in cfg.objectives]
    if not cfg.tasks:
        d = cfg.data
        return [TaskConfig(name="", dataset=d.dataset, train=d.train, val=d.val, weight=1.0, masking=cfg.masking,
                           objectives=heads)]
    defaults = PretrainConfig()
    for key in ("data.dataset", "data.train", "data.val", "masking"):  # each task names its own: these would be unused
        value, default = (functools.reduce(getattr, key.split("."), c) for c in (cfg, defaults))
        field_name = key.rsplit(".", 1)[-1]
        # data.val: null = no validation at all; "embedded" was the default before "same" (older configs, checkpoints)
        if value != default and not (key == "data.val" and value in (None, "embedded")):
            shown = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            raise ValueError(f"{key} is {shown!r}, but a config with tasks gives each task its own {field_name}; set it "
                             "per task: " + ", ".join(f"tasks.{i}.{field_name} ({t.name})" for i, t in enumerate(cfg.tasks)))
    seen, used = set(), set()
    for i, t in enumerate(cfg.tasks):
        where = f"tasks[{i}]"
        if not t.name or not t.name.replace("_", "").isalnum():
            raise ValueError(f"{where}.name must be a non-empty identifier (letters, digits, _), got {t.name!r}")
        if t.name in seen:
            raise ValueError(f"{where}.name {t.name!r} is used by two tasks; task names must be unique")
        seen.add(t.name)
        if not t.weight > 0:
            raise ValueError(f"{where}.weight must be > 0 (task {t.name!r}), got {t.weight}")
        check_head_selection(f"{where}.objectives (task {t.name!r})", t.objectives, heads)
        if t.batch_size is not None and t.batch_size < 1:
            raise ValueError(f"{where}.batch_size must be >= 1 or null, got {t.batch_size}")
        used.update(t.objectives)
    idle = [h for h in heads if h not in used]
    if idle:
        raise ValueError(f"objective(s) {idle} are trained by no task; list them in a task's objectives or remove them")
    if cfg.data.val is None:
        return [dataclasses.replace(t, val=None) for t in cfg.tasks]
    return list(cfg.tasks)


@dataclass
class RunModalities:
    """The modality instances of a run.

    Args:
        base: base modality name → instance, in the order embedders are built (it fixes the rows
            of the model's modality embedding, so it is saved in checkpoints).
        feeds: task name → the modality its dataset feeds (a base or a composite instance).
        urls: base or composite modality name → training shards of every task that uses it
            (what its assets are fitted on).
        read_options: how asset fitting reads those shards: the run's ``data.max_member_bytes``,
            ``data.read_timeout_s`` and ``data.skip_bad``, as training reads them.
    """

    base: Dict[str, Modality]
    feeds: Dict[str, Modality]
    urls: Dict[str, List[str]] = field(default_factory=dict)
    read_options: ReadOptions = field(default_factory=ReadOptions)

    @property
    def composites(self) -> Dict[str, Modality]:
        """Composite modalities (those that are not base modalities), by name."""
        out: Dict[str, Modality] = {}
        for feed in self.feeds.values():
            if feed.name not in self.base:
                out[feed.name] = feed
        return out

    def assets(self) -> Dict[str, Dict[str, str]]:
        """Modality name → asset files, for checkpoints."""
        out = {name: m.assets() for name, m in self.base.items()}
        out.update({name: m.assets() for name, m in self.composites.items()})
        return out



def build_modalities(cfg: PretrainConfig, tasks: List[TaskConfig],
                     train_urls: Optional[Dict[str, List[str]]] = None) -> RunModalities:
    """Instantiate and bind the modalities ``tasks`` feed (assets not prepared yet).

    Args:
        cfg: the run's configuration (each modality reads its section of ``cfg.model``).
        tasks: from :func:`task_configs`.
        train_urls: task name → training shards (fills :attr:`RunModalities.urls`); None = empty.
    """
    instances: Dict[str, Modality] = {}

    def get(name: str, why: str) -> Modality:
        if name not in instances:
            if name not in MODALITIES:
                raise ValueError(f"{why} feeds modality {name!r}, which has no Modality registered; "
                                 f"known: {MODALITIES.list()}")
            instances[name] = MODALITIES.create(name, model_cfg=cfg.model)
            if instances[name].name != name:  # embedders, batches and checkpoints are keyed by it
                raise ValueError(f"modality {name!r} ({type(instances[name]).__name__}) has name "
                                 f"{instances[name].name!r}: set its class attribute name = {name!r}, the name it is "
                                 f"registered under")
        return instances[name]

    feeds: Dict[str, Modality] = {}
    base: Dict[str, Modality] = {}
    urls: Dict[str, List[str]] = {}
    for t in tasks:
        feed = get(modality_of(t.dataset), f"dataset {t.dataset!r} (task {t.name or 'the run'})")
        feeds[t.name] = feed
        for used in feed.uses():
            base.setdefault(used, feed if used == feed.name else get(used, f"modality {feed.name!r}"))
            for name in {used, feed.name}:
                urls.setdefault(name, [])
                for u in (train_urls or {}).get(t.name, []):
                    if u not in urls[name]:
                        urls[name].append(u)
    for feed in {id(f): f for f in feeds.values()}.values():
        feed.bind({name: base[name] for name in feed.uses()})
    return RunModalities(base, feeds, urls, ReadOptions.from_config(cfg.data))


def prepare_modalities(mods: RunModalities, run_dir: Path) -> None:
    """Fit or load every modality's assets (base modalities first: composites use their tokenizers).

    Shards are read with ``mods.read_options`` (the run's ``data.*`` read settings).
    """
    for name, m in mods.base.items():
        m.prepare(mods.urls.get(name, []), run_dir, mods.read_options)
    for name, m in mods.composites.items():
        m.prepare(mods.urls.get(name, []), run_dir, mods.read_options)


def modalities_from_checkpoint(contents: Any) -> RunModalities:
    """The run's modalities with their assets restored from a read checkpoint
    (:class:`~mmm.encoders.CheckpointContents`)."""
    cfg = contents.config
    mods = build_modalities(cfg, task_configs(cfg))
    order = getattr(contents, "modality_order", None)
    if order and list(order) != list(mods.base):
        if sorted(order) != sorted(mods.base):
            raise ValueError(f"{contents.path}: the checkpoint's modalities {list(order)} differ from those its "
                             f"config builds {list(mods.base)}")
        mods.base = {name: mods.base[name] for name in order}
    for name, m in {**mods.base, **mods.composites}.items():
        m.load_assets(contents.assets.get(name, {}), str(contents.path))
    return mods


def check_before_fit(cfg: PretrainConfig, tasks: List[TaskConfig], mods: RunModalities) -> None:
    """What can be refused before the assets' fit, which can take minutes: each task's masker
    (:func:`check_masking_args`), each head's argument values (built once with stand-in embedders,
    :func:`~mmm.objectives.dry_build.check_objective_args`), the codebook heads' targets against what the
    modalities produce (:func:`~mmm.objectives.target_check.check_token_targets`), and each modality's objective
    checks (image: visual-token targets in MAE mode)."""
    from mmm.objectives.dry_build import check_objective_args
    from mmm.objectives.target_check import check_token_targets

    check_masking_args(tasks, cfg.objectives)
    check_objective_args(cfg.objectives, cfg.model.encoder, mods.base)
    check_token_targets(cfg.objectives, mods.base.values())
    for m in mods.base.values():
        m.check_objectives(cfg.objectives)


def prepare_run_assets(cfg: PretrainConfig) -> RunModalities:
    """Fit (or reuse) every modality's assets of ``cfg`` into its run folder, without training.

    ``mmm prepare`` calls this: the tokenizer, normalisation statistics and k-means codebooks
    (HuBERT targets, BEiT-style visual tokens) are fitted offline on the training shards and saved
    in ``trainer.default_root_dir``; ``mmm pretrain`` with the same folder then reuses them
    instead of fitting again (as a resumed run does).

    Args:
        cfg: the run's configuration.
    """
    from mmm.train.settings_check import check_portable_settings

    check_portable_settings(cfg)  # not the machine's: assets may be fitted on another machine than the run's
    run_dir = Path(cfg.trainer.default_root_dir)
    tasks = task_configs(cfg)
    train_urls = {t.name: resolve_shards(t.train, t.dataset, "train") for t in tasks}
    mods = build_modalities(cfg, tasks, train_urls)
    check_before_fit(cfg, tasks, mods)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_modalities(mods, run_dir)
    return mods
