#!/usr/bin/env bash
# Install Debian's headless browser (chromium + chromium-driver) for the serve browser test.
# Idempotent and quiet: does nothing when both are present; skips (exit 0, with a note) where apt-get
# is unavailable or the install fails, so the browser test then skips with its own clear reason.
set -u

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: apt-get not available; skipping chromium install (browser test will skip)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: not root and no passwordless sudo; skipping chromium install" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp -t install-browser.XXXXXX.log)"
if $SUDO apt-get update -qq >"$log" 2>&1 \
    && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >>"$log" 2>&1; then
    echo "install-browser: installed $(chromium --version 2>/dev/null || echo chromium)" >&2
    rm -f "$log"
else
    echo "install-browser: apt-get install chromium chromium-driver failed; last lines:" >&2
    tail -n 5 "$log" >&2
    rm -f "$log"
fi
exit 0
