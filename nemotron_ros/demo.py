"""The README's demo: start nemotron_node, feed it perception and commands, call `plan`.

It runs the installed node executable as its own process (as `ros2 run` would), drives its
lifecycle through the standard lifecycle services, and prints every Action and ToolCall it
gets back, with timings, for a person to read. Then it runs one multi-step task against a small
executor in this process (it answers every call on ``tool_results``) and approves one
confirmation-gated call through the ``confirm`` service.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import rclpy
from ament_index_python.packages import get_package_prefix
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from .msg import Action, Command, Observation, ToolCall, ToolResult
from .node import COMMAND_QOS
from .srv import Confirm, Plan

STATUS_NAMES = {getattr(Action, n): n[len('STATUS_'):] for n in dir(Action)
                if n.startswith('STATUS_')}

OBSERVATIONS = (
    ('battery_monitor', 'battery', 1.0, '{"percent": 73, "charging": false}', None),
    ('camera_front', 'red_cup', 0.91, '{"on": "table"}', (1.2, -0.4, 0.8)),
    ('camera_front', 'person', 0.84, '{"near": "entrance"}', (3.5, 1.0, 0.0)),
)
COMMANDS = ('Go to the kitchen', 'Say hello to everyone', 'How much battery is left?')
TASK = ('task-0', 'Go to the kitchen, pick up the red cup and bring it to the table', 3)
#: The held call: move_base has ``requires_confirmation: true`` in the example tools.
GATED_GOAL = 'Nudge the robot forward slowly for two seconds'

#: What the demo's executor answers per tool (from the call's arguments).
RESULTS: dict[str, Callable[[dict], dict]] = {
    'navigate_to': lambda a: {'reached': True, 'at': a.get('target', 'goal')},
    'pick': lambda a: {'grasped': True, 'object': a.get('object_name', '')},
    'place': lambda a: {'placed': True, 'location': a.get('location', '')},
    'say': lambda a: {'spoken': True},
    'get_battery': lambda a: {'percent': 73, 'charging': False},
    'move_base': lambda a: {'moved_m': round(float(a.get('linear', 0.0))
                                             * float(a.get('duration', 0.0)), 2)},
}


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
        held = ' (held: needs confirmation)' if call.requires_confirmation else ''
        lines.append(f'     tool call {call.id} {call.name} {call.arguments_json}{held}')
    if action.text:
        lines.append(f'     says: {action.text}')
    return '\n'.join(lines)


class DemoClient(Node):
    """Plays the rest of the robot: perception publisher, commander and planner."""

    def __init__(self, node_name: str) -> None:
        super().__init__(f'nemotron_demo_{uuid.uuid4().hex[:6]}')
        #: The final Action of each request (a task's step Actions are printed as they come).
        self.answers: dict[str, Action] = {}
        self.tasks: set[str] = set()
        self._shown: set[str] = set()  # calls of tasks whose step Action was printed
        self._later: dict[str, list[str]] = {}  # executor lines waiting for their step
        self.create_subscription(Action, 'actions', self._on_action, COMMAND_QOS)
        self.commands = self.create_publisher(Command, 'command', COMMAND_QOS)
        self.observations = self.create_publisher(Observation, 'observations', 10)
        self.plan_client = self.create_client(Plan, 'plan')
        self.confirm_client = self.create_client(Confirm, 'confirm')
        self.lifecycle = self.create_client(ChangeState, f'/{node_name}/change_state')

    def _on_action(self, msg: Action) -> None:
        if msg.request_id in self.tasks:
            print(f'  [step {msg.step}{", final" if msg.final else ""}]')
            print(describe(msg))
            for call in msg.tool_calls:
                self._shown.add(_key(call))
                for line in self._later.pop(_key(call), []):
                    print(line)
        if msg.final:
            self.answers[msg.request_id] = msg

    def report(self, call: ToolCall, line: str) -> None:
        """Print an executor's line; for a task's call, under its step's Action.

        A step's Action and its calls come on different topics, in either order.
        """
        if call.request_id in self.tasks and _key(call) not in self._shown:
            self._later.setdefault(_key(call), []).append(line)
        else:
            print(line)


class DemoExecutor(Node):
    """A stand-in for the robot's skills: runs every call on ``tool_calls`` at once.

    It answers each call with a plausible ToolResult on ``tool_results`` (success and a small
    JSON payload per tool) and records the held calls shown on ``confirmations_pending``.
    """

    def __init__(self, report: Callable[[ToolCall, str], None]) -> None:
        super().__init__(f'nemotron_demo_executor_{uuid.uuid4().hex[:6]}')
        self._report = report
        self.calls: dict[str, ToolCall] = {}
        self.pending: dict[str, ToolCall] = {}
        self.results = self.create_publisher(ToolResult, 'tool_results', COMMAND_QOS)
        self._inputs = [
            self.create_subscription(ToolCall, 'tool_calls', self._on_call, COMMAND_QOS),
            self.create_subscription(ToolCall, 'confirmations_pending', self._on_pending,
                                     COMMAND_QOS)]

    def connected(self) -> bool:
        """The node hears our results and we hear its calls and held calls."""
        return self.results.get_subscription_count() > 0 and all(
            s.get_publisher_count() > 0 for s in self._inputs)

    def _on_call(self, call: ToolCall) -> None:
        self.calls[_key(call)] = call
        success, content = _execute(call)
        self.results.publish(ToolResult(request_id=call.request_id, call_id=call.id,
                                        name=call.name, success=success,
                                        content_json=json.dumps(content)))
        self._report(call, f'  [executor] {call.id} {call.name} {call.arguments_json} -> '
                     f'{"ok" if success else "failed"} {json.dumps(content)} on tool_results')

    def _on_pending(self, call: ToolCall) -> None:
        self.pending[_key(call)] = call
        print(f'  [confirmations_pending] {call.id} {call.name} {call.arguments_json} '
              f'(request {call.request_id})')


def _key(call: ToolCall) -> str:
    return f'{call.request_id}/{call.id}'


def _execute(call: ToolCall) -> tuple[bool, dict[str, Any]]:
    """The executor's pretend work: a plausible result for the call (unknown tools: done)."""
    try:
        arguments = json.loads(call.arguments_json or '{}')
        return True, RESULTS.get(call.name, lambda _a: {'done': True})(arguments)
    except (ValueError, TypeError, AttributeError) as exc:
        return False, {'error': f'{type(exc).__name__}: {exc}'}


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


