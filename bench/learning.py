"""Do the estimators do, on our environments and a small local model, what their papers claim? Seeds, mean ± std.

    OMP_NUM_THREADS=1 python bench/learning.py
        --comparison {median,median_partial,epo,riskpo,gated,stratified,stratified_calculator,igpo,all}
        [--seeds 3] [--steps N] [--workers 2] [--quick] [--no-write]

Per environment, one supervised warm start (seed-independent, cached under outputs/bench/warm/ and keyed by its
settings and the environment's trace format) teaches a locally built model (``rlfw.assets`` preset ``small``, about
1 M parameters) the tool and answer formats from an *imperfect* demonstrator (``WARM_STARTS``: e.g. half the
calculator traces answer without the tool), so RL has something to improve. Then every method x seed trains with
RLTrainer from that checkpoint (same data, same prompts per step; seed s = ``RLConfig.seed``, which drives sampling
and data order). Every ``eval_every`` steps it is evaluated on held-out (test-split) prompts through the rollout
engine: greedy accuracy, and "sampled accuracy" (pass@1 from k episodes per prompt at the training temperature 1;
smoother than greedy, so it is the primary metric: steps-to-threshold and the verdicts use it) and, where the claim
is about it, pass@k. A wrapper around the estimator records, every training step, what the method itself acts on
(tie rate, zero-advantage rate, tool calls, immediate vs outcome reward, the estimator's own metrics).

Prints and appends to docs/benchmarks.md, per comparison: a table (mean ± std over seeds of the held-out metrics at
the first and last evaluation, steps to a threshold, the method's own metrics), docs/img/learning_<name>.png, and a
"what happened" list computed from the numbers. Raw curves: outputs/bench/learning/<name>.json.
``--quick`` is a smoke test (tiny warm start, a few steps, 2 seeds, nothing appended to the docs).
Jobs run in ``--workers`` spawned processes (default: one per CPU core, one torch thread each), the slowest warm
start first, each run as soon as its environment's warm start is ready.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import _common
from _learning_report import PRIMARY, plot, report
from _learning_run import EXTRA_REWARDS, Recorder, episodes_eval

OUT = _common.ROOT / "outputs" / "bench"


# ------------------------------------------------------------------------------------------------ what is compared
@dataclass(frozen=True)
class WarmStart:
    """An environment's task settings and its imperfect SFT demonstrator."""

    env: str  # module under envs/
    dataset_kwargs: dict = field(default_factory=dict)  # build_dataset options (train and test)
    trace_kwargs: dict = field(default_factory=dict)  # synthetic_traces options
    degrade: str | None = None  # "direct": answer without tools; "early": answer after the first tool result;
    # "ignore": answer the question's first number after the tool result (a policy that does not use the evidence)
    degrade_fraction: float = 0.0
    examples: int = 4000
    epochs: float = 4.0
    learning_rate: float = 3e-3
    max_length: int = 256  # SFT sequence limit: must hold a whole trace (prompt + completion)
    max_turns: int = 3
    max_completion_length: int = 64
    preset: str = "small"


WARM_STARTS = {
    "calculator": WarmStart(
        "calculator", dataset_kwargs={"style": "expression", "max_ops": 1},
        trace_kwargs={"style": "expression", "max_ops": 1, "direct_fraction": 0.5}, examples=1200, epochs=6.0,
        learning_rate=2e-3, max_turns=3, max_completion_length=48),
    "search_qa": WarmStart(
        "search_qa", degrade="early", degrade_fraction=0.3, examples=2800, epochs=4.0, max_length=1024,
        max_turns=3, max_completion_length=400),
    "python_sandbox": WarmStart(
        "python_sandbox", degrade="direct", degrade_fraction=0.4, examples=1440, epochs=8.0, max_length=512,
        max_turns=4, max_completion_length=400),
    # Mechanism settings (one precondition each, made to hold): see the comparisons that use them.
    # A flaky calculator (40 % of calls busy, retried): the number of calls is luck. The demonstrator's mistake to
    # unlearn is a wrong argument name (40 %, then a guessed answer), which costs no extra call.
    "calculator_flaky": WarmStart(
        "calculator", dataset_kwargs={"style": "expression", "max_ops": 1, "tool_failure_rate": 0.4},
        trace_kwargs={"style": "expression", "max_ops": 1, "bad_call_fraction": 0.4, "guess_answers": True,
                      "tool_failure_rate": 0.4}, examples=1200, epochs=6.0, learning_rate=2e-3, max_turns=4,
        max_completion_length=192),  # room for two busy calls and their retries (a busy call + its result ~ 65 tokens)
    # 30 % of the demonstrator's episodes call the tool four times and never answer; 30 % answer a guess at once.
    "calculator_loop": WarmStart(
        "calculator", dataset_kwargs={"style": "expression", "max_ops": 1},
        trace_kwargs={"style": "expression", "max_ops": 1, "direct_fraction": 0.3, "guess_answers": True,
                      "loop_fraction": 0.3}, examples=1200, epochs=6.0, learning_rate=2e-3, max_turns=6,
        max_completion_length=256),  # room for five calls and their results (about 41 tokens each)
    # Easy and hard prompts mixed: the plain calculator's warm start (1-operation traces), trained and evaluated on
    # expressions of 1 to 3 operations.
    "calculator_mixed": WarmStart(
        "calculator", dataset_kwargs={"style": "expression", "min_ops": 1, "max_ops": 3},
        trace_kwargs={"style": "expression", "max_ops": 1, "direct_fraction": 0.5}, examples=1200, epochs=6.0,
        learning_rate=2e-3, max_turns=3, max_completion_length=64),
    # Sparse outcomes: 60 % of the demonstrator's answers are guesses without the tool, and half of the rest ignore
    # the tool's result (which holds the answer) and guess too.
    "calculator_sparse": WarmStart(
        "calculator", dataset_kwargs={"style": "expression", "max_ops": 1},
        trace_kwargs={"style": "expression", "max_ops": 1, "direct_fraction": 0.6, "guess_answers": True},
        degrade="ignore", degrade_fraction=0.5, examples=1200, epochs=6.0, learning_rate=2e-3, max_turns=3,
        max_completion_length=48),
}


