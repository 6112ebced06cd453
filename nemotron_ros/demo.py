"""The README's demo: start nemotron_node, feed it perception and commands, call `plan`.

It runs the installed node executable as its own process (as `ros2 run` would), drives its
lifecycle through the standard lifecycle services, and prints every Action and ToolCall it
gets back, with timings, for a person to read.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import rclpy
from ament_index_python.packages import get_package_prefix
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from .msg import Action, Command, Observation
from .node import COMMAND_QOS
from .srv import Plan

STATUS_NAMES = {getattr(Action, n): n[len('STATUS_'):] for n in dir(Action)
                if n.startswith('STATUS_')}

OBSERVATIONS = (
    ('battery_monitor', 'battery', 1.0, '{"percent": 73, "charging": false}', None),
    ('camera_front', 'red_cup', 0.91, '{"on": "table"}', (1.2, -0.4, 0.8)),
    ('camera_front', 'person', 0.84, '{"near": "entrance"}', (3.5, 1.0, 0.0)),
)
COMMANDS = ('Go to the kitchen', 'Say hello to everyone', 'How much battery is left?')


def describe(action: Action) -> str:
    """A readable multi-line account of one Action."""
    status = STATUS_NAMES.get(action.status, str(action.status))
    lines = [f'  -> {status} in {action.total_ms:.0f} ms (queue {action.queue_ms:.0f} ms, '
             f'first token {action.time_to_first_token_ms:.0f} ms, '
             f'{action.prompt_tokens} prompt tokens ({action.prompt_tokens_reused} reused), '
             f'{action.completion_tokens} generated, {action.tokens_per_second:.0f} tok/s)']
    if action.status_message:
        lines.append(f'     {action.status_message}')
    for call in action.tool_calls:
        lines.append(f'     tool call {call.name} {call.arguments_json}')
    if action.text:
        lines.append(f'     says: {action.text}')
    return '\n'.join(lines)


class DemoClient(Node):
    """Plays the rest of the robot: perception publisher, commander and planner."""

    def __init__(self, node_name: str) -> None:
        super().__init__(f'nemotron_demo_{uuid.uuid4().hex[:6]}')
        self.answers: dict[str, Action] = {}
        self.create_subscription(Action, 'actions', self._on_action, COMMAND_QOS)
        self.commands = self.create_publisher(Command, 'command', COMMAND_QOS)
        self.observations = self.create_publisher(Observation, 'observations', 10)
        self.plan_client = self.create_client(Plan, 'plan')
        self.lifecycle = self.create_client(ChangeState, f'/{node_name}/change_state')

    def _on_action(self, msg: Action) -> None:
        self.answers[msg.request_id] = msg


def _wait(executor: SingleThreadedExecutor, done, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done():
            return True
        executor.spin_once(timeout_sec=0.05)
    return done()


def _transition(executor, client: DemoClient, transition: int, timeout: float) -> bool:
    future = client.lifecycle.call_async(ChangeState.Request(
        transition=Transition(id=transition)))
    return _wait(executor, future.done, timeout) and future.result().success


def _publish_observations(client: DemoClient) -> None:
    for source, label, confidence, attributes, position in OBSERVATIONS:
        msg = Observation(source=source, label=label, confidence=confidence,
                          attributes_json=attributes, ttl_s=30.0)
        msg.header.stamp = client.get_clock().now().to_msg()
        if position is not None:
            msg.has_pose = True
            msg.header.frame_id = 'map'
            msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = position
            msg.pose.orientation.w = 1.0
        client.observations.publish(msg)
        print(f'[observation] {source}: {label} ({confidence:.2f}) {attributes}')


def _plan(executor, client: DemoClient, goal: str, budget_ms: int, tools: list[str]) -> None:
    print(f'\n[plan] "{goal}" with a {budget_ms} ms budget, tools {tools}')
    future = client.plan_client.call_async(Plan.Request(
        goal=goal, latency_budget_ms=budget_ms, allowed_tools=tools, max_tokens=64))
    if _wait(executor, future.done, budget_ms / 1000.0 + 30.0):
        print(describe(future.result().action))
    else:
        print('  -> no answer (node not responding)')


def run_demo(model_path: str, tools_file: str, threads: int, timeout: float) -> int:
    """Start the node process, exercise every interface, print the answers."""
    node_name = f'nemotron_demo_node_{uuid.uuid4().hex[:4]}'
    executable = Path(get_package_prefix('nemotron_ros')) / 'lib' / 'nemotron_ros' / (
        'nemotron_node')
    overrides = {'model_path': model_path, 'tools_file': tools_file, 'n_threads': threads,
                 'temperature': 0.0, 'default_budget_ms': 20000, 'max_tokens': 64,
                 'tool_choice': 'required', 'max_tool_calls': 1}
    command = [sys.executable, str(executable), '--ros-args', '-r', f'__node:={node_name}']
    for name, value in overrides.items():
        if value != '':
            command += ['-p', f'{name}:={value}']
    print(f'[demo] starting {executable.name} as /{node_name}')
    process = subprocess.Popen(command, env=dict(os.environ))
    rclpy.init()
    client = DemoClient(node_name)
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    try:
        if not _wait(executor, client.lifecycle.service_is_ready, timeout):
            print('[demo] the node did not come up', file=sys.stderr)
            return 1
        print('[demo] configure (loads the model and the tools, measures its speed) ...')
        started = time.monotonic()
        if not _transition(executor, client, Transition.TRANSITION_CONFIGURE, timeout):
            print('[demo] configure failed: see the node log above', file=sys.stderr)
            return 1
        print(f'[demo] configured in {time.monotonic() - started:.1f} s; activate')
        _transition(executor, client, Transition.TRANSITION_ACTIVATE, timeout)
        _wait(executor, lambda: client.commands.get_subscription_count() > 0, 10.0)
        _publish_observations(client)
        for index, text in enumerate(COMMANDS):
            request_id = f'cmd-{index}'
            print(f'\n[command {request_id}] "{text}"')
            client.commands.publish(Command(id=request_id, text=text, latency_budget_ms=20000))
            if _wait(executor, lambda rid=request_id: rid in client.answers, timeout):
                print(describe(client.answers[request_id]))
        _plan(executor, client, 'Bring me the red cup', 15000, ['navigate_to', 'pick', 'say'])
        _plan(executor, client, 'Go to the kitchen', 5, ['navigate_to'])
        return 0
    finally:
        executor.shutdown()
        client.destroy_node()
        rclpy.try_shutdown()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='', help="GGUF model; '' = embedded SmolLM2-135M")
    parser.add_argument('--tools', default='', help="tool registry YAML; '' = the example")
    parser.add_argument('--threads', type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument('--timeout', type=float, default=120.0,
                        help='seconds to wait for start-up and each answer')
    args = parser.parse_args(argv)
    return run_demo(args.model, args.tools, args.threads, args.timeout)


if __name__ == '__main__':
    sys.exit(main())
