"""Token sampling on logits tensors, in the order llama.cpp's sampler chain applies it.

Why its own module: the torch backend drives its decode loop itself (to check deadlines and
cancels between tokens and to stream text), so it cannot use ``generate()``'s logits
processors; and keeping the llama.cpp order (grammar, repeat penalty, top-k, top-p, min-p,
temperature, draw) makes the two backends sample alike for the same :class:`SamplingParams`.
Each request gets its own seeded generator, so a seed reproduces a run on the same device.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from ...types import SamplingParams

PENALTY_WINDOW = 64
"""Generated tokens the repeat penalty looks back on (llama.cpp's default ``penalty_last_n``)."""


class Sampler:
    """One request's sampler; :meth:`sample` picks a token, :meth:`accept` records it."""

    def __init__(self, params: SamplingParams, device: torch.device,
                 banned: Iterable[int] = ()) -> None:
        self.params = params
        self._banned = torch.tensor(sorted(set(banned)), dtype=torch.long, device=device)
        self._recent: collections.deque[int] = collections.deque(maxlen=PENALTY_WINDOW)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from 1-D float ``logits`` (already grammar-masked; modified here)."""
        p = self.params
        if self._banned.numel():
            logits.index_fill_(0, self._banned, float('-inf'))
        if p.repeat_penalty != 1.0 and self._recent:
            ids = torch.tensor(sorted(set(self._recent)), dtype=torch.long, device=logits.device)
            picked = logits.index_select(0, ids)
            logits.index_copy_(0, ids, torch.where(picked > 0, picked / p.repeat_penalty,
                                                   picked * p.repeat_penalty))
        if p.temperature <= 0.0:
            return int(torch.argmax(logits))
        if p.top_k > 0 and p.top_k < logits.numel():
            threshold = torch.topk(logits, p.top_k).values[-1]
            logits.masked_fill_(logits < threshold, float('-inf'))
        if p.top_p < 1.0:
            _top_p(logits, p.top_p)
        if p.min_p > 0.0:
            probs = torch.softmax(logits, dim=-1)
            logits.masked_fill_(probs < p.min_p * probs.max(), float('-inf'))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def accept(self, token: int) -> None:
        """Record a generated token for the repeat penalty."""
        self._recent.append(token)


def _top_p(logits: torch.Tensor, top_p: float) -> None:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
    before = torch.cumsum(probs, dim=-1) - probs
    drop = before >= top_p
    drop[0] = False
    logits[order[drop]] = float('-inf')
