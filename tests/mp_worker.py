"""Training scenarios shared by the 1-process tests and the 2-process launch.

    torchrun --standalone --nproc_per_node 2 tests/mp_worker.py --assets DIR --out DIR

runs parity (TRL's advantages vs the ones RLTrainer trains on), both legs of an exact-resume check, and one short
run of every estimator through its config file (recording the gathered AdvantageBatch, the estimator's output and
what reached the loss), and writes ``rank<r>.json`` per process plus the final parameters of each resume run
(``<run>.pt``, process 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import REPO, fast_config, hashed_reward, prompt_rows, text_of  # noqa: E402

from rlfw.assets import load_tokenizer  # noqa: E402
from rlfw.checkpoint import STATE_FILE  # noqa: E402
from rlfw.trainer import RLTrainer  # noqa: E402


class RecordingTrainer(RLTrainer):
    """Records, per generation batch, TRL's own advantages and the ones RLTrainer hands to the loss."""

    def _apply_advantages(self, inputs, output, batch, result):
        trl_advantages = output["advantages"].detach().clone()  # (N_local,) computed by GRPOTrainer
        super()._apply_advantages(inputs, output, batch, result)
        self.recorded.append({"trl": trl_advantages.tolist(), "rlfw": output["advantages"].detach().tolist()})


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps, as a crash right after a checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(assets: str, output_dir, callbacks=None, **overrides) -> RecordingTrainer:
    from datasets import Dataset

    trainer = RecordingTrainer(
        model=assets, reward_funcs=[hashed_reward], args=fast_config(output_dir, **overrides),
        train_dataset=Dataset.from_list(prompt_rows()), processing_class=load_tokenizer(assets), callbacks=callbacks,
    )
    trainer.recorded = []
    return trainer


def parity_run(assets: str, output_dir, **overrides) -> list[dict]:
    """Train with the default grpo estimator; per step {"trl": [...], "rlfw": [...]} for this process's rows."""
    trainer = make_trainer(assets, output_dir, **overrides)
    trainer.train()
    return trainer.recorded


def logged_rewards(trainer) -> dict[int, float]:
    return {entry["step"]: entry["reward"] for entry in trainer.state.log_history if "reward" in entry}


def final_parameters(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().cpu().clone() for name, p in model.state_dict().items()}


def resume_runs(assets: str, root, steps: int = 4, save_steps: int = 2, **overrides) -> dict:
    """Train ``steps`` straight, and ``save_steps`` steps + interrupt + resume from the checkpoint.

    Returns, per run ("straight", "resumed"): logged rewards by step, final estimator state, final parameters;
    plus the saved rlfw state file of the checkpoint.
    """
    root = Path(root)
    common = {"max_steps": steps, **overrides}
    straight = make_trainer(assets, root / "straight", **common)
    straight.train()
    first = make_trainer(assets, root / "resumed", callbacks=[StopAt(save_steps)], save_strategy="steps",
                         save_steps=save_steps, **common)
    first.train()
    checkpoint = root / "resumed" / f"checkpoint-{save_steps}"
    saved_state = json.loads((checkpoint / STATE_FILE).read_text()) if (checkpoint / STATE_FILE).exists() else None
    state_after_first = first.estimator.state_dict()
    second = make_trainer(assets, root / "resumed", save_strategy="steps", save_steps=save_steps, **common)
    second.train(resume_from_checkpoint=str(checkpoint))
    return {
        "straight": {"rewards": logged_rewards(straight), "estimator_state": straight.estimator.state_dict(),
                     "params": final_parameters(straight), "global_step": straight.state.global_step},
        "resumed": {"rewards": logged_rewards(second), "estimator_state": second.estimator.state_dict(),
                    "params": final_parameters(second), "global_step": second.state.global_step},
        "first_leg": {"estimator_state": state_after_first, "global_step": first.state.global_step},
        "saved_state": saved_state,
    }


# ---------------------------------------------------------------- every estimator through its config file
CONFIGS = REPO / "configs"
# One shipped config per estimator (the multi-turn environment it is meant for).
ESTIMATOR_CONFIGS = {
    "grpo": "calculator/grpo.yaml",
    "rloo": "calculator/rloo.yaml",
    "median": "calculator/median.yaml",
    "stratified": "search_qa/stratified.yaml",
    "riskpo": "calculator/riskpo.yaml",
    "gated": "python_sandbox/gated.yaml",
    "igpo": "search_qa/igpo.yaml",
    "epo": "calculator/epo.yaml",
    "infopo": "search_qa/infopo.yaml",
    "matchtir": "search_qa/matchtir.yaml",
    "noisy_verifier": "calculator/noisy_verifier.yaml",
    "opmd": "calculator/opmd.yaml",
    "asymre": "calculator/asymre.yaml",
}
BINARY_REWARD = {"noisy_verifier"}  # trained on the 0/1 hashed reward alone (the estimator rejects other values)
# Tiny and fast: 2 prompts per step, short episodes, short tool results (median needs an odd group).
CONFIG_OVERRIDES = {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8, "max_turns": 3,
                    "max_completion_length": 96, "max_tool_result_chars": 40, "dataset_size": 16,
                    "save_strategy": "no", "learning_rate": 1e-3, "disable_tqdm": True}
