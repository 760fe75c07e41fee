#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the test suite.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
# edgekt serve: the page test drives Debian's chromium; the MQTT test starts a real broker.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# litert-torch (extra litert-export, the .tflite converter) pins typing-extensions < 4.13 through
# xdsl; pip backtracks for many minutes when it is resolved together with the rest, so it is
# installed in a second pass with the versions that satisfy both (pydantic < 2.12).
.venv/bin/python -m pip install -q "litert-torch>=0.10,<0.11" "pydantic<2.12" "typing-extensions<4.13"

export OMP_WAIT_POLICY=PASSIVE
# Two workers (pytest-xdist), one per core of the 2-core CI machine; each test file stays on one
# worker so its module fixtures are built once. EDGEKT_TEST_WORKERS=0 runs serially.
exec .venv/bin/python -m pytest -q -n "${EDGEKT_TEST_WORKERS:-2}" --dist loadfile "$@"
