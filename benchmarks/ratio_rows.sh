#!/bin/sh
# The rows of one quality table at one size, one after the other: `compress MODEL --ratio RATIO` for the default
# and every baseline, then held-out perplexity (`eval --tasks none`: builtin:boolq-passages, BOS at the stream start).
#   sh benchmarks/ratio_rows.sh MODEL OUT [RATIO] [ROWS...]
#   sh benchmarks/ratio_rows.sh builtin:smollm2-135m runs/q25-smollm2 0.25
#   sh benchmarks/ratio_rows.sh builtin:qwen2.5-0.5b runs/q25-qwen 0.25 shortgpt replaceme replaceme-lstsq auto
# Each row writes OUT/ROW (the model folder), OUT/ROW.log, OUT/ROW-ppl.json; OUT/times.log has the seconds of each
# compress. A row whose -ppl.json exists is skipped (a rerun continues).
set -u
model=$1; out=$2; ratio=${3:-0.25}
shift 2; [ $# -gt 0 ] && shift
rows=${*:-auto swm swm-keep-first sleb shortgpt laco replaceme replaceme-lstsq}
bin=${SWM_RAY:-.venv/bin/swm-ray}
mkdir -p "$out"
for row in $rows; do
  case $row in
    auto) flags="" ;;
    swm) flags="--method swm" ;;
    swm-keep-first) flags="--method swm --merge keep-first" ;;
    replaceme) flags="--method replaceme --compensate none" ;;
    replaceme-lstsq) flags="--method replaceme" ;;
    sleb|shortgpt|laco|shortened-ppl) flags="--method $row" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  d=$out/$row
  [ -f "$d-ppl.json" ] && continue
  t0=$(date +%s)
  $bin compress "$model" --ratio "$ratio" --out "$d" --overwrite $flags > "$d.log" 2>&1
  echo "$row compress rc=$? $(( $(date +%s) - t0 )) s" >> "$out/times.log"
  $bin eval "$d" --tasks none --out "$d-ppl.json" > "$d-ppl.log" 2>&1
  echo "$row eval rc=$?" >> "$out/times.log"
done