@dataclass(frozen=True)
class Method:
    label: str
    estimator: str
    kwargs: dict = field(default_factory=dict)
    num_generations: int = 8
    reward_weights: tuple[float, ...] | None = None  # over (extra rewards..., environment); None: the comparison's


@dataclass(frozen=True)
class Precondition:
    """What a method needs to matter, measured on the training batches (a recorded key, mean of all steps)."""

    key: str
    label: str
    how: str  # how it is measured, for the docs
    aggregate: str = "mean"  # over all steps; "last": mean of the last 10; "last/first": last 10 / first 10


@dataclass(frozen=True)
class Comparison:
    name: str
    env: str  # a WARM_STARTS setting (environment, task options, warm start)
    claim: str  # the paper's claim, as the research notes state it
    methods: tuple[Method, ...]
    own_metrics: tuple[tuple[str, str], ...]  # (recorded key, label) plotted against training steps
    steps: int = 100
    prompts_per_step: int = 4
    eval_every: int = 10
    eval_size: int = 100
    learning_rate: float = 5e-5
    samples: int = 4  # sampled episodes per held-out prompt (T=1) for sampled accuracy (pass@1)
    pass_k: bool = False  # also report pass@samples
    min_hops: int = 0  # search_qa: keep only questions with at least this many hops
    extra_rewards: tuple[str, ...] = ()  # _learning_run.EXTRA_REWARDS added to the environment's reward in training
    reward_weights: tuple[float, ...] | None = None  # over (extra rewards..., environment); None: all 1
    env_class: str | None = None  # "module:Class" replacing the setting's environment (same tools and tasks)
    precondition: Precondition | None = None  # measured in this comparison and in ``control``
    control: str | None = None  # the comparison where the precondition is absent (the negative control)
    effect: Precondition | None = None  # what the method should change (a training key, or "eval:<metric>" final)
    headline: tuple[str, ...] = ()  # held-out metrics reported besides the defaults


def config_kwargs(path: str) -> dict:
    """advantage_kwargs of a run config in configs/ (the bench runs each method as the project configures it)."""
    import yaml

    return dict(yaml.safe_load((_common.ROOT / path).read_text()).get("advantage_kwargs") or {})


