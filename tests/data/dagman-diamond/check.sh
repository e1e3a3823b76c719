#!/bin/sh
# POST script of D: check.sh NODE RETURN RETRY. Refuses the first attempt (RETRY 0) to show
# DAGMan's RETRY at work; then succeeds when D exited 0 and wrote a total.
echo "$1 $2 $3" >> post.log
[ "$3" -ge 1 ] && [ "$2" -eq 0 ] && [ -s total.txt ]
