#!/usr/bin/env bash
# Make headless Chromium available for the browser tests (Debian's package; Playwright drives it by path).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  exit 0
fi
echo "note: chromium is not installed and cannot be installed here (needs root + apt-get);" \
     "browser tests will be skipped (they fail instead when CI=true)." >&2
