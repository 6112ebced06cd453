"""Perception files: how messages of any installed type become world-state observations.

Robots publish ``sensor_msgs/BatteryState``, ``nav_msgs/Odometry``, detection arrays and plain
strings, not our ``Observation``. A perception file declares, per topic, which fields of the
message give an observation's source, label, confidence, pose, frame and attributes, so that
perception is configuration instead of relay nodes.

Everything is checked once, when the file is loaded at ``configure``: every field path is
resolved against the message's field types (as rosidl's ``get_fields_and_field_types`` gives
them), so a typo fails the transition with one line naming the file, the entry and the field,
never at the first message. At run time a message only walks the precompiled paths; a bad value
(NaN, a missing array index, an empty label) skips that observation with a reason.

ROS-free on purpose: the type information comes through a callable (``fields_of``), and
messages are read as plain Python objects (attributes and sequences), so this module is tested
without rclpy and the node supplies the real types (:mod:`nemotron_ros.perception`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from .world_state import Observation, Pose

#: ``fields_of('sensor_msgs/BatteryState')`` -> ``{'voltage': 'float', ...}``; raises
#: LookupError with a readable reason for a type that cannot be loaded.
FieldsOf = Callable[[str], Mapping[str, str]]

QOS_PROFILES = ('sensor_data', 'reliable')
MAX_DEPTH = 10000
MAX_TTL_S = 1e9
#: Attribute floats are rounded to this many decimals, so the rendered block stays compact.
FLOAT_DECIMALS = 3

_ENTRY_KEYS = ('name', 'topic', 'type', 'qos', 'depth', 'source', 'label', 'confidence',
               'pose', 'frame_id', 'stamp', 'attributes', 'each', 'ttl_s', 'min_period_s')
_NAME = r'[A-Za-z_][A-Za-z0-9_]*'
_STEP = re.compile(rf'({_NAME})(?:\[(-?\d+)\])?')
_TYPE = re.compile(rf'({_NAME})/msg/({_NAME})')
_NUMBERS = frozenset({'float', 'double', 'long double', 'float32', 'float64', 'int8', 'uint8',
                      'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'octet'})
_FLOATS = frozenset({'float', 'double', 'long double', 'float32', 'float64'})
_TEXT = frozenset({'string', 'wstring'})
#: Pose-bearing geometry types and the steps from each to its ``geometry_msgs/Pose``.
_POSE_STEPS = {'geometry_msgs/Pose': (),
               'geometry_msgs/PoseStamped': ('pose',),
               'geometry_msgs/PoseWithCovariance': ('pose',),
               'geometry_msgs/PoseWithCovarianceStamped': ('pose', 'pose')}
_STAMPED_POSES = ('geometry_msgs/PoseStamped', 'geometry_msgs/PoseWithCovarianceStamped')


class PerceptionConfigError(ValueError):
    """A perception file that cannot be used; the message is one line naming file, entry and
    field."""


class BadValueError(ValueError):
    """A message value that cannot become an observation (NaN, a missing index, ...)."""


@dataclass(frozen=True)
class FieldType:
    """One field's type: a primitive (``double``, ``string``) or a message (``pkg/Name``),
    possibly an array or sequence of them."""

    name: str
    array: bool = False

    @property
    def is_message(self) -> bool:
        return '/' in self.name

    @property
    def is_number(self) -> bool:
        return not self.array and self.name in _NUMBERS

    @property
    def is_scalar(self) -> bool:
        """A single value an observation can show: number, boolean or text."""
        return not self.array and not self.is_message

    def element(self) -> FieldType:
        return FieldType(self.name)

    def __str__(self) -> str:
        return f'{self.name}[]' if self.array else self.name


def parse_field_type(text: str) -> FieldType:
    """Parse a rosidl field type string: ``double``, ``string<=8``, ``double[36]``,
    ``sequence<visualization_msgs/Marker>``, ``sequence<int32, 4>``."""
    text = text.strip()
    if text.startswith('sequence<') and text.endswith('>'):
        inner = text[len('sequence<'):-1].split(',')[0]
        return FieldType(_base_type(inner), array=True)
    if text.endswith(']') and '[' in text:
        return FieldType(_base_type(text[:text.rindex('[')]), array=True)
    return FieldType(_base_type(text))


def _base_type(text: str) -> str:
    text = text.strip()
    for bounded in ('string<=', 'wstring<='):
        if text.startswith(bounded):
            return bounded[:-2]
    return text


@dataclass(frozen=True)
class FieldPath:
    """A resolved path such as ``results[0].hypothesis.class_id``.

    :param from_root: read from the message itself, not from the ``each`` element (the path
        was written with a leading ``/``).
    :param leaf: the type of the value the path reaches.
    """

    text: str
    steps: tuple[tuple[str, Optional[int]], ...]
    leaf: FieldType
    from_root: bool = False

    def get(self, element: Any, message: Any) -> Any:
        """The value at this path; BadValueError when an index is missing."""
        value = message if self.from_root else element
        for name, index in self.steps:
            value = getattr(value, name)
            if index is not None:
                try:
                    value = value[index]
                except IndexError:
                    raise BadValueError(f'{self.text}: index {index} out of range '
                                   f'(length {len(value)})') from None
        return value


def resolve_path(text: object, root: str, fields_of: FieldsOf,
                 element: Optional[str] = None) -> FieldPath:
    """Resolve ``text`` against message type ``root`` (or the ``each`` element type).

    :param element: the ``each`` element's type; paths are relative to it unless they start
        with ``/``.
    :raises ValueError: the path does not exist on the type (the message says which step).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f'expected a field path (text such as pose.pose.position.x), '
                         f'got {text!r}')
    from_root = text.startswith('/')
    body = text[1:] if from_root else text
    current = FieldType(root if from_root or element is None else element)
    steps = []
    for part in body.split('.'):
        match = _STEP.fullmatch(part)
        if match is None:
            raise ValueError(f'bad field path {text!r}: {part!r} is not a field name with an '
                             f'optional [index]')
        name, index = match.group(1), match.group(2)
        if current.array or not current.is_message:
            raise ValueError(f'bad field path {text!r}: {current} has no field {name!r}'
                             + (' (index the array first)' if current.array else ''))
        fields = _fields(fields_of, current.name)
        if name not in fields:
            raise ValueError(f'field {name!r} does not exist on {current.name} (path {text!r});'
                             f' it has: {", ".join(fields)}')
        current = parse_field_type(fields[name])
        if index is not None:
            if not current.array:
                raise ValueError(f'bad field path {text!r}: {name} is {current}, not an array')
            current = current.element()
        steps.append((name, None if index is None else int(index)))
    return FieldPath(text, tuple(steps), current, from_root)


