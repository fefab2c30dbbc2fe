"""Every RLConfig / parser / RLTrainer start-up error says what is wrong and how to fix it."""

import importlib.util
import json

import pytest
from conftest import fast_config, hashed_reward

from rlfw.advantages import ESTIMATORS


def config(tmp_path, **overrides):
    return fast_config(tmp_path / "out", **overrides)


def test_unknown_estimator_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown advantage_estimator 'ppo'") as err:
        config(tmp_path, advantage_estimator="ppo")
    for name in ESTIMATORS:
        assert repr(name) in str(err.value)


def test_unknown_estimator_option_lists_valid_options(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['bogus'\] for advantage_estimator='rloo'"):
        config(tmp_path, advantage_estimator="rloo", advantage_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match=r"Valid options: \[.*'scale'.*\]"):
        config(tmp_path, advantage_estimator="median", num_generations=5, per_device_train_batch_size=5,
               advantage_kwargs={"bogus": 1})


def test_scale_rewards_with_non_grpo_estimator(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards='batch' has no effect with advantage_estimator='rloo'"):
        config(tmp_path, advantage_estimator="rloo", scale_rewards="batch")


def test_scale_rewards_maps_onto_grpo_scale(tmp_path):
    assert config(tmp_path, scale_rewards="none").advantage_kwargs == {"scale": "none"}
    with pytest.raises(ValueError, match="contradicts advantage_kwargs scale='group'"):
        config(tmp_path, scale_rewards="batch", advantage_kwargs={"scale": "group"})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
@pytest.mark.parametrize("setting", [{"use_vllm": True}, {"rollout_backend": "vllm"}])
def test_vllm_without_vllm_names_install_command(tmp_path, setting):
    with pytest.raises(ValueError, match=r"needs vLLM, which is not installed: pip install 'rlfw\[vllm\]'"):
        config(tmp_path, **setting)


def test_median_with_even_num_generations(tmp_path):
    with pytest.raises(ValueError, match="needs an odd num_generations >= 3, got 4.*use num_generations=5"):
        config(tmp_path, advantage_estimator="median")


def test_bad_advantage_kwargs_json(tmp_path):
    with pytest.raises(ValueError, match=r"advantage_kwargs must be a JSON object.*got '\{scale: mad'"):
        config(tmp_path, advantage_kwargs="{scale: mad")


def test_reward_errors_invalid(tmp_path):
    with pytest.raises(ValueError, match="reward_errors='ignore' is not valid; use 'raise' or 'nan'"):
        config(tmp_path, reward_errors="ignore")


def test_unknown_rollout_backend(tmp_path):
    with pytest.raises(ValueError, match=r"rollout_backend='tpu' is not valid; use one of \['hf', 'vllm'\]"):
        config(tmp_path, rollout_backend="tpu")


def test_cpu_defaults_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU defaults apply only without CUDA")
    cfg = config(tmp_path)
    assert cfg.use_cpu is True and cfg.bf16 is False


# ---------------------------------------------------------------- through the command-line / YAML parser
def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_advantage_kwargs_json_string_on_the_command_line(tmp_path):
    from rlfw.recipe import parse_args

    cfg_path = write_yaml(tmp_path / "c.yaml", "advantage_estimator: median\nnum_generations: 5\n"
                          "per_device_train_batch_size: 5\n")
    kwargs = {"scale": "std", "rescale_nonzero": False}
    _, cfg, _ = parse_args(["--config", cfg_path, "--output_dir", str(tmp_path / "out"),
                            "--advantage_kwargs", json.dumps(kwargs)])
    assert cfg.advantage_estimator == "median" and cfg.advantage_kwargs == kwargs


def test_advantage_kwargs_mapping_in_yaml(tmp_path):
    from rlfw.recipe import parse_args

    cfg_path = write_yaml(tmp_path / "c.yaml", "advantage_estimator: rloo\nadvantage_kwargs: {}\n")
    _, cfg, _ = parse_args(["--config", cfg_path, "--output_dir", str(tmp_path / "out")])
    assert cfg.advantage_estimator == "rloo" and cfg.advantage_kwargs == {}


def test_unknown_yaml_key_is_an_error(tmp_path):
    from rlfw.recipe import parse_args

    cfg_path = write_yaml(tmp_path / "c.yaml", "advantage_estimator: grpo\nadvantage_estimater: rloo\n")
    with pytest.raises(ValueError, match="advantage_estimater"):
        parse_args(["--config", cfg_path, "--output_dir", str(tmp_path / "out")])


def test_config_errors_surface_through_the_parser(tmp_path):
    from rlfw.recipe import parse_args

    cfg_path = write_yaml(tmp_path / "c.yaml", "advantage_estimator: nope\n")
    with pytest.raises(ValueError, match="Unknown advantage_estimator 'nope'"):
        parse_args(["--config", cfg_path, "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------- RLTrainer start-up checks
@pytest.mark.parametrize(
    ("name", "missing"),
    [("stratified", "num_tool_calls"), ("igpo", "answer_logprobs"), ("gated", "turn_rewards")],
)
def test_multi_turn_estimators_fail_on_single_turn_generation(tmp_path, tiny_assets, name, missing):
    from rlfw.trainer import RLTrainer

    with pytest.raises(ValueError, match=rf"advantage_estimator '{name}' needs \[.*'{missing}'.*single-turn "
                                         r"generation does not supply.*Set `environment:`"):
        RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=config(tmp_path, advantage_estimator=name))


def test_trainer_needs_an_rlconfig(tmp_path, tiny_assets):
    from trl import GRPOConfig

    from rlfw.trainer import RLTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match=r"RLTrainer needs args=RLConfig"):
        RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=args)
