"""The node's ROS parameters, declared from the one settings table.

The engine's settings (:data:`~.engine.settings.ENGINE_SETTINGS`) and the node's own
(:data:`NODE_SETTINGS`: diagnostics and QoS) are each declared once, with their default, limits
and description. From that table this module declares every parameter with a descriptor
(shown by ``ros2 param describe``; rcl enforces its ranges and ``read_only``), validates later
sets with the same checks, and builds the :class:`~.engine.config.EngineConfig` that
``on_configure`` loads. Engine settings are applied at the next configure transition; node
settings are read once, when the node is constructed, and so are read only.
"""

from __future__ import annotations

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from .engine.config import EngineConfig
from .engine.settings import ENGINE_SETTINGS, Setting

_APPLIED = ' Applied at the next configure transition.'
_READ_ONLY = (' Read once when the node starts (read only): set it in the params file or with '
              '--ros-args -p.')

DIAGNOSTICS_PERIOD = Setting(
    'diagnostics_period_s', 1.0, 'Period of /diagnostics, in seconds.', 0.05, 3600.0,
    read_only=True)
QOS_REQUEST_DEPTH = Setting(
    'qos.request_depth', 1000, 'History depth (reliable, keep last) of the command and '
    'command_text subscriptions and of the plan and execute request queues: how many requests '
    'a burst may hold before the node takes them in. Publishers and clients should be reliable '
    'with a depth at least as large.', 1, 100000, read_only=True)
QOS_OBSERVATION_DEPTH = Setting(
    'qos.observation_depth', 100, 'History depth (best effort, keep last) of the observations '
    'subscription; the newest are kept when perception outpaces the node.', 1, 100000,
    read_only=True)

GC_FREEZE = Setting(
    'gc_freeze', True, "After a successful configure, collect garbage once and exempt every "
    "object alive then (the model, tokenizer, templates, rclpy's own) from Python's cyclic "
    'garbage collector (gc.freeze; undone at cleanup, shutdown and error). Collections during '
    'generation then scan only new objects: with SmolLM2 loaded, a full collection took 67 ms '
    'and a middle one 5 ms, and they ran between task steps. Process-wide: turn it off when '
    'the node shares its process with code that needs objects older than the configure '
    'collected.')

#: The node's own settings: read in the constructor, so read only.
NODE_SETTINGS: tuple[Setting, ...] = (DIAGNOSTICS_PERIOD, QOS_REQUEST_DEPTH,
                                      QOS_OBSERVATION_DEPTH)
#: The node's settings read at each configure (the engine does not see them).
NODE_CONFIGURE_SETTINGS: tuple[Setting, ...] = (GC_FREEZE,)
#: Every parameter of the node, in declaration order.
ALL_SETTINGS: tuple[Setting, ...] = ENGINE_SETTINGS + NODE_SETTINGS + NODE_CONFIGURE_SETTINGS
_BY_NAME = {setting.name: setting for setting in ALL_SETTINGS}


def descriptor(setting: Setting) -> ParameterDescriptor:
    """The ROS descriptor of ``setting``: description, limits and read_only."""
    result = ParameterDescriptor(
        description=setting.description + (_READ_ONLY if setting.read_only else _APPLIED),
        read_only=setting.read_only, additional_constraints=setting.constraints)
    if setting.low is None:
        return result
    if setting.type is int:
        result.integer_range = [IntegerRange(from_value=setting.low, to_value=setting.high,
                                             step=0)]
    else:
        result.floating_point_range = [FloatingPointRange(
            from_value=float(setting.low), to_value=float(setting.high), step=0.0)]
    return result


def declare(node: Node) -> None:
    """Declare every parameter with its default and descriptor, and validate later sets.

    :raises rclpy.exceptions.InvalidParameterValueException: an override (params file,
        ``-p``, ``parameter_overrides``) outside its range.
    """
    for setting in ALL_SETTINGS:
        node.declare_parameter(setting.name, setting.default, descriptor(setting))
    node.add_on_set_parameters_callback(validate)


def validate(parameters: list[Parameter]) -> SetParametersResult:
    """Refuse a value the table does not allow; the reason names the parameter.

    rcl itself refuses values outside a descriptor range and sets of read-only parameters;
    this adds the checks a descriptor cannot express (choices, patterns).
    """
    for parameter in parameters:
        setting = _BY_NAME.get(parameter.name)
        if setting is None:
            continue
        try:
            setting.check(parameter.value)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
    return SetParametersResult(successful=True)


def engine_config(node: Node) -> EngineConfig:
    """Read the engine parameters into an EngineConfig; ValueError names the bad parameter."""
    return EngineConfig.from_parameters(
        {setting.name: node.get_parameter(setting.name).value for setting in ENGINE_SETTINGS})


def qos_depths(node: Node) -> tuple[int, int]:
    """``(request_depth, observation_depth)``: the history depths of the request intakes
    (command, command_text, plan, execute) and of the observations subscription."""
    return (node.get_parameter(QOS_REQUEST_DEPTH.name).value,
            node.get_parameter(QOS_OBSERVATION_DEPTH.name).value)
