"""RLTrainer: TRL's GRPOTrainer with a pluggable advantage estimator and multi-turn rollouts.

It overrides only named TRL hooks (pinned by tests/test_trl_hooks.py) and keeps no math of its own:

- ``_calculate_rewards``: keep the gathered (N, F) reward matrix and contain reward-function errors.
- ``_generate_and_score_completions``: build the AdvantageBatch from gathered rewards and rollout metadata, call
  the estimator, map (N,) or (N, K) advantages to this process's rows and policy tokens, apply ``keep``.
- ``_get_per_token_logps_and_entropies`` / ``_compute_loss``: capture TRL's own log-probs and entropies and add
  loss-level estimator terms (the estimator's ``loss`` capability: EPO, OPMD); call ``on_optimizer_step`` once per
  optimizer step; keep loss normalisers consistent when rows are dropped.
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: rlfw's state (estimator state) in every checkpoint;
  checkpoints appear atomically (``_get_output_dir`` points transformers at a staging directory while it writes).
- ``train``: SIGTERM finishes the step, saves a checkpoint and stops (rlfw.preemption).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from rlfw import checkpoint, preflight, probes
from rlfw.advantages import (
    BATCH_FIELDS,
    AdvantageBatch,
    AdvantageOutput,
    ChecksConfig,
    Estimator,
    HasLossTerm,
    LossInputs,
    TracksSteps,
    build_estimator,
)
from rlfw.advantages.fields import LocalRows, supplied_fields
from rlfw.config import RLConfig
from rlfw.environment import resolve_environment
from rlfw.monitor import ZeroSignalMonitor
from rlfw.preemption import PreemptionCallback
from rlfw.rewards import contain_reward_errors, environment_reward

logger = logging.getLogger(__name__)

# Loss types whose normaliser counts rows (a dropped row would still count): rescale by rows / kept rows.
ROW_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")


class RLTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages come from ``args.advantage_estimator`` (or ``estimator=``).

    Args:
        estimator: an estimator instance; default: built from ``args.advantage_estimator`` / ``advantage_kwargs``.
        environment_factory: an environment class for multi-turn rollouts through rlfw's engine; default: the
            class named by ``args.environment``; None with no ``args.environment`` means single-turn generation.
        rollout_backend: a factory ``trainer -> Backend`` generating the multi-turn rollouts (custom generation,
            scripted policies); default: the backend named by ``args.rollout_backend`` (``ROLLOUT_BACKENDS``).
        Other arguments are GRPOTrainer's.
    """

    _staging_dir: str | None = None  # set while a checkpoint is being written (see _save_checkpoint)

    def __init__(self, model, reward_funcs=None, args: RLConfig | None = None, *, estimator: Estimator | None = None,
                 environment_factory=None, rollout_backend=None, **kwargs: Any):
        if args is None or not isinstance(args, RLConfig):
            raise TypeError("RLTrainer needs args=RLConfig(...) (a GRPOConfig lacks rlfw's fields).")
        if estimator is None:
            estimator = build_estimator(args.advantage_estimator, **args.advantage_kwargs)
        if not isinstance(estimator, Estimator):
            raise TypeError(f"estimator={estimator!r} does not meet the estimator contract (a name, requires, and "
                            "__call__(batch) -> AdvantageOutput); subclass rlfw.advantages.BaseEstimator.")
        self.estimator = estimator
        self.rollout_rows: list[dict] | None = None
        self._rewards_per_func: torch.Tensor | None = None
        self._logps: torch.Tensor | None = None
        self._entropies: torch.Tensor | None = None
        reward_funcs = list(reward_funcs or []) if isinstance(reward_funcs, list | tuple) else (
            [reward_funcs] if reward_funcs is not None else [])
        env_cls = environment_factory or resolve_environment(args.environment)
        self.environment_class = env_cls
        if env_cls is not None:
            from rlfw.rollout import make_rollout_func

            kwargs["rollout_func"] = make_rollout_func(
                env_cls, max_turns=args.max_turns, tool_timeout=args.tool_timeout,
                max_tool_result_chars=args.max_tool_result_chars, parser=args.tool_parser,
                backend=rollout_backend or args.rollout_backend, non_final_turn=args.non_final_turn,
                format_reminder=args.format_reminder,
            )
            if hasattr(env_cls, "get_reward"):
                reward_funcs.append(environment_reward(env_cls))
        preflight.check_inputs(reward_funcs, kwargs.get("train_dataset"), kwargs.get("processing_class"),
                               multi_turn=env_cls is not None, tool_parser=args.tool_parser)
        reward_funcs = contain_reward_errors(reward_funcs, args.reward_errors)
        self._check_requires(args, env_cls is not None, kwargs.get("train_dataset"))
        # rlfw's engine is the documented way to use TRL's rollout_func hook; its "experimental" notice is noise here.
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.preemption = PreemptionCallback(self.accelerator)
        self.add_callback(self.preemption)
        self.zero_signal = ZeroSignalMonitor(args.zero_signal_patience, warn=self.accelerator.is_main_process)

    # ------------------------------------------------------------------ set-up checks
    def _check_requires(self, args: RLConfig, multi_turn: bool, train_dataset: Any = None) -> None:
        name, needs = self.estimator.name, set(self.estimator.requires)
        unknown = sorted(needs - set(BATCH_FIELDS))
        if unknown:
            raise ValueError(f"advantage_estimator {name!r} requires unknown batch field(s) {unknown}; fields: "
                             f"{sorted(BATCH_FIELDS)} (register a new one with rlfw.advantages.register_field).")
        missing = sorted(needs - supplied_fields(multi_turn))
        if missing:
            raise ValueError(
                f"advantage_estimator {name!r} needs {missing} from the rollout, which "
                f"{'multi-turn' if multi_turn else 'single-turn'} generation does not supply. "
                "Set `environment:` to a multi-turn tool environment (e.g. envs.search_qa)."
            )
        columns = getattr(train_dataset, "column_names", None)  # None: unknown (iterable dataset), checked per row
        for field in sorted(needs):
            column = BATCH_FIELDS[field].column
            if column is not None and columns is not None and column[0] not in columns:
                raise ValueError(f"advantage_estimator {name!r} {column[1]}, but train_dataset has no {column[0]!r} "
                                 f"column (columns: {sorted(columns)}). {column[2]}")
        if isinstance(self.estimator, ChecksConfig):
            self.estimator.check_config(args)

    # ------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.rollout_func is not None:
            # An episode whose environment reset raised was never played: unscorable, whatever the functions said.
            failed = torch.tensor([row.get("reset_error") is not None for row in inputs], device=rewards_per_func.device)
            rewards_per_func[self.accelerator.gather(failed.long()).bool()] = torch.nan
        self._rewards_per_func = rewards_per_func  # (N, F), gathered over processes by TRL
        return rewards_per_func

    # ------------------------------------------------------------------ advantages
    def _generate_and_score_completions(self, inputs):
        self.rollout_rows = inputs  # the engine reads dataset rows (reset kwargs, answers) from here
        if self.rollout_func is not None:
            self.environments = None  # the engine resets environments itself; keep TRL's reset block out
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output
        batch = self._advantage_batch(inputs, output)
        result = self.estimator(batch)
        self._apply_advantages(inputs, output, batch, result)
        return output

    def answer_probes(self, inputs: list[dict], output: dict) -> list[list[float]]:
        """IGPO's answer_logprobs of this process's rows (see rlfw.probes): current policy, no grad, batched.

        Only rollouts whose gains count are probed: a truncated rollout falls back to its outcome, and a single-turn
        one has no turn followed by a tool result; both get NaN without a forward.
        """
        prompt_ids = self._local_prompt_ids(output)
        round_prefix_lens = [row["round_prefix_lens"] for row in inputs]
        probed = [not row.get("truncated", False) and len(row["round_prefix_lens"]) >= 2 for row in inputs]
        rollout_probes = probes.rollout_probes(self._tokenizer, inputs, self.environments)
        self._metrics["train"][f"advantages/{self.estimator.name}/probed_frac"].append(
            sum(probed) / max(len(probed), 1))
        return self._timed_probes(lambda: probes.answer_logprobs(
            prompt_ids, output["completion_ids"].tolist(), round_prefix_lens, rollout_probes, self._probe_logprobs,
            batch_size=self.args.per_device_train_batch_size, pad_token_id=self._tokenizer.pad_token_id,
            num_chunks_fn=self._max_over_processes, probed=probed))

    def info_gain_probes(self, inputs: list[dict], output: dict) -> list[list[float]]:
        """InfoPO's info_gain of this process's rows (see rlfw.probes): current policy, no grad, batched."""
        prompt_ids = self._local_prompt_ids(output)
        placeholder = probes.placeholder_ids(self._tokenizer)
        return self._timed_probes(lambda: probes.info_gains(
            prompt_ids, output["completion_ids"].tolist(), inputs, placeholder, self._probe_logprobs,
            batch_size=self.args.per_device_train_batch_size, pad_token_id=self._tokenizer.pad_token_id,
            num_chunks_fn=self._max_over_processes))

    @staticmethod
    def _local_prompt_ids(output: dict) -> list[list[int]]:
        prompt_mask = output["prompt_mask"].bool()
        return [ids[m].tolist() for ids, m in zip(output["prompt_ids"], prompt_mask, strict=True)]

    def _timed_probes(self, run) -> list[list[float]]:
        """Runs a probe computation on the policy (eval mode, no grad) and logs its time as probe_seconds."""
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # the policy itself: no dropout, and no gradient checkpointing for a no-grad pass
        try:
            with torch.no_grad():
                values = run()
        finally:
            self.model.train(was_training)
        self._metrics["train"][f"advantages/{self.estimator.name}/probe_seconds"].append(time.perf_counter() - start)
        return values

    def _probe_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
                        ) -> torch.Tensor:
        """Log-probs of the last ``logits_to_keep`` tokens per row through TRL's own forward (fused head, temperature)."""
        device = self.accelerator.device
        return self._get_per_token_logps_and_entropies(
            self.model, input_ids.to(device), attention_mask.to(device), logits_to_keep)[0]  # (B, logits_to_keep)

    def _max_over_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).max().item())

    def _advantage_batch(self, inputs: list[dict], output: dict) -> AdvantageBatch:
        device = self.accelerator.device
        rpf = self._rewards_per_func
        rewards = (rpf * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan  # unscorable, exactly as TRL
        n = rewards.numel()
        group_ids = torch.arange(n, device=device) // self.num_generations  # (N,) TRL's RepeatSampler order
        multi_turn = self.rollout_func is not None
        local = LocalRows(inputs, output, multi_turn, frozenset(self.eos_token_ids) | {self._tokenizer.pad_token_id},
                          trainer=self)
        supplied, needs = supplied_fields(multi_turn), self.estimator.requires
        fields = {name: self._gather_field(field, field.build(local)) for name, field in BATCH_FIELDS.items()
                  if name in supplied and (field.always or name in needs)}
        return AdvantageBatch(rewards=rewards, group_ids=group_ids, step=self.state.global_step,
                              max_steps=max(self.state.max_steps, 1), **fields)

    def _gather_field(self, field, values: list) -> torch.Tensor:
        """One optional batch field from its per-local-row values, gathered over processes: (N,) or (N, K)."""
        if field.per_turn:
            return self._gather_ragged(values, field.dtype)
        return self.accelerator.gather(torch.tensor(values, dtype=field.dtype, device=self.accelerator.device))

    def _gather_ragged(self, rows: list[list], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-row lists of different lengths -> (N, K) padded (NaN for floats, 0 for integers), gathered."""
        pad = float("nan") if dtype.is_floating_point else 0
        k = max(len(r) for r in rows)
        local = torch.full((len(rows), k), pad, dtype=dtype, device=self.accelerator.device)  # (N_local, K_local)
        for i, r in enumerate(rows):
            local[i, : len(r)] = torch.tensor(r, dtype=dtype)
        local = self.accelerator.pad_across_processes(local, dim=1, pad_index=pad)
        return self.accelerator.gather(local)

    def _apply_advantages(self, inputs: list[dict], output: dict, batch: AdvantageBatch,
                          result: AdvantageOutput) -> None:
        b = len(inputs)
        rows = slice(self.accelerator.process_index * b, (self.accelerator.process_index + 1) * b)
        advantages = result.advantages.to(self.accelerator.device).float()
        token_turns = self._token_turn_ids(inputs, output)  # (N_local, T) turn index, -1 off-policy
        output["rlfw_turn_ids"] = token_turns
        if advantages.dim() == 1:
            output["advantages"] = advantages[rows]  # (N_local,) TRL broadcasts over tokens
        else:
            local = advantages[rows]  # (N_local, K)
            index = token_turns.clamp(min=0, max=local.size(1) - 1)
            per_token = local.gather(1, index)  # (N_local, T)
            output["advantages"] = torch.where(token_turns >= 0, per_token, torch.zeros_like(per_token))
        keep = result.keep.to(self.accelerator.device)[rows]  # (N_local,)
        if not bool(keep.all()):
            tool_mask = output.get("tool_mask")
            tool_mask = torch.ones_like(output["completion_mask"]) if tool_mask is None else tool_mask
            output["tool_mask"] = tool_mask * keep[:, None].to(tool_mask.dtype)
            loss_mask = output["completion_mask"] * output["tool_mask"]
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        output["rlfw_keep"] = keep.float()
        self._log_advantages(advantages, result)
        streak = self.zero_signal.update(advantages, result.keep)  # gathered values: the same on every process
        self._metrics["train"]["advantages/zero_signal_streak"].append(float(streak))

    def _token_turn_ids(self, inputs: list[dict], output: dict) -> torch.Tensor:
        mask = output["completion_mask"]
        if self.rollout_func is None:
            return torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -1))
        turn_ids = torch.full_like(mask, -1)  # (N_local, T)
        for i, row in enumerate(inputs):
            ids = row.get("turn_ids") or []
            length = min(len(ids), turn_ids.size(1))
            turn_ids[i, :length] = torch.tensor(ids[:length], dtype=turn_ids.dtype)
        return torch.where(mask.bool(), turn_ids, torch.full_like(turn_ids, -1))

    def _log_advantages(self, advantages: torch.Tensor, result: AdvantageOutput) -> None:
        metrics = self._metrics["train"]
        name = self.estimator.name
        per_completion = advantages if advantages.dim() == 1 else torch.nan_to_num(advantages).sum(1)
        metrics["advantages/mean"].append(per_completion.mean().item())
        metrics["advantages/std"].append(per_completion.std().item() if per_completion.numel() > 1 else 0.0)
        metrics["advantages/kept_frac"].append(result.keep.float().mean().item())
        for key, value in result.metrics.items():
            metrics[f"advantages/{name}/{key}"].append(float(value))
        # The completions table shows the advantages actually trained on, not TRL's.
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), per_completion.numel())):
            logged.pop()
        logged.extend(per_completion.tolist())

    # ------------------------------------------------------------------ loss
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if torch.is_grad_enabled():
            self._logps, self._entropies = logps, entropies  # TRL's own loss forward, with grad (loss terms reuse them)
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        keep = inputs.get("rlfw_keep")
        if keep is not None and self.loss_type in ROW_MEAN_LOSSES and 0 < keep.sum() < keep.numel():
            loss = loss * (keep.numel() / keep.sum())  # dropped rows must not count in a per-row mean
        if self.model.training and self._logps is not None:
            if isinstance(self.estimator, HasLossTerm):
                loss = self._add_estimator_loss(loss, inputs)
            if isinstance(self.estimator, TracksSteps) and self.accelerator.sync_gradients:
                self.estimator.on_optimizer_step(self._sum_over_processes)
        return loss

    def _add_estimator_loss(self, loss: torch.Tensor, inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        turn_ids = torch.where(mask.bool(), inputs["rlfw_turn_ids"], torch.full_like(inputs["rlfw_turn_ids"], -1))
        old_logps = inputs.get("old_per_token_logps")
        term = self.estimator.loss(LossInputs(
            logps=self._logps, old_logps=self._logps.detach() if old_logps is None else old_logps,
            entropies=self._entropies, mask=mask.bool(), turn_ids=turn_ids, step=self.state.global_step,
            max_steps=max(self.state.max_steps, 1)))
        if term is None:
            return loss
        self._metrics["train"][f"advantages/{self.estimator.name}/loss_term"].append(term.item())
        return loss + term / self.current_gradient_accumulation_steps  # scaled for accumulation like TRL's own terms

    def _sum_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum")

    # ------------------------------------------------------------------ checkpoints and preemption
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        with self.preemption.catch_signals():  # SIGTERM: finish the step, save, stop (rlfw.preemption)
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self.zero_signal.finish()
        return output

    @property
    def preempted(self) -> bool:
        """Whether the last ``train()`` stopped early on SIGTERM, after saving a checkpoint."""
        return self.preemption.preempted

    def _save_checkpoint(self, model, trial):
        # transformers/TRL write under a staging directory (see _get_output_dir); the checkpoint is renamed into
        # place only once every process has written its part, so a crash never leaves a half-written checkpoint-N.
        run_dir = super()._get_output_dir(trial=trial)
        staging = checkpoint.staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            checkpoint.prepare_staging(run_dir, self.state.global_step)
        self.accelerator.wait_for_everyone()  # no process writes before stale staging directories are gone
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        staged = os.path.join(staging, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        best = self.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == str(staging):  # the best is this step: point at its final name
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, checkpoint.TRAINER_STATE_FILE))
        if self.args.should_save:
            checkpoint.save_state(staged, self.estimator)
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are in the staging dir
        if self.args.should_save:
            final = checkpoint.publish(staged, run_dir)
            checkpoint.rotate(run_dir, self.args.save_total_limit, final, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial):
        # While _save_checkpoint runs, transformers/TRL must write the checkpoint (and TRL's extra files) there.
        return self._staging_dir or super()._get_output_dir(trial=trial)

    def _load_optimizer_and_scheduler(self, checkpoint_dir):
        device = self.args.device
        if self.args.world_size > 1 and device.type == "cpu" and device.index is not None:
            # transformers maps the optimizer state to args.device with >1 process; accelerate gives CPU processes
            # "cpu:0", which torch.load cannot restore to. Plain "cpu" is the same memory.
            self.args.__dict__["_setup_devices"] = torch.device("cpu")
        try:
            super()._load_optimizer_and_scheduler(checkpoint_dir)
        finally:
            self.args.__dict__["_setup_devices"] = device
        if checkpoint_dir is not None:
            checkpoint.load_state(checkpoint_dir, self.estimator)
