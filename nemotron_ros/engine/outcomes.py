"""How a finished generation becomes an answer: its status and what ``status_message`` says.

* A generation stopped at the deadline, cut by the budget's token cap, or finished after the
  deadline is ``BUDGET_EXCEEDED``, never ``OK``.
* Under ``tool_choice`` ``REQUIRED`` an answer without a valid tool call is
  ``INVALID_OUTPUT``: the caller asked for an action and got none.
* Tool calls the model wrote that were not passed on (refused by validation, cut by
  ``max_tokens`` or the deadline) are listed after the status's own message:
  ``dropped 1 tool call: call_0: navigate_to: speed 9 > max 1.0``.
"""

from __future__ import annotations

import re
import time

from .tickets import RequestStatus, Ticket, ms
from .types import FinishReason, GenerationRequest, GenerationResult, ToolChoice

_CALL_REF = re.compile(r'^(call_\d+|tool call block \d+)\b')


def classify(ticket: Ticket, request: GenerationRequest, result: GenerationResult,
             capped: bool) -> tuple[RequestStatus, str]:
    """The status and message of ``ticket``'s finished generation.

    :param request: the generation as it ran (its ``max_tokens`` is the one it ran with).
    :param capped: the budget lowered ``max_tokens`` below the request's own limit.
    """
    status, message = _status(ticket, request, result, capped)
    dropped = count_dropped(result.rejected)
    if dropped:
        note = (f'dropped {dropped} tool call{"s" if dropped > 1 else ""}: '
                + '; '.join(result.rejected))
        message = f'{message}; {note}' if message else note
    return status, message


def count_dropped(rejected: list[str]) -> int:
    """Tool calls behind the rejection messages (one call may have several problems)."""
    calls: set[str] = set()
    other = 0
    for message in rejected:
        match = _CALL_REF.match(message)
        if match:
            calls.add(match.group(1))
        else:
            other += 1
    return len(calls) + other


def _status(ticket: Ticket, request: GenerationRequest, result: GenerationResult,
            capped: bool) -> tuple[RequestStatus, str]:
    finished = time.monotonic()
    reason = result.finish_reason
    max_tokens = request.sampling.max_tokens
    if ticket.stopped_as is not None:
        return ticket.stopped_as, 'stopped'
    if reason is FinishReason.DEADLINE:
        return (RequestStatus.BUDGET_EXCEEDED,
                f'stopped at the deadline after {result.usage.completion_tokens} tokens')
    if finished > ticket.deadline:
        return (RequestStatus.BUDGET_EXCEEDED,
                f'answer came {ms(finished - ticket.deadline)} after the deadline')
    if reason is FinishReason.ERROR:
        return RequestStatus.ERROR, f'backend error: {result.error or "unknown"}'
    if reason is FinishReason.CANCELLED:
        return RequestStatus.CANCELED, 'generation was canceled'
    if reason is FinishReason.LENGTH and capped:
        return (RequestStatus.BUDGET_EXCEEDED,
                f'stopped at {max_tokens} tokens, the most the budget allows')
    if request.tool_choice is ToolChoice.REQUIRED and not result.tool_calls:
        cut = f', stopped at max_tokens ({max_tokens})' if reason is FinishReason.LENGTH else ''
        return RequestStatus.INVALID_OUTPUT, f'no valid tool call although one is required{cut}'
    if reason is FinishReason.LENGTH:
        return RequestStatus.OK, f'stopped at max_tokens ({max_tokens})'
    return RequestStatus.OK, ''
