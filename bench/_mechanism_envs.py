"""Environment variants of the mechanism benchmarks (bench/learning.py): same tools and tasks, other rewards."""

from __future__ import annotations

from envs.calculator import CalculatorEnv

SHAPED_TOOL_REWARD = 0.3


class ShapedCalculatorEnv(CalculatorEnv):
    """The calculator with a larger immediate reward, 0.3 per clean calculate turn: four clean calls without an
    answer earn 1.2, more than a wrong answer's 0.3 and close to a right one's 1.3 (outcome 1 plus one clean call)."""

    def _score_turn(self, events):
        return SHAPED_TOOL_REWARD if all(e["ok"] for e in events) else 0.0
