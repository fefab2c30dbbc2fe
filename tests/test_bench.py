"""The benchmarks' own measuring code: the per-phase step breakdown and the probe-cost runs, on the tiny model."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def bench(tiny_assets):
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import overhead
        import probe_cost
        import rollout

        yield overhead, probe_cost, rollout
    finally:
        sys.path.remove(str(REPO / "bench"))


def overhead_args(**overrides) -> argparse.Namespace:
    settings = dict(device="cpu", bf16=False, warmup_steps=1, steps=2, group=4, batch=8, max_completion_length=16,
                    turns=3, multi_max_completion_length=160)
    return argparse.Namespace(**{**settings, **overrides})


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_step_phases_add_up_to_the_step_time(bench, tiny_assets, tokenizer, mode):
    overhead, *_ = bench
    runs = {c: overhead.one_run(c, mode, tiny_assets, tokenizer, overhead_args()) for c in ("trl", "rlfw")}
    for run in runs.values():
        phases = run["phases"]
        assert list(phases) == list(overhead.PHASES)
        assert sum(phases.values()) == pytest.approx(run["s_per_step"], rel=1e-6)
        assert phases["sampling"] > 0 and phases["loss forward"] > 0 and phases["backward"] > 0
        assert phases["environment"] >= 0 and phases["other"] >= 0 and phases["probes"] == 0
    assert runs["trl"]["tokens"] == runs["rlfw"]["tokens"]  # the forced or seeded rollouts match


def test_probe_cost_skips_rollouts_whose_gains_are_discarded(bench, tiny_assets, tokenizer):
    _, probe_cost, _ = bench
    args = argparse.Namespace(warmup_steps=0, steps=1, batch=4, group=2, max_completion_length=24, max_turns=2)
    skipping = probe_cost.one_run("igpo", tiny_assets, tokenizer, args)
    probing = probe_cost.one_run("igpo-probe-all", tiny_assets, tokenizer, args)
    # the untrained tiny model's episodes are cut at 24 tokens: nothing to probe, so no probe forward runs
    assert skipping["truncated"] == 1.0 and skipping["probed"] == 0.0
    assert probing["probed"] == 1.0 and probing["phases"]["probes"] > skipping["phases"]["probes"]


def test_mechanism_preconditions_from_a_batch():
    """The mechanism benchmarks' measurements on a hand-checked batch: two groups of three."""
    import sys

    import torch

    from rlfw.advantages.base import AdvantageBatch, AdvantageOutput

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from _learning_run import batch_stats
    finally:
        sys.path.remove(str(REPO / "bench"))
    clean = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # the environment's outcome
    batch = AdvantageBatch(
        rewards=torch.tensor([1.0, 1.0, 0.0, 0.5, 1.0, 0.0]),  # what the estimator trained on
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        num_tool_calls=torch.tensor([1, 1, 2, 2, 1, 3]),
        turn_rewards=torch.tensor([[0.3, float("nan")], [0.3, 0.3], [0.0, 0.0], [0.3, 0.3], [0.3, 0.0], [0.3, 0.3]]),
        truncated=torch.tensor([False, False, True, False, False, True]))
    out = AdvantageOutput(torch.tensor([-1.0, 0.5, 0.0, -0.2, 0.4, -0.2]))
    stats = batch_stats(batch, out, clean)
    # centred clean rewards: [2/3, -1/3, -1/3, 1/3, 1/3, -2/3]; signs wrong in rows 0, 1 and 3 (row 2's is 0)
    assert stats["wrong_sign"] == pytest.approx(3 / 6)
    assert "label_error" not in stats  # 0.5 is not a 0/1 reward
    assert stats["unlucky_negative"] == pytest.approx(2 / 3)  # right answers: rows 0, 3, 4; rows 0 and 3 pushed down
    # group 0: fewest calls (1) mean reward 1.0, the rest 0.0; group 1: fewest (1) 1.0, the rest 0.25
    assert stats["stratum_gap"] == pytest.approx((1.0 + 0.75) / 2) and stats["multi_stratum"] == 1.0
    shaped = torch.tensor([0.3, 0.6, 0.0, 0.6, 0.3, 0.6])  # failing rows 1, 2, 5
    assert stats["failing_shaped_share"] == pytest.approx(float(shaped[[1, 2, 5]].sum() / shaped.sum()))
    assert stats["failing_shaped_gap"] == pytest.approx(0.4 - 0.4)
    assert stats["clean_reward"] == pytest.approx(0.5) and stats["answered"] == pytest.approx(4 / 6)
    binary = batch_stats(batch.replace(rewards=torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])), out, clean)
    assert binary["label_error"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("num_turns", [1, 2, 4])
def test_turn_forcing_step_by_step_equals_a_rescan(bench, tokenizer, num_turns):
    """The forcing processor updates its per-row state from the appended token; a fresh instance rescans the whole
    history. Both force the same token at every step, for rows at different turns and paddings, through EOS."""
    *_, rollout = bench
    probe = rollout.ForceTurns(tokenizer, num_turns)
    turn = probe.assistant + probe.call + probe.tool + tokenizer.encode("echo: hi", add_special_tokens=False)
    rows = [turn * n + probe.assistant for n in range(4)] + [tokenizer.encode("hello") + probe.assistant]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    stepping, vocab = rollout.ForceTurns(tokenizer, num_turns), len(tokenizer)
    for _ in range(len(probe.call) + 5):
        scores = torch.zeros(ids.shape[0], vocab)
        forced = stepping(ids, scores)
        assert torch.equal(forced, rollout.ForceTurns(tokenizer, num_turns)(ids, scores))
        ids = torch.cat([ids, forced.argmax(-1, keepdim=True)], dim=1)
    assert (ids[:, -1] == tokenizer.eos_token_id).all()  # every row ended its turn
