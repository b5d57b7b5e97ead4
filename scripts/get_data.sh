#!/usr/bin/env bash
# Fashion-MNIST from Debian's dataset-fashion-mnist package (the original idx gz files).
set -euo pipefail
DATA="${1:-/usr/share/datasets/fashion-mnist}"
if [ -f "$DATA/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST not found in $DATA." >&2
    echo "Install it with 'apt-get install dataset-fashion-mnist' (as root), or put the four" >&2
    echo "idx .gz files there and pass DATA=DIR (tests that need it are then skipped)." >&2
    exit 0
fi
