"""Worked examples of infopo, matchtir (with its tool-call matching turn reward), noisy_verifier, opmd and asymre,
from docs/estimators.md, plus their edge cases. The invariants every estimator meets (NaN isolation, group
permutation, (N, K) zero past the last turn, ...) are in test_estimators.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_estimators import _batch

from rlfw.advantages import AdvantageBatch, LossInputs, build_estimator
from rlfw.rewards import call_similarity, match_calls, matched_turn_rewards

NAN = math.nan
F64 = torch.float64


def _close(actual, expected, atol=0.51e-4):
    expected = torch.as_tensor(expected, dtype=F64)
    assert torch.allclose(actual.to(F64), expected, atol=atol, rtol=0), f"{actual} != {expected}"


def _padded(rows, k=3):
    out = torch.full((len(rows), k), NAN, dtype=F64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=F64)
    return out


# ---------------------------------------------------------------- infopo
def test_infopo_example():
    gains = [[0.60, 0.10, NAN], [0.20, NAN, NAN], [0.05, 0.40, NAN]]
    batch = _batch([1.0, 0.0, 0.0], info_gain=gains, turn_lengths=[[4, 2, 3], [2, 2, 0], [3, 3, 2]],
                   num_turns=[3, 2, 3])
    out = build_estimator("infopo")(batch)
    _close(out.advantages, [[1.2719, 1.0531, 1.1547], [-0.5695, -0.5773, 0.0], [-0.7519, -0.4966, -0.5773]])
    assert out.metrics["gate_mean"] == pytest.approx(0.2396, abs=1e-4) and out.metrics["rho"] == 1.0
    # tau 0.05 closes the gate (about 1e-5): the result is the outcome advantage alone
    closed = build_estimator("infopo", beta=0.1, tau=0.05)(batch).advantages
    _close(closed, [[1.1547] * 3, [-0.5773, -0.5773, 0.0], [-0.5773] * 3])


def test_infopo_all_zero_outcomes_learn_from_information_gain_alone():
    gains = [[NAN, NAN, NAN], [0.50, NAN, NAN], [-0.10, 0.30, NAN]]
    batch = _batch([0.0, 0.0, 0.0], info_gain=gains, turn_lengths=[[3, 0, 0], [2, 2, 0], [2, 2, 2]],
                   num_turns=[1, 2, 3])
    _close(build_estimator("infopo")(batch).advantages, [[0.0, 0.0, 0.0], [0.2440, 0.0, 0.0], [-0.3050, 0.0610, 0.0]])


def test_infopo_options():
    gains = [[0.60, 0.10, NAN], [0.20, NAN, NAN], [0.05, 0.40, NAN]]
    batch = _batch([1.0, 0.0, 0.0], info_gain=gains, turn_lengths=[[4, 2, 3], [2, 2, 0], [3, 3, 2]],
                   num_turns=[3, 2, 3])
    base = build_estimator("infopo")(batch).advantages
    # decay counts optimizer steps: beta * exp(-decay * step) scales the intrinsic part
    decayed = build_estimator("infopo", decay=math.log(2))(batch.replace(step=1)).advantages
    a_out = torch.tensor([1.1547, -0.5773, -0.5773], dtype=F64)[:, None]
    _close((decayed - a_out) * (base != 0), 0.5 * (base - a_out) * (base != 0), atol=2e-4)
    # per-turn statistics: a turn counts once, whatever its length
    per_turn = build_estimator("infopo", token_weighted=False)(batch).advantages
    assert not torch.allclose(per_turn, base) and torch.equal(per_turn[:, 2] == 0, base[:, 2] == 0)


def test_infopo_singleton_group_and_single_intrinsic_value():
    batch = _batch([1.0, 0.0], [1, 1], info_gain=[[0.3, NAN], [NAN, NAN]], turn_lengths=[[1, 2], [2, 0]],
                   num_turns=[2, 1])
    out = build_estimator("infopo")(batch).advantages
    # a group of one: mu 0, sigma 1 (A_out = r / (1 + 1e-6)); one intrinsic token: A_int = 0
    _close(out, [[1.0, 1.0], [0.0, 0.0]], atol=1e-5)


# ---------------------------------------------------------------- matchtir: the matching turn reward
G1 = {"name": "search", "arguments": {"query": "Paris population"}}
G2 = {"name": "calc", "arguments": {"expr": "2*3", "precision": 2}}
TRUTH = [G1, G2]
ROLLOUT_A = [[G1], [{"name": "calc", "arguments": {"expr": "2*3", "precision": 3}}], []]
ROLLOUT_B = [[{"name": "search", "arguments": {"query": "Paris"}}, {"name": "weather", "arguments": {"city": "Paris"}}],
             [{"name": "calc", "arguments": '{"expr": "2*3"}'}], []]  # arguments as JSON text work too
ROLLOUT_C = [[{"name": "CALC", "arguments": {"expr": "2*3", "precision": 2}}], []]  # names compare case-insensitively


def test_call_similarity():
    sims = [[call_similarity(p, g) for g in TRUTH] for turn in ROLLOUT_B for p in turn]
    _close(torch.tensor(sims), [[0.6667, 0.0], [0.0, 0.0], [0.0, 0.625]])
    assert call_similarity({"name": "f", "arguments": {}}, {"name": "f", "arguments": {}}) == 1.0
    assert call_similarity({"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {}}) == 0.5
    assert call_similarity({"name": "calc", "arguments": "{not json"}, G2) == 0.0


@pytest.mark.parametrize("assignment", ["greedy", "hungarian"])
def test_matched_turn_rewards_hard_assignment(assignment):
    rewards = [matched_turn_rewards(calls, TRUTH, assignment, answer_score=f1)
               for calls, f1 in ((ROLLOUT_A, 1.0), (ROLLOUT_B, 0.5), (ROLLOUT_C, 0.0))]
    assert rewards == [[1.0, 0.75, 1.0], [pytest.approx(1 / 3), 0.625, 0.5], [1.0, 0.0]]


def test_matched_turn_rewards_soft_assignment():
    rewards = [matched_turn_rewards(calls, TRUTH, "ot", answer_score=f1)
               for calls, f1 in ((ROLLOUT_A, 1.0), (ROLLOUT_B, 0.5), (ROLLOUT_C, 0.0))]
    _close(torch.tensor(rewards[0]), [0.4999, 0.3749, 1.0], atol=1e-4)
    _close(torch.tensor(rewards[1]), [0.1110, 0.2079, 0.5], atol=1e-4)
    _close(torch.tensor(rewards[2]), [0.5, 0.0])


def test_greedy_differs_from_the_optimal_assignment():
    truth = [{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"b": 2}}]
    predicted = [{"name": "f", "arguments": {"a": 2}}, {"name": "f", "arguments": {"a": 1, "b": 2}}]
    # S = [[2/3, 1/3], [5/6, 5/6]]: greedy takes a 5/6 pair first and leaves the first call 1/3; the optimum
    # gives it 2/3
    assert match_calls(predicted, truth, "greedy") == [pytest.approx(1 / 3), pytest.approx(5 / 6)]
    assert match_calls(predicted, truth, "hungarian") == [pytest.approx(2 / 3), pytest.approx(5 / 6)]
    with pytest.raises(ValueError, match="assignment='km' is not valid"):
        match_calls(predicted, truth, "km")


def test_matching_edge_cases():
    assert match_calls([G1], [], "ot") == [0.0] and match_calls([], TRUTH) == []
    duplicate = [[G1], [G1], []]
    assert matched_turn_rewards(duplicate, TRUTH, "greedy", 0.0) == [1.0, 0.0, 0.0]  # a truth is used once
    _close(torch.tensor(matched_turn_rewards(duplicate, TRUTH, "ot", 0.0)), [0.25, 0.25, 0.0])
    assert matched_turn_rewards([[]], TRUTH, "greedy", 0.0) == [0.0]


# ---------------------------------------------------------------- matchtir: the estimator
def _matchtir(turn_rewards, num_turns, **kwargs):
    batch = _batch([0.0] * len(turn_rewards), turn_rewards=_padded(turn_rewards), num_turns=num_turns)
    return build_estimator("matchtir", **kwargs)(batch).advantages


def test_matchtir_example():
    _close(_matchtir([[1.0, 0.75, 1.0], [1 / 3, 0.625, 0.5], [1.0, 0.0]], [3, 3, 2]),
           [[1.1253, 1.0014, 0.9122], [-0.3406, -0.0536, -0.5066], [-0.7847, -0.9479, 0.0]])
    ot = [matched_turn_rewards(c, TRUTH, "ot", f1) for c, f1 in ((ROLLOUT_A, 1.0), (ROLLOUT_B, 0.5), (ROLLOUT_C, 0.0))]
    # the soft rows of the table were computed from 4-digit turn rewards: agreement to 1e-4
    _close(_matchtir(ot, [3, 3, 2]), [[1.1324, 1.0576, 0.9166], [-0.3725, -0.1600, -0.5243], [-0.7599, -0.8976, 0.0]],
           atol=1.2e-4)


def test_matchtir_edge_example():
    # D answers at once, E searches then answers wrongly, F searches twice (only F reaches turn 3: A_turn 0)
    _close(_matchtir([[0.0], [1.0, 0.0], [1.0, 0.0, 0.0]], [1, 2, 3]),
           [[-1.1547, 0.0, 0.0], [0.5773, 0.2887, 0.0], [0.5773, 0.2887, 0.2887]])
    _close(_matchtir([[0.0], [0.5, 0.0], [0.25, 0.25, 0.0]], [1, 2, 3]),
           [[-1.1541, 0.0, 0.0], [0.5992, -0.0649, 0.0], [0.5549, 0.6422, 0.2887]])


def test_matchtir_singleton_group_keeps_the_raw_score():
    batch = _batch([0.0, 1.0], [1, 1], turn_rewards=_padded([[0.5, 1.0], [2.0]], 2), num_turns=[2, 1])
    # a group of one: A_traj = S / (1 + 1e-6), every turn index held by one rollout: A_turn = 0
    _close(build_estimator("matchtir")(batch).advantages, [[0.75, 0.75], [1.0, 0.0]], atol=1e-5)


# ---------------------------------------------------------------- noisy_verifier
def test_noisy_verifier_example():
    batch = _batch([1.0, 0.0, 0.0, 1.0, 0.0])
    backward = build_estimator("noisy_verifier", rho_fp=0.1, rho_fn=0.2)(batch)
    # one group: no other group gives a baseline, so A = R^ itself
    _close(backward.advantages, [1.285714, -0.142857, -0.142857, 1.285714, -0.142857], atol=1e-6)
    assert backward.metrics["corrected_mean"] == pytest.approx((2 * 1.285714 - 3 * 0.142857) / 5, abs=1e-6)
    forward = build_estimator("noisy_verifier", rho_fp=0.1, rho_fn=0.2, mode="forward")(batch)
    _close(forward.advantages, [0.2, -0.8, -0.8, 0.2, -0.8], atol=1e-12)


def test_noisy_verifier_baseline_comes_from_other_groups():
    batch = _batch([1.0, 0.0, 0.0, 0.0, NAN, 1.0], [2, 2, 2])
    out = build_estimator("noisy_verifier", rho_fp=0.1, rho_fn=0.2)(batch)
    hat = {1.0: 0.9 / 0.7, 0.0: -0.1 / 0.7}
    others = [(hat[0] + hat[0] + hat[1]) / 3, (hat[0] + hat[0] + hat[1]) / 3,
              (hat[1] + hat[0] + hat[1]) / 3, (hat[1] + hat[0] + hat[1]) / 3, 0.0, (hat[1] + 3 * hat[0]) / 4]
    expected = [hat[1] - others[0], hat[0] - others[1], hat[0] - others[2], hat[0] - others[3], 0.0,
                hat[1] - others[5]]
    _close(out.advantages, expected, atol=1e-9)
    # an all-fail group is still pushed down (no per-group centring)
    assert build_estimator("noisy_verifier", rho_fp=0.1, rho_fn=0.2)(_batch([0.0] * 4)).advantages.lt(0).all()


def test_noisy_verifier_rejects_bad_rates_and_non_binary_rewards():
    for rates in ({"rho_fp": 0.5}, {"rho_fn": -0.1}, {"rho_fp": 0.1, "rho_fn": 0.5}):
        with pytest.raises(ValueError, match=r"need 0 <= rho_fp, rho_fn < 0.5 and rho_fp \+ rho_fn < 1"):
            build_estimator("noisy_verifier", **rates)
    with pytest.raises(ValueError, match=r"completion 2 of the batch has reward 0\.5"):
        build_estimator("noisy_verifier")(_batch([1.0, 0.0, 0.5, NAN]))


def test_noisy_verifier_expectation_follows_the_clean_signal_and_grpo_does_not():
    """Fixed completions with known clean labels, 20000 draws of verifier noise (rho_fp 0.3, rho_fn 0.05)."""
    clean = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                         dtype=F64)  # (32,) four groups of 8: 1, 7, 2 and 0 correct
    draws, rho_fp, rho_fn = 20000, 0.3, 0.05
    gen = torch.Generator().manual_seed(0)
    labels = clean.repeat(draws)  # every draw of noise is 4 more groups of the same completions
    u = torch.rand(labels.shape, generator=gen, dtype=F64)
    noisy = torch.where(labels == 1, (u >= rho_fn).to(F64), (u < rho_fp).to(F64))
    group_ids = torch.arange(labels.numel()) // 8

    def expected(name, rewards, **kwargs):  # (32,) mean advantage of each completion over the draws
        return build_estimator(name, **kwargs)(AdvantageBatch(rewards, group_ids)).advantages.view(draws, 32).mean(0)

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    clean_signal = expected("noisy_verifier", labels)  # no noise, no correction: r - mean of the other groups
    backward = expected("noisy_verifier", noisy, rho_fp=rho_fp, rho_fn=rho_fn)
    assert cosine(backward, clean_signal) > 0.9999 and (backward - clean_signal).abs().max() < 0.05
    forward = expected("noisy_verifier", noisy, rho_fp=rho_fp, rho_fn=rho_fn, mode="forward")
    assert cosine(forward, clean - 1) > 0.9999  # E[w] = (1 - rho_fp - rho_fn) (R* - 1)
    grpo_noisy, grpo_clean = expected("grpo", noisy), expected("grpo", labels)
    assert cosine(grpo_noisy, clean_signal) < 0.8  # group centring and scaling: another direction
    assert cosine(grpo_noisy, grpo_clean) < 0.998  # and noise shrinks each group by a different factor:
    ratios = [float(grpo_noisy[g * 8] / grpo_clean[g * 8]) for g in range(3)]
    assert max(ratios) / min(ratios) > 1.15, ratios


# ---------------------------------------------------------------- opmd and asymre
def test_opmd_and_asymre_example():
    batch = _batch([1.0, 0.0, 0.0, 1.0, 1.0])
    _close(build_estimator("opmd")(batch).advantages, [0.4, -0.6, -0.6, 0.4, 0.4], atol=1e-12)
    _close(build_estimator("asymre")(batch).advantages, [0.5, -0.5, -0.5, 0.5, 0.5], atol=1e-12)
    # edge cases: a group of one gets 0 (asymre: beta), an all-equal group 0 (asymre: beta), NaN 0
    edge = _batch([1.0, 1.0, 1.0, 1.0, NAN, 0.0], [1, 3, 2])
    _close(build_estimator("opmd")(edge).advantages, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    _close(build_estimator("asymre")(edge).advantages, [0.1, 0.1, 0.1, 0.1, 0.0, 0.1])


def _loss_inputs(logps, old_logps, mask):
    shape = logps.shape
    return LossInputs(logps=logps, old_logps=old_logps, entropies=torch.zeros(shape), mask=mask,
                      turn_ids=torch.where(mask, 0, -1), step=0, max_steps=1)


def test_opmd_loss_term_example():
    logps = torch.tensor([[-0.5, -1.2, -0.1], [-2.0, -0.3, 0.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-0.6, -1.0, -0.1], [-1.5, -0.3, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    term = build_estimator("opmd").loss(_loss_inputs(logps, old, mask))
    assert term.item() == pytest.approx(0.006, abs=1e-12)  # 0.1 * 0.30 / 5
    term.backward()
    _close(logps.grad, [[0.004, -0.008, 0.0], [-0.02, 0.0, 0.0]], atol=1e-12)  # 2 tau (log pi - old) / 5
    # on-policy (old = detached current): the term and its gradient are 0
    fresh = logps.detach().clone().requires_grad_(True)
    zero = build_estimator("opmd").loss(_loss_inputs(fresh, fresh.detach(), mask))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(fresh.grad, torch.zeros_like(fresh))
    assert build_estimator("asymre").loss(_loss_inputs(logps, old, mask)) is None  # asymre: no loss term