def _fields(fields_of: FieldsOf, type_name: str) -> Mapping[str, str]:
    try:
        return fields_of(type_name)
    except LookupError as exc:
        raise ValueError(str(exc).strip('"\'')) from exc


@dataclass(frozen=True)
class Value:
    """A field path to one scalar, with an optional map of its values to names (enums)."""

    path: FieldPath
    names: Mapping[Any, str]

    def _raw(self, element: Any, message: Any) -> Any:
        raw = self.path.get(element, message)
        if isinstance(raw, bytes):  # octet fields
            return raw[0] if len(raw) == 1 else raw.hex()
        return raw.item() if hasattr(raw, 'item') else raw  # numpy scalars of fixed arrays

    def read(self, element: Any, message: Any) -> Union[str, float, int, bool]:
        raw = self._raw(element, message)
        if self.names and raw in self.names:
            return self.names[raw]
        if isinstance(raw, float):
            if not math.isfinite(raw):
                raise BadValueError(f'{self.path.text} is {raw}')
            return round(raw, FLOAT_DECIMALS)
        return raw

    def number(self, element: Any, message: Any) -> float:
        value = float(self._raw(element, message))
        if not math.isfinite(value):
            raise BadValueError(f'{self.path.text} is {value}')
        return value


@dataclass(frozen=True)
class Text:
    """A fixed text, or a field read as text (source and label)."""

    fixed: str = ''
    value: Optional[Value] = None

    def read(self, element: Any, message: Any) -> str:
        return self.fixed if self.value is None else str(self.value.read(element, message))


