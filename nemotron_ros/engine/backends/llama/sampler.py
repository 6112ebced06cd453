"""llama.cpp sampler chains with an optional GBNF grammar, compiled once per grammar.

Parsing a grammar costs milliseconds, so each distinct grammar is compiled once into a pristine
sampler and every request gets a clone (a fresh parse state) of it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
from collections.abc import Callable, Collection, Sequence
from typing import Optional

import llama_cpp
import numpy as np

from ...types import SamplingParams
from . import native

_REJECTED = float('-inf')
# numpy's view of llama_token_data (id, logit, p), for filling candidates without a loop.
_TOKEN_DATA = np.dtype([('id', np.int32), ('logit', np.float32), ('p', np.float32)])


MASK_AFTER = 2
"""Rejected draws in a row after which tokens are drawn from the masked candidates first..."""
RETRY_EVERY = 4
"""...except every this many tokens, where a plain draw tests whether the model agrees again."""


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
    """One request's sampling: penalties, truncation, temperature and draw, then the grammar.

    The grammar verifies the drawn token instead of filtering the vocabulary first (what
    llama.cpp's own ``common_sampler`` does). Most drawn tokens are allowed, and checking one
    token costs microseconds, where masking a 131k vocabulary costs tens of milliseconds. A
    rejected token (an end-of-generation token included) is replaced by a draw from the
    grammar-masked candidates, so every returned token is one the grammar accepts, exactly as
    with the grammar first. Greedy output is identical; with temperature alone the
    distribution is too (p(t) plus the rejected mass times p(t)/Z is p(t)/Z), and truncation
    (top-k, top-p, min-p) then applies before the mask rather than after it. While the model
    keeps disagreeing (:data:`MASK_AFTER` rejections in a row), tokens are drawn masked first,
    with a plain draw every :data:`RETRY_EVERY` tokens to notice when it agrees again.
    """

    def __init__(self, params: SamplingParams, grammar: llama_cpp.llama_sampler_p | None,
                 n_vocab: int, eog_tokens: Sequence[int] = (),
                 index: Optional[FirstByteIndex] = None) -> None:
        """Build the chain.

        :param grammar: a fresh grammar sampler, owned (and freed) by this chain from now on.
        :param index: the model's :class:`FirstByteIndex`; with it, a rejected draw masks only
            the tokens whose first bytes the grammar allows now (same result, less work).
        """
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(chain_params)
        self.grammar = grammar
        #: Drawn tokens the grammar rejected (each cost one masked draw).
        self.rejections = 0
        self._rejected_in_row = 0
        self._mask_first = False
        self._masked_in_row = 0
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if grammar is None and params.ignore_eos and eog_tokens:
            biases = (llama_cpp.llama_logit_bias * len(eog_tokens))(
                *[llama_cpp.llama_logit_bias(t, float('-inf')) for t in eog_tokens])
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), biases))
        # Penalties remember accepted tokens, so a chain with them must not see a draw that
        # the grammar rejects: it draws from our own candidate array and accepts explicitly.
        self._stateless = params.repeat_penalty == 1.0
        if not self._stateless:
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, 64, params.repeat_penalty, 0.0,
                                                       0.0))
        if params.temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))
        if grammar is not None:
            self._candidates = _Candidates(n_vocab, index)
            self._one = llama_cpp.llama_token_data(0, 0.0, 0.0)
            self._one_array = llama_cpp.llama_token_data_array(
                ctypes.pointer(self._one), 1, -1, False)

    def sample(self, ctx: llama_cpp.llama_context_p) -> int:
        """Draw the next token from the last logits and advance the grammar."""
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.chain, ctx, -1)
        if self._mask_first and self._masked_in_row < RETRY_EVERY - 1:
            # The model keeps disagreeing with the grammar: a plain draw would be wasted.
            self._masked_in_row += 1
            token = self._masked_draw(ctx)
        else:
            token = (llama_cpp.llama_sampler_sample(self.chain, ctx, -1) if self._stateless
                     else self._candidates.draw(ctx, self.chain))
            if self.allows(token):
                self._rejected_in_row = 0
            else:
                self.rejections += 1
                self._rejected_in_row += 1
                token = self._masked_draw(ctx)
            self._mask_first = self._rejected_in_row >= MASK_AFTER
            self._masked_in_row = 0
        if not self._stateless:
            llama_cpp.llama_sampler_accept(self.chain, token)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def _masked_draw(self, ctx: llama_cpp.llama_context_p) -> int:
        token = self._candidates.draw(ctx, self.chain, self.grammar, masked=True)
        if token < 0:
            raise GrammarError('the grammar admits no token here')
        return token

    def allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, accepts ``token`` next."""
        one = self._one
        one.id, one.logit, one.p = token, 0.0, 0.0
        array = self._one_array
        array.size, array.selected, array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return one.logit != _REJECTED

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None

    def __exit__(self, *exc: object) -> None:
        self.close()


class FirstByteIndex:
    """Which tokens can pass a grammar at all, found by probing short tokens first.

    A grammar accepts a token only if it accepts every prefix of the token's text, so asking
    it about the ~128 one-byte ASCII tokens tells which first bytes may follow; where few may
    (inside a literal such as ``<function=``) and many tokens start with them, the two-byte
    tokens starting with those bytes are asked too. Only the survivors are masked in full.
    End-of-generation tokens (the grammar judges them by its state, not their text), tokens
    that start with a non-ASCII byte (a pending UTF-8 sequence changes their meaning) and
    tokens whose first byte has no one-byte token are always candidates.

    The tables are compressed rows (``start[r]:start[r + 1]`` slices one flat array), the
    layout src/grammar_mask.c walks; :meth:`possible` is the same walk in Python, for when the
    native library is missing.
    """

    PAIR_MAX_BYTES = 8
    """Ask about two-byte prefixes only when at most this many first bytes passed..."""
    PAIR_MIN_TOKENS = 512
    """...and more than this many tokens start with them."""

    def __init__(self, n_vocab: int, piece: Callable[[int], bytes],
                 eog_tokens: Collection[int]) -> None:
        texts: dict[int, bytes] = {}
        singles: dict[int, int] = {}  # byte -> its one-byte token
        eog = set(eog_tokens)
        for token in range(n_vocab):
            if token not in eog:
                text = piece(token)
                if text and text[0] < 0x80:
                    texts[token] = text
                    if len(text) == 1:
                        singles.setdefault(text[0], token)
        pairs = {text: token for token, text in texts.items() if len(text) == 2}
        by_byte: list[list[int]] = [[] for _ in range(256)]
        loose: list[list[int]] = [[] for _ in range(256)]
        by_pair: dict[bytes, list[int]] = {}
        always = [t for t in range(n_vocab) if t not in texts or texts[t][0] not in singles]
        for token, text in texts.items():
            if text[0] in singles:
                by_byte[text[0]].append(token)
                if text[:2] in pairs:
                    by_pair.setdefault(text[:2], []).append(token)
                else:
                    loose[text[0]].append(token)
        pair_keys = sorted(by_pair)  # by first byte, then second: each byte's pairs in a row
        pair_rows: list[list[int]] = [[] for _ in range(256)]
        for number, key in enumerate(pair_keys):
            pair_rows[key[0]].append(number)
        self.probe_bytes = _int32(sorted(singles))
        self.probe_tokens = _int32([singles[b] for b in sorted(singles)])
        self.always = _int32(always)
        self.by_byte_start, self.by_byte = _rows(by_byte)
        self.loose_start, self.loose = _rows(loose)
        self.pair_start = np.cumsum([0] + [len(row) for row in pair_rows], dtype=np.int32)
        self.pair_probes = _int32([pairs[key] for key in pair_keys])
        self.member_start, self.members = _rows([by_pair[key] for key in pair_keys])
        self._tables: Optional[native.FirstByteTables] = None

    def possible(self, check: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Ids of the tokens that may pass; ``check(ids)`` says which ids the grammar allows."""
        passed = np.asarray(check(self.probe_tokens), dtype=bool)
        first = self.probe_bytes[passed].tolist()
        groups = [self.always]
        first_tokens = sum(int(self.by_byte_start[b + 1] - self.by_byte_start[b]) for b in first)
        if len(first) > self.PAIR_MAX_BYTES or first_tokens <= self.PAIR_MIN_TOKENS:
            return np.concatenate(groups + [_row(self.by_byte_start, self.by_byte, b)
                                            for b in first])
        groups += [_row(self.loose_start, self.loose, b) for b in first]
        numbers = [p for b in first for p in range(self.pair_start[b], self.pair_start[b + 1])]
        if numbers:
            passed = check(self.pair_probes[numbers])
            groups += [_row(self.member_start, self.members, p)
                       for p, ok in zip(numbers, passed, strict=True) if ok]
        return np.concatenate(groups)

    @property
    def tables(self) -> native.FirstByteTables:
        """The tables as the C struct (pointing into this object's arrays)."""
        if self._tables is None:
            p = native.int32_pointer
            self._tables = native.FirstByteTables(
                p(self.probe_tokens), p(self.probe_bytes), len(self.probe_tokens),
                p(self.always), len(self.always), p(self.by_byte_start), p(self.by_byte),
                p(self.loose_start), p(self.loose), p(self.pair_start), p(self.pair_probes),
                p(self.member_start), p(self.members))
        return self._tables


def _int32(values: Sequence[int]) -> np.ndarray:
    # One spare element keeps an empty table's pointer valid for C.
    return np.array(list(values) + [0], dtype=np.int32)[:len(values)]


def _rows(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(start, items) of compressed rows: row r is items[start[r]:start[r + 1]]."""
    start = np.cumsum([0] + [len(row) for row in rows], dtype=np.int32)
    return start, _int32([token for row in rows for token in row])


def _row(start: np.ndarray, items: np.ndarray, row: int) -> np.ndarray:
    return items[start[row]:start[row + 1]]


class _Candidates:
    """A reusable llama_token_data array over the vocabulary, filled with numpy or in C."""

    def __init__(self, n_vocab: int, index: Optional[FirstByteIndex] = None) -> None:
        self.n_vocab = n_vocab
        self.index = index
        self.data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(self._pointer(), n_vocab, -1, False)
        self._native = native.library()
        if self._native is not None:
            self._scratch_ids = np.empty(n_vocab, dtype=np.int32)
            self._apply = native.sampler_apply_address()
            self._tables = None if index is None else ctypes.pointer(index.tables)

    def _pointer(self) -> object:
        return self.data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))

    def draw(self, ctx: llama_cpp.llama_context_p, chain: llama_cpp.llama_sampler_p,
             grammar: llama_cpp.llama_sampler_p | None = None, masked: bool = False) -> int:
        """The chain's pick from the last logits; with ``masked``, among ``grammar``'s tokens.

        Accepts nothing. Returns -1 when the mask left no candidate.
        """
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        if masked and self._native is not None:
            index = self.index
            return self._native.nemotron_ros_masked_draw(
                self._apply, grammar, chain, self._tables,
                index.PAIR_MAX_BYTES if index else 0, index.PAIR_MIN_TOKENS if index else 0,
                logits, self.n_vocab, self.data.ctypes.data, self._scratch_ids.ctypes.data)
        logits = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        ids = self.ids
        if masked and self.index is not None:
            ids = self.index.possible(lambda probes: self._allowed(grammar, probes))
        n = len(ids)
        data = self.data[:n]
        data['id'] = ids
        data['logit'] = logits if n == self.n_vocab else logits[ids]
        data['p'] = 0.0
        array = self.array
        array.data, array.size, array.selected, array.sorted = self._pointer(), n, -1, False
        ref = ctypes.byref(array)
        if masked:
            llama_cpp.llama_sampler_apply(grammar, ref)
        llama_cpp.llama_sampler_apply(chain, ref)
        if not 0 <= array.selected < array.size:
            return -1
        chosen = array.data[array.selected]
        return -1 if chosen.logit == _REJECTED else int(chosen.id)

    def _allowed(self, grammar: llama_cpp.llama_sampler_p, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` the grammar accepts next (a boolean per id)."""
        n = len(ids)
        data = self.data[:n]
        data['id'] = ids
        data['logit'] = 0.0
        data['p'] = 0.0
        array = self.array
        array.data, array.size, array.selected, array.sorted = self._pointer(), n, -1, False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return data['logit'] != _REJECTED
