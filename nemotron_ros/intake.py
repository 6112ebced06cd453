"""Request intake: DDS callbacks hand requests over in O(1); one thread submits them.

A subscription callback that tokenizes, renders the world state and runs admission control
holds the DDS reader while a burst piles up behind it, and a reader whose history overflows
loses requests before anyone has seen them. The node's callbacks therefore only append the
request to this bounded FIFO and return; a single worker thread takes requests in arrival
order and submits them to the engine. When the FIFO is full the callback is told so at once
and answers the request itself (REJECTED_BUSY), so nothing is lost either way.

ROS-free: the node supplies the submit and fail functions.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

_LOG = logging.getLogger(__name__)

Item = TypeVar('Item')


class Intake(Generic[Item]):
    """A bounded FIFO drained by one worker thread.

    :param submit: called on the worker thread for each item, in arrival order.
    :param fail: called with the item and the exception when ``submit`` raises, so the
        request still gets its one answer.
    :param capacity: items held at most; ``put`` refuses more.
    """

    def __init__(self, submit: Callable[[Item], None],
                 fail: Callable[[Item, BaseException], None], capacity: int,
                 name: str = 'intake') -> None:
        if capacity < 1:
            raise ValueError(f'intake capacity must be >= 1, got {capacity}')
        self._submit = submit
        self._fail = fail
        self._capacity = capacity
        self._items: deque[Item] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    def put(self, item: Item) -> bool:
        """Queue ``item``; False (and nothing queued) when full or closed. O(1)."""
        with self._cv:
            if self._closed or len(self._items) >= self._capacity:
                self.refused += 1
                return False
            self._items.append(item)
            self.accepted += 1
            self._cv.notify()
            return True

    def close(self, timeout: float = 5.0) -> bool:
        """Submit what is queued, refuse new items and stop the worker; False on timeout."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return
                item = self._items.popleft()
            try:
                self._submit(item)
            except Exception as exc:  # every request still gets its answer
                _LOG.exception('intake: submitting a request failed')
                try:
                    self._fail(item, exc)
                except Exception:
                    _LOG.exception('intake: answering a failed request failed')
