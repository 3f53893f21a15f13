#!/usr/bin/env bash
# Issue #21's GPU plan, end to end, sized for one call of the device tool (10 minutes a command,
# at most 8 files / 64 MiB back; docs/shipped-model.md, "The base model"):
#   1. the base corpus (data/corpus/ holds it; tools/build_corpus_base.sh rebuilds it, with network);
#   2. the `base` preset trained twice on it at equal tokens, GLM objective and plain causal (GPT),
#      side by side on one GPU (SIDE_BY_SIDE=1) or one after the other. TIME_BUDGET=S (seconds,
#      the default on a GPU: 360) sizes both runs in time (`train --time-budget`, one shared
#      `--steps-file`, so equal steps); STEPS=N or TOKENS=N size them in steps instead;
#   3. both exported (tools/ship_model.py, FP16) and scored on the dev tasks and both held-out
#      perplexity slices (glm130b eval; a causal model is scored as a causal LM);
#   4. the GLM-vs-GPT table written into $DOC (tools/compare_objectives.py);
#   5. the GLM model packaged: FP16 if it fits SHIP_LIMIT_MB, else INT8 if that fits, else INT4
#      with an INT8 head (HEAD_BITS; the tied table is stored once, as the head), in $WORK/ship/glm-base;
#   6. with RETURN=DIR (the device tool's $OUT): what is worth bringing back, in few files: the
#      package's weights gzipped and split in 15 MB parts (weights.gz.part-*), everything else in
#      one base.tgz (package files, eval JSONs and logs, metrics, train configs, the table).
#      `cat weights.gz.part-* | gunzip > model.safetensors` joins them.
# On a GPU:     RETURN=$OUT tools/train_base.sh                    (TIME_BUDGET=360 by default)
# Over two GPU sessions (each run gets the whole GPU): OBJECTIVES=glm TIME_BUDGET=400 in the first;
#               in a later one OBJECTIVES=gpt PREVIOUS=models/glm-base/training, which trains the GPT
#               run the steps, batch, length, preset and schedule the GLM run recorded there (equal
#               tokens) and puts both in the table. PREVIOUS=DIR: an earlier run of the other
#               objective (train_config.json, metrics.jsonl, eval-LABEL.json: base.tgz's LABEL/ folder).
# CPU check:    PRESET=tiny SEQ=64 BATCH=4 STEPS=3 DEVICE=cpu PRECISION=fp32 COMPILE= EVAL_LIMIT=4 \
#               SIDE_BY_SIDE=0 DOC=/tmp/table.md WORK=/tmp/base-check RETURN=/tmp/base-return tools/train_base.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
OBJECTIVES=${OBJECTIVES:-glm gpt}  # the runs trained here (glm: the GLM objective; gpt: plain causal)
PREVIOUS=${PREVIOUS:+$(realpath -m "$PREVIOUS")}
label_objective() { if [ "$1" = gpt ]; then echo causal; else echo "$1"; fi; }
trains() { [[ " $OBJECTIVES " == *" $1 "* ]]; }  # is run $1 trained in this call?
for n in $OBJECTIVES; do
    case $n in glm|gpt) ;; *) echo "error: OBJECTIVES takes glm and/or gpt, not '$n'" >&2; exit 2 ;; esac