@dataclass(frozen=True)
class PoseSpec:
    """Where the pose is: the path of a ``geometry_msgs/Pose``, or x/y/z (and yaw) fields."""

    pose: Optional[FieldPath] = None
    xyz: tuple[Optional[Value], ...] = ()
    yaw: Optional[Value] = None

    def read(self, element: Any, message: Any) -> Pose:
        if self.pose is not None:
            pose = self.pose.get(element, message)
            p, q = pose.position, pose.orientation
            values = (p.x, p.y, p.z, q.x, q.y, q.z, q.w)
            if not all(math.isfinite(v) for v in values):
                raise BadValueError(f'{self.pose.text} is not finite: {values}')
            return Pose(*values)
        x, y, z = (0.0 if v is None else v.number(element, message) for v in self.xyz)
        if self.yaw is None:
            return Pose(x, y, z)
        half = self.yaw.number(element, message) / 2.0
        return Pose(x, y, z, qz=math.sin(half), qw=math.cos(half))


@dataclass(frozen=True)
class PerceptionEntry:
    """One subscription of a perception file and how its messages become observations."""

    name: str
    topic: str
    type_name: str
    qos: str
    depth: int
    source: Text
    label: Text
    confidence: Union[float, Value] = 1.0
    pose: Optional[PoseSpec] = None
    frame_id: Optional[Value] = None
    stamp: Optional[FieldPath] = None
    attributes: tuple[tuple[str, Value], ...] = ()
    each: Optional[FieldPath] = None
    ttl_s: float = 0.0
    min_period_s: float = 0.0

    @property
    def package(self) -> str:
        return self.type_name.split('/')[0]

    def observations(self, message: Any, now: float) -> tuple[list[Observation], list[str]]:
        """The observations of one message, and why any element was skipped.

        :param now: the receive time, used when there is no (or a zero) stamp.
        """
        elements = [message] if self.each is None else self.each.get(message, message)
        kept, skipped = [], []
        for element in elements:
            try:
                kept.append(self._observation(element, message, now))
            except (BadValueError, ValueError, AttributeError, TypeError) as exc:
                skipped.append(str(exc))
        return kept, skipped

    def _observation(self, element: Any, message: Any, now: float) -> Observation:
        stamp = now
        if self.stamp is not None:
            time = self.stamp.get(element, message)
            stamp = (time.sec + time.nanosec * 1e-9) or now
        source, label = self.source.read(element, message), self.label.read(element, message)
        confidence = self.confidence
        if isinstance(confidence, Value):
            confidence = confidence.number(element, message)
        return Observation(
            source=source, label=label, stamp=stamp, confidence=confidence,
            pose=None if self.pose is None else self.pose.read(element, message),
            attributes={name: value.read(element, message) for name, value in self.attributes},
            ttl_s=self.ttl_s,
            frame_id='' if self.frame_id is None else str(self.frame_id.read(element, message)))


def parse_perception(data: Any, fields_of: FieldsOf, origin: str) -> list[PerceptionEntry]:
    """Check a loaded perception file and resolve every path.

    :param data: the YAML document: ``{'perception': [entry, ...]}`` (empty or null = none).
    :param origin: the file name, for errors.
    :raises PerceptionConfigError: one line naming ``origin``, the entry and the field.
    """
    if data is None:
        return []
    if not isinstance(data, Mapping) or set(data) - {'perception'}:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise PerceptionConfigError(f'perception_file {origin}: expected a mapping with the one'
                                    f' key perception (a list of entries), got {keys}')
    entries = data.get('perception') or []
    if not isinstance(entries, list):
        raise PerceptionConfigError(f'perception_file {origin}: perception must be a list of '
                                    f'entries, got {type(entries).__name__}')
    result: list[PerceptionEntry] = []
    for number, raw in enumerate(entries, 1):
        where = f'perception_file {origin}: entry {number}'
        if isinstance(raw, Mapping):
            where += f' ({raw.get("name") or raw.get("topic")})'
        parser = _EntryParser(raw, fields_of, where)
        entry = parser.parse()
        for other in result:
            if other.name == entry.name:
                raise PerceptionConfigError(f'{where}: name: {entry.name!r} is used by two '
                                            'entries; give each a distinct name')
        result.append(entry)
    return result


