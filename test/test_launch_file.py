"""Static checks of launch/nemotron.launch.py that run everywhere, without the launch package.

The launch file is parsed with ``ast``, never imported (launch and launch_ros are not on PyPI),
and held against what it relies on and what documents it: the README's list of arguments and
its ``ros2 launch`` commands, the params file it defaults to, the executable CMake installs, the
node's name and package.xml's run-time dependencies. Its behaviour at run time is covered by
test_launch.py wherever launch_pytest is installed.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'nemotron.launch.py'
#: The arguments users are promised (issue 5), plus log_level.
EXPECTED_ARGUMENTS = {'model_path', 'params_file', 'tools_file', 'namespace', 'use_sim_time',
                      'autostart', 'log_level'}
BOOLEAN_VALUES = {'true', 'false', '1', '0'}


@dataclass(frozen=True)
class Argument:
    """One DeclareLaunchArgument: its name and the expressions of its default and description."""

    name: str
    default: ast.expr | None
    description: ast.expr | None


@pytest.fixture(scope='module')
def tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


@pytest.fixture(scope='module')
def arguments(tree: ast.Module) -> dict[str, Argument]:
    found: dict[str, Argument] = {}
    for call in _calls(tree, 'DeclareLaunchArgument'):
        assert call.args and isinstance(call.args[0], ast.Constant), \
            f'line {call.lineno}: the argument name must be a string literal'
        name = call.args[0].value
        assert name not in found, f'argument {name!r} declared twice'
        keywords = {k.arg: k.value for k in call.keywords}
        found[name] = Argument(name, keywords.get('default_value'), keywords.get('description'))
    return found


def _calls(tree: ast.AST, function: str) -> list[ast.Call]:
    """Every call of ``function`` (plain or as ``module.function``)."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and function in (getattr(node.func, 'attr', None), getattr(node.func, 'id', None))]


def _constants(tree: ast.Module) -> dict[str, object]:
    """The module's top-level NAME = literal assignments."""
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def _literal(node: ast.expr | None) -> object:
    assert node is not None
    return ast.literal_eval(node)


def test_declares_the_promised_arguments(arguments: dict[str, Argument]) -> None:
    assert set(arguments) == EXPECTED_ARGUMENTS


def test_readme_documents_exactly_the_declared_arguments(
        arguments: dict[str, Argument]) -> None:
    readme = (ROOT / 'README.md').read_text()
    listed = re.search(r'Launch\s+arguments:(.*?)\.\s', readme, re.S)
    assert listed, "README.md has no 'Launch arguments: ...' sentence"
    assert set(re.findall(r'`(\w+)`', listed.group(1))) == set(arguments)
    documented_default = re.search(r'`autostart`\s*\([^)]*default (\w+)\)', listed.group(1))
    assert documented_default, 'README.md does not give the default of autostart'
    assert documented_default.group(1) == _literal(arguments['autostart'].default)


def _launch_commands(text: str) -> list[str]:
    """Each ``ros2 launch`` command of our launch file in ``text``, continuation lines joined."""
    lines = text.splitlines()
    commands = []
    for index, line in enumerate(lines):
        if 'ros2 launch nemotron_ros nemotron.launch.py' not in line:
            continue
        command = line
        while command.rstrip().endswith('\\') and index + 1 < len(lines):
            index += 1
            command = command.rstrip().rstrip('\\') + ' ' + lines[index].lstrip(' #')
        commands.append(command)
    return commands


def test_documented_commands_use_declared_arguments(arguments: dict[str, Argument]) -> None:
    """Every ``name:=value`` of a ``ros2 launch`` command in the docs is a declared argument."""
    documents = [ROOT / 'README.md', *sorted((ROOT / 'config').glob('*.yaml')), LAUNCH_FILE]
    commands = {path.name: _launch_commands(path.read_text()) for path in documents}
    assert commands['README.md'], 'README.md shows no ros2 launch command'
    for name, found in commands.items():
        for command in found:
            used = set(re.findall(r'(\w+):=', command))
            assert used <= set(arguments), f'{name}: {command!r}'


def test_every_argument_has_a_default_and_a_description(
        arguments: dict[str, Argument]) -> None:
    for argument in arguments.values():
        assert argument.default is not None, f'{argument.name}: no default_value'
        description = _literal(argument.description)
        assert isinstance(description, str) and len(description) > 10, \
            f'{argument.name}: no useful description'


