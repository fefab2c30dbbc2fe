"""Pins the TRL methods RLTrainer overrides and their signatures: TRL marks them private, so an upgrade that
renames or re-shapes one must fail here rather than silently bypass rlfw's advantages or checkpoint state."""

import inspect

import pytest
from trl import GRPOTrainer

from rlfw.trainer import RLTrainer

# TRL 1.16 GRPOTrainer parameter names of every method RLTrainer overrides.
PINNED = {
    "__init__": ("self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "optimizers", "quantization_config", "peft_config",
                 "tools", "rollout_func", "environment_factory"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_compute_loss": ("self", "model", "inputs"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
        "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_get_output_dir": ("self", "trial"),
    "train": ("self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"),
}


def overridden_trl_methods() -> set[str]:
    return {name for name, value in vars(RLTrainer).items()
            if inspect.isfunction(value) and hasattr(GRPOTrainer, name)}


def test_overridden_methods_are_the_pinned_list():
    assert overridden_trl_methods() == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_trl_signature_is_pinned(name):
    assert tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters) == PINNED[name]


@pytest.mark.parametrize("name", sorted(set(PINNED) - {"__init__"}))
def test_override_accepts_trl_positional_arguments(name):
    """TRL calls these hooks positionally: the override must take at least TRL's required positional arguments."""
    trl_params = inspect.signature(getattr(GRPOTrainer, name)).parameters.values()
    required = [p for p in trl_params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    ours = list(inspect.signature(getattr(RLTrainer, name)).parameters.values())
    takes_var_args = any(p.kind is p.VAR_POSITIONAL for p in ours)
    positional = [p for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) >= len(required) or takes_var_args


def test_trl_internals_rlfw_reads_exist(tiny_assets, tokenizer, dataset, make_config):
    """Attributes of a built GRPOTrainer that RLTrainer reads while computing advantages and logging."""
    from conftest import hashed_reward

    trainer = RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=make_config(),
                        train_dataset=dataset, processing_class=tokenizer)
    assert trainer.reward_weights.shape == (1,)
    assert tokenizer.eos_token_id in trainer.eos_token_ids
    assert trainer.num_generations == 4 and trainer.rollout_func is None
    assert "advantages" in trainer._logs and "train" in trainer._metrics
    assert trainer.loss_type == "dapo" and trainer.max_completion_length == 8
