"""The benchmarks' own measuring code: the per-phase step breakdown and the probe-cost runs, on the tiny model."""

from __future__ import annotations

import argparse

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bench(tiny_assets):
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import overhead
        import probe_cost

        yield overhead, probe_cost
    finally:
        sys.path.remove(str(REPO / "bench"))


def overhead_args(**overrides) -> argparse.Namespace:
    settings = dict(device="cpu", bf16=False, warmup_steps=1, steps=2, group=4, batch=8, max_completion_length=16,
                    turns=3, multi_max_completion_length=160)
    return argparse.Namespace(**{**settings, **overrides})


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_step_phases_add_up_to_the_step_time(bench, tiny_assets, tokenizer, mode):
    overhead, _ = bench
    runs = {c: overhead.one_run(c, mode, tiny_assets, tokenizer, overhead_args()) for c in ("trl", "rlfw")}
    for run in runs.values():
        phases = run["phases"]
        assert list(phases) == list(overhead.PHASES)
        assert sum(phases.values()) == pytest.approx(run["s_per_step"], rel=1e-6)
        assert phases["sampling"] > 0 and phases["loss forward"] > 0 and phases["backward"] > 0
        assert phases["environment"] >= 0 and phases["other"] >= 0 and phases["probes"] == 0
    assert runs["trl"]["tokens"] == runs["rlfw"]["tokens"]  # the forced or seeded rollouts match


def test_probe_cost_skips_rollouts_whose_gains_are_discarded(bench, tiny_assets, tokenizer):
    _, probe_cost = bench
    args = argparse.Namespace(warmup_steps=0, steps=1, batch=4, group=2, max_completion_length=24, max_turns=2)
    skipping = probe_cost.one_run("igpo", tiny_assets, tokenizer, args)
    probing = probe_cost.one_run("igpo-probe-all", tiny_assets, tokenizer, args)
    # the untrained tiny model's episodes are cut at 24 tokens: nothing to probe, so no probe forward runs
    assert skipping["truncated"] == 1.0 and skipping["probed"] == 0.0
    assert probing["probed"] == 1.0 and probing["phases"]["probes"] > skipping["phases"]["probes"]
