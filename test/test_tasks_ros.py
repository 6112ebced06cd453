"""Multi-step tasks through real DDS: tool results flow back, held calls wait for an operator.

The node runs the tiny random nemotron_h with ``tool_choice: required`` and tools without
arguments, so every step answers with one short, valid call and the tests exercise the task
mechanics (steps, results, timeouts, confirmation, cancel, lifecycle), not the model's taste.
A fake executor node answers on ``tool_results``; a recorder sees everything on ``tool_calls``.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from conftest import wait_for

rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

from action_msgs.msg import GoalStatus  # noqa: E402
from node_harness import (  # noqa: E402
    BATTERY_TOOL,
    HELD_TOOL,
    SUCCESS,
    Client,
    ExecuteCaller,
    FakeExecutor,
    node_status,
    serve_execute,
    status_values,
)

from nemotron_ros.action import Execute  # noqa: E402
from nemotron_ros.msg import Action, Command  # noqa: E402
from nemotron_ros.srv import Confirm, Plan  # noqa: E402

pytestmark = pytest.mark.ros



@pytest.fixture
def tools_file(tmp_path: Path) -> str:
    path = tmp_path / 'tools.yaml'
    path.write_text('tools:' + BATTERY_TOOL + HELD_TOOL)
    return str(path)


@pytest.fixture
def held_only_tools(tmp_path: Path) -> str:
    """Only the held tool: a topic command (which cannot narrow the tools) must call it."""
    path = tmp_path / 'held_only.yaml'
    path.write_text('tools:' + HELD_TOOL)
    return str(path)


def _task_params(tools_file: str, overrides: dict) -> dict:
    return {'tools_file': tools_file, 'tool_choice': 'required', 'max_tokens': 48,
            'max_tool_calls': 1, 'tool_result_timeout_ms': 20000,
            'confirmation_timeout_ms': 20000, **overrides}


def _connected_client(ros, namespace: str = '') -> tuple[Client, object]:
    client = Client(ros, namespace=namespace)
    confirm = client.node.create_client(Confirm, 'confirm')
    assert wait_for(lambda: client.connected() and confirm.service_is_ready(), 10.0)
    return client, confirm


@pytest.fixture
def task_node(ros, node_factory, tiny_model, tools_file):
    """Make an active node for tasks (``overrides`` on top of the task defaults)."""

    def make(**overrides):
        node = node_factory(tiny_model, **_task_params(tools_file, overrides))
        return (node, *_connected_client(ros))

    return make


@pytest.fixture
def task_node_with_caller(ros, node_factory, tiny_model, tools_file):
    """Like ``task_node``, plus an ExecuteCaller that sees the node's execute server; the
    node has a namespace of its own (see ``serve_execute``), and so must its other clients."""

    def make(**overrides):
        node, caller = serve_execute(ros, lambda namespace: node_factory(
            tiny_model, namespace=namespace, **_task_params(tools_file, overrides)))
        return (node, *_connected_client(ros, node.get_namespace()), caller)

    return make


def spy_on_prompts(node) -> list:
    """Record the messages of every generation the node's backend runs (the real backend)."""
    backend = node._engine.backend
    original = backend.generate
    seen = []

    def generate(request):
        seen.append(list(request.messages))
        return original(request)

    backend.generate = generate
    return seen


def answers_of(client: Client, request_id: str) -> list[Action]:
    return sorted(client.answers(request_id), key=lambda a: a.step)


def finals(client: Client, request_id: str) -> list[Action]:
    return [a for a in client.answers(request_id) if a.final]


def feedback_of(caller: ExecuteCaller, goal_id) -> list[Execute.Feedback]:
    return [fb for _stamp, fb in caller.feedback.get(bytes(goal_id.uuid), [])]


def confirm(client_confirm, call, approve: bool, reason: str = '') -> Confirm.Response:
    future = client_confirm.call_async(Confirm.Request(
        request_id=call.request_id, call_id=call.id, approve=approve, reason=reason))
    assert wait_for(future.done, 10.0), 'confirm did not answer'
    return future.result()


