"""Parameters: the shipped YAML files, descriptors, --params-file loading and validation."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

from rclpy.exceptions import InvalidParameterValueException  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from nemotron_ros import parameters  # noqa: E402
from nemotron_ros.engine.config import EngineConfig  # noqa: E402
from nemotron_ros.node import NemotronNode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def test_default_file_lists_every_parameter_with_the_code_default() -> None:
    values = _file_params('nemotron.yaml')
    names = {spec.name for spec in parameters.SPECS} | {parameters.DIAGNOSTICS_PERIOD.name}
    assert set(values) == names
    defaults = EngineConfig()
    for spec in parameters.SPECS:
        assert values[spec.name] == getattr(defaults, spec.field), spec.name


def test_parameter_table_covers_the_engine_config() -> None:
    assert {spec.field for spec in parameters.SPECS} == {f.name for f in fields(EngineConfig)}


def test_jetson_file_is_a_valid_configuration() -> None:
    values = _file_params('jetson_orin_nano.yaml')
    by_name = {spec.name: spec.field for spec in parameters.SPECS}
    config = EngineConfig(**{by_name[k]: v for k, v in values.items() if k in by_name})
    assert config.n_gpu_layers == -1 and config.n_ctx == 8192
    assert config.model_path.endswith('NVIDIA-Nemotron3-Nano-4B-Q4_K_M.gguf')


@pytest.fixture
def context():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def test_params_file_is_loaded_and_described(context, tmp_path: Path) -> None:
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'n_ctx': 2048, 'temperature': 0.0, 'world_state': {'max_observations': 5}}}}))
    node = NemotronNode(context=context, cli_args=['--ros-args', '--params-file', str(params)])
    try:
        config = parameters.engine_config(node)
        assert config.n_ctx == 2048 and config.temperature == 0.0
        assert config.world_state_max_observations == 5
        descriptor = node.describe_parameter('temperature')
        assert descriptor.description and descriptor.floating_point_range[0].to_value == 2.0
    finally:
        node.destroy_node()


def test_out_of_range_value_is_refused_with_the_parameter_name(context) -> None:
    with pytest.raises(InvalidParameterValueException, match='temperature'):
        NemotronNode(context=context, parameter_overrides=[Parameter('temperature', value=3.0)])


def test_runtime_set_of_a_bad_choice_is_refused(context) -> None:
    node = NemotronNode(context=context)
    try:
        result = node.set_parameters([Parameter('backend', value='onnx')])[0]
        assert not result.successful and 'backend must be one of' in result.reason
        assert node.get_parameter('backend').value == 'llama_cpp'
        result = node.set_parameters([Parameter('n_threads', value=-5)])[0]
        assert not result.successful
    finally:
        node.destroy_node()


@pytest.mark.parametrize('field, value, message', [
    ('n_batch', 10_000, 'n_batch must be in'),
    ('max_tool_calls', 9, 'max_tool_calls must be in'),
    ('world_state_default_ttl_s', 0.0, 'world_state_default_ttl_s must be > 0'),
    ('temperature', 5.0, 'temperature must be in'),
])
def test_engine_config_names_the_bad_setting(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})
