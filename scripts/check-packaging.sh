#!/usr/bin/env bash
# Checks the packaging invariants that no build on this machine can (there is
# no Xcode, Android SDK or Gradle here), so that they cannot regress:
# - the Swift binary target and its XCFramework share one name across
#   Package.swift, ios/build-xcframework.sh and the iOS example's project.yml;
# - every repository path the Android Gradle files name exists, resolved as
#   each build (android/ and examples/android-todo) resolves it;
# - the ABIs cargo-ndk builds are the ABIs the AAR packages, aligned to 16 KB;
# - Android's certificate verifier is wired up: the JNI name, the startup
#   initializer, its Kotlin half at Cargo.lock's version, its repository;
# - the privacy manifest declares every required-reason API category that
#   the library's symbols (and the bundled SQLite's Apple-only calls) need.
# Prints "packaging: N passed, M failed" last; fails when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

passed=0
failed=0
pass() { echo "ok    $1"; passed=$((passed + 1)); }
fail() { echo "FAIL  $1" >&2; failed=$((failed + 1)); }
expect() { # expect <description> <command...>: passes when the command does
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

# --- Swift: one name for the binary target, its XCFramework and its zip ---

pkg=Package.swift
xcf_script=ios/build-xcframework.sh
project=examples/ios-todo/project.yml
target=$(grep -oE '\.binaryTarget\(name: "[A-Za-z0-9_]+", path:' "$pkg" | sed -E 's/.*name: "([^"]+)".*/\1/' || true)
if [ -z "$target" ]; then
  fail "$pkg declares a binaryTarget(name:path:)"
  target=ConfluoFFIC
fi
echo "binary target: $target"
# Every XCFramework (and its release zip) any of the files names.
only_target_framework() {
  local file=$1 others
  others=$(grep -oE '[A-Za-z0-9_]+\.xcframework' "$file" | sort -u | grep -vx "$target.xcframework" || true)
  [ -z "$others" ] || { echo "  $file names $others" >&2; return 1; }
  grep -q "$target\.xcframework" "$file" || { echo "  $file does not name $target.xcframework" >&2; return 1; }
}
expect "$pkg: binary target path is ios/$target.xcframework" \
  grep -qF ".binaryTarget(name: \"$target\", path: \"ios/$target.xcframework\")" "$pkg"
expect "$pkg: the release's binaryTarget(url:) is $target.xcframework.zip" \
  grep -qE "\.binaryTarget\(name: \"$target\", url: \"[^\"]*/$target\.xcframework\.zip\"" "$pkg"
expect "$pkg names no other XCFramework" only_target_framework "$pkg"
expect "$xcf_script builds ios/$target.xcframework" grep -qE -- "-output ios/$target\.xcframework\b" "$xcf_script"
expect "$xcf_script zips $target.xcframework.zip for a release" grep -qE "zip .*$target\.xcframework\.zip $target\.xcframework" "$xcf_script"
expect "$xcf_script names no other XCFramework" only_target_framework "$xcf_script"
expect "$project names the package's $target.xcframework and no other" only_target_framework "$project"
# On Linux the same name is a system library with the generated module map.
expect "$pkg: the Linux target is also $target" grep -qE "\.systemLibrary\(name: \"$target\", path: \"ios/Generated/$target\"\)" "$pkg"
expect "scripts/test-swift.sh generates module $target" grep -qx "module $target {" scripts/test-swift.sh

# --- Android: paths, ABIs, page size ---

lib_gradle=android/confluo/build.gradle.kts
app_gradle=examples/android-todo/app/build.gradle.kts
# The folder a build.gradle.kts's repoRoot stands for, given the module's and
# the including build's root folders.
repo_root_of() { # <gradle file> <module dir> <root project dir>
  local expr rel
  expr=$(grep -E '^val repoRoot: File = ' "$1" | sed -E 's/^val repoRoot: File = //')
  case "$expr" in
    'projectDir.resolve("'*'").canonicalFile')
      rel=$(echo "$expr" | sed -E 's/^projectDir\.resolve\("([^"]*)"\)\.canonicalFile$/\1/')
      (cd "$2/$rel" 2>/dev/null && pwd) || echo "$2/$rel (missing)" ;;
    rootProject.projectDir.parentFile) (cd "$3/.." && pwd) ;;
    *) echo "unrecognized repoRoot: $expr" ;;
  esac
}
paths_exist() { # <gradle file> <repo root as resolved>: every repoRoot path exists
  local file=$1 base=$2 missing=0 p
  while read -r p; do
    case "$p" in target/*) continue ;; esac # build outputs, made by the build
    [ -e "$base/$p" ] || { echo "  $file: $base/$p does not exist" >&2; missing=1; }
  done < <(grep -oE 'repoRoot\.resolve\("[^"]+"\)' "$file" | sed -E 's/.*\("([^"]+)"\)/\1/')
  [ "$missing" -eq 0 ]
}
same_dir() { [ "$1" = "$2" ] || { echo "  $1 is not $2" >&2; return 1; }; }

# The library module is android/confluo in its own build (root android/) and
# in the app's build, whose settings point :confluo at it.
included=$(grep -oE 'project\(":confluo"\)\.projectDir = file\("[^"]+"\)' examples/android-todo/settings.gradle.kts \
  | sed -E 's/.*file\("([^"]+)"\)/\1/' || true)
app_lib_dir=$( (cd "examples/android-todo/${included:-missing}" 2>/dev/null && pwd) || echo "examples/android-todo/${included:-?} (missing)")
expect "the todo app's build includes android/confluo" same_dir "$app_lib_dir" "$root/android/confluo"
for build in android examples/android-todo; do
  base=$(repo_root_of "$lib_gradle" "$root/android/confluo" "$root/$build")
  expect "$lib_gradle: repoRoot is the repository in the $build build" same_dir "$base" "$root"
  expect "$lib_gradle: every repoRoot path exists in the $build build" paths_exist "$lib_gradle" "$base"
done
base=$(repo_root_of "$app_gradle" "$root/examples/android-todo/app" "$root/examples/android-todo")
expect "$app_gradle: repoRoot is the repository" same_dir "$base" "$root"
expect "$app_gradle: every repoRoot path exists" paths_exist "$app_gradle" "$base"
expect "$lib_gradle: consumer-rules.pro exists" test -f android/confluo/consumer-rules.pro

# A list of ABIs from a Kotlin expression: a listOf(...) literal or a val
# of the file that holds one.
abi_list() { # <gradle file> <expression>
  local expr=$2
  if ! [[ $expr == listOf* ]]; then
    expr=$(grep -E "^val $expr = listOf\(" "$1" | sed -E 's/^val [A-Za-z]+ = //' || true)
  fi
  echo "$expr" | grep -oE '"[^"]+"' | tr -d '"' | sort | tr '\n' ' '
}
built=$(abi_list "$lib_gradle" "$(grep -oE 'abis\.set\([^)]*\)?\)' "$lib_gradle" | sed -E 's/^abis\.set\((.*)\)$/\1/' || true)")
packaged=$(abi_list "$lib_gradle" "$(grep -oE 'abiFilters \+= .*' "$lib_gradle" | sed -E 's/^abiFilters \+= ([^ }]+).*/\1/' || true)")
echo "cargo-ndk ABIs: ${built:-none}; AAR ABIs: ${packaged:-none}"
expect "the ABIs cargo-ndk builds are the ABIs the AAR packages" test -n "$built" -a "$built" = "$packaged"
bindgen_abi=$(grep -oE 'file\("[^/"]+/libconfluo_ffi\.so"\)' "$lib_gradle" | sed -E 's/file\("([^/]+)\/.*/\1/' || true)
expect "the bindgen reads a library cargo-ndk builds (${bindgen_abi:-none})" \
  grep -qw -- "${bindgen_abi:-none}" <<< "$built"
ndk=$(grep -oE 'val pinnedNdkVersion = "[0-9.]+"' "$lib_gradle" | grep -oE '[0-9.]+' || true)
major=${ndk%%.*}
expect "ndkVersion is pinned to r28 or newer (${ndk:-none}), which aligns to 16 KB" test "${major:-0}" -ge 28
expect "$lib_gradle: android.ndkVersion is the pinned NDK" grep -qx '    ndkVersion = pinnedNdkVersion' "$lib_gradle"
expect "bindings/build.rs links Android libraries with max-page-size=16384" \
  grep -qF 'cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=16384' bindings/build.rs
expect "bindings/build.rs packs the Android library's relocations (API 23+)" \
  grep -qF 'cargo:rustc-cdylib-link-arg=-Wl,--pack-dyn-relocs=android' bindings/build.rs

# --- Platform trust store: Android's verifier gets the app's Context ---

trust_kt=android/confluo/src/android/kotlin/dev/confluo/PlatformTrust.kt
jni_rs=bindings/src/android.rs
# The JNI name of PlatformTrust's native method, from the Kotlin source.
jni_name() {
  local pkg cls method
  pkg=$(sed -nE 's/^package ([a-z.]+)$/\1/p' "$trust_kt")
  cls=$(sed -nE 's/^object ([A-Za-z]+) \{$/\1/p' "$trust_kt")
  method=$(grep -oE '@JvmStatic (private )?external fun [A-Za-z]+' "$trust_kt" | awk '{ print $NF }')
  echo "Java_${pkg//./_}_${cls}_${method}"
}
jni=$(jni_name)
expect "$jni_rs exports $jni, PlatformTrust's native method" grep -qE "pub extern \"system\" fn $jni\b" "$jni_rs"
expect "bindings/src/lib.rs builds $jni_rs for Android" grep -qE '^#\[cfg\(target_os = "android"\)\]$' bindings/src/lib.rs
expect "the library's manifest runs dev.confluo.ConfluoInitializer at startup" \
  grep -qF 'android:name="dev.confluo.ConfluoInitializer"' android/confluo/src/main/AndroidManifest.xml
expect "ConfluoInitializer is an androidx.startup Initializer" \
  grep -qE '^class ConfluoInitializer : Initializer<' "$trust_kt"
expect "$lib_gradle depends on androidx.startup" grep -qF '"androidx.startup:startup-runtime:' "$lib_gradle"
# The verifier's Kotlin half must be the version of its Rust half.
expect "Cargo.lock pins rustls-platform-verifier-android, whose version the AAR's dependency takes" \
  grep -qx 'name = "rustls-platform-verifier-android"' Cargo.lock
# shellcheck disable=SC2016 # a Kotlin string template, matched literally
expect "$lib_gradle takes the verifier's version from Cargo.lock" \
  grep -qF 'implementation("rustls:rustls-platform-verifier:$platformVerifierVersion")' "$lib_gradle"
for settings in android/settings.gradle.kts examples/android-todo/settings.gradle.kts; do
  expect "$settings declares the verifier's Maven repository" \
    grep -qF 'rustls-platform-verifier/raw/maven-archive/android-release-support/maven/' "$settings"
done
expect "consumer-rules.pro keeps the verifier's classes" \
  grep -qF 'class org.rustls.platformverifier.**' android/confluo/consumer-rules.pro
expect "$pkg links Security.framework for the verifier on Apple platforms" \
  grep -qF '.linkedFramework("Security", .when(platforms: [.iOS, .macOS]))' "$pkg"

# --- iOS privacy manifest: a category for every required-reason API ---

manifest=ios/Sources/Confluo/PrivacyInfo.xcprivacy
case "$(uname -s)" in
  Darwin) lib=target/debug/libconfluo_ffi.dylib ;;
  *) lib=target/debug/libconfluo_ffi.so ;;
