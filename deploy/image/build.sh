#!/usr/bin/env bash
# Builds the images deploy/Dockerfile describes: weft:<version> (the proxy, weft alone) and
# weft-init:<version> (with iptables). `--binary` builds only the static binary, without a container
# engine, and checks that it runs from an empty root (what CI does).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# What ships carries no debug information (the release profile keeps some for profiling).
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
if [ "${1:-}" = "--binary" ]; then
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
        || rustup target add x86_64-unknown-linux-musl
    cargo build --release --locked --target x86_64-unknown-linux-musl -p weft
    exec deploy/image/check-empty-root.sh target/x86_64-unknown-linux-musl/release/weft
fi
engine=$(command -v docker || command -v podman || true)
[ -n "$engine" ] || { echo "error: neither docker nor podman is installed" >&2; exit 1; }
"$engine" build -f deploy/Dockerfile --target proxy -t "weft:$version" .
"$engine" build -f deploy/Dockerfile --target init -t "weft-init:$version" .
echo "built weft:$version and weft-init:$version"
