#!/usr/bin/env bash
# The main job on a fresh machine: set up (when needed), then run the demo: start
# nemotron_node with the embedded SmolLM2-135M-Instruct and the example tools, publish
# observations and commands, call `plan` with a budget, and print every answer.
# Extra arguments go to the demo (see: tools/demo.sh --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/tools/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/tools/env.sh"
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
exec "$ROOT/install/nemotron_ros/lib/nemotron_ros/nemotron_demo" "$@"
