"""No-grad probes of the current policy, batched: IGPO's answer probes and InfoPO's counterfactual information gain.

IGPO: how likely the current policy is to state the ground-truth answer after each round.

For rollout i with T_i assistant turns and t = 0..T_i-1 (IGPO, arXiv 2510.14967; reference code
``scrl/llm_agent/generation.py``):

    h_{i,t}                  = prompt_i + completion_i[: round_prefix_lens[i][t]]   (t completed rounds; t = 0: the
                               prompt alone, the prior). Each prefix ends with the template's generation prompt.
    probe                    = the environment's ``_format_final_answer(answer)`` text (e.g. "<answer>Paris</answer>"),
                               tokenized on its own; its answer tokens are those overlapping the answer's characters
    answer_logprobs[i, t]    = mean over the answer tokens a_j of log pi(a_j | h_{i,t}, probe tokens before a_j)

Only the answer tokens are averaged (the template around them is teacher-forced but not scored); the mean, not the
sum, makes answers of different lengths comparable (p = exp(mean) is the geometric-mean token probability).

Cost: sum over rollouts of sum_t (|h_{i,t}| + |probe|) tokens of no-grad forward. All (rollout, round) sequences of
the step are deduplicated (the t = 0 prior is shared by a prompt's G rollouts on a process), sorted by length and run
in chunks of ``batch_size`` left-padded rows; each chunk keeps logits only for its longest answer. With more than
one process every process runs the same number of chunks, because sharded models (ZeRO-3, FSDP) gather
parameters collectively in every forward.

InfoPO (arXiv 2603.00656): for a turn t followed by an environment message and a next turn t+1,

    info_gain[i, t] = mean over the tokens a of turn t+1's sampled action of
                      log pi(a | real history) - log pi(a | history with turn t's environment span replaced)

The environment span is every environment token between turn t's last policy token and turn t+1's first (tool
messages with their template tokens and the next generation prompt); it is overwritten in place by the tokens of
``PLACEHOLDER``, cut or repeated from its last token to the span's length, so every later position is unchanged.
Both log-probs are computed with the current weights (the rollout's sampling log-probs come from processed logits
and possibly older weights); both sequences of a turn run through the same batched, lockstep scoring as IGPO's.
NaN: the last turn, turns without a tool message, next turns without policy tokens.
Cost: per such turn, two no-grad sequences of |prompt| + end of turn t+1 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlfw.environment import format_final_answer

ANSWER_COLUMN = "answer"  # the dataset column holding the ground-truth answer text
PLACEHOLDER = "No information found."  # InfoPO's neutral environment message

# (input_ids (B, L) left-padded, attention_mask (B, L), logits_to_keep) -> log-probs of the last logits_to_keep
# tokens of each row, (B, logits_to_keep): TRL's _get_per_token_logps_and_entropies without the extras.
LogProbFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Probe:
    """A probe continuation cut after the answer: its answer tokens are its last ``num_answer_tokens`` ids."""

    ids: tuple[int, ...]
    num_answer_tokens: int


def answer_text(value: Any) -> str:
    """The ground truth as text; of several aliases (a list) the first, as the IGPO reference code does."""
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def probe_text(env: Any, answer: str) -> str:
    """The environment's probe for ``answer`` (``_format_final_answer``); the bare answer for environments without one."""
    return format_final_answer(env, answer)


def tokenize_probe(tokenizer: Any, text: str, answer: str) -> Probe:
    """Token ids of ``text`` up to the last token of ``answer`` (the last occurrence in ``text``).

    Answer tokens are the tokens whose characters overlap the answer's, from one tokenization of the whole text
    (as the IGPO reference code does with ``offset_mapping``). Tokenizers without offsets fall back to
    tokenizing the text before the answer and the answer separately.
    """
    start = text.rfind(answer)
    if not answer or start < 0:
        if answer:
            raise ValueError(f"The answer probe {text!r} does not contain the answer {answer!r}: an environment's "
                             "_format_final_answer(answer) must return text that includes the answer verbatim.")
        return Probe((), 0)
    end = start + len(answer)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets
        before = tokenizer.encode(text[:start], add_special_tokens=False)
        ids = before + tokenizer.encode(answer, add_special_tokens=False)
        return Probe(tuple(ids), len(ids) - len(before))
    overlaps = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    if not overlaps:
        return Probe((), 0)
    ids = encoded["input_ids"][: overlaps[-1] + 1]
    return Probe(tuple(ids), overlaps[-1] + 1 - overlaps[0])


