"""Unit tests of the advantage estimators: the worked examples of docs/estimators.md for the first eight, plus the
invariants all of them meet (the other five's examples: test_estimator_examples.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from trl.trainer.utils import nanstd

from rlfw import ops
from rlfw.advantages import ESTIMATORS, AdvantageBatch, build_estimator, estimator_options
from rlfw.advantages.grpo import group_normalized

NAN = math.nan
F64 = torch.float64


def _batch(rewards, group_sizes=None, **fields) -> AdvantageBatch:
    rewards = torch.as_tensor(rewards, dtype=F64)
    sizes = group_sizes or [rewards.numel()]
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    tensors = {k: torch.as_tensor(v, dtype=F64 if k in ("turn_rewards", "answer_logprobs", "info_gain") else None)
               for k, v in fields.items()}
    return AdvantageBatch(rewards, group_ids, **tensors)


def _close(actual, expected, places: int):
    assert torch.allclose(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                          atol=0.51 * 10**-places, rtol=0), f"{actual} != {expected}"


# ---------------------------------------------------------------- grpo and rloo


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize branch."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trl(scale):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(64, generator=gen)
    rewards[:16] = (rewards[:16] > 0.5).float()  # binary groups, incl. possibly all-equal ones
    rewards[16:24] = 1.0  # an all-equal group
    rewards[[3, 30, 41, 42]] = NAN
    rewards[48:55] = NAN  # a group with one valid reward
    group_ids = torch.arange(64) // 8
    ours = build_estimator("grpo", scale=scale)(AdvantageBatch(rewards, group_ids)).advantages
    assert torch.allclose(ours, _trl_advantages(rewards, 8, scale), atol=1e-6, rtol=0)


def test_rloo_leave_one_out():
    out = build_estimator("rloo")(_batch([1.0, 0.0, 0.5, 2.0, NAN, 7.0], [3, 2, 1]))
    _close(out.advantages, [0.75, -0.75, 0.0, 0.0, 0.0, 0.0], 9)


# ---------------------------------------------------------------- median (MC-GRPO)


def test_median_example():
    out = build_estimator("median")(_batch([0.9, 0.2, 0.5, 0.7, 0.1]))
    _close(out.advantages, [1.661130, -1.245847, 0.0, 0.830565, -1.661130], 6)
    assert out.keep.tolist() == [True, True, False, True, True]


def test_median_ties_pick_first_pivot_and_keep_tied_rows():
    out = build_estimator("median")(_batch([1.0, 1.0, 0.0, 0.0, 1.0]))
    _close(out.advantages, [0.0, 0.0, -2500.0, -2500.0, 0.0], 3)
    assert out.keep.tolist() == [False, True, True, True, True]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"rescale_nonzero": False}, [1.328904, -0.996678, 0.0, 0.664452, -1.328904]),
        ({"scale": "none", "rescale_nonzero": False}, [0.4, -0.3, 0.0, 0.2, -0.4]),
        ({"scale": "std", "rescale_nonzero": False}, [1.194872, -0.896154, 0.0, 0.597436, -1.194872]),
    ],
)
def test_median_options(kwargs, expected):
    out = build_estimator("median", **kwargs)(_batch([0.9, 0.2, 0.5, 0.7, 0.1]))
    _close(out.advantages, expected, 6)


def test_median_warns_once_when_mad_is_zero(caplog):
    est = build_estimator("median")
    batch = _batch([1.0, 1.0, 0.0, 0.0, 1.0] * 2, [5, 5])
    with caplog.at_level(logging.WARNING, logger="rlfw.advantages.median"):
        est(batch)
        est(batch)
    warnings = [r for r in caplog.records if "scale" in r.getMessage()]
    assert len(warnings) == 1 and "'std'" in warnings[0].getMessage()
    assert est(batch).metrics["mad_zero_frac"] == 1.0


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_median_even_or_small_group_is_config_error(n):
    with pytest.raises(ValueError, match="num_generations counts all n rollouts including the pivot"):
        build_estimator("median").validate_config(n)


@pytest.mark.parametrize("n", [3, 5, 9])
def test_median_odd_group_is_accepted(n):
    build_estimator("median").validate_config(n)


# ---------------------------------------------------------------- stratified


def test_stratified_example():
    out = build_estimator("stratified", alpha=0.5)(_batch([1, 0, 1, 1, 0, 0], num_tool_calls=[0, 0, 1, 1, 1, 2]))
    _close(out.advantages, [0.999998, -0.999998, 0.853552, 0.853552, -1.207104, -0.499999], 6)
    assert out.metrics["singleton_strata_frac"] == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    ("rewards", "strata", "alpha", "expected"),
    [
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.5, [0.499999, 0.499999, -0.499999, -0.499999]),  # homogeneous strata
        ([1, 0], [0, 1], 0.5, [0.499999, -0.499999]),  # singleton strata
        ([0.8, 0.2, 0.6, 0.9, 0.3], [1, 1, 2, 2, 2], 1.0, [0.999997, -0.999997, 0.0, 1.22474, -1.22474]),
    ],
)
def test_stratified_edge_cases(rewards, strata, alpha, expected):
    out = build_estimator("stratified", alpha=alpha)(_batch(rewards, num_tool_calls=strata))
    _close(out.advantages, expected, 5)


def test_stratified_key_sets_requires():
    assert build_estimator("stratified").requires == {"num_tool_calls"}
    est = build_estimator("stratified", key="num_turns")
    assert est.requires == {"num_turns"}
    with pytest.raises(ValueError, match="num_turns"):
        est(_batch([1, 0], num_tool_calls=[0, 1]))


# ---------------------------------------------------------------- riskpo

RISKPO_REWARDS = [1, 0, 1, 1, 0, 0, 1, 0]


def test_riskpo_example():
    out = build_estimator("riskpo", bundle_size=2)(_batch(RISKPO_REWARDS, [4, 4]))
    _close(out.advantages, [0.163299, -1.653395, 0.163299, 0.163299, 0.163299, -0.551132, 0.489897, 0.163299], 6)
    assert out.metrics["mvar"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("kwargs", "paper_adv"),
    [
        ({"natural_baseline": True, "credit": "uniform"}, [-0.326598, -2.857722, 0.0, -0.326598]),
        ({"natural_baseline": True, "credit": "std"}, [-0.653195, -5.715445, 0.0, -0.653195]),
        ({"natural_baseline": True, "credit": "std", "alpha_high": 0.9}, [-0.979793, -5.948729, 0.0, -0.979793]),
    ],
)
def test_riskpo_options(kwargs, paper_adv):
    out = build_estimator("riskpo", bundle_size=2, **kwargs)(_batch(RISKPO_REWARDS, [4, 4]))
    _close(out.advantages, paper_adv * 2, 6)


@pytest.mark.parametrize(
    ("rewards", "sizes"),
    [([0, 0, 0, 0, 1, 1, 1, 1], [4, 4]), ([1, 0, 1], [1, 1, 1])],  # all papers equal; one paper per bundle
)
def test_riskpo_degenerate_bundles_give_zero(rewards, sizes):
    out = build_estimator("riskpo", bundle_size=3)(_batch(rewards, sizes))
    assert torch.equal(out.advantages, torch.zeros(len(rewards), dtype=F64))


def test_riskpo_last_bundle_may_be_smaller_and_groups_must_match():
    out = build_estimator("riskpo", bundle_size=2)(_batch(RISKPO_REWARDS + [1, 0, 0, 0], [4, 4, 4]))
    _close(out.advantages[:8], [0.163299, -1.653395, 0.163299, 0.163299, 0.163299, -0.551132, 0.489897, 0.163299], 6)
    assert out.advantages[8:].abs().sum() > 0
    with pytest.raises(ValueError, match="same number of completions"):
        build_estimator("riskpo", bundle_size=2)(_batch([1, 0, 1, 0, 1], [3, 2]))


def test_riskpo_nan_leaves_its_paper_out():
    rewards = [1, 0, 1, 1, 0, 0, 1, NAN]
    out = build_estimator("riskpo", bundle_size=2)(_batch(rewards, [4, 4]))
    assert out.advantages[[3, 7]].tolist() == [0.0, 0.0]
    assert torch.isfinite(out.advantages).all()


# ---------------------------------------------------------------- gated (G-RA)

GATED_TURNS = [[0.5, NAN, NAN], [0.3, 0.5, NAN], [1.0, 0.5, 0.5], [0.2, -0.2, 0.1]]


def test_gated_example():
    out = build_estimator("gated", threshold=0)(_batch([1, 0, -1, -0.5], turn_rewards=GATED_TURNS))
    _close(out.advantages, [1.1286, 0.5209, -1.0417, -0.6077], 4)


def test_gated_direct_accumulation_baseline():
    out = build_estimator("gated", threshold=-math.inf)(_batch([1, 0, -1, -0.5], turn_rewards=GATED_TURNS))
    _close(out.advantages, [0.9618, 0.0931, 0.3413, -1.3961], 4)


def test_gated_turn_mode():
    est = build_estimator("gated", threshold=0, mode="turn")
    assert est.requires == {"turn_rewards", "num_turns"}
    out = est(_batch([1, 0, -1, -0.5], turn_rewards=GATED_TURNS, num_turns=[1, 2, 3, 2]))
    returns = torch.tensor([1.5, 0.8, 0.5, -1, -1, -1, -0.5, -0.5], dtype=F64)  # valid turns, row-major
    z = (returns - returns.mean()) / (returns.std(unbiased=False) + 1e-6)
    valid = ops.turn_valid_mask(torch.tensor([1, 2, 3, 2]), 3)
    _close(out.advantages[valid], z, 9)
    assert torch.equal(out.advantages[~valid], torch.zeros((~valid).sum(), dtype=F64))


# ---------------------------------------------------------------- igpo

IGPO_P = [[0.10, 0.30, 0.60], [0.10, 0.05, NAN], [0.10, 0.12, 0.20]]


def _igpo_batch(p, rewards, turns, truncated=None):
    logp = torch.tensor(p, dtype=F64).log()
    truncated = torch.tensor(truncated or [False] * len(rewards))
    return _batch(rewards, answer_logprobs=logp, num_turns=turns, truncated=truncated)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [[2.2251, 2.3963, 2.2632], [-1.7116, -0.7797, 0], [-0.5135, 0.2054, 0.7417]]),
        ({"norm": "separate"}, [[3.4551, 2.7382, 1.2247], [-2.4992, -1.2247, 0], [-0.9559, -0.2390, 0.0]]),
        ({"gain": "log_prob_diff"}, [[2.8688, 1.6030, 1.0841], [-2.7928, -0.7580, 0], [-0.0760, 0.3461, 0.1631]]),
        ({"gain": "log_prob_diff", "norm": "separate"},
         [[3.0066, 1.7797, 1.2247], [-2.9676, -1.2247, 0], [-0.0390, 0.2527, 0.0]]),
        ({"gamma": 0.9}, [[1.7818, 2.1700, 2.2632], [-1.6337, -0.7797, 0], [-0.6008, 0.1312, 0.7417]]),
    ],
)
def test_igpo_example(kwargs, expected):
    out = build_estimator("igpo", **kwargs)(_igpo_batch(IGPO_P, [1.0, 0.0, 0.5], [3, 2, 3]))
    _close(out.advantages, expected, 4)


@pytest.mark.parametrize(
    ("norm", "with_truncated", "expected"),
    [
        ("joint", True, [[0.3654, 0], [1.1176, 0.3654], [0.7307, 0.3654], [-2.2136, -2.2136]]),
        ("separate", True, [[0.5773, 0], [1.5773, 0.5773], [-0.4226, 0.5773], [-1.7320, -1.7320]]),
        ("joint", False, [[-0.5, 0], [1.5, -0.5], [-1.0, -0.5]]),
        ("separate", False, [[0.0, 0], [1.0, 0.0], [-1.0, 0.0]]),
    ],
)
def test_igpo_edge_cases(norm, with_truncated, expected):
    p = [[0.10, NAN], [0.10, 0.40], [0.10, 0.10], [0.10, 0.20]]  # R4 truncated after a tool call
    rows = 4 if with_truncated else 3
    batch = _igpo_batch(p[:rows], [0.0, 0.0, 0.0, -2.0][:rows], [1, 2, 2, 2][:rows], [False, False, False, True][:rows])
    _close(build_estimator("igpo", norm=norm)(batch).advantages, expected, 4)


def test_igpo_singleton_pools_give_zero():
    out = build_estimator("igpo", norm="separate")(_igpo_batch([[0.1, 0.3], [0.1, NAN]], [1.0, 0.0], [2, 1]))
    # outcomes {1, 0} normalise to +-1; the lone IG value (0.2) normalises to 0 and adds nothing to turn 0
    _close(out.advantages, [[0.999998, 0.999998], [-0.999998, 0.0]], 6)
    out = build_estimator("igpo")(_igpo_batch([[0.1, 0.3]], [1.0], [2]))
    assert out.metrics["singleton_pool_frac"] == 0.0
    out = build_estimator("igpo")(_igpo_batch([[0.1, NAN]], [1.0], [1]))
    assert out.metrics["singleton_pool_frac"] == 1.0 and out.advantages.abs().sum() == 0


# ---------------------------------------------------------------- epo

EPO_H = [[0.2, 0.4, 1.5, 0.9, 0.3, 9.0], [2.0, 0.1, 0.6, 0.5, 0.0, 0.0]]
EPO_MASK = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
EPO_TURNS = [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]


def _epo_term(est, step, entropies=None):
    h = torch.tensor(entropies or EPO_H, dtype=F64, requires_grad=True)
    term = est.loss_term(h, torch.tensor(EPO_MASK).bool(), torch.tensor(EPO_TURNS), step, 150)
    return term, h


def test_epo_example():
    est = build_estimator("epo")
    term, _ = _epo_term(est, 0)
    assert est.history_mean is None
    assert term.item() == pytest.approx(-0.000725, abs=5e-10)
    est.update_history(0.5)
    term, h = _epo_term(est, 30)
    assert est.beta(30, 150) == pytest.approx(1.301194, abs=5e-7)
    assert term.item() == pytest.approx(-0.000703313, abs=5e-10)
    term.backward()
    expected = [[-8.333e-5, -8.333e-5, -7.249e-5, -1.25e-4, -1.25e-4, 0], [-1.0874e-4, -1.25e-4, -1.25e-4, -1.25e-4, 0, 0]]
    _close(h.grad * 1e4, torch.tensor(expected) * 1e4, 3)


def test_epo_history_and_state_round_trip():
    est = build_estimator("epo")
    for value in (0.62, 0.55, 0.48, NAN):
        est.update_history(value)
    assert est.history_mean == pytest.approx(0.55)
    state = est.state_dict()
    assert state == {"entropy_sum": pytest.approx(1.65), "entropy_steps": 3}
    assert all(type(v) in (int, float) for v in state.values())
    clone = build_estimator("epo")
    clone.load_state_dict(state)
    assert clone.history_mean == est.history_mean
    assert _epo_term(clone, 12)[0].item() == _epo_term(est, 12)[0].item()


def test_epo_advantages_are_grpo_and_empty_mask_is_zero():
    batch = _batch([1, 0, 0.5, 0.2], [2, 2])
    assert torch.equal(build_estimator("epo")(batch).advantages, group_normalized(batch.rewards, batch.group_ids))
    h = torch.ones(2, 3, requires_grad=True)
    term = build_estimator("epo").loss_term(h, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3).long(), 0, 10)
    term.backward()
    assert term.item() == 0.0 and h.grad is not None


# ---------------------------------------------------------------- invariants over every estimator

CASES = {
    "grpo": {}, "rloo": {}, "median": {}, "stratified": {}, "riskpo": {"bundle_size": 2}, "gated": {},
    "gated_turn": {"mode": "turn", "threshold": 0.5}, "igpo": {}, "igpo_separate": {"norm": "separate"}, "epo": {},
    "infopo": {}, "infopo_per_turn": {"token_weighted": False}, "matchtir": {}, "opmd": {}, "asymre": {},
    "noisy_verifier": {"rho_fp": 0.1, "rho_fn": 0.2}, "noisy_verifier_forward": {"rho_fn": 0.2, "mode": "forward"},
}
TURN_LEVEL = {"gated_turn", "igpo", "igpo_separate", "infopo", "infopo_per_turn", "matchtir"}
BINARY = {"noisy_verifier", "noisy_verifier_forward"}  # need 0/1 rewards: the random ones are thresholded first
NEVER_ZERO = {"igpo", "igpo_separate", "infopo", "infopo_per_turn", "asymre", *BINARY}  # signal beyond tied outcomes


class _Thresholded:
    """An estimator that sees rewards >= 0.5 as 1 and the rest as 0 (NaN stays NaN)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, batch):
        r = batch.rewards
        binary = torch.where(torch.isnan(r), r, (r >= 0.5).to(r.dtype))
        return self.inner(_take(batch, torch.arange(r.numel()), rewards=binary))


