#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) so the GPU tests have a device.
# Debian 12 (bookworm): Mesa 25 from bookworm-backports, the lavapipe users have and the one
# BENCHMARKS.md measures (Debian 12's own Mesa 22.3 reads storage buffers one SIMD lane at a
# time). Other Debian/Ubuntu releases: the distribution's own mesa-vulkan-drivers.
# Skips the install when a Vulkan driver is already present (a real GPU's, or Mesa >= 25).
# Needs root (or sudo) for apt-get.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

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

mesa_major() {
  dpkg-query -W -f '${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^([0-9]+:)?([0-9]+).*/\2/'
}

codename=""
if [ -r /etc/os-release ]; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi

if [ "$codename" = bookworm ]; then
  major=$(mesa_major || true)
  if [ -n "$major" ] && [ "$major" -ge 25 ] && have_icd; then
    echo "install-lavapipe: Mesa $(dpkg-query -W -f '${Version}' mesa-vulkan-drivers) is installed"
    exit 0
  fi
  if [ -z "$major" ] && have_icd; then
    echo "install-lavapipe: a Vulkan driver is present (not Mesa's)"
    exit 0
  fi
  list=/etc/apt/sources.list.d/bookworm-backports.list
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$list" >/dev/null
  fi
  echo "install-lavapipe: installing mesa-vulkan-drivers from bookworm-backports (Mesa 25)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports \
    mesa-vulkan-drivers libvulkan1 >/dev/null
else
  if have_icd; then
    echo "install-lavapipe: a Vulkan driver is present"
    exit 0
  fi
  echo "install-lavapipe: no Vulkan driver found, installing mesa-vulkan-drivers"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
have_icd || { echo "install-lavapipe: still no Vulkan driver after installing mesa-vulkan-drivers" >&2; exit 1; }
echo "install-lavapipe: mesa-vulkan-drivers $(dpkg-query -W -f '${Version}' mesa-vulkan-drivers 2>/dev/null || echo '?')"
