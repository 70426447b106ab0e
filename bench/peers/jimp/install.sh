#!/usr/bin/env bash
# Installs the jimp peer (version pinned in package.json / package-lock.json) into
# ./node_modules. Needs Node.js >= 18 and npm.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund
else
    npm install --no-audit --no-fund
fi
node -e 'const p = require("./node_modules/jimp/package.json"); console.log(`jimp ${p.version} installed`)'
