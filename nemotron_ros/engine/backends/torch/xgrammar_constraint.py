"""Grammar-constrained decoding for the torch backend: the engine's GBNF, run by xgrammar.

Why xgrammar: it is the structured-generation library vLLM, SGLang and TensorRT-LLM use, it
fills a token mask in microseconds even at a 131k vocabulary, and its EBNF dialect is
llama.cpp's GBNF. :func:`grammar.build_grammar` stays the only grammar generator: its output
(``::=`` rules with hyphenated names, double-quoted literals with ``\\n``, ``\\"``, ``\\\\`` and
``\\xHH`` escapes, character classes with ranges and ``^``, groups, ``?``, ``*``, ``+``,
``{m}``, ``{m,}``, ``{m,n}``, root rule ``root``) is compiled unchanged, and the tests check on
valid and invalid tool calls that xgrammar accepts exactly what llama.cpp's reading admits.

One :class:`GrammarBackend` per loaded model holds the tokenizer description and the
compiler, whose cache makes a repeated grammar free; each request gets a fresh
:class:`RequestGrammar` (the parse state) and must not share it.

Special tokens: xgrammar treats only the tokenizer's *special* tokens as special. Nemotron's
``<think>``/``<tool_call>`` tags are plain added tokens whose text is the tag, so a literal
``"<tool_call>"`` in the grammar is written either as that one token or spelled out; the
parser reads the decoded text, which is the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import xgrammar

_CACHE_BYTES = 64 * 1024 * 1024


class GrammarCompileError(ValueError):
    """xgrammar rejected a generated grammar (a bug in the grammar generator)."""


class GrammarBackend:
    """The model-wide part: tokenizer description, compiler and its cache.

    :param tokenizer: the model's Hugging Face tokenizer.
    :param vocab_size: rows of the model's output layer (may exceed the tokenizer's size).
    :param stop_token_ids: every end-of-generation id; the grammar may end only with one.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 threads: int = 1) -> None:
        self.vocab_size = vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=max(1, threads),
                                                  cache_limit_bytes=_CACHE_BYTES)

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for, as xgrammar decodes the vocabulary."""
        return list(self.info.decoded_vocab)

    def start(self, gbnf: str, device: torch.device) -> RequestGrammar:
        """A new parse state at the start of ``gbnf`` (compiled once, then cached)."""
        try:
            compiled = self._compiler.compile_grammar(gbnf, root_rule_name='root')
        except RuntimeError as exc:
            raise GrammarCompileError(f'xgrammar could not compile the grammar: {exc}') from exc
        return RequestGrammar(compiled, self.vocab_size, device)


class RequestGrammar:
    """One request's grammar state: masks logits, advances on each accepted token."""

    def __init__(self, compiled: Any, vocab_size: int, device: torch.device) -> None:
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._vocab_size = vocab_size
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        self._device = device

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids next to -inf (in place)."""
        if not self._matcher.fill_next_token_bitmask(self._bitmask):
            return
        words = self._bitmask[0].to(self._device, non_blocking=True)
        allowed = ((words.unsqueeze(1) >> self._shifts) & 1).reshape(-1)[:self._vocab_size]
        logits[:self._vocab_size].masked_fill_(allowed == 0, float('-inf'))
        logits[self._vocab_size:] = float('-inf')

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it (nothing changes)."""
        return bool(self._matcher.accept_token(token))

    def accepts_text(self, text: str) -> bool:
        """Advance past ``text`` (for checks of the grammar itself)."""
        return bool(self._matcher.accept_string(text))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return bool(self._matcher.is_terminated())

    @property
    def completable(self) -> bool:
        """The text so far is a complete sentence of the grammar."""
        return bool(self._matcher.is_completed())
