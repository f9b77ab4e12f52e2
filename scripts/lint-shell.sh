#!/usr/bin/env bash
# Runs ShellCheck on every shell script of the repository (installed from
# Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v shellcheck >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "shellcheck is missing (apt-get install shellcheck)" >&2; exit 1; }
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >&2
fi
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean"
