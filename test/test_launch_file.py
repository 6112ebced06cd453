"""Static checks of launch/nemotron.launch.py that run everywhere, without the launch package.

The launch file is parsed with ``ast``, never imported (launch and launch_ros are not on PyPI),
and held against what it relies on and what documents it: the README's list of arguments and
its ``ros2 launch`` commands, the params file it defaults to, the executable CMake installs, the
node's name and package.xml's run-time dependencies. Its argument checks use the standard
library only, so they are compiled out of the file and run here (:func:`argument_checks`). Its
behaviour at run time is covered by test_launch.py wherever launch_pytest is installed.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
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


def _stdlib_imports(tree: ast.Module) -> list[ast.stmt]:
    """The module's top-level imports of standard-library modules."""
    found: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        else:
            continue
        if all(m.split('.')[0] in sys.stdlib_module_names for m in modules):
            found.append(node)
    return found


@pytest.fixture(scope='module')
def argument_checks(tree: ast.Module) -> Callable[[dict[str, str]], None]:
    """The launch file's ``check_arguments``, compiled with the helpers it calls.

    Only standard-library imports, literal constants and the private helpers are compiled, so
    a check that needs launch itself fails here with a NameError.
    """
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert 'check_arguments' in functions, 'the launch file has no check_arguments'
    helpers = [f for name, f in functions.items() if name.startswith('_') and not
               any(isinstance(n, ast.Attribute) and getattr(n.value, 'id', '') in
                   ('launch', 'launch_ros', 'lifecycle_msgs') for n in ast.walk(f))]
    constants = [node for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, (ast.Constant, ast.Tuple))]
    module = ast.Module(body=[*_stdlib_imports(tree), *constants, *helpers,
                              functions['check_arguments']], type_ignores=[])
    namespace: dict[str, object] = {}
    exec(compile(module, str(LAUNCH_FILE), 'exec'), namespace)
    return namespace['check_arguments']


def _launch_arguments(arguments: dict[str, Argument], **given: str) -> dict[str, str]:
    """The launch configurations for ``given``: literal defaults, the shipped params file."""
    values = {name: _literal(a.default) for name, a in arguments.items()
              if name != 'params_file'}
    values['params_file'] = str(ROOT / 'config' / 'nemotron.yaml')
    return {**values, **given}


def test_default_arguments_pass_the_checks(
        argument_checks: Callable[[dict[str, str]], None],
        arguments: dict[str, Argument]) -> None:
    argument_checks(_launch_arguments(arguments))
    argument_checks(_launch_arguments(
        arguments, tools_file=str(ROOT / 'config' / 'tools.example.yaml'), autostart='False',
        use_sim_time='1'))


@pytest.mark.parametrize(('given', 'message'), [
    ({'params_file': '/nonexistent/params.yaml'},
     "launch argument params_file: '/nonexistent/params.yaml' does not exist"),
    ({'params_file': ''}, "launch argument params_file: '' does not exist"),
    ({'params_file': str(ROOT / 'config')}, 'launch argument params_file: .* is a directory'),
    ({'tools_file': '/nonexistent/tools.yaml'},
     "launch argument tools_file: '/nonexistent/tools.yaml' does not exist"),
    ({'autostart': 'yes'}, "launch argument autostart must be 'true' or 'false'"),
    ({'use_sim_time': 'maybe'}, "launch argument use_sim_time must be 'true' or 'false'"),
])
def test_bad_arguments_fail_the_launch_naming_the_argument(
        argument_checks: Callable[[dict[str, str]], None], arguments: dict[str, Argument],
        given: dict[str, str], message: str) -> None:
    """A mistyped path fails loudly instead of starting the node on its built-in defaults."""
    with pytest.raises(ValueError, match=message):
        argument_checks(_launch_arguments(arguments, **given))


def test_arguments_are_checked_before_the_node_is_built(tree: ast.Module) -> None:
    """check_arguments runs first in the OpaqueFunction, so a bad argument starts nothing."""
    (opaque,) = _calls(tree, 'OpaqueFunction')
    function = ast.unparse({k.arg: k.value for k in opaque.keywords}['function'])
    body = next(node for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name == function).body
    statements = [s for s in body if not (isinstance(s, ast.Expr)
                                          and isinstance(s.value, ast.Constant))]
    first_check = next(i for i, s in enumerate(statements) if _calls(s, 'check_arguments'))
    first_node = next(i for i, s in enumerate(statements) if _calls(s, 'LifecycleNode'))
    assert first_check < first_node


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
    read |= {call.args[1].value for function in ('_flag', '_existing_file')
             for call in _calls(tree, function) if isinstance(call.args[1], ast.Constant)}
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
    missing = imported - declared - set(sys.stdlib_module_names)
    assert not missing, f'launch file imports without an exec_depend in package.xml: {missing}'
    assert 'launch_pytest' in {e.text for e in package.iter('test_depend')}


#: Third-party Python modules and their rosdep keys.
ROSDEP_KEYS = {'yaml': 'python3-yaml', 'jsonschema': 'python3-jsonschema',
               'jinja2': 'python3-jinja2', 'numpy': 'python3-numpy', 'httpx': 'python3-httpx'}
#: Modules with no rosdep key: package.xml must name their pip distribution in a comment.
PIP_ONLY = {'llama_cpp': 'llama-cpp-python', 'torch': 'torch', 'transformers': 'transformers',
            'tokenizers': 'tokenizers', 'safetensors': 'safetensors', 'xgrammar': 'xgrammar',
            'gguf': 'gguf'}


def _imported_roots(path: Path) -> set[str]:
    """Top-level modules imported anywhere in ``path`` (function-level imports too)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split('.')[0])
    return roots - set(sys.stdlib_module_names) - {'nemotron_ros'}


def test_every_import_of_the_package_is_declared_in_package_xml() -> None:
    """rosdep installs what package.xml declares: an undeclared import fails on a robot."""
    text = (ROOT / 'package.xml').read_text()
    package = ET.fromstring(text)
    declared = {e.text for e in package if e.tag in ('exec_depend', 'depend')}
    comments = ' '.join(re.findall(r'<!--(.*?)-->', text, re.S)).split()
    comments = {word.strip(',.():') for word in comments}
    missing = []
    for path in sorted((ROOT / 'nemotron_ros').rglob('*.py')):
        for root in _imported_roots(path):
            if root in PIP_ONLY:
                ok = PIP_ONLY[root] in comments
            else:
                ok = ROSDEP_KEYS.get(root, root) in declared
            if not ok:
                missing.append(f'{path.relative_to(ROOT)}: {root}')
    assert not missing, f'imports without a declaration in package.xml: {missing}'
    tests = {e.text for e in package.iter('test_depend')}
    assert {'python3-pytest', 'python3-pytest-timeout', 'launch_pytest'} <= tests


def test_license_file_matches_package_xml() -> None:
    package = ET.parse(ROOT / 'package.xml').getroot()
    assert package.findtext('license') == 'Apache-2.0'
    text = (ROOT / 'LICENSE').read_text()
    assert text.lstrip().startswith('Apache License')
    assert 'Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text


def test_autostart_activates_after_configure_only(tree: ast.Module) -> None:
    """Activation follows the configure transition, not every arrival in 'inactive'."""
    (handler,) = _calls(tree, 'OnStateTransition')
    keywords = {k.arg: k.value for k in handler.keywords}
    assert _literal(keywords.get('start_state')) == 'configuring'
    assert _literal(keywords.get('goal_state')) == 'inactive'
