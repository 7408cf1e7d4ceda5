"""The grouped low-rank product of mixed-adapter batches (lava_peft/mixed_batch.py) equals the
per-adapter loop and per-sample single-adapter runs; its factor cache follows every change."""

from __future__ import annotations

import pytest
import torch

import lava_peft as lp
from lava_peft.inject import adapted_layers
from lava_peft.mixed_batch import use_grouped_products
from _tiny_models import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama


def _cached_layers(model) -> int:
    """How many adapted layers hold grouped-product stacks (proves the grouped path ran)."""
    return sum(bool(layer.__dict__.get("_mixed_stacks")) for _, layer in adapted_layers(model.model))


def _clear_caches(model) -> None:
    for _, layer in adapted_layers(model.model):
        layer.__dict__.pop("_mixed_stacks", None)


def _single(model, ids, names, **kw):
    """Per-sample runs with the sample's adapter active (or the adapters disabled)."""
    outs = []
    for i, name in enumerate(names):
        if name == lp.BASE_NAME:
            with model.disable_adapter():
                outs.append(model(input_ids=ids[i:i + 1], **kw).logits)
        else:
            model.set_adapter(name)
            outs.append(model(input_ids=ids[i:i + 1], **kw).logits)
    return torch.cat(outs)


def _llama_with_three_ranks():
    torch.manual_seed(0)
    model = lp.adapt(tiny_llama(), lp.LoraConfig(r=2, alpha=4, target_modules="all-linear"), "a")
    model.add_adapter("b", lp.LavaConfig(r=5, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("c", lp.LoraConfig(r=8, alpha=8, target_modules=["k_proj", "o_proj"], use_rslora=True))
    randomize_adapters(model, std=0.4)
    return model.eval()


@pytest.mark.parametrize("strategy", ["rows", "adapters"])
def test_grouped_equals_loop_and_single_runs_with_different_ranks_and_base_rows(strategy):
    model = _llama_with_three_ranks()
    ids = torch.randint(2, 64, (7, 6))
    names = ["b", "a", lp.BASE_NAME, "c", "a", "b", "a"]  # uneven blocks: "a" has 3 rows, "c" 1
    with torch.no_grad(), use_grouped_products(True, strategy):
        grouped = model(input_ids=ids, adapter_names=names).logits
        assert _cached_layers(model) == len(list(adapted_layers(model.model)))
        with use_grouped_products(False):
            loop = model(input_ids=ids, adapter_names=names).logits
        single = _single(model, ids, names)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)
    # every adapter changes its rows (a mix-up of slots would show)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    for i, name in enumerate(names):
        assert torch.equal(grouped[i], base[i]) == (name == lp.BASE_NAME)


def test_gpt2_conv1d_layers_take_the_grouped_path():
    torch.manual_seed(1)
    model = lp.adapt(tiny_gpt2(), lp.LoraConfig(r=3, alpha=6, target_modules=["c_attn", "c_fc", "c_proj"]), "a")
    model.add_adapter("b", lp.LavaConfig(r=2, alpha=4, target_modules=["c_attn", "c_proj"]))
    randomize_adapters(model, std=0.4)
    model.eval()
    ids = torch.randint(2, 64, (4, 5))
    names = ["a", "b", "b", lp.BASE_NAME]
    with torch.no_grad():
        grouped = model(input_ids=ids, adapter_names=names).logits
        assert _cached_layers(model) > 0
        single = _single(model, ids, names)
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)


def test_strategy_is_checked():
    with pytest.raises(lp.LavaError, match="strategy"):
        with use_grouped_products(True, "segments"):
            pass


def test_generate_with_expanded_rows_uses_the_grouped_path():
    model = _llama_with_three_ranks()
    ids = torch.randint(2, 64, (3, 4))
    names = ["c", lp.BASE_NAME, "a"]
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=2, num_return_sequences=2,
              max_new_tokens=4, pad_token_id=1)
    with torch.no_grad():
        grouped = model.generate(input_ids=ids, adapter_names=names, **kw)  # prefill per row, decoding per adapter
        assert _cached_layers(model) > 0
        with use_grouped_products(False):
            loop = model.generate(input_ids=ids, adapter_names=names, **kw)
        for strategy in ("rows", "adapters"):
            with use_grouped_products(True, strategy):
                assert torch.equal(model.generate(input_ids=ids, adapter_names=names, **kw), loop)
    assert torch.equal(grouped, loop)


def test_cache_follows_training_in_place_edits_and_replaced_adapters():
    model = _llama_with_three_ranks()
    ids = torch.randint(2, 64, (4, 5))
    names = ["a", "b", "a", "c"]

    def both():
        with torch.no_grad():
            grouped = model(input_ids=ids, adapter_names=names).logits
            with use_grouped_products(False):
                loop = model(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
        return grouped

    first = both()
    # one optimizer step on adapter "b" (in place: the cached stacks must be rebuilt)
    model.set_adapter("b")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids[:2], labels=ids[:2]).loss.backward()
    opt.step()
    model.eval()
    trained = both()
    assert torch.equal(trained[0], first[0]) and not torch.allclose(trained[1], first[1])
    # an in-place edit outside the optimizer
    with torch.no_grad():
        model.model.model.layers[0].self_attn.k_proj.adapters["c"].lora_B.mul_(3.0)
    edited = both()
    assert not torch.allclose(edited[3], trained[3])
    # delete "a" and add a different adapter under the same name
    model.delete_adapter("a")
    model.add_adapter("a", lp.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(model, seed=7, std=0.4)
    model.eval()
    replaced = both()
    assert not torch.allclose(replaced[0], edited[0])


def test_gradients_through_the_grouped_path_equal_the_loop():
    model = _llama_with_three_ranks()
    ids = torch.randint(2, 64, (4, 5))
    names = ["a", "c", lp.BASE_NAME, "b"]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in (model.model.model.layers[0].self_attn.q_proj.adapters["a"].lora_A,
              model.model.model.layers[1].self_attn.q_proj.adapters["b"].lava_U):
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for grouped in (True, False):
        model.zero_grad(set_to_none=True)
        _clear_caches(model)
        with use_grouped_products(grouped):
            model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
        assert _cached_layers(model) == 0  # with gradients the stacks are built per call, never cached
        grads.append([p.grad.clone() for p in params])
    for g, ref in zip(*grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_other_adapters_and_training_mode_keep_the_loop():
    torch.manual_seed(2)
    model = lp.adapt(tiny_bert(), lp.LoraConfig(r=2, target_modules=["query", "value"], dropout=0.5), "a")
    model.add_adapter("d", lp.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    model.add_adapter("l", lp.LavaConfig(r=3, target_modules=["query", "key"]))
    randomize_adapters(model, std=0.4)
    model.eval()
    ids = torch.randint(0, 64, (4, 6))
    names = ["a", "d", "l", lp.BASE_NAME]
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=names).logits
        ref = _single(model, ids, names)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    query = model.model.bert.encoder.layer[0].attention.self.query
    assert not query.__dict__.get("_mixed_stacks")  # DoRA on this layer: the loop ran
    assert model.model.bert.encoder.layer[0].attention.self.value.__dict__.get("_mixed_stacks")  # LoRA + base only
    # training mode (dropout active): the loop, so dropout is applied per adapter as in a single run
    model.train()
    _clear_caches(model)
    torch.manual_seed(3)
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "l", "a", "l"])
    assert _cached_layers(model) == 0
