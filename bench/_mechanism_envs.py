"""Environment variants of the mechanism benchmarks (bench/learning.py): same tools and tasks, other rewards."""

from __future__ import annotations

from envs.calculator import CalculatorEnv

SHAPED_TOOL_REWARD = 0.5


class ShapedCalculatorEnv(CalculatorEnv):
    """The calculator with a larger immediate reward, 0.5 per clean calculate turn: an episode that keeps calling for
    its six turns (five calls run) without answering earns 2.5, more than a right answer's 1.5 (outcome 1 plus one
    clean call)."""

    def _score_turn(self, events):
        return SHAPED_TOOL_REWARD if all(e["ok"] for e in events) else 0.0
