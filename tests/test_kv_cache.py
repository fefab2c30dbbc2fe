"""Cross-turn key/value reuse in the HF rollout backend: the same tokens and log-probs as recomputing the whole
prefix every turn, on every path the backend serves (the engine, every shipped environment, held-out evaluation,
`rlfw rollout`, and training with LoRA and gradient checkpointing on or off).

The tiny untrained model rarely ends a turn on its own, so a logits processor raises the EOS logit: by a constant
(sampling: turns of random length) or at every ninth token of a row (greedy: turns that end at different points in
different rows). Either way both contenders see the same processed scores, so they must sample the same tokens.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from rlfw.rollout import HFBackend, RolloutEngine
from rlfw.rollout.kv_cache import GQA_ATTENTION, PrefixCache, _decode_mask, _Prefix, gqa_attention


class EosBias(LogitsProcessor):
    """Adds ``bias`` to the EOS logit; with ``period``, only where a row's real (non-pad) length is a multiple of it."""

    def __init__(self, eos: int, pad: int, bias: float, period: int | None = None):
        self.eos, self.pad, self.bias, self.period = eos, pad, bias, period

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        if self.period is None:
            scores[:, self.eos] += self.bias
        else:
            real = (input_ids != self.pad).sum(dim=1)
            scores[:, self.eos] += torch.where(real % self.period == 0, self.bias, 0.0)
        return scores


def bias_generation(model, processor: LogitsProcessor) -> None:
    """Every ``model.generate`` call applies ``processor`` (after the sampling processors)."""
    generate = type(model).generate.__get__(model)
    model.generate = lambda *a, **kw: generate(*a, logits_processor=LogitsProcessorList([processor]), **kw)


class Chat:
    """No tools, and no turn is final: every episode runs ``max_turns`` turns (or its token budget)."""

    def reset(self, **row):
        return None

    def _record_final_answer(self, text):
        return False

    def get_reward(self):
        return 0.0


def rows(n: int = 8) -> list[dict]:
    """Prompts of different lengths, so the batch is left-padded from the first turn on."""
    return [{"prompt": [{"role": "user", "content": "What is " + " plus ".join(map(str, range(i + 1))) + "?"}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_assets):
    return AutoModelForCausalLM.from_pretrained(tiny_assets).eval()


def play(model, tokenizer, reuse: bool, temperature: float, seed: int = 0, env_cls=Chat, batch=None, max_turns=8,
         max_completion_length=400):
    backend = HFBackend(model, tokenizer, temperature=temperature, reuse_cache=reuse)
    engine = RolloutEngine(tokenizer, backend, max_turns=max_turns, max_completion_length=max_completion_length,
                           eos_token_ids=backend.eos_ids)
    batch = batch or rows()
    torch.manual_seed(seed)
    episodes = engine.run(batch, [env_cls() for _ in batch])
    return episodes, backend


def count_cache_hits(monkeypatch) -> list[int]:
    """Per ``generate`` call, how many prompts found their prefix in the cache (filled as the test runs)."""
    reused, take = [], PrefixCache.take

    def counting(self, prompts):
        hits = take(self, prompts)
        reused.append(sum(h is not None for h in hits))
        return hits

    monkeypatch.setattr(PrefixCache, "take", counting)
    return reused


def assert_same_episode(a, b, atol=1e-4):
    assert a.completion_ids == b.completion_ids and a.env_mask == b.env_mask and a.turn_ids == b.turn_ids
    assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)), default=0.0) <= atol


def test_greedy_episodes_are_token_identical_and_the_cache_is_dropped(model, tokenizer):
    bias_generation(model, EosBias(tokenizer.eos_token_id, tokenizer.pad_token_id, 30.0, period=9))
    plain, _ = play(model, tokenizer, reuse=False, temperature=0.0)
    cached, backend = play(model, tokenizer, reuse=True, temperature=0.0)
    del model.generate
    assert min(ep.num_turns for ep in plain) == 8  # every episode is multi-turn ...
    assert len({len(ep.completion_ids) for ep in plain}) > 1  # ... and rows have different lengths
    for a, b in zip(plain, cached, strict=True):
        assert_same_episode(a, b)
    stats = backend.cache.stats
    assert stats["reused_tokens"] > 3 * stats["forwarded_tokens"]  # turns after the first forward only their tail
    assert backend.cache.entries == []  # released when the episodes are over


def test_seeded_sampling_gives_the_same_episodes(model, tokenizer, capsys):
    bias_generation(model, EosBias(tokenizer.eos_token_id, tokenizer.pad_token_id, 3.5))
    same = total = 0
    for seed in range(3):
        plain, _ = play(model, tokenizer, reuse=False, temperature=1.0, seed=seed)
        cached, _ = play(model, tokenizer, reuse=True, temperature=1.0, seed=seed)
        assert len({len(ep.completion_ids) for ep in plain}) > 4
        for a, b in zip(plain, cached, strict=True):
            total += 1
            if a.completion_ids == b.completion_ids:
                same += 1
                assert_same_episode(a, b)
    del model.generate
    with capsys.disabled():
        print(f"\nseeded sampling with and without the cache: {same}/{total} episodes identical")
    assert same / total >= 0.9