MEDIAN_OVERRIDES = {"num_generations": 3, "per_device_train_batch_size": 6}
TOOL_ARGUMENTS = {"search": {"query": "Zorblax Corp"}, "calculate": {"expression": "2 + 3 * 4"},
                  "run_python": {"code": "print(2 + 3)"}}
SCRIPT_MARK = "Plan:"


class MixedBackend:
    """Every other episode is scripted (on process 1 of 2: every episode), the rest are sampled from the model.

    A scripted episode calls the environment's tool in 1 or 2 turns (alternating), then gives a final answer, so runs
    have tool calls, multi-turn and answered episodes next to the tiny random model's (mostly truncated) ones. The
    plan is written into the first turn's text, so later turns read it back from the token ids. With 2 processes
    the processes thus hold different numbers of rounds (IGPO's probes must still run in lockstep).
    """

    def __init__(self, trainer):
        from rlfw.environment import environment_tools
        from rlfw.rollout.backends import HFBackend

        self.model_backend = HFBackend.from_trainer(trainer)
        self.tokenizer = trainer.processing_class
        self.assistant_id = self.tokenizer.convert_tokens_to_ids("<|assistant|>")
        tool = next(name for name in environment_tools(trainer.environment_class()) if name in TOOL_ARGUMENTS)
        self.call = f"<call>{json.dumps({'name': tool, 'arguments': TOOL_ARGUMENTS[tool]})}</call><|end|>"
        self.episodes = 0
        self.every = 1 if trainer.accelerator.process_index % 2 else 2

    def _scripted(self, ids: list[int]) -> str | None:
        turn = ids.count(self.assistant_id) - 1  # every turn starts with the generation prompt
        if turn == 0:
            self.episodes += 1
            if self.episodes % self.every:
                return None
            return f"{SCRIPT_MARK}{1 + self.episodes // 2 % 2}#{self.episodes}.{self.call}"  # '#n': distinct rounds
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if SCRIPT_MARK not in text:
            return None
        planned = int(text.split(SCRIPT_MARK)[1].split("#")[0])
        return self.call if turn < planned else f"<answer>{len(ids) % 3}</answer><|end|>"

    def generate(self, prompts, max_new_tokens):
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        scripted = [self._scripted(list(ids)) for ids in prompts]
        sampled = [k for k, text in enumerate(scripted) if text is None]
        # Called even with nothing to sample: generation is collective under FSDP/ZeRO-3.
        from_model = iter(self.model_backend.generate([prompts[k] for k in sampled], [budgets[k] for k in sampled]))
        out = []
        for text, budget in zip(scripted, budgets, strict=True):
            if text is None:
                out.append(next(from_model))
            else:
                ids = self.tokenizer.encode(text, add_special_tokens=False)[:budget]
                out.append((ids, [-1.0] * len(ids)))
        return out


class RecordingEstimator:
    """Wraps an estimator and keeps every batch it was given and every output it returned."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple] = []

    def __call__(self, batch):
        result = self.inner(batch)
        self.calls.append((batch, result))
        return result

    def __getattr__(self, name):  # name, requires, loss_term, update_history, state_dict, ...
        return getattr(self.inner, name)


class ConfigRunTrainer(RLTrainer):
    """Records, per generation batch, the global row index of each local row, and what each loss call received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.estimator = RecordingEstimator(self.estimator)
        self.loss_inputs: list[dict] = []
        self.local_outputs: list[dict] = []
        self.probe_calls: list[list[int]] = []

    def _apply_advantages(self, inputs, output, batch, result):
        super()._apply_advantages(inputs, output, batch, result)
        b = len(inputs)
        start = self.accelerator.process_index * b
        output["test_rows"] = torch.arange(start, start + b, device=output["advantages"].device)  # travels with rows
        self.local_outputs.append({"rows": output["test_rows"].clone(), "advantages": output["advantages"].clone(),
                                   "turn_ids": output["rlfw_turn_ids"].clone()})

    def _compute_loss(self, model, inputs):
        loss_mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        self.loss_inputs.append({"rows": inputs["test_rows"].clone(), "advantages": inputs["advantages"].clone(),
                                 "turn_ids": inputs["rlfw_turn_ids"].clone(), "loss_mask": loss_mask.clone()})
        return super()._compute_loss(model, inputs)

    def _probe_logprobs(self, input_ids, attention_mask, logits_to_keep):
        self.probe_calls.append([*input_ids.shape, int(attention_mask.sum())])
        return super()._probe_logprobs(input_ids, attention_mask, logits_to_keep)


