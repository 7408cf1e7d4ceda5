"""MoSA on a bottleneck adapter against an independent re-implementation of the reference scheme
(Theia-4869/MoSA): N copies of each split tensor, the drawn copy's gradient multiplied by its mask
after backward, AdamW (written out below) that skips tensors without a gradient, merge = mean of
the copies.  Only the partition and the draws are taken from the library (they are random in the
reference too); everything else is recomputed here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp
from lava_peft.tools import mosa as mosa_tools

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.01
N, R, STEPS = 3, 4, 6


class ManualAdamW:
    """AdamW as in Loshchilov & Hutter / torch.optim.AdamW, per tensor; a tensor whose grad is None is
    skipped entirely (no decay, no moment update, its step count stays)."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.state = {id(t): {"step": 0, "m": torch.zeros_like(t), "v": torch.zeros_like(t)} for t in tensors}

    @torch.no_grad()
    def step(self):
        for t in self.tensors:
            if t.grad is None:
                continue
            s = self.state[id(t)]
            s["step"] += 1
            t.mul_(1 - LR * WD)
            s["m"].mul_(BETAS[0]).add_(t.grad, alpha=1 - BETAS[0])
            s["v"].mul_(BETAS[1]).addcmul_(t.grad, t.grad, value=1 - BETAS[1])
            m_hat = s["m"] / (1 - BETAS[0] ** s["step"])
            v_hat = s["v"] / (1 - BETAS[1] ** s["step"])
            t.sub_(LR * m_hat / (v_hat.sqrt() + EPS))

    def zero_grad(self):
        for t in self.tensors:
            t.grad = None


def _train_library(split: str):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6))
    pristine = copy.deepcopy(base)
    config = lp.MosaConfig(r=R, n_modules=N, split=split, target_modules=["0"], activation="gelu", layer_norm=False,
                           scale=0.5, seed=3)
    model = lp.adapt(base, config)
    adapter = model.model[0].lava_module_adapters.adapters["default"]
    init = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WD)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(STEPS, 5, 6, generator=gen), torch.randn(STEPS, 5, 6, generator=gen)
    draws = []
    model.train()
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
        draws.append(dict(adapter.last_draws))
    return model, adapter, pristine, init, draws, xs, ys


def _train_reference(adapter, pristine, init, draws, xs, ys):
    """The reference scheme from the initial tensors, the masks and the draws of the library run."""
    split = adapter.split_keys
    tensors = {}
    for key in ("down_weight", "down_bias", "up_weight", "up_bias"):
        if key in split:
            tensors[key] = [init[f"{key}_copies.{i}"].clone().requires_grad_(True) for i in range(N)]
        else:
            tensors[key] = [init[key].clone().requires_grad_(True)]
    masks = {key: [(adapter._buffers[f"{key}_owner"] == i).float() for i in range(N)] for key in split}
    opt = ManualAdamW([t for ts in tensors.values() for t in ts])
    for x, y, drawn in zip(xs, ys, draws):
        opt.zero_grad()
        pick = {key: (drawn[key.split("_")[0]] if key in split else 0) for key in tensors}
        t = {key: tensors[key][pick[key]] for key in tensors}
        hidden = F.gelu(F.linear(x, t["down_weight"], t["down_bias"]))
        out = pristine(x) + 0.5 * F.linear(hidden, t["up_weight"], t["up_bias"])
        F.mse_loss(out, y).backward()
        for key in split:  # the reference: p.grad *= p.mask after backward
            t[key].grad.mul_(masks[key][pick[key]])
        opt.step()
    return {key: torch.stack([c.detach() for c in ts]).mean(0) for key, ts in tensors.items()}, tensors


@pytest.mark.parametrize("split", ["zero", "all"])
def test_mosa_bottleneck_training_equals_the_reference_scheme(split):
    model, adapter, pristine, init, draws, xs, ys = _train_library(split)
    assert len({d.get("up") for d in draws}) > 1  # several modules were drawn
    merged_ref, copies_ref = _train_reference(adapter, pristine, init, draws, xs, ys)
    for key in adapter.split_keys:
        for i in range(N):
            torch.testing.assert_close(adapter.copies(key)[i].detach(), copies_ref[key][i].detach(),
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.merged(key).detach(), merged_ref[key], rtol=1e-5, atol=1e-6)
    for key in ("down_weight", "down_bias"):
        if key not in adapter.split_keys:
            torch.testing.assert_close(adapter._parameters[key].detach(), merged_ref[key], rtol=1e-5, atol=1e-6)
    # an undrawn copy is never touched: neither by the step nor by weight decay
    drawn_up = {d["up"] for d in draws}
    for i in set(range(N)) - drawn_up:
        assert torch.equal(adapter.copies("up_weight")[i].detach(), init[f"up_weight_copies.{i}"])
    # a copy only moves on its own mask (Up starts at 0: outside M_i it stays exactly 0)
    for i in range(N):
        outside = adapter._buffers["up_weight_owner"] != i
        assert torch.count_nonzero(adapter.copies("up_weight")[i].detach()[outside]) == 0
    # evaluation and merge_modules use the mean of the copies
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        t = {k: merged_ref[k] for k in merged_ref}
        expected = pristine(x) + 0.5 * F.linear(F.gelu(F.linear(x, t["down_weight"], t["down_bias"])),
                                                t["up_weight"], t["up_bias"])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        plain = mosa_tools.merge_modules(model)
        assert isinstance(plain, lp.AdaptFormerConfig)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for _, a in model.adapter_layers() for p in a.parameters()) == R * 6 + R + 6 * R + 6


def test_mosa_default_is_the_reference_adaptformer_and_the_factor_variant_splits_the_zero_factor():
    config = lp.MosaConfig()
    assert (config.adapter, config.target_modules, config.n_modules, config.split) == ("adaptformer", "mlp", 4, "zero")
    plain = config.bottleneck_config()
    assert (plain.mode, plain.activation, plain.layer_norm, plain.scale) == ("parallel", "gelu", True, 0.1)
    torch.manual_seed(0)
    lava = lp.adapt(nn.Sequential(nn.Linear(6, 5)), lp.MosaConfig(adapter="factors", factorization="lava", r=2,
                                                                   target_modules=["0"]))
    adapter = lava.model[0].adapters["default"]
    assert adapter.split_keys == ("lava_V",) and torch.count_nonzero(adapter.lava_V) == 0
    lora = lp.adapt(nn.Sequential(nn.Linear(6, 5)), lp.MosaConfig(adapter="factors", r=2, target_modules=["0"]))
    assert lora.model[0].adapters["default"].split_keys == ("lora_B",)


def test_mosa_consistency_objective_on_the_bottleneck_variant():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)),
                     lp.MosaConfig(r=4, n_modules=2, target_modules=["0"]))
    with torch.no_grad():
        for _, a in model.adapter_layers():
            for c in a.copies("up_weight"):
                c.normal_()
    model.train()
    batch = {"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))}
    fwd = lambda m, b: m(b["x"])  # noqa: E731
    loss_fn = mosa_tools.mosa_loss_fn(forward_fn=fwd)
    mosa_tools.set_module(model, 0)  # both passes use copy 0 (independent draws are fixed here): KL = 0
    loss, logits = loss_fn(model, batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]))
    out = mosa_tools.mosa_consistency_loss(model, batch, fwd, modules=(0, 1))
    p, q = out.logits_a.softmax(-1), out.logits_b.softmax(-1)
    kl = 0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    torch.testing.assert_close(out.loss, kl, rtol=1e-5, atol=1e-7)
    assert out.loss > 0
