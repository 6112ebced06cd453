#!/usr/bin/env python3
"""What perception from standard messages costs the node: per message, per process, per render.

A real ``nemotron_node`` process (tiny ``nemotron_h`` GGUF, active) is configured with a
perception file that subscribes to ``sensor_msgs/BatteryState`` and to a
``visualization_msgs/MarkerArray`` of 50 markers (``each:``, one observation per marker), once
adapting every message and once rate-limited (``min_period_s`` 0.5). This process publishes
each at 30 and 200 Hz in turn, in interleaved rounds with idle phases between, and measures the
node process's CPU time (``/proc/<pid>/stat``) per phase:

* ``cpu_percent``: the node process's CPU use, idle and while each topic is published;
* ``us_per_message``: CPU time above idle per message the node received (its own
  ``perception.<name>.messages`` diagnostics count), adapted or dropped by the rate limit;
* ``render_us``: in this process, rendering a full world state (64 entries, the default bound,
  and 10,000, the largest) with poses and attributes.

Medians over the rounds. Writes ``benchmarks/results/perception.json`` and ``perception.png``.

    python benchmarks/bench_perception.py               # ~1.5 min
    python benchmarks/bench_perception.py --rounds 1 --phase-s 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT / 'test'))

import yaml  # noqa: E402
from conftest import RosHarness, wait_for  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from node_harness import (  # noqa: E402
    DEEP_QOS,
    TOOLS_FILE,
    Client,
    LifecycleClient,
    NodeProcess,
    node_status,
    status_values,
)
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import BatteryState  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from nemotron_ros.engine.perception_config import parse_perception  # noqa: E402
from nemotron_ros.engine.world_state import Observation, Pose, WorldState  # noqa: E402
from nemotron_ros.perception import Perception, PerceptionSource, message_fields  # noqa: E402
from nemotron_ros.testing.models import tiny_nemotron_h_path  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results'
RATES_HZ = (30, 200)
MARKERS = 50


def _entry(name: str, kind: str, min_period_s: float) -> dict:
    common = {'name': name, 'topic': name, 'qos': 'sensor_data', 'depth': 50,
              'min_period_s': min_period_s}
    if kind == 'battery':
        return {**common, 'type': 'sensor_msgs/msg/BatteryState', 'source': name,
                'label': 'battery', 'attributes': {
                    'charge': 'percentage', 'voltage_v': 'voltage',
                    'status': {'field': 'power_supply_status', 'map': {1: 'charging'}}}}
    return {**common, 'type': 'visualization_msgs/msg/MarkerArray', 'each': 'markers',
            'source': name, 'label': {'field': 'text'}, 'confidence': 'color.a', 'pose': 'pose',
            'frame_id': 'header.frame_id', 'attributes': {'id': 'id', 'scale_x': 'scale.x'}}


#: subscription name -> (message kind, min_period_s)
SOURCES = {'battery': ('battery', 0.0), 'markers': ('markers', 0.0),
           'battery_limited': ('battery', 0.5), 'markers_limited': ('markers', 0.5)}


def _message(kind: str, index: int):
    if kind == 'battery':
        return BatteryState(percentage=(index % 100) / 100.0, voltage=24.0,
                            power_supply_status=1)
    markers = []
    for i in range(MARKERS):
        marker = Marker(id=i, text=f'object {i}')
        marker.header.frame_id = 'camera'
        marker.pose.position.x, marker.pose.orientation.w = float(i), 1.0
        marker.scale.x, marker.color.a = 0.1, 0.9
        markers.append(marker)
    return MarkerArray(markers=markers)


def _cpu_s(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, in seconds."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _publish(pub, kind: str, rate_hz: float, seconds: float) -> int:
    """Publish at ``rate_hz`` for ``seconds`` (absolute schedule); returns the count."""
    message = _message(kind, 0)
    period, start, sent = 1.0 / rate_hz, time.monotonic(), 0
    while True:
        due = start + sent * period
        if due - start >= seconds:
            return sent
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if kind == 'battery':
            message.percentage = (sent % 100) / 100.0
        pub.publish(message)
        sent += 1


def _received(client: Client, process: NodeProcess, name: str) -> int:
    return int(status_values(node_status(client, process.name)).get(
        f'perception.{name}.messages', 0))


def _settled_count(client: Client, process: NodeProcess, name: str, previous: int) -> int:
    """The node's message count once two diagnostics periods in a row show the same value."""
    last, same_since = -1, time.monotonic()
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        value = _received(client, process, name)
        if value != last:
            last, same_since = value, time.monotonic()
        elif value > previous and time.monotonic() - same_since > 0.5:
            break
        time.sleep(0.05)
    return last


