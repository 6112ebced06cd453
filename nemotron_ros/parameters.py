"""The node's ROS parameters: one table of names, defaults, descriptions and ranges.

Each parameter is declared with a descriptor (shown by ``ros2 param describe``); runtime sets
are validated by the same ranges; ``on_configure`` turns the values into one EngineConfig,
whose own checks name the parameter that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from .engine.config import BACKENDS, FLASH_ATTN, FP8_MODES, TOOL_CHOICES, EngineConfig


@dataclass(frozen=True)
class Spec:
    """One parameter: ROS name, engine field, description and optional limits."""

    name: str
    field: str
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple[str, ...] = ()


_APPLIED = ' Applied at the next configure transition.'

SPECS: tuple[Spec, ...] = (
    Spec('backend', 'backend', 'Model runtime: ' + ', '.join(BACKENDS) + '.' + _APPLIED,
         choices=BACKENDS),
    Spec('model_path', 'model_path', "GGUF file (llama_cpp) or checkpoint directory (torch); "
         "'' = the embedded SmolLM2-135M-Instruct." + _APPLIED),
    Spec('tools_file', 'tools_file', "Tool registry YAML; '' = config/tools.example.yaml."
         + _APPLIED),
    Spec('system_prompt', 'system_prompt', 'System prompt placed before the tools.' + _APPLIED),
    Spec('n_ctx', 'n_ctx', 'Context length in tokens.' + _APPLIED, 64, 1 << 20),
    Spec('n_threads', 'n_threads', 'CPU threads; 0 = CPU count - 1.' + _APPLIED, 0, 1024),
    Spec('n_gpu_layers', 'n_gpu_layers', 'Layers offloaded to the GPU; -1 = all.' + _APPLIED,
         -1, 100000),
    Spec('n_batch', 'n_batch', 'Prompt tokens per evaluation call (deadline checks between '
         'them on GPUs).' + _APPLIED, 1, 1 << 16),
    Spec('flash_attn', 'flash_attn', 'Flash attention: auto, on or off.' + _APPLIED,
         choices=FLASH_ATTN),
    Spec('prefix_cache', 'prefix_cache', 'Reuse the model state after system prompt + tools.'
         + _APPLIED),
    Spec('device', 'device', "torch backend: 'auto', 'cpu', 'cuda' or 'cuda:N'." + _APPLIED),
    Spec('fp8', 'fp8', 'torch backend, FP8 checkpoints: auto (FP8 matmuls on compute '
         'capability >= 8.9, else dequantized once), dequantize or scaled_mm.' + _APPLIED,
         choices=FP8_MODES),
    Spec('default_budget_ms', 'default_budget_ms', 'Latency budget of requests that give 0, '
         'in ms.' + _APPLIED, 1, 3_600_000),
    Spec('response_margin_ms', 'response_margin_ms', 'Time reserved for the answer to reach '
         'the caller: the scheduler works to a deadline this much earlier.' + _APPLIED, 0, 10000),
    Spec('queue_size', 'queue_size', 'Requests that may wait; more are answered '
         'REJECTED_BUSY.' + _APPLIED, 1, 1024),
    Spec('preemption', 'preemption', 'Service and action requests may preempt topic commands '
         'of lower priority.' + _APPLIED),
    Spec('enable_thinking', 'enable_thinking', 'Reasoning (<think>) for topic commands.'
         + _APPLIED),
    Spec('max_tokens', 'max_tokens', 'Cap on generated tokens per request.' + _APPLIED,
         1, 1 << 20),
    Spec('max_tool_calls', 'max_tool_calls', 'Most tool calls in one answer.' + _APPLIED, 1, 8),
    Spec('tool_choice', 'tool_choice', 'auto: a reply or tool calls; required: every answer '
         'is one or more tool calls (robots whose commands always map to actions).'
         + _APPLIED, choices=TOOL_CHOICES),
    Spec('max_input_chars', 'max_input_chars', 'Longest accepted request text; longer ones '
         'are INVALID_REQUEST.' + _APPLIED, 1, 1 << 24),
    Spec('temperature', 'temperature', 'Sampling temperature; 0 = greedy.' + _APPLIED, 0.0, 2.0),
    Spec('top_p', 'top_p', 'Nucleus sampling mass.' + _APPLIED, 0.01, 1.0),
    Spec('top_k', 'top_k', 'Top-k sampling; 0 = off.' + _APPLIED, 0, 100000),
    Spec('seed', 'seed', 'Sampling seed.' + _APPLIED, 0, 2**31 - 1),
    Spec('world_state.max_observations', 'world_state_max_observations',
         'Observations kept (newest per source and label).' + _APPLIED, 1, 10000),
    Spec('world_state.default_ttl_s', 'world_state_default_ttl_s',
         'Expiry of observations that give ttl_s 0, in seconds.' + _APPLIED, 0.001, 1e6),
    Spec('warm_up', 'warm_up', 'Measure prefill and decode speed at configure.' + _APPLIED),
)

DIAGNOSTICS_PERIOD = Spec('diagnostics_period_s', '', 'Period of /diagnostics, in seconds.',
                          0.05, 3600.0)


def _descriptor(spec: Spec, default: Any) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description)
    if spec.choices:
        descriptor.additional_constraints = 'one of: ' + ', '.join(spec.choices)
    if spec.low is None or isinstance(default, bool):
        return descriptor
    if isinstance(default, int):
        descriptor.integer_range = [IntegerRange(from_value=int(spec.low),
                                                 to_value=int(spec.high), step=0)]
    elif isinstance(default, float):
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.low),
                                                              to_value=float(spec.high),
                                                              step=0.0)]
    return descriptor


def declare(node: Node) -> None:
    """Declare every parameter with its default and descriptor, and validate later sets."""
    defaults = EngineConfig()
    for spec in SPECS:
        default = getattr(defaults, spec.field)
        node.declare_parameter(spec.name, default, _descriptor(spec, default))
    node.declare_parameter(DIAGNOSTICS_PERIOD.name, 1.0, _descriptor(DIAGNOSTICS_PERIOD, 1.0))
    node.add_on_set_parameters_callback(validate)


def validate(parameters: list[Parameter]) -> SetParametersResult:
    """Refuse values outside their choices (ranges are enforced by rcl from descriptors)."""
    by_name = {spec.name: spec for spec in SPECS}
    for parameter in parameters:
        spec = by_name.get(parameter.name)
        if spec is not None and spec.choices and parameter.value not in spec.choices:
            return SetParametersResult(
                successful=False,
                reason=f'{parameter.name} must be one of {", ".join(spec.choices)}; '
                       f'got {parameter.value!r}')
    return SetParametersResult(successful=True)


def engine_config(node: Node) -> EngineConfig:
    """Read the parameters into an EngineConfig; ValueError names the bad parameter."""
    return EngineConfig(**{spec.field: node.get_parameter(spec.name).value for spec in SPECS})
