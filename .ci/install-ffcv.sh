#!/usr/bin/env bash
# Install FFCV (the optional `hamengine[ffcv]` backend) into a virtual environment.
#
#   bash .ci/install-ffcv.sh [VENV]      # VENV: a venv folder; default: the active one ($VIRTUAL_ENV)
#
# 1. System libraries FFCV's C extension builds against (Debian/Ubuntu names):
#    pkg-config g++ libopencv-dev libturbojpeg0-dev -- installed with apt-get only when missing
#    (as root directly, else through sudo). Without apt-get it says so and exits 0: install the
#    equivalents by hand and run it again.
# 2. `pip install ffcv==1.0.2` (it compiles from the sdist, ~1 min). FFCV's requirements are
#    unpinned (numba, llvmlite, opencv-python, pytorch-pfn-extras, fastargs, terminaltables,
#    assertpy, psutil, tqdm); a constraints file pins the numpy, torch and torchvision already
#    installed, so pip can never downgrade or replace them (checked: with numpy 2.4, torch 2.14,
#    torchvision 0.29 nothing is changed; FFCV then runs with numpy 2 on CPU, no cupy needed).
# Idempotent and quiet: a second run finds everything and does nothing.
set -euo pipefail

FFCV_VERSION=1.0.2
APT_PACKAGES=(pkg-config g++ libopencv-dev libturbojpeg0-dev)

venv="${1:-${VIRTUAL_ENV:-}}"
if [[ -z "$venv" ]]; then
    echo "install-ffcv: no venv given and none active; usage: $0 VENV" >&2
    exit 2
fi
py="$venv/bin/python"
if [[ ! -x "$py" ]]; then
    echo "install-ffcv: $py not found (is $venv a virtual environment?)" >&2
    exit 2
fi

# -- 1. system packages --------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-ffcv: apt-get not available; install ${missing[*]} (or your system's equivalents:" \
             "a C++ compiler, pkg-config, OpenCV and libjpeg-turbo headers) and run this again. Skipping FFCV."
        exit 0
    fi
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
            echo "install-ffcv: need root (or sudo) to apt-get install ${missing[*]}; skipping FFCV."
            exit 0
        fi
    fi
    echo "install-ffcv: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent on a fresh machine: update only when the install fails.
    if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -qq >/dev/null
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# -- 2. ffcv into the venv -------------------------------------------------------------------
# Installed already? Check the version and that the C extension loads with its libraries, without
# `import ffcv` (numba compiles at import: ~20 s on 2 cores).
if "$py" - "$FFCV_VERSION" >/dev/null 2>&1 <<'PYCHECK'
import ctypes, glob, importlib.metadata, importlib.util, os, sys

assert importlib.metadata.version("ffcv") == sys.argv[1]
spec = importlib.util.find_spec("ffcv")
libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_libffcv*.so"))
ctypes.CDLL(libs[0])  # IndexError / OSError when missing or a library it links is gone
PYCHECK
then
    exit 0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# Pin what is installed now: FFCV must build against, and keep, the project's numpy / torch.
"$py" - "$constraints" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

with open(sys.argv[1], "w") as f:
    for name in ("numpy", "torch", "torchvision"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
EOF
echo "install-ffcv: pip install ffcv==$FFCV_VERSION (builds its C extension, about a minute)"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" "ffcv==$FFCV_VERSION"
"$py" -c "import ffcv.fields" >/dev/null || { echo "install-ffcv: ffcv installed but does not import" >&2; exit 1; }
echo "install-ffcv: ffcv $FFCV_VERSION ready in $venv"
