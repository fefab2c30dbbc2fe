"""Every estimator trains through its config file, and what it computes is what the loss gets.

- For every estimator (tests/mp_worker.py ESTIMATOR_CONFIGS): 2 steps from configs/<env>/<name>.yaml on
  the tiny local model (sizes shrunk; tests/mp_worker.py ``config_run``). Every other episode is scripted (tool
  calls, then an answer) so that runs have tool calls and several turns; the rest are sampled from the model. The
  estimator is wrapped to record its output, which must equal the advantages ``_compute_loss`` receives for those
  rows and tokens (keep=False rows out of the loss), and its ``advantages/<name>/...`` metrics must be logged.
- IGPO's answer probes: the batched probe equals an unpadded single-sequence forward for every (rollout, round).
- Start-up errors that name the fix.
- 2 processes: every estimator gives the same advantages as a 1-process call on the same gathered batch (one
  torchrun launch for all estimators).

Exact resume of the stateful estimator (epo) after 2 of 4 steps is tested in test_trainer.py (1 and 2 processes).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN_2, fast_config, run_two_ranks
from mp_worker import ESTIMATOR_CONFIGS, ConfigRunTrainer, config_run, from_jsonable

from rlfw import probes
from rlfw.advantages import AdvantageBatch, build_estimator

TESTS = Path(__file__).resolve().parent
ESTIMATORS = list(ESTIMATOR_CONFIGS)


def expected_loss_advantages(advantages: torch.Tensor, rows: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """What the loss must receive for global ``rows``: (B,) per completion, or (B, T) with a turn's value on its
    policy tokens (turn id >= 0) and 0 elsewhere."""
    if advantages.dim() == 1:
        return advantages[rows].float()
    per_turn = advantages[rows].float()  # (B, K)
    per_token = per_turn.gather(1, turn_ids.clamp(min=0, max=per_turn.size(1) - 1))  # (B, T)
    return torch.where(turn_ids >= 0, per_token, torch.zeros_like(per_token))


def assert_reaches_loss(advantages, keep, loss_inputs: list[dict]) -> set[int]:
    """Checks each loss call's advantages and loss mask against the estimator's output; returns the rows seen."""
    seen = set()
    for call in loss_inputs:
        rows = call["rows"]
        seen.update(rows.tolist())
        expected = expected_loss_advantages(advantages, rows, call["turn_ids"])
        assert torch.equal(call["advantages"], expected)
        dropped = ~keep[rows]
        assert (call["loss_mask"][dropped] == 0).all(), "keep=False rows must leave the loss"
    return seen


# ---------------------------------------------------------------- every estimator through its config
@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_trains_through_its_config(name, tmp_path, tiny_assets):
    trainer = config_run(tiny_assets, name, tmp_path / "out")
    assert trainer.state.global_step == 2
    calls, iterations = trainer.estimator.calls, trainer.args.num_iterations
    # one generation batch per num_iterations steps, one loss call per step
    assert len(calls) == 2 // iterations and len(trainer.loss_inputs) == 2
    nonzero = False
    for step, loss_input in enumerate(trainer.loss_inputs):
        batch, result = calls[step // iterations]
        n = batch.rewards.numel()
        assert result.advantages.shape[0] == n and result.keep.shape == (n,)
        assert assert_reaches_loss(result.advantages, result.keep, [loss_input]) == set(range(n))
        nonzero |= bool(result.advantages.abs().max() > 1e-3)
    assert nonzero, f"{name}: all advantages were 0, so the check above proves little"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    for entry in logs:
        assert any(key.startswith(f"advantages/{name}/") for key in entry), sorted(entry)
    CONFIG_RUN_CHECKS.get(name, lambda trainer, logs: None)(trainer, logs)


def _median_drops_pivots(trainer, logs):
    assert all(not result.keep.all() for _, result in trainer.estimator.calls)  # one pivot per group left the loss


def _igpo_probes(trainer, logs):
    assert all(entry["advantages/igpo/probe_seconds"] > 0 for entry in logs)
    fractions = []
    for batch, _ in trainer.estimator.calls:
        logp = batch.answer_logprobs  # (N, K)
        probed = (batch.num_turns > 1) & ~batch.truncated  # (N,) rollouts whose gains count
        fractions.append(probed.float().mean().item())
        exists = (torch.arange(logp.size(1))[None, :] < batch.num_turns[:, None]) & probed[:, None]
        assert torch.equal(~torch.isnan(logp), exists) and (logp[exists] < 0).all()
        assert probed.any(), "no rollout with an information gain"
    assert [entry["advantages/igpo/probed_frac"] for entry in logs] == pytest.approx(fractions)  # one batch a step
    assert all(entry["advantages/igpo/gain_rollout_frac"] > 0 for entry in logs)


def _infopo_gains(trainer, logs):
    assert all(entry["advantages/infopo/probe_seconds"] > 0 for entry in logs)
    for batch, _ in trainer.estimator.calls:
        gain, lengths = batch.info_gain, batch.turn_lengths  # (N, K)
        exists = torch.arange(gain.size(1))[None, :] < batch.num_turns[:, None]
        assert (~torch.isnan(gain)).any(), "no turn followed by a tool result"
        last = gain[torch.arange(len(gain)), batch.num_turns - 1]
        assert not (~torch.isnan(gain) & ~exists).any() and torch.isnan(last).all()  # NaN past and at the last turn
        assert not ((lengths > 0) & ~exists).any() and (lengths[~torch.isnan(gain)] > 0).all()


def _matchtir_turn_rewards(trainer, logs):
    for batch, _ in trainer.estimator.calls:
        exists = torch.arange(batch.turn_rewards.size(1))[None, :] < batch.num_turns[:, None]
        values = batch.turn_rewards[exists]
        assert not torch.isnan(values).any() and ((values >= 0) & (values <= 1)).all()
        assert (values > 0).any(), "no search matched the ground-truth calls"


def _opmd_term_acts_on_the_second_pass(trainer, logs):
    terms = [entry["advantages/opmd/loss_term"] for entry in logs]
    assert abs(terms[0]) < 1e-9 < terms[1], terms  # same weights as the sampling policy, then moved


CONFIG_RUN_CHECKS = {"median": _median_drops_pivots, "igpo": _igpo_probes, "infopo": _infopo_gains,
                     "matchtir": _matchtir_turn_rewards, "opmd": _opmd_term_acts_on_the_second_pass}


class ProbeCheckingTrainer(ConfigRunTrainer):
    """Recomputes every probe with one unpadded forward per (rollout, round), the plainest possible way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_checks: list[tuple[int, int, float, float]] = []  # (row, round, batched, reference)

    def answer_probes(self, inputs, output):
        values = super().answer_probes(inputs, output)
        model = self.model
        model.eval()
        tokenizer = self.processing_class
        with torch.no_grad():
            for row, (prompt, mask, completion, row_values) in enumerate(zip(
                    output["prompt_ids"], output["prompt_mask"], output["completion_ids"], values, strict=True)):
                answer = tokenizer.encode(inputs[row]["answer"], add_special_tokens=False)
                probe = tokenizer.encode("<answer>", add_special_tokens=False) + answer  # search_qa's probe text
                for t, length in enumerate(inputs[row]["round_prefix_lens"]):
                    ids = prompt[mask.bool()].tolist() + completion[:length].tolist() + probe
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -len(answer) - 1: -1]  # (A, V)
                    logps = torch.log_softmax(logits.float() / self.temperature, dim=-1)
                    reference = logps.gather(1, torch.tensor(answer)[:, None]).mean().item()
                    self.probe_checks.append((row, t, row_values[t], reference))
        model.train()
        return values


