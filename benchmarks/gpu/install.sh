#!/usr/bin/env bash
# There (the lent GPU machine): take one folder of benchmarks/gpu/fetch.sh into /tmp/stage, join a wheel whose
# parts have all arrived (checked against parts.sha256), and install every whole wheel not installed yet into
# /tmp/site. Both stay while the machine is warm.
# Usage: bash benchmarks/gpu/install.sh .gpu/N
set -euo pipefail
mkdir -p /tmp/stage /tmp/site
cp -r "$1"/. /tmp/stage/
cd /tmp/stage
if [ -f parts.sha256 ]; then
  name=$(awk '{print $2}' parts.sha256)
  if [ ! -f "$name" ] && [ "$(ls "$name".part-* 2>/dev/null | wc -l)" -eq "$(cat parts.count)" ]; then
    cat "$name".part-* > "$name" && sha256sum -c parts.sha256 && rm -f "$name".part-*
  fi
fi
for wheel in *.whl; do
  [ -f "$wheel" ] && [ ! -f "$wheel.installed" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
  touch "$wheel.installed"
done
ls /tmp/stage
