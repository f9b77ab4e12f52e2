#!/usr/bin/env bash
# Fetches the pinned JVM tools the Kotlin tests need into a cache folder and
# prints the folder: kotlinc (npm package kotlin-compiler) and the JNA,
# kotlinx-coroutines and JUnit jars (Maven Central). No Gradle needed.
set -euo pipefail

CACHE="${CONFLUO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/confluo}/jvm"
KOTLIN_VERSION=2.4.20
MAVEN=https://repo1.maven.org/maven2
JARS=(
  "net/java/dev/jna/jna/5.18.1/jna-5.18.1.jar"
  "org/jetbrains/kotlinx/kotlinx-coroutines-core-jvm/1.11.0/kotlinx-coroutines-core-jvm-1.11.0.jar"
  "org/jetbrains/kotlinx/kotlinx-coroutines-test-jvm/1.11.0/kotlinx-coroutines-test-jvm-1.11.0.jar"
  "org/junit/platform/junit-platform-console-standalone/1.13.4/junit-platform-console-standalone-1.13.4.jar"
)

mkdir -p "$CACHE/jars"
if [ ! -x "$CACHE/kotlin/node_modules/kotlin-compiler/bin/kotlinc" ]; then
  command -v npm >/dev/null || { echo "npm is needed to fetch kotlinc" >&2; exit 1; }
  echo "fetching kotlinc $KOTLIN_VERSION" >&2
  mkdir -p "$CACHE/kotlin"
  npm install --silent --no-audit --no-fund --prefix "$CACHE/kotlin" "kotlin-compiler@$KOTLIN_VERSION" >&2
fi
for path in "${JARS[@]}"; do
  jar="$CACHE/jars/$(basename "$path")"
  if [ ! -s "$jar" ]; then
    echo "fetching $(basename "$path")" >&2
    curl -fsSL --retry 3 -o "$jar.part" "$MAVEN/$path"
    # Maven Central publishes a SHA-1 beside every artifact.
    expected=$(curl -fsSL --retry 3 "$MAVEN/$path.sha1" | cut -c1-40)
    actual=$(sha1sum "$jar.part" | cut -c1-40)
    if [ "$expected" != "$actual" ]; then
      echo "checksum mismatch for $path" >&2
      rm -f "$jar.part"
      exit 1
    fi
    mv "$jar.part" "$jar"
  fi
done
echo "$CACHE"
