"""Hot-swap: in-place weight replacement equals a fresh load and does not recompile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lava_peft as lp
from _tiny_models import randomize_adapters, tiny_gpt2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.emb = nn.Embedding(10, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.fc(h)
        return self.head(h + self.emb.weight.sum(0))


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _save(tmp_path, name, config, seed):
    model = lp.adapt(_net(), config)
    randomize_adapters(model, seed)
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def _fresh(directory):
    return lp.AdaptedModel.from_pretrained(_net(), directory).eval()


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize("method", [lp.LavaConfig, lp.LoraConfig])
def test_hotswap_under_torch_compile_equals_fresh_load_without_recompiling(tmp_path, method):
    targets = ["conv", "fc", "head"]
    first = _save(tmp_path, "a", method(r=2, alpha=4, target_modules=targets, modules_to_save=["emb"]), 1)
    bigger = _save(tmp_path, "b", method(r=5, alpha=3, target_modules=targets, use_rslora=True,
                                         rank_pattern={"fc": 3, "head": 4}, modules_to_save=["emb"]), 2)
    subset = _save(tmp_path, "c", method(r=1, alpha=7, target_modules=["fc"]), 3)

    model = _fresh(first)
    lp.prepare_model_for_compiled_hotswap(model, target_rank=5)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _fresh(first)(X), rtol=1e-5, atol=1e-5)  # padding keeps ΔW
    params_before = {n: (id(p), p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()}
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(X)
        assert backend.compiles == 1
        for directory in (bigger, subset, first):
            lp.hotswap_adapter(model, directory, "default")
            out = compiled(X)
            torch.testing.assert_close(out, _fresh(directory)(X), rtol=1e-5, atol=1e-5)
    assert backend.compiles == 1, "hot-swapping must not trigger a recompilation"
    assert {n: (id(p), p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()} == params_before


def test_hotswapped_model_saves_and_reloads_identically(tmp_path):
    first = _save(tmp_path, "a", lp.LavaConfig(r=3, target_modules=["conv", "fc"]), 1)
    second = _save(tmp_path, "b", lp.LavaConfig(r=2, alpha=5, target_modules=["conv", "fc"], orth_lambda=0.3), 2)
    model = _fresh(first)
    lp.prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert model.model.conv.adapters["default"].lava_U.shape == (6, 4)
    lp.hotswap_adapter(model, second, "default")
    assert model.peft_config["default"].orth_lambda == 0.3  # non-shape fields come from the new file
    model.save_pretrained(str(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(_fresh(str(tmp_path / "again"))(X), model(X), rtol=0, atol=0)
        torch.testing.assert_close(model(X), _fresh(second)(X), rtol=1e-5, atol=1e-5)


def test_hotswap_on_gpt2_lora_keeps_modules(tmp_path):
    cfg = lp.LoraConfig(r=2, target_modules=["c_attn", "wte"])
    a = lp.adapt(tiny_gpt2(), cfg)
    randomize_adapters(a, 1)
    a.save_pretrained(str(tmp_path / "a"))
    b = lp.adapt(tiny_gpt2(), lp.LoraConfig(r=2, alpha=1, target_modules=["c_attn", "wte"]))
    randomize_adapters(b, 2)
    b.save_pretrained(str(tmp_path / "b"))
    model = lp.AdaptedModel.from_pretrained(tiny_gpt2(), str(tmp_path / "a"))
    modules = {n: id(m) for n, m in model.named_modules()}
    lp.hotswap_adapter(model, str(tmp_path / "b"))
    assert {n: id(m) for n, m in model.named_modules()} == modules
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, b.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["rank_too_big", "extra_layer", "merged", "cross_method_conv", "missing_dir"])
def test_hotswap_errors_leave_the_model_untouched(tmp_path, case):
    first = _save(tmp_path, "a", lp.LavaConfig(r=2, target_modules=["conv", "fc"]), 1)
    model = _fresh(first)
    other = {
        "rank_too_big": lambda: _save(tmp_path, "b", lp.LavaConfig(r=4, target_modules=["conv", "fc"]), 2),
        "extra_layer": lambda: _save(tmp_path, "b", lp.LavaConfig(r=2, target_modules=["conv", "fc", "head"]), 2),
        "merged": lambda: _save(tmp_path, "b", lp.LavaConfig(r=2, target_modules=["conv", "fc"]), 2),
        "cross_method_conv": lambda: _save(tmp_path, "b", lp.LoraConfig(r=2, target_modules=["conv", "fc"]), 2),
        "missing_dir": lambda: str(tmp_path / "nope"),
    }[case]()
    errors = {
        "rank_too_big": (lp.LavaConfigError, "prepare_model_for_compiled_hotswap"),
        "extra_layer": (lp.IncompatibleBaseModelError, "head"),
        "merged": (lp.LavaError, "unmerge"),
        "cross_method_conv": (lp.LavaConfigError, "same method"),
        "missing_dir": (lp.AdapterFileError, "does not exist"),
    }[case]
    if case == "merged":
        model.merge_adapter()
    before = _state(model)
    with pytest.raises(errors[0], match=errors[1]):
        lp.hotswap_adapter(model, other, "default")
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_file_can_be_hotswapped_into_a_linear_lava_adapter(tmp_path):
    first = _save(tmp_path, "a", lp.LavaConfig(r=3, target_modules=["fc", "head"]), 1)
    lora = _save(tmp_path, "b", lp.LoraConfig(r=2, alpha=3, target_modules=["fc"]), 2)
    model = _fresh(first)
    lp.hotswap_adapter(model, lora)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _fresh(lora)(X), rtol=1e-5, atol=1e-5)


def test_dense_delta_adapters_hotswap_by_plain_copy(tmp_path):
    def ties_dir(seed):
        model = lp.adapt(_net(), lp.LoraConfig(r=2, target_modules=["fc", "head"]), "a")
        model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["fc", "head"]))
        randomize_adapters(model, seed)
        model.add_weighted_adapter(["a", "b"], [1, 1], "t", "ties_svd", density=0.5, result_method="dense_delta")
        model.save_pretrained(str(tmp_path / f"t{seed}"), adapter_name="t")
        return str(tmp_path / f"t{seed}")

    first, second = ties_dir(1), ties_dir(2)
    model = _fresh(first)
    assert model.peft_config["default"].method == "dense_delta"
    lp.hotswap_adapter(model, second)
    with torch.no_grad():
        torch.testing.assert_close(model(X), _fresh(second)(X), rtol=0, atol=0)
