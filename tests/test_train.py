"""lava_peft.train.Trainer: learning, exact resume, exact accumulation, the regularizer, files.

Real data (scikit-learn's 8x8 digits) with a small conv net, so that every test runs in
seconds; the pretrained-model runs are in test_cli.py / test_hf_trainer.py / the demo.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

import lava_peft as lp
from lava_peft.data import load_digits_split
from lava_peft.train import RunDirError, Trainer, TrainingArguments, read_metrics
from lava_peft.train.schedule import lr_lambda



@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = load_digits_split()
    train = {"x": torch.tensor(xtr[:, None]), "labels": torch.tensor(ytr)}
    test = {"x": torch.tensor(xte[:, None]), "labels": torch.tensor(yte)}
    return train, test


def conv_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(16 * 64, 10),
    )


def lava_model(dropout: float = 0.0, orth_lambda: float = 0.1) -> lp.AdaptedModel:
    net = conv_net(dropout)
    torch.manual_seed(1)
    return lp.adapt(net, lp.LavaConfig(r=4, target_modules=["0", "2"], modules_to_save=["6"], orth_lambda=orth_lambda))


def quiet(**kw) -> dict:
    return dict(progress=False, summary=False, **kw)


def test_loss_decreases_and_accuracy_rises(tmp_path, digits):
    train, test = digits
    model = lava_model()
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, batch_size=32, lr=1e-2,
                                               log_every=5, eval_at_start=True, **quiet()), train, test)
    summary = trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["baseline_eval"]["accuracy"] < 0.3
    assert summary["final_eval"]["accuracy"] > 0.8
    # the files a run promises
    for name in ("run.json", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "best/adapter_config.json", "checkpoints/step-000030/trainer_state.json"):
        assert (tmp_path / "run" / name).exists(), name
    # the saved adapter reproduces the trained model
    base = conv_net()
    reloaded = lp.AdaptedModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    model.eval()
    x = test["x"][:16]
    torch.testing.assert_close(reloaded(x), model(x))


def test_optimizer_groups_have_their_own_lr_and_decay(tmp_path, digits):
    trainer = Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path), lr=1e-3, head_lr=5e-2, weight_decay=0.01,
                                                      head_weight_decay=0.0, **quiet()), digits[0])
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"adapter", "head"}
    assert (groups["adapter"]["lr"], groups["adapter"]["weight_decay"]) == (pytest.approx(1e-3 * lr_lambda("linear", 0, 1)(0)), 0.01)
    assert groups["head"]["lr"] == pytest.approx(5e-2) and groups["head"]["weight_decay"] == 0.0
    assert trainer.group_sizes == {"adapter": 4 * (16 + 1 + 3 + 3) + 4 * (16 + 16 + 3 + 3), "head": 16 * 64 * 10 + 10}


def test_schedules_pinned():
    lin = lr_lambda("linear", warmup=2, total=10)
    assert [round(lin(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cos = lr_lambda("cosine", warmup=0, total=4)
    assert [round(cos(s), 4) for s in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert lr_lambda("constant", warmup=0, total=3)(2) == 1.0


def _final_state(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.unwrapped.adapter_state_dict().items()}


class Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted_run(tmp_path, digits):
    """Dropout in the model: the RNG state must be restored too, not only weights and AdamW."""
    train, test = digits
    args = dict(max_steps=8, batch_size=16, lr=5e-3, save_every=4, eval_every=4, warmup_steps=2, **quiet())
    full = Trainer(lava_model(dropout=0.3), TrainingArguments(output_dir=str(tmp_path / "a"), **args), train, test)
    full.train()

    def crash_after_5(trainer, event):
        if event == "step_end" and trainer.step == 5:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        Trainer(lava_model(dropout=0.3), TrainingArguments(output_dir=str(tmp_path / "b"), **args), train, test,
                callbacks=[crash_after_5]).train()
    resumed = Trainer(lava_model(dropout=0.3), TrainingArguments(output_dir=str(tmp_path / "b"), resume_from="auto", **args),
                      train, test)
    summary = resumed.train()
    assert summary["resumed_from_step"] == 4
    a, b = _final_state(full), _final_state(resumed)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics file of the resumed run has each step once, as the uninterrupted one
    steps = lambda d: [(r["split"], r["step"]) for r in read_metrics(tmp_path / d)]  # noqa: E731
    assert steps("a") == steps("b")
    # ... and a fresh start does NOT equal it (the test can fail)
    other = Trainer(lava_model(dropout=0.3), TrainingArguments(output_dir=str(tmp_path / "d"), **{**args, "seed": 5}), train, test)
    other.train()
    assert any(not torch.equal(a[k], v) for k, v in _final_state(other).items())


def test_resume_refuses_other_global_batch(tmp_path, digits):
    train, _ = digits
    Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=2, batch_size=8, save_every=2, **quiet()),
            train).train()
    with pytest.raises(lp.LavaError, match="global batch"):
        Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=4, batch_size=16, resume_from="auto",
                                                **quiet()), train).train()


def test_accumulation_equals_large_batch(tmp_path, digits):
    """4 micro-batches of 4 == one batch of 16, including the partial last batch of an epoch."""
    x, y = digits[0]["x"][:40], digits[0]["labels"][:40]
    data = {"x": x, "labels": y}
    common = dict(max_steps=6, lr=1e-2, max_grad_norm=1.0, **quiet())  # 40 samples: steps of 16, 16, 8 per epoch
    big = Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path / "big"), batch_size=16, **common), data)
    big.train()
    acc = Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path / "acc"), batch_size=4, grad_accum_steps=4,
                                                  **common), data)
    acc.train()
    assert big.steps_per_epoch == acc.steps_per_epoch == 3
    a, b = _final_state(big), _final_state(acc)
    init = lava_model().adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-2


def test_regularizer_reaches_the_loss(tmp_path, digits):
    """With a zero task loss only the orthogonality term moves U: towards orthonormal columns."""
    train, _ = digits

    def zero_task(model, batch):
        return 0.0 * model(batch["x"]).sum()

    def run(lam):
        model = lava_model(orth_lambda=lam)
        with torch.no_grad():
            for _, adapter in model.adapter_layers():
                adapter.lava_U.mul_(1.5)  # ||UᵀU − I||² > 0
        before = float(model.regularization_loss().detach()) / max(lam, 1e-12)
        Trainer(model, TrainingArguments(output_dir=str(tmp_path / f"l{lam}"), max_steps=20, batch_size=8, lr=2e-2,
                                         schedule="constant", log_every=20, **quiet()), train, loss_fn=zero_task).train()
        after = sum(float(a.regularization().detach()) for _, a in model.adapter_layers()) / 2
        return before, after, read_metrics(tmp_path / f"l{lam}")

    before, after, records = run(1.0)
    assert before == pytest.approx(2 * (1.5**2 - 1) ** 2 * 4 / 2, rel=1e-4)  # per layer r·(1.5²−1)², mean over layers
    assert after < 0.05 * before
    assert records[0]["reg_loss"] > 0
    before0, after0, _ = run(0.0)
    assert after0 == pytest.approx(2 * (1.5**2 - 1) ** 2 * 4 / 2, rel=1e-5)  # λ = 0: U untouched


def test_full_finetuning_of_a_plain_module(tmp_path, digits):
    train, test = digits
    net = conv_net()
    summary = Trainer(net, TrainingArguments(output_dir=str(tmp_path), max_steps=15, batch_size=32, lr=3e-3, **quiet()),
                      train, test).train()
    assert summary["param_groups"] == {"other": sum(p.numel() for p in net.parameters())}
    assert (tmp_path / "adapter" / "model.safetensors").is_file()
    assert summary["final_eval"]["accuracy"] > 0.5


def test_bf16_autocast_on_cpu(tmp_path, digits):
    train, _ = digits
    trainer = Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=3, batch_size=16,
                                                      mixed_precision="bf16", **quiet()), train)
    summary = trainer.train()
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_train_loss"])
    with pytest.raises(lp.LavaError, match="fp16"):
        Trainer(lava_model(), TrainingArguments(output_dir=str(tmp_path / "x"), mixed_precision="fp16", **quiet()), train)


def test_out_dir_with_another_run_is_refused_and_untouched(tmp_path, digits):
    train, _ = digits
    out = tmp_path / "run"
    Trainer(lava_model(), TrainingArguments(output_dir=str(out), max_steps=2, batch_size=8, **quiet()), train).train()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(lava_model(), TrainingArguments(output_dir=str(out), max_steps=2, **quiet()), train)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # with overwrite the old run's files go, anything else the user keeps there stays
    (out / "notes.txt").write_text("mine")
    Trainer(lava_model(), TrainingArguments(output_dir=str(out), max_steps=1, batch_size=8, overwrite=True, **quiet()),
            train).train()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_bad_arguments_are_clear():
    with pytest.raises(lp.LavaConfigError, match="schedule must be one of"):
        TrainingArguments(schedule="exp")
    with pytest.raises(lp.LavaConfigError, match="did you mean 'batch_size'"):
        TrainingArguments.from_dict({"batchsize": 3})
    with pytest.raises(lp.LavaError, match="no trainable parameters"):
        net = conv_net()
        for p in net.parameters():
            p.requires_grad_(False)
        Trainer(net, output_dir="unused", train_data={"x": torch.zeros(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long)})


@pytest.mark.parametrize("config", [
    lambda: lp.DyLoraConfig(r=4, target_modules=["0", "2"], modules_to_save=["6"], factorization="lava"),
    lambda: lp.MosaConfig(adapter="factors", r=4, n_modules=2, target_modules=["0", "2"], modules_to_save=["6"], factorization="lava"),
], ids=["dylora", "mosa"])
def test_resume_continues_the_rank_and_module_draws(tmp_path, digits, config):
    """DyLoRA/MoSA draw a rank/module per training forward: the checkpoint keeps the samplers' clock."""
    train, test = digits
    args = dict(max_steps=8, batch_size=16, lr=5e-3, save_every=4, eval_every=4, warmup_steps=2, **quiet())

    def model():
        net = conv_net()
        torch.manual_seed(1)
        return lp.adapt(net, config())

    full = Trainer(model(), TrainingArguments(output_dir=str(tmp_path / "a"), **args), train, test)
    full.train()

    def crash_after_5(trainer, event):
        if event == "step_end" and trainer.step == 5:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        Trainer(model(), TrainingArguments(output_dir=str(tmp_path / "b"), **args), train, test,
                callbacks=[crash_after_5]).train()
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["sampler_clocks"] == {"default": 4}  # 4 training forwards drawn before the checkpoint
    resumed = Trainer(model(), TrainingArguments(output_dir=str(tmp_path / "b"), resume_from="auto", **args), train, test)
    resumed.train()
    a, b = _final_state(full), _final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
