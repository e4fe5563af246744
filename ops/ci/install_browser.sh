#!/usr/bin/env bash
# Installs what tests/test_chat_page.py drives: Debian's Chromium and ChromeDriver, and selenium.
# Nothing is downloaded at test time (selenium's own driver manager is never used: the test
# points it at /usr/bin/chromedriver). Quick when already installed.
set -euo pipefail
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
python -c "import selenium" 2>/dev/null || python -m pip install -q "selenium>=4.20"
chromium --version 2>/dev/null | head -1
chromedriver --version | head -1