def test_igpo_probes_equal_unbatched_forwards(tmp_path, tiny_assets):
    trainer = config_run(tiny_assets, "igpo", tmp_path / "out", trainer_cls=ProbeCheckingTrainer, max_steps=1)
    checks = trainer.probe_checks
    batch = trainer.estimator.calls[0][0]
    probed = ((batch.num_turns > 1) & ~batch.truncated).tolist()  # the others run no probe forward: NaN
    assert len(checks) == int(batch.num_turns.sum()) and any(t > 0 and probed[row] for row, t, _, _ in checks)
    for row, _, batched, reference in checks:
        assert batched == pytest.approx(reference, abs=1e-4) if probed[row] else math.isnan(batched)
    priors = {}
    for row, t, batched, _ in checks:
        if t == 0 and probed[row]:  # a prompt's prior is shared by its G rollouts (computed once)
            priors.setdefault(row // 4, set()).add(batched)
    assert all(len(values) == 1 for values in priors.values())


# ---------------------------------------------------------------- probe batching, without a model
class TokenIdLogProbs:
    """A stand-in model: the 'log-prob' of each kept token is its own id, so means are checkable by hand."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, attention_mask, logits_to_keep):
        self.calls.append((input_ids.clone(), attention_mask.clone(), logits_to_keep))
        return input_ids[:, -logits_to_keep:].float()


def test_answer_logprobs_batches_dedupes_and_averages_answer_tokens():
    answer = probes.Probe(ids=(90, 10, 20), num_answer_tokens=2)  # template token 90, then answer tokens 10, 20
    other = probes.Probe(ids=(30,), num_answer_tokens=1)
    fn = TokenIdLogProbs()
    values = probes.answer_logprobs(
        prompt_ids=[[1, 2], [1, 2], [5]], completion_ids=[[3, 4, 7], [8, 9, 0], [6, 6]],
        round_prefix_lens=[[0, 2], [0], [0, 1]], probes=[answer, answer, other], logprobs_fn=fn,
        batch_size=2, pad_token_id=0)
    assert values == [[15.0, 15.0], [15.0], [30.0, 30.0]]
    # rows 0 and 1 share the t = 0 prior: 4 distinct (context, probe) sequences, longest first, in chunks of 2
    forwarded = [[row[mask.bool()].tolist() for row, mask in zip(ids, masks, strict=True)] for ids, masks, _ in fn.calls]
    assert forwarded == [[[1, 2, 3, 4, 90, 10, 20], [1, 2, 90, 10, 20]], [[5, 6, 30], [5, 30]]]
    assert [keep for _, _, keep in fn.calls] == [2, 1]  # logits only for the chunk's longest answer
    assert all((masks[:, -1] == 1).all() for _, masks, _ in fn.calls), "left-padded: rows end with their answer"


def test_answer_logprobs_skips_rollouts_not_probed():
    fn = TokenIdLogProbs()
    probe = probes.Probe((4,), 1)
    values = probes.answer_logprobs(
        prompt_ids=[[1], [2], [3]], completion_ids=[[5, 6], [7, 8], [9]], round_prefix_lens=[[0, 1], [0, 1], [0]],
        probes=[probe] * 3, logprobs_fn=fn, batch_size=8, pad_token_id=0, probed=[True, False, False])
    assert values[0] == [4.0, 4.0] and all(math.isnan(v) for row in values[1:] for v in row)
    assert [len(row) for row in values] == [2, 2, 1]
    forwarded = [row[mask.bool()].tolist() for ids, masks, _ in fn.calls for row, mask in zip(ids, masks, strict=True)]
    assert forwarded == [[1, 5, 4], [1, 4]]  # the skipped rollouts' contexts never reach the model


def test_answer_logprobs_runs_in_lockstep_and_nan_for_empty_answers():
    fn = TokenIdLogProbs()
    values = probes.answer_logprobs(
        prompt_ids=[[1], [2]], completion_ids=[[], []], round_prefix_lens=[[0], [0]],
        probes=[probes.Probe((4,), 1), probes.Probe((), 0)], logprobs_fn=fn, batch_size=8, pad_token_id=0,
        num_chunks_fn=lambda local: local + 2)  # another process has 2 more chunks
    assert values[0] == [4.0] and math.isnan(values[1][0])
    assert len(fn.calls) == 3 and all(ids.shape == (1, 2) for ids, _, _ in fn.calls[1:])


def test_tokenize_probe_finds_the_answer_tokens(tokenizer):
    probe = probes.tokenize_probe(tokenizer, "<answer>Zorblax City</answer>", "Zorblax City")
    answer = tokenizer.encode("Zorblax City", add_special_tokens=False)
    assert list(probe.ids) == tokenizer.encode("<answer>", add_special_tokens=False) + answer
    assert probe.num_answer_tokens == len(answer)
    assert probes.tokenize_probe(tokenizer, "<answer></answer>", "") == probes.Probe((), 0)
    with pytest.raises(ValueError, match="must return text that includes the answer verbatim"):
        probes.tokenize_probe(tokenizer, "<answer>paris</answer>", "Paris")


def test_rollout_probes_use_the_environment_and_need_an_answer(tokenizer):
    class Env:
        def _format_final_answer(self, answer):
            return f"The answer is {answer}."

    first, bare = probes.rollout_probes(tokenizer, [{"answer": ["7", "seven"]}, {"answer": 7}], [Env(), object()])
    assert first.num_answer_tokens == len(tokenizer.encode("7", add_special_tokens=False))  # first alias
    assert list(bare.ids) == tokenizer.encode("7", add_special_tokens=False)  # no _format_final_answer: the bare answer
    with pytest.raises(ValueError, match="needs the ground truth in a dataset column 'answer'"):
        probes.rollout_probes(tokenizer, [{"prompt": "q"}], None)


# ---------------------------------------------------------------- start-up errors
def test_igpo_without_an_answer_column_fails_before_the_model_loads(tmp_path):
    from datasets import Dataset

    from rlfw.trainer import RLTrainer

    args = fast_config(tmp_path / "out", advantage_estimator="igpo", environment="envs.search_qa")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "Who?"}], "gold": "x"}])
    with pytest.raises(ValueError, match=r"train_dataset has no 'answer' column \(columns: \['gold', 'prompt'\]\)"
                                         r"\. Add the reference answer text"):
        RLTrainer(model="no/such/model", args=args, train_dataset=data)


# ---------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_give_the_one_process_advantages(tmp_path, tiny_assets):
    out = tmp_path / "mp"
    ranks = run_two_ranks(TORCHRUN_2, [str(TESTS / "mp_worker.py"), "--assets", tiny_assets, "--out", str(out),
                                       "--scenario", "estimators"], tmp_path, out, timeout=1500)
    for name in ESTIMATORS:
        runs = [from_jsonable(rank["estimators"][name]) for rank in ranks]
        assert _equal(runs[0]["steps"], runs[1]["steps"]), f"{name}: the processes saw different batches"
        assert runs[0]["state"] == runs[1]["state"], name
        assert len(runs[0]["steps"]) == 2 // runs[0]["num_iterations"]
        one_process = build_estimator(name, **runs[0]["advantage_kwargs"])
        for step, recorded in enumerate(runs[0]["steps"]):
            batch = AdvantageBatch(**recorded["batch"])
            assert batch.rewards.numel() == 12 and batch.group_ids.max() == 12 // (3 if name == "median" else 4) - 1
            result = one_process(batch)
            assert torch.equal(result.advantages, recorded["advantages"]), (name, step)
            assert torch.equal(result.keep, recorded["keep"]), (name, step)
            # each process trained on its own rows of the gathered result
            rows = set()
            for run in runs:
                rows |= assert_reaches_loss(recorded["advantages"], recorded["keep"], [run["loss_inputs"][step]])
            assert rows == set(range(12))
    for name in ("igpo", "infopo"):
        calls = [from_jsonable(rank["estimators"][name])["probe_calls"] for rank in ranks]
        assert len(calls[0]) == len(calls[1]), f"{name}: processes must run the same number of probe forwards"
    # the lockstep padding (a one-row dummy forward on the process with fewer chunks) ran in a real 2-process run;
    # both estimators score through probes.mean_answer_logprobs, so either one exercising it is enough
    probe_calls = [from_jsonable(rank["estimators"][name])["probe_calls"] for name in ("igpo", "infopo")
                   for rank in ranks]
    dummies = [call for calls in probe_calls for call in calls if call[:2] == [1, 2]]
    assert dummies, "the processes never had different numbers of probe chunks"


def _equal(a, b) -> bool:
    """Exact equality of nested records, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) if not a.is_floating_point() else (
            a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b
