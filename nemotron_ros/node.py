"""nemotron_node: the rclpy lifecycle node in front of the engine.

It only translates: messages become engine prompts, outcomes become Action messages. Topics,
the service and the action server exist in every lifecycle state, so a request that arrives
while the node is unconfigured or inactive is still answered (INACTIVE) instead of being lost;
the model itself is loaded in ``on_configure`` and freed in ``on_cleanup``.

Service and action callbacks are coroutines that await the engine's answer, so a waiting
planner never holds an executor thread and subscriptions keep flowing.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

import rclpy
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.task import Future
from std_msgs.msg import String

from . import parameters
from .action import Execute
from .conversions import observation_from_msg, outcome_to_action
from .engine.runtime import Engine, EngineLoadError, Prompt
from .engine.scheduler import Outcome, RequestKind, RequestStatus
from .msg import Action, Command, Observation, ToolCall
from .srv import Plan

#: Commands and answers must not be lost: reliable, and deep enough for bursts.
COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
#: Perception is best effort: accepts both sensor-data and reliable publishers.
OBSERVATION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                             reliability=qos_profile_sensor_data.reliability,
                             durability=DurabilityPolicy.VOLATILE)
FEEDBACK_PERIOD_S = 0.05


class NemotronNode(LifecycleNode):
    """The on-robot language model node (see the module docstring)."""

    def __init__(self, node_name: str = 'nemotron', **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        parameters.declare(self)
        self._engine = Engine(clock=self._now_s)
        self._goal_requests: dict[bytes, str] = {}
        self._goal_lock = threading.Lock()
        requests = ReentrantCallbackGroup()
        self._actions_pub = self.create_publisher(Action, 'actions', COMMAND_QOS)
        self._tool_calls_pub = self.create_publisher(ToolCall, 'tool_calls', COMMAND_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_subscription(Command, 'command', self._on_command, COMMAND_QOS,
                                 callback_group=requests)
        self.create_subscription(String, 'command_text', self._on_command_text, COMMAND_QOS,
                                 callback_group=requests)
        self.create_subscription(Observation, 'observations', self._on_observation,
                                 OBSERVATION_QOS, callback_group=requests)
        self.create_service(Plan, 'plan', self._on_plan, callback_group=requests)
        self._execute_server = ActionServer(
            self, Execute, 'execute', execute_callback=self._on_execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel, callback_group=requests)
        period = self.get_parameter(parameters.DIAGNOSTICS_PERIOD.name).value
        self._diagnostics_timer = self.create_timer(
            period, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            config = parameters.engine_config(self)
            started = time.monotonic()
            info = self._engine.load(config)
        except (ValueError, EngineLoadError) as exc:
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(
            f'loaded {info.path} ({info.architecture}, {info.chat_format} format, '
            f'n_ctx {info.n_ctx}) with {len(self._engine.tools.names)} tools in '
            f'{time.monotonic() - started:.2f} s')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.set_active(True)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.set_active(False)
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.close()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.close()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Answer everything INACTIVE and free the model (process exit)."""
        self._engine.close()

    # -- topics ---------------------------------------------------------------------------
    def _on_command(self, msg: Command) -> None:
        self._engine.submit(Prompt(text=msg.text, id=msg.id, budget_ms=msg.latency_budget_ms,
                                   priority=msg.priority, arrival=time.monotonic()),
                            self._publish_outcome)

    def _on_command_text(self, msg: String) -> None:
        self._engine.submit(Prompt(text=msg.data, arrival=time.monotonic()),
                            self._publish_outcome)

    def _on_observation(self, msg: Observation) -> None:
        try:
            self._engine.observe(observation_from_msg(msg, self._now_s()))
        except ValueError as exc:
            self.get_logger().warning(
                f'observation {msg.source!r}/{msg.label!r} ignored: {exc}',
                throttle_duration_sec=5.0)

    def _publish_outcome(self, outcome: Outcome) -> None:
        action = outcome_to_action(outcome, self.get_clock().now().to_msg())
        self._actions_pub.publish(action)
        for call in action.tool_calls:
            self._tool_calls_pub.publish(call)

    # -- service and action ---------------------------------------------------------------
    def _await_outcome(self, prompt: Prompt) -> tuple[Future, str]:
        """Submit ``prompt``; the future completes (and wakes the executor) with its outcome."""
        future = Future(executor=self.executor)
        future.add_done_callback(lambda _f: None)
        request_id = self._engine.submit(prompt, future.set_result)
        return future, request_id

    async def _on_plan(self, request: Plan.Request, response: Plan.Response) -> Plan.Response:
        future, _ = self._await_outcome(_prompt_from_goal(request, RequestKind.SERVICE))
        outcome = await future
        response.action = outcome_to_action(outcome, self.get_clock().now().to_msg())
        return response

    async def _on_execute(self, goal_handle) -> Execute.Result:
        accepted = time.monotonic()
        feedback = _FeedbackStream(goal_handle, accepted)
        prompt = _prompt_from_goal(goal_handle.request, RequestKind.ACTION, accepted,
                                   feedback.on_token)
        key = bytes(goal_handle.goal_id.uuid)
        with self._goal_lock:
            future, self._goal_requests[key] = self._await_outcome(prompt)
        try:
            outcome = await future
        finally:
            with self._goal_lock:
                self._goal_requests.pop(key, None)
        feedback.flush()
        result = Execute.Result(action=outcome_to_action(outcome,
                                                         self.get_clock().now().to_msg()))
        if outcome.status is RequestStatus.OK:
            goal_handle.succeed()
        elif (outcome.status is RequestStatus.CANCELED
              and goal_handle.status == GoalStatus.STATUS_CANCELING):
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._goal_lock:
            request_id = self._goal_requests.get(bytes(goal_handle.goal_id.uuid))
        if request_id is None:
            return CancelResponse.REJECT
        return CancelResponse.ACCEPT if self._engine.cancel(request_id) else (
            CancelResponse.REJECT)

    # -- diagnostics ----------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: language model',
                                  hardware_id='nemotron_ros')
        stats = self._engine.stats()
        info = self._engine.info
        if stats is None or info is None:
            status.level = DiagnosticStatus.WARN
            status.message = 'no model loaded (unconfigured)'
        else:
            status.level = DiagnosticStatus.OK if stats.active else DiagnosticStatus.WARN
            status.message = 'serving' if stats.active else 'model loaded, inactive'
            if stats.consecutive_errors >= 3:
                status.level = DiagnosticStatus.ERROR
                status.message = f'{stats.consecutive_errors} consecutive backend errors'
            status.values = [KeyValue(key=k, value=str(v)) for k, v in (
                ('model', info.path), ('architecture', info.architecture),
                ('queue_depth', stats.queue_depth), ('running', stats.running or ''),
                ('answered', stats.answered),
                ('ttft_ms', f'{stats.avg_ttft_s * 1000:.1f}'),
                ('tokens_per_second', f'{stats.avg_tokens_per_s:.1f}'),
                ('budget_misses', stats.budget_misses),
                *((f'count.{name}', n) for name, n in stats.counts.items()))]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9