def _build(case):
    name = max((n for n in ESTIMATORS if case == n or case.startswith(n + "_")), key=len)  # "<estimator>_<variant>"
    estimator = build_estimator(name, **CASES[case])
    return _Thresholded(estimator) if case in BINARY else estimator


def _random_batch(num_groups=8, group_size=5, k=4, seed=0, dtype=torch.float32) -> AdvantageBatch:
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    turns = torch.randint(1, k + 1, (n,), generator=gen)
    valid = ops.turn_valid_mask(turns, k)
    nan = torch.tensor(NAN, dtype=dtype)
    return AdvantageBatch(
        rewards=torch.randint(0, 3, (n,), generator=gen).to(dtype) / 2,
        group_ids=torch.arange(num_groups).repeat_interleave(group_size) * 7 + 3,
        num_tool_calls=torch.randint(0, 3, (n,), generator=gen),
        num_turns=turns,
        truncated=torch.rand(n, generator=gen) < 0.2,
        turn_rewards=torch.where(valid, torch.rand(n, k, generator=gen, dtype=dtype) - 0.3, nan),
        answer_logprobs=torch.where(valid, -3 * torch.rand(n, k, generator=gen, dtype=dtype), nan),
        # every turn but the last followed by feedback, 1-5 policy tokens per turn
        info_gain=torch.where(ops.turn_valid_mask(turns - 1, k), torch.randn(n, k, generator=gen, dtype=dtype), nan),
        turn_lengths=torch.where(valid, torch.randint(1, 6, (n, k), generator=gen), 0),
    )


