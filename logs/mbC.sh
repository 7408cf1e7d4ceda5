cd /work/wt-mbv2
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants lora,lava,lava_initlora,lava_vstep --seeds 3,4
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants dora --seeds 1,2