def _plan(executor, client: DemoClient, goal: str, budget_ms: int, tools: list[str],
          max_tokens: int = 64) -> Optional[Action]:
    print(f'\n[plan] "{goal}" with a {budget_ms} ms budget, tools {tools}')
    future = client.plan_client.call_async(Plan.Request(
        goal=goal, latency_budget_ms=budget_ms, allowed_tools=tools, max_tokens=max_tokens))
    if _wait(executor, future.done, budget_ms / 1000.0 + 30.0):
        print(describe(future.result().action))
        return future.result().action
    print('  -> no answer (node not responding)')
    return None


def _task(executor, client: DemoClient, skills: DemoExecutor, timeout: float) -> None:
    """A command that may take several steps; the executor feeds each step's results back."""
    request_id, text, max_steps = TASK
    print(f'\n[task {request_id}] "{text}" (max_steps {max_steps}; an executor in this '
          f'process answers every call on tool_results; step times count from the '
          f'task\'s arrival)')
    client.tasks.add(request_id)
    client.commands.publish(Command(id=request_id, text=text, max_steps=max_steps,
                                    latency_budget_ms=60000))
    if not _wait(executor, lambda: request_id in client.answers, timeout):
        print('  -> no final answer (node not responding)')
        return
    final = client.answers[request_id]
    # A command's final calls go out too (after its final Action): let them arrive.
    _wait(executor, lambda: all(f'{request_id}/{c.id}' in skills.calls
                                for c in final.tool_calls if not c.requires_confirmation), 5.0)
    print(f'  [task {request_id}] ended {STATUS_NAMES.get(final.status, final.status)} after '
          f'{final.step + 1} steps, {final.total_ms:.0f} ms')


def _confirmation(executor, client: DemoClient, skills: DemoExecutor) -> None:
    """A call to a tool that needs confirmation is held until the demo approves it."""
    # A move_base call has three arguments: about 70 tokens in SmolLM2's call format.
    action = _plan(executor, client, GATED_GOAL, 30000, ['move_base'], max_tokens=96)
    held = [c for c in (action.tool_calls if action is not None else ())
            if c.requires_confirmation]
    if not held:
        print('  [confirm] no held call in the answer: nothing to approve')
        return
    call = held[0]
    key = _key(call)
    if not _wait(executor, lambda: key in skills.pending, 10.0):
        print(f'  [confirm] {call.id} never showed on confirmations_pending')
        return
    print(f'  [confirm] on tool_calls before approval: {"yes" if key in skills.calls else "no"}; '
          f'approving {call.id} through the confirm service')
    future = client.confirm_client.call_async(Confirm.Request(
        request_id=call.request_id, call_id=call.id, approve=True,
        reason='operator checked that the path is clear'))
    if not _wait(executor, future.done, 10.0):
        print('  [confirm] no answer from the confirm service')
        return
    reply = future.result()
    print(f'  [confirm] accepted: {reply.accepted} {reply.message}')
    if reply.accepted and not _wait(executor, lambda: key in skills.calls, 10.0):
        print(f'  [confirm] {call.id} did not arrive on tool_calls')


def run_demo(model_path: str, tools_file: str, threads: int, timeout: float) -> int:
    """Start the node process, exercise every interface, print the answers."""
    node_name = f'nemotron_demo_node_{uuid.uuid4().hex[:4]}'
    executable = Path(get_package_prefix('nemotron_ros')) / 'lib' / 'nemotron_ros' / (
        'nemotron_node')
    overrides = {'model_path': model_path, 'tools_file': tools_file, 'n_threads': threads,
                 'temperature': 0.0, 'default_budget_ms': 20000, 'max_tokens': 96,
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
    skills: Optional[DemoExecutor] = None
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
        # The executor starts only now: nobody answers the one-shot commands' calls above.
        skills = DemoExecutor(client.report)
        executor.add_node(skills)
        _wait(executor, skills.connected, 10.0)
        _task(executor, client, skills, timeout)
        _confirmation(executor, client, skills)
        return 0
    finally:
        executor.shutdown()
        if skills is not None:
            skills.destroy_node()
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
