#!/bin/sh
# sum.sh IN OUT: the sum of IN's lines into OUT
total=0
while read -r n; do total=$((total + n)); done < "$1"
echo "$total" > "$2"
echo "summed $1: $total"