done
if [ -n "$PREVIOUS" ]; then  # equal tokens with an earlier run: its recorded sizes, or an error
    PREVIOUS_SETTINGS=$($PY - "$PREVIOUS" "$OBJECTIVES" <<'EOF'
import json, os, sys
from pathlib import Path
folder, here = Path(sys.argv[1]), sys.argv[2].split()
try:
    cfg = json.loads((folder / "train_config.json").read_text())
    label = "gpt" if cfg.get("objective") == "causal" else "glm"
    for need in ("metrics.jsonl", f"eval-{label}.json"):
        (folder / need).stat()
except (OSError, ValueError) as e:
    sys.exit(f"error: PREVIOUS={folder} is not an earlier run's record "
             f"(train_config.json, metrics.jsonl, eval-LABEL.json): {e}")
if label in here:
    sys.exit(f"error: PREVIOUS={folder} is a {label} run; OBJECTIVES must then name only the other one")
recorded = {"PRESET": cfg["preset"], "SEQ": cfg["seq_len"], "BATCH": cfg["batch_size"], "STEPS": cfg["steps"],
            "LR": cfg["lr"], "WARMUP": cfg["warmup_steps"]}
for name, value in recorded.items():  # a setting given here must agree with the record
    if os.environ.get(name) and os.environ[name] != str(value):
        sys.exit(f"error: {name}={os.environ[name]}, but the earlier {label} run in {folder} used {value}: "
                 "equal tokens need the same")
import yaml  # the data settings come from configs/base.yaml: it must still say what the record says
here_cfg = yaml.safe_load(Path("configs/base.yaml").read_text())
norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
for key, default in (("sources", None), ("instructions", None), ("instruction_share", 0.05),
                     ("pack_instructions", False), ("gmask_prob", 0.7)):
    mine, theirs = norm(here_cfg.get(key, default)), norm(cfg.get(key, default))
    if mine != theirs:
        sys.exit(f"error: configs/base.yaml has {key}: {mine!r}, but the earlier {label} run in {folder} "
                 f"used {theirs!r}: equal tokens need the same data")
if cfg.get("grad_accum", 1) != 1 or os.environ.get("TOKENS") or os.environ.get("TIME_BUDGET"):
    sys.exit("error: with PREVIOUS the step count comes from the earlier run; leave TOKENS and TIME_BUDGET unset")
print(" ".join(f"{k}={v}" for k, v in recorded.items()), f"PREVIOUS_LABEL={label}")
EOF
) || exit 2
    declare $PREVIOUS_SETTINGS
fi
WORK=$(realpath -m "${WORK:-runs/base-plan}")
RETURN=${RETURN:+$(realpath -m "$RETURN")}
DEADLINE_S=${DEADLINE_S:-560}  # with RETURN: the evaluation is cut to end by then (the device call ends at 600)
PRESET=${PRESET:-base}
SEQ=${SEQ:-512}
BATCH=${BATCH:-32}
DEVICE=${DEVICE:-auto}
if [ -z "${STEPS:-}${TOKENS:-}" ] && [ "$DEVICE" != cpu ]; then TIME_BUDGET=${TIME_BUDGET:-360}; fi
TIME_BUDGET=${TIME_BUDGET:-}
TOKENS=${TOKENS:-40000000}
STEPS=${STEPS:-$(( TOKENS / (BATCH * SEQ) ))}
WARMUP=${WARMUP:-$(( STEPS < 2000 ? STEPS / 10 + 1 : 200 ))}
[ -n "$TIME_BUDGET" ] && WARMUP=${WARMUP_BUDGETED:-100}  # (the budget decides later: docs/training.md)
LR=${LR:-0.001}
PRECISION=${PRECISION:-bf16}
COMPILE=${COMPILE---compile}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-1}
EVAL_LIMIT=${EVAL_LIMIT:-}
EVAL_DEVICE=${EVAL_DEVICE:-auto}
EVAL_SECONDS=${EVAL_SECONDS:-150}
DOC=$(realpath -m "${DOC:-docs/shipped-model.md}")
SHIP_LIMIT_MB=${SHIP_LIMIT_MB:-60}
HEAD_BITS=${HEAD_BITS-8}  # INT4 packages: an INT8 head, the tied table stored once as it (HEAD_BITS= : FP16 table)
TASKS=(heldout_ppl heldout_ppl_base bilingual_verse_match zh_classics_cloze)
mkdir -p "$WORK"
# nothing of an earlier run in WORK (a warm device machine keeps /tmp) may come back as this run's
rm -rf "$WORK"/{ship,rescue,keep,glm-fp16,gpt-fp16,glm-int8,glm-int4*} "$WORK"/{eval,ship,train}-*.* "$WORK"/rescue.log
[ -n "$RETURN" ] && rm -f "$RETURN"/weights.gz.part-* "$RETURN"/base.tgz
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

