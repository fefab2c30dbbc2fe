"""Every shipped config parses: training YAMLs through rlfw's own parser, accelerate YAMLs as accelerate configs."""

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ACCELERATE = CONFIGS / "accelerate"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
ACCELERATE_CONFIGS = sorted(ACCELERATE.rglob("*.yaml"))


def test_there_are_configs():
    assert TRAINING_CONFIGS, f"no training configs under {CONFIGS}"


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_training_config_parses(path, tmp_path):
    from rlfw.recipe import parse_args

    script_args, config, model_args = parse_args(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert config.output_dir == str(tmp_path / "out")
    assert config.num_generations >= 2 and (script_args.reward_funcs or config.environment)
    assert isinstance(config.advantage_kwargs, dict)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    assert data.get("compute_environment") in ("LOCAL_MACHINE", "AMAZON_SAGEMAKER")
    assert "distributed_type" in data
    if data["distributed_type"] != "NO":
        assert int(data.get("num_processes", 1)) >= 1
