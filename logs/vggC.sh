cd /work/wt-mbv2
while kill -0 $(cat logs/vggA.pid) 2>/dev/null; do sleep 15; done
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
V="--suite vgg --image-size 32 --n-train 400 --n-eval 400 --epochs 2"
nice -n 10 $PY -m benchmarks.quality.evidence $V --variants lava_vstep --seeds 0,1,2
nice -n 10 $PY -m benchmarks.quality.grad_variance --out benchmarks/results/lambda_sweep --n-train 400 --n-eval 400 --epochs 2 --batch-size 32 --probe-batches 4 --probe-at 0,0.5,1 --seeds 0,1,2
nice -n 10 $PY -m benchmarks.quality.evidence $V --variants dora --seeds 0,1,2
