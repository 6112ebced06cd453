"""Perception files without ROS: parsing, path resolution and adaptation of plain objects.

The schemas here are written out by hand in rosidl's ``get_fields_and_field_types`` format
(vision_msgs 4.x from its .msg files), and messages are plain objects, as the engine sees them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace as Msg

import pytest
import yaml

from nemotron_ros.engine.perception_config import (
    FieldType,
    PerceptionConfigError,
    parse_field_type,
    parse_perception,
    resolve_path,
)
from nemotron_ros.engine.world_state import WorldState

EXAMPLE = Path(__file__).resolve().parents[1] / 'config' / 'perception.example.yaml'

SCHEMA = {
    'std_msgs/Header': {'stamp': 'builtin_interfaces/Time', 'frame_id': 'string'},
    'builtin_interfaces/Time': {'sec': 'int32', 'nanosec': 'uint32'},
    'geometry_msgs/Point': {'x': 'double', 'y': 'double', 'z': 'double'},
    'geometry_msgs/Quaternion': {'x': 'double', 'y': 'double', 'z': 'double', 'w': 'double'},
    'geometry_msgs/Pose': {'position': 'geometry_msgs/Point',
                           'orientation': 'geometry_msgs/Quaternion'},
    'geometry_msgs/PoseStamped': {'header': 'std_msgs/Header', 'pose': 'geometry_msgs/Pose'},
    'geometry_msgs/PoseWithCovariance': {'pose': 'geometry_msgs/Pose',
                                         'covariance': 'double[36]'},
    # vision_msgs 4.x (ROS 2 Humble and newer)
    'vision_msgs/Detection2DArray': {'header': 'std_msgs/Header',
                                     'detections': 'sequence<vision_msgs/Detection2D>'},
    'vision_msgs/Detection2D': {'header': 'std_msgs/Header',
                                'results': 'sequence<vision_msgs/ObjectHypothesisWithPose>',
                                'bbox': 'vision_msgs/BoundingBox2D', 'id': 'string'},
    'vision_msgs/ObjectHypothesisWithPose': {'hypothesis': 'vision_msgs/ObjectHypothesis',
                                             'pose': 'geometry_msgs/PoseWithCovariance'},
    'vision_msgs/ObjectHypothesis': {'class_id': 'string', 'score': 'double'},
    'vision_msgs/BoundingBox2D': {'center': 'vision_msgs/Pose2D', 'size_x': 'double',
                                  'size_y': 'double'},
    'vision_msgs/Pose2D': {'position': 'vision_msgs/Point2D', 'theta': 'double'},
    'vision_msgs/Point2D': {'x': 'double', 'y': 'double'},
    'test_msgs/Robot': {'header': 'std_msgs/Header', 'mode': 'uint8', 'name': 'string<=16',
                        'goal': 'geometry_msgs/PoseStamped', 'heading': 'float',
                        'cells': 'sequence<float, 8>', 'ok': 'boolean'},
}


def fields_of(type_name: str) -> dict[str, str]:
    if type_name not in SCHEMA:
        raise LookupError(f'unknown type {type_name}')
    return SCHEMA[type_name]


def _entries(*entries: dict) -> list:
    return parse_perception({'perception': list(entries)}, fields_of, 'test.yaml')


def _robot(**extra) -> Msg:
    header = Msg(stamp=Msg(sec=0, nanosec=0), frame_id='base')
    goal = Msg(header=Msg(stamp=Msg(sec=0, nanosec=0), frame_id='map'),
               pose=Msg(position=Msg(x=1.0, y=2.0, z=0.0),
                        orientation=Msg(x=0.0, y=0.0, z=0.0, w=1.0)))
    return Msg(**{'header': header, 'mode': 2, 'name': 'rover', 'goal': goal, 'heading': 0.5,
                  'cells': [3.7, 3.8], 'ok': True, **extra})


@pytest.mark.parametrize('text, expected', [
    ('double', FieldType('double')),
    ('string<=16', FieldType('string')),
    ('double[36]', FieldType('double', array=True)),
    ('sequence<float, 8>', FieldType('float', array=True)),
    ('sequence<vision_msgs/Detection2D>', FieldType('vision_msgs/Detection2D', array=True)),
    ('std_msgs/Header', FieldType('std_msgs/Header')),
])
def test_parse_field_type(text: str, expected: FieldType) -> None:
    assert parse_field_type(text) == expected


def test_paths_with_dots_and_indices_resolve_to_their_leaf_type_and_read_values() -> None:
    path = resolve_path('detections[0].results[-1].hypothesis.class_id',
                        'vision_msgs/Detection2DArray', fields_of)
    assert path.leaf == FieldType('string')
    hypotheses = [Msg(hypothesis=Msg(class_id='cup', score=0.9)),
                  Msg(hypothesis=Msg(class_id='mug', score=0.4))]
    message = Msg(detections=[Msg(results=hypotheses)])
    assert path.get(message, message) == 'mug'
    assert resolve_path('cells', 'test_msgs/Robot', fields_of).leaf == FieldType('float', True)


@pytest.mark.parametrize('path, error', [
    ('detections.results', "bad field path 'detections.results': "
     'vision_msgs/Detection2D[] has no field \'results\' (index the array first)'),
    ('header[0]', "bad field path 'header[0]': header is std_msgs/Header, not an array"),
    ('header.frame_id.x', "bad field path 'header.frame_id.x': string has no field 'x'"),
    ('header.frameid', "field 'frameid' does not exist on std_msgs/Header (path "
     "'header.frameid'); it has: stamp, frame_id"),
    ('header..stamp', "bad field path 'header..stamp': '' is not a field name"),
    ('detections[x]', "bad field path 'detections[x]': 'detections[x]' is not a field name"),
])
def test_bad_paths_say_which_step_is_wrong(path: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_path(path, 'vision_msgs/Detection2DArray', fields_of)
    assert str(info.value).startswith(error)


def test_the_commented_vision_msgs_example_entry_matches_vision_msgs_4() -> None:
    """Uncommented, the example's Detection2DArray entry resolves on the vision_msgs 4.x types
    and gives one observation per detection."""
    text = EXAMPLE.read_text()
    block = text[text.index('  # - name: detections'):]
    entry = yaml.safe_load('\n'.join(line.replace('#', '', 1)[1:] if line.strip() else line
                                     for line in block.splitlines()))
    (detections,) = parse_perception({'perception': entry}, fields_of, 'example')
    hypotheses = [Msg(hypothesis=Msg(class_id='person', score=0.875), pose=None)]
    bbox = Msg(center=Msg(position=Msg(x=320.0, y=240.5), theta=0.0), size_x=40.0, size_y=80.0)
    message = Msg(header=Msg(frame_id='camera_optical'),
                  detections=[Msg(results=hypotheses, bbox=bbox), Msg(results=[], bbox=bbox)])
    observations, skipped = detections.observations(message, 10.0)
    assert skipped == ['results[0].hypothesis.class_id: index 0 out of range (length 0)']
    (person,) = observations
    assert (person.source, person.label, person.confidence, person.frame_id) == (
        'camera', 'person', 0.875, 'camera_optical')
    assert dict(person.attributes) == {'center_x_px': 320.0, 'center_y_px': 240.5,
                                       'width_px': 40.0, 'height_px': 80.0}


def test_values_maps_poses_frames_and_stamps() -> None:
    (entry,) = _entries({
        'topic': 'robot', 'type': 'test_msgs/msg/Robot', 'label': {'field': 'name'},
        'source': {'field': 'mode', 'map': {2: 'docking'}}, 'pose': 'goal',
        'stamp': 'goal.header.stamp',
        'attributes': {'mode': {'field': 'mode', 'map': {1: 'idle', 2: 'docking'}},
                       'heading': 'heading', 'ok': 'ok', 'first_cell': 'cells[0]'}})
    assert entry.name == 'robot' and entry.qos == 'sensor_data' and entry.depth == 10
    message = _robot()
    message.goal.header.stamp = Msg(sec=12, nanosec=500_000_000)
    (obs,), skipped = entry.observations(message, now=20.0)
    assert skipped == []
    assert (obs.source, obs.label, obs.stamp, obs.frame_id) == ('docking', 'rover', 12.5, 'map')
    assert (obs.pose.x, obs.pose.y) == (1.0, 2.0)
    assert dict(obs.attributes) == {'mode': 'docking', 'heading': 0.5, 'ok': True,
                                    'first_cell': 3.7}
    message.mode = 7  # not in the map: shown as the number
    (obs,), _ = entry.observations(message, now=20.0)
    assert obs.source == '7' and obs.attributes['mode'] == 7


def test_xyz_pose_with_yaw_and_a_fixed_confidence() -> None:
    (entry,) = _entries({'topic': 't', 'type': 'test_msgs/msg/Robot', 'label': 'x',
                         'confidence': 0.3,
                         'pose': {'x': 'goal.pose.position.x', 'y': 'heading',
                                  'yaw': 'heading'}})
    (obs,), _ = entry.observations(_robot(heading=math.pi / 2), 1.0)
    assert (obs.pose.x, obs.pose.y, obs.pose.z, round(obs.pose.yaw_deg)) == (1.0, math.pi / 2,
                                                                              0.0, 90)
    assert obs.confidence == 0.3 and obs.frame_id == ''


@pytest.mark.parametrize('change, reason', [
    ({'heading': float('nan')}, 'heading is nan'),
    ({'cells': []}, 'cells[0]: index 0 out of range (length 0)'),
    ({'name': '  '}, 'observation label must not be empty'),
])
def test_bad_run_time_values_skip_the_observation_with_a_reason(change: dict,
                                                                reason: str) -> None:
    (entry,) = _entries({'topic': 't', 'type': 'test_msgs/msg/Robot', 'label': {'field': 'name'},
                         'attributes': {'heading': 'heading', 'cell': 'cells[0]'}})
    observations, skipped = entry.observations(_robot(**change), 1.0)
    assert observations == [] and skipped == [reason]


BAD = [
    ({'type': 'nope/msg/Thing'}, 'entry 1 (t): type: unknown type nope/Thing'),
    ({'type': 'test_msgs/Robot'}, "entry 1 (t): type: expected package/msg/Type (e.g. "
     "sensor_msgs/msg/BatteryState), got 'test_msgs/Robot'"),
    ({'label': None}, 'entry 1 (t): label: expected a text or {field: path}, got None'),
    ({'label': {'field': 'name', 'map': {1: 'one'}}}, "entry 1 (t): label: map key 1 can "
     'never equal a string value'),
    ({'label': {'path': 'name'}}, 'entry 1 (t): label: expected a field path or {field: path, '
     "map: {value: name}}, got keys ['path']"),
    ({'attributes': {'s': {'field': 'mode', 'map': {'1': 'idle'}}}}, "entry 1 (t): "
     "attributes.s: map key '1' can never equal a uint8 value"),
    ({'attributes': ['mode']}, 'entry 1 (t): attributes: expected a mapping from name to field '
     'path, got list'),
    ({'confidence': 'name'}, "entry 1 (t): confidence: 'name' is string, not a number"),
    ({'confidence': 1.5}, 'entry 1 (t): confidence: a fixed confidence must be in [0, 1], got '
     '1.5'),
    ({'pose': 'goal.header'}, "entry 1 (t): pose: 'goal.header' is std_msgs/Header; expected "
     'one of geometry_msgs/Pose'),
    ({'pose': {'x': 'heading'}}, 'entry 1 (t): pose: expected the path of a Pose or '
     "PoseStamped, or {x: path, y: path, z: path, yaw: path}, got keys ['x']"),
    ({'pose': {'x': 'heading', 'y': 'name'}}, "entry 1 (t): pose.y: 'name' is string, not a "
     'number'),
    ({'frame_id': 'mode'}, "entry 1 (t): frame_id: 'mode' is uint8, not text"),
    ({'stamp': 'header'}, "entry 1 (t): stamp: 'header' is std_msgs/Header, not a "
     'builtin_interfaces/Time'),
    ({'each': 'header'}, "entry 1 (t): each: 'header' is std_msgs/Header, not an array of "
     'messages'),
    ({'name': 'two words'}, "entry 1 (two words): name: must be letters, digits and _ / . -, "
     "got 'two words'"),
    ({'min_period_s': True}, 'entry 1 (t): min_period_s: must be a number in [0, 3600], got '
     'True'),
]


@pytest.mark.parametrize('change, error', BAD)
def test_every_bad_entry_is_one_line_naming_file_entry_and_field(change: dict,
                                                                 error: str) -> None:
    entry = {'topic': 't', 'type': 'test_msgs/msg/Robot', 'label': 'robot', **change}
    with pytest.raises(PerceptionConfigError) as info:
        _entries(entry)
    assert str(info.value).startswith(f'perception_file test.yaml: {error}'), str(info.value)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('data, error', [
    ({'entries': []}, "expected a mapping with the one key perception (a list of entries), "
     "got ['entries']"),
    ({'perception': {'topic': 't'}}, 'perception must be a list of entries, got dict'),
    ({'perception': ['t']}, 'entry 1: expected a mapping with topic, type and label, got str'),
    ({'perception': [{'topic': 't', 'type': 'test_msgs/msg/Robot'}]},
     'entry 1 (t): label: missing (every entry needs topic, type and label)'),
    ({'perception': [{'topic': 't', 'type': 'test_msgs/msg/Robot', 'label': 'a'},
                     {'topic': 't', 'type': 'test_msgs/msg/Robot', 'label': 'b'}]},
     "entry 2 (t): name: 't' is used by two entries; give each a distinct name"),
])
def test_bad_file_shapes(data: object, error: str) -> None:
    with pytest.raises(PerceptionConfigError, match=re.escape(f'test.yaml: {error}')):
        parse_perception(data, fields_of, 'test.yaml')


def test_empty_file_means_no_entries() -> None:
    assert parse_perception(None, fields_of, 'x') == []
    assert parse_perception({'perception': None}, fields_of, 'x') == []


def test_each_element_feeds_a_bounded_world_state() -> None:
    (entry,) = _entries({'topic': 'd', 'type': 'vision_msgs/msg/Detection2DArray',
                         'each': 'detections', 'source': 'camera',
                         'label': {'field': 'results[0].hypothesis.class_id'},
                         'confidence': 'results[0].hypothesis.score'})
    world = WorldState(max_observations=16, default_ttl_s=100.0)
    for batch in range(100):
        detections = [Msg(results=[Msg(hypothesis=Msg(class_id=f'o{batch}-{i}', score=0.5))])
                      for i in range(100)]
        observations, skipped = entry.observations(Msg(detections=detections), float(batch))
        assert len(observations) == 100 and not skipped
        for observation in observations:
            world.update(observation, float(batch))
    assert len(world) == 16
    assert all(o.label.startswith('o99-') for o in world.observations(99.0))
