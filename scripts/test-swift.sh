#!/usr/bin/env bash
# Runs the Swift API's tests: builds the FFI library and the server,
# generates the Swift bindings with the pinned bindgen into ios/Generated,
# checks that Package.swift parses, and runs `swift test` against the
# host-built library — natively when `swift` is on PATH, otherwise in the
# Debian trixie chroot that scripts/swift-env.sh provides.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cargo build -q -p confluo-ffi -p confluo-server
case "$(uname -s)" in
  Darwin) lib=target/debug/libconfluo_ffi.dylib ;;
  *) lib=target/debug/libconfluo_ffi.so ;;
esac
gen=ios/Generated
rm -rf "$gen" target/swift-gen
cargo uniffi-bindgen generate --library "$lib" --language swift --no-format --out-dir target/swift-gen
mkdir -p "$gen/ConfluoFFI" "$gen/ConfluoFFIC"
cp target/swift-gen/ConfluoFFI.swift "$gen/ConfluoFFI/"
cp target/swift-gen/ConfluoFFIC.h "$gen/ConfluoFFIC/"
# On Linux the C module is a system library: link the host-built one.
cat > "$gen/ConfluoFFIC/module.modulemap" <<'MAP'
module ConfluoFFIC {
    header "ConfluoFFIC.h"
    link "confluo_ffi"
    export *
}
MAP

env=$(scripts/swift-env.sh)
run() {
  if [ "$env" = native ]; then
    (cd "$root" && env "$@")
  else
    # Each command gets a private mount namespace: the bind mount of the
    # repository and /proc exist only for it and vanish with it, whatever
    # happens, and no other run can see or reuse them.
    mkdir -p "$env/src" "$env/proc"
    # shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
    unshare --mount --propagation private /bin/bash -c '
      set -e
      chroot_dir=$1 src=$2
      shift 2
      mount --bind "$src" "$chroot_dir/src"
      mount -t proc proc "$chroot_dir/proc"
      exec chroot "$chroot_dir" /usr/bin/env HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        bash -c "cd /src && exec env \"\$@\"" -- "$@"
    ' -- "$env" "$root" "$@"
  fi
}
if [ "$env" = native ]; then dir=$root; else dir=/src; fi
export -f run
export env root
echo "checking Package.swift (swift package dump-package)"
run swift package dump-package --scratch-path "$dir/target/swift-build" > /dev/null
# The SDK's package, then the todo app's logic (a package depending on it).
# A package counts only if its run ended by itself, in time, with XCTest's
# summary of all its tests: a killed or hung test binary fails the run
# instead of passing with whatever it had printed.
limit=${CONFLUO_SWIFT_TEST_TIMEOUT:-1500}
total=0
failed=0
status=0
for pkg in . examples/ios-todo/TodoCore; do
  name=$(basename "$(cd "$pkg" && pwd)")
  scratch="$dir/target/swift-build/$name"
  log="target/swift-test-$name.log"
  set +e
  # timeout signals its whole process group: swift test and the test binary too.
  timeout --kill-after=30 "$limit" bash -c 'run "$@"' -- \
    LD_LIBRARY_PATH="$dir/target/debug" CONFLUO_SERVER_BIN="$dir/target/debug/confluo-server" \
    swift test --package-path "$dir/$pkg" --scratch-path "$scratch" -Xlinker -L"$dir/target/debug" 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  set -e
  # XCTest ends a complete run with "Test Suite 'All tests' passed|failed"
  # and, on the next line, "Executed N tests, with M failures".
  summary=$(grep -A1 -E "Test Suite 'All tests' (passed|failed)" "$log" | grep -E "Executed [0-9]+ tests?, with [0-9]+ failures?" | tail -1 || true)
  t=$(echo "$summary" | grep -oE "Executed [0-9]+" | grep -oE "[0-9]+" || true)
  f=$(echo "$summary" | grep -oE "with [0-9]+" | grep -oE "[0-9]+" || true)
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "swift: $name: swift test did not finish within $limit s" >&2
    status=1
  elif [ "$code" -ne 0 ]; then
    echo "swift: $name: swift test exited with $code" >&2
    status=1
  fi
  if [ -z "$summary" ]; then
    echo "swift: $name: its tests did not run to the end (no XCTest summary of all tests)" >&2
    status=1
  fi
  total=$((total + ${t:-0}))
  failed=$((failed + ${f:-0}))
  echo "swift: $name: ${t:-0} executed, ${f:-0} failed"
done
echo "swift: $((total - failed)) passed, $failed failed"
if [ "$total" -eq 0 ]; then
  echo "no Swift test ran" >&2
  exit 1
fi
[ "$failed" -eq 0 ] || status=1
exit "$status"
