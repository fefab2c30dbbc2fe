"""Token fidelity: how often decoding and re-encoding sampled completions changes their token ids.

A loop that keeps text and re-tokenizes it trains on ids the policy never sampled whenever decode + encode is not the
identity (a word piece split differently, a run of whitespace merged differently); the log-probs it computes are then
those of another sequence. rlfw's engine keeps the sampled ids (tests/test_real_model.py checks it), so this figure
is what it avoids; ``bench/retokenization.py`` reports it for the real model in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DriftReport:
    completions: int = 0
    changed: int = 0
    # (sampled tokens, re-encoded tokens) around the first difference, for the changed completions
    examples: list[tuple[list[str], list[str]]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.changed / self.completions if self.completions else 0.0


def retokenization_drift(tokenizer: Any, completions: Sequence[Sequence[int]], eos_ids: Sequence[int] = (),
                         context: int = 3) -> DriftReport:
    """Count the completions (sampled ids, a trailing EOS ignored) whose ids change under decode + re-encode."""
    eos = set(eos_ids) | {tokenizer.eos_token_id}
    report = DriftReport()
    for ids in completions:
        body = list(ids[:-1]) if ids and ids[-1] in eos else list(ids)
        again = tokenizer.encode(tokenizer.decode(body), add_special_tokens=False)
        report.completions += 1
        if again == body:
            continue
        report.changed += 1
        first = next((i for i, (a, b) in enumerate(zip(body, again, strict=False)) if a != b), min(len(body), len(again)))
        lo = max(first - context, 0)
        report.examples.append((tokenizer.convert_ids_to_tokens(body[lo:first + context]),
                                tokenizer.convert_ids_to_tokens(again[lo:first + context])))
    return report


def sample_completions(backend: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16
                       ) -> list[list[int]]:
    """Sampled ids per prompt from a generation backend (``rlfw.rollout.backends``), in batches."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out += [ids for ids, _ in backend.generate([list(p) for p in prompts[start:start + batch_size]],
                                                   max_new_tokens)]
    return out
