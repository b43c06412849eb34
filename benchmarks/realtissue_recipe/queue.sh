#!/bin/bash
# runs the experiments listed in queue.txt one at a time (each a pair of training processes)
cd /work/wt/i10f
export PYTHONPATH=/work/wt/i10f
while read -r name args; do
  [ -z "$name" ] && continue
  grep -q "^$name " .bench-work/done.txt 2>/dev/null && continue
  echo "=== $name $args $(date)" >> .bench-work/queue.log
  nice -n 10 /work/main/.venv/bin/python .bench-work/exp.py "$name" "$args" > ".bench-work/$name.log" 2>&1
  echo "$name $?" >> .bench-work/done.txt
  grep -v "it/s\|s/it\|it\]" ".bench-work/$name.log" | tail -12 >> .bench-work/queue.log
done < .bench-work/queue.txt