def test_boolean_defaults_are_booleans(arguments: dict[str, Argument]) -> None:
    assert _literal(arguments['autostart'].default) == 'true'
    assert _literal(arguments['use_sim_time'].default) in BOOLEAN_VALUES


def test_empty_model_and_tools_keep_the_params_file_values(
        tree: ast.Module, arguments: dict[str, Argument]) -> None:
    """'' must mean "not given", and only the given ones become parameter overrides."""
    overrides = _constants(tree)['FILE_OVERRIDES']
    assert set(overrides) == {'model_path', 'tools_file'}
    for name in overrides:
        assert _literal(arguments[name].default) == ''
    params = yaml.safe_load((ROOT / 'config' / 'nemotron.yaml').read_text())
    file_values = params['/**']['ros__parameters']
    for name in overrides:
        assert name in file_values, f'{name} is not a parameter of the default params file'


def test_every_value_read_is_declared(tree: ast.Module, arguments: dict[str, Argument]) -> None:
    """A name read from the launch configurations but not declared fails only at launch."""
    read = {node.slice.value for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
            and node.value.id == 'config' and isinstance(node.slice, ast.Constant)}
    read |= {call.args[1].value for call in _calls(tree, '_flag')}
    assert read, 'the launch file reads no arguments: this test no longer matches it'
    assert read <= set(arguments), f'read but not declared: {read - set(arguments)}'


def test_default_params_file_is_shipped_and_installed(arguments: dict[str, Argument]) -> None:
    default = arguments['params_file'].default
    assert isinstance(default, ast.Call) and getattr(default.func, 'attr', '') == 'join'
    parts = [ast.literal_eval(a) for a in default.args[1:]]
    assert (ROOT.joinpath(*parts)).is_file(), f'{"/".join(parts)} is not in the package'
    cmake = (ROOT / 'CMakeLists.txt').read_text()
    assert re.search(r'install\(\s*DIRECTORY[^)]*\blaunch\b[^)]*\bconfig\b[^)]*DESTINATION\s+'
                     r'share/\$\{PROJECT_NAME\}', cmake), 'launch/ and config/ must be installed'


def test_starts_the_installed_executable_with_the_node_default_name(tree: ast.Module) -> None:
    constants = _constants(tree)
    package = ET.parse(ROOT / 'package.xml').getroot()
    assert constants['PACKAGE'] == package.findtext('name')
    cmake = (ROOT / 'CMakeLists.txt').read_text()
    assert re.search(rf'install\(\s*PROGRAMS[^)]*scripts/{constants["EXECUTABLE"]}\b', cmake)
    assert (ROOT / 'scripts' / str(constants['EXECUTABLE'])).is_file()
    node_source = ast.parse((ROOT / 'nemotron_ros' / 'node.py').read_text())
    init = next(f for c in node_source.body if isinstance(c, ast.ClassDef)
                and c.name == 'NemotronNode' for f in c.body
                if isinstance(f, ast.FunctionDef) and f.name == '__init__')
    assert ast.literal_eval(init.args.defaults[0]) == constants['NODE_NAME']
    (lifecycle_node,) = _calls(tree, 'LifecycleNode')
    keywords = {k.arg: k.value for k in lifecycle_node.keywords}
    assert {ast.unparse(keywords[k]) for k in ('package', 'executable', 'name')} == \
        {'PACKAGE', 'EXECUTABLE', 'NODE_NAME'}


def test_every_import_is_a_declared_run_time_dependency(tree: ast.Module) -> None:
    package = ET.parse(ROOT / 'package.xml').getroot()
    declared = {e.text for e in package if e.tag in ('exec_depend', 'depend')}
    imported = {alias.name.split('.')[0] for node in tree.body if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split('.')[0] for node in tree.body
                 if isinstance(node, ast.ImportFrom) and node.module}
    missing = imported - declared - {'os'}
    assert not missing, f'launch file imports without an exec_depend in package.xml: {missing}'
    assert 'launch_pytest' in {e.text for e in package.iter('test_depend')}


def test_autostart_activates_after_configure_only(tree: ast.Module) -> None:
    """Activation follows the configure transition, not every arrival in 'inactive'."""
    (handler,) = _calls(tree, 'OnStateTransition')
    keywords = {k.arg: k.value for k in handler.keywords}
    assert _literal(keywords.get('start_state')) == 'configuring'
    assert _literal(keywords.get('goal_state')) == 'inactive'