def comparisons() -> dict[str, Comparison]:
    grpo = Method("grpo", "grpo")
    main = {c.name: c for c in (
        Comparison(
            "median", "calculator",
            "MC-GRPO: with few rollouts per prompt a median baseline (n = G+1, pivot dropped) avoids the mean "
            "baseline's sign errors, so n=3 learns like a larger group (arXiv 2601.22582)",
            (Method("median n=3", "median", config_kwargs("configs/calculator/median.yaml"), 3),
             Method("grpo G=2", "grpo", {}, 2), Method("grpo G=3", "grpo", {}, 3), Method("grpo G=8", "grpo", {}, 8)),
            (("reward", "train reward"), ("zero_adv_frac", "zero-advantage rows"), ("tie_rate", "tied groups")),
            steps=150, eval_every=15),
        Comparison(
            "epo", "calculator",
            "EPO: entropy regularisation with a smoothed history keeps entropy from collapsing or exploding over "
            "long horizons and improves success (arXiv 2509.22576)",
            (Method("epo", "epo", config_kwargs("configs/calculator/epo.yaml")),
             # the paper's lam (1e-3) is sized for 7B models; 20x shows what the entropy term does when it is felt
             Method("epo lam=0.02", "epo", {**config_kwargs("configs/calculator/epo.yaml"), "lam": 0.02}), grpo),
            (("entropy", "policy entropy (nats/token)"), ("reward", "train reward"),
             ("est/history_mean", "entropy history H̄ (epo)")),
            steps=300, eval_every=30),
        Comparison(
            "riskpo", "calculator",
            "RiskPO: optimising a mixed VaR of bundled scores instead of the mean keeps exploring, raising "
            "pass@k (and pass@1) over GRPO (arXiv 2510.00911)",
            (Method("riskpo", "riskpo", config_kwargs("configs/calculator/riskpo.yaml")), grpo),
            (("est/mvar", "bundle MVaR (riskpo)"), ("entropy", "policy entropy (nats/token)"),
             ("reward", "train reward")),
            steps=150, eval_every=15, prompts_per_step=5, samples=8, pass_k=True, eval_size=60),
        Comparison(
            "gated", "python_sandbox",
            "G-RA: adding immediate rewards directly (D-RA) lets them grow while the outcome falls; gating them on "
            "the outcome keeps the outcome improving (arXiv 2508.10548)",
            (Method("gated (G-RA)", "gated", config_kwargs("configs/python_sandbox/gated.yaml")),
             Method("direct (D-RA)", "gated", {**config_kwargs("configs/python_sandbox/gated.yaml"),
                                               "threshold": float("-inf")}),
             Method("grpo (outcome only)", "grpo")),
            (("turn_reward_sum", "immediate reward per episode"), ("reward", "outcome (tests passed)"),
             ("tool_calls", "run_python calls per episode")),
            steps=60, eval_every=15, eval_size=9, headline=("greedy immediate reward",)),
        Comparison(
            "stratified", "search_qa",
            "Stratified GRPO: normalising within strata of equal search count removes cross-stratum bias and "
            "improves search agents (arXiv 2510.06214)",
            (Method("stratified", "stratified", config_kwargs("configs/search_qa/stratified.yaml")), grpo),
            (("tool_calls", "searches per episode"), ("est/singleton_strata_frac", "singleton strata"),
             ("reward", "train reward (F1)")),
            steps=100, eval_every=20, eval_size=30, samples=2, prompts_per_step=2),
        Comparison(
            "igpo", "search_qa",
            "IGPO: turn-level information gain gives signal when a group's outcomes tie, improving multi-hop "
            "search (arXiv 2510.14967)",
            (Method("igpo", "igpo", config_kwargs("configs/search_qa/igpo.yaml")),
             replace(grpo, label="grpo (outcome only)")),
            (("tie_rate", "tied groups"), ("tool_calls", "searches per episode"), ("reward", "train reward (F1)")),
            steps=100, eval_every=20, eval_size=30, samples=2, prompts_per_step=2, min_hops=2),
    )}
    # Second settings, added where the first left the mechanism untested: the same methods and sizes otherwise.
    median, stratified = main["median"], main["stratified"]
    variants = (
        replace(median, name="median_partial", extra_rewards=("closeness",),
                claim="MC-GRPO, second setting: the same runs with a continuous training reward (0/1 correctness + "
                "partial credit exp(-|x - gold| / (1 + |gold|))), where a mean baseline can get signs wrong "
                "(arXiv 2601.22582)",
                own_metrics=(("reward", "train reward (0-2)"), *median.own_metrics[1:])),
        replace(stratified, name="stratified_calculator", env="calculator", steps=150, eval_every=15,
                eval_size=Comparison.eval_size, samples=Comparison.samples, prompts_per_step=Comparison.prompts_per_step,
                claim="Stratified GRPO, second setting: the calculator warm start answers half the prompts without the "
                "tool, so groups mix 0-call and 1-call episodes whose success rates differ; stratification compares "
                "each only within its stratum (arXiv 2510.06214)",
                own_metrics=(("tool_calls", "tool calls per episode"), *stratified.own_metrics[1:2],
                             ("reward", "train reward"))),
    )
    mechanisms = mechanism_comparisons(grpo)
    order = ["median", "median_partial", "epo", "riskpo", "gated", "stratified", "stratified_calculator", "igpo",
             *mechanisms]
    every = {**main, **{c.name: c for c in variants}, **mechanisms}
    return {name: every[name] for name in order}


WRONG_SIGN = Precondition(
    "wrong_sign", "wrong-sign updates",
    "fraction of gradient rows whose advantage has the opposite sign of (noise-free reward - group mean of it)")