def test_a_three_step_command_feeds_each_result_into_the_next_step(ros, task_node) -> None:
    node, client, _confirm = task_node()
    prompts = spy_on_prompts(node)
    executor = FakeExecutor(ros, answer=lambda call: {'percent': 70 + len(prompts),
                                                      'marker': f'result-of-{call.id}'})
    assert wait_for(executor.connected, 10.0)
    client.command_pub.publish(Command(id='task-1', text='Check the battery three times',
                                       max_steps=3, latency_budget_ms=60000))
    assert wait_for(lambda: finals(client, 'task-1'), 60.0)
    actions = answers_of(client, 'task-1')
    assert [(a.step, a.final) for a in actions] == [(0, False), (1, False), (2, True)]
    assert all(a.status == Action.STATUS_OK for a in actions), actions
    calls = [c for a in actions for c in a.tool_calls]
    assert [c.name for c in calls] == ['get_battery'] * 3
    assert len({c.id for c in calls}) == 3 and {c.request_id for c in calls} == {'task-1'}
    # Commands publish every released call, the final step's included.
    # The final step's call travels on tool_calls, the final Action on actions: either may
    # arrive first.
    assert wait_for(lambda: len(executor.calls) == len(calls), 10.0), executor.calls
    assert [c.id for c in executor.calls] == [c.id for c in calls]
    # Each step's prompt holds the previous calls and the executor's results, in order.
    assert len(prompts) == 3
    rendered = [node._engine.backend.prompt_format.render(m, ()).text for m in prompts]
    assert 'result-of-' not in rendered[0]
    assert f'result-of-{calls[0].id}' in rendered[1]
    assert f'result-of-{calls[1].id}' not in rendered[1]
    assert all(f'result-of-{c.id}' in rendered[2] for c in calls[:2])
    assert '<tool_response>' in rendered[2]
    assert actions[1].prompt_tokens_reused > 0 and actions[2].prompt_tokens_reused > 0


def test_missing_results_time_out_and_late_duplicate_unknown_ones_are_counted(
        ros, task_node) -> None:
    node, client, _confirm = task_node(tool_result_timeout_ms=1500)
    prompts = spy_on_prompts(node)
    executor = FakeExecutor(ros, answer=None)  # answers only when told to
    assert wait_for(executor.connected, 10.0)
    client.command_pub.publish(Command(id='slow', text='Check the battery', max_steps=3,
                                       latency_budget_ms=60000))
    # Step 0's call gets no result; after its timeout step 1 runs and sends its own call.
    assert wait_for(lambda: len(executor.calls) == 2, 30.0)
    first, second = executor.calls
    rendered = node._engine.backend.prompt_format.render(prompts[1], ()).text
    assert 'no result within 1.5 s' in rendered
    executor.send(first, {'late': True})  # after its synthetic result: late
    executor.send(second, {'x': 1}, request_id='nobody')  # unknown task
    executor.send(second, {'x': 1}, call_id='call_99')  # unknown call of a running task
    executor.send(second, 'not json {')  # invalid content
    executor.send(second, {'percent': 40})  # the real one

    def counted() -> dict:
        return status_values(node_status(client, '/nemotron'))

    expected = {'tool_results.late': '1', 'tool_results.unknown_task': '1',
                'tool_results.unknown_call': '1', 'tool_results.invalid_content': '1',
                'tool_results.accepted': '1', 'tool_result_timeouts': '1'}
    assert wait_for(lambda: expected.items() <= counted().items(), 10.0), counted()
    assert wait_for(lambda: finals(client, 'slow'), 30.0)
    assert [(a.step, a.final) for a in answers_of(client, 'slow')] == [
        (0, False), (1, False), (2, True)]


