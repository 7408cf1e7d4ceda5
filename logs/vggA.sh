cd /work/wt-mbv2
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
nice -n 10 $PY -m benchmarks.quality.evidence --suite vgg --image-size 32 --n-train 400 --n-eval 400 --epochs 2 --variants lora,lava,lava_initlora --seeds 2
