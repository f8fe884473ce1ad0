"""Power-mean (free-energy) and AGM group advantages (pure torch, no verl import).

For the rewards R_1..R_n of one prompt's group and a risk parameter beta, the group
objective is the free energy (entropic risk measure, log of the power mean of the
utilities e^R):

    F_beta = (1/beta) log mean_j exp(beta R_j) = log M_beta(e^R)

and its policy gradient, E[exp(beta R) grad log pi] / (beta E[exp(beta R)]), has the
per-sample advantage (subtracting the baseline 1/beta, which has zero expectation)

    A_i = (1/beta) (exp(beta R_i) / mean_j exp(beta R_j) - 1) = expm1(beta (R_i - F_beta)) / beta.

The last form is how it is computed: F_beta comes from the log-space power mean of
`hmpo_verl.means` (accurate as beta -> 0), and beta (R_i - F_beta) <= log n, so nothing
overflows for |beta R| in the hundreds or more. beta -> 0 gives R_i - mean(R) (GRPO
without std normalisation); beta < 0 is risk-averse, beta > 0 risk-seeking (RS-GRPO,
arXiv 2509.24261, recommends beta = 2). Sum_i A_i = 0 exactly in every group
("advantage conservation").

AGM advantage (the advantage counterpart of the AGM ratio): with M_beta(u) and
M_-beta(u) of u = e^R, the arithmetic-harmonic iteration converges to
sqrt(M_beta M_-beta), so the group objective is G_beta = (F_beta + F_-beta) / 2 and, the
gradient being linear, its advantage is the average of the two power-mean advantages:
    A_i = (A_i(beta) + A_i(-beta)) / 2.
It is even in beta (G_beta = G_-beta), tends to R_i - mean(R) as beta -> 0, and sums to
0 in every group.
"""

from __future__ import annotations

from typing import Iterable

import torch

from hmpo_verl.maths.means import GEOMETRIC_BELOW, log_power_mean

__all__ = ["group_ids", "power_mean_advantage", "agm_advantage", "group_sums", "group_std"]


def group_ids(index: Iterable) -> tuple[torch.Tensor, list]:
    """Map verl's per-response `uid`s to group numbers, grouping exactly as verl's estimators.

    verl's `compute_grpo_outcome_advantage` groups with a Python dict keyed by `index[i]`,
    so uids are grouped by value (hash and ==): 1, 1.0, True and numpy's int64(1) are one
    group, the string "1" is another. The same is done here, over the elements of a list
    or a numpy array (object, integer or string dtype); a torch tensor is read as its
    `tolist()`. A uid that is not equal to itself (NaN) or not hashable is an error naming
    the response.

    Returns `(ids, uids)`: `ids` (B,) int64 in [0, G), and `uids` the G group keys in order
    of first appearance.
    """
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    groups: dict = {}
    ids = []
    for i, uid in enumerate(index):
        try:
            if uid != uid:
                raise TypeError("it is not equal to itself")
            ids.append(groups.setdefault(uid, len(groups)))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"uid of response {i} is {uid!r}, which cannot group responses ({err}); "
                "allowed: hashable values equal to themselves (verl groups uids by value)"
            ) from None
    return torch.tensor(ids, dtype=torch.long), list(groups)


def _pad_groups(scores: torch.Tensor, ids: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, n_max) rewards of each group (padded) and its mask; order within a group kept."""
    counts = torch.bincount(ids, minlength=n_groups)
    order = torch.argsort(ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
    padded = scores.new_zeros(n_groups, int(counts.max()) if ids.numel() else 0)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    padded[ids[order], slot] = scores[order]
    mask[ids[order], slot] = True
    return padded, mask


def power_mean_advantage(scores: torch.Tensor, ids: torch.Tensor, beta: float, n_groups: int) -> torch.Tensor:
    """A_i = expm1(beta (R_i - F_beta)) / beta within each group (R_i - mean at beta = 0).

    Args:
        scores: `(B,)` finite rewards (float64 recommended for |beta R| in the hundreds).
        ids: `(B,)` group number of each response, from `group_ids`.
        beta: risk parameter (any real; 0 is the exact limit).
        n_groups: number of groups G.

    Returns:
        `(B,)` advantages; exactly 0 for a group of one or of equal rewards.
    """
    padded, mask = _pad_groups(scores, ids, n_groups)
    free_energy = log_power_mean(padded, float(beta), mask).to(scores.dtype)  # (G,) = log M_beta(e^R)
    centred = scores - free_energy[ids]
    # |beta| below GEOMETRIC_BELOW (log_power_mean's beta -> 0 limit too): expm1(beta c) / beta = c (1 + beta c / 2 + ...)
    # is c to rounding, and beta * c underflows into subnormals (A = [0, 0, 1, 0] at beta = 5e-324)
    adv = centred if abs(beta) < GEOMETRIC_BELOW else torch.expm1(beta * centred) / beta
    spread = torch.where(mask, padded, -torch.inf).amax(-1) - torch.where(mask, padded, torch.inf).amin(-1)
    return torch.where(spread[ids] > 0, adv, 0.0)


def agm_advantage(scores: torch.Tensor, ids: torch.Tensor, beta: float, n_groups: int) -> torch.Tensor:
    """A_i = (A_i(beta) + A_i(-beta)) / 2: advantage of G_beta = (F_beta + F_-beta) / 2."""
    return 0.5 * (
        power_mean_advantage(scores, ids, beta, n_groups) + power_mean_advantage(scores, ids, -beta, n_groups)
    )


def group_sums(values: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) sum of `values` (B,) within each group (the conservation residual of advantages)."""
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, ids, values)


def group_std(values: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) unbiased standard deviation within each group (0 for a group of one), as GRPO's torch.std."""
    counts = torch.bincount(ids, minlength=n_groups).to(values.dtype)
    mean = group_sums(values, ids, n_groups) / counts.clamp(min=1)
    sq = group_sums((values - mean[ids]) ** 2, ids, n_groups)
    return torch.where(counts > 1, (sq / (counts - 1).clamp(min=1)).sqrt(), 0.0)
