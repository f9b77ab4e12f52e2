#!/usr/bin/env bash
# Makes a Swift toolchain available and prints how to run it: "native" when
# `swift` is on PATH (a Mac, a Linux with Swift), otherwise the path of a
# Debian trixie chroot with Debian's swiftlang package (Swift 6.0), created
# once (about two minutes; needs root, debootstrap and Debian's mirror).
set -euo pipefail

if command -v swift >/dev/null 2>&1; then
  echo native
  exit 0
fi

CHROOT="${CONFLUO_SWIFT_CHROOT:-${CONFLUO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/confluo}/swift-trixie}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
READY="$CHROOT/.confluo-swift-ready"

# Unmounts what this script mounts in the chroot; refuses to go on while
# anything is still mounted there (it is about to be deleted).
unmount_all() {
  local m
  for m in "$CHROOT/src" "$CHROOT/proc"; do
    if mountpoint -q "$m" 2>/dev/null; then umount "$m" || umount -l "$m"; fi
  done
  if grep -q " $CHROOT/" /proc/mounts; then
    echo "something is still mounted under $CHROOT; not touching it" >&2
    exit 1
  fi
}

if [ ! -f "$READY" ]; then
  [ "$(id -u)" = 0 ] || { echo "no swift on PATH, and building the Swift chroot needs root" >&2; exit 1; }
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  fi
  echo "creating the Swift chroot in $CHROOT (Debian trixie + swiftlang)" >&2
  if [ -e "$CHROOT" ]; then
    unmount_all
    rm -rf --one-file-system "$CHROOT"
  fi
  mkdir -p "$CHROOT"
  debootstrap --variant=minbase trixie "$CHROOT" "$MIRROR" >&2
  # /proc is mounted in a private mount namespace, gone when apt is done.
  # shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
  unshare --mount --propagation private /bin/bash -c '
    set -e
    mount -t proc proc "$1/proc"
    chroot "$1" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$1" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends swiftlang libc6-dev libstdc++-14-dev
    chroot "$1" /bin/sh -c "command -v swift" >/dev/null
  ' -- "$CHROOT" >&2 || { echo "installing swiftlang in the chroot failed" >&2; exit 1; }
  touch "$READY"
fi
echo "$CHROOT"
