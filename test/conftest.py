"""Shared fixtures: an rclpy context with a background executor, and test models.

Every test session runs in its own ROS domain on loopback (tools/test.sh sets both); the
fixtures here refuse to run otherwise so that tests never talk to a real robot.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, period: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


def spin_until(executor, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Spin ``executor`` from this thread until ``predicate`` is true or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.02)
    return predicate()


class RosHarness:
    """An isolated rclpy context whose single-threaded executor spins in a background thread."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        # What nemotron_node spins (see its main); rclpy 9.1's MultiThreadedExecutor delayed
        # deliveries by tens of milliseconds on an idle host (benchmarks/bench_executor.py).
        self.executor = SingleThreadedExecutor(context=self.context)
        self._private: list = []
        self._closing = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        except Exception:
            # rclpy 9.1: a worker still finishing a callback triggers the executor's guard
            # condition after shutdown destroyed it (InvalidHandle). Only while closing.
            if not self._closing:
                raise

    def node(self, name: str, **kwargs):
        """Create a plain node in this context and add it to the executor."""
        from rclpy.node import Node

        node = Node(name, context=self.context, **kwargs)
        self.executor.add_node(node)
        return node

    def private_node(self, name: str, namespace: str = ''):
        """A node with its own executor that only the calling (test) thread spins.

        rclpy 9.1's ``ActionClient.send_goal_async`` registers a pending future and then
        replaces it with a new one; when another executor thread takes the goal response in
        between, the returned future never completes. Action clients therefore live on a node
        that is spun only by the thread that sends the goal (see :func:`spin_until`).
        """
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        node = Node(name, context=self.context, namespace=namespace)
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(node)
        self._private.append((node, executor))
        return node, executor

    def threaded_node(self, name: str):
        """A node spun by a multi-threaded executor of its own, in a background thread.

        For test doubles whose callbacks block (an action server that loops while streaming
        feedback): on the shared single-threaded executor they would hold every other node.
        """
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node

        node = Node(name, context=self.context)
        executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        executor.add_node(node)

        def spin() -> None:
            try:
                executor.spin()
            except Exception:  # the executor was shut down under it (see _spin)
                if not self._closing:
                    raise

        threading.Thread(target=spin, daemon=True).start()
        self._private.append((node, executor))
        return node

    def add(self, node) -> None:
        self.executor.add_node(node)

    def close(self) -> None:
        import rclpy

        self._closing = True
        self.executor.shutdown(timeout_sec=5.0)
        for node, executor in self._private:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
        for node in list(self.executor.get_nodes()):
            node.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(timeout=5.0)
        # Shutdown alone keeps the DDS participant until garbage collection; hundreds of
        # lingering participants in one test process slowed discovery until new action
        # clients sometimes never matched their server.
        self.context.destroy()


@pytest.fixture
def ros() -> Iterator[RosHarness]:
    """A fresh rclpy context with a spinning executor."""
    assert os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') == 'LOCALHOST', \
        'tests must keep DDS discovery on loopback'
    harness = RosHarness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random-weight nemotron_h GGUF, built once per test session."""
    from nemotron_ros.testing.models import tiny_nemotron_h_path

    return str(tiny_nemotron_h_path(tmp_path_factory.mktemp('node_models')))


@pytest.fixture
def node_factory(ros):
    """Make NemotronNodes in the ``ros`` context (configured and active unless told not to),
    in the root namespace unless given one."""
    from node_harness import SUCCESS, node_params

    from nemotron_ros.node import NemotronNode

    nodes = []

    def make(model: str, activate: bool = True, namespace: str = '', **extra):
        node = NemotronNode(context=ros.context, namespace=namespace,
                            parameter_overrides=node_params(model, **extra))
        ros.add(node)
        nodes.append(node)
        if activate:
            assert node.trigger_configure() == SUCCESS
            assert node.trigger_activate() == SUCCESS
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture(params=['llama_cpp', 'torch'])
def served(request, ros, node_factory, tiny_model, tmp_path_factory):
    """An active node on the tiny nemotron_h (llama.cpp) or tiny NemotronH (torch), + client."""
    from node_harness import Client

    if request.param == 'torch':
        pytest.importorskip('torch', reason='the torch backend is not installed '
                            '(NEMOTRON_WITH_TORCH=1 tools/setup.sh)')
        from nemotron_ros.testing.tiny_hf import tiny_hf_path
        model = str(tiny_hf_path(tmp_path_factory.mktemp('hf')))
        node = node_factory(model, backend='torch', n_ctx=8192)
    else:
        node = node_factory(tiny_model)
    client = Client(ros)
    assert wait_for(client.connected, 10.0)
    return node, client
