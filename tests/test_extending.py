"""Extending rlfw with an estimator that needs a new batch field and a loss term takes two pieces of code: the
field's registry entry and the estimator. The example is the one in docs/estimators.md, executed as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import hashed_reward, prompt_rows

from rlfw.advantages import BATCH_FIELDS, AdvantageBatch
from rlfw.advantages.fields import rollout_keys, supplied_fields, unregister_field
from rlfw.trainer import RLTrainer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "estimators.md"


@pytest.fixture
def docs_example():
    """The namespace of the docs' new-field example (its field registered for the test's duration)."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    (code,) = [b for b in blocks if "register_field(" in b]
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - the documented example, run as written
    try:
        yield namespace
    finally:
        unregister_field("policy_tokens")


class Recording(RLTrainer):
    def _apply_advantages(self, inputs, output, batch, result):
        super()._apply_advantages(inputs, output, batch, result)
        self.applied.append((batch, result, output["advantages"].clone(), output["completion_mask"].clone()))


def test_a_new_field_and_a_loss_term_need_only_the_entry_and_the_estimator(docs_example, tiny_assets, tokenizer,
                                                                          make_config):
    from datasets import Dataset

    # the one registry entry is all the rest of rlfw derives from
    assert "policy_tokens" in BATCH_FIELDS and "policy_tokens" in supplied_fields(multi_turn=False)
    assert "policy_tokens" not in rollout_keys()  # built by the trainer from TRL's masks, not by the rollout
    AdvantageBatch(torch.zeros(2), torch.zeros(2, dtype=torch.long), policy_tokens=torch.ones(2, dtype=torch.long))
    estimator = docs_example["Concise"](cost=0.01, entropy_coef=0.5)
    trainer = Recording(model=tiny_assets, reward_funcs=[hashed_reward], args=make_config(max_steps=2),
                        train_dataset=Dataset.from_list(prompt_rows()), processing_class=tokenizer,
                        estimator=estimator)
    trainer.applied = []
    trainer.train()
    assert len(trainer.applied) == 2
    for batch, result, trained, mask in trainer.applied:
        assert torch.equal(batch.policy_tokens, mask.sum(1))  # gathered; 1 process: the local rows
        assert torch.equal(trained, result.advantages.float())  # the estimator's output reached the loss
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    terms = [entry["advantages/concise/loss_term"] for entry in logs]
    entropies = [entry["entropy"] for entry in logs]
    assert all(math.isfinite(t) and t > 0 for t in terms)
    assert terms == pytest.approx([0.5 * h for h in entropies], rel=1e-3)  # 0.5 x TRL's own mean token entropy
    assert all("advantages/concise/mean_tokens" in entry for entry in logs)


def test_an_estimator_requiring_an_unknown_field_fails_at_start_up(tmp_path, tiny_assets, make_config):
    from rlfw.advantages import AdvantageOutput, BaseEstimator

    class NeedsMissing(BaseEstimator):
        name = "needs_missing"
        requires = frozenset({"no_such_field"})

        def __call__(self, batch):  # pragma: no cover - never reached
            return AdvantageOutput(batch.rewards)

    with pytest.raises(ValueError, match=r"requires unknown batch field\(s\) \['no_such_field'\].*register_field"):
        RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=make_config(), estimator=NeedsMissing())
