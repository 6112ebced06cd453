"""llama.cpp sampler chains with an optional GBNF grammar, compiled once per grammar.

Parsing a grammar costs milliseconds, so each distinct grammar is compiled once into a pristine
sampler and every request gets a clone (a fresh parse state) of it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence

import llama_cpp

from ...types import SamplingParams


class GrammarError(ValueError):
    """llama.cpp rejected a generated grammar (a bug in the grammar generator)."""


class GrammarCache:
    """LRU cache of compiled, never-used grammar samplers keyed by grammar text."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, capacity: int = 32) -> None:
        self._vocab = vocab
        self._capacity = capacity
        self._items: collections.OrderedDict[str, llama_cpp.llama_sampler_p] = (
            collections.OrderedDict())

    def fresh(self, grammar: str) -> llama_cpp.llama_sampler_p:
        """A new grammar sampler in its start state (owned by the caller)."""
        pristine = self._items.get(grammar)
        if pristine is None:
            pristine = llama_cpp.llama_sampler_init_grammar(
                self._vocab, grammar.encode('utf-8'), b'root')
            if not pristine:
                raise GrammarError('llama.cpp could not parse the generated grammar')
            self._items[grammar] = pristine
            while len(self._items) > self._capacity:
                _, old = self._items.popitem(last=False)
                llama_cpp.llama_sampler_free(old)
        else:
            self._items.move_to_end(grammar)
        return llama_cpp.llama_sampler_clone(pristine)

    def close(self) -> None:
        while self._items:
            _, sampler = self._items.popitem()
            llama_cpp.llama_sampler_free(sampler)


class SamplerChain(contextlib.AbstractContextManager):
    """One request's sampler chain: grammar, penalties, truncation, temperature, draw."""

    def __init__(self, params: SamplingParams, grammar: llama_cpp.llama_sampler_p | None,
                 n_vocab: int, eog_tokens: Sequence[int] = ()) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if grammar is not None:
            add(grammar)
        elif params.ignore_eos and eog_tokens:
            biases = (llama_cpp.llama_logit_bias * len(eog_tokens))(
                *[llama_cpp.llama_logit_bias(t, float('-inf')) for t in eog_tokens])
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), biases))
        if params.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(64, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        add(llama_cpp.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))

    def sample(self, ctx: llama_cpp.llama_context_p) -> int:
        """Draw the next token from the last logits and advance the grammar."""
        return llama_cpp.llama_sampler_sample(self.chain, ctx, -1)

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def __exit__(self, *exc: object) -> None:
        self.close()