def mechanism_comparisons(grpo: Method) -> dict[str, Comparison]:
    """One comparison per method in a setting made so that the paper's precondition holds (measured: the
    ``precondition`` key), each naming the comparison where it does not hold (``control``)."""
    median_kwargs = config_kwargs("configs/calculator/median.yaml")
    verifier = {"rho_fp": 0.2, "rho_fn": 0.2}
    gated_kwargs = config_kwargs("configs/python_sandbox/gated.yaml")
    mechanisms = {c.name: c for c in (
        Comparison(
            "median_noisy", "calculator",
            "MC-GRPO, mechanism setting: a judge with sparse outliers (0/1 correctness, plus, for 15 % of completions, "
            "an error of random sign and size 2 to 4) and small groups: one outlier drags a group's mean past the "
            "other rows, so a mean baseline gets their signs wrong; the median of three ignores it (arXiv 2601.22582)",
            (Method("median n=3", "median", median_kwargs, 3), Method("grpo G=3", "grpo", {}, 3),
             Method("grpo G=2", "grpo", {}, 2)),
            (("wrong_sign", "wrong-sign updates"), ("clean_reward", "train reward (noise-free)"),
             ("zero_adv_frac", "zero-advantage rows")),
            steps=100, eval_every=20, extra_rewards=("judge_noise",), precondition=WRONG_SIGN, control="median"),
        Comparison(
            "noisy_verifier", "calculator",
            "Noisy-verifier corrections, mechanism setting: the training reward is the calculator's 0/1 verdict "
            "flipped at random (false positives 20 %, false negatives 20 %, rates known to the estimator); "
            "correcting for them should recover the clean-reward learning that plain GRPO on the noisy verdicts "
            "loses (arXiv 2510.00915)",
            (Method("grpo (noisy)", "grpo"),
             Method("backward", "noisy_verifier", {**verifier, "mode": "backward"}),
             Method("forward", "noisy_verifier", {**verifier, "mode": "forward"}),
             Method("grpo (clean)", "grpo", reward_weights=(0.0, 1.0))),
            (("label_error", "verdicts that disagree with the truth"), ("clean_reward", "train reward (true)"),
             ("tie_rate", "tied groups")),
            steps=100, eval_every=20, extra_rewards=("flipped_verdict",), reward_weights=(1.0, 0.0),
            precondition=Precondition("label_error", "wrong verdicts",
                                      "fraction of training verdicts that differ from the calculator's true 0/1"),
            control=None, effect=Precondition("eval:sampled accuracy", "held-out accuracy", "as in the last column")),
        Comparison(
            "stratified_flaky", "calculator_flaky",
            "Stratified GRPO, mechanism setting: a flaky calculator (each call busy with probability 0.4, each busy "
            "call costs 0.5 reward), so the number of calls, and the reward, differ between strata by luck; "
            "normalising within strata keeps unlucky right answers from being punished (arXiv 2510.06214)",
            (Method("stratified", "stratified", config_kwargs("configs/search_qa/stratified.yaml")), grpo),
            (("stratum_gap", "reward gap, fewest-call stratum - others"), ("unlucky_negative", "right answers with "
             "negative advantage"), ("clean_reward", "train reward (correctness)")),
            steps=100, eval_every=20, extra_rewards=("retry_cost",),
            precondition=Precondition(
                "unlucky_negative", "right answers pushed down",
                "fraction of right-answer episodes (outcome 1) given a negative advantage"),
            control="stratified_calculator"),
        Comparison(
            "gated_loop", "calculator_loop",
            "G-RA, mechanism setting: each clean calculate turn pays 0.5 and an episode can call the tool for its six "
            "turns without ever answering (30 % of the demonstrator's episodes loop), earning 2.5, more than a right "
            "answer's 1.5; D-RA should drift to calling without answering, G-RA should not (arXiv 2508.10548)",
            (Method("gated (G-RA)", "gated", gated_kwargs),
             Method("direct (D-RA)", "gated", {**gated_kwargs, "threshold": float("-inf")}),
             Method("grpo (outcome only)", "grpo")),
            (("failing_shaped_gap", "immediate reward: failing - passing episodes"),
             ("answered", "episodes that answer"), ("clean_reward", "outcome (right answers)")),
            steps=100, eval_every=20, env_class="_mechanism_envs:ShapedCalculatorEnv",
            headline=("greedy answered", "greedy immediate reward"),
            precondition=Precondition(
                "failing_shaped_gap", "shaping edge of failing episodes",
                "mean immediate (turn) reward per episode of failing episodes (outcome below the gate) minus that of "
                "passing ones: > 0 when failing pays more shaping than passing"),
            control="gated_calculator",
            effect=Precondition("answered", "submissions", "fraction of training episodes that answer, last 10 steps",
                                aggregate="last")),
        Comparison(
            "igpo_sparse", "calculator_sparse",
            "IGPO, mechanism setting: sparse outcomes (most groups all wrong) where the tool's result holds the "
            "answer, so the information gain of a call is signal where the outcomes tie (arXiv 2510.14967)",
            (Method("igpo", "igpo", config_kwargs("configs/search_qa/igpo.yaml"), 4), replace(grpo, num_generations=4,
                                                                                              label="grpo")),
            (("tie_rate", "tied groups"), ("tool_calls", "tool calls per episode"),
             ("clean_reward", "train reward")),
            steps=100, eval_every=20, prompts_per_step=8,
            precondition=Precondition("tie_rate", "tied groups", "fraction of groups whose outcomes are all equal"),
            control="igpo_calculator",
            effect=Precondition("zero_adv_frac", "rows without signal", "fraction of gradient rows with advantage 0")),
        Comparison(
            "riskpo_mixed", "calculator_mixed",
            "RiskPO, mechanism setting: easy (1-operation) and hard (2-3 operations) expressions mixed, so many "
            "groups are all wrong; a mean objective sharpens onto what is already solved and can lose pass@k at "
            "large k against the warm start, a Mixed-VaR objective weights the low tail (arXiv 2510.00911)",
            (Method("riskpo", "riskpo", config_kwargs("configs/calculator/riskpo.yaml")), grpo),
            (("all_wrong_groups", "all-wrong groups"), ("entropy", "policy entropy (nats/token)"),
             ("clean_reward", "train reward")),
            steps=100, eval_every=50, prompts_per_step=5, samples=16, pass_k=True, eval_size=60,
            precondition=Precondition("all_wrong_groups", "all-wrong groups",
                                      "fraction of groups whose outcomes are all 0 (prompts the policy cannot solve)"),
            control="riskpo",
            effect=Precondition("eval:pass@16", "pass@16", "held-out pass@16 at the end (pass@8 in the control)")),
    )}
    mechanisms["infopo_sparse"] = replace(
        mechanisms["igpo_sparse"], name="infopo_sparse",
        claim="InfoPO, mechanism setting: the sparse calculator of igpo_sparse; the counterfactual information gain of "
        "a tool result (how much the next turn depends on it) is signal where the outcomes tie (arXiv 2603.00656)",
        methods=(Method("infopo", "infopo", config_kwargs("configs/search_qa/infopo.yaml"), 4),
                 replace(grpo, num_generations=4, label="grpo")))
    mechanisms["epo_collapse"] = Comparison(
        "epo_collapse", "calculator",
        "EPO, mechanism setting: the calculator at 10x the learning rate (5e-4), where plain GRPO's entropy collapses "
        "within 100 steps; EPO's entropy term, measured against its smoothed history, should hold entropy in a "
        "corridor and keep improving (arXiv 2509.22576)",
        (Method("epo", "epo", config_kwargs("configs/calculator/epo.yaml")),
         Method("epo lam=0.02", "epo", {**config_kwargs("configs/calculator/epo.yaml"), "lam": 0.02}), grpo),
        (("entropy", "policy entropy (nats/token)"), ("clean_reward", "train reward"),
         ("est/history_mean", "entropy history H̄ (epo)")),
        steps=100, eval_every=20, learning_rate=5e-4,
        precondition=Precondition("entropy", "entropy kept", "policy entropy of the last 10 training steps over that "
                                  "of the first 10 (below 1: collapsing)", aggregate="last/first"),
        control="epo")
    # Negative controls where no earlier comparison serves: the plain calculator setting (the demonstrator answers
    # half the prompts without the tool, right, and never loops; the shaping is the environment's 0.1 per clean call).
    controls = (
        replace(mechanisms["gated_loop"], name="gated_calculator", env="calculator", env_class=None,
                claim="G-RA, negative control: the plain calculator (0.1 per clean call, no demonstrator that loops), "
                "where failing episodes cannot out-earn passing ones on shaping", control=None),
        replace(mechanisms["igpo_sparse"], name="igpo_calculator", env="calculator",
                claim="IGPO, negative control: the plain calculator, whose warm start succeeds often enough that few "
                "groups tie", control=None),
    )
    return {**mechanisms, **{c.name: c for c in controls}}


