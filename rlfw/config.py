"""RLConfig: TRL's GRPOConfig plus only the fields rlfw adds. Invalid settings fail here, before any model loads."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

from rlfw.advantages import ESTIMATORS, ChecksConfig, build_estimator
from rlfw.rollout.engine import DEFAULT_REMINDER, NON_FINAL_TURNS
from rlfw.rollout.rollout_func import ROLLOUT_BACKENDS

logger = logging.getLogger(__name__)

VLLM_INSTALL = "pip install 'rlfw[vllm]'  (vllm>=0.26,<=0.31, on a CUDA machine)"


@dataclass
class RLConfig(GRPOConfig):
    """Configuration for :class:`rlfw.RLTrainer`: every GRPOConfig field, plus the ones below.

    On a machine without CUDA, ``use_cpu`` defaults to True and ``bf16`` to False, so a config written for a GPU
    also runs (slowly) on a laptop; set them explicitly to override.
    """

    advantage_estimator: str = field(
        default="grpo",
        metadata={"help": f"Advantage estimator, by registered name: {sorted(ESTIMATORS)}."},
    )
    advantage_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Options of the advantage estimator (a dict, or a JSON string on the command line)."},
    )
    environment: str | None = field(
        default=None,
        metadata={
            "help": "Multi-turn environment: a module exposing ENVIRONMENT (e.g. 'envs.calculator') or "
            "'module:Class'. None = single-turn generation."
        },
    )
    max_turns: int = field(default=4, metadata={"help": "Maximum assistant turns per episode (multi-turn only)."})
    rollout_backend: str | None = field(
        default=None,
        metadata={"help": "Generation backend for rollouts, by registered name (rlfw.rollout.ROLLOUT_BACKENDS): 'hf' "
                  "(transformers generate), 'vllm', or one added with register_backend. Default: 'vllm' if use_vllm "
                  "else 'hf'."},
    )
    reuse_kv_cache: bool = field(
        default=True,
        metadata={"help": "HF rollout backend: keep each episode's key/value cache between turns and forward only the "
                  "tokens a turn adds (turn cost flat in the conversation's length). False recomputes the whole "
                  "prefix every turn (debugging)."},
    )
    tool_timeout: float = field(default=30.0, metadata={"help": "Seconds a single tool call may run."})
    max_tool_result_chars: int = field(
        default=2000, metadata={"help": "Tool results longer than this are truncated (characters)."}
    )
    tool_parser: str | None = field(
        default=None,
        metadata={"help": "Tool-call format: 'rlfw', 'hermes', 'llama3'; None = detect from the chat template."},
    )
    non_final_turn: str = field(
        default="continue",
        metadata={"help": "A multi-turn assistant turn that is neither a tool call nor a final answer (by the "
                  "environment's _record_final_answer): 'continue' (the model gets another assistant turn right "
                  "away), 'remind' (the environment answers with format_reminder as a user turn, then the model "
                  "continues) or 'end' (the episode ends there, truncated: no final answer)."},
    )
    format_reminder: str = field(
        default=DEFAULT_REMINDER,
        metadata={"help": "The user turn sent after a non-final turn with non_final_turn='remind'."},
    )
    zero_signal_patience: int = field(
        default=10,
        metadata={"help": "Warn when this many generation batches in a row have no learning signal (every advantage "
                  "zero, e.g. frac_reward_zero_std 1 with grpo); logged as advantages/zero_signal_streak. 0 = "
                  "never warn."},
    )
    reward_errors: str = field(
        default="raise",
        metadata={"help": "When a reward function raises: 'raise' (stop, naming function and sample) or 'nan' "
                  "(score that sample NaN, count it in rewards/errors, and go on)."},
    )

    def __post_init__(self):
        self._apply_device_defaults()
        super().__post_init__()
        self._check_estimator()
        self._check_rollout()
        if self.reward_errors not in ("raise", "nan"):
            raise ValueError(f"reward_errors={self.reward_errors!r} is not valid; use 'raise' or 'nan'.")
        if self.enable_jit_checkpoint:
            raise ValueError(
                "enable_jit_checkpoint=True is not supported: rlfw handles SIGTERM itself (it finishes the current "
                "step, saves a checkpoint on every process and exits 0; see rlfw.preemption), whereas transformers' "
                "JIT checkpoint saves mid-step. Remove enable_jit_checkpoint."
            )

    def _apply_device_defaults(self) -> None:
        import torch

        if torch.cuda.is_available():
            return
        if self.bf16 is None and not self.fp16:
            self.bf16 = False
        if not self.use_cpu:
            logger.info("No CUDA device: setting use_cpu=True.")
            self.use_cpu = True

    def _check_estimator(self) -> None:
        if isinstance(self.advantage_kwargs, str):
            try:
                self.advantage_kwargs = json.loads(self.advantage_kwargs) if self.advantage_kwargs.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"advantage_kwargs must be a JSON object, e.g. '{{\"scale\": \"mad\"}}'; got "
                    f"{self.advantage_kwargs!r} ({err.msg})"
                ) from None
        self.advantage_kwargs = dict(self.advantage_kwargs or {})
        name = self.advantage_estimator
        if name != "grpo" and self.scale_rewards != "group":
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} has no effect with advantage_estimator={name!r}: the "
                "estimator computes the advantages. Remove scale_rewards, or set the estimator's own option in "
                "advantage_kwargs."
            )
        if name == "grpo" and self.scale_rewards != "group":
            # TRL's own knob keeps working with the default estimator.
            chosen = self.advantage_kwargs.setdefault("scale", self.scale_rewards)
            if chosen != self.scale_rewards:
                raise ValueError(
                    f"scale_rewards={self.scale_rewards!r} contradicts advantage_kwargs scale={chosen!r}; set only one."
                )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation='normalize_then_sum' is not supported: rlfw estimators receive the "
                "weighted sum of reward functions. Remove the setting (default 'sum_then_normalize')."
            )
        estimator = build_estimator(name, **self.advantage_kwargs)  # unknown name/option -> ValueError with the fix
        if isinstance(estimator, ChecksConfig):
            estimator.check_config(self)

    def _check_rollout(self) -> None:
        if self.rollout_backend is None:
            self.rollout_backend = "vllm" if self.use_vllm else "hf"
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout_backend={self.rollout_backend!r} is not valid; use one of {list(ROLLOUT_BACKENDS)} "
                             "(or register one with rlfw.rollout.register_backend).")
        if ROLLOUT_BACKENDS[self.rollout_backend].uses_vllm:
            if importlib.util.find_spec("vllm") is None:
                raise ValueError(f"rollout_backend={self.rollout_backend!r} (or use_vllm=True) needs vLLM, which is not "
                                 f"installed: {VLLM_INSTALL}. Or use rollout_backend='hf'.")
            self.use_vllm = True
        elif self.use_vllm:
            raise ValueError(f"use_vllm=True contradicts rollout_backend={self.rollout_backend!r}; set only one of them.")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}.")
        if self.tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be > 0 seconds, got {self.tool_timeout}.")
        if self.non_final_turn not in NON_FINAL_TURNS:
            raise ValueError(f"non_final_turn={self.non_final_turn!r} is not valid; use one of {list(NON_FINAL_TURNS)}.")
        if self.zero_signal_patience < 0:
            raise ValueError(f"zero_signal_patience must be >= 0 (0 = never warn), got {self.zero_signal_patience}.")