def _take(batch: AdvantageBatch, rows: torch.Tensor, **changes) -> AdvantageBatch:
    fields = {f: getattr(batch, f)[rows] for f in ("rewards", "group_ids", "num_tool_calls", "num_turns",
                                                     "truncated", "turn_rewards", "answer_logprobs", "info_gain",
                                                     "turn_lengths")}
    return AdvantageBatch(**{**fields, **changes})


@pytest.mark.parametrize("case", CASES)
def test_output_contract(case):
    batch = _random_batch()
    out = _build(case)(batch)
    n, k = batch.turn_rewards.shape
    assert out.advantages.shape == ((n, k) if case in TURN_LEVEL else (n,))
    assert torch.isfinite(out.advantages).all()
    assert out.keep.shape == (n,) and out.keep.dtype == torch.bool
    assert out.keep.sum() == (n - 8 if case == "median" else n)
    assert out.metrics and all(type(v) is float and "/" not in key for key, v in out.metrics.items())


@pytest.mark.parametrize("case", sorted(TURN_LEVEL))
def test_turn_level_zero_past_last_turn(case):
    batch = _random_batch()
    adv = _build(case)(batch).advantages
    past = ~ops.turn_valid_mask(batch.num_turns, adv.shape[1])
    assert torch.equal(adv[past], torch.zeros_like(adv[past]))


