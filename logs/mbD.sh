cd /work/wt-mbv2
while kill -0 $(cat logs/mbC.pid) 2>/dev/null; do sleep 15; done
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
V="--suite vgg --image-size 32 --n-train 400 --n-eval 400 --epochs 2"
nice -n 10 $PY -m benchmarks.quality.evidence $V --variants lora --lr 1e-3 --seeds 0,1,2
