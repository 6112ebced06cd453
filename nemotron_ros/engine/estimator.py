"""Service-time estimates for admission control, learned from the backend's own timings.

The scheduler must say "this cannot finish by its deadline" before running anything, so it
needs a model of how long a generation takes on *this* model and machine: a fixed overhead, a
prefill cost per prompt token and a decode cost per generated token. The rates start from
configured priors, are replaced by the first real measurement (a warm-up at load) and then
follow an exponential moving average of every finished request's ``Usage``.

Prompt size is measured by the scheduler with ``Backend.count_tokens`` on the message texts
only; the chat template, the tool definitions and the prefix cache change how many tokens are
really evaluated. Rather than guess those, the estimator learns the ratio of evaluated to
counted tokens, so its prefill estimate is calibrated against what it can observe.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

from .types import Usage


@dataclass(frozen=True)
class Estimate:
    """Predicted time to answer one request (seconds), with the figures behind it."""

    wait_s: float
    overhead_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_tokens: int

    @property
    def service_s(self) -> float:
        """Time from dispatch to answer."""
        return self.overhead_s + self.prefill_s + self.decode_s

    @property
    def total_s(self) -> float:
        """Time from now to answer: the queue wait plus the service time."""
        return self.wait_s + self.service_s

    def describe(self) -> str:
        """Describe the estimate in one line, for status messages."""
        return (f'estimate {_ms(self.total_s)} = wait {_ms(self.wait_s)}'
                f' + overhead {_ms(self.overhead_s)}'
                f' + prefill {_ms(self.prefill_s)} ({self.prompt_tokens} tok)'
                f' + decode {_ms(self.decode_s)} ({self.decode_tokens} tok)')


@dataclass(frozen=True)
class Rates:
    """The estimator's current model of the backend (all per-request figures in seconds)."""

    overhead_s: float
    prefill_s_per_token: float
    decode_s_per_token: float
    evaluated_per_counted: float
    completion_tokens: float
    measurements: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1.0 / self.prefill_s_per_token if self.prefill_s_per_token > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else math.inf


@dataclass(frozen=True)
class EstimatorConfig:
    """Priors used until the first measurement, and the moving-average weight.

    :param alpha: weight of a new measurement in the moving averages, in (0, 1].
    """

    prefill_tokens_per_s: float = 500.0
    decode_tokens_per_s: float = 20.0
    overhead_s: float = 0.01
    completion_tokens: float = 32.0
    alpha: float = 0.2

    def __post_init__(self) -> None:
        for name in ('prefill_tokens_per_s', 'decode_tokens_per_s', 'completion_tokens'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f'{name} must be a finite number > 0, got {value}')
        if not (math.isfinite(self.overhead_s) and self.overhead_s >= 0):
            raise ValueError(f'overhead_s must be a finite number >= 0, got {self.overhead_s}')
        if not (0.0 < self.alpha <= 1.0):
            raise ValueError(f'alpha must be in (0, 1], got {self.alpha}')


class _Ema:
    """A moving average whose first sample replaces the prior."""

    def __init__(self, prior: float, alpha: float) -> None:
        self.value = prior
        self._alpha = alpha
        self._seeded = False

    def add(self, sample: float) -> None:
        if not math.isfinite(sample) or sample < 0:
            return
        if self._seeded:
            self.value += self._alpha * (sample - self.value)
        else:
            self.value = sample
            self._seeded = True


class RateEstimator:
    """Learns overhead, prefill and decode costs from finished generations. Thread-safe."""

    def __init__(self, config: Optional[EstimatorConfig] = None) -> None:
        cfg = config or EstimatorConfig()
        self._lock = threading.Lock()
        self._overhead = _Ema(cfg.overhead_s, cfg.alpha)
        self._prefill = _Ema(1.0 / cfg.prefill_tokens_per_s, cfg.alpha)
        self._decode = _Ema(1.0 / cfg.decode_tokens_per_s, cfg.alpha)
        self._ratio = _Ema(1.0, cfg.alpha)
        self._completion = _Ema(cfg.completion_tokens, cfg.alpha)
        self._measurements = 0

    def rates(self) -> Rates:
        """Return a consistent snapshot of the current model."""
        with self._lock:
            return Rates(self._overhead.value, self._prefill.value, self._decode.value,
                         self._ratio.value, self._completion.value, self._measurements)

    def observe(self, usage: Usage, counted_prompt_tokens: int, wall_s: float) -> None:
        """Fold one finished generation into the averages.

        :param usage: the backend's counters for the generation.
        :param counted_prompt_tokens: the scheduler's own count for the same prompt.
        :param wall_s: wall time of the ``generate`` call as seen by the scheduler.
        """
        evaluated = usage.prompt_tokens - usage.prompt_tokens_reused
        with self._lock:
            self._measurements += 1
            if evaluated > 0 and usage.prefill_s > 0:
                self._prefill.add(usage.prefill_s / evaluated)
            if counted_prompt_tokens > 0 and usage.prompt_tokens > 0:
                self._ratio.add(max(evaluated, 0) / counted_prompt_tokens)
            if usage.completion_tokens >= 2 and usage.decode_s > 0:
                self._decode.add(usage.decode_s / (usage.completion_tokens - 1))
            if usage.completion_tokens > 0:
                self._completion.add(float(usage.completion_tokens))
            self._overhead.add(max(0.0, wall_s - usage.prefill_s - usage.decode_s))

    def estimate(self, prompt_tokens: int, decode_tokens: int, wait_s: float = 0.0) -> Estimate:
        """Predict the service time of a request of the given size."""
        r = self.rates()
        return Estimate(
            wait_s=wait_s,
            overhead_s=r.overhead_s,
            prefill_s=prompt_tokens * r.evaluated_per_counted * r.prefill_s_per_token,
            decode_s=max(0, decode_tokens - 1) * r.decode_s_per_token,
            prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens,
        )

    def expected_tokens(self, max_tokens: int) -> int:
        """Typical answer length for a request allowed ``max_tokens`` (for queue waits)."""
        r = self.rates()
        return max(1, min(max_tokens, math.ceil(r.completion_tokens)))

    def tokens_within(self, seconds: float, prompt_tokens: int) -> int:
        """How many tokens can be generated in ``seconds``, prefill and overhead included.

        The first token comes with the prefill (its cost is in the overhead); each further one
        costs one decode step.
        """
        base = self.estimate(prompt_tokens, 1)
        r = self.rates()
        left = seconds - base.service_s
        if left < 0:
            return 0
        if r.decode_s_per_token <= 0:
            return 2 ** 31 - 1
        return 1 + int(left / r.decode_s_per_token)


def _ms(seconds: float) -> str:
    return f'{seconds * 1000.0:.0f} ms'