@pytest.mark.parametrize("case", CASES)
def test_group_permutation_invariance(case):
    batch = _random_batch()
    # swap whole bundles of two groups (riskpo's bundles are consecutive groups), then shuffle bundles
    group_order = torch.tensor([6, 7, 2, 3, 0, 1, 4, 5])
    rows = (group_order[:, None] * 5 + torch.arange(5)).flatten()
    out, permuted = _build(case)(batch), _build(case)(_take(batch, rows))
    assert torch.allclose(permuted.advantages, out.advantages[rows], atol=1e-6)
    assert torch.equal(permuted.keep, out.keep[rows])


@pytest.mark.parametrize("case", sorted(set(CASES) - {"riskpo"}))
def test_nan_reward_is_isolated(case):
    batch = _random_batch(dtype=F64)
    rewards = batch.rewards.clone()
    rewards[[2, 11]] = NAN
    out = _build(case)(_take(batch, torch.arange(40), rewards=rewards))
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[[2, 11]].abs().sum() == 0
    # the NaN rows contribute to no statistic: same result as if they were never generated
    rest = torch.tensor([i for i in range(40) if i not in (2, 11)])
    dropped = _build(case)(_take(batch, rest))
    assert torch.allclose(out.advantages[rest], dropped.advantages, atol=1e-9)


