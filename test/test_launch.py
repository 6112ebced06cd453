"""launch/nemotron.launch.py under launch_pytest: the node started the way robot users start it.

Each test launches the package's launch file (from this source tree) with a tiny ``nemotron_h``
model and talks to the node through DDS only: the lifecycle services, the ``plan`` service and
the node's own log lines. launch, launch_ros and launch_pytest come with a ROS 2 install and are
not on PyPI, so on a PyPI-only set-up this module is skipped with the reason shown by ``-ra``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import RosHarness, wait_for

launch_pytest = pytest.importorskip(
    'launch_pytest',
    reason='launch_pytest is not installed: it ships with ROS 2 (apt ros-<distro>-launch-pytest), '
           'not on PyPI; the launch file tests run on a full ROS 2 install')
rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

import launch  # noqa: E402
from launch.actions import IncludeLaunchDescription, RegisterEventHandler  # noqa: E402
from launch.event_handlers import OnProcessExit, OnProcessIO  # noqa: E402
from launch.events.process import ProcessExited, ProcessIO  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.client import Client  # noqa: E402

from nemotron_ros.msg import Action  # noqa: E402
from nemotron_ros.srv import Plan  # noqa: E402
from nemotron_ros.testing.models import tiny_nemotron_h_path  # noqa: E402

pytestmark = pytest.mark.ros
LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'nemotron.launch.py'
NAMESPACE = 'robot1'
#: Process start, imports and loading the tiny model take a few seconds on a busy 2-core box.
START_TIMEOUT_S = 60.0


class ProcessOutput:
    """What the launched processes wrote and how they ended, gathered from launch events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self.return_codes: list[int] = []

    def handlers(self) -> list[RegisterEventHandler]:
        """Event handlers to put before the include, so no line is missed."""
        return [RegisterEventHandler(OnProcessIO(on_stdout=self._on_output,
                                                 on_stderr=self._on_output)),
                RegisterEventHandler(OnProcessExit(on_exit=self._on_exit))]

    def _on_output(self, event: ProcessIO) -> None:
        with self._lock:
            self._lines += event.text.decode(errors='replace').splitlines()

    def _on_exit(self, event: ProcessExited, _context: launch.LaunchContext) -> None:
        self.return_codes.append(event.returncode)

    def lines(self) -> list[str]:
        """Every line so far."""
        with self._lock:
            return list(self._lines)

    def line_with(self, *needles: str, timeout: float = START_TIMEOUT_S) -> str:
        """The first line holding all ``needles``, waiting up to ``timeout`` seconds for it."""
        def found() -> list[str]:
            return [line for line in self.lines() if all(n in line for n in needles)]

        assert wait_for(lambda: bool(found()), timeout), \
            f'no output line with {needles}; got:\n' + '\n'.join(self.lines())
        return found()[0]


class LifecycleProbe:
    """A client of one lifecycle node's services: get_state, change_state, get_parameters."""

    def __init__(self, ros: RosHarness, node: str) -> None:
        self._node = node
        self._client = ros.node(f'launch_probe_{uuid.uuid4().hex[:6]}')
        self._get_state = self._client.create_client(GetState, f'{node}/get_state')
        self._change_state = self._client.create_client(ChangeState, f'{node}/change_state')

    def state(self, timeout: float = 10.0) -> str:
        """The node's current state label, e.g. 'unconfigured' or 'active'."""
        assert self._get_state.wait_for_service(timeout_sec=START_TIMEOUT_S), \
            f'{self._get_state.srv_name} never appeared'
        future = self._get_state.call_async(GetState.Request())
        assert wait_for(future.done, timeout), f'{self._get_state.srv_name} did not answer'
        return future.result().current_state.label

    def wait_for_state(self, label: str, timeout: float = START_TIMEOUT_S) -> None:
        """Poll until the node is in state ``label``."""
        seen: list[str] = []

        def reached() -> bool:
            seen.append(self.state())
            return seen[-1] == label

        assert wait_for(reached, timeout, 0.2), \
            f'node never reached {label!r}; states seen: {sorted(set(seen))}'

    def change(self, transition_id: int, timeout: float = 30.0) -> bool:
        """Request a transition; True when the node took it."""
        request = ChangeState.Request()
        request.transition.id = transition_id
        assert self._change_state.wait_for_service(timeout_sec=START_TIMEOUT_S)
        future = self._change_state.call_async(request)
        assert wait_for(future.done, timeout), f'{self._change_state.srv_name} did not answer'
        return future.result().success

    def create_client(self, srv_type: type, name: str) -> Client:
        """A service client on the probe's node (for the node's own services)."""
        return self._client.create_client(srv_type, name)

    def parameters(self, *names: str) -> dict[str, object]:
        """Current values of the node's parameters ``names`` (bool or string ones)."""
        client = self._client.create_client(GetParameters, f'{self._node}/get_parameters')
        assert client.wait_for_service(timeout_sec=START_TIMEOUT_S)
        future = client.call_async(GetParameters.Request(names=list(names)))
        assert wait_for(future.done, 10.0), 'get_parameters did not answer'
        values = future.result().values
        return {name: _value(value) for name, value in zip(names, values, strict=True)}


def _value(value: ParameterValue) -> object:
    """The Python value of an rcl_interfaces/ParameterValue of type bool or string."""
    return {ParameterType.PARAMETER_BOOL: value.bool_value,
            ParameterType.PARAMETER_STRING: value.string_value}.get(value.type)