# ------------------------------------------------------------------------------------------------ warm start
RL_ONLY = ("dataset_kwargs", "max_turns", "max_completion_length")  # WarmStart fields the SFT does not use


def warm_key(spec: WarmStart) -> str:
    """Hash of the settings and of a few of the environment's traces: a changed prompt or trace format retrains."""
    import importlib

    sample = importlib.import_module(f"envs.{spec.env}").synthetic_traces(8, seed=0, **spec.trace_kwargs)
    sft = {k: v for k, v in asdict(spec).items() if k not in RL_ONLY}  # settings that differ in RL only share it
    text = json.dumps([sft, [dict(row) for row in sample]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def traces(spec: WarmStart):
    """The demonstrator's SFT traces; a seeded fraction degraded per ``spec.degrade``."""
    import importlib
    import random
    import re

    from datasets import Dataset

    from envs.episode import ANSWER_FORMAT

    rows = importlib.import_module(f"envs.{spec.env}").synthetic_traces(spec.examples, seed=0, **spec.trace_kwargs)
    rng = random.Random(f"warm-{spec.env}")
    out = []
    for row in rows:
        completion = row["completion"]
        calls = sum(1 for m in completion if m["role"] == "tool")
        if spec.degrade and rng.random() < spec.degrade_fraction:
            if spec.degrade == "direct":
                completion = completion[-1:]  # answer straight away
            elif spec.degrade == "early" and calls >= 2:
                completion = completion[:2] + completion[-1:]  # answer after the first search result
            elif spec.degrade == "ignore" and calls >= 1:
                guess = re.search(r"\d+", row["prompt"][-1]["content"]).group(0)
                completion = [*completion[:-1], {"role": "assistant", "content": ANSWER_FORMAT.format(guess)}]
        out.append({**row, "completion": completion})  # other columns (tools) are kept
    return Dataset.from_list(out)


def warm_start(spec: WarmStart) -> str:
    """Path of the SFT checkpoint for ``spec``, trained (once) if missing."""
    path = OUT / "warm" / f"{spec.env}-{spec.preset}-{warm_key(spec)}"
    if (path / "done.json").exists():
        return str(path)
    _common.set_threads()
    import datasets
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    from rlfw.assets import build_assets, load_tokenizer

    start = time.time()
    base = build_assets(path / "base", seed=0, preset=spec.preset)
    tokenizer = load_tokenizer(base)
    config = SFTConfig(
        output_dir=str(path / "sft"), num_train_epochs=spec.epochs, learning_rate=spec.learning_rate,
        per_device_train_batch_size=32, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=50,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        dataloader_pin_memory=False, seed=0, max_length=spec.max_length, disable_tqdm=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=config, train_dataset=traces(spec),
                         processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(str(path))
    tokenizer.save_pretrained(str(path))
    (path / "done.json").write_text(json.dumps({"spec": asdict(spec), "seconds": time.time() - start}, indent=1))
    print(f"warm start {spec.env}: {time.time() - start:.0f} s -> {path}", flush=True)
    return str(path)


# ------------------------------------------------------------------------------------------------ one RL run
def eval_rows(comp: Comparison, spec: WarmStart, size: int) -> list[dict]:
    import importlib

    module = importlib.import_module(f"envs.{spec.env}")
    pool = module.build_dataset(max(size, 1) * 3, seed=0, split="test", **spec.dataset_kwargs)
    rows, seen = [], set()
    for row in pool:  # small test pools repeat: greedy decoding would score a repeated prompt identically
        key = json.dumps(row["prompt"])
        if row.get("num_hops", 99) >= comp.min_hops and key not in seen:
            seen.add(key)
            rows.append(dict(row))
    return rows[:size]


def train_rows(comp: Comparison, spec: WarmStart, size: int = 1000):
    import importlib

    from datasets import Dataset

    module = importlib.import_module(f"envs.{spec.env}")
    rows = module.build_dataset(size, seed=0, split="train", **spec.dataset_kwargs)
    if comp.min_hops:
        rows = Dataset.from_list([dict(r) for r in rows if r["num_hops"] >= comp.min_hops])
    return rows


def run_job(job: dict) -> dict:
    """One method x seed: RL from the warm start, evaluated every ``eval_every`` steps. Never raises."""
    start = time.time()
    try:
        return {**job, **_train(job), "seconds": time.time() - start, "error": None}
    except Exception as exc:  # a failing method is a result to report, not a reason to lose the other runs
        traceback.print_exc()
        return {**job, "eval": [], "train": [], "seconds": time.time() - start,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _train(job: dict) -> dict:
    import tempfile

    _common.set_threads()
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from envs import calculator
    from rlfw import RLConfig, RLTrainer, build_estimator
    from rlfw.environment import resolve_environment

    comp, spec = comparisons()[job["comparison"]], WARM_STARTS[job["env"]]
    if job["quick"]:
        comp, spec = quick_comparison(comp), quick_warm_start(spec)
    method = next(m for m in comp.methods if m.label == job["method"])
    steps, eval_every = job["steps"], job["eval_every"]
    model_path = job["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    environment = comp.env_class or f"envs.{spec.env}"
    env_cls = resolve_environment(environment)
    held_out = eval_rows(comp, spec, job["eval_size"])
    calculator.seed_tool_failures(job["seed"])  # flaky-tool settings: the luck depends on the seed alone

    def evaluate(model) -> dict:
        greedy = episodes_eval(model, tokenizer, held_out, env_cls, spec)
        result = {"greedy accuracy": greedy["accuracy"], "greedy tool calls": greedy["tool_calls"],
                  "greedy immediate reward": greedy["immediate"], "greedy top-answer share": greedy["top_answer_share"],
                  "greedy answered": greedy["answered"]}
        sampled = episodes_eval(model, tokenizer, held_out, env_cls, spec, temperature=1.0, samples=comp.samples,
                                seed=1234)
        result[PRIMARY] = sampled["accuracy"]
        if comp.pass_k:
            result[f"pass@{comp.samples}"] = sampled[f"pass@{comp.samples}"]
        return result

    evals: list[dict] = []

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            evals.append({"step": 0, **evaluate(model)})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == steps:
                evals.append({"step": state.global_step, **evaluate(model)})

    estimator = Recorder(build_estimator(method.estimator, **method.kwargs))
    weights = method.reward_weights or comp.reward_weights
    config = RLConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-learning-"), advantage_estimator=method.estimator,
        advantage_kwargs=dict(method.kwargs), environment=environment, max_turns=spec.max_turns,
        reward_weights=list(weights) if weights else None,
        num_generations=method.num_generations,
        per_device_train_batch_size=comp.prompts_per_step * method.num_generations,
        max_completion_length=spec.max_completion_length, max_steps=steps, learning_rate=comp.learning_rate,
        lr_scheduler_type="constant", temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no",
        report_to="none", gradient_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True,
        seed=job["seed"])
    trainer = RLTrainer(model=model_path, reward_funcs=[EXTRA_REWARDS[name](job["seed"]) for name in comp.extra_rewards],
                        args=config, estimator=estimator, train_dataset=train_rows(comp, spec),
                        processing_class=tokenizer, callbacks=[Evaluate()])
    estimator.watch(trainer)
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy "no")
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    train = []
    for step, stats in enumerate(estimator.steps, start=1):
        row = {"step": step, **stats}
        for key in ("entropy", "completions/mean_length"):
            if key in logged.get(step, {}):
                row[key] = logged[step][key]
        train.append(row)
    return {"eval": evals, "train": train}


# ------------------------------------------------------------------------------------------------ sizes
def quick_warm_start(spec: WarmStart) -> WarmStart:
    return replace(spec, examples=300, epochs=1.0, preset="tiny")


def quick_comparison(comp: Comparison) -> Comparison:
    return replace(comp, steps=4, eval_every=2, eval_size=8, prompts_per_step=min(comp.prompts_per_step, 2) if
                   comp.name != "riskpo" else comp.prompts_per_step, samples=2)


def jobs_for(comp: Comparison, args, model_path: str) -> list[dict]:
    steps = args.steps or comp.steps
    eval_every = args.eval_every or comp.eval_every
    return [{"comparison": comp.name, "env": comp.env, "method": m.label, "seed": seed, "steps": steps,
             "eval_every": eval_every, "eval_size": args.eval_size or comp.eval_size, "quick": args.quick,
             "model_path": model_path}
            for m in comp.methods for seed in range(args.seeds)]


@dataclass
class Task:
    """A unit of work for ``schedule``: ``fn(make_arg(results so far))``, runnable once ``needs`` are done."""

    key: str
    fn: object
    make_arg: object
    needs: tuple[str, ...] = ()


def schedule(tasks: list[Task], workers: int, on_done) -> None:
    """Run ``tasks`` (in priority order, each as soon as what it needs is done) on ``workers`` spawned processes
    (in this process if workers <= 1); ``on_done(key, results)`` runs in this process after each task."""
    results: dict[str, object] = {}
    if workers <= 1:
        for task in tasks:
            results[task.key] = task.fn(task.make_arg(results))
            on_done(task.key, results)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, wait

    pending, running = list(tasks), {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for task in [t for t in pending if all(n in results for n in t.needs)][: workers - len(running)]:
                running[pool.submit(task.fn, task.make_arg(results))] = task
                pending.remove(task)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                results[task.key] = future.result()  # a failing warm start stops the bench; run_job never raises
                on_done(task.key, results)


# ------------------------------------------------------------------------------------------------ summary
def precondition_value(values: list[float], aggregate: str) -> float:
    """One run's precondition from its per-step values: their mean, or last-10 mean / first-10 mean."""
    if aggregate == "last/first":
        return statistics.fmean(values[-10:]) / statistics.fmean(values[:10])
    return statistics.fmean(values[-10:] if aggregate == "last" else values)


def summary() -> str:
    """Markdown table over the mechanism comparisons from their raw results (outputs/bench/learning/): per method,
    the precondition (mean over training steps, mean ± std over seeds) and the final held-out sampled accuracy, in the
    mechanism setting and in its negative control."""
    from _common import pm
    from _learning_report import PRIMARY

    def load(name: str | None) -> dict[str, list[dict]]:
        path = OUT / "learning" / f"learning_{name}.json"
        if name is None or not path.exists():
            return {}
        by_method: dict[str, list[dict]] = {}
        for run in json.loads(path.read_text())["results"]:
            if not run["error"]:
                by_method.setdefault(run["method"], []).append(run)
        return by_method

    def cell(runs: list[dict], key: str | None, aggregate: str = "mean") -> str:
        if not runs:
            return "not run"
        if key is None or key.startswith("eval:"):
            metric = PRIMARY if key is None else key[len("eval:"):]
            return pm([r["eval"][-1][metric] for r in runs if metric in r["eval"][-1]]) + f" ({len(runs)} seeds)"
        per_run = [precondition_value([row[key] for row in r["train"] if key in row], aggregate) for r in runs
                   if any(key in row for row in r["train"])]
        return pm(per_run) if per_run else "n/a"

    lines = ["| comparison | precondition (measured on training batches) | effect measured | method | precondition: "
             "mechanism setting | precondition: control | effect: mechanism | effect: control | held-out sampled "
             "accuracy: mechanism | held-out sampled accuracy: control |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    every = comparisons()
    controls = {c.control for c in every.values()}
    for comp in every.values():
        if comp.precondition is None or comp.name in controls:
            continue
        mech, ctrl = load(comp.name), load(comp.control)
        for i, m in enumerate(comp.methods):
            effect = comp.effect or comp.precondition
            head = (f"`{comp.name}` (control: `{comp.control or 'its clean-reward arm'}`)",
                    f"{comp.precondition.label}: {comp.precondition.how}", f"{effect.label}: {effect.how}"
                    ) if i == 0 else ("", "", "")
            key, agg = comp.precondition.key, comp.precondition.aggregate
            lines.append("| " + " | ".join([*head, m.label, cell(mech.get(m.label, []), key, agg),
                                             cell(ctrl.get(m.label, []), key, agg),
                                             cell(mech.get(m.label, []), effect.key, effect.aggregate),
                                             cell(ctrl.get(m.label, []), effect.key, effect.aggregate),
                                             cell(mech.get(m.label, []), None), cell(ctrl.get(m.label, []), None)])
                         + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(comparisons())
    parser.add_argument("--comparison", choices=[*names, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: per comparison)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-size", type=int, default=None, help="held-out prompts (default: per comparison)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny warm start, 4 steps, nothing appended")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    parser.add_argument("--summary", action="store_true",
                        help="print the mechanism comparisons' precondition table from earlier runs and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary())
        return
    if args.quick:
        args.seeds = min(args.seeds, 2)
    selected = [comparisons()[n] for n in (names if args.comparison == "all" else [args.comparison])]
    begin = time.time()
    runs = [quick_comparison(c) if args.quick else c for c in selected]
    specs = {c.env: (quick_warm_start(WARM_STARTS[c.env]) if args.quick else WARM_STARTS[c.env]) for c in runs}
    # Priority: the longest warm start (search_qa) first, then each environment's warm start just before its first
    # comparison's jobs; a job waits only for its own warm start, so the other workers run jobs meanwhile.
    tasks = [Task(f"warm:{env}", warm_start, lambda _, s=spec: s) for env, spec in specs.items() if env == "search_qa"]
    jobs: dict[str, list[str]] = {}
    for comp in runs:
        if not any(t.key == f"warm:{comp.env}" for t in tasks):
            tasks.append(Task(f"warm:{comp.env}", warm_start, lambda _, s=specs[comp.env]: s))
        for job in jobs_for(comp, args, ""):
            key = f"{comp.name}:{job['method']}:{job['seed']}"
            jobs.setdefault(comp.name, []).append(key)
            tasks.append(Task(key, run_job, lambda done, j=job: {**j, "model_path": done[f"warm:{j['env']}"]},
                              needs=(f"warm:{comp.env}",)))
    published: set[str] = set()

    def on_done(key: str, done: dict) -> None:
        print(f"[{(time.time() - begin) / 60:.1f} min] done: {key}", flush=True)
        for comp in runs:  # publish in the given order, each as soon as all its runs are in
            if comp.name in published:
                continue
            if not all(k in done for k in jobs[comp.name]):
                break
            results = [done[k] for k in jobs[comp.name]]
            publish(comp, results, args, sum(r["seconds"] for r in results))
            published.add(comp.name)

    schedule(tasks, args.workers, on_done)
    print(f"total {(time.time() - begin) / 60:.1f} min")


def publish(comp: Comparison, results: list[dict], args, seconds: float) -> None:
    from _doc import append_result, machine

    name = ("quick_" if args.quick else "learning_") + comp.name
    raw = OUT / "learning" / f"{name}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"comparison": asdict(comp), "results": results}, indent=1, default=str))
    table, happened = report(comp, results, args)
    image = plot(comp, results, name, to_docs=not (args.quick or args.no_write))
    spec = quick_warm_start(WARM_STARTS[comp.env]) if args.quick else WARM_STARTS[comp.env]
    print(f"\n## {comp.name} ({seconds / 60:.1f} min of runs)\n{table}\n\n{happened}\nplot: {image}\n", flush=True)
    if args.quick or args.no_write:
        return
    steps = results[0]["steps"] if results else comp.steps
    body = (
        f"{machine()}; {args.workers} worker process(es). Claim: {comp.claim}.\n\n"
        f"Setup: `{comp.env_class or 'envs.' + spec.env}` ({json.dumps(spec.dataset_kwargs)}; min hops {comp.min_hops}), "
        f"local `{spec.preset}` "
        f"model warm-started by SFT on {spec.examples} imperfect demonstrations x {spec.epochs:g} epochs "
        f"(degrade={spec.degrade} {spec.degrade_fraction:g}, traces {json.dumps(spec.trace_kwargs)}); then RL for "
        f"{steps} steps, {comp.prompts_per_step} prompts/step, lr {comp.learning_rate:g} constant, temperature 1, "
        f"max_turns {spec.max_turns}, max_completion_length {spec.max_completion_length}; seeds "
        f"{list(range(args.seeds))}; held-out: {results[0]['eval_size'] if results else comp.eval_size} test-split "
        f"prompts, greedy, every {results[0]['eval_every'] if results else comp.eval_every} steps"
        + f"; sampled accuracy = pass@1 from {comp.samples} episodes per prompt at T=1"
        + (f", pass@{comp.samples} from the same episodes" if comp.pass_k else "")
        + (f". Training reward: the environment's + {', '.join(comp.extra_rewards)} (held-out metrics use the "
           "environment's alone)" if comp.extra_rewards else "")
        + ". Estimator options: "
        + "; ".join(f"{m.label}: `{m.estimator}` {json.dumps(m.kwargs)}" for m in comp.methods)
        + f". Sum of run times {seconds / 60:.1f} min.\n\n{table}\n\n![{comp.name}]({image})\n\n"
        "What the numbers show (computed; 'distinguishable' = |difference| > the larger std over seeds):\n\n"
        f"{happened}\n")
    append_result(f"Learning: {comp.name}", f"Produced by `bench/learning.py --comparison {comp.name}` (method in its "
                  "docstring). Newest results last.", body)


if __name__ == "__main__":
    main()
