#!/usr/bin/env bash
# Installs what tests/test_systemd.py needs to boot a systemd container (and strace, which
# tests/test_durability.py uses, and python3-venv, which tests/test_readme_deploy.py uses to
# make README's venv with /usr/bin/python3): systemd-nspawn
# (Debian/Ubuntu package systemd-container), plus systemd-analyze and nsenter, which the
# base system normally has already. Idempotent: does nothing when all are present.
# Needs root and apt-get to install; otherwise it says what is missing and leaves it to the
# test, which then skips (or fails, under EVENTPIPE_REQUIRE_NSPAWN=1).
set -euo pipefail

missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
# strace: tests/test_durability.py watches the fsync order of sync="always" with it.
command -v strace >/dev/null 2>&1 || missing+=(strace)
# tests/test_readme_deploy.py makes README's venv with the system's /usr/bin/python3.
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-systemd.sh: missing ${missing[*]}; not root or no apt-get, not installing" >&2
    exit 0
fi
echo "install-systemd.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
