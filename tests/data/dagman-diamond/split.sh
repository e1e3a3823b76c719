#!/bin/sh
head -n 5 numbers.txt > left.txt
tail -n +6 numbers.txt > right.txt
