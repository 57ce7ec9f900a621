#!/usr/bin/env bash
# Make sure a headless Chromium is available for the report's browser tests (Debian's `chromium`).
# Idempotent and quiet: does nothing when `chromium` is already on PATH. Where it cannot install
# (not root and no usable sudo, no apt-get), it says why and exits 0 so the browser tests skip.
set -u

for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: apt-get not found; install chromium yourself (browser tests will be skipped)" >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: not root and no password-less sudo; cannot install chromium" \
         "(browser tests will be skipped)" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp -t ensure-chromium.XXXXXX)"
if $SUDO apt-get update -qq >"$log" 2>&1 \
    && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >>"$log" 2>&1; then
    rm -f "$log"
    exit 0
fi
echo "ensure-chromium: installing chromium failed (browser tests will be skipped); apt output:" >&2
tail -n 20 "$log" >&2
rm -f "$log"
exit 0