def test_duplicate_results_are_dropped_and_counted(ros, task_node) -> None:
    node, client, _confirm = task_node()
    executor = FakeExecutor(ros, answer=None)
    assert wait_for(executor.connected, 10.0)
    client.command_pub.publish(Command(id='dup', text='Check the battery', max_steps=2,
                                       latency_budget_ms=60000))
    assert wait_for(lambda: executor.calls, 30.0)
    call = executor.calls[0]
    executor.send(call, {'percent': 50})
    executor.send(call, {'percent': 51})
    assert wait_for(lambda: finals(client, 'dup'), 30.0)
    assert wait_for(lambda: status_values(node_status(client, '/nemotron')).get(
        'tool_results.duplicate') == '1', 10.0)
    assert len(finals(client, 'dup')) == 1


@pytest.mark.parametrize('decision', ['approve', 'deny', 'timeout'])
@pytest.mark.parametrize('kind', ['plan', 'command'])
def test_a_held_call_reaches_tool_calls_only_when_approved(ros, task_node, held_only_tools,
                                                           decision, kind) -> None:
    timeout_ms = 500 if decision == 'timeout' else 20000
    extra = {'tools_file': held_only_tools} if kind == 'command' else {}
    node, client, confirm_client = task_node(confirmation_timeout_ms=timeout_ms, **extra)
    executor = FakeExecutor(ros, answer=lambda call: {'done': True})
    assert wait_for(executor.connected, 10.0)
    if kind == 'plan':
        future = client.plan_client.call_async(Plan.Request(
            goal='Open the door', allowed_tools=['open_door'], latency_budget_ms=60000))
        assert wait_for(future.done, 60.0)
        final = future.result().action
    else:
        client.command_pub.publish(Command(id='door', text='Open the door',
                                           latency_budget_ms=60000))
        assert wait_for(lambda: finals(client, 'door'), 60.0)
        final = finals(client, 'door')[0]
    assert final.status == Action.STATUS_OK, final.status_message
    held = [c for c in final.tool_calls if c.name == 'open_door']
    assert held and all(c.requires_confirmation for c in held)
    assert wait_for(lambda: len(executor.pending) >= len(held), 10.0)
    assert {c.id for c in executor.pending} >= {c.id for c in held}
    call = held[0]
    if decision == 'approve':
        reply = confirm(confirm_client, call, True)
        assert reply.accepted, reply.message
        assert wait_for(lambda: any(c.id == call.id for c in executor.calls), 10.0)
        assert not confirm(confirm_client, call, True).accepted  # decided once
    elif decision == 'deny':
        reply = confirm(confirm_client, call, False, 'not now')
        assert reply.accepted, reply.message
        assert not confirm(confirm_client, call, True).accepted  # a denial is final
    else:
        assert wait_for(lambda: status_values(node_status(client, '/nemotron')).get(
            'confirmation_timeouts') == '1', 10.0)
        assert not confirm(confirm_client, call, True).accepted
    if decision != 'approve':
        # Wait for the node's counters to settle, then check that nothing was released.
        key = 'confirmations_denied' if decision == 'deny' else 'confirmation_timeouts'
        assert wait_for(lambda: status_values(node_status(client, '/nemotron')).get(key)
                        == '1', 10.0)
        assert all(c.name != 'open_door' for c in executor.calls), executor.calls


def test_plan_gets_its_step_actions_and_only_intermediate_calls_are_published(
        ros, task_node) -> None:
    _node, client, _confirm = task_node()
    executor = FakeExecutor(ros, answer=lambda call: {'percent': 80})
    assert wait_for(executor.connected, 10.0)
    future = client.plan_client.call_async(Plan.Request(
        goal='Check the battery twice', allowed_tools=['get_battery'], max_steps=2,
        latency_budget_ms=60000))
    assert wait_for(future.done, 60.0)
    response = future.result()
    assert [(a.step, a.final) for a in response.steps] == [(0, False)]
    assert (response.action.step, response.action.final) == (1, True)
    assert response.action.status == Action.STATUS_OK, response.action.status_message
    step_call = response.steps[0].tool_calls[0]
    final_call = response.action.tool_calls[0]
    assert wait_for(lambda: executor.calls, 10.0)
    assert [c.id for c in executor.calls] == [step_call.id]
    assert final_call.id != step_call.id


