"""Service-time estimates for admission control, learned from the backend's own timings.

The scheduler must say "this cannot finish by its deadline" before running anything, so it
needs a model of how long a generation takes on *this* model and machine: a fixed overhead, a
prefill cost (a fixed part plus a cost per evaluated prompt token), a decode cost per generated
token, and how many tokens answers really have. The rates start from configured priors, are
replaced by the first real measurement (a warm-up at load) and then follow exponentially
weighted averages of every finished request's ``Usage``.

Prefill is fitted as ``fixed + per_token * n`` (weighted least squares over recent prompts of
different sizes): small batches cost more per token than large ones, so one ratio learned on
30-token prompts would overestimate a 1,000-token prompt by half. Until prompts of different
sizes were seen, the fixed part is 0 and the ratio of the recent prompts is used.

Prompt size is exact: the scheduler counts with ``Backend.count_new_tokens``, which renders the
prompt as the backend will and counts only the tokens evaluated after the reused prefix (or
the continued state of the last generation), the same number the backend reports as
``prompt_tokens - prompt_tokens_reused``. No calibration
ratio is needed between what admission counts and what the backend evaluates.

Answer lengths are kept as a window of recent complete answers, so the scheduler can ask for a
typical length (the queue ahead of a request), a likely upper length (the request's own answer,
which must fit before its deadline) and the expected rest of an answer already under way.

The rates lag when the machine's speed changes (another process takes the CPU, the GPU
clocks down). The estimator keeps how far each generation's real time was from its estimate
for the sizes it really had (:meth:`RateEstimator.slowdown`), so admission can plan with a
quantile of that error instead of assuming the averages are exact.
"""

from __future__ import annotations

import math
import threading
from collections import deque
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
    """The estimator's current model of the backend (all per-request figures in seconds).

    :param completion_tokens: mean length of recent complete answers (the prior until one).
    """

    overhead_s: float
    prefill_s_per_token: float
    decode_s_per_token: float
    completion_tokens: float
    measurements: int
    prefill_fixed_s: float = 0.0

    def prefill_s(self, tokens: int) -> float:
        """Predicted prefill time of ``tokens`` evaluated prompt tokens."""
        if tokens <= 0:
            return 0.0
        return self.prefill_fixed_s + tokens * self.prefill_s_per_token

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1.0 / self.prefill_s_per_token if self.prefill_s_per_token > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else math.inf


@dataclass(frozen=True)
class EstimatorConfig:
    """Priors used until the first measurement, and how measurements are averaged.

    :param completion_tokens: answer length assumed until a complete answer was seen.
    :param alpha: weight of a new measurement in the moving averages, in (0, 1].
    :param prefill_alpha: weight of a new prompt in the prefill fit (smaller: the fit must
        remember the rarer large prompts to tell the fixed cost from the per-token one).
    :param length_window: complete answers whose lengths are kept.
    """

    prefill_tokens_per_s: float = 500.0
    decode_tokens_per_s: float = 20.0
    overhead_s: float = 0.01
    completion_tokens: float = 32.0
    alpha: float = 0.2
    prefill_alpha: float = 0.05
    length_window: int = 64

    def __post_init__(self) -> None:
        for name in ('prefill_tokens_per_s', 'decode_tokens_per_s', 'completion_tokens'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f'{name} must be a finite number > 0, got {value}')
        if not (math.isfinite(self.overhead_s) and self.overhead_s >= 0):
            raise ValueError(f'overhead_s must be a finite number >= 0, got {self.overhead_s}')
        for name in ('alpha', 'prefill_alpha'):
            value = getattr(self, name)
            if not (0.0 < value <= 1.0):
                raise ValueError(f'{name} must be in (0, 1], got {value}')
        if self.length_window < 1:
            raise ValueError(f'length_window must be >= 1, got {self.length_window}')


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