bring_back() {  # on every exit with RETURN: what exists goes back (a failed evaluation keeps the training)
    local rc=$?
    trap - EXIT
    set +e  # bring back what can be brought back
    [ -n "$RETURN" ] || exit $rc
    stamp "6. what comes back -> $RETURN (exit $rc)"
    mkdir -p "$RETURN"
    local pkg="$WORK/ship/glm-base" keep="$WORK/keep" total files n f
    if [ ! -f "$pkg/model.safetensors" ] && trains glm && [ -f "$WORK/run-glm/model.safetensors" ]; then  # never packaged
        pkg="$WORK/rescue"; rm -rf "$pkg"
        $PY -m glm130b quantize --model "$WORK/run-glm" --bits 4 ${HEAD_BITS:+--head-bits $HEAD_BITS} --dtype fp16 \
            --out "$pkg" > "$WORK/rescue.log" 2>&1 || true
    fi
    if [ -f "$pkg/model.safetensors" ]; then
        gzip -1 -c "$pkg/model.safetensors" | split -b 15000000 - "$RETURN/weights.gz.part-"
    fi
    rm -rf "$keep" && mkdir -p "$keep/glm-base"
    if [ -d "$pkg" ]; then find "$pkg" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$keep/glm-base/" \; ; fi
    for n in $OBJECTIVES; do  # (only this call's runs: a warm machine may keep older ones)
        mkdir -p "$keep/$n"
        for f in "$WORK/run-$n/metrics.jsonl" "$WORK/run-$n/train_config.json" "$WORK/eval-$n.json" \
                 "$WORK/eval-$n.log" "$WORK/train-$n.log" "$WORK/ship-$n.log"; do
            if [ -f "$f" ]; then cp "$f" "$keep/$n/"; fi
        done
    done
    if [ -f "$WORK/rescue.log" ]; then cp "$WORK/rescue.log" "$keep/"; fi
    if [ -f "$DOC" ]; then sed -n '/<!-- glm-vs-gpt:begin -->/,/<!-- glm-vs-gpt:end -->/p' "$DOC" > "$keep/table.md"; fi
    tar -C "$keep" -czf "$RETURN/base.tgz" .
    total=$(du -cb "$RETURN"/* | tail -1 | cut -f1); files=$(ls "$RETURN" | wc -l)
    ls -la "$RETURN"
    if [ "$total" -gt $(( 63 * 1048576 )) ] || [ "$files" -gt 8 ]; then
        echo "WARNING: $RETURN holds $files files, $total bytes: over what one call brings back (8 files, 64 MiB)"
    fi
    stamp "done (exit $rc)"
    exit $rc
}
trap bring_back EXIT

stamp "1. base corpus"
[ -f data/corpus/zh_song_poems.jsonl.gz ] && [ "${BUILD_CORPUS:-0}" != 1 ] || bash tools/build_corpus_base.sh
[ -f data/eval/heldout_ppl_base.jsonl.gz ] || $PY tools/build_heldout.py --base

if [ -n "$TIME_BUDGET" ]; then  # --steps is then a cap (configs/base.yaml's 2400 would be one)
    size=(--time-budget "$TIME_BUDGET" --steps "${MAX_STEPS:-100000}"); what="$TIME_BUDGET s each"
    # several runs share one count (equal steps); a run alone decides on its own (earlier: docs/training.md)
    if [ "$(wc -w <<< "$OBJECTIVES")" -gt 1 ]; then size+=(--steps-file "$WORK/steps.json"); fi
else size=(--steps "$STEPS"); what="$STEPS steps each"; fi
runs=($OBJECTIVES)
stamp "2. training $PRESET, $what, $BATCH x $SEQ tokens a step: ${runs[*]} ($DEVICE, $PRECISION $COMPILE)"
rm -f "$WORK/steps.json"
common=(--config configs/base.yaml --preset "$PRESET" "${size[@]}" --batch-size "$BATCH" --seq-len "$SEQ"
        --warmup-steps "$WARMUP" --lr "$LR" --device "$DEVICE" --precision "$PRECISION" --sources base
        --checkpoint-every 100000)
train() {  # label objective
    rm -rf "$WORK/run-$1"
    $PY -m glm130b train "${common[@]}" --objective "$2" --out "$WORK/run-$1" $COMPILE > "$WORK/train-$1.log" 2>&1
}
if [ "$SIDE_BY_SIDE" = 1 ]; then
    pids=(); for n in "${runs[@]}"; do train "$n" "$(label_objective "$n")" & pids+=($!); done
    for i in "${!runs[@]}"; do
        wait "${pids[$i]}" && continue
        tail -30 "$WORK/train-${runs[$i]}.log"  # a failed run stops its partner (and its Python)
        for p in "${pids[@]}"; do pkill -TERM -P "$p" || true; kill "$p" 2>/dev/null || true; wait "$p" || true; done
        exit 3
    done
else
    for n in "${runs[@]}"; do train "$n" "$(label_objective "$n")" || { tail -30 "$WORK/train-$n.log"; exit 3; }; done
fi
for n in "${runs[@]}"; do stamp "$n:"; grep -h "time budget" "$WORK/train-$n.log" || true; tail -c 400 "$WORK/train-$n.log"; echo; done

stamp "3. export (FP16) and evaluation (all at once)"
for n in "${runs[@]}"; do
    rm -rf "$WORK/$n-fp16"
    $PY tools/ship_model.py "$WORK/run-$n" "$WORK/$n-fp16" > "$WORK/ship-$n.log"
done
secs=$EVAL_SECONDS
if [ -n "$RETURN" ]; then  # leave the packaging about 60 s before the deadline
    left=$(( DEADLINE_S - ($(date +%s) - T0) - 60 )); if [ "$left" -lt "$secs" ]; then secs=$(( left > 10 ? left : 10 )); fi
fi
evaluate() {  # label
    timeout "$secs" $PY -m glm130b eval --model "$WORK/$1-fp16" --device "$EVAL_DEVICE" --no-progress \
        ${EVAL_LIMIT:+--limit $EVAL_LIMIT} --output "$WORK/eval-$1.json" "${TASKS[@]}" > "$WORK/eval-$1.log" 2>&1
}
pids=(); for n in "${runs[@]}"; do evaluate "$n" & pids+=($!); done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
for n in "${runs[@]}"; do cat "$WORK/eval-$n.log"; done
[ $failed = 0 ] || { stamp "an evaluation failed or ran out of time (its log is above)"; exit 4; }

STEPS_RUN=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'])" "$WORK/run-${runs[0]}/train_config.json")
table=()  # each objective from this call, or from PREVIOUS
for n in glm gpt; do
    if [ -f "$WORK/eval-$n.json" ] && trains "$n"; then table+=(--run "${n^^}=$WORK/run-$n:$WORK/eval-$n.json")
    elif [ "${PREVIOUS_LABEL:-}" = "$n" ]; then table+=(--run "${n^^}=$PREVIOUS:$PREVIOUS/eval-$n.json"); fi
done
if [ ${#table[@]} = 4 ]; then
    stamp "4. GLM vs GPT table -> $DOC"
    $PY tools/compare_objectives.py --doc "$DOC" "${table[@]}" \
        --note "$(date -u +%Y-%m-%d), $STEPS_RUN steps of $BATCH x $SEQ, $DEVICE${PREVIOUS:+ (${PREVIOUS_LABEL^^} in an earlier call)} ${EVAL_LIMIT:+(eval --limit $EVAL_LIMIT)}"
else
    stamp "4. no table: only ${runs[*]} here; the other objective in a later call: OBJECTIVES=... PREVIOUS=<this run's record>"
fi

if ! trains glm; then stamp "done (no GLM run here: nothing to package)"; exit 0; fi
stamp "5. packaging the GLM model (limit $SHIP_LIMIT_MB MB)"
limit=$(( SHIP_LIMIT_MB * 1000000 ))
size() { stat -c %s "$1/model.safetensors"; }
pick="$WORK/glm-fp16"; kind=fp16; qargs=""
for bits in 8 4; do
    [ "$(size "$pick")" -gt $limit ] || break
    qargs="--bits $bits"; kind="int$bits"
    if [ "$bits" = 4 ] && [ -n "$HEAD_BITS" ]; then qargs="$qargs --head-bits $HEAD_BITS"; kind="$kind-head$HEAD_BITS"; fi
    rm -rf "$WORK/glm-$kind"; $PY -m glm130b quantize --model "$WORK/glm-fp16" $qargs --dtype fp16 --out "$WORK/glm-$kind"
    pick="$WORK/glm-$kind"
done
rm -rf "$WORK/ship" && mkdir -p "$WORK/ship" && cp -r "$pick" "$WORK/ship/glm-base"
cp "$WORK/eval-glm.json" "$WORK/ship/glm-base/eval.json"
cat > "$WORK/ship/glm-base/REGENERATE.md" <<EOT
Shipped as $kind ($(( $(size "$pick") / 1000000 )) MB; FP16 is $(( $(size "$WORK/glm-fp16") / 1000000 )) MB).
The FP16 model is regenerated by one command (same seed, data and steps; GPU runs are not
bit-exact, and a time-budgeted run's steps before its decision had a slightly higher learning rate):
    OBJECTIVES=glm PRESET=$PRESET SEQ=$SEQ BATCH=$BATCH STEPS=$STEPS_RUN LR=$LR WARMUP=$WARMUP tools/train_base.sh
(its FP16 export is then $WORK/glm-fp16${qargs:+; $kind from it: glm130b quantize --model $WORK/glm-fp16 $qargs --dtype fp16 --out DIR}).
EOT
$PY -m glm130b info --model "$WORK/ship/glm-base"

stamp "done: $WORK/ship/glm-base ($kind)"
