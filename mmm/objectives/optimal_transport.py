"""Batched optimal transport by IPOT, for UNITER's word-region alignment.

IPOT (Xie et al. 2018, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance")
solves ``min_T <C, T>`` over plans with marginals ``mu``, ``nu`` by the inexact proximal point
iteration ``T ← argmin <C, T> + β KL(T ‖ T_prev)``: each step is an entropic OT problem with the
kernel ``exp(−C/β) ⊙ T_prev``, solved approximately by a few Sinkhorn scalings (one is enough in
practice). Unlike plain Sinkhorn, it converges to the *exact* OT plan for any β, so β only
trades speed for stability. UNITER (Chen et al. 2020, Sec. 3.1) uses β = 0.5, 50 iterations and
one inner step, with the cosine distance between contextualised word and region embeddings.

Everything runs batched over padded problems with masks; padded rows/columns get zero mass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mmm.objectives.base import full_precision


def pad_by_group(x: torch.Tensor, group: torch.Tensor, num_groups: int,
                 longest: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter rows into a padded per-group tensor, keeping their order inside each group.

    Args:
        x: (K, D) rows.
        group: (K,) int64 group of each row (0 ≤ group < num_groups; any order).
        num_groups: G.
        longest: the largest group's size when the host knows it (then no device read); else it is read.

    Returns:
        ``(padded (G, L, D), mask (G, L) bool)`` with L the largest group (at least 1); ``mask``
        is True at real rows.
    """
    counts = torch.zeros(num_groups, dtype=torch.long, device=group.device).index_add_(
        0, group, torch.ones_like(group))  # (G,) rows per group
    if longest is None:
        longest = int(counts.max()) if group.numel() else 0
    length = max(longest, 1)
    order = torch.argsort(group, stable=True)  # rows grouped, original order inside a group
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    g_sorted = group[order]
    slot = torch.arange(group.numel(), device=group.device) - starts[g_sorted]  # rank inside its group
    padded = x.new_zeros(num_groups, length, x.shape[-1])
    padded[g_sorted, slot] = x[order]
    mask = torch.zeros(num_groups, length, dtype=torch.bool, device=x.device)
    mask[g_sorted, slot] = True
    return padded, mask


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, n, D), (B, m, D) → (B, n, m) cosine distance ``1 − cos(x_i, y_j)``, in fp32 (also under autocast)."""
    with full_precision(x.device):
        return 1.0 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(1, 2)


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, beta: float = 0.5, iterations: int = 50,
         inner: int = 1) -> torch.Tensor:
    """Transport plans between uniform marginals over the real rows and columns, by IPOT.

    Args:
        cost: (B, n, m) cost matrices (no gradient flows through the plan).
        x_mask: (B, n) bool, True at real rows; each problem's row marginal is uniform over them.
        y_mask: (B, m) bool, True at real columns.
        beta: proximal step size β (smaller = closer to exact per step, less stable).
        iterations: outer proximal iterations.
        inner: Sinkhorn scalings per outer iteration.

    Returns:
        (B, n, m) float32 plans ``T`` with ``T 1 ≈ mu``, ``Tᵀ 1 ≈ nu``, zero on padding.
    """
    if beta <= 0 or iterations < 1 or inner < 1:
        raise ValueError(f"ipot needs beta > 0, iterations ≥ 1 and inner ≥ 1; got beta={beta}, "
                         f"iterations={iterations}, inner={inner}")
    c = cost.float()
    xm, ym = x_mask.float(), y_mask.float()  # (B, n), (B, m)
    mu = xm / xm.sum(-1, keepdim=True).clamp_min(1.0)  # (B, n) uniform over real rows
    nu = ym / ym.sum(-1, keepdim=True).clamp_min(1.0)  # (B, m)
    valid = xm[:, :, None] * ym[:, None, :]  # (B, n, m)
    kernel = torch.exp(-c / beta) * valid  # (B, n, m), zero on padding
    plan = valid.clone()
    sigma = nu.clone()  # (B, m)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = kernel * plan  # (B, n, m)
        for _ in range(inner):
            delta = mu / (q @ sigma[:, :, None]).squeeze(-1).clamp_min(tiny)  # (B, n)
            sigma = nu / (q.transpose(1, 2) @ delta[:, :, None]).squeeze(-1).clamp_min(tiny)  # (B, m)
        plan = delta[:, :, None] * q * sigma[:, None, :]  # (B, n, m)
    return plan


def ot_distance(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, beta: float = 0.5,
                iterations: int = 50, inner: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimal transport distance ``<C, T*>`` per problem, differentiable in ``cost`` (plan held fixed).

    The plan is computed on the detached cost, as UNITER does; by the envelope theorem the
    gradient of the OT value with respect to the cost is the optimal plan itself.

    Args:
        cost: (B, n, m) costs.
        x_mask: (B, n) bool real rows.
        y_mask: (B, m) bool real columns.
        beta: IPOT proximal step.
        iterations: IPOT outer iterations.
        inner: Sinkhorn scalings per iteration.

    Returns:
        ``(distance (B,), plan (B, n, m))``.
    """
    plan = ipot(cost.detach(), x_mask, y_mask, beta, iterations, inner)  # (B, n, m)
    distance = (cost.float() * plan).sum((1, 2))  # (B,)
    return distance, plan
