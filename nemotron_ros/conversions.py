"""Translations between ROS messages and engine data, in one place and without side effects."""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time

from .engine.json_input import loads_bounded
from .engine.scheduler import Outcome
from .engine.tasks import StepOutcome, TaskCall
from .engine.world_state import Observation, Pose
from .msg import Action, ToolCall
from .msg import Observation as ObservationMsg


def stamp_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _ms(seconds: float) -> float:
    return float(seconds) * 1000.0 if math.isfinite(seconds) else 0.0


def outcome_to_action(outcome: Outcome, stamp: Time, step: int = 0, final: bool = True) -> Action:
    """The Action message for one outcome (status values are shared with msg/Action).

    :param step: index of the task step this outcome answers.
    :param final: whether it is the request's last Action.
    """
    msg = Action()
    msg.header.stamp = stamp
    msg.request_id = outcome.request_id
    msg.status = int(outcome.status)
    msg.status_message = outcome.status_message
    msg.queue_ms = _ms(outcome.queue_s)
    msg.total_ms = _ms(outcome.total_s)
    msg.step = step
    msg.final = final
    result = outcome.result
    if result is None:
        return msg
    msg.text = result.text if outcome.ok else ''
    msg.reasoning = result.reasoning
    if outcome.ok:
        msg.tool_calls = [ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json,
                                   request_id=outcome.request_id)
                          for c in result.tool_calls]
    usage = result.usage
    msg.time_to_first_token_ms = _ms(usage.time_to_first_token_s)
    msg.prompt_tokens = usage.prompt_tokens
    msg.prompt_tokens_reused = usage.prompt_tokens_reused
    msg.completion_tokens = usage.completion_tokens
    msg.tokens_per_second = float(usage.tokens_per_second)
    return msg


def task_call_to_msg(call: TaskCall) -> ToolCall:
    """The ToolCall message for one validated call of a task step."""
    return ToolCall(id=call.call_id, name=call.name, arguments_json=call.arguments_json,
                    request_id=call.request_id,
                    requires_confirmation=call.requires_confirmation)


def step_to_action(step: StepOutcome, stamp: Time) -> Action:
    """The Action for one task step: its outcome, index, finality and calls (held ones flagged)."""
    msg = outcome_to_action(step.outcome, stamp, step.step, step.final)
    if step.outcome.ok:
        msg.tool_calls = [task_call_to_msg(c) for c in step.calls]
    return msg


def observation_from_msg(msg: ObservationMsg, now: float) -> Observation:
    """The engine observation for a message; ValueError says what is malformed.

    A zero stamp means "now"; attributes must be a JSON object (or empty) nested at most
    :data:`~.engine.json_input.MAX_JSON_DEPTH` levels deep.
    """
    stamp = stamp_seconds(msg.header.stamp) or now
    attributes = {}
    if msg.attributes_json.strip():
        attributes = loads_bounded(msg.attributes_json, 'attributes_json')
        if not isinstance(attributes, dict):
            raise ValueError('attributes_json must be a JSON object')
    pose = None
    if msg.has_pose:
        p, q = msg.pose.position, msg.pose.orientation
        pose = Pose(p.x, p.y, p.z, q.x, q.y, q.z, q.w)
    return Observation(source=msg.source, label=msg.label, stamp=stamp,
                       confidence=float(msg.confidence), pose=pose, attributes=attributes,
                       ttl_s=float(msg.ttl_s), frame_id=msg.header.frame_id)