@pytest.mark.parametrize("case", sorted(set(CASES) - NEVER_ZERO))
def test_all_equal_groups_give_zero(case):
    batch = _random_batch()
    rewards = torch.full_like(batch.rewards, 0.3)
    nan_turns = torch.full_like(batch.turn_rewards, NAN)
    out = _build(case)(_take(batch, torch.arange(40), rewards=rewards, turn_rewards=nan_turns))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


@pytest.mark.parametrize("case", sorted(set(CASES) - {"median", "riskpo"}))
def test_singleton_groups(case):
    """Groups of one completion: finite, and what each method defines for them."""
    batch = _take(_random_batch(), torch.arange(40), group_ids=torch.arange(40))
    out = _build(case)(batch).advantages
    assert torch.isfinite(out).all()
    r = batch.rewards
    if case in ("grpo", "rloo", "stratified", "gated", "epo", "opmd"):
        assert torch.equal(out, torch.zeros_like(out))  # nothing to compare with
    elif case == "asymre":
        assert torch.equal(out, torch.full_like(r, 0.1))
    elif case in ("infopo", "infopo_per_turn"):
        valid = ops.turn_valid_mask(batch.num_turns, out.shape[1])
        gain = batch.info_gain.nan_to_num() != 0
        # mu 0, sigma 1: the outcome itself, plus the gated intrinsic term on turns with an information gain
        assert torch.allclose(out[valid & ~gain], (r[:, None] / (1 + 1e-6)).expand_as(out)[valid & ~gain])
    elif case == "matchtir":
        valid = ops.turn_valid_mask(batch.num_turns, out.shape[1])
        total = torch.where(valid, batch.turn_rewards.nan_to_num(), 0).sum(1)
        assert torch.allclose(out[valid], (0.5 * total[:, None] / (1 + 1e-6)).expand_as(out)[valid])
    elif case in BINARY:
        assert (out != 0).all()  # no per-group centring: every completion keeps a signal
    else:  # z-scored over the group's (rollout, turn) values: one rollout still has several
        assert case in ("gated_turn", "igpo", "igpo_separate")


