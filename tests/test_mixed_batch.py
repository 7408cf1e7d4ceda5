"""Mixed-adapter batches: one adapter per sample equals per-sample single-adapter runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lava_peft as lp
from test_contract import CONFIGS, LAYERS
from _tiny_models import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

# the second adapter of each mixed batch (default: LoRA)
OTHER = {"lora": "lava", "lava": "lora", "lava_loranit_all": "lora", "lava_rslora_uniform": "lava_loranit_all",
         "shira_struct_density": "shira_random"}


def _reference(model, x, names):
    """Per-sample runs with the named adapter active (or the adapters disabled)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            xi = x[i:i + 1]
            if name == lp.BASE_NAME:
                with model.disable_adapter():
                    outs.append(model(xi))
            else:
                model.set_adapter(name)
                outs.append(model(xi))
    return torch.cat(outs)


@pytest.mark.parametrize("method,layer", [(m, layer) for m in CONFIGS for layer in LAYERS])
def test_mixed_batch_equals_per_sample_runs(method, layer):
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[layer]
    model = lp.adapt(nn.Sequential(make_layer()), CONFIGS[method](), "a")
    model.add_adapter("b", CONFIGS[OTHER.get(method, "lora")]())
    randomize_adapters(model)
    model.eval()
    x = torch.cat([make_input(), make_input(), make_input()])[:5]
    names = ["b", "a", lp.BASE_NAME, "a", "b"][: x.shape[0]]
    with torch.no_grad():
        out = model(x, adapter_names=names)
    ref = _reference(model, x, names)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # samples really differ between adapters (the test would catch a mix-up)
    assert not torch.allclose(ref[0], ref[1] if names[1] != names[0] else ref[2])
    # a batch with a single adapter takes the plain path and gives the same numbers
    with torch.no_grad():
        model.set_adapter("a")
        torch.testing.assert_close(model(x, adapter_names=["a"] * x.shape[0]), model(x))


def test_gradients_flow_per_group_in_training_mode():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(4, 3), nn.Conv1d(3, 2, 1)), lp.LoraConfig(r=2, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["0"]))
    randomize_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model[0].adapters["a"].lora_A.requires_grad_(True)
    model.model[0].adapters["b"].lora_A.requires_grad_(True)
    x = torch.randn(3, 4)
    with model.mixed_batch(["a", lp.BASE_NAME, "a"]):
        loss = model.model[0](x).sum()
    loss.backward()
    assert model.model[0].adapters["a"].lora_A.grad.abs().sum() > 0
    assert model.model[0].adapters["b"].lora_A.grad is None


def test_modules_to_save_follow_the_per_sample_adapter():
    model = lp.adapt(tiny_bert(), lp.LavaConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["key"], modules_to_save=["classifier"]))
    model.add_adapter("c", lp.LoraConfig(r=2, target_modules=["query"]))  # no classifier copy: original head
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 64, (5, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    names = ["a", "b", lp.BASE_NAME, "c", "a"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        ref = []
        for i, n in enumerate(names):
            if n == lp.BASE_NAME:
                with model.disable_adapter():
                    ref.append(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
            else:
                model.set_adapter(n)
                ref.append(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-5, atol=1e-5)
    head = model.model.classifier
    assert not torch.allclose(head.copies["a"].weight, head.copies["b"].weight)


def _generate_reference(model, ids, names, **kw):
    outs = []
    for i, n in enumerate(names):
        if n == lp.BASE_NAME:
            with model.disable_adapter():
                outs.append(model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw))
        else:
            model.set_adapter(n)
            outs.append(model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_mixed_adapters_greedy_and_beam_search(arch):
    if arch == "gpt2":
        base = tiny_gpt2()
        cfg_a = lp.LoraConfig(r=2, alpha=8, target_modules=["c_attn", "c_fc", "wte"])
        cfg_b = lp.LavaConfig(r=3, alpha=8, target_modules=["c_attn", "c_proj"])
    else:
        base = tiny_llama()
        cfg_a = lp.LavaConfig(r=2, alpha=8, target_modules="all-linear")
        cfg_b = lp.LoraConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = lp.adapt(base, cfg_a, "a")
    model.add_adapter("b", cfg_b)
    randomize_adapters(model, std=0.5)
    model.eval()
    ids = torch.randint(2, 64, (3, 5))
    names = ["a", lp.BASE_NAME, "b"]
    with torch.no_grad():
        for kw in (dict(do_sample=False, max_new_tokens=5), dict(do_sample=False, num_beams=3, max_new_tokens=5),
                   dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=4)):
            got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                 pad_token_id=1, **kw)
            ref = _generate_reference(model, ids, names, pad_token_id=1, **kw)
            assert torch.equal(got, ref), kw
        # adapters actually change the generations
        outs = {tuple(_generate_reference(model, ids[:1], [n], do_sample=False, max_new_tokens=5, pad_token_id=1)[0].tolist())
                for n in ("a", "b", lp.BASE_NAME)}
        assert len(outs) > 1


def test_mixed_batch_errors_leave_no_state_behind():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(4, 3)), lp.LoraConfig(r=2, target_modules=["0"]), "a")
    x = torch.randn(3, 4)
    with pytest.raises(lp.AdapterNameError, match="unknown"):
        model(x, adapter_names=["a", "zz", "a"])
    with pytest.raises(lp.LavaError, match="3 samples"):
        model(x, adapter_names=["a", "a"])
    with pytest.raises(lp.AdapterNameError, match="list"):
        model(x, adapter_names="a")
    model.merge_adapter()
    with pytest.raises(lp.LavaError, match="unmerge"):
        model(x, adapter_names=["a"] * 3)
    model.unmerge_adapter()
    assert model.model[0].mixed_adapter_names is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, adapter_names=["a"] * 3))
