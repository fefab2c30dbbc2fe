"""Cross-turn key/value reuse for the HF backend, and the attention it decodes with.

``PrefixCache`` keeps the key/value states of the sequences one ``generate`` call produced, so that the next turn of the
same episodes forwards only the tokens it adds; ``PreallocatedLayer`` holds a call's states in buffers sized for the
whole call, so that a decoding step does not copy the cache; ``gqa_attention`` passes grouped-query heads to the CPU
kernel as they are instead of copying every cached head per step. All three leave tokens and log-probs unchanged
(tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, fast_all, sdpa_mask

GQA_ATTENTION = "rlfw_sdpa_gqa"


def _sdpa_gqa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, except that grouped-query heads go to the kernel as they are
    (``enable_gqa``) also when a padding mask is given, on the CPU.

    transformers passes grouped heads to the kernel only without a mask (a CUDA limit: with one, the kernel falls back
    to its slow path) and otherwise repeats every key and value head first, a copy of the whole cache per layer and
    decoding step: the part of a turn's cost that grew with the conversation. On the CPU the kernel takes a mask and
    grouped heads together, and the outputs are bit-identical (tested).
    """
    if (attention_mask is None or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _decode_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                 mask_function: Any = causal_mask_function, attention_mask: torch.Tensor | None = None,
                 local_size: int | None = None, allow_is_causal_skip: bool = True, use_vmap: bool = False,
                 **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, with a shortcut for a decoding step of a plain causal mask.

    One query at the end of the keys sees every key, so the causal part is all true and the mask is the padding mask
    itself, (batch, 1, 1, kv); ``sdpa_mask`` builds the same values through its general index machinery, a fixed cost
    of each decoding step. Given the float ``dtype`` of the states, the mask is returned as the additive mask (0 where
    attended, -inf elsewhere) that the attention kernel makes of a boolean one, once per step instead of per layer.
    Everything else (prefill, sliding windows, offsets, custom mask functions) goes to ``sdpa_mask``; the values are
    equal (tested), and a mask without padding is skipped as there.
    """
    if (q_length == 1 and kv_offset == 0 and isinstance(q_offset, int) and q_offset == kv_length - 1
            and mask_function is causal_mask_function and local_size is None and not use_vmap
            and attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[-1] == kv_length
            and attention_mask.dtype == torch.bool and not torch.compiler.is_compiling()):
        if allow_is_causal_skip and fast_all(attention_mask):
            return None
        mask = attention_mask[:, None, None, :]
        dtype = kwargs.get("dtype")
        if dtype is None or not dtype.is_floating_point:
            return mask
        # as the kernel would convert the boolean mask, but once per step instead of once per layer
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, **kwargs)


AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa)
AttentionMaskInterface.register(GQA_ATTENTION, _decode_mask)


@contextlib.contextmanager
def gqa_attention(model: Any):
    """Run ``model`` (and its sub-models) with ``_sdpa_gqa`` where they use ``sdpa``; restored on exit."""
    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)
               and getattr(c, "_attn_implementation_internal", None) == "sdpa"}
    for config in configs.values():
        config._attn_implementation_internal = GQA_ATTENTION
    try:
        yield model
    finally:
        for config in configs.values():
            config._attn_implementation_internal = "sdpa"


@dataclass
class _Prefix:
    """What one row of the last ``generate`` call left: its tokens and, per layer, their (keys, values), each of
    shape (kv_heads, len(tokens), head_dim), views into that call's cache."""

    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose states live in buffers allocated once per ``generate`` call for the prefix and the
    tokens it is expected to sample: a decoding step writes its column in place, where ``DynamicLayer`` concatenates
    a new copy of the whole cache per step and layer (a per-step cost that grew with the conversation). When a call
    outruns the buffers they double (at most to ``limit`` columns, the prefix plus the call's token budget), so the
    copies stay amortised and a long budget that is not used costs no memory. ``keys`` and ``values`` are views of
    the filled columns; anything that replaces them (crop, reordering) is taken as the new content."""

    def __init__(self, capacity: int, limit: int | None = None):
        super().__init__()
        self.capacity, self.limit = capacity, limit
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def reserve(self, keys: torch.Tensor, values: torch.Tensor, batch: int, filled: int) -> None:
        """Allocate the buffers for ``batch`` rows shaped like one row's ``keys`` and ``values`` (kv_heads, length,
        head_dim); their first ``filled`` columns (zeros) become the states, for the caller to fill."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        size = max(self.capacity, filled)
        self._buffers = tuple(x.new_zeros((batch, x.shape[0], size, x.shape[-1])) for x in (keys, values))
        self.keys, self.values = (b[:, :, :filled] for b in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or n + m > buffers[0].shape[-2] or key_states.shape[0] != buffers[0].shape[0]
                or (n and self.keys.data_ptr() != buffers[0].data_ptr())):
            grown = min(2 * (n + m), self.limit or 2 * (n + m))
            size = max(self.capacity, n + m) if buffers is None else max(n + m, grown)
            buffers = tuple(x.new_empty((*x.shape[:-2], size, x.shape[-1])) for x in (key_states, value_states))
            if n:
                buffers[0][:, :, :n] = self.keys
                buffers[1][:, :, :n] = self.values
            self._buffers = buffers
        buffers[0][:, :, n:n + m] = key_states
        buffers[1][:, :, n:n + m] = value_states
        self.keys, self.values = buffers[0][:, :, :n + m], buffers[1][:, :, :n + m]
        return self.keys, self.values


SPARE_COLUMNS = 128  # room for sampled tokens a call's buffers start with; they double when a turn runs longer


class PrefixCache:
    """The key/value states of the sequences the last ``generate`` call produced, so that the next turn of the same
    episodes forwards only its new tokens (the env tokens and the next generation prompt) instead of the whole prefix.

    An entry is used by a prompt it is a strict prefix of, once; entries the next call does not use (finished
    episodes) are dropped by that call, and the engine drops all of them when its batch of episodes is over
    (``release``). Only models whose cache is all plain ``DynamicLayer``s are served (held as ``PreallocatedLayer``s;
    sliding-window, quantised, offloaded and recurrent caches are not).

    Memory: entries are views into the last call's buffers, which are held until the next call has copied what it
    reuses into its own; so at most two calls' buffers exist at once, each of batch x (longest prompt + tokens
    sampled, rounded up to at most twice that) columns, at 2 x layers x kv_heads x head_dim x bytes per column (46 KB
    for SmolLM2-135M in float32). Recomputing holds one call's states, but its concatenation copies them every step.
    """

    def __init__(self):
        self.entries: list[_Prefix] = []
        self.stats = {"reused_tokens": 0, "forwarded_tokens": 0}

    def clear(self) -> None:
        self.entries = []

    def take(self, prompts: list[list[int]]) -> list[_Prefix | None]:
        """For each prompt, the longest unused entry that is a strict prefix of it (or None); drops all entries."""
        free, hits = self.entries, []
        self.entries = []
        for prompt in prompts:
            best = None
            for k, entry in enumerate(free):
                n = len(entry.tokens) if entry is not None else 0
                if (n and n < len(prompt) and (best is None or n > len(free[best].tokens))
                        and prompt[n - 1] == entry.tokens[-1] and prompt[:n] == entry.tokens):
                    best = k
            hits.append(None if best is None else free[best])
            if best is not None:
                free[best] = None
        return hits

    @staticmethod
    def layout(prompts: list[list[int]], hits: list[_Prefix | None]) -> tuple[int, int]:
        """(W, T): the left-padded batch width and how many of its columns come from the cache.

        Every row is right-aligned in W columns; the last ``W - T`` columns are forwarded, where ``W - T`` is the
        longest uncached tail, so a row with a shorter tail forwards a few cached tokens again instead of leaving a
        gap (plain left padding: position ids and attention masks as transformers builds them)."""
        width = max(len(p) for p in prompts)
        tail = max(len(p) - (len(h.tokens) if h is not None else 0) for p, h in zip(prompts, hits, strict=True))
        return width, width - tail

    def past(self, prompts: list[list[int]], hits: list[_Prefix | None], cached: int, config: Any,
             max_new_tokens: int) -> Any:
        """A cache for the next ``generate`` call, of ``PreallocatedLayer``s with room for the prompts and
        ``SPARE_COLUMNS`` sampled tokens (growing up to ``max_new_tokens``), its first ``cached`` columns filled: row
        i's first len(prompt_i) - tail cached tokens, right-aligned. None where the model's cache is not all plain
        ``DynamicLayer``s (``generate`` then builds its own)."""
        cache = DynamicCache(config=config)
        if not cache.layers or any(type(x) is not DynamicLayer for x in cache.layers):
            return None
        width = max(len(p) for p in prompts)
        capacity = width + min(max_new_tokens, SPARE_COLUMNS)
        cache.layers = [PreallocatedLayer(capacity, width + max_new_tokens) for _ in cache.layers]
        if cached == 0:
            return cache
        tail = width - cached
        reference = next(h for h in hits if h is not None).layers
        for layer, (keys, values) in zip(cache.layers, reference, strict=True):
            layer.reserve(keys, values, len(prompts), cached)
        for i, (prompt, hit) in enumerate(zip(prompts, hits, strict=True)):
            n = len(prompt) - tail  # this row's tokens left of the forwarded columns
            if n > 0:
                for layer, (k, v) in zip(cache.layers, hit.layers, strict=True):
                    layer.keys[i, :, cached - n:] = k[:, :n]
                    layer.values[i, :, cached - n:] = v[:, :n]
        return cache

    def keep(self, cache: Any, prompts: list[list[int]], width: int, kept: list[list[int]]) -> None:
        """Store, per row, its prompt and ``kept[i]`` (the sampled ids the cache holds states for)."""
        layers = getattr(cache, "layers", None)
        if (not isinstance(cache, DynamicCache) or not layers
                or any(type(x) not in (DynamicLayer, PreallocatedLayer) for x in layers)):
            return
        for i, (prompt, ids) in enumerate(zip(prompts, kept, strict=True)):
            lo, hi = width - len(prompt), width + len(ids)
            if hi > layers[0].keys.shape[-2]:
                return  # not the layout this backend made: keep nothing
            self.entries.append(_Prefix(list(prompt) + list(ids),
                                        [(x.keys[i, :, lo:hi], x.values[i, :, lo:hi]) for x in layers]))