class _FeedbackStream:
    """Publishes Execute feedback from the generating thread, at most every 50 ms."""

    def __init__(self, goal_handle, accepted: float) -> None:
        self._goal_handle = goal_handle
        self._accepted = accepted
        self._text: list[str] = []
        self._last = 0.0
        self._sent = 0

    def on_token(self, piece: str) -> None:
        self._text.append(piece)
        now = time.monotonic()
        if now - self._last >= FEEDBACK_PERIOD_S:
            self._last = now
            self.flush()

    def flush(self) -> None:
        if len(self._text) == self._sent:
            return
        self._sent = len(self._text)
        self._goal_handle.publish_feedback(Execute.Feedback(
            partial_text=''.join(self._text), completion_tokens=self._sent,
            elapsed_ms=(time.monotonic() - self._accepted) * 1000.0))


def _prompt_from_goal(goal, kind: RequestKind, arrival: Optional[float] = None,
                      on_token=None) -> Prompt:
    """A Prompt from a Plan request or an Execute goal (they share their fields)."""
    return Prompt(text=goal.goal, context_json=goal.context_json,
                  budget_ms=goal.latency_budget_ms, priority=goal.priority,
                  allowed_tools=tuple(goal.allowed_tools),
                  enable_thinking=bool(goal.enable_thinking), max_tokens=goal.max_tokens,
                  kind=kind, arrival=arrival if arrival is not None else time.monotonic(),
                  on_token=on_token)


def _close_quietly(node: NemotronNode, executor: MultiThreadedExecutor) -> None:
    """Free the model and the node; a second Ctrl-C must not interrupt freeing native memory."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        node.close()
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
    finally:
        signal.signal(signal.SIGINT, previous)


def main(args: Optional[list[str]] = None) -> int:
    """Run the node until Ctrl-C or ROS shutdown."""
    try:
        rclpy.init(args=args)
    except rclpy.exceptions.RCLError as exc:
        print(f'nemotron_node: bad command line: {exc}', file=sys.stderr)
        return 2
    try:
        try:
            node = NemotronNode()
        except (rclpy.exceptions.ParameterException, ValueError, TypeError) as exc:
            rclpy.logging.get_logger('nemotron').fatal(f'bad parameters: {exc}')
            return 2
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            _close_quietly(node, executor)
        return 0
    finally:
        rclpy.try_shutdown()
