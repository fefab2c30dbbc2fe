"""Multi-turn, token-in/token-out rollouts for tool-using agents, behind TRL's ``rollout_func`` contract.

    from rlfw.rollout import make_rollout_func
    trainer = GRPOTrainer(..., rollout_func=make_rollout_func(MyEnv, max_turns=4))
"""

from rlfw.rollout.backends import Backend, HFBackend, VLLMBackend, require_vllm
from rlfw.rollout.engine import Episode, RolloutEngine
from rlfw.rollout.rollout_func import make_rollout_func

__all__ = ["Backend", "Episode", "HFBackend", "RolloutEngine", "VLLMBackend", "make_rollout_func", "require_vllm"]