def rollout_probes(tokenizer: Any, rows: Sequence[dict[str, Any]], environments: Sequence[Any] | None
                   ) -> list[Probe]:
    """One probe per rollout from its row's ``answer`` and its environment's ``_format_final_answer``."""
    cache: dict[tuple[str, str], Probe] = {}
    probes = []
    for k, row in enumerate(rows):
        if ANSWER_COLUMN not in row:
            raise ValueError(f"IGPO's answer probe needs the ground truth in a dataset column {ANSWER_COLUMN!r}; this "
                             f"row has only {sorted(row)}.")
        answer = answer_text(row[ANSWER_COLUMN])
        text = probe_text(environments[k] if environments else None, answer)
        if (text, answer) not in cache:
            cache[text, answer] = tokenize_probe(tokenizer, text, answer)
        probes.append(cache[text, answer])
    return probes


def round_contexts(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                   round_prefix_lens: Sequence[int]) -> list[tuple[int, ...]]:
    """h_{i,t} for t = 0..T_i-1: the prompt plus the completion up to where round t began."""
    prompt = tuple(prompt_ids)
    return [prompt + tuple(completion_ids[:length]) for length in round_prefix_lens]


def mean_answer_logprobs(sequences: Sequence[tuple[tuple[int, ...], Probe]], logprobs_fn: LogProbFn, *,
                         batch_size: int, pad_token_id: int, num_chunks_fn: Callable[[int], int] | None = None,
                         ) -> list[float]:
    """Mean log-prob of each probe's answer tokens after its context; NaN for a probe without answer tokens.

    ``num_chunks_fn(local_chunks) -> chunks to run``: the maximum over processes (every process must run as many
    forwards); extra chunks run a one-row dummy and are discarded.
    """
    results = [math.nan] * len(sequences)
    scored = [i for i, (_, probe) in enumerate(sequences) if probe.num_answer_tokens > 0]
    # Longest first, so that each chunk pads to similar lengths and the first chunk shows the peak memory.
    scored.sort(key=lambda i: len(sequences[i][0]) + len(sequences[i][1].ids), reverse=True)
    chunks = [scored[s: s + batch_size] for s in range(0, len(scored), batch_size)]
    total = num_chunks_fn(len(chunks)) if num_chunks_fn is not None else len(chunks)
    for chunk in chunks:
        rows = [list(sequences[i][0]) + list(sequences[i][1].ids) for i in chunk]
        keep = max(sequences[i][1].num_answer_tokens for i in chunk)
        logps = logprobs_fn(*_left_pad(rows, pad_token_id), keep)  # (B, keep)
        for row, i in enumerate(chunk):
            n = sequences[i][1].num_answer_tokens
            results[i] = logps[row, keep - n:].float().mean().item()
    for _ in range(total - len(chunks)):
        logprobs_fn(*_left_pad([[pad_token_id, pad_token_id]], pad_token_id), 1)
    return results


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    for k, r in enumerate(rows):
        ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[k, width - len(r):] = 1
    return ids, mask


def _score_unique(per_rollout: Sequence[Sequence[tuple[tuple[int, ...], Probe]]], logprobs_fn: LogProbFn, *,
                  batch_size: int, pad_token_id: int, num_chunks_fn: Callable[[int], int] | None) -> list[list[float]]:
    """``mean_answer_logprobs`` of every rollout's (context, probe) pairs, each distinct pair computed once."""
    unique: dict[tuple[tuple[int, ...], Probe], int] = {}
    where = [[unique.setdefault(pair, len(unique)) for pair in pairs] for pairs in per_rollout]
    values = mean_answer_logprobs(list(unique), logprobs_fn, batch_size=batch_size, pad_token_id=pad_token_id,
                                  num_chunks_fn=num_chunks_fn)
    return [[values[k] for k in row] for row in where]