def _launch(output: ProcessOutput, **arguments: str) -> launch.LaunchDescription:
    """Our launch file with these arguments, plus output capture and ReadyToTest."""
    return launch.LaunchDescription([
        *output.handlers(),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments=arguments.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random nemotron_h GGUF, built once for this module."""
    return str(tiny_nemotron_h_path(tmp_path_factory.mktemp('launch_models')))


@pytest.fixture
def output() -> ProcessOutput:
    """The launched processes' output for this test."""
    return ProcessOutput()


@launch_pytest.fixture
def autostarted(tiny_model: str, output: ProcessOutput) -> launch.LaunchDescription:
    """The default launch (autostart) in a robot namespace."""
    return _launch(output, model_path=tiny_model, namespace=NAMESPACE)


@pytest.fixture
def params_file(tmp_path: Path, tiny_model: str) -> Path:
    """A params file that names the model itself (the launch's model_path stays empty)."""
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'model_path': tiny_model, 'n_ctx': 6144, 'n_threads': 1}}}))
    return path


@launch_pytest.fixture
def from_params_file(params_file: Path, output: ProcessOutput) -> launch.LaunchDescription:
    """Model from a params file; sim time and debug logging from launch arguments."""
    return _launch(output, params_file=str(params_file), use_sim_time='true', log_level='debug')


@launch_pytest.fixture
def bad_model(tmp_path: Path, output: ProcessOutput) -> launch.LaunchDescription:
    """Autostart with a model file that does not exist."""
    return _launch(output, model_path=str(tmp_path / 'missing.gguf'))


@launch_pytest.fixture
def manual(tiny_model: str, output: ProcessOutput) -> launch.LaunchDescription:
    """autostart:=false: the node should wait for an operator."""
    return _launch(output, model_path=tiny_model, autostart='false')


@pytest.mark.parametrize('argument', ['params_file', 'tools_file'])
def test_a_missing_file_fails_the_launch_before_the_node_starts(
        tmp_path: Path, output: ProcessOutput, argument: str) -> None:
    """launch_ros only warns about a missing params file; the launch file refuses it."""
    service = launch.LaunchService()
    service.include_launch_description(launch.LaunchDescription([
        *output.handlers(),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments={argument: str(tmp_path / 'x.yaml')}.items()),
    ]))
    assert service.run() == 1
    assert output.return_codes == [], 'the node was started'


@pytest.mark.launch(fixture=autostarted)
def test_autostart_activates_and_plan_answers_through_dds(
        ros: RosHarness, output: ProcessOutput, tiny_model: str) -> Iterator[None]:
    """Configure then activate happen by themselves, and the plan service answers."""
    probe = LifecycleProbe(ros, f'/{NAMESPACE}/nemotron')
    probe.wait_for_state('active')
    output.line_with('loaded', tiny_model)
    plan = probe.create_client(Plan, f'/{NAMESPACE}/plan')
    assert plan.wait_for_service(timeout_sec=10.0)
    future = plan.call_async(Plan.Request(goal='Say hello', latency_budget_ms=20000,
                                          max_tokens=16))
    assert wait_for(future.done, 30.0), 'plan did not answer'
    action = future.result().action
    assert action.status == Action.STATUS_OK, action.status_message
    assert action.request_id
    yield
    assert output.return_codes == [0], 'the node did not exit cleanly on launch shutdown'


@pytest.mark.launch(fixture=autostarted)
def test_autostart_does_not_undo_an_operator_deactivate(ros: RosHarness) -> None:
    """Autostart acts on the first configure only: a later deactivate stays deactivated."""
    probe = LifecycleProbe(ros, f'/{NAMESPACE}/nemotron')
    probe.wait_for_state('active')
    assert probe.change(Transition.TRANSITION_DEACTIVATE)
    assert not wait_for(lambda: probe.state() != 'inactive', 2.0, 0.2), \
        'the node was re-activated after a deactivate'


@pytest.mark.launch(fixture=from_params_file)
def test_empty_model_path_keeps_the_params_file_value(
        ros: RosHarness, output: ProcessOutput, tiny_model: str) -> None:
    """params_file is used, '' arguments do not override it, the other arguments apply."""
    probe = LifecycleProbe(ros, '/nemotron')
    probe.wait_for_state('active')
    output.line_with('loaded', tiny_model, 'n_ctx 6144')
    assert probe.parameters('model_path', 'tools_file', 'use_sim_time') == {
        'model_path': tiny_model, 'tools_file': '', 'use_sim_time': True}
    assert any('[DEBUG]' in line for line in output.lines()), 'log_level:=debug had no effect'


@pytest.mark.launch(fixture=bad_model)
def test_bad_model_path_leaves_it_unconfigured_with_a_clear_log_line(
        ros: RosHarness, output: ProcessOutput, tmp_path: Path) -> None:
    """A missing model fails configure with one log line naming the file; the node lives on."""
    line = output.line_with('configure failed', str(tmp_path / 'missing.gguf'))
    assert 'ERROR' in line
    probe = LifecycleProbe(ros, '/nemotron')
    assert probe.state() == 'unconfigured'
    assert [ln for ln in output.lines() if 'configure failed' in ln] == [line]
    assert not [ln for ln in output.lines() if 'Traceback' in ln]


@pytest.mark.launch(fixture=manual)
def test_without_autostart_it_stays_unconfigured_until_asked(
        ros: RosHarness, output: ProcessOutput) -> None:
    """autostart:=false starts the node unconfigured; an operator's configure still works."""
    probe = LifecycleProbe(ros, '/nemotron')
    assert probe.state() == 'unconfigured'
    assert not wait_for(lambda: probe.state() != 'unconfigured', 2.0, 0.2)
    assert not [ln for ln in output.lines() if 'loaded' in ln]
    assert probe.change(Transition.TRANSITION_CONFIGURE)
    assert not wait_for(lambda: probe.state() != 'inactive', 1.0, 0.2), \
        'without autostart the launch file must not activate the node'
