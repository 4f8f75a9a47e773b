#!/usr/bin/env bash
# Installs the PostgreSQL server binaries (initdb, pg_ctl, postgres) that tests/_postgres.py
# runs a throwaway cluster with (issue 13): Debian/Ubuntu's postgresql package. Nothing is
# started or enabled here: the tests start their own cluster in a temp folder and stop it.
# Idempotent: does nothing when initdb is found. Needs root and apt-get to install; otherwise
# it says what is missing and leaves it to the tests, which then skip (or fail, under
# EVENTPIPE_REQUIRE_POSTGRES=1).
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-postgres.sh: missing initdb; not root or no apt-get, not installing" >&2
    exit 0
fi
echo "install-postgres.sh: installing postgresql" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the package from starting (and leaving running) its own cluster.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