def test_grouped_query_attention_with_a_padding_mask_is_bit_identical(model, tokenizer):
    """The backend's attention (grouped heads passed to the kernel with a mask) gives exactly transformers' sdpa output:
    on a left-padded batch with a cache, for the prefill and for decoding steps; the model's setting is restored."""
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model groups its heads
    prompts = [tokenizer.encode("What is 1 plus 2?"), tokenizer.encode("Compute 3 times 4 plus 5 minus 6, please")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        return out.sequences, torch.stack(out.logits)

    plain = run()
    with gqa_attention(model):
        assert model.config._attn_implementation == GQA_ATTENTION
        grouped = run()
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(plain[0], grouped[0]) and torch.equal(plain[1], grouped[1])


def test_decoding_step_mask_equals_transformers_mask():
    """The decoding-step shortcut gives sdpa_mask's values (None without padding) for one query at the end, and every
    other case goes to sdpa_mask unchanged (prefill, a query elsewhere, an offset, a sliding window)."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    gen = torch.Generator().manual_seed(0)
    for batch, kv in [(1, 1), (3, 7), (8, 130)]:
        for padded in (False, True):
            mask = torch.ones(batch, kv, dtype=torch.bool)
            if padded:
                mask[:, : kv // 2] = torch.rand(batch, kv // 2, generator=gen) < 0.5
            cases = [dict(q_length=1, kv_length=kv, q_offset=kv - 1),  # decoding step: the shortcut
                     dict(q_length=min(kv, 4), kv_length=kv, q_offset=kv - min(kv, 4)),  # a forwarded tail
                     dict(q_length=1, kv_length=kv, q_offset=max(kv - 3, 0)),  # a query before the end
                     dict(q_length=1, kv_length=kv, q_offset=kv - 1, local_size=3),
                     dict(q_length=1, kv_length=kv, q_offset=kv - 1,
                          mask_function=sliding_window_causal_mask_function(3))]
            for case, dtype in itertools.product(cases, [None, torch.float32]):
                args = dict(batch_size=batch, attention_mask=mask, **case)
                ours, theirs = _decode_mask(**args, dtype=dtype), sdpa_mask(**args, dtype=dtype)
                assert (ours is None) == (theirs is None), (batch, kv, padded, case)
                if ours is not None:
                    if ours.dtype == torch.float32:  # the additive form of the same mask
                        assert theirs.dtype == torch.bool and case["q_length"] == 1
                        assert set(ours.unique().tolist()) <= {0.0, float("-inf")}
                        ours = ours == 0
                    assert ours.shape == theirs.shape and torch.equal(ours, theirs), (batch, kv, padded, case)
            assert (_decode_mask(batch_size=batch, q_length=1, kv_length=kv, q_offset=kv - 1, attention_mask=mask)
                    is None) == (not padded or bool(mask.all()))


def test_prefix_matching_uses_each_entry_once_and_drops_the_rest():
    def entry(tokens):
        return _Prefix(tokens, [(torch.zeros(1, len(tokens), 1), torch.zeros(1, len(tokens), 1))])

    cache = PrefixCache()
    cache.entries = [entry([1, 2, 3]), entry([1, 2, 3]), entry([1, 2]), entry([9])]
    hits = cache.take([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6], [1, 2], [7]])
    assert [h.tokens if h else None for h in hits] == [[1, 2, 3], [1, 2, 3], [1, 2], None, None]
    assert cache.entries == []  # unused entries (finished episodes) are gone
    assert PrefixCache.layout([[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], [entry([1, 2, 3]), entry([5, 6, 7, 8])]) == (6, 4)


def shipped_environments():
    from envs import calculator, python_sandbox, search_qa

    return [calculator, search_qa, python_sandbox]


@pytest.mark.parametrize("module", shipped_environments(), ids=lambda m: m.__name__)
def test_every_shipped_environment_and_the_evaluation_path(model, tokenizer, module):
    from rlfw.rollout.evaluation import evaluate_episodes

    dataset = module.build_dataset(8, seed=0)
    bias_generation(model, EosBias(tokenizer.eos_token_id, tokenizer.pad_token_id, 3.5))
    batch = [dict(dataset[i]) for i in range(8)]
    for seed in range(2):
        plain, _ = play(model, tokenizer, False, 1.0, seed, module.ENVIRONMENT, batch, max_turns=4, max_completion_length=160)
        cached, _ = play(model, tokenizer, True, 1.0, seed, module.ENVIRONMENT, batch, max_turns=4, max_completion_length=160)
        assert sum(ep.num_turns for ep in plain) > len(plain)
        for a, b in zip(plain, cached, strict=True):
            assert_same_episode(a, b)
    results = [evaluate_episodes(model, tokenizer, dataset, None, module.ENVIRONMENT, max_turns=4,
                                 max_completion_length=160, reuse_kv_cache=reuse) for reuse in (False, True)]
    del model.generate
    assert json.dumps(results[0]) == json.dumps(results[1]) and results[0]["turns_per_episode"] > 1  # NaN-safe


def test_rollout_cli_writes_the_same_transcripts_with_and_without_the_cache(tiny_assets, tmp_path):
    from rlfw.cli import main

    outs = []
    for flags in ([], ["--no-kv-cache"]):
        out = tmp_path / f"t{len(flags)}.jsonl"
        assert main(["rollout", "--model", tiny_assets, "--env", "envs.calculator", "--num-episodes", "6",
                     "--max-turns", "3", "--max-completion-length", "48", "--temperature", "1.0", "--out", str(out),
                     *flags]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert len(outs[0]) == 6
    for a, b in zip(*outs, strict=True):
        assert a["completion_ids"] == b["completion_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) <= 1e-4


@pytest.mark.parametrize(("lora", "checkpointing"), [(False, False), (True, True)], ids=["full", "lora+checkpointing"])
def test_training_steps_match_with_and_without_the_cache(tmp_path, tiny_assets, tokenizer, lora, checkpointing,
                                                         monkeypatch):
    """Two training steps sample the same multi-turn episodes and reach the same weights either way (the hashed reward
    varies within groups, so the steps do move the weights)."""
    from conftest import fast_config, hashed_reward
    from datasets import Dataset

    from envs.calculator import build_dataset
    from rlfw.trainer import RLTrainer

    reused = count_cache_hits(monkeypatch)
    weights, completions = [], []
    for reuse in (True, False):
        peft = None
        if lora:
            from peft import LoraConfig

            peft = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = fast_config(tmp_path / f"out{reuse}", environment="envs.calculator", max_turns=4,
                           max_completion_length=96, gradient_checkpointing=checkpointing, reuse_kv_cache=reuse)
        data = Dataset.from_list(list(build_dataset(16, seed=0)))
        trainer = RLTrainer(model=tiny_assets, args=args, reward_funcs=[hashed_reward], train_dataset=data,
                            processing_class=tokenizer, peft_config=peft)
        bias_generation(trainer.model, EosBias(tokenizer.eos_token_id, tokenizer.pad_token_id, 3.5))
        seen = []
        generate_and_score = trainer._generate_and_score_completions

        def record(inputs, _f=generate_and_score, _seen=seen):
            out = _f(inputs)
            _seen.append(out["completion_ids"].tolist())
            return out

        trainer._generate_and_score_completions = record
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        completions.append(seen)
        if reuse:
            assert sum(reused) > 0, "the cache was never used in training"
    assert completions[0] == completions[1]
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], atol=1e-5, rtol=0)


def test_multi_turn_resume_is_bit_exact_with_the_cache(tmp_path, tiny_assets, tokenizer, monkeypatch):
    """Train 4 steps straight, and 2 + interrupt + resume: same rewards, estimator state and weights, with
    multi-turn episodes whose later turns come from the kept cache."""
    from mp_worker import resume_runs
    from test_trainer import assert_exact_resume
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.generate
    bias = EosBias(tokenizer.eos_token_id, tokenizer.pad_token_id, 3.5)

    def biased(self, *args, **kwargs):
        return original(self, *args, logits_processor=LogitsProcessorList([bias]), **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", biased)
    reused = count_cache_hits(monkeypatch)
    resume = resume_runs(tiny_assets, tmp_path, advantage_estimator="epo", environment="envs.calculator",
                         max_turns=3, max_completion_length=64)
    assert sum(reused) > 0
    assert_exact_resume(resume, resume["straight"].pop("params"), resume["resumed"].pop("params"))


def test_preallocated_layer_matches_concatenation_when_outrun_cropped_and_reordered():
    """A decoding step writes into the buffer in place; when a call outruns the buffer, or something replaces the
    states (crop, batch selection), the layer still holds exactly what DynamicLayer's concatenation would; past its
    limit it still grows to fit."""
    from transformers.cache_utils import DynamicLayer

    from rlfw.rollout.kv_cache import PreallocatedLayer

    torch.manual_seed(0)
    fast, plain = PreallocatedLayer(capacity=4, limit=7), DynamicLayer()

    def step(n, batch=3):
        k, v = torch.randn(batch, 2, n, 8), torch.randn(batch, 2, n, 5)  # values may have another head size
        a, b = fast.update(k, v), plain.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    step(3)
    step(1)
    buffer = fast.keys.data_ptr()
    step(2)  # outruns the 4 columns: doubles, up to the limit
    assert fast.keys.data_ptr() != buffer and fast._buffers[0].shape[-2] == 7
    grown = fast.keys.data_ptr()
    step(1)  # written in place now
    assert fast.keys.data_ptr() == grown
    for layer in (fast, plain):
        layer.crop(-2)
    step(1)
    for layer in (fast, plain):
        layer.batch_select_indices(torch.tensor([2, 0]))
    step(2, batch=2)
    assert fast.get_seq_length() == plain.get_seq_length() == 8
