"""The package's public interfaces through real DDS: topics, the Plan service, the Execute action.

These use test-local servers so they check the generated interfaces and the install layout
alone; the node's own behaviour is tested elsewhere.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import spin_until, wait_for

rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

from action_msgs.msg import GoalStatus  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402

from nemotron_ros.action import Execute  # noqa: E402
from nemotron_ros.msg import Action, Command, Observation, ToolCall, ToolResult  # noqa: E402
from nemotron_ros.srv import Plan  # noqa: E402

pytestmark = pytest.mark.ros


def _action_with_calls(request_id: str) -> Action:
    msg = Action()
    msg.request_id = request_id
    msg.status = Action.STATUS_OK
    msg.text = ''
    msg.tool_calls = [
        ToolCall(id='call_0', name='navigate_to', arguments_json='{"target":"kitchen"}'),
        ToolCall(id='call_1', name='say', arguments_json='{"text":"on my way"}'),
    ]
    msg.queue_ms = 1.5
    msg.time_to_first_token_ms = 42.0
    msg.total_ms = 120.25
    msg.prompt_tokens = 310
    msg.prompt_tokens_reused = 290
    msg.completion_tokens = 24
    msg.tokens_per_second = 55.5
    return msg


def test_action_with_tool_calls_round_trips_over_dds(ros) -> None:
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    listener = ros.node('actions_listener')
    received: list[Action] = []
    listener.create_subscription(Action, 'actions', received.append, qos)
    talker = ros.node('actions_talker')
    pub = talker.create_publisher(Action, 'actions', qos)
    assert wait_for(lambda: pub.get_subscription_count() > 0), 'no DDS match on loopback'

    sent = _action_with_calls('req-1')
    pub.publish(sent)
    assert wait_for(lambda: len(received) == 1)
    got = received[0]
    assert got.request_id == 'req-1'
    assert got.status == Action.STATUS_OK
    assert [(c.id, c.name, c.arguments_json) for c in got.tool_calls] == [
        ('call_0', 'navigate_to', '{"target":"kitchen"}'),
        ('call_1', 'say', '{"text":"on my way"}'),
    ]
    assert got.prompt_tokens == 310 and got.prompt_tokens_reused == 290
    assert got.completion_tokens == 24
    assert got.total_ms == pytest.approx(120.25)
    assert got.tokens_per_second == pytest.approx(55.5)


def test_status_constants_are_distinct_and_named() -> None:
    names = ['OK', 'REJECTED_BUDGET', 'BUDGET_EXCEEDED', 'REJECTED_BUSY', 'INVALID_REQUEST',
             'INACTIVE', 'PREEMPTED', 'CANCELED', 'ERROR']
    values = [getattr(Action, f'STATUS_{n}') for n in names]
    assert len(set(values)) == len(names)
    assert Action.STATUS_OK == 0


def test_other_messages_carry_their_fields(ros) -> None:
    cmd = Command(id='c1', text='bring the red cup', latency_budget_ms=400, priority=3)
    obs = Observation(source='camera', label='red cup', confidence=0.9, has_pose=True,
                      attributes_json='{"color":"red"}', ttl_s=5.0)
    obs.pose.position.x = 1.25
    result = ToolResult(request_id='c1', call_id='call_0', name='pick', success=True,
                        content_json='{"grasped":true}')
    listener = ros.node('obs_listener')
    got: list[Observation] = []
    listener.create_subscription(Observation, 'observations', got.append, 10)
    pub = ros.node('obs_talker').create_publisher(Observation, 'observations', 10)
    assert wait_for(lambda: pub.get_subscription_count() > 0)
    pub.publish(obs)
    assert wait_for(lambda: len(got) == 1)
    assert got[0].pose.position.x == pytest.approx(1.25)
    assert got[0].label == 'red cup' and got[0].has_pose
    assert cmd.latency_budget_ms == 400 and cmd.priority == 3
    assert result.success and result.call_id == 'call_0'


def test_plan_service_round_trip(ros) -> None:
    server = ros.node('plan_server')
    seen: list[Plan.Request] = []

    def handle(request: Plan.Request, response: Plan.Response) -> Plan.Response:
        seen.append(request)
        response.action = _action_with_calls('plan-7')
        response.action.status_message = f'goal={request.goal}'
        return response

    server.create_service(Plan, 'plan', handle)
    client = ros.node('plan_client').create_client(Plan, 'plan')
    assert client.wait_for_service(timeout_sec=10.0)
    request = Plan.Request(goal='go to the kitchen', context_json='{}', latency_budget_ms=400,
                           priority=1, allowed_tools=['navigate_to', 'say'],
                           enable_thinking=False, max_tokens=64)
    future = client.call_async(request)
    assert wait_for(future.done, timeout=30.0)
    action = future.result().action
    assert action.request_id == 'plan-7'
    assert action.status_message == 'goal=go to the kitchen'
    assert len(action.tool_calls) == 2
    assert list(seen[0].allowed_tools) == ['navigate_to', 'say']
    assert seen[0].latency_budget_ms == 400


class _StreamingServer:
    """An Execute server that streams feedback until its goal is canceled or done.

    Its execute callback blocks while it streams: give it a node of its own executor
    (``ros.threaded_node``), or it would hold the others.
    """

    def __init__(self, node, steps: int) -> None:
        self.steps = steps
        self.accepted = threading.Event()
        self.server = ActionServer(
            node, Execute, 'execute', self.execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=lambda _handle: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup())

    def execute(self, goal_handle) -> Execute.Result:
        self.accepted.set()
        result = Execute.Result()
        result.action.request_id = 'exec-1'
        text = ''
        for i in range(self.steps):
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                result.action.status = Action.STATUS_CANCELED
                result.action.text = text
                return result
            text += f'tok{i} '
            feedback = Execute.Feedback(partial_text=text, completion_tokens=i + 1,
                                        elapsed_ms=float(i))
            goal_handle.publish_feedback(feedback)
            time.sleep(0.02)
        goal_handle.succeed()
        result.action.status = Action.STATUS_OK
        result.action.text = text
        result.action.completion_tokens = self.steps
        return result


def _send_goal(client, executor, feedback: list):
    goal = Execute.Goal(goal='say hello', latency_budget_ms=2000)
    future = client.send_goal_async(goal, feedback_callback=lambda fb: feedback.append(fb))
    assert spin_until(executor, future.done, timeout=30.0)
    handle = future.result()
    assert handle.accepted
    return handle


def test_execute_action_streams_feedback_and_returns_result(ros) -> None:
    _StreamingServer(ros.threaded_node('exec_server'), steps=5)
    node, executor = ros.private_node('exec_client')
    client = ActionClient(node, Execute, 'execute')
    assert client.wait_for_server(timeout_sec=10.0)
    feedback: list = []
    handle = _send_goal(client, executor, feedback)
    result_future = handle.get_result_async()
    assert spin_until(executor, result_future.done, timeout=30.0)
    wrapped = result_future.result()
    assert wrapped.status == GoalStatus.STATUS_SUCCEEDED
    assert wrapped.result.action.status == Action.STATUS_OK
    assert wrapped.result.action.completion_tokens == 5
    assert spin_until(executor, lambda: len(feedback) >= 1)
    counts = [fb.feedback.completion_tokens for fb in feedback]
    assert counts == sorted(counts) and counts[-1] <= 5
    assert feedback[-1].feedback.partial_text.startswith('tok0')


def test_execute_action_cancel_ends_canceled(ros) -> None:
    server = _StreamingServer(ros.threaded_node('exec_server_c'), steps=10_000)
    node, executor = ros.private_node('exec_client_c')
    client = ActionClient(node, Execute, 'execute')
    assert client.wait_for_server(timeout_sec=10.0)
    feedback: list = []
    handle = _send_goal(client, executor, feedback)
    assert server.accepted.wait(10.0)
    assert spin_until(executor, lambda: len(feedback) >= 2)
    cancel_future = handle.cancel_goal_async()
    assert spin_until(executor, cancel_future.done, timeout=30.0)
    assert len(cancel_future.result().goals_canceling) == 1
    result_future = handle.get_result_async()
    assert spin_until(executor, result_future.done, timeout=30.0)
    assert result_future.result().status == GoalStatus.STATUS_CANCELED
    assert result_future.result().result.action.status == Action.STATUS_CANCELED


def test_share_directory_holds_launch_and_config() -> None:
    share = get_package_share_directory('nemotron_ros')
    assert os.path.isfile(os.path.join(share, 'package.xml'))
    for relative in ('launch/nemotron.launch.py', 'config/nemotron.yaml',
                     'config/jetson_orin_nano.yaml', 'config/tools.example.yaml'):
        assert os.path.isfile(os.path.join(share, relative)), f'{relative} is not installed'


def test_executables_are_installed() -> None:
    share = get_package_share_directory('nemotron_ros')
    prefix = os.path.dirname(os.path.dirname(share))
    for name in ('nemotron_node', 'nemotron_demo'):
        path = os.path.join(prefix, 'lib', 'nemotron_ros', name)
        assert os.access(path, os.X_OK), f'{path} is not an installed executable'
