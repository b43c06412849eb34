#!/bin/bash
# chapter 07 alone on the demo profile in a scratch clone: $1 = clone name
c=/tmp/i10l/clones/$1
cd $c
export PYTHONPATH=$c STLIB_NO_PROGRESS=1
cat /proc/loadavg > /tmp/i10l/ch_$1.load
/usr/bin/time -v nice -n 10 /work/main/.venv/bin/stlib run --profile demo --only 07_real_tissue --no-build --force > /tmp/i10l/ch_$1.log 2> /tmp/i10l/ch_$1.time
cat /proc/loadavg >> /tmp/i10l/ch_$1.load
