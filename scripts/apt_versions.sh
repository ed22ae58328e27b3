#!/usr/bin/env bash
# The versions apt would find for packages, read from a distribution's archive indexes: what an image's
# `apt-get install` gets, checked without a Docker engine.
#
#   scripts/apt_versions.sh ARCHIVE "SUITE..." "COMPONENT..." PACKAGE...
#   scripts/apt_versions.sh http://archive.ubuntu.com/ubuntu "jammy jammy-updates jammy-security" \
#       "main universe" python3.11 python3.11-venv tini          # Dockerfile.gpu's base (Ubuntu 22.04)
#   scripts/apt_versions.sh http://deb.debian.org/debian "bookworm trixie" main tini   # python:3.11-slim's (Debian)
#
# Prints "suite/component package version" for each package found (amd64), nothing for one that is not there.
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 ARCHIVE \"SUITE...\" \"COMPONENT...\" PACKAGE..." >&2
    exit 2
fi
archive=$1 suites=$2 components=$3
shift 3
want=" $* "
for suite in $suites; do
    for component in $components; do
        url="$archive/dists/$suite/$component/binary-amd64/Packages.gz"
        if ! index=$(curl -fsS --max-time 120 "$url" | gunzip); then
            echo "could not read $url" >&2
            exit 1
        fi
        awk -v where="$suite/$component" -v want="$want" '
            /^Package: / { pkg = $2 }
            /^Version: / { if (index(want, " " pkg " ")) print where, pkg, $2 }
        ' <<<"$index"
    done
done
