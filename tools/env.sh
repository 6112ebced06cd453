# Source this file to use the package built by tools/setup.sh:  source tools/env.sh
# It activates the virtual environment, overlays the colcon install and keeps DDS on loopback.
_nemotron_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_nemotron_venv=${NEMOTRON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron_ros/venv-${NEMOTRON_ROS_DISTRO:-kilted}}
if [ ! -f "$_nemotron_root/install/setup.bash" ]; then
  echo "nemotron_ros is not built yet: run tools/setup.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
# colcon's and venv's scripts read unset variables: relax `set -u` while sourcing them.
case $- in *u*) _nemotron_nounset=1; set +u ;; *) _nemotron_nounset= ;; esac
# shellcheck disable=SC1091
. "$_nemotron_venv/bin/activate"
export AMENT_PREFIX_PATH="$_nemotron_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# shellcheck disable=SC1091
. "$_nemotron_root/install/setup.bash"
[ -n "$_nemotron_nounset" ] && set -u
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
unset _nemotron_root _nemotron_venv _nemotron_nounset
