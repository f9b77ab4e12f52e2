#!/usr/bin/env bash
# Counts the instructions of each phase of the engine benchmark (one run of
# the todo workload through Confluo and through plain SQLite) with
# valgrind's callgrind. Unlike timings on a shared machine, the counts are
# exact: a change can be judged by them without noise. Prints one RESULT
# line per phase: `instructions_<phase>` in millions, with the ratio to
# plain SQLite's same phase where there is one. Installs Debian's valgrind
# when it is missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "instructions: installing Debian's valgrind" >&2
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

# The phases are functions of their own in core/benches/engine.rs; keep
# their names in the binary (the release profile strips symbols).
export CARGO_PROFILE_BENCH_STRIP=none
bin=$(cargo bench -p confluo-core --bench engine --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "instructions: the engine benchmark did not build" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
CONFLUO_BENCH_RUNS=1 valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
  "$bin" --bench >"$out/bench.log" 2>"$out/valgrind.log" || {
  cat "$out/valgrind.log" >&2
  echo "instructions: the benchmark failed under callgrind" >&2
  exit 1
}
callgrind_annotate --inclusive=yes --threshold=100 "$out/callgrind.out" >"$out/annotated"

# Inclusive instructions of the function named `engine::<name>`.
count() {
  awk -v f="engine::$1" '
    { name = $0; sub(/^[ 0-9,()%.]*/, "", name); sub(/^[^:]*:/, "", name); sub(/ .*/, "", name) }
    name == f { gsub(",", "", $1); print $1; exit }' "$out/annotated"
}

for phase in insert update update_all delete delete_range export apply; do
  confluo=$(count "confluo_$phase")
  [ -n "$confluo" ] || { echo "instructions: no count for confluo_$phase" >&2; exit 1; }
  plain=$(count "plain_$phase")
  if [ -n "$plain" ]; then
    ratio=$(awk -v c="$confluo" -v p="$plain" 'BEGIN { printf "%.3f", c / p }')
  else
    ratio=null
  fi
  awk -v name="instructions_$phase" -v c="$confluo" -v r="$ratio" 'BEGIN {
    printf "RESULT {\"name\":\"%s\",\"value\":%.1f,\"unit\":\"Minstr\",\"ratio_to_plain\":%s}\n", name, c / 1e6, r }'
done
