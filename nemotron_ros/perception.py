"""Subscriptions to the robot's own perception topics, declared in a perception file.

The file's entries (:mod:`.engine.perception_config`) name any installed message type; the
type is imported dynamically (``importlib`` on ``<package>.msg``), so vision_msgs and the like
need no dependency of ours. The subscriptions follow the node's lifecycle: created at
``configure``, destroyed at ``cleanup``; a new file takes effect at the next ``configure``.

A 200 Hz topic must not cost the node much: subscriptions take the *serialized* message, and
the rate limit (``min_period_s``) and the inactive check run before anything else, so a dropped
message is never even deserialized. All of them share one mutually exclusive callback group:
perception never takes more than one executor thread and never delays a request.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.serialization import deserialize_message
from rclpy.validate_topic_name import validate_topic_name

from .engine.perception_config import PerceptionConfigError, PerceptionEntry, parse_perception
from .engine.world_state import Observation

PACKAGE_PREFIX = 'package://'
#: Skipped observations are logged at most once per this period per entry.
LOG_PERIOD_S = 5.0


def message_class(type_name: str) -> type:
    """The Python class of ``pkg/Name`` or ``pkg/msg/Name``.

    :raises LookupError: the package or the type is not installed (the message says what to
        install).
    """
    parts = type_name.split('/')
    package, name = parts[0], parts[-1]
    try:
        module = importlib.import_module(f'{package}.msg')
    except ImportError:
        distro = os.environ.get('ROS_DISTRO', '<distro>')
        raise LookupError(f'unknown type {type_name}: package {package} is not installed '
                          f'(install ros-{distro}-{package.replace("_", "-")})') from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type) or not hasattr(cls, 'get_fields_and_field_types'):
        raise LookupError(f'unknown type {type_name}: package {package} has no message '
                          f'{name}') from None
    return cls


@functools.cache
def message_fields(type_name: str) -> dict[str, str]:
    """Field name -> rosidl type string of ``pkg/Name`` (the schema the file is checked on)."""
    return dict(message_class(type_name).get_fields_and_field_types())


def resolve_file(text: str) -> Path:
    """A perception file path; ``package://<pkg>/<path>`` is in that package's share folder.

    :raises PerceptionConfigError: the package is not installed or the file does not exist.
    """
    path = Path(text)
    if text.startswith(PACKAGE_PREFIX):
        package, _, rest = text[len(PACKAGE_PREFIX):].partition('/')
        try:
            path = Path(get_package_share_directory(package)) / rest
        except (PackageNotFoundError, ValueError):
            raise PerceptionConfigError(f'perception_file {text}: package {package!r} is not '
                                        'installed') from None
    if not path.is_file():
        raise PerceptionConfigError(f'perception_file {text}: no such file')
    return path


def load_perception_file(text: str) -> list[PerceptionEntry]:
    """Read and check a perception file ('' = none); every path is resolved against its type.

    :raises PerceptionConfigError: one line naming the file, the entry and the field.
    """
    if not text:
        return []
    path = resolve_file(text)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = ' '.join(str(exc).split())
        raise PerceptionConfigError(f'perception_file {text}: cannot read it: {reason}') from None
    entries = parse_perception(data, message_fields, str(text))
    for number, entry in enumerate(entries, 1):
        try:
            validate_topic_name(entry.topic)
        except Exception as exc:  # rclpy's message spans lines, with a caret under the fault
            reason = str(exc).splitlines()[0]
            raise PerceptionConfigError(f'perception_file {text}: entry {number} ({entry.name})'
                                        f': topic: {entry.topic!r}: {reason}') from None
    return entries


def entry_qos(entry: PerceptionEntry) -> QoSProfile:
    """``sensor_data``: best effort (matches every publisher); ``reliable``: reliable."""
    reliability = (qos_profile_sensor_data.reliability if entry.qos == 'sensor_data'
                   else ReliabilityPolicy.RELIABLE)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=entry.depth,
                      reliability=reliability, durability=DurabilityPolicy.VOLATILE)


class PerceptionSource:
    """One entry's subscription and counts (only touched from the perception group)."""

    def __init__(self, entry: PerceptionEntry, owner: Perception) -> None:
        self.entry = entry
        self.cls = message_class(entry.type_name)
        self.owner = owner
        self.last_kept = -float('inf')
        self.last_log = -float('inf')
        self.messages = 0
        self.kept = 0
        self.dropped = 0
        self.bad = 0
        self.subscription: Any = None

    def on_message(self, data: bytes) -> None:
        """Drop (inactive, rate limit) before any work; else adapt into the world state."""
        self.messages += 1
        owner = self.owner
        started = time.monotonic()
        if not owner.active() or started - self.last_kept < self.entry.min_period_s:
            self.dropped += 1
            return
        self.last_kept = started
        try:
            message = deserialize_message(data, self.cls)
            observations, skipped = self.entry.observations(message, owner.now())
            for observation in observations:
                owner.observe(observation)
        except Exception as exc:  # a bad message must never end the node
            observations, skipped = [], [f'{type(exc).__name__}: {exc}']
        self.kept += 1  # counted once its observations are stored
        if skipped:
            self.bad += len(skipped)
            if started - self.last_log >= LOG_PERIOD_S:  # throttled per source, not per line
                self.last_log = started
                owner.node.get_logger().warning(
                    f'perception {self.entry.name}: skipped {len(skipped)} observation(s) of a '
                    f'{self.entry.type_name} on {self.entry.topic}: {skipped[0]}')


class Perception:
    """The node's perception subscriptions, from the perception file of the last configure.

    :param observe: stores one observation in the world state.
    :param active: whether the node serves now (messages are dropped while not).
    :param now: the node's clock, in seconds.
    """

    def __init__(self, node: Node, observe: Callable[[Observation], Any],
                 active: Callable[[], bool], now: Callable[[], float]) -> None:
        self.node = node
        self.observe = observe
        self.active = active
        self.now = now
        self._group = MutuallyExclusiveCallbackGroup()
        self._sources: list[PerceptionSource] = []

    def start(self, entries: list[PerceptionEntry]) -> None:
        """Subscribe to every entry's topic (after any previous subscriptions are gone)."""
        self.stop()
        for entry in entries:
            source = PerceptionSource(entry, self)
            source.subscription = self.node.create_subscription(
                source.cls, entry.topic, source.on_message, entry_qos(entry),
                callback_group=self._group, raw=True)
            self._sources.append(source)
        if entries:
            self.node.get_logger().info(
                'perception: ' + ', '.join(f'{e.topic} ({e.type_name})' for e in entries))

    def stop(self) -> None:
        """Destroy every subscription (cleanup); idempotent."""
        sources, self._sources = self._sources, []
        for source in sources:
            try:
                self.node.destroy_subscription(source.subscription)
            except Exception:  # the node may already be going away at process exit
                pass

    @property
    def topics(self) -> list[str]:
        return [source.entry.topic for source in self._sources]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per entry name: messages, kept, dropped (inactive or rate limit) and bad (skipped
        observations)."""
        return {s.entry.name: {'messages': s.messages, 'kept': s.kept, 'dropped': s.dropped,
                               'bad': s.bad} for s in self._sources}

    def diagnostic_values(self) -> list[tuple[str, int]]:
        return [(f'perception.{name}.{key}', value)
                for name, counts in self.counts().items() for key, value in counts.items()]
