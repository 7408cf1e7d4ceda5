cd /work/wt-mbv2
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
nice -n 10 $PY -m benchmarks.quality.evidence --suite mobilenet --variants lava_urand,lava_fold1x1,lava_dwlora,lava_lrP,lava_l001 --seeds 1,2,0