@pytest.mark.parametrize('state', ['waiting_for_results', 'waiting_for_confirmation'])
def test_execute_cancel_while_waiting_ends_canceled_once(ros, task_node_with_caller,
                                                         state) -> None:
    node, _client, _confirm, caller = task_node_with_caller()
    executor = FakeExecutor(ros, answer=None, namespace=node.get_namespace())
    assert wait_for(executor.connected, 10.0)
    tool = 'get_battery' if state == 'waiting_for_results' else 'open_door'
    handle = caller.accepted(Execute.Goal(goal='Do it', allowed_tools=[tool], max_steps=3,
                                          latency_budget_ms=60000))
    goal_id = handle.goal_id
    assert caller.spin_until(lambda: any(f.state == state
                                         for f in feedback_of(caller, goal_id)), 30.0)
    shown = [f for f in feedback_of(caller, goal_id) if f.state == state][-1]
    assert [c.name for c in shown.tool_calls] == [tool]
    assert shown.tool_calls[0].requires_confirmation == (tool == 'open_door')
    cancel = handle.cancel_goal_async()
    assert caller.spin_until(cancel.done, 10.0)
    status, action = caller.result(handle)
    assert status == GoalStatus.STATUS_CANCELED
    assert action.status == Action.STATUS_CANCELED and action.final
    assert not caller.feedback_after_result(goal_id)
    assert all(c.name != 'open_door' for c in executor.calls)


@pytest.mark.parametrize('transition', ['deactivate', 'cleanup'])
@pytest.mark.parametrize('state', ['waiting_for_results', 'waiting_for_confirmation'])
def test_a_transition_while_waiting_ends_the_task_inactive_once(ros, task_node, transition,
                                                                state) -> None:
    node, client, confirm_client = task_node()
    executor = FakeExecutor(ros, answer=None)
    assert wait_for(executor.connected, 10.0)
    tool = 'get_battery' if state == 'waiting_for_results' else 'open_door'
    future = client.plan_client.call_async(Plan.Request(
        goal='Do it', allowed_tools=[tool], max_steps=3, latency_budget_ms=60000))
    seen = executor.calls if tool == 'get_battery' else executor.pending
    assert wait_for(lambda: seen, 30.0)
    trigger = node.trigger_deactivate if transition == 'deactivate' else (
        lambda: (node.trigger_deactivate(), node.trigger_cleanup())[-1])
    assert trigger() == SUCCESS
    assert wait_for(future.done, 10.0)
    final = future.result().action
    assert final.status == Action.STATUS_INACTIVE and final.final
    if tool == 'open_door':
        assert not confirm(confirm_client, seen[0], True).accepted  # withdrawn
        assert all(c.name != 'open_door' for c in executor.calls)


def test_tasks_with_results_out_of_order_each_end_exactly_once(ros, task_node) -> None:
    _node, client, _confirm = task_node(queue_size=16)
    rng = random.Random(7)
    held: list = []
    lock = threading.Lock()

    def collect(call):
        with lock:
            held.append(call)
        return None

    executor = FakeExecutor(ros, answer=collect)
    assert wait_for(executor.connected, 10.0)
    ids = [f'flood-{i}' for i in range(12)]
    for request_id in ids:
        client.command_pub.publish(Command(id=request_id, text='Battery?', max_steps=2,
                                           latency_budget_ms=120000))

    def answer_shuffled() -> bool:
        with lock:
            batch, held[:] = list(held), []
        rng.shuffle(batch)
        for call in batch:
            executor.send(call, {'percent': 42})
            executor.send(call, {'percent': 43})  # a duplicate of each
        return all(finals(client, i) for i in ids)

    assert wait_for(answer_shuffled, 120.0, period=0.2)
    assert all(len(finals(client, i)) == 1 for i in ids)
    # A later command's answer arrives after any duplicate final would have.
    client.answer(client.command('Battery?', request_id='after', budget_ms=60000), 60.0)
    assert all(len(finals(client, i)) == 1 for i in ids)
