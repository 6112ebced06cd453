"""nemotron_node: the rclpy lifecycle node in front of the engine.

It only translates: messages become engine prompts, outcomes become Action messages. Topics,
the service and the action server exist in every lifecycle state, so a request that arrives
while the node is unconfigured or inactive is still answered (INACTIVE) instead of being lost;
the model itself is loaded in ``on_configure`` and freed in ``on_cleanup``.

How the promises hold inside a busy robot:

* **No message can kill the node.** Every callback (topics, service, goals, cancels, timer,
  transitions) ends in an answer or a logged, counted drop; no exception reaches the executor.
* **No burst loses a request.** Request callbacks only hand the request to an O(1) bounded
  :class:`~nemotron_ros.intake.Intake`; one thread submits them to the engine. Request readers
  are reliable with a deep history (``qos.request_depth``). A full intake answers
  REJECTED_BUSY at once.
* **Perception never delays a request.** Observations run in their own mutually exclusive
  callback group (at most one executor thread under a multi-threaded executor) and only
  update the world state; perception files drop rate-limited messages before deserializing.
* **Lifecycle services stay responsive.** A transition runs on its own thread while the
  ``change_state`` callback awaits it, so ``get_state`` and every request are served while
  ``configure`` loads a model, whatever the executor; a second transition request is refused
  at once. ``main`` spins a single-threaded executor: every callback is O(1).
* **Ctrl-C and SIGTERM answer everything.** ``main`` owns the signal handling: it aborts a
  model load, answers every outstanding request INACTIVE ("shutting down") and lets DDS deliver
  the answers before the context goes.

Service and action callbacks are coroutines that await the engine's answer, so a waiting
planner never holds an executor thread.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from std_msgs.msg import String

from . import parameters
from .action import Execute
from .conversions import observation_from_msg, step_to_action, task_call_to_msg
from .engine.config import TaskConfig
from .engine.runtime import Engine, EngineLoadError, Prompt, new_request_id
from .engine.scheduler import Outcome, RequestKind, RequestStatus
from .engine.tasks import (
    StepOutcome,
    TaskCall,
    TaskListener,
    TaskManager,
    TaskState,
)
from .intake import Intake
from .msg import Action, Command, Observation, ToolCall, ToolResult
from .perception import Perception, load_perception_file
from .srv import Confirm, Plan

#: Answers must not be lost: reliable, and deep enough for bursts.
COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
FEEDBACK_PERIOD_S = 0.05
#: How long a graceful shutdown waits for answers to reach their callers.
SHUTDOWN_DELIVERY_S = 4.0
SHUTTING_DOWN = 'node is shutting down'


@dataclass(frozen=True)
class _Request:
    """One request on its way from a DDS callback to the task manager (see ``Intake``)."""

    prompt: Prompt
    max_steps: int
    listener: TaskListener
    publish_final_calls: bool


def request_qos(depth: int) -> QoSProfile:
    """Request readers (commands, service and goal requests): reliable, ``depth`` deep."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def observation_qos(depth: int) -> QoSProfile:
    """Perception: best effort, so both sensor-data and reliable publishers match."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=qos_profile_sensor_data.reliability,
                      durability=DurabilityPolicy.VOLATILE)


class NemotronNode(LifecycleNode):
    """The on-robot language model node (see the module docstring)."""

    def __init__(self, node_name: str = 'nemotron', **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        parameters.declare(self)
        request_depth, observation_depth = parameters.qos_depths(self)
        self._engine = Engine(clock=self._now_s)
        self._tasks = TaskManager(self._engine, TaskConfig())
        self._counts: Counter = Counter()
        self._stopping = False
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._transition_lock = threading.Lock()
        self._gc_frozen = False  # this node froze the collector at configure (gc_freeze)
        self._goals: dict[bytes, str] = {}
        self._pending_cancels: set[bytes] = set()
        self._canceled_ids: set[str] = set()
        self._goal_lock = threading.Lock()
        self._perception = Perception(self, lambda o: self._engine.observe(o),
                                      lambda: self._engine.active, self._now_s)
        self._intake: Intake[_Request] = Intake(
            self._submit_now, self._submit_failed, capacity=request_depth,
            name='nemotron-intake')

        requests = ReentrantCallbackGroup()
        perception = MutuallyExclusiveCallbackGroup()
        in_qos = request_qos(request_depth)
        self._actions_pub = self.create_publisher(Action, 'actions', COMMAND_QOS)
        self._tool_calls_pub = self.create_publisher(ToolCall, 'tool_calls', COMMAND_QOS)
        self._pending_pub = self.create_publisher(ToolCall, 'confirmations_pending',
                                                  COMMAND_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_subscription(Command, 'command', self._on_command, in_qos,
                                 callback_group=requests)
        self.create_subscription(String, 'command_text', self._on_command_text, in_qos,
                                 callback_group=requests)
        self.create_subscription(Observation, 'observations', self._on_observation,
                                 observation_qos(observation_depth), callback_group=perception)
        self.create_subscription(ToolResult, 'tool_results', self._on_tool_result, in_qos,
                                 callback_group=requests)
        self.create_service(Plan, 'plan', self._on_plan, qos_profile=in_qos,
                            callback_group=requests)
        self.create_service(Confirm, 'confirm', self._on_confirm, qos_profile=in_qos,
                            callback_group=requests)
        self._execute_server = ActionServer(
            self, Execute, 'execute', execute_callback=self._on_execute,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel,
            goal_service_qos_profile=in_qos, cancel_service_qos_profile=in_qos,
            result_service_qos_profile=in_qos, callback_group=requests)
        self._cancel_wake = self.create_guard_condition(self._drain_cancels,
                                                        callback_group=requests)
        period = self.get_parameter(parameters.DIAGNOSTICS_PERIOD.name).value
        self._diagnostics_timer = self.create_timer(
            period, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._keep_lifecycle_services_responsive()

    # -- lifecycle ------------------------------------------------------------------------
    def _keep_lifecycle_services_responsive(self) -> None:
        """Serve the lifecycle services while a transition runs; refuse a second transition.

        rclpy runs a transition inside the ``change_state`` callback, so ``configure`` (a model
        load: seconds to minutes) would hold the executor and ``get_state`` would go
        unanswered. The callback becomes a coroutine: the transition runs on a worker thread
        and the callback awaits it, so every executor, single-threaded included, keeps
        serving. A second ``change_state`` meanwhile is refused at once, and an invalid
        transition is answered ``success=False`` instead of raising.
        """
        group = ReentrantCallbackGroup()
        for service in (self._service_change_state, self._service_get_state,
                        self._service_get_available_states,
                        self._service_get_available_transitions,
                        self._service_get_transition_graph):
            group.add_entity(service)
            service.callback_group = group
        service = self._service_change_state
        original = service.callback

        def transition(request, response, done: Future) -> None:
            try:
                result = original(request, response)
            except Exception as exc:  # an invalid transition must not end the process
                self.count_error('change_state', exc)
                response.success = False
                result = response
            finally:
                self._transition_lock.release()
            done.set_result(result)

        async def change_state(request, response):
            if not self._transition_lock.acquire(blocking=False):
                self.get_logger().warning(
                    'change_state refused: another transition is in progress')
                response.success = False
                return response
            done = self._waking_future()
            threading.Thread(target=transition, args=(request, response, done),
                             name='nemotron-transition', daemon=True).start()
            return await done

        service.callback = change_state

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        started = time.monotonic()
        if self._stopping:
            self.get_logger().error(f'configure refused: {SHUTTING_DOWN}')
            return TransitionCallbackReturn.FAILURE
        try:
            config = parameters.engine_config(self)
            # Checked before the model loads: a bad perception file fails at once.
            self._perception.start(load_perception_file(config.perception_file))
            info = self._engine.load(config)
            self._tasks.configure(config.task_config())
        except (ValueError, EngineLoadError) as exc:
            self._perception.stop()
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # a broken model or backend must not take the node down
            self._perception.stop()
            self.get_logger().error(f'configure failed: {type(exc).__name__}: {exc}')
            return TransitionCallbackReturn.FAILURE
        if self.get_parameter(parameters.GC_FREEZE.name).value:
            gc.collect()
            gc.freeze()
            self._gc_frozen = True
        self.get_logger().info(
            f'loaded {info.path} ({info.architecture}, {info.chat_format} format, '
            f'n_ctx {info.n_ctx}) with {len(self._engine.tools.names)} tools in '
            f'{time.monotonic() - started:.2f} s')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.set_active(True)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving('node was deactivated')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving('node was cleaned up', unload=True)
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving('node was shut down', unload=True)
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving('node is in error processing', unload=True)
        return TransitionCallbackReturn.SUCCESS

    def _stop_serving(self, reason: str, unload: bool = False) -> None:
        """Answer every task INACTIVE (held calls withdrawn), then stop or free the engine."""
        self._tasks.stop_all(RequestStatus.INACTIVE, reason)
        if unload:
            self._perception.stop()
            self._engine.close(reason)
            if self._gc_frozen:  # what the model held may now be garbage in cycles
                gc.unfreeze()
                self._gc_frozen = False
        else:
            self._engine.set_active(False, reason)

    def request_stop(self) -> None:
        """Begin shutting down (signal-safe): new requests and a model load are refused."""
        self._stopping = True
        self._engine.abort_load()

    def close(self, reason: str = SHUTTING_DOWN) -> None:
        """Answer everything INACTIVE and free the model (process exit). Idempotent."""
        self.request_stop()
        self._stop_serving(reason, unload=True)
        self._intake.close()
        self._tasks.close()

    def shutdown_gracefully(self, executor: Executor,
                            timeout: float = SHUTDOWN_DELIVERY_S) -> bool:
        """Answer every outstanding request and spin until the answers are on the wire.

        :returns: False when some answers could not be confirmed within ``timeout``.
        """
        started = time.monotonic()
        self.close(SHUTTING_DOWN)
        end = started + timeout
        while self._in_flight and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        acked = True
        for publisher in (self._actions_pub, self._tool_calls_pub):
            left = max(0.0, end - time.monotonic())
            acked = publisher.wait_for_all_acked(Duration(seconds=left)) and acked
        grace = time.monotonic() + 0.2
        while time.monotonic() < min(grace, end):
            executor.spin_once(timeout_sec=0.02)
        delivered = acked and not self._in_flight
        log = self.get_logger().info if delivered else self.get_logger().warning
        log(f'shut down in {time.monotonic() - started:.2f} s: every outstanding request was '
            f'answered' + ('' if delivered else ' (some answers may not have been delivered)'))
        return delivered

    # -- requests: intake -----------------------------------------------------------------
    def _enqueue(self, request: _Request) -> None:
        """Hand a request to the intake thread (O(1)); answer at once when it is full."""
        if self._intake.put(request):
            return
        status, message = (RequestStatus.INACTIVE, SHUTTING_DOWN) if self._stopping else (
            RequestStatus.REJECTED_BUSY, f'request intake full ({len(self._intake)} waiting)')
        request.listener.step(_final(request.prompt, status, message))

    def _submit_now(self, request: _Request) -> None:
        prompt = request.prompt
        if self._stopping:
            request.listener.step(_final(prompt, RequestStatus.INACTIVE, SHUTTING_DOWN))
            return
        if self._take_cancel(prompt.id):
            request.listener.step(_final(prompt, RequestStatus.CANCELED,
                                         'canceled by the caller'))
            return
        self._tasks.start(prompt, request.max_steps, request.listener,
                          publish_final_calls=request.publish_final_calls)
        if self._take_cancel(prompt.id):
            self._tasks.cancel(prompt.id)

    def _submit_failed(self, request: _Request, exc: BaseException) -> None:
        self.count_error('submit', exc)
        request.listener.step(_final(
            request.prompt, RequestStatus.ERROR,
            f'could not submit the request: {type(exc).__name__}: {exc}'))

    # -- topics ---------------------------------------------------------------------------
    def _on_command(self, msg: Command) -> None:
        request_id = msg.id or new_request_id()
        try:
            self._enqueue(_Request(
                Prompt(text=msg.text, id=request_id, budget_ms=msg.latency_budget_ms,
                       priority=msg.priority, arrival=time.monotonic()),
                msg.max_steps, _TopicListener(self), publish_final_calls=True))
        except Exception as exc:
            self._answer_failure(request_id, 'command', exc)

    def _on_command_text(self, msg: String) -> None:
        request_id = new_request_id()
        try:
            self._enqueue(_Request(Prompt(text=msg.data, id=request_id,
                                          arrival=time.monotonic()),
                                   0, _TopicListener(self), publish_final_calls=True))
        except Exception as exc:
            self._answer_failure(request_id, 'command_text', exc)

    def _on_observation(self, msg: Observation) -> None:
        self._counts['observations_received'] += 1
        try:
            self._engine.observe(observation_from_msg(msg, self._now_s()))
        except ValueError as exc:
            self._counts['observations_dropped'] += 1
            self.get_logger().warning(
                f'observation {msg.source[:80]!r}/{msg.label[:80]!r} ignored: {exc}',
                throttle_duration_sec=5.0)
        except Exception as exc:  # a bad message must never end the node
            self._counts['observations_dropped'] += 1
            self.count_error('observations', exc)

    def _on_tool_result(self, msg: ToolResult) -> None:
        """An executor's result: O(1) here; the next step is submitted by the task manager.

        A dropped result is counted (diagnostics ``tool_results.<reason>``) and logged,
        throttled, by the task manager.
        """
        try:
            self._tasks.tool_result(msg.request_id, msg.call_id, msg.name, msg.success,
                                    msg.content_json)
        except Exception as exc:
            self.count_error('tool_results', exc)

    def _publish_step(self, step: StepOutcome) -> None:
        """Publish one step's Action on ``actions`` (its calls go out through ``release``)."""
        self._publish_action(self._action_for(step))

    def _publish_action(self, action: Action) -> None:
        try:
            self._actions_pub.publish(action)
        except Exception as exc:  # e.g. the context is already gone at process exit
            self.count_error('publish', exc)

    def _release(self, call: TaskCall) -> None:
        """A call that needs no confirmation, or an approved one, goes to the executors."""
        try:
            self._tool_calls_pub.publish(task_call_to_msg(call))
        except Exception as exc:
            self.count_error('publish', exc)

    def _announce(self, call: TaskCall) -> None:
        """A held call is shown to operators; it reaches ``tool_calls`` only when approved."""
        try:
            self._pending_pub.publish(task_call_to_msg(call))
        except Exception as exc:
            self.count_error('publish', exc)

    def _answer_failure(self, request_id: str, where: str, exc: BaseException) -> None:
        self.count_error(where, exc)
        self._publish_action(self._action_for(StepOutcome(
            _outcome(request_id, RequestStatus.ERROR,
                     f'could not handle the request: {type(exc).__name__}: {exc}'), 0, True)))

    def _action_for(self, step: StepOutcome) -> Action:
        """The Action for ``step``; an ERROR Action when the conversion itself fails."""
        stamp = self.get_clock().now().to_msg()
        try:
            return step_to_action(step, stamp)
        except Exception as exc:
            self.count_error('answer', exc)
            action = Action(request_id=str(step.outcome.request_id),
                            status=Action.STATUS_ERROR, step=step.step, final=step.final,
                            status_message=f'could not build the answer '
                            f'({type(exc).__name__}: {exc})')
            action.header.stamp = stamp
            return action

    # -- service and action ---------------------------------------------------------------
    def _submit_async(self, prompt: Prompt, max_steps: int,
                      feedback: Optional[_FeedbackStream] = None) -> Future:
        """Start a task; the future completes (and wakes the executor) with (final, steps)."""
        future = self._waking_future()
        self._enqueue(_Request(prompt, max_steps, _CallerListener(self, future, feedback),
                               publish_final_calls=False))
        return future

    def _waking_future(self) -> Future:
        """A future that another thread completes; completing it wakes this node's executor
        (a done callback makes rclpy schedule work there), so the coroutine awaiting it
        resumes at once."""
        future = Future(executor=self.executor)
        future.add_done_callback(lambda _f: None)
        return future

    async def _on_plan(self, request: Plan.Request, response: Plan.Response) -> Plan.Response:
        request_id = new_request_id()
        self._track(1)
        try:
            response.action, response.steps = await self._submit_async(
                _prompt_from_goal(request, RequestKind.SERVICE, request_id),
                request.max_steps)
        except Exception as exc:
            self._fail_response(response, request_id, 'plan', exc)
        finally:
            self._track(-1)
        return response

    def _fail_response(self, response, request_id: str, where: str,
                       exc: BaseException) -> None:
        self.count_error(where, exc)
        response.action = self._action_for(StepOutcome(_outcome(
            request_id, RequestStatus.ERROR,
            f'could not handle the request: {type(exc).__name__}: {exc}'), 0, True))

    def _on_confirm(self, request: Confirm.Request,
                    response: Confirm.Response) -> Confirm.Response:
        try:
            response.accepted, response.message = self._tasks.confirm(
                request.request_id, request.call_id, request.approve, request.reason)
            self.get_logger().info(
                f'confirm {request.request_id[:40]!r}/{request.call_id[:40]!r} '
                f'({"approve" if request.approve else "deny"}): {response.message}')
        except Exception as exc:
            self.count_error('confirm', exc)
            response.accepted = False
            response.message = f'could not apply the decision: {type(exc).__name__}: {exc}'
        return response

    def _on_goal(self, _goal: Execute.Goal) -> GoalResponse:
        """Refuse goals the node cannot serve now, instead of accepting and aborting them."""
        if self._stopping or not self._engine.active:
            self.get_logger().info('execute goal rejected: node is not active',
                                   throttle_duration_sec=5.0)
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    async def _on_execute(self, goal_handle) -> Execute.Result:
        accepted = time.monotonic()
        key = bytes(goal_handle.goal_id.uuid)
        request_id = key.hex()[:16]
        feedback = _FeedbackStream(goal_handle, accepted)
        result = Execute.Result()
        self._track(1)
        try:
            prompt = _prompt_from_goal(goal_handle.request, RequestKind.ACTION, request_id,
                                       accepted, feedback.on_token)
            with self._goal_lock:
                self._goals[key] = request_id
                if key in self._pending_cancels:
                    self._pending_cancels.discard(key)
                    self._canceled_ids.add(request_id)
            result.action, result.steps = await self._submit_async(
                prompt, goal_handle.request.max_steps, feedback)
        except Exception as exc:
            self._fail_response(result, request_id, 'execute', exc)
        finally:
            with self._goal_lock:
                self._goals.pop(key, None)
                self._pending_cancels.discard(key)
                self._canceled_ids.discard(request_id)
            self._track(-1)
        feedback.close()
        self._end_goal(goal_handle, result.action.status)
        return result

    def _end_goal(self, goal_handle, status: int) -> None:
        """Move the goal to the terminal state that matches the answer's ``status``."""
        if status == Action.STATUS_CANCELED:
            # Tasks are only canceled after the cancel was accepted; the action server marks
            # the goal CANCELING right after our callback returns, which may be a moment later.
            end = time.monotonic() + 1.0
            while not goal_handle.is_cancel_requested and time.monotonic() < end:
                time.sleep(0.001)
        try:
            if status == Action.STATUS_OK:
                goal_handle.succeed()
            elif goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
        except Exception as exc:
            self.count_error('execute result', exc)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        """Accept every cancel; the goal's coroutine ends it (see ``_drain_cancels``)."""
        try:
            with self._goal_lock:
                self._pending_cancels.add(bytes(goal_handle.goal_id.uuid))
            self._cancel_wake.trigger()
        except Exception as exc:
            self.count_error('cancel', exc)
        return CancelResponse.ACCEPT

    def _drain_cancels(self) -> None:
        """Cancel the tasks of goals whose cancel was accepted, in whatever state they are.

        A goal whose request is not registered yet keeps its mark: ``_on_execute`` finds it
        when it registers, so a cancel that arrives early still cancels.
        """
        try:
            with self._goal_lock:
                ready = [k for k in self._pending_cancels if k in self._goals]
                request_ids = [self._goals[k] for k in ready]
                self._pending_cancels.difference_update(ready)
                self._canceled_ids.update(request_ids)
            for request_id in request_ids:
                self._tasks.cancel(request_id)
        except Exception as exc:
            self.count_error('cancel', exc)

    def _take_cancel(self, request_id: str) -> bool:
        with self._goal_lock:
            if request_id in self._canceled_ids:
                self._canceled_ids.discard(request_id)
                return True
            return False

    def _track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    # -- diagnostics ----------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        try:
            array = DiagnosticArray(status=[self._diagnostic_status()])
            array.header.stamp = self.get_clock().now().to_msg()
            self._diagnostics_pub.publish(array)
        except Exception as exc:
            self.count_error('diagnostics', exc)

    def _diagnostic_status(self) -> DiagnosticStatus:
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: language model',
                                  hardware_id='nemotron_ros')
        node_values = [('observations_received', self._counts['observations_received']),
                       ('observations_dropped', self._counts['observations_dropped']),
                       ('intake_waiting', len(self._intake)),
                       ('intake_refused', self._intake.refused),
                       ('callback_errors', self._counts['callback_errors']),
                       *self._task_values(), *self._perception.diagnostic_values()]
        stats = self._engine.stats()
        info = self._engine.info
        loading = self._engine.load_progress
        if loading:
            status.level = DiagnosticStatus.WARN
            status.message = f'loading model: {loading}'
        elif stats is None or info is None:
            status.level = DiagnosticStatus.WARN
            status.message = 'no model loaded (unconfigured)'
        else:
            status.level = DiagnosticStatus.OK if stats.active else DiagnosticStatus.WARN
            status.message = 'serving' if stats.active else 'model loaded, inactive'
            if stats.consecutive_errors >= 3:
                status.level = DiagnosticStatus.ERROR
                status.message = f'{stats.consecutive_errors} consecutive backend errors'
            backend = self._engine.backend
            health = backend.health() if backend is not None else None
            if health is not None and not health.ok:
                status.level = DiagnosticStatus.ERROR
                status.message = health.message
            node_values = [
                ('model', info.path), ('architecture', info.architecture),
                ('queue_depth', stats.queue_depth), ('running', stats.running or ''),
                ('answered', stats.answered),
                ('ttft_ms', f'{stats.avg_ttft_s * 1000:.1f}'),
                ('tokens_per_second', f'{stats.avg_tokens_per_s:.1f}'),
                ('budget_misses', stats.budget_misses),
                ('dropped_tool_calls', stats.dropped_tool_calls),
                *((f'count.{name}', n) for name, n in stats.counts.items()),
                *(health.values if health is not None else ()),
                *node_values]
        status.values = [KeyValue(key=k, value=str(v)) for k, v in node_values]
        return status

    def _task_values(self) -> list[tuple[str, Any]]:
        tasks = self._tasks.stats()
        return [('tasks_running', tasks.running), ('held_calls', tasks.held),
                ('tool_results_dropped', tasks.dropped_results),
                ('tool_result_timeouts', tasks.result_timeouts),
                ('confirmations_approved', tasks.approved),
                ('confirmations_denied', tasks.denied),
                ('confirmation_timeouts', tasks.confirmation_timeouts),
                ('held_calls_withdrawn', tasks.withdrawn),
                *((f'tool_results.{name}', n) for name, n in sorted(tasks.results.items()))]

    def count_error(self, where: str, exc: BaseException) -> None:
        """Count and log (throttled) an exception that a callback caught."""
        self._counts['callback_errors'] += 1
        self.get_logger().error(f'{where}: {type(exc).__name__}: {exc}',
                                throttle_duration_sec=5.0)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9


