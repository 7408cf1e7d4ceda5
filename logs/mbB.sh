cd /work/wt-mbv2
while kill -0 $(cat logs/mbA.pid) 2>/dev/null; do sleep 15; done
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants lava_vstep,lava_lrU4 --seeds 0,1,2
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants dora,lava_dora --seeds 0,1,2
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants lora,lava,lava_initlora,lava_vstep --seeds 3,4
