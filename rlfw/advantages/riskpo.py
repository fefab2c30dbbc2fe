"""riskpo: RiskPO, Mixed Value-at-Risk with bundling (arXiv 2510.00911, https://arxiv.org/abs/2510.00911).

Bundles of B consecutive prompt groups; "paper" j = the j-th completion of every group in the bundle, scored
S_j = sum of their rewards. Per bundle, with q_d / q_u the alpha_low / alpha_high quantiles of S (linear
interpolation) and sd the sample std of S:

    g_j = (clip(S_j, q_d, q_u) - q_d) / (alpha_high - alpha_low + eps)     [- (q_u - q_d)/(...) if natural_baseline]
    c_j = -max(q_d - S_j, 0) / (alpha_low + eps)
    A_j = (omega * c_j + g_j) / (omega + 1)                               [/ (sd + eps) if normalize]

A_j is credited to the paper's completions by `credit`: "sum_mean" (share proportional to r_i - mu_q),
"uniform" (A_j each) or "std" (A_j / sigma_q). A paper holding a NaN reward is left out of its bundle's
statistics and all its rows get 0 (a partial sum is not comparable with full ones).
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

SUM_ATOL = 1e-6  # reference code: below this the sum_mean split falls back to an equal share
STD_FLOOR = 1e-3  # reference code: credit="std" uses 1.0 for groups with sigma_q <= this


class RiskPO(BaseEstimator):
    name = "riskpo"

    def __init__(
        self,
        alpha_low: float = 0.2,
        alpha_high: float = 0.8,
        omega: float = 1.5,
        bundle_size: int = 5,
        natural_baseline: bool = False,
        normalize: bool = True,
        credit: str = "sum_mean",
        eps: float = 1e-6,
    ):
        self._check_choice("credit", credit, ("sum_mean", "uniform", "std"))
        if not 0.0 < alpha_low < alpha_high < 1.0:
            raise ValueError(
                f"need 0 < alpha_low < alpha_high < 1, got alpha_low={alpha_low!r}, alpha_high={alpha_high!r} "
                "(defaults 0.2 and 0.8)"
            )
        if not omega >= 0:
            raise ValueError(f"omega={omega!r} must be >= 0 (weight of the CVaR term; default 1.5)")
        if int(bundle_size) != bundle_size or bundle_size < 1:
            raise ValueError(f"bundle_size={bundle_size!r} must be an integer >= 1 (prompt groups per bundle)")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} must be > 0 (default 1e-6)")
        self.alpha_low, self.alpha_high, self.omega = float(alpha_low), float(alpha_high), float(omega)
        self.bundle_size = int(bundle_size)
        self.natural_baseline, self.normalize = bool(natural_baseline), bool(normalize)
        self.credit, self.eps = credit, float(eps)

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        index, num_groups = ops.group_index(batch.group_ids)
        paper, bundle_of_paper, bundle_of_group, num_bundles = self._papers(index, num_groups)
        num_papers = bundle_of_paper.numel()
        sums = ops.group_sum(r, paper, num_papers)
        members = torch.bincount(paper, minlength=num_papers).to(r.dtype)  # (P,)
        complete = ops.group_count(r, paper, num_papers) == members
        scores = torch.where(complete, sums, torch.full_like(sums, torch.nan))  # (P,) NaN = left out
        paper_adv, mvar = self._paper_advantages(scores, bundle_of_paper, num_bundles)  # (P,)
        groups_in_bundle = torch.bincount(bundle_of_group, minlength=num_bundles).to(r.dtype)  # (num_bundles,)
        adv = self._credit(r, index, num_groups, paper, paper_adv, groups_in_bundle[bundle_of_group[index]])
        adv = torch.where(complete[paper] & ~torch.isnan(r), adv, torch.zeros_like(adv))  # (N,)
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item(), "mvar": mvar})

    def _papers(self, index: torch.Tensor, num_groups: int):
        """Paper index per row (N,), bundle per paper (P,), bundle per group (num_groups,), number of bundles."""
        # RiskPO: bundles are B consecutive prompts, in batch order (first appearance), not by id value.
        first = ops.group_first_row(index, num_groups)
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(num_groups, device=index.device)
        bundle_of_group = rank // self.bundle_size  # (num_groups,)
        num_bundles = (num_groups + self.bundle_size - 1) // self.bundle_size
        sizes = torch.zeros(num_groups, dtype=torch.long, device=index.device).index_add(
            0, index, torch.ones_like(index)
        )
        lo = torch.full((num_bundles,), sizes.max().item(), dtype=torch.long, device=index.device)
        hi = torch.zeros(num_bundles, dtype=torch.long, device=index.device)
        smallest = lo.scatter_reduce(0, bundle_of_group, sizes, "amin")
        if not torch.equal(smallest, hi.scatter_reduce(0, bundle_of_group, sizes, "amax")):
            raise ValueError(
                "riskpo needs the same number of completions for every prompt of a bundle; pair prompts with "
                "equal num_generations or set bundle_size=1."
            )
        # RiskPO: paper j of a bundle = the j-th completion of each of its groups.
        key = bundle_of_group[index] * int(sizes.max().item()) + ops.position_in_group(index, num_groups)
        paper, num_papers = ops.group_index(key)
        bundle_of_paper = torch.zeros(num_papers, dtype=torch.long, device=index.device)
        bundle_of_paper[paper] = bundle_of_group[index]
        return paper, bundle_of_paper, bundle_of_group, num_bundles

    def _paper_advantages(self, scores: torch.Tensor, bundle: torch.Tensor, num_bundles: int):
        """Per-paper advantage A_j (P,) and the batch MVaR metric, from the paper scores S (NaN = left out)."""
        q_d = ops.group_quantile(scores, bundle, num_bundles, self.alpha_low)  # (num_bundles,)
        q_u = ops.group_quantile(scores, bundle, num_bundles, self.alpha_high)  # (num_bundles,)
        sd = ops.group_std(scores, bundle, num_bundles, ddof=1)[bundle]  # (P,)
        lo, hi = q_d[bundle], q_u[bundle]
        width = self.alpha_high - self.alpha_low + self.eps
        # RiskPO: the RVaR gradient only moves papers inside [q_d, q_u] ...
        g = (torch.minimum(torch.maximum(scores, lo), hi) - lo) / width
        if self.natural_baseline:
            g = g - (hi - lo) / width
        # RiskPO: ... and the CVaR term pushes down the low tail below q_d.
        c = -torch.relu(lo - scores) / (self.alpha_low + self.eps)
        adv = (self.omega * c + g) / (self.omega + 1.0)
        if self.normalize:
            adv = adv / (sd + self.eps)
        count = ops.group_count(scores, bundle, num_bundles)[bundle]
        adv = torch.where((count > 1) & ~torch.isnan(scores), adv, torch.zeros_like(adv))
        return adv, self._mvar(scores, bundle, num_bundles, q_d, q_u)

    def _mvar(self, scores, bundle, num_bundles, q_d, q_u) -> float:
        """Mean over bundles of (RVaR_[q_d, q_u](S) + omega * CVaR_alpha_low(S)) / (1 + omega)."""
        nan = torch.full_like(scores, torch.nan)
        inside = (scores >= q_d[bundle]) & (scores <= q_u[bundle])
        rvar = ops.group_mean(torch.where(inside, scores, nan), bundle, num_bundles)
        cvar = ops.group_mean(torch.where(scores <= q_d[bundle], scores, nan), bundle, num_bundles)
        mvar = (rvar + self.omega * cvar) / (1.0 + self.omega)
        mvar = mvar[~torch.isnan(mvar)]
        return mvar.mean().item() if mvar.numel() else float("nan")

    def _credit(self, r, index, num_groups, paper, paper_adv, groups_in_bundle) -> torch.Tensor:
        """Share each paper's advantage among its completions. (N,)"""
        adv = paper_adv[paper]  # (N,)
        if self.credit == "std":
            sigma = ops.group_std(r, index, num_groups, ddof=1)
            sigma = torch.where(sigma <= STD_FLOOR, torch.ones_like(sigma), sigma)
            return adv / sigma[index]
        if self.credit == "sum_mean":
            dev = r - ops.group_mean(r, index, num_groups)[index]  # (N,)
            total = ops.group_sum(dev, paper, paper_adv.numel())[paper]  # (N,)
            share = torch.where(total.abs() > SUM_ATOL, dev / total, 1.0 / groups_in_bundle)
            return adv * share
        return adv