class _FeedbackStream:
    """Publishes Execute feedback: partial text at most every 50 ms, and every state change.

    Tokens arrive on the generating thread, step and state changes on the task manager's.
    Closed before the goal's result is set: anything that arrives later (the backend may still
    be stopping) publishes nothing, so no feedback ever follows the result.
    """

    def __init__(self, goal_handle, accepted: float) -> None:
        self._goal_handle = goal_handle
        self._accepted = accepted
        self._lock = threading.Lock()
        self._text: list[str] = []
        self._last = 0.0
        self._sent = -1
        self._closed = False
        self._step = 0
        self._state = TaskState.GENERATING
        self._calls: list[ToolCall] = []

    def on_token(self, piece: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._text.append(piece)
            now = time.monotonic()
            if now - self._last >= FEEDBACK_PERIOD_S:
                self._last = now
                self._publish_locked()

    def on_state(self, step: int, state: TaskState) -> None:
        with self._lock:
            if self._closed:
                return
            if step != self._step:  # a new step streams its own text
                self._step, self._text = step, []
            self._state = state
            self._publish_locked()

    def on_step(self, action: Action) -> None:
        """A step ended with calls: the next feedback shows them (held ones flagged)."""
        with self._lock:
            self._calls = list(action.tool_calls)

    def close(self) -> None:
        """Send what is pending, then publish nothing more."""
        with self._lock:
            if not self._closed:
                if len(self._text) != self._sent:
                    self._publish_locked()
                self._closed = True

    def _publish_locked(self) -> None:
        self._sent = len(self._text)
        try:
            self._goal_handle.publish_feedback(Execute.Feedback(
                partial_text=''.join(self._text), completion_tokens=self._sent,
                elapsed_ms=(time.monotonic() - self._accepted) * 1000.0, step=self._step,
                state=self._state.value, tool_calls=self._calls))
        except Exception:  # feedback is best effort; the result still comes
            pass


class _TopicListener:
    """A topic command's task: every step Action on ``actions``, calls on ``tool_calls``.

    Released calls go to the executors and held ones to operators the same way for every
    request kind; :class:`_CallerListener` only changes where the steps go.
    """

    def __init__(self, node: NemotronNode) -> None:
        self._node = node

    def step(self, step: StepOutcome) -> None:
        self._node._publish_step(step)

    def release(self, call: TaskCall) -> None:
        self._node._release(call)

    def pending(self, call: TaskCall) -> None:
        self._node._announce(call)

    def state(self, step: int, state: TaskState) -> None:
        pass


class _CallerListener(_TopicListener):
    """A ``plan`` call's or ``execute`` goal's task: the caller gets (final, steps).

    Calls of steps that await results go to the executors on ``tool_calls``; the final step's
    calls go back to the caller only (the task manager does not release them).
    """

    def __init__(self, node: NemotronNode, future: Future,
                 feedback: Optional[_FeedbackStream]) -> None:
        super().__init__(node)
        self._future = future
        self._feedback = feedback
        self._steps: list[Action] = []

    def step(self, step: StepOutcome) -> None:
        action = self._node._action_for(step)
        if step.final:
            if not self._future.done():
                self._future.set_result((action, list(self._steps)))
            return
        self._steps.append(action)
        if self._feedback is not None:
            self._feedback.on_step(action)

    def state(self, step: int, state: TaskState) -> None:
        if self._feedback is not None:
            self._feedback.on_state(step, state)


def _outcome(request_id: str, status: RequestStatus, message: str,
             arrival: Optional[float] = None) -> Outcome:
    """An answer decided by the node itself, before or around the engine."""
    total = time.monotonic() - arrival if arrival is not None else 0.0
    return Outcome(request_id=request_id, status=status, status_message=message,
                   total_s=max(0.0, total))


def _final(prompt: Prompt, status: RequestStatus, message: str) -> StepOutcome:
    """The one final step of a request the node answers itself (never started)."""
    return StepOutcome(_outcome(prompt.id, status, message, prompt.arrival), 0, True)


def _prompt_from_goal(goal, kind: RequestKind, request_id: str,
                      arrival: Optional[float] = None, on_token=None) -> Prompt:
    """A Prompt from a Plan request or an Execute goal (they share their fields)."""
    return Prompt(text=goal.goal, id=request_id, context_json=goal.context_json,
                  budget_ms=goal.latency_budget_ms, priority=goal.priority,
                  allowed_tools=tuple(goal.allowed_tools),
                  enable_thinking=bool(goal.enable_thinking), max_tokens=goal.max_tokens,
                  kind=kind, arrival=arrival if arrival is not None else time.monotonic(),
                  on_token=on_token)


def _spin_until(executor: Executor, node: NemotronNode,
                stop: threading.Event) -> None:
    """Spin until ``stop`` or ROS shutdown; an exception from a callback is logged, not fatal.

    The node's own callbacks catch everything; this also covers rclpy's machinery around them
    (e.g. sending a response to a client that has gone away), which the executor re-raises.
    """
    while not stop.is_set() and rclpy.ok():
        try:
            executor.spin_once(timeout_sec=0.1)
        except ExternalShutdownException:
            return
        except Exception as exc:
            node.count_error('executor', exc)


def main(args: Optional[list[str]] = None) -> int:
    """Run the node until Ctrl-C, SIGTERM or ROS shutdown; answer everything before exiting.

    rclpy's own signal handler would shut the context down at once, before the answers to
    outstanding requests could be published, so this function handles SIGINT and SIGTERM
    itself: the first signal stops intake and any model load, the node answers everything
    INACTIVE ("shutting down"), and the executor keeps spinning until DDS has delivered it.
    """
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except rclpy.exceptions.RCLError as exc:
        print(f'nemotron_node: bad command line: {exc}', file=sys.stderr)
        return 2
    stop = threading.Event()
    node: Optional[NemotronNode] = None

    def on_signal(signum: int, _frame) -> None:
        stop.set()
        if node is not None:
            node.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            node = NemotronNode()
        except (rclpy.exceptions.ParameterException, ValueError, TypeError) as exc:
            rclpy.logging.get_logger('nemotron').fatal(f'bad parameters: {exc}')
            return 2
        # Single-threaded: every callback is O(1) (requests go to the intake thread, answers
        # are awaited, transitions run on their own thread), and rclpy 9.1's
        # MultiThreadedExecutor delayed messages by 30 ms median (700 ms worst) in about half
        # of the runs measured, against 0.1 ms here.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            _spin_until(executor, node, stop)
        finally:
            if rclpy.ok():
                node.shutdown_gracefully(executor)
            else:
                node.close()
            executor.shutdown(timeout_sec=2.0)
            node.destroy_node()
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        rclpy.try_shutdown()
