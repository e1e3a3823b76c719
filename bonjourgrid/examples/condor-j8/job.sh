#!/bin/sh
# job.sh N [PARENT_OUTPUT ...]: writes jN.out, N plus the numbers its parents wrote.
# The numbers show the file flow: j8.out holds 40 only if every job read its parents' files.
n=$1
shift
total=$n
for parent in "$@"; do
    total=$((total + $(cat "$parent")))
done
echo "$total" > "j$n.out"
echo "J$n: $total"
