"""``strict_base=True``: an adapter is applied only to the exact base weights it was saved from.

The fingerprint carries the sha256 of each targeted base weight's bytes (checked against an
independent ``hashlib`` of ``numpy().tobytes()``); loading with ``strict_base`` refuses a base
whose weights differ by one ulp or in dtype, and a file without hashes, before the model changes.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.adapter_files import write_adapter_dir
from lava_peft.errors import IncompatibleBaseModelError


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _saved(tmp_path, base):
    model = lp.adapt(copy.deepcopy(base), lp.LoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, a in model.adapter_layers():
            a.lora_B.normal_()
    model.save_pretrained(tmp_path)
    return model


def test_fingerprint_holds_the_sha256_of_each_base_weight(tmp_path):
    base = _base()
    _saved(tmp_path, base)
    fp = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_fingerprint"]
    for path in ("0", "2"):
        expected = hashlib.sha256(base.get_submodule(path).weight.detach().numpy().tobytes()).hexdigest()
        assert fp["weights"][path] == {"sha256": expected, "dtype": "float32"}


def test_strict_base_accepts_the_same_weights_and_refuses_one_ulp_of_difference(tmp_path):
    base = _base()
    model = _saved(tmp_path, base)
    x = torch.randn(4, 8)
    loaded = lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path, strict_base=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    other = copy.deepcopy(base)
    with torch.no_grad():
        w = other[2].weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    target = lp.AdaptedModel(other)
    with pytest.raises(IncompatibleBaseModelError, match=r"2: the weight's bytes differ .*other values"):
        target.load_adapter(str(tmp_path), strict_base=True)
    assert target.peft_config == {} and not target.adapter_layers("default")
    target.load_adapter(str(tmp_path))  # without strict_base: names and shapes only, as before

    half = lp.AdaptedModel(copy.deepcopy(base).to(torch.bfloat16))
    with pytest.raises(IncompatibleBaseModelError, match="dtype bfloat16 here, float32 when saved"):
        half.load_adapter(str(tmp_path), strict_base=True)


def test_files_without_hashes_get_a_clear_message(tmp_path):
    base = _base()
    _saved(tmp_path, base)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    del payload["base_model_fingerprint"]["weights"]  # as an older lava-peft wrote it
    tensors = lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).adapter_file_tensors()  # keyed as in the file
    write_adapter_dir(tmp_path, payload, tensors)
    with pytest.raises(IncompatibleBaseModelError, match="records no hashes of the base weights.*older"):
        lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path, strict_base=True)
    lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)  # still loads without strict_base


def test_merged_adapters_hash_the_unmerged_weight_or_say_why_not(tmp_path):
    base = _base()
    model = _saved(tmp_path / "plain", base)
    model.exact_unmerge = True  # merge keeps a backup of the unmerged weight: its hash is the base's
    model.merge_adapter()
    model.save_pretrained(tmp_path / "backup")
    lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "backup", strict_base=True)

    bare = _saved(tmp_path / "plain2", base)
    bare.merge_adapter()  # no backup: the original bytes are gone
    bare.save_pretrained(tmp_path / "merged")
    fp = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert fp["weights"] == {"0": None, "2": None}
    with pytest.raises(IncompatibleBaseModelError, match="merged without a backup"):
        lp.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged", strict_base=True)


def test_module_adapter_targets_are_hashed_and_checked(tmp_path):
    """A module adapter (AdaptFormer on each ``mlp``-placed block) records ``[type, in, out]`` per target and a
    digest of every base weight inside it; ``strict_base`` loads onto the same base and refuses one changed ulp."""
    from tests._tiny_models import randomize_adapters, tiny_bert

    base = tiny_bert()
    model = lp.adapt(copy.deepcopy(base), lp.AdaptFormerConfig(r=2))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    fp = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert set(fp["weights"]) == set(fp["modules"]) and all(isinstance(v[0], str) for v in fp["modules"].values())
    path = next(iter(fp["modules"]))
    inner = [(n, p) for n, p in base.get_submodule(path).named_parameters()]
    parts = [f"{n.rsplit('.', 1)[0] if '.' in n else ''}.{n.rsplit('.', 1)[-1]}:"
             f"{hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()}" for n, p in inner]
    assert fp["weights"][path]["sha256"] == hashlib.sha256("\n".join(parts).encode()).hexdigest()
    same = lp.AdaptedModel(copy.deepcopy(base))
    same.load_adapter(str(tmp_path), "a", strict_base=True)
    x = torch.randint(0, 64, (2, 5))
    model.eval(), same.eval()
    same.set_adapter("a")
    torch.testing.assert_close(same(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        weight = next(changed.get_submodule(path).parameters())
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    other = lp.AdaptedModel(changed)
    with pytest.raises(IncompatibleBaseModelError, match="differ"):
        other.load_adapter(str(tmp_path), "a", strict_base=True)
    assert not other.peft_config
    other.load_adapter(str(tmp_path), "a")  # names and shapes still fit
