"""Causal-LM fine-tuning on user data, and `lava generate`, on a tiny random Llama.

The loss, the packing and the chat rendering are checked against independent computations
(each example run alone; HF's own shifted loss; the template rendered as text).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import lava_peft as lp
from lava_peft import cli
from lava_peft.commands import generate
from lava_peft.data.user_files import UserDataError, read_table
from lava_peft.train import classification_loss, default_forward
from lava_peft.train.causal_lm import (build_causal_lm_task, enable_memory_savers, is_checkpointing, load_causal_lm,
                                       perplexity, token_nll)
from lava_peft.train.data import IndexedData
from lava_peft.train.lm_data import IGNORE, encode_examples, pack_rows, shifted_labels

from _tiny_lm import save_tiny_lm_dir
from _tiny_models import randomize_adapters

WORDS = ["warm", "dull", "funny", "long", "bright", "empty", "sharp", "flat"]


def pc_rows(n=12):
    return [{"prompt": f"Classify the sentiment of: a {' '.join(WORDS[: 1 + i % 5])} film. Answer:",
             "completion": " positive" if i % 2 else " negative"} for i in range(n)]


def chat_rows(n=8):
    return [{"messages": [{"role": "user", "content": f"hi {WORDS[i % 8]}"}, {"role": "assistant", "content": "the fox"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": f"to be {i}"}]}
            for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return str(save_tiny_lm_dir(tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="module")
def plain_lm_dir(tmp_path_factory):
    return str(save_tiny_lm_dir(tmp_path_factory.mktemp("lm_nochat"), chat_template=False))


def adapted(model, seed=0, config=None):
    torch.manual_seed(seed)  # the adapters' own init
    model = lp.adapt(model, config or lp.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, seed=seed)
    return model


# ----------------------------------------------------------------------------- loss
def test_completion_only_loss_equals_masked_cross_entropy(lm_dir, tmp_path):
    rows = pc_rows(6)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    task = build_causal_lm_task(lm_dir, data, eval_data=data, max_len=64)  # train = every row, in order
    model, tok = adapted(task.model), task.tokenizer
    batch = IndexedData(task.train).batch(list(range(6)))
    assert batch["labels"].shape == batch["input_ids"].shape  # padding trimmed from labels too
    ours = classification_loss(default_forward(model, batch), batch["labels"])
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # each example alone; completion tokens from tokenizing the completion text
            p = tok(row["prompt"])["input_ids"]
            c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = F.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            total -= sum(float(logp[len(p) + j - 1, c[j]]) for j in range(len(c)))
            count += len(c)
    assert count == int((batch["labels"] != IGNORE).sum())
    torch.testing.assert_close(ours.item(), total / count, rtol=1e-5, atol=1e-6)


def test_train_on_prompt_equals_the_models_own_shifted_loss(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(4))
    task = build_causal_lm_task(lm_dir, data, eval_data=data, completion_only=False)
    model = adapted(task.model)
    batch = IndexedData(task.train).batch([0, 1, 2, 3])
    ours = classification_loss(default_forward(model, batch), batch["labels"])
    hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=hf_labels).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- packing
def test_pack_rows_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 4]
    rows = pack_rows(lengths, 12)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows) and len(rows) == 4


def test_packing_never_mixes_labels_or_attention(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(10))
    packed = build_causal_lm_task(lm_dir, data, eval_data=data, max_len=64, pack=True)
    plain = build_causal_lm_task(lm_dir, data, eval_data=data, max_len=64)
    t = packed.train
    assert "attention_mask" not in t and len(t["input_ids"]) < 10
    examples, _ = encode_examples(packed.tokenizer, read_table(data), 64)
    by_ids = {tuple(e.ids): e for e in examples}
    segments = 0
    for ids, pos, labels in zip(t["input_ids"], t["position_ids"], t["labels"]):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            seg = tuple(ids[a:b].tolist())
            if seg not in by_ids:  # the padding tail: nothing is learned there
                assert (labels[a:b] == IGNORE).all()
                continue
            segments += 1
            assert labels[a:b].tolist() == shifted_labels(by_ids[seg])  # its own labels, last one ignored
    assert segments == 10
    # block-diagonal attention: the summed NLL of the packed rows equals that of the examples alone
    torch.manual_seed(0)
    model = adapted(packed.model)
    with torch.no_grad():
        nll_packed = token_nll(model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits, t["labels"])
        p = plain.train
        nll_plain = token_nll(model(input_ids=p["input_ids"], attention_mask=p["attention_mask"], use_cache=False).logits, p["labels"])
    assert nll_packed[1] == nll_plain[1]
    torch.testing.assert_close(nll_packed[0], nll_plain[0], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- chat template
def test_chat_rendering_trains_only_assistant_turns(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", chat_rows(1))
    _, tok = load_causal_lm(lm_dir)
    (ex,), stats = encode_examples(tok, read_table(data), 128)
    messages = chat_rows(1)[0]["messages"]
    assert stats["format"] == "messages"
    assert tok.decode(ex.ids) == tok.apply_chat_template(messages, tokenize=False)
    trained = [i for i, t in zip(ex.ids, ex.trained) if t]
    assert tok.decode(trained) == "the fox<|end|>to be 0<|end|>"
    # `lava generate --chat` tokenizes a prompt exactly like the training prefix of the first reply
    prefix = generate._prompt_ids(tok, {"messages": messages[:1]}, chat=True)
    assert prefix == ex.ids[: len(prefix)] and ex.trained.index(True) == len(prefix)


def test_gradient_checkpointing_gives_the_same_gradients(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(4))
    grads = []
    for checkpointing in (False, True):
        task = build_causal_lm_task(lm_dir, data, eval_data=data)
        model = adapted(task.model)
        enable_memory_savers(model, gradient_checkpointing=checkpointing)
        assert is_checkpointing(model) == checkpointing
        model.train()
        batch = IndexedData(task.train).batch([0, 1, 2, 3])
        classification_loss(default_forward(model, batch), batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- lava train --task causal-lm
def test_lava_train_causal_lm_with_every_method(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(16))
    for method in ("lava", "lora", "shira", "dylora", "lowbit", "mosa", "sft", "full"):
        out = tmp_path / method
        extra = ["--pack"] if method == "lora" else []
        if method == "sft":  # 2 phase-1 steps on a tiny random LM leave q/k unchanged: a global top-k skips them
            extra = ["--sft-scope", "layer"]
        code = cli.main(["train", "--task", "causal-lm", "--model", lm_dir, "--data", data, "--out", str(out),
                         "--method", method, "--rank", "4", "--max-steps", "2", "--batch-size", "8", "--lr", "0.01", "--n-samples", "1",
                         "--sft-phase1-epochs", "0.5", "--no-progress", "--threads", "1", *extra])
        assert code == 0, method
        report = json.loads((out / "lm_eval.json").read_text())
        assert len((out / "samples.jsonl").read_text().splitlines()) == 1
        assert report["data"]["packed"] == (method == "lora")
        if method == "full":
            continue
        # the saved adapter reproduces the final held-out perplexity exactly
        task = build_causal_lm_task(lm_dir, data, eval_split=0.1, max_len=64)
        model = lp.AdaptedModel.from_pretrained(task.model, str(out / "adapter"))
        assert perplexity(model, task.eval)["perplexity"] == pytest.approx(report["perplexity_after"], rel=1e-5), method


def _generate_ns(*args):
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    return p.parse_args(list(args))


def _saved_adapter(lm_dir, path, seed, config):
    base, _ = load_causal_lm(lm_dir)
    model = adapted(base, seed=seed, config=config)
    model.save_pretrained(str(path))
    return str(path)


def _alone(lm_dir, adapter_dir, prompt, n=6):
    """Greedy tokens of one prompt with one adapter (or none), loaded independently."""
    base, tok = load_causal_lm(lm_dir)
    model = lp.AdaptedModel.from_pretrained(base, adapter_dir) if adapter_dir else base.eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_lava_generate_mixed_adapters_equal_each_adapter_alone(lm_dir, tmp_path, capsys):
    a = _saved_adapter(lm_dir, tmp_path / "a", 1, lp.LavaConfig(r=4, target_modules="all-linear"))
    b = _saved_adapter(lm_dir, tmp_path / "b", 2, lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = ["Classify the sentiment of: a warm film. Answer:", "to be"]
    out = tmp_path / "gen.jsonl"
    ns = _generate_ns("--model", lm_dir, "--adapter", f"a={a}", "--adapter", f"b={b}", "--prompt", prompts[0],
                      "--prompt", prompts[1], "--max-new-tokens", "6", "--out", str(out), "--batch-size", "8")
    assert generate.run(ns) == 0  # default with two adapters: every prompt with each, in one mixed batch
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in results] == [(p, n) for p in prompts for n in ("a", "b")]
    expected = {(p, n): _alone(lm_dir, d, p) for p in prompts for n, d in (("a", a), ("b", b), ("base", None))}
    for r in results:
        assert r["completion"] == expected[(r["prompt"], r["adapter"])]
    assert expected[(prompts[0], "a")] != expected[(prompts[0], "b")]  # the adapters do differ
    # --use: one adapter per prompt, including the base model
    ns = _generate_ns("--model", lm_dir, "--adapter", f"a={a}", "--adapter", f"b={b}", "--prompt", prompts[0],
                      "--prompt", prompts[1], "--use", "base,b", "--max-new-tokens", "6", "--json")
    capsys.readouterr()
    assert generate.run(ns) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["completion"] for r in shown] == [expected[(prompts[0], "base")], expected[(prompts[1], "b")]]


def test_lava_generate_from_a_run_through_the_cli(lm_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(16))
    run = tmp_path / "run"
    assert cli.main(["train", "--task", "causal-lm", "--model", lm_dir, "--data", data, "--out", str(run), "--method",
                     "lava", "--max-steps", "3", "--lr", "0.05", "--n-samples", "1", "--no-progress", "--threads", "1"]) == 0
    # register the command as cli.py will (the lead wires `generate.register(register_command)`)
    monkeypatch.setitem(cli.COMMANDS, "generate", None)
    generate.register(lambda name, help, add, run_, description=None: cli.COMMANDS.__setitem__(
        name, cli.Command(name, help, description or help, add, run_)))
    prompt = "Classify the sentiment of: a dull film. Answer:"
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(run), "--prompt", prompt, "--max-new-tokens", "6", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["completion"] == _alone(lm_dir, str(run / "best"), prompt)  # the model came from run.json
    bad = {
        "unknown adapter": (["--adapter", f"x={run}", "--prompt", "p", "--use", "y"], "'y'"),
        "no prompts": (["--adapter", str(run)], "no prompts"),
        "missing adapter": (["--adapter", str(tmp_path / "nope"), "--prompt", "p"], "does not exist"),
        "no base model": (["--adapter", str(run / "best"), "--prompt", "p"], "--model"),
        "greedy with several returns": (["--adapter", str(run), "--prompt", "p", "--num-return-sequences", "2"],
                                        "--temperature"),
    }
    for case, (args, message) in bad.items():
        capsys.readouterr()
        if case == "no base model":  # an adapter directory outside any run
            import shutil

            shutil.copytree(run / "best", tmp_path / "lone")
            args = ["--adapter", str(tmp_path / "lone"), "--prompt", "p"]
        assert cli.main(["generate", *args]) == 2, case
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (case, err)


# ----------------------------------------------------------------------------- errors
def test_causal_lm_user_errors_are_one_line_and_exit_code_2(lm_dir, plain_lm_dir, tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    cases = {
        "no chat template": ([plain_lm_dir, chat], [], "no chat template"),
        "no usable columns": ([lm_dir, write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}] * 4)], [],
                              "needs 'prompt' and 'completion'"),
        "no assistant turn": ([lm_dir, write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])],
                              [], "line 1: the conversation has no 'assistant'"),
        "bad message": ([lm_dir, write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])], [],
                        "line 1: every message needs"),
        "empty completion": ([lm_dir, write_jsonl(tmp_path / "e.jsonl", pc_rows(3) + [{"prompt": "p", "completion": ""}])],
                             [], "line 4: 'completion'"),
        "head method": ([lm_dir, chat], ["--method", "head"], "--method head"),
        "packaged data": ([lm_dir, "rotten_tomatoes"], [], "your own data file"),
        "unknown task": ([lm_dir, chat], ["--task", "summarize"], "--task must be one of"),
        "max-len too small": ([lm_dir, write_jsonl(tmp_path / "p.jsonl", pc_rows(4))], ["--max-len", "8"],
                              "raise --max-len"),
    }
    for case, ((model, data), extra, message) in cases.items():
        capsys.readouterr()
        args = ["train", "--task", "causal-lm", "--model", model, "--data", data, "--out", str(tmp_path / "r"),
                "--no-progress", "--threads", "1", *extra]
        assert cli.main(args) == 2, case
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("lava train: error: ") and message in err, (case, err)
    with pytest.raises(UserDataError, match="no chat template"):
        _, tok = load_causal_lm(plain_lm_dir)
        generate._prompt_ids(tok, {"prompt": "hi"}, chat=True)
