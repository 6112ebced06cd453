"""Start nemotron_node as a lifecycle node; with autostart it is configured, then activated.

Usage::

    ros2 launch nemotron_ros nemotron.launch.py \\
        model_path:=/models/NVIDIA-Nemotron3-Nano-4B-Q4_K_M.gguf
    ros2 launch nemotron_ros nemotron.launch.py \\
        params_file:=$(ros2 pkg prefix --share nemotron_ros)/config/jetson_orin_nano.yaml

``ros2 launch nemotron_ros nemotron.launch.py --show-args`` lists the arguments. An empty
``model_path`` or ``tools_file`` keeps the params file's value; ``use_sim_time`` always
overrides it. With ``autostart:=false`` the node waits unconfigured for
``ros2 lifecycle set /nemotron configure``.

Autostart activates the node once, when its first configure transition succeeds: a later
``deactivate`` by an operator is not undone. A failed configure (missing or corrupt model, bad
tool file) leaves the node unconfigured, and the node's log says why.

Arguments are checked before the node starts, and a bad one fails the whole launch with a line
naming it: ``autostart`` or ``use_sim_time`` that is not a boolean, a ``params_file`` that does
not exist (launch_ros would only warn and start the node on its built-in defaults), or a
non-empty ``tools_file`` that does not exist.
"""

import os
from collections.abc import Mapping

import launch
import launch.actions
import launch.events
import launch_ros.actions
import launch_ros.event_handlers
import launch_ros.events.lifecycle
import lifecycle_msgs.msg
from ament_index_python.packages import get_package_share_directory

PACKAGE = 'nemotron_ros'
EXECUTABLE = 'nemotron_node'
NODE_NAME = 'nemotron'
#: Launch arguments that fall back to the params file's value when left empty.
FILE_OVERRIDES = ('model_path', 'tools_file')
_TRUE = ('true', '1')
_FALSE = ('false', '0')


def generate_launch_description() -> launch.LaunchDescription:
    """Declare the arguments; the node is built once their values are known."""
    share = get_package_share_directory(PACKAGE)
    return launch.LaunchDescription([
        launch.actions.DeclareLaunchArgument(
            'model_path', default_value='',
            description="GGUF model file; '' keeps the params file's model_path"),
        launch.actions.DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'nemotron.yaml'),
            description='ROS parameters file of nemotron_node (one per model and board)'),
        launch.actions.DeclareLaunchArgument(
            'tools_file', default_value='',
            description="tool registry YAML; '' keeps the params file's tools_file"),
        launch.actions.DeclareLaunchArgument(
            'namespace', default_value='',
            description='namespace of the node and its topics (one per robot)'),
        launch.actions.DeclareLaunchArgument(
            'use_sim_time', default_value='false',
            description='true: use /clock as the time source (overrides the params file)'),
        launch.actions.DeclareLaunchArgument(
            'autostart', default_value='true',
            description='true: configure, then activate the lifecycle node on start'),
        launch.actions.DeclareLaunchArgument(
            'log_level', default_value='info',
            description='log level of the node: debug, info, warn, error or fatal'),
        launch.actions.OpaqueFunction(function=node_and_transitions),
    ])


def node_and_transitions(context: launch.LaunchContext) -> list[launch.Action]:
    """Build the lifecycle node and, with autostart, the configure/activate sequence.

    :param context: the launch context holding the arguments' values
    :raises ValueError: an argument :func:`check_arguments` refuses
    """
    config = context.launch_configurations
    check_arguments(config)
    overrides: dict[str, bool | str] = {'use_sim_time': _flag(config, 'use_sim_time')}
    for name in FILE_OVERRIDES:
        if config[name]:
            overrides[name] = config[name]
    node = launch_ros.actions.LifecycleNode(
        package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME,
        namespace=config['namespace'], output='screen',
        parameters=[config['params_file'], overrides],
        ros_arguments=['--log-level', config['log_level']])
    if not _flag(config, 'autostart'):
        return [node]
    # start_state 'configuring' matches the end of a configure transition only, so an
    # operator's later deactivate (also ending in 'inactive') is not undone.
    activate_when_configured = launch.actions.RegisterEventHandler(
        launch_ros.event_handlers.OnStateTransition(
            target_lifecycle_node=node, start_state='configuring', goal_state='inactive',
            entities=[_change_state(node, lifecycle_msgs.msg.Transition.TRANSITION_ACTIVATE)],
            handle_once=True))
    # The ChangeState handler waits for the node's change_state service: no delay needed.
    configure = _change_state(node, lifecycle_msgs.msg.Transition.TRANSITION_CONFIGURE)
    return [activate_when_configured, node, configure]


def _change_state(node: launch_ros.actions.LifecycleNode,
                  transition_id: int) -> launch.actions.EmitEvent:
    """An event asking ``node`` to take the lifecycle transition ``transition_id``."""
    return launch.actions.EmitEvent(event=launch_ros.events.lifecycle.ChangeState(
        lifecycle_node_matcher=launch.events.matches_action(node),
        transition_id=transition_id))


def check_arguments(config: Mapping[str, str]) -> None:
    """Refuse the launch when an argument is wrong, before anything starts.

    :raises ValueError: naming the argument: a flag that is not a boolean, a missing
        ``params_file``, or a non-empty ``tools_file`` that does not exist
    """
    for name in ('use_sim_time', 'autostart'):
        _flag(config, name)
    _existing_file(config, 'params_file')
    if config['tools_file']:
        _existing_file(config, 'tools_file')


def _existing_file(config: Mapping[str, str], name: str) -> str:
    """The launch argument ``name``, which must name an existing file."""
    path = config[name]
    if not os.path.isfile(path):
        problem = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise ValueError(f'launch argument {name}: {path!r} {problem}; give the path of an '
                         'existing file')
    return path


def _flag(config: Mapping[str, str], name: str) -> bool:
    """The boolean launch argument ``name``; ValueError names it and the accepted values."""
    value = config[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"launch argument {name} must be 'true' or 'false', got {config[name]!r}")
