#!/usr/bin/env bash
# Keep the shipped weights out of a lent GPU machine's copy of the working tree, and put them back.
#
# The device tool copies tracked files and untracked files git does not ignore, 64 MiB at most;
# the shipped models/glm-small/model.safetensors alone is 54.7 MB. `hide` takes it out of the git
# index and ignores it locally (.git/info/exclude), so the device call leaves it behind; `restore`
# undoes both. The file itself never moves. Between the two, git sees a staged deletion: do not
# commit until `restore` has run (`hide` refuses to start with other changes staged, and
# `status` says which state the tree is in).
#
#   tools/device_tree.sh hide      # before the device calls
#   tools/device_tree.sh restore   # right after them
#   tools/device_tree.sh status
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
FILE=models/glm-small/model.safetensors
EXCLUDE=.git/info/exclude
LINE="/$FILE"

hidden() { git diff --cached --name-only --diff-filter=D | grep -qx "$FILE"; }

case "${1:-}" in
  hide)
    [ -f "$FILE" ] || { echo "error: $FILE not found" >&2; exit 2; }
    if hidden; then echo "already hidden"; exit 0; fi
    if ! git diff --cached --quiet; then
      echo "error: other changes are staged; commit or unstage them first" >&2
      exit 2
    fi
    git rm --cached -q "$FILE"
    grep -qxF "$LINE" "$EXCLUDE" 2>/dev/null || echo "$LINE" >> "$EXCLUDE"
    echo "hidden: $FILE stays on disk, out of the index; run '$0 restore' before committing"
    ;;
  restore)
    if [ -f "$EXCLUDE" ]; then
      grep -vxF "$LINE" "$EXCLUDE" > "$EXCLUDE.tmp" || true
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    git reset -q -- "$FILE"
    if git diff --quiet -- "$FILE" && git ls-files --error-unmatch "$FILE" >/dev/null 2>&1; then
      echo "restored: $FILE is tracked and unchanged"
    else
      echo "error: $FILE is not back as committed; check 'git status'" >&2
      exit 1
    fi
    ;;
  status)
    if hidden; then echo "hidden (restore before committing)"; else echo "normal"; fi
    ;;
  *)
    echo "usage: $0 hide|restore|status" >&2
    exit 2
    ;;
esac