def test_igpo_tied_outcomes_without_gains_give_zero():
    batch = _random_batch()
    out = _build("igpo")(_take(batch, torch.arange(40), rewards=torch.full_like(batch.rewards, 0.3),
                               truncated=torch.ones(40, dtype=torch.bool)))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_unknown_option_lists_valid_ones(name):
    with pytest.raises(ValueError, match="Valid options") as err:
        build_estimator(name, not_an_option=1)
    assert all(repr(option) in str(err.value) for option in estimator_options(name))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("median", {"scale": "mean"}), ("stratified", {"alpha": 2}), ("riskpo", {"alpha_low": 0.9}),
     ("riskpo", {"credit": "score"}), ("gated", {"mode": "token"}), ("igpo", {"norm": "turn"}),
     ("epo", {"kappa_high": -1.0}), ("median", {"mad_eps": 0}), ("infopo", {"tau": 0}), ("infopo", {"beta": -1}),
     ("matchtir", {"lam": 1.5}), ("noisy_verifier", {"mode": "both"}), ("noisy_verifier", {"rho_fp": 0.6}),
     ("opmd", {"tau": -0.1}), ("asymre", {"beta": -0.1})],
)
def test_bad_option_value_is_rejected(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_estimator(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "requires"),
    [("median", set()), ("riskpo", set()), ("epo", set()), ("gated", {"turn_rewards"}),
     ("igpo", {"answer_logprobs", "num_turns", "truncated"}), ("stratified", {"num_tool_calls"}),
     ("infopo", {"info_gain", "turn_lengths", "num_turns"}), ("matchtir", {"turn_rewards", "num_turns"}),
     ("noisy_verifier", set()), ("opmd", set()), ("asymre", set())],
)
def test_requires(name, requires):
    est = build_estimator(name)
    assert est.requires == requires
    if requires:
        with pytest.raises(ValueError, match="needs AdvantageBatch"):
            est(_batch([1.0, 0.0]))


# ---------------------------------------------------------------- shared ops the estimators rely on


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_group_quantile_matches_torch(q):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, generator=gen, dtype=F64)
    x[[4, 17]] = NAN
    index = torch.randint(0, 4, (30,), generator=gen)
    ours = ops.group_quantile(x, index, 4, q)
    for g in range(4):
        values = x[(index == g) & ~torch.isnan(x)]
        assert ours[g].item() == pytest.approx(torch.quantile(values, q).item(), abs=1e-12)


def test_group_lower_median_ignores_nan_and_picks_first_pivot():
    x = torch.tensor([math.inf, NAN, 1.0, math.inf, 2.0, 2.0, NAN, NAN])
    median, pivot = ops.group_lower_median(x, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]), 3)
    assert median[:2].tolist() == [math.inf, 2.0] and math.isnan(median[2])
    assert pivot.tolist() == [0, 4, -1]


def test_position_in_group_follows_batch_order():
    index = torch.tensor([1, 0, 1, 1, 0, 2])
    assert ops.position_in_group(index, 3).tolist() == [0, 0, 1, 2, 1, 0]
    sub, count = ops.subgroup_index(index, torch.tensor([5, 5, -1, 5, 7, 5]))
    assert count == 5 and sub[0] == sub[3] and sub[0] != sub[2]
