#!/usr/bin/env bash
# Proves that BINARY runs from an empty root, as it does in the proxy image (FROM scratch): a
# directory holding only /usr/local/bin/weft, entered with chroot, runs `weft --version`, and
# `weft proxy` starts, binds its ports and answers readiness (over the chroot's shared network).
# Needs root (chroot).
set -euo pipefail
binary=${1:?usage: check-empty-root.sh BINARY}
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: check-empty-root.sh needs root (chroot)"
    exit 0
fi
if readelf --program-headers "$binary" | grep -q INTERP; then
    echo "error: $binary is dynamically linked (it names an interpreter):" >&2
    readelf --program-headers "$binary" | grep -A1 INTERP >&2
    exit 1
fi
root=$(mktemp -d)
chmod 0755 "$root"
trap 'kill "${proxy:-0}" 2>/dev/null || true; rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/local/bin/weft"
echo "empty root: $(cd "$root" && find . -mindepth 1 | sort | tr '\n' ' ')"
chroot --userspec=1337:1337 "$root" /usr/local/bin/weft --version
# Ports below the kernel's ephemeral range (32768 and up), so that no outgoing connection holds one;
# another program may still listen on one, so a proxy that cannot bind is tried again elsewhere.
for attempt in 1 2 3; do
    port=$((11000 + RANDOM % 15000))
    config="admin: { address: 127.0.0.1:$((port + 1)) }
readiness: { address: 127.0.0.1:$port }
outbound: { address: 127.0.0.1:$((port + 2)) }
inbound: { address: 127.0.0.1:$((port + 3)) }
access_log: { path: off }"
    WEFT_PROXY_CONFIG="$config" chroot --userspec=1337:1337 "$root" /usr/local/bin/weft proxy &
    proxy=$!
    if chroot --userspec=1337:1337 "$root" /usr/local/bin/weft wait \
        --url "http://127.0.0.1:$port/healthz/ready" --timeout 20s; then
        echo "ok: weft proxy ran from an empty root and became ready"
        exit 0
    fi
    kill "$proxy" 2>/dev/null || true
    wait "$proxy" 2>/dev/null || true
    echo "attempt $attempt: the proxy did not become ready on ports $port-$((port + 3))" >&2
done
exit 1
