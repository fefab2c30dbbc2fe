"""Concrete environments. Each module exports ``ENVIRONMENT`` (the class for ``environment_factory``),
``REWARD_FUNCS`` (TRL reward functions that score completions), ``build_dataset(n, seed, split)`` and
``synthetic_traces(n, seed)`` (ideal conversations for an SFT warm start). See docs/environments.md.
"""

ENVIRONMENTS = {
    "calculator": "envs.calculator",
    "search_qa": "envs.search_qa",
    "python_sandbox": "envs.python_sandbox",
}
