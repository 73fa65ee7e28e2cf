#!/usr/bin/env bash
# The README's test command, and what .ci/run runs: installs the real peers the tests talk to
# when they are missing (Postfix's smtp-sink/smtp-source, swaks, strace, chromium and
# chromium-driver, slapd and ldap-utils), then runs the suite.
# As root on Debian it installs them with apt-get; otherwise it names the packages and stops.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v smtp-sink >/dev/null || need+=(postfix)
command -v swaks >/dev/null || need+=(swaks)
command -v strace >/dev/null || need+=(strace)
command -v python3 >/dev/null || need+=(python3)
# The web console's browser test drives headless Chromium through WebDriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# The directory tests run their own OpenLDAP server (tests/directory.rs).
[ -x /usr/sbin/slapd ] || need+=(slapd)
command -v ldapadd >/dev/null || need+=(ldap-utils)

if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${need[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "test.sh: the tests need these Debian packages: ${need[*]}" >&2
        echo "test.sh: install them (sudo apt-get install ${need[*]}) and run ./test.sh again" >&2
        exit 1
    fi
fi

# The outbound TLS tests' mailbox server (tests/common/tls_mailbox.py).
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
    echo "test.sh: installing aiosmtpd (pip)" >&2
    # A fresh Debian python3 may come without pip.
    if ! python3 -m pip --version >/dev/null 2>&1 &&
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq python3-pip >/dev/null
    fi
    python3 -m pip install -q aiosmtpd 2>/dev/null ||
        python3 -m pip install -q --break-system-packages aiosmtpd || {
        echo "test.sh: the tests need Python's aiosmtpd: pip install aiosmtpd" >&2
        exit 1
    }
fi

exec cargo test "$@"
