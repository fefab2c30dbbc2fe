"""Search QA environment: single- and multi-hop questions over a generated corpus, answered with a BM25 ``search``.

The corpus (``envs._corpus``) describes fictional countries, cities, people and companies, one document each.
Questions need 1-3 searches ("In which country was the founder of Zorblax Corp born?" = company -> founder ->
birth city -> country). The BM25 index (``bm25s``) is built once per corpus seed and shared by every environment
instance, because TRL and rlfw create an instance per rollout.

Reward: token F1 between the final ``<answer>`` and the gold answer (``search_qa_exact_match`` is the strict
variant). Turn reward: 1.0 when the turn's searches surfaced a gold-evidence document (one in the question's
``chain``) not retrieved before in the episode, 0.0 otherwise, None for a turn without searches.

Every row also carries ``ground_truth_calls`` (JSON list of ``{"name", "arguments"}``): the searches of the ideal
trace, one per hop whose document no earlier search returned. ``SearchQAMatchEnv`` rewards turns by matching the
episode's searches against them (MatchTIR, ``rlfw.rewards.matched_turn_rewards``), the answer turn by its F1.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import threading
from collections import Counter
from typing import Any

import bm25s
from datasets import Dataset

from envs import _corpus
from envs.episode import (
    ANSWER_FORMAT,
    EpisodeEnvironment,
    check_split,
    conversation,
    extract_answer,
    reward_function,
    split_of,
    tool_call_message,
    traces_dataset,
)
from rlfw.rewards import matched_turn_rewards

TOP_K = 3
NEW_EVIDENCE_REWARD = 1.0

SYSTEM_PROMPT = (
    "You answer questions about a collection of documents. You have one tool, search(query), which returns the "
    "most relevant documents for a query. Search for the entities in the question, follow the facts from one "
    "document to the next until you can answer, then give the final answer as <answer>ANSWER</answer>."
)


class SearchIndex:
    """A BM25 index over one corpus; ``search`` is safe to call from several threads."""

    def __init__(self, corpus: _corpus.Corpus) -> None:
        self.corpus = corpus
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(corpus.texts, stopwords="en", show_progress=False), show_progress=False)
        self._lock = threading.Lock()

    def search(self, query: str, k: int = TOP_K) -> list[int]:
        """Indices of the top-``k`` documents for ``query``, best first (empty when no query word is known)."""
        words = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in words if w in self._retriever.vocab_dict]
        if not words:
            return []
        with self._lock:
            ids, scores = self._retriever.retrieve([words], k=min(k, len(self.corpus.texts)), show_progress=False)
        return [int(i) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]


@functools.cache
def get_index(corpus_seed: int = 0) -> SearchIndex:
    """The shared index for a corpus seed, built on first use."""
    return SearchIndex(_corpus.generate(corpus_seed))


def normalize(text: str) -> list[str]:
    """Lowercased words without punctuation and articles (the usual QA normalisation)."""
    text = "".join(" " if c in string.punctuation else c for c in text.lower())
    return [w for w in text.split() if w not in ("a", "an", "the")]


def token_f1(predicted: str | None, gold: str) -> float:
    if predicted is None:
        return 0.0
    pred, ref = normalize(predicted), normalize(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(predicted: str | None, gold: str) -> float:
    return float(predicted is not None and normalize(predicted) == normalize(gold))


def _questions(n: int, seed: int, split: str, corpus_seed: int, max_hops: int) -> list[dict[str, Any]]:
    """``n`` questions of ``split`` in a seeded order; the split's pool repeats when n exceeds it."""
    check_split(split)
    pool = [q for q in get_index(corpus_seed).corpus.questions
            if split_of(q["question"]) == split and q["num_hops"] <= max_hops]
    random.Random(f"search-qa-{seed}-{split}").shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def ideal_searches(index: SearchIndex, question: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """The ideal trace's searches: (query, documents found) per hop whose document no earlier search returned."""
    searches, seen = [], set()
    for entity in question["chain"]:
        if index.corpus.titles.index(entity) in seen:
            continue  # an earlier search already returned this hop's document
        doc_ids = index.search(entity)
        seen.update(doc_ids)
        searches.append((entity, doc_ids))
    return searches


def build_dataset(n: int, seed: int = 0, split: str = "train", corpus_seed: int = 0, max_hops: int = 3) -> Dataset:
    """Columns: prompt, answer (str), num_hops (int), chain (entity names to look up), corpus_seed (int),
    ground_truth_calls (JSON list of the ideal trace's search calls)."""
    index = get_index(corpus_seed)
    return Dataset.from_list([
        {"prompt": conversation(SYSTEM_PROMPT, q["question"]), "answer": q["answer"], "num_hops": q["num_hops"],
         "chain": q["chain"], "corpus_seed": corpus_seed,
         "ground_truth_calls": json.dumps([{"name": "search", "arguments": {"query": query}}
                                           for query, _ in ideal_searches(index, q)])}
        for q in _questions(n, seed, split, corpus_seed, max_hops)
    ])


def format_results(index: SearchIndex, doc_ids: list[int]) -> str:
    if not doc_ids:
        return "No documents found."
    return "\n".join(f"[{rank}] {index.corpus.texts[i]}" for rank, i in enumerate(doc_ids, start=1))


def synthetic_traces(n: int, seed: int = 0, split: str = "train", corpus_seed: int = 0) -> Dataset:
    """Ideal conversations: a search per hop whose document no earlier search returned, then the answer (columns prompt, completion)."""
    index = get_index(corpus_seed)
    traces = []
    for q in _questions(n, seed, split, corpus_seed, max_hops=3):
        messages = conversation(SYSTEM_PROMPT, q["question"])
        for entity, doc_ids in ideal_searches(index, q):
            messages.append(tool_call_message("search", {"query": entity}))
            messages.append({"role": "tool", "name": "search", "content": format_results(index, doc_ids)})
        messages.append({"role": "assistant", "content": ANSWER_FORMAT.format(q["answer"])})
        traces.append(messages)
    return traces_dataset(traces, ENVIRONMENT)


class SearchQAEnv(EpisodeEnvironment):
    """Question answering over a local corpus with a BM25 search tool."""

    def _clear(self, row: dict[str, Any]) -> None:
        super()._clear(row)
        self.answer = str(row.get("answer", ""))
        self.index = get_index(int(row.get("corpus_seed", 0)))
        chain = row.get("chain") or []
        self.evidence = {self.index.corpus.titles.index(title) for title in chain}
        self.retrieved: set[int] = set()

    def search(self, query: str) -> str:
        """Search the document collection.

        Args:
            query: Keywords to look for, for example the name of a person, city or company.

        Returns:
            The best matching documents, most relevant first.
        """
        doc_ids = self.index.search(re.sub(r"\s+", " ", str(query)).strip())
        new_evidence = (set(doc_ids) & self.evidence) - self.retrieved
        self.retrieved.update(doc_ids)
        self._record({"tool": "search", "query": query, "doc_ids": doc_ids, "new_evidence": len(new_evidence)})
        return format_results(self.index, doc_ids)

    def _score(self, final_text: str) -> float:
        return token_f1(extract_answer(final_text), self.answer)

    def _score_turn(self, events: list[dict[str, Any]]) -> float:
        return NEW_EVIDENCE_REWARD if any(e["new_evidence"] for e in events) else 0.0


class SearchQAMatchEnv(SearchQAEnv):
    """SearchQAEnv whose turn rewards match the episode's searches against the row's ``ground_truth_calls``.

    A turn gets the mean match score of its searches (0 for a turn without any), the final answer turn its F1; the
    matching runs over the whole trajectory once the episode is over (``_final_turn_rewards``), so a repeated search
    earns nothing. ``assignment``: "greedy" (MatchTIR's reference code), "hungarian" or "ot" (subclass to change).
    """

    assignment = "greedy"

    def _clear(self, row: dict[str, Any]) -> None:
        super()._clear(row)
        calls = row.get("ground_truth_calls") or "[]"
        self.ground_truth_calls = json.loads(calls) if isinstance(calls, str) else list(calls)
        self.turn_calls: list[list[dict[str, Any]]] = []
        self.answered = False

    def _record_final_answer(self, text: str) -> bool:
        self.answered = super()._record_final_answer(text)
        return self.answered

    def _pop_turn_reward(self) -> float | None:
        events = self.tool_events[self._turn_start:]
        self._turn_start = len(self.tool_events)
        self.turn_calls.append([{"name": e["tool"], "arguments": {"query": e["query"]}} for e in events])
        return None  # known only once the episode is over

    def _final_turn_rewards(self, turn_rewards: list[float]) -> list[float]:
        return matched_turn_rewards(self.turn_calls, self.ground_truth_calls, self.assignment,
                                    answer_score=self.get_reward() if self.answered else None)


search_qa_f1 = reward_function("search_qa_f1", lambda text, row: token_f1(extract_answer(text), row["answer"]))
search_qa_exact_match = reward_function(
    "search_qa_exact_match", lambda text, row: exact_match(extract_answer(text), row["answer"]))

ENVIRONMENT = SearchQAEnv
REWARD_FUNCS = [search_qa_f1]
