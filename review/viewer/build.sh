#!/usr/bin/env bash
# Build the reading-room viewer bundle into review/static/viewer/ (viewer.js, workers, wasm).
#
#   review/viewer/build.sh          # no-op when nothing changed since the last build
#   review/viewer/build.sh --force  # rebuild anyway
#
# Needs node >= 20 and npm; dependencies come from package-lock.json (npm ci), never a CDN.
# Skips work by content, not by mtime: the stamp holds a sha256 of package.json,
# package-lock.json, build.mjs and src/; npm ci runs only when the lock file changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(cd "$here/.." && pwd)/static/viewer"
stamp="$out/.build-stamp"
force=0
[[ "${1:-}" == "--force" ]] && force=1

cd "$here"
inputs_hash() {
  { sha256sum package.json package-lock.json build.mjs
    find src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
want="$(inputs_hash)"
if [[ $force -eq 0 && -f "$stamp" && -f "$out/viewer.js" && "$(cat "$stamp")" == "$want" ]]; then
  echo "viewer: up to date ($out)"
  exit 0
fi

lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [[ $force -eq 1 || ! -f node_modules/.lock-sha256 || "$(cat node_modules/.lock-sha256)" != "$lock_hash" ]]; then
  # --ignore-scripts: no dependency needs an install script (esbuild finds its binary through
  # its optional @esbuild/<platform> package).
  npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
  echo "$lock_hash" > node_modules/.lock-sha256
fi

node build.mjs "$out"
echo "$want" > "$stamp"
