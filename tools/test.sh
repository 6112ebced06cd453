#!/usr/bin/env bash
# Run the whole test suite (sets everything up first when needed): lint, then pytest
# through real DDS on loopback with a ROS domain of this run's own.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The suite covers the torch backend too (NEMOTRON_WITH_TORCH=0 skips installing it; its
# tests then skip with a reason).
export NEMOTRON_WITH_TORCH=${NEMOTRON_WITH_TORCH:-1}
"$ROOT/tools/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/tools/env.sh"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
export HF_HUB_OFFLINE=1
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, discovery on loopback only"
cd "$ROOT"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
status=0
pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests" >&2
fi
exit "$status"
