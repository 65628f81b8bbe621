#!/usr/bin/env bash
# Installs what `--features mpi` needs: an MPI (Open MPI: mpirun, mpicc, headers and
# library) and libclang (the mpi crate generates its bindings with bindgen at build time).
# Debian/Ubuntu: openmpi-bin libopenmpi-dev libclang-dev. Skips the install when all of it
# is already present (any MPI whose mpicc compiles against mpi.h, e.g. a cluster's module).
# Needs root (or sudo) for apt-get.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have_mpi() {
  command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 &&
    printf '#include <mpi.h>\nint main(void) { return 0; }\n' |
      mpicc -x c - -o /dev/null >/dev/null 2>&1
}

have_libclang() {
  local f
  if [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1; then
    return 0
  fi
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-*.so* /usr/lib/*/libclang.so* \
    /usr/lib64/libclang.so* /usr/local/lib/libclang.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}

if have_mpi && have_libclang; then
  echo "install-mpi: $(mpirun --version 2>/dev/null | head -n 1) and libclang are present"
  exit 0
fi
echo "install-mpi: installing openmpi-bin libopenmpi-dev libclang-dev"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null
have_mpi || { echo "install-mpi: mpicc still cannot compile against mpi.h" >&2; exit 1; }
have_libclang || { echo "install-mpi: libclang still not found" >&2; exit 1; }
echo "install-mpi: $(mpirun --version 2>/dev/null | head -n 1)"
