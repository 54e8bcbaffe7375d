#!/usr/bin/env bash
# `make gpu-rehearsal`: the GPU window's steps, here, without a GPU or torch. A fresh Python 3.12 venv holds
# only the GPU image's packages that matter (tornado 6.6 included, as the image has it; no visdom,
# jsonpatch, websocket-client, tomli-w, google-crc32c, torch) and a decoy site-packages `scripts`; the
# README's own line installs .gpu-bundle/ with --no-index and runs the acceptance twice: --dry-run, then
# --rehearse (recorded failures through every check, a real Visdom server from the bundle, the reports and
# the archive verified). Everything stays in .gpu-rehearsal/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
R=.gpu-rehearsal
PACKAGES=(tensorboard typer rich psutil nvidia-ml-py requests scipy pillow markdown-it-py numpy pytest
          pytest-timeout "tornado>=6.6")
started=$SECONDS

rm -rf "$R/venv" "$R/out"
"$PY312" -m venv "$R/venv"
PIP_CACHE_DIR="$PWD/$R/pip-cache" "$R/venv/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}" \
  2>&1 | { grep -v "^WARNING: Location" || true; }
site=$("$R/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/scripts"
echo 'raise ImportError("a site-packages scripts package shadowed the working tree")' > "$site/scripts/__init__.py"

export PATH="$PWD/$R/venv/bin:$PATH" OUT="$PWD/$R/out"  # python3 is the venv's, as the image's is there
for missing in torch visdom jsonpatch websocket tomli_w google_crc32c; do
  if python3 -c "import $missing" 2>/dev/null; then echo "rehearsal: $missing must not be installed" >&2; exit 1; fi
done
line=$(grep -m1 '^T=$(mktemp -d) && python3 -m pip install' README.md) || {
  echo "rehearsal: README.md has no install line" >&2; exit 1; }
ACCEPT=--dry-run bash -c "$line" > "$R/dry-run.txt"
grep -q "^  - fp16: " "$R/dry-run.txt"
if ACCEPT="--dry-run --only fp17" bash -c "$line" 2> "$R/bad-only.txt"; then
  echo "rehearsal: an unknown --only id was accepted" >&2; exit 1; fi
grep -q "unknown check(s) fp17" "$R/bad-only.txt"
ACCEPT="--rehearse --only nccl1,fp16" bash -c "$line" > "$R/only.txt"
test "$(grep -c '^FAIL' "$R/only.txt")" = 8  # fp16's three verdicts and nccl1's, for each of two recorded failures
ACCEPT=--rehearse bash -c "$line" > "$R/rehearse.txt"
echo "gpu-rehearsal: passed in $((SECONDS - started)) s; archives: $(du -b "$OUT"/*/evidence.tar.gz | awk '{printf "%s %d B; ", $2, $1}')"
