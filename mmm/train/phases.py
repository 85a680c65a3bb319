"""Phased runs: consecutive shares of the steps, each training only some of the heads.

The CLM-vs-MLM study (Gisserot-Boukhlef et al. 2025, "Should We Still Pretrain Encoders with
Masked Language Modeling?") finds that, at a fixed compute budget, training causal language
modeling first and masked language modeling after ("biphasic") beats either alone. A config says

.. code-block:: yaml

    phases:
      - {objectives: [clm], fraction: 0.4}
      - {objectives: [mlm], fraction: 0.6}

and :class:`PhaseSchedule` turns it into step boundaries over ``trainer.max_steps``. The phase of
a training step is a pure function of the global step (as the task of a step in
:mod:`mmm.train.mixture` is), so a resumed run continues in exactly the phase, and at exactly the
switch, of an uninterrupted one. The trainer logs the phase index as ``train/phase``. Validation
scores every head (each head group in its own encoder pass, see :meth:`mmm.model.MaskedModel.forward`),
so the curves of all phases' heads are comparable across the whole run.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from mmm.config import ConfigError, PhaseConfig, PretrainConfig
from mmm.model import check_head_selection, head_name

FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PhaseSchedule:
    """Which heads train at each global step.

    Args:
        heads: per phase, the names of the heads it trains, in order.
        ends: per phase, the first global step after it (the last one is ``max_steps``), increasing.
    """

    heads: Tuple[Tuple[str, ...], ...]
    ends: Tuple[int, ...]

    def index_at(self, step: int) -> int:
        """The phase (0-based) of global step ``step``; steps at or past ``max_steps`` stay in the last phase."""
        return min(bisect.bisect_right(self.ends, step), len(self.ends) - 1)

    def heads_at(self, step: int) -> Tuple[str, ...]:
        """The heads trained at global step ``step``."""
        return self.heads[self.index_at(step)]

    @property
    def all_heads(self) -> List[str]:
        """Every head some phase trains, in first-use order."""
        return list(dict.fromkeys(h for group in self.heads for h in group))


def check_phases(phases: Sequence[PhaseConfig], heads: Sequence[str], multi_task: bool) -> None:
    """Refuse a ``phases`` list that cannot be scheduled, naming the entry and what was expected.

    Args:
        phases: the config's phases.
        heads: the run's head names (objective labels or names).
        multi_task: the run has ``tasks`` (phases choose heads per step; tasks already do).
    """
    if not phases:
        return
    if multi_task:
        raise ConfigError("phases: a phased run has one task (data, masking and objectives); config.tasks chooses "
                          "heads per step already, so combine the two by running the phases as separate runs with "
                          "model.init_from")
    known = set(heads)
    used = set()
    for i, phase in enumerate(phases):
        check_head_selection(f"phases[{i}].objectives", phase.objectives, heads, ConfigError)
        if not 0 < phase.fraction <= 1:
            raise ConfigError(f"phases[{i}].fraction must be in (0, 1], got {phase.fraction!r}")
        used.update(phase.objectives)
    total = sum(p.fraction for p in phases)
    if abs(total - 1.0) > FRACTION_TOLERANCE:
        raise ConfigError(f"phases: the fractions must sum to 1 (each is a share of trainer.max_steps), got "
                          f"{' + '.join(str(p.fraction) for p in phases)} = {total:.6g}")
    idle = sorted(known - used)
    if idle:
        raise ConfigError(f"phases: head(s) {idle} are in config.objectives but in no phase, so they would never "
                          f"train; add them to a phase or remove them from objectives")


def build_schedule(cfg: PretrainConfig) -> "PhaseSchedule | None":
    """The run's :class:`PhaseSchedule` (None without ``phases``), checked by :func:`check_phases`.

    Phase ``i`` ends at step ``round(max_steps * (f_0 + ... + f_i))``; every phase must get at least one step.
    """
    heads = [head_name(o) for o in cfg.objectives]
    check_phases(cfg.phases, heads, multi_task=bool(cfg.tasks))
    if not cfg.phases:
        return None
    max_steps = cfg.trainer.max_steps
    ends, cumulative = [], 0.0
    for phase in cfg.phases:
        cumulative += phase.fraction
        ends.append(int(round(max_steps * cumulative)))
    ends[-1] = max_steps  # the fractions sum to 1 within the tolerance: the last phase runs to the end
    starts = [0] + ends[:-1]
    for i, (start, end) in enumerate(zip(starts, ends)):
        if end <= start:
            raise ConfigError(f"phases[{i}] (fraction {cfg.phases[i].fraction}) gets no step of trainer.max_steps "
                              f"{max_steps}; raise its fraction or max_steps")
    return PhaseSchedule(tuple(tuple(p.objectives) for p in cfg.phases), tuple(ends))