def _render_us(size: int, repeat: int) -> float:
    world = WorldState(max_observations=size, default_ttl_s=1e6)
    for i in range(size):
        world.update(Observation(source=f'camera {i % 7}', label=f'object number {i}',
                                 stamp=float(i), confidence=0.9,
                                 pose=Pose(float(i), 1.0, 0.5, qz=0.3, qw=0.95),
                                 frame_id='map', attributes={'id': i, 'scale_x': 0.1,
                                                             'status': 'seen'}), float(i))
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        world.render(float(size))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _callback_us(ros: RosHarness, repeat: int) -> dict:
    """The perception callback itself, in this process, per message (median): a message
    dropped by the rate limit, and one adapted into the world state (split into
    deserialization and conversion + world-state update)."""
    world = WorldState(max_observations=64, default_ttl_s=1e6)
    node = ros.node('bench_perception_callbacks')
    clock = time.monotonic
    perception = Perception(node, lambda o: world.update(o, clock()), lambda: True, clock)
    result = {}
    for kind in ('battery', 'markers'):
        entry_data = _entry(kind, kind, 0.0)
        (entry,) = parse_perception({'perception': [entry_data]}, message_fields, 'bench')
        data = serialize_message(_message(kind, 0))
        source = PerceptionSource(entry, perception)
        adapted = []
        for _ in range(repeat):
            started = time.perf_counter()
            source.on_message(data)
            adapted.append(time.perf_counter() - started)
        deserialize = []
        for _ in range(repeat):
            started = time.perf_counter()
            message = deserialize_message(data, source.cls)
            deserialize.append(time.perf_counter() - started)
        convert = []
        for _ in range(repeat):
            started = time.perf_counter()
            observations, _skipped = entry.observations(message, clock())
            for observation in observations:
                world.update(observation, clock())
            convert.append(time.perf_counter() - started)
        limited = PerceptionSource(dataclasses.replace(entry, min_period_s=3600.0), perception)
        limited.on_message(data)  # the one kept message; every later one is dropped
        dropped = []
        for _ in range(repeat * 20):
            started = time.perf_counter()
            limited.on_message(data)
            dropped.append(time.perf_counter() - started)
        assert limited.dropped == repeat * 20 and source.bad == 0
        result[kind] = {
            'bytes': len(data), 'adapted_us': 1e6 * statistics.median(adapted),
            'deserialize_us': 1e6 * statistics.median(deserialize),
            'convert_and_store_us': 1e6 * statistics.median(convert),
            'dropped_us': 1e6 * statistics.median(dropped)}
    return result


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--phase-s', type=float, default=2.5, help='seconds per phase')
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='bench_perception_'))
    perception_file = work / 'perception.yaml'
    perception_file.write_text(yaml.safe_dump({'perception': [
        _entry(name, kind, period) for name, (kind, period) in SOURCES.items()]}))
    model = str(tiny_nemotron_h_path(work))
    ros = RosHarness()
    process = NodeProcess(work, model_path=model, tools_file=TOOLS_FILE, n_threads=1,
                          perception_file=str(perception_file), diagnostics_period_s=0.1,
                          warm_up=False)
    try:
        lifecycle = LifecycleClient(ros, process.name)
        assert lifecycle.ready(60.0), process.output()
        assert lifecycle.change(Transition.TRANSITION_CONFIGURE), process.output()
        assert lifecycle.change(Transition.TRANSITION_ACTIVATE), process.output()
        client = Client(ros, namespace=process.namespace)
        publisher_node = ros.node('bench_perception_publisher', namespace=process.namespace)
        pubs = {name: publisher_node.create_publisher(
            BatteryState if kind == 'battery' else MarkerArray, name, DEEP_QOS)
            for name, (kind, _period) in SOURCES.items()}
        assert wait_for(lambda: all(p.get_subscription_count() for p in pubs.values()), 20.0)
        assert wait_for(lambda: node_status(client, process.name) is not None, 10.0)
        pid = process.process.pid
        phases = [('idle', None, 0)] + [(f'{name}@{rate}Hz', name, rate)
                                        for name in SOURCES for rate in RATES_HZ]
        samples: dict[str, list[dict]] = {label: [] for label, _n, _r in phases}
        counts = {name: 0 for name in SOURCES}
        for _round in range(args.rounds):
            for label, name, rate in phases:
                if name is None:
                    cpu0, t0 = _cpu_s(pid), time.monotonic()
                    time.sleep(args.phase_s)
                    cpu, wall = _cpu_s(pid) - cpu0, time.monotonic() - t0
                    samples[label].append({'cpu_s': cpu, 'wall_s': wall})
                    continue
                kind = SOURCES[name][0]
                cpu0, t0 = _cpu_s(pid), time.monotonic()
                sent = _publish(pubs[name], kind, rate, args.phase_s)
                received = _settled_count(client, process, name, counts[name]) - counts[name]
                cpu, wall = _cpu_s(pid) - cpu0, time.monotonic() - t0
                counts[name] += received
                samples[label].append({'cpu_s': cpu, 'wall_s': wall, 'sent': sent,
                                       'received': received})
        idle_rate = statistics.median(s['cpu_s'] / s['wall_s'] for s in samples['idle'])
        phases_out = {}
        for label, name, rate in phases:
            runs = samples[label]
            entry = {'cpu_percent': 100.0 * statistics.median(r['cpu_s'] / r['wall_s']
                                                              for r in runs)}
            if name is not None:
                entry.update(
                    rate_hz=rate, min_period_s=SOURCES[name][1], kind=SOURCES[name][0],
                    received_median=statistics.median(r['received'] for r in runs),
                    sent_median=statistics.median(r['sent'] for r in runs),
                    us_per_message=1e6 * statistics.median(
                        max(0.0, r['cpu_s'] - idle_rate * r['wall_s']) / max(1, r['received'])
                        for r in runs))
            phases_out[label] = entry
        values = status_values(node_status(client, process.name))
        callbacks = _callback_us(ros, 200)
    finally:
        process.stop()
        ros.close()
    report = {
        'benchmark': 'perception', 'machine': platform.platform(),
        'cpu_count': os.cpu_count(), 'rounds': args.rounds, 'phase_s': args.phase_s,
        'markers_per_array': MARKERS, 'phases': phases_out, 'callback_us': callbacks,
        'node_counts': {k: v for k, v in values.items() if k.startswith('perception.')},
        'render_us': {'64 entries': _render_us(64, 200), '10000 entries': _render_us(10000, 5)},
    }
    (RESULTS / 'perception.json').write_text(json.dumps(report, indent=2) + '\n')
    _plot(report, RESULTS / 'perception.png')
    for label, entry in phases_out.items():
        extra = (f", {entry['us_per_message']:.0f} us/message, {entry['received_median']:.0f} "
                 'received' if 'us_per_message' in entry else '')
        print(f"{label:26s} CPU {entry['cpu_percent']:5.1f} %{extra}")
    for kind, entry in callbacks.items():
        print(f"callback {kind:8s} dropped {entry['dropped_us']:.1f} us, adapted "
              f"{entry['adapted_us']:.0f} us (deserialize {entry['deserialize_us']:.0f} us, "
              f"convert + store {entry['convert_and_store_us']:.0f} us)")
    print(f"render: {report['render_us']['64 entries']:.0f} us (64 entries), "
          f"{report['render_us']['10000 entries'] / 1000:.1f} ms (10,000 entries)")
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    phases = report['phases']
    labels = list(phases)
    fig, (cpu_ax, cost_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    cpu_ax.barh(labels, [phases[k]['cpu_percent'] for k in labels], color='tab:blue')
    cpu_ax.invert_yaxis()
    cpu_ax.set_xlabel('node process CPU (%)')
    cpu_ax.set_title('CPU while idle and while each topic is published')
    costed = [k for k in labels if 'us_per_message' in phases[k]]
    cost_ax.barh(costed, [phases[k]['us_per_message'] for k in costed], color='tab:orange')
    cost_ax.invert_yaxis()
    cost_ax.set_xlabel('CPU per received message above idle (us)')
    cost_ax.set_title(f"per message (MarkerArray: {report['markers_per_array']} markers); "
                      f"render 64 entries {report['render_us']['64 entries']:.0f} us")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