class _PrefillFit:
    """``prefill_s = fixed + per_token * n`` by exponentially weighted least squares."""

    def __init__(self, per_token_prior: float, alpha: float) -> None:
        self._prior = per_token_prior
        self._keep = 1.0 - alpha
        self._sums = [0.0] * 5  # weight, n, y, n*n, n*y

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        keep = self._keep if self._sums[0] > 0 else 0.0
        sample = (1.0, tokens, seconds, tokens * tokens, tokens * seconds)
        self._sums = [keep * total + value
                      for total, value in zip(self._sums, sample, strict=True)]

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token)."""
        w, n, y, nn, ny = self._sums
        if w <= 0 or n <= 0:
            return 0.0, self._prior
        mean_n, mean_y = n / w, y / w
        var = nn / w - mean_n * mean_n
        if var > (0.25 * mean_n) ** 2:  # sizes differ enough to tell fixed from per-token
            slope = (ny / w - mean_n * mean_y) / var
            fixed = mean_y - slope * mean_n
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, y / n


class RateEstimator:
    """Learns overhead, prefill and decode costs and answer lengths. Thread-safe."""

    def __init__(self, config: Optional[EstimatorConfig] = None) -> None:
        cfg = config or EstimatorConfig()
        self._config = cfg
        self._lock = threading.Lock()
        self._overhead = _Ema(cfg.overhead_s, cfg.alpha)
        self._prefill = _PrefillFit(1.0 / cfg.prefill_tokens_per_s, cfg.prefill_alpha)
        self._decode = _Ema(1.0 / cfg.decode_tokens_per_s, cfg.alpha)
        self._lengths: deque[int] = deque(maxlen=cfg.length_window)
        self._errors: deque[float] = deque(maxlen=cfg.length_window)
        self._measurements = 0

    def rates(self) -> Rates:
        """Return a consistent snapshot of the current model."""
        with self._lock:
            fixed, per_token = self._prefill.coefficients()
            return Rates(self._overhead.value, per_token, self._decode.value,
                         self._mean_length_locked(), self._measurements, fixed)

    def observe(self, usage: Usage, wall_s: float, complete: bool = False) -> None:
        """Fold one finished generation into the averages.

        :param usage: the backend's counters for the generation.
        :param wall_s: wall time of the ``generate`` call as seen by the scheduler.
        :param complete: the answer ended by itself (not cut by a limit), so its length is a
            sample of how long answers are.
        """
        evaluated = usage.prompt_tokens - usage.prompt_tokens_reused
        if usage.completion_tokens > 0 and self._measurements > 0:
            predicted = self.estimate(evaluated, usage.completion_tokens).service_s
            if predicted > 0 and math.isfinite(wall_s):
                with self._lock:
                    self._errors.append(wall_s / predicted)
        with self._lock:
            self._measurements += 1
            if evaluated > 0 and usage.prefill_s > 0:
                self._prefill.add(evaluated, usage.prefill_s)
            if usage.completion_tokens >= 2 and usage.decode_s > 0:
                self._decode.add(usage.decode_s / (usage.completion_tokens - 1))
            if complete:
                self._lengths.append(max(1, usage.completion_tokens))
            self._overhead.add(max(0.0, wall_s - usage.prefill_s - usage.decode_s))

    def estimate(self, prompt_tokens: int, decode_tokens: float,
                 wait_s: float = 0.0) -> Estimate:
        """Predict the service time of a request of the given size.

        :param prompt_tokens: tokens the backend will evaluate (after the reused prefix).
        :param decode_tokens: tokens it will generate; the first comes with the prefill.
        """
        r = self.rates()
        return Estimate(
            wait_s=wait_s,
            overhead_s=r.overhead_s,
            prefill_s=r.prefill_s(prompt_tokens),
            decode_s=max(0.0, decode_tokens - 1) * r.decode_s_per_token,
            prompt_tokens=prompt_tokens,
            decode_tokens=math.ceil(decode_tokens),
        )

    def expected_tokens(self, max_tokens: int) -> float:
        """Mean length of an answer allowed ``max_tokens`` (for the queue ahead of a request)."""
        with self._lock:
            if not self._lengths:
                return float(max(1, min(max_tokens, math.ceil(self._config.completion_tokens))))
            return max(1.0, sum(min(n, max_tokens) for n in self._lengths) / len(self._lengths))

    def likely_tokens(self, max_tokens: int, quantile: float) -> int:
        """The ``quantile`` of answer lengths, at most ``max_tokens``.

        While fewer than ``_FEW`` answers were seen, the prior counts as one of them and the
        result is the largest, half again: a cold start plans long answers rather than
        promising on no evidence.
        """
        with self._lock:
            lengths = list(self._lengths)
        if len(lengths) < _FEW:
            likely = 1.5 * max([self._config.completion_tokens, *lengths])
        else:
            likely = _quantile(lengths, quantile)
        return max(1, min(max_tokens, math.ceil(likely)))

    def remaining_tokens(self, produced: int, max_tokens: int, quantile: float = 0.5) -> float:
        """Tokens still to come for an answer that has ``produced`` so far.

        The ``quantile`` of ``length - produced`` over the recent answers longer than
        ``produced`` (the prior while none was seen); one token when none was that long.
        """
        left = max(0, max_tokens - produced)
        with self._lock:
            longer = [min(n, max_tokens) - produced for n in self._lengths if n > produced]
            if not self._lengths:
                longer = [max(1.0, self._config.completion_tokens - produced)]
        if not longer:
            return float(min(1, left))
        return min(float(left), _quantile(longer, quantile))

    def slowdown(self, quantile: float) -> float:
        """The ``quantile`` of real over estimated service time of recent generations (>= 1).

        Measured for the sizes each generation really had, so it is the error of the rates
        alone (answer lengths have their own quantiles).
        """
        with self._lock:
            errors = list(self._errors)
        return max(1.0, _quantile(errors, quantile)) if errors else 1.0

    def decode_step_s(self) -> float:
        """Current estimate of one decode step."""
        with self._lock:
            return self._decode.value

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

    def _mean_length_locked(self) -> float:
        if not self._lengths:
            return self._config.completion_tokens
        return sum(self._lengths) / len(self._lengths)


#: Fewer complete answers than this and lengths are planned from the prior, generously.
_FEW = 4


def _quantile(values: list, quantile: float) -> float:
    """The smallest value with at least ``quantile`` of ``values`` at or below it."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))
    return float(ordered[index])


def _ms(seconds: float) -> str:
    return f'{seconds * 1000.0:.0f} ms'