def answer_logprobs(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                    round_prefix_lens: Sequence[Sequence[int]], probes: Sequence[Probe], logprobs_fn: LogProbFn, *,
                    batch_size: int, pad_token_id: int, num_chunks_fn: Callable[[int], int] | None = None,
                    probed: Sequence[bool] | None = None) -> list[list[float]]:
    """Per rollout, ``answer_logprobs`` for t = 0..T_i-1 (T_i = len(round_prefix_lens[i])).

    Identical (context, probe) pairs are computed once: a prompt's t = 0 prior is shared by its rollouts. Rollouts
    with ``probed`` False run no forward and get NaN for every round.
    """
    wanted = [True] * len(prompt_ids) if probed is None else list(probed)
    pairs = [[(context, probe) for context in round_contexts(prompt, completion, lens)] if want else []
             for prompt, completion, lens, probe, want in zip(prompt_ids, completion_ids, round_prefix_lens, probes,
                                                              wanted, strict=True)]
    scored = _score_unique(pairs, logprobs_fn, batch_size=batch_size, pad_token_id=pad_token_id,
                           num_chunks_fn=num_chunks_fn)
    return [values if want else [math.nan] * len(lens)
            for values, want, lens in zip(scored, wanted, round_prefix_lens, strict=True)]


def placeholder_ids(tokenizer: Any) -> tuple[int, ...]:
    """InfoPO's placeholder message, tokenized once."""
    return tuple(tokenizer.encode(PLACEHOLDER, add_special_tokens=False))


def fill_span(placeholder: Sequence[int], length: int) -> list[int]:
    """``placeholder`` cut to, or extended by repeating its last token to, exactly ``length`` tokens."""
    ids = list(placeholder[:length])
    return ids + [ids[-1]] * (length - len(ids)) if ids else []


def counterfactual_pairs(prompt: Sequence[int], completion: Sequence[int], row: dict[str, Any],
                         placeholder: Sequence[int]) -> dict[int, tuple[tuple, tuple]]:
    """For each turn t with an information gain: ((real context, next action), (counterfactual context, next
    action)) as (context ids, Probe) pairs, by turn index."""
    turn_ids, starts = list(row["turn_ids"]), list(row["round_prefix_lens"])
    calls = list(row.get("turn_tool_calls") or [])
    completion = list(completion[: len(turn_ids)])
    prompt = tuple(prompt)
    ends = [0] * len(starts)  # end (exclusive) of each turn's policy tokens
    for pos, t in enumerate(turn_ids):
        if 0 <= t < len(ends):
            ends[t] = pos + 1
    pairs = {}
    for t in range(len(starts) - 1):
        start, end = starts[t + 1], ends[t + 1]
        if t >= len(calls) or calls[t] == 0 or end <= start:
            continue  # InfoPO: no environment message, or no next action to score
        action = Probe(tuple(completion[start:end]), end - start)
        env_start = ends[t]
        real = prompt + tuple(completion[:start])
        counterfactual = prompt + tuple(completion[:env_start]) + tuple(fill_span(placeholder, start - env_start))
        pairs[t] = ((real, action), (counterfactual, action))
    return pairs


def info_gains(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               rows: Sequence[dict[str, Any]], placeholder: Sequence[int], logprobs_fn: LogProbFn, *, batch_size: int,
               pad_token_id: int, num_chunks_fn: Callable[[int], int] | None = None) -> list[list[float]]:
    """Per rollout, ``info_gain`` for t = 0..T_i-1 (NaN where undefined). ``rows`` carry the rollout's ``turn_ids``,
    ``round_prefix_lens`` and ``turn_tool_calls``."""
    turns, pairs = [], []
    for prompt, completion, row in zip(prompt_ids, completion_ids, rows, strict=True):
        found = counterfactual_pairs(prompt, completion, row, placeholder)
        turns.append(list(found))
        pairs.append([pair for t in found for pair in found[t]])
    scored = _score_unique(pairs, logprobs_fn, batch_size=batch_size, pad_token_id=pad_token_id,
                           num_chunks_fn=num_chunks_fn)
    out = []
    for row, row_turns, values in zip(rows, turns, scored, strict=True):
        gains = [math.nan] * len(row["round_prefix_lens"])
        for k, t in enumerate(row_turns):
            gains[t] = values[2 * k] - values[2 * k + 1]  # real minus counterfactual
        out.append(gains)
    return out