esac
[ -f "$lib" ] || cargo build -q -p confluo-ffi
# The undefined symbols of the host library, without version or 64 suffixes
# (stat64@GLIBC_2.33 is stat), plus the calls the bundled SQLite makes in
# code that only Apple builds compile (its locking-style VFS calls statfs).
symbols=$(nm -D --undefined-only "$lib" 2>/dev/null || nm -u "$lib")
symbols=$(echo "$symbols" | awk '{ print $NF }' | sed -E 's/@.*//; s/^_//; s/^__[lf]?x(stat)/\1/; s/64$//')
sqlite_src=$(cargo metadata --format-version 1 --offline 2>/dev/null \
  | grep -oE '"manifest_path":"[^"]*/libsqlite3-sys-[^"]*/Cargo.toml"' | head -1 \
  | sed -E 's/^"manifest_path":"(.*)\/Cargo.toml"$/\1/' || true)
if [ -n "$sqlite_src" ] && [ -f "$sqlite_src/sqlite3/sqlite3.c" ]; then
  calls=$(grep -oE '\b(f?stat(v?fs)?|lstat|fstatat|getattrlist(bulk|at)?|fgetattrlist|mach_absolute_time)\(' \
    "$sqlite_src/sqlite3/sqlite3.c" | tr -d '(' | sort -u)
  symbols=$(printf '%s\n%s\n' "$symbols" "$calls")
else
  fail "the bundled SQLite's source (libsqlite3-sys) is found for the Apple-only calls"
fi
category_of() {
  case "$1" in
    stat | fstat | lstat | fstatat | getattrlist | getattrlistbulk | fgetattrlist | getattrlistat) echo FileTimestamp ;;
    statfs | fstatfs | statvfs | fstatvfs) echo DiskSpace ;;
    mach_absolute_time) echo SystemBootTime ;;
  esac
}
needed=$(for s in $(echo "$symbols" | sort -u); do category_of "$s"; done | sort -u)
echo "required-reason categories the library needs: $(echo "$needed" | tr '\n' ' ')"
declares() { # the manifest lists the category with at least one reason code
  grep -A4 -F "<string>NSPrivacyAccessedAPICategory$1</string>" "$manifest" \
    | grep -qE '<string>[0-9A-F]{4}\.[0-9]</string>'
}
expect "the library uses the stat family (FileTimestamp)" grep -qx FileTimestamp <<< "$needed"
for c in $needed; do
  expect "$manifest declares NSPrivacyAccessedAPICategory$c with a reason" declares "$c"
done

echo "packaging: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
