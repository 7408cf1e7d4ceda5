"""SHiRA folders written natively by ``save_pretrained`` in HF PEFT's SHiRA layout (format 3), against the real
``peft`` 0.21.2:

* a SHiRA adapter PEFT computes identically (``nn.Linear`` layers, budget ``r·(O + I)`` for one ``r``, ``α = 1``,
  no ``modules_to_save``) is written with PEFT's keys (``shira_weight``, ``shira_indices``) and config fields plus
  ours; ``peft.PeftModel.from_pretrained`` loads it with our outputs, and our loader reads it back bit for bit
  (indices, values, outputs; a re-save gives the same tensors);
* other SHiRA adapters (``α ≠ 1``, conv layers) keep our key layout and still load exactly;
* the state-dict helpers speak the same keys; a corrupt PEFT-layout file is refused;
* today's reader loads the format-2 SHiRA fixture (our old key layout) with the outputs it gave then.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import lava_peft as lp
from _files import drop_manifest
from _tiny_models import randomize_adapters, tiny_bert

IDS = torch.tensor([[2, 5, 7, 9, 11, 3], [4, 8, 15, 16, 23, 42]])
FIXTURE = Path(__file__).parent / "fixtures" / "format_v2_shira"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")  # PEFT meeting our extra fields
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def shira_model(**cfg):
    base = tiny_bert()
    model = lp.adapt(copy.deepcopy(base), lp.ShiraConfig(target_modules=["query", "value"], r=2, seed=5, **cfg))
    randomize_adapters(model, seed=2, std=1.0)
    return base, model.eval()


def test_save_pretrained_writes_peft_s_shira_layout_that_peft_loads(tmp_path):
    base, model = shira_model()
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 1e-4  # tiny BERT: small logits
    model.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (payload["peft_type"], payload["r"], payload["mask_type"], payload["random_seed"]) == ("SHIRA", 2, "random", 5)
    assert (payload["format_version"], payload["layout"], payload["method"]) == (3, "peft-shira", "shira")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    query = "bert.encoder.layer.0.attention.self.query"
    assert sorted(tensors) == sorted(f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.{t}"
                                     for i in (0, 1) for m in ("query", "value") for t in ("shira_indices", "shira_weight"))
    adapter = dict(model.adapter_layers("default"))[query]
    pairs = tensors[f"base_model.model.{query}.shira_indices"]
    assert pairs.dtype == torch.int32 and pairs.shape == (2, 2 * (16 + 16))
    assert torch.equal(pairs[0].long() * 16 + pairs[1].long(), adapter.sparse_indices.long())  # row-major (row, col)
    assert torch.equal(tensors[f"base_model.model.{query}.shira_weight"], adapter.sparse_values.detach())

    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(in_peft), expected, atol=1e-6, rtol=0)
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(ours), expected)
    loaded = dict(ours.adapter_layers("default"))[query]
    assert loaded.sparse_indices.dtype == adapter.sparse_indices.dtype
    assert torch.equal(loaded.sparse_indices, adapter.sparse_indices)
    assert torch.equal(loaded.sparse_values, adapter.sparse_values)
    ours.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_peft_trained_shira_saved_by_peft_and_by_us_agree(tmp_path):
    """PEFT's own SHiRA folder, imported, then saved by us natively: PEFT reads our folder with its own outputs."""
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "shira_weight" in name:
                p.add_(0.3 * torch.randn_like(p))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(imported), expected, atol=1e-6, rtol=0)
    imported.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["layout"] == "peft-shira"
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(again), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("why", ["alpha", "budget", "saved_module"])
def test_shira_that_peft_computes_differently_keeps_our_layout(tmp_path, why):
    cfg = {"alpha": dict(alpha=0.5), "budget": dict(budget_pattern={"value": 10}),
           "saved_module": dict(modules_to_save=["classifier"])}[why]
    base, model = shira_model(**cfg)
    model.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    assert payload["layout"] == "lava-peft" and "peft_type" not in payload
    loaded = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_state_dict_helpers_use_the_file_keys():
    base, model = shira_model()
    state = lp.get_peft_model_state_dict(model)
    assert all(k.startswith("base_model.model.") and k.endswith(("shira_weight", "shira_indices")) for k in state)
    other = lp.adapt(copy.deepcopy(base), lp.ShiraConfig(target_modules=["query", "value"], r=2, seed=5))
    lp.set_peft_model_state_dict(other, state)
    assert torch.equal(logits(other.eval()), logits(model))


@pytest.mark.parametrize("corrupt, match", [
    (lambda t: t.float(), "integer"),
    (lambda t: t[:1], r"\(2, nnz\)"),
    (lambda t: torch.flip(t, dims=[1]), "not strictly increasing"),
])
def test_corrupt_peft_shira_file_is_refused(tmp_path, corrupt, match):
    base, model = shira_model()
    model.save_pretrained(tmp_path)
    drop_manifest(tmp_path)  # a hand-edited folder: the reader's own checks must refuse it
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.bert.encoder.layer.0.attention.self.value.shira_indices"
    tensors[key] = corrupt(tensors[key])
    save_file(tensors, str(path))
    fresh = lp.AdaptedModel(copy.deepcopy(base))
    with pytest.raises(lp.AdapterFileError, match=match):
        fresh.load_adapter(str(tmp_path), "x")
    assert fresh.peft_config == {} and isinstance(fresh.model.bert.encoder.layer[0].attention.self.value, nn.Linear)


def test_format_v2_shira_fixture_loads():
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    payload = json.loads((FIXTURE / "shira_bert" / "adapter_config.json").read_text())
    assert (payload["format_version"], payload["layout"]) == (2, "lava-peft")
    base = tiny_bert()
    assert torch.equal(logits(base, expected["ids"]), expected["base"])
    model = lp.AdaptedModel.from_pretrained(base, FIXTURE / "shira_bert")
    torch.testing.assert_close(logits(model, expected["ids"]), expected["adapted"], atol=1e-6, rtol=0)


def test_training_checkpoint_in_peft_shira_layout_resumes(tmp_path):
    from lava_peft.train.checkpoint import load_trainable, save_trainable

    base, model = shira_model()
    save_trainable(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layout"] == "peft-shira"
    fresh = lp.adapt(copy.deepcopy(base), lp.ShiraConfig(target_modules=["query", "value"], r=2, seed=5))
    load_trainable(fresh, tmp_path)
    assert torch.equal(logits(fresh.eval()), logits(model))
