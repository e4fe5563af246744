#!/usr/bin/env bash
# Installs the tools the tests drive that pip does not provide, all from Debian's archive:
# - Chromium and ChromeDriver (packages chromium, chromium-driver) for tests/test_chat_page.py,
#   and selenium. Nothing is downloaded at test time (selenium's own driver manager is never
#   used: the test points it at /usr/bin/chromedriver).
# - promtool for tests/test_deploy.py, taken out of Debian's `prometheus` package (19 MB .deb):
#   only /usr/local/bin/promtool (48 MB) is unpacked, so no Prometheus server, init script or
#   user comes with it.
# - nginx (Debian's nginx-light) for tests/test_nginx_routing.py, which runs it as a plain
#   subprocess with a config, prefix and port of its own (whether the package's own service
#   starts on port 80 does not matter to them).
# Quick when already installed. Runs as root or with sudo.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
updated=""
apt_update() {
  if [ -z "$updated" ]; then $SUDO apt-get update -qq && updated=1; fi
}

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
python -c "import selenium" 2>/dev/null || python -m pip install -q "selenium>=4.20"

if ! command -v promtool >/dev/null; then
  apt_update
  tmp="$(mktemp -d)"
  chmod a+rwx "$tmp" # apt-get download writes there as the _apt user
  (cd "$tmp" && apt-get download -qq prometheus)
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  $SUDO install -m 755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
fi

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    nginx-light >/dev/null
fi

chromium --version 2>/dev/null | head -1
chromedriver --version | head -1
promtool --version | head -1
"$(command -v nginx || echo /usr/sbin/nginx)" -v 2>&1