class _EntryParser:
    """Checks one entry; every error names the key it is about."""

    def __init__(self, raw: Any, fields_of: FieldsOf, where: str) -> None:
        self._raw = raw
        self._fields_of = fields_of
        self._where = where
        self._root = ''
        self._element: Optional[str] = None

    def _error(self, key: str, problem: str) -> PerceptionConfigError:
        return PerceptionConfigError(f'{self._where}: {key}: {problem}')

    def parse(self) -> PerceptionEntry:
        raw = self._raw
        if not isinstance(raw, Mapping):
            raise PerceptionConfigError(f'{self._where}: expected a mapping with topic, type '
                                        f'and label, got {type(raw).__name__}')
        unknown = [str(k) for k in raw if k not in _ENTRY_KEYS]
        if unknown:
            raise self._error(unknown[0], f'unknown key; the keys are: {", ".join(_ENTRY_KEYS)}')
        for key in ('topic', 'type', 'label'):
            if key not in raw:
                raise self._error(key, 'missing (every entry needs topic, type and label)')
        topic = self._text('topic')
        type_name = self._type()
        name = raw.get('name', topic.lstrip('/'))
        if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9_/.-]+', name):
            raise self._error('name', f'must be letters, digits and _ / . -, got {name!r}')
        each = None
        if raw.get('each') is not None:
            each = self._path('each', raw['each'])
            if not (each.leaf.array and each.leaf.is_message):
                raise self._error('each', f'{each.text!r} is {each.leaf}, not an array of '
                                  'messages')
            self._element = each.leaf.name
        qos = raw.get('qos', 'sensor_data')
        if qos not in QOS_PROFILES:
            raise self._error('qos', f'must be one of {", ".join(QOS_PROFILES)}, got {qos!r}')
        return PerceptionEntry(
            name=name, topic=topic, type_name=type_name, qos=qos,
            depth=self._number('depth', 10, 1, MAX_DEPTH, integer=True),
            source=self._text_spec('source', name), label=self._text_spec('label', None),
            confidence=self._confidence(), pose=self._pose(), frame_id=self._frame(),
            stamp=self._stamp(), attributes=self._attributes(), each=each,
            ttl_s=self._number('ttl_s', 0.0, 0.0, MAX_TTL_S),
            min_period_s=self._number('min_period_s', 0.0, 0.0, 3600.0))

    def _text(self, key: str) -> str:
        value = self._raw[key]
        if not isinstance(value, str) or not value.strip():
            raise self._error(key, f'must be a non-empty string, got {value!r}')
        return value

    def _type(self) -> str:
        text = self._text('type')
        match = _TYPE.fullmatch(text)
        if match is None:
            raise self._error('type', f'expected package/msg/Type (e.g. '
                              f'sensor_msgs/msg/BatteryState), got {text!r}')
        self._root = f'{match.group(1)}/{match.group(2)}'
        try:
            self._fields_of(self._root)
        except LookupError as exc:
            raise self._error('type', str(exc).strip('"\'')) from None
        return text

    def _path(self, key: str, text: object) -> FieldPath:
        try:
            return resolve_path(text, self._root, self._fields_of, self._element)
        except ValueError as exc:
            raise self._error(key, str(exc)) from None

    def _number(self, key: str, default: float, low: float, high: float,
                integer: bool = False) -> Any:
        value = self._raw.get(key, default)
        kinds = (int,) if integer else (int, float)
        if (isinstance(value, bool) or not isinstance(value, kinds)
                or not (math.isfinite(value) and low <= value <= high)):
            kind = 'an integer' if integer else 'a number'
            raise self._error(key, f'must be {kind} in [{low:g}, {high:g}], got {value!r}')
        return value if integer else float(value)

    def _value(self, key: str, spec: object, *, scalar: bool = True) -> Value:
        """A field path, or ``{field: path, map: {raw value: name}}``."""
        names: Mapping[Any, str] = {}
        if isinstance(spec, Mapping):
            extra = set(spec) - {'field', 'map'}
            if extra or 'field' not in spec:
                raise self._error(key, 'expected a field path or {field: path, map: {value: '
                                  f'name}}}}, got keys {sorted(map(str, spec))}')
            names = spec.get('map') or {}
            if not isinstance(names, Mapping) or not all(
                    isinstance(v, str) and v for v in names.values()):
                raise self._error(key, f'map must map values to non-empty names, got {names!r}')
            spec = spec['field']
        path = self._path(key, spec)
        if scalar and not path.leaf.is_scalar:
            fields = ''
            if path.leaf.is_message and not path.leaf.array:
                fields = f'; name one of its fields: {", ".join(self._fields_of(path.leaf.name))}'
            elif path.leaf.array:
                fields = '; pick one element with [index]'
            raise self._error(key, f'{path.text!r} is {path.leaf}, not a single value{fields}')
        if names and path.leaf.name in _TEXT:
            bad = [k for k in names if not isinstance(k, str)]
        else:
            bad = [k for k in names if isinstance(k, bool) or not isinstance(k, (int, float))]
        if bad:
            raise self._error(key, f'map key {bad[0]!r} can never equal a {path.leaf} value')
        return Value(path, dict(names))

    def _text_spec(self, key: str, default: Optional[str]) -> Text:
        spec = self._raw.get(key, default)
        if isinstance(spec, str) and spec.strip():
            return Text(fixed=spec)
        if isinstance(spec, Mapping):
            return Text(value=self._value(key, spec))
        raise self._error(key, f'expected a text or {{field: path}}, got {spec!r}')

    def _numeric(self, key: str, spec: object) -> Value:
        value = self._value(key, spec)
        if not value.path.leaf.is_number:
            raise self._error(key, f'{value.path.text!r} is {value.path.leaf}, not a number')
        return value

    def _confidence(self) -> Union[float, Value]:
        spec = self._raw.get('confidence', 1.0)
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            if not (math.isfinite(spec) and 0.0 <= spec <= 1.0):
                raise self._error('confidence', f'a fixed confidence must be in [0, 1], got '
                                  f'{spec}')
            return float(spec)
        return self._numeric('confidence', spec)

    def _pose(self) -> Optional[PoseSpec]:
        spec = self._raw.get('pose')
        if spec is None:
            return None
        if isinstance(spec, Mapping):
            extra = set(spec) - {'x', 'y', 'z', 'yaw'}
            if extra or not {'x', 'y'} <= set(spec):
                raise self._error('pose', 'expected the path of a Pose or PoseStamped, or '
                                  f'{{x: path, y: path, z: path, yaw: path}}, got keys '
                                  f'{sorted(map(str, spec))}')
            xyz = tuple(None if spec.get(k) is None else self._numeric(f'pose.{k}', spec[k])
                        for k in ('x', 'y', 'z'))
            yaw = None if spec.get('yaw') is None else self._numeric('pose.yaw', spec['yaw'])
            return PoseSpec(xyz=xyz, yaw=yaw)
        path = self._path('pose', spec)
        if path.leaf.array or path.leaf.name not in _POSE_STEPS:
            raise self._error('pose', f'{path.text!r} is {path.leaf}; expected one of '
                              f'{", ".join(_POSE_STEPS)}, or {{x: path, y: path, ...}}')
        pose_path = self._path('pose', '.'.join(
            (path.text, *_POSE_STEPS[path.leaf.name])))
        return PoseSpec(pose=pose_path)

    def _frame(self) -> Optional[Value]:
        spec = self._raw.get('frame_id')
        if spec is None:
            pose = self._raw.get('pose')
            if isinstance(pose, str):  # a stamped pose brings its frame
                leaf = self._path('pose', pose).leaf
                if not leaf.array and leaf.name in _STAMPED_POSES:
                    return self._value('frame_id', f'{pose}.header.frame_id')
            return None
        value = self._value('frame_id', spec)
        if value.path.leaf.name not in _TEXT:
            raise self._error('frame_id', f'{value.path.text!r} is {value.path.leaf}, not text')
        return value

    def _stamp(self) -> Optional[FieldPath]:
        spec = self._raw.get('stamp')
        if spec is None:
            return None
        path = self._path('stamp', spec)
        if path.leaf.array or path.leaf.name != 'builtin_interfaces/Time':
            raise self._error('stamp', f'{path.text!r} is {path.leaf}, not a '
                              'builtin_interfaces/Time (e.g. header.stamp)')
        return path

    def _attributes(self) -> tuple[tuple[str, Value], ...]:
        spec = self._raw.get('attributes') or {}
        if not isinstance(spec, Mapping):
            raise self._error('attributes', 'expected a mapping from name to field path, got '
                              f'{type(spec).__name__}')
        result = []
        for name, field_spec in spec.items():
            if not isinstance(name, str) or not name:
                raise self._error('attributes', f'attribute names must be text, got {name!r}')
            result.append((name, self._value(f'attributes.{name}', field_spec)))
        return tuple(result)

