"""Config strictness, through the path a user's YAML takes (``rlfw.recipe.main``): every key must be known, and
every combination rlfw cannot run fails at start-up, before any model loads, with the fix in the message.

Each row of CASES: (id, YAML changes to a working run, extra command-line arguments, message regex). A key set to
DROP is removed from the YAML. Model loading is replaced by a failure, so a case that got that far would fail here.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import prompt_rows

DROP = object()
NO_VLLM = importlib.util.find_spec("vllm") is None


def case(name, changes, argv, message, marks=()):
    return pytest.param(changes, argv, message, id=name, marks=marks)


CASES = [
    # keys no dataclass knows
    case("unknown-yaml-key", {"advantage_estimater": "rloo"}, [],
     r"Unknown config key\(s\): 'advantage_estimater' \(config file; did you mean 'advantage_estimator'\?\)\. "
     r"Every key must be a field of ScriptArguments, RLConfig \(GRPOConfig\) or ModelConfig"),
    case("unknown-flag", {}, ["--num_generation", "4"],
     r"'num_generation' \(command line; did you mean 'num_generations'\?\).*Fix or remove it"),
    case("abbreviated-flag", {}, ["--learning_r", "1e-6"], r"'learning_r' \(command line; did you mean 'learning_rate'"),
    case("stray-argument", {}, ["oops"], r"Unknown config key\(s\): 'oops' \(command line\)"),
    # values of the wrong type
    case("not-an-int", {"num_generations": "four"}, [],
     r"Invalid config: argument --num_generations/--num-generations: invalid int value: 'four'\. Fix the value"),
    case("not-a-bool", {"use_vllm": "maybe"}, [], r"Invalid config: argument --use_vllm.*Truthy value expected"),
    case("bad-json-option", {}, ["--advantage_kwargs", "{scale: mad"], r"advantage_kwargs must be a JSON object"),
    # settings rlfw does not support, alone or together
    case("unknown-estimator", {"advantage_estimator": "ppo"}, [], r"Unknown advantage_estimator 'ppo'.*'grpo'"),
    case("unknown-estimator-option", {"advantage_estimator": "rloo", "advantage_kwargs": {"bogus": 1}}, [],
     r"Unknown option\(s\) \['bogus'\] for advantage_estimator='rloo'"),
    case("turns-estimator-single-turn", {"advantage_estimator": "stratified"}, [],
     r"'stratified' needs \['num_tool_calls'\] from the rollout, which single-turn generation does not supply\. "
     r"Set `environment:`"),
    case("median-even-group", {"advantage_estimator": "median"}, [],
     r"needs an odd num_generations >= 3, got 4.*use num_generations=5"),
    case("scale-rewards-with-rloo", {"advantage_estimator": "rloo", "scale_rewards": "batch"}, [],
     r"scale_rewards='batch' has no effect with advantage_estimator='rloo'.*Remove scale_rewards"),
    case("normalize-then-sum", {"multi_objective_aggregation": "normalize_then_sum"}, [],
     r"'normalize_then_sum' is not supported.*Remove the setting"),
    case("vllm-not-installed", {"use_vllm": True}, [],
         r"needs vLLM, which is not installed: pip install 'rlfw\[vllm\]'.*Or use rollout_backend='hf'",
         marks=pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed")),
    case("unknown-backend", {"rollout_backend": "tpu"}, [], r"rollout_backend='tpu' is not valid; use one of"),
    case("jit-checkpoint", {"enable_jit_checkpoint": True}, [],
     r"enable_jit_checkpoint=True is not supported: rlfw handles SIGTERM itself.*Remove enable_jit_checkpoint"),
    case("reward-errors-mode", {"reward_errors": "ignore"}, [], r"reward_errors='ignore' is not valid; use 'raise' or 'nan'"),
    case("zero-turns", {"environment": "envs.calculator", "max_turns": 0}, [], r"max_turns must be >= 1, got 0"),
    case("zero-tool-timeout", {"tool_timeout": 0}, [], r"tool_timeout must be > 0 seconds"),
    case("group-split", {"per_device_train_batch_size": 3}, [],  # TRL's own check, surfaced unchanged
     r"generation_batch_size \(3\) must be divisible by num_generations \(4\)"),
    # what the run is given
    case("no-model", {"model_name_or_path": DROP}, [], r"model_name_or_path is required"),
    case("no-reward", {"reward_funcs": []}, [], r"No reward: set reward_funcs"),
    case("unknown-reward", {"reward_funcs": ["exact_mach"]}, [], r"Unknown reward function 'exact_mach'\. Built-ins"),
    case("reward-column-missing", {"dataset": "NO_ANSWER"}, [],
     r"reward function 'exact_match' needs \['answer'\].*Add the column to the dataset"),
    case("estimator-column-missing",
     {"dataset": "NO_ANSWER", "reward_funcs": [], "environment": "envs.calculator", "advantage_estimator": "igpo"}, [],
     r"'igpo' probes .* train_dataset has no 'answer' column.*Add the reference answer"),
    case("no-prompt-column", {"dataset": "NO_PROMPT"}, [], r"train_dataset has no 'prompt' column.*Rename the column"),
    case("tokenizer-without-template", {"model_name_or_path": "NO_TEMPLATE"}, [],
     r"has no chat template.*Set tokenizer\.chat_template"),
    case("incomplete-resume-path", {"resume_from_checkpoint": "INCOMPLETE"}, [],
     r"cannot be resumed from: it has no trainer_state\.json.*resume_from_checkpoint: true"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_assets):
    """Placeholders a case can name: datasets lacking a column, a tokenizer without a template, a bad checkpoint."""
    from rlfw.assets import load_tokenizer

    root = tmp_path_factory.mktemp("strict")
    files = {}
    for name, rows in {"DATA": prompt_rows(),
                       "NO_ANSWER": [{"prompt": r["prompt"]} for r in prompt_rows()],
                       "NO_PROMPT": [{"question": r["prompt"], "answer": r["answer"]} for r in prompt_rows()]}.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tiny_assets)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(root / "no_template")
    (root / "no_template" / "chat_template.jinja").unlink(missing_ok=True)
    files["NO_TEMPLATE"] = root / "no_template"
    files["INCOMPLETE"] = root / "out" / "checkpoint-7"
    files["INCOMPLETE"].mkdir(parents=True)
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize(("changes", "argv", "message"), CASES)
def test_config_error_table(tmp_path, tiny_assets, inputs, monkeypatch, changes, argv, message):
    from rlfw.recipe import main

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config error was found")

    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", no_model_loading)
    base = {"model_name_or_path": tiny_assets, "dataset": "DATA", "reward_funcs": ["exact_match"],
            "num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 8, "report_to": "none",
            "max_steps": 1}
    config = {k: inputs.get(v, v) if isinstance(v, str) else v for k, v in {**base, **changes}.items()
              if v is not DROP}
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    with pytest.raises(ValueError, match=f"(?s){message}"):
        main(["--config", str(path), "--output_dir", str(tmp_path / "out"), *argv])


def test_table_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
