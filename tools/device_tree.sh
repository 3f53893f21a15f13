#!/usr/bin/env bash
# Keep the shipped weights out of a lent GPU machine's copy of the working tree, and put them back.
#
# The device tool copies tracked files and untracked files git does not ignore, 64 MiB at most;
# the shipped models/glm-small/model.safetensors alone is 54.7 MB (and a second shipped model,
# issue #21's models/glm-base, would add its own). `hide` takes every tracked
# models/*/model.safetensors out of the git index and ignores it locally (.git/info/exclude), so
# the device call leaves them behind; `restore` undoes both. The files themselves never move.
# Between the two, git sees staged deletions: do not commit until `restore` has run (`hide`
# refuses to start with other changes staged, and `status` says which state the tree is in).
#
#   tools/device_tree.sh hide      # before the device calls
#   tools/device_tree.sh restore   # right after them
#   tools/device_tree.sh status
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=.git/info/exclude
PATTERN='^models/[^/]*/model\.safetensors$'

hidden_files() { git diff --cached --name-only --diff-filter=D | grep -x -E "$PATTERN" || true; }
excluded_files() { [ -f "$EXCLUDE" ] && sed -n 's#^/##p' "$EXCLUDE" | grep -x -E "$PATTERN" || true; }

case "${1:-}" in
  hide)
    if [ -n "$(hidden_files)" ]; then echo "already hidden"; exit 0; fi
    if ! git diff --cached --quiet; then
      echo "error: other changes are staged; commit or unstage them first" >&2
      exit 2
    fi
    files=$(git ls-files | grep -x -E "$PATTERN" || true)
    [ -n "$files" ] || { echo "error: no tracked models/*/model.safetensors to hide" >&2; exit 2; }
    mkdir -p "$(dirname "$EXCLUDE")"
    for f in $files; do
      [ -f "$f" ] || { echo "error: $f not found" >&2; exit 2; }
      git rm --cached -q "$f"
      grep -qxF "/$f" "$EXCLUDE" 2>/dev/null || echo "/$f" >> "$EXCLUDE"
      echo "hidden: $f stays on disk, out of the index"
    done
    echo "run '$0 restore' before committing"
    ;;
  restore)
    files=$( { hidden_files; excluded_files; } | sort -u)
    if [ -f "$EXCLUDE" ]; then
      grep -v -x -E "/${PATTERN#^}" "$EXCLUDE" > "$EXCLUDE.tmp" || true
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    for f in $files; do
      git reset -q -- "$f"
      if git diff --quiet -- "$f" && git ls-files --error-unmatch "$f" >/dev/null 2>&1; then
        echo "restored: $f is tracked and unchanged"
      else
        echo "error: $f is not back as committed; check 'git status'" >&2
        exit 1
      fi
    done
    [ -n "$files" ] || echo "nothing was hidden"
    ;;
  status)
    if [ -n "$(hidden_files)" ]; then echo "hidden (restore before committing): $(hidden_files | tr '\n' ' ')"
    else echo "normal"; fi
    ;;
  *)
    echo "usage: $0 hide|restore|status" >&2
    exit 2
    ;;
esac
