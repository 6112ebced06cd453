"""Start nemotron_node as a lifecycle node; with autostart it is configured and activated.

ros2 launch nemotron_ros nemotron.launch.py \
    model_path:=/models/NVIDIA-Nemotron3-Nano-4B-Q4_K_M.gguf
"""

import os

import launch.actions
import launch.events
import launch_ros.actions
import launch_ros.event_handlers
import launch_ros.events.lifecycle
import lifecycle_msgs.msg
from ament_index_python.packages import get_package_share_directory

import launch


def _transition(node, transition_id):
    return launch.actions.EmitEvent(event=launch_ros.events.lifecycle.ChangeState(
        lifecycle_node_matcher=launch.events.matches_action(node),
        transition_id=transition_id))


def generate_launch_description():
    share = get_package_share_directory('nemotron_ros')
    arguments = [
        launch.actions.DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'nemotron.yaml'),
            description='ROS parameters file for nemotron_node'),
        launch.actions.DeclareLaunchArgument(
            'model_path', default_value='',
            description="GGUF model file; '' keeps the params file's value"),
        launch.actions.DeclareLaunchArgument(
            'tools_file', default_value='',
            description="tool registry YAML; '' keeps the params file's value"),
        launch.actions.DeclareLaunchArgument(
            'namespace', default_value='',
            description='namespace of the node and its topics (one per robot)'),
        launch.actions.DeclareLaunchArgument(
            'use_sim_time', default_value='false', description='use /clock as time source'),
        launch.actions.DeclareLaunchArgument(
            'autostart', default_value='true',
            description='configure and activate the lifecycle node on start'),
        launch.actions.DeclareLaunchArgument(
            'log_level', default_value='info', description='logging level'),
    ]
    return launch.LaunchDescription(
        arguments + [launch.actions.OpaqueFunction(function=_node_and_transitions)])


def _node_and_transitions(context):
    """Build the node once the arguments are known: empty model/tools keep the file's values."""
    config = context.launch_configurations
    overrides = {'use_sim_time': config['use_sim_time'].lower() in ('true', '1')}
    for name in ('model_path', 'tools_file'):
        if config[name]:
            overrides[name] = config[name]
    node = launch_ros.actions.LifecycleNode(
        package='nemotron_ros', executable='nemotron_node', name='nemotron',
        namespace=config['namespace'], output='screen',
        parameters=[config['params_file'], overrides],
        arguments=['--ros-args', '--log-level', config['log_level']])
    if config['autostart'].lower() not in ('true', '1'):
        return [node]
    activate_when_configured = launch.actions.RegisterEventHandler(
        launch_ros.event_handlers.OnStateTransition(
            target_lifecycle_node=node, goal_state='inactive',
            entities=[_transition(node, lifecycle_msgs.msg.Transition.TRANSITION_ACTIVATE)]))
    configure = _transition(node, lifecycle_msgs.msg.Transition.TRANSITION_CONFIGURE)
    return [node, activate_when_configured,
            launch.actions.TimerAction(period=0.5, actions=[configure])]
