#!/bin/sh
# Create (idempotently) a SoftHSM2 token for plugshare's tests and CI.
#
#   .ci/softhsm.sh DIR
#
# writes DIR/softhsm2.conf (token directory DIR/tokens) and, unless it already exists,
# initialises a token labelled "plugshare-test" with user PIN 1234 and SO PIN 5678.
# Prints the line SOFTHSM2_CONF=DIR/softhsm2.conf; export it before loading libsofthsm2.
set -eu

dir=${1:?usage: .ci/softhsm.sh DIR}
label=plugshare-test

command -v softhsm2-util >/dev/null 2>&1 || {
    echo "softhsm.sh: softhsm2-util not found; install SoftHSM2 (apt-get install softhsm2)" >&2
    exit 1
}

mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
cat >"$conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF

SOFTHSM2_CONF="$conf"
export SOFTHSM2_CONF
if ! softhsm2-util --show-slots | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*\$"; then
    softhsm2-util --init-token --free --label "$label" --pin 1234 --so-pin 5678 >/dev/null
fi
echo "SOFTHSM2_CONF=$conf"
