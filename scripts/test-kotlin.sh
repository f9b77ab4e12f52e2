#!/usr/bin/env bash
# Runs the Kotlin API's tests on the JVM: builds the FFI library and the
# server, generates the Kotlin bindings with the pinned bindgen, compiles
# the same Kotlin sources the Android library ships plus the tests with
# kotlinc, and runs them with JUnit 5 (JNA loads the host-built library).
# The todo app's Android-free logic and its tests are compiled with them.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p confluo-ffi -p confluo-server
case "$(uname -s)" in
  Darwin) lib=target/debug/libconfluo_ffi.dylib ;;
  *) lib=target/debug/libconfluo_ffi.so ;;
esac
out=target/kotlin
rm -rf "$out"
mkdir -p "$out"
cargo uniffi-bindgen generate --library "$lib" --language kotlin --no-format --out-dir "$out/generated"

tools=$(scripts/jvm-tools.sh)
kotlinc="$tools/kotlin/node_modules/kotlin-compiler/bin/kotlinc"
stdlib="$tools/kotlin/node_modules/kotlin-compiler/lib/kotlin-stdlib.jar"
cp=$(find "$tools/jars" -name '*.jar' | sort | tr '\n' ':')

echo "compiling Kotlin (kotlinc)..."
"$kotlinc" -nowarn -jvm-target 17 -cp "$cp" -d "$out/classes" \
  "$out/generated" android/confluo/src/main/kotlin android/confluo/src/test/kotlin \
  examples/android-todo/app/src/main/kotlin/dev/confluo/todo/core \
  examples/android-todo/app/src/test/kotlin 2>&1 \
  | grep -v "^warning: unable to find kotlin-stdlib" || true
[ -d "$out/classes/dev/confluo" ] || { echo "Kotlin compilation failed" >&2; exit 1; }

set +e
# The heap is touched whole at start: otherwise the JVM's resident memory
# grows as it first uses heap pages, which the leak test would count.
CONFLUO_SERVER_BIN="$PWD/target/debug/confluo-server" java \
  -Xmx128m -Xms128m -XX:+AlwaysPreTouch -Djna.library.path="$PWD/target/debug" \
  -cp "$out/classes:$cp$stdlib" \
  org.junit.platform.console.ConsoleLauncher execute \
  --disable-banner --details=tree --scan-classpath "$out/classes" 2>&1 | tee "$out/junit.log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -oE '[0-9]+ tests successful' "$out/junit.log" | grep -oE '^[0-9]+' || echo 0)
failed=$(grep -oE '[0-9]+ tests failed' "$out/junit.log" | grep -oE '^[0-9]+' || echo 0)
echo "kotlin: $passed passed, $failed failed"
if [ "$passed" -eq 0 ]; then
  echo "no Kotlin test ran" >&2
  exit 1
fi
# JUnit only warns about a @Test it skips (one returning a value, as
# `= runBlocking { ... }` does when its last expression has one).
if grep -q "It will not be executed" "$out/junit.log"; then
  echo "some Kotlin tests were skipped (see the warnings above)" >&2
  exit 1
fi
exit "$status"
