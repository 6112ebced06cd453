"""The part of a decode loop every backend shares: text assembly, time to first token, on_token.

A local runtime produces token bytes (a multi-byte UTF-8 character may span tokens); a server
streams text pieces. Either way the first token fixes the time to first token, each piece of
text goes to ``on_token`` as soon as it is complete, and the decode time runs from the first
token to the last. Written once here so the backends report ``Usage`` the same way, which is
what admission control learns its rates from.
"""

from __future__ import annotations

import codecs
import time
from typing import Optional

from ..types import TokenCallback, Usage


class TokenStream:
    """Collects one generation's output and keeps its ``Usage`` timings and token count.

    :param usage: the generation's counters; ``time_to_first_token_s``, ``completion_tokens``
        and ``decode_s`` are filled in here.
    :param started: ``time.monotonic()`` when the generation started (TTFT counts from it).
    :param on_token: called with each complete piece of text, in order.
    """

    def __init__(self, usage: Usage, started: float,
                 on_token: Optional[TokenCallback] = None) -> None:
        self.usage = usage
        self.started = started
        self.on_token = on_token
        self._decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self._pieces: list[str] = []
        self._first_at = 0.0

    def first_token(self) -> None:
        """Mark the arrival of a token (only the first sets the time to first token).

        Called before a stop token is counted too: the time to first token is the time until
        the model's first decision, whatever it was.
        """
        if not self._first_at:
            self._first_at = time.monotonic()
            self.usage.time_to_first_token_s = self._first_at - self.started

    @property
    def started_decoding(self) -> bool:
        return bool(self._first_at)

    def add_bytes(self, data: bytes) -> None:
        """One generated token's bytes (counted as one completion token)."""
        self.first_token()
        self.usage.completion_tokens += 1
        self._emit(self._decoder.decode(data))

    def add_text(self, text: str, tokens: int = 1) -> None:
        """A piece of text standing for ``tokens`` generated tokens (a server's stream)."""
        self.first_token()
        self.usage.completion_tokens += tokens
        self._emit(text)

    def _emit(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            if self.on_token is not None:
                self.on_token(text)

    def finish(self) -> str:
        """The whole text (an incomplete trailing character as U+FFFD); sets ``decode_s``."""
        tail = self._decoder.decode(b'', final=True)
        if tail:
            self._pieces.append(tail)
        if self._first_at:
            self.usage.decode_s = time.monotonic() - self._first_at
        return ''.join(self._pieces)
