#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) when this machine has no Vulkan driver,
# so the GPU tests have a device. Debian/Ubuntu; needs root (or sudo) for apt-get.
set -euo pipefail
have_icd() {
  local icd=no lib=no f
  for f in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json; do
    [ -e "$f" ] && icd=yes
  done
  for f in /usr/lib/*/libvulkan.so.1 /usr/lib/libvulkan.so.1 /usr/lib64/libvulkan.so.1 /usr/local/lib/libvulkan.so.1; do
    [ -e "$f" ] && lib=yes
  done
  [ "$icd" = yes ] && [ "$lib" = yes ]
}
if have_icd; then
  echo "install-lavapipe: a Vulkan driver is present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "install-lavapipe: no Vulkan driver found, installing mesa-vulkan-drivers"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers >/dev/null
have_icd || { echo "install-lavapipe: still no Vulkan driver after installing mesa-vulkan-drivers" >&2; exit 1; }
