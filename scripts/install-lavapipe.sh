#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) when this machine has no Vulkan driver,
# so the GPU tests have a device. Debian/Ubuntu; needs root (or sudo) for apt-get.
set -euo pipefail
have_icd() {
  ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json 2>/dev/null | grep -q . &&
    ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'
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