def binary_hashed_reward(completions, **kwargs) -> list[float]:
    """0 or 1, deterministic in the completion text and varied within groups."""
    return [float(zlib.crc32(text_of(c).encode()) % 2) for c in completions]


def config_run(assets: str, name: str, output_dir, trainer_cls=ConfigRunTrainer, **overrides) -> ConfigRunTrainer:
    """Train estimator ``name`` through its config file (sizes overridden) with the MixedBackend; returns the trainer.

    The config's environment reward is joined by ``hashed_reward`` so that rewards vary within every group (for
    estimators that need 0/1 rewards: ``binary_hashed_reward`` alone, the other rewards weighted 0).
    """
    from rlfw.recipe import load_datasets, parse_args

    settings = {**CONFIG_OVERRIDES, **(MEDIAN_OVERRIDES if name == "median" else {}), **overrides}
    argv = ["--config", str(CONFIGS / ESTIMATOR_CONFIGS[name]), "--output_dir", str(output_dir),
            "--model_name_or_path", assets]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    script_args, config, _ = parse_args(argv)
    assert config.advantage_estimator == name and config.environment, ESTIMATOR_CONFIGS[name]
    train_dataset, _ = load_datasets(script_args)
    from rlfw.rewards import load_reward_func

    reward_funcs = list(map(load_reward_func, script_args.reward_funcs))
    if name in BINARY_REWARD:  # weights: the config's functions, the binary reward, the environment's reward
        config.reward_weights = [0.0] * len(reward_funcs) + [1.0, 0.0]
    reward_funcs.append(binary_hashed_reward if name in BINARY_REWARD else hashed_reward)
    trainer = trainer_cls(model=assets, args=config, train_dataset=train_dataset, rollout_backend=MixedBackend,
                          reward_funcs=reward_funcs, processing_class=load_tokenizer(assets))
    trainer.train()
    return trainer


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "data": value.tolist()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def from_jsonable(value):
    """Tensors back from ``_jsonable``'s {"dtype", "data"} form (exact: float32 values survive as doubles)."""
    if isinstance(value, dict) and set(value) == {"dtype", "data"}:
        return torch.tensor(value["data"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def estimator_records(trainer: ConfigRunTrainer) -> dict:
    """What a config run saw, per generation batch: the gathered AdvantageBatch, the estimator's output, the local
    advantages, the loss inputs and the probe forwards (JSON-safe)."""
    steps = []
    for batch, result in trainer.estimator.calls:
        fields = {k: v for k, v in vars(batch).items() if v is not None}
        steps.append({"batch": fields, "advantages": result.advantages, "keep": result.keep})
    return _jsonable({"advantage_kwargs": trainer.args.advantage_kwargs, "num_iterations": trainer.args.num_iterations,
                      "steps": steps,
                      "local": trainer.local_outputs, "loss_inputs": trainer.loss_inputs,
                      "probe_calls": trainer.probe_calls, "state": trainer.estimator.state_dict(),
                      "metrics": [e for e in trainer.state.log_history if "loss" in e]})


def all_estimator_runs(assets: str, root, **overrides) -> dict:
    """One config run per estimator; their records by name."""
    return {name: estimator_records(config_run(assets, name, Path(root) / name, **overrides))
            for name in ESTIMATOR_CONFIGS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", choices=["trainer", "estimators"], default="trainer",
                        help="trainer: grpo parity with TRL and exact resume; estimators: every estimator's config run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    result = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if args.scenario == "estimators":
        # 6 rows per process and 4 generations: 3 groups, the middle one split across the two processes.
        result["estimators"] = all_estimator_runs(args.assets, out / "estimators", per_device_train_batch_size=6,
                                                  ddp_find_unused_parameters=False)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        return
    # 2 rows per process and 4 generations: every group is split across the two processes.
    shape = {"per_device_train_batch_size": 2, "num_generations": 4, "ddp_find_unused_parameters": False}
    parity = parity_run(args.assets, out / "parity", max_steps=3, **shape)
    resume = resume_runs(args.assets, out / "resume", advantage_estimator="epo", **shape)
    if rank == 0:
        for run in ("straight", "resumed"):
            torch.save(resume[run].pop("params"), out / f"{run}.pt")
    else:
        for run in ("straight", "resumed"):
            resume[run].pop("params")
    result.update(parity=parity, resume=resume)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
