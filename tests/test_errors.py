"""Every error path: a clear message, the right type, and the model left exactly as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lava_peft as lp
from _files import drop_manifest



def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 1), nn.Linear(8, 3))


def _snapshot(model: nn.Module):
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snap):
    text, state, grads = snap
    assert repr(model) == text
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_no_module_matches_names_pattern_and_lists_modules():
    net = _net()
    snap = _snapshot(net)
    with pytest.raises(lp.TargetModulesError) as err:
        lp.adapt(net, lp.LavaConfig(target_modules=["q_proj", "v_proj"]))
    msg = str(err.value)
    assert "['q_proj', 'v_proj']" in msg and "'0'" in msg and "'3'" in msg
    assert isinstance(err.value, ValueError)
    _assert_unchanged(net, snap)
    pattern = r"blocks\..*"
    with pytest.raises(lp.TargetModulesError) as err:
        lp.adapt(net, lp.LavaConfig(target_modules=pattern))
    assert f"target_modules={pattern!r} matched no adaptable module" in str(err.value)
    _assert_unchanged(net, snap)


def test_unsupported_layer_type():
    net = _net()
    snap = _snapshot(net)
    with pytest.raises(lp.UnsupportedLayerError, match=r"'1' \(LayerNorm\).*supported layer types: nn.Linear"):
        lp.adapt(net, lp.LavaConfig(target_modules=["0", "1"]))
    _assert_unchanged(net, snap)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_rank_must_be_a_positive_integer(bad):
    with pytest.raises(lp.LavaConfigError, match=r"r must be a positive integer"):
        lp.LavaConfig(r=bad, target_modules=["0"])
    with pytest.raises(lp.LavaConfigError, match=r"rank_pattern\['0'\] must be a positive integer"):
        lp.LoraConfig(r=2, rank_pattern={"0": bad}, target_modules=["0"])


def test_rank_larger_than_allowed_leaves_model_unchanged():
    net = _net()
    snap = _snapshot(net)
    with pytest.raises(lp.LavaConfigError, match=r"LAVA rank r=5 is larger than allowed \(3\) for 3 .*rank_pattern=\{'3': 3\}"):
        lp.adapt(net, lp.LavaConfig(r=5, target_modules=["0", "3"]))
    _assert_unchanged(net, snap)
    with pytest.raises(lp.LavaConfigError, match=r"LoRA rank r=9 is larger than allowed \(8\)"):
        lp.adapt(net, lp.LoraConfig(r=9, target_modules=["2"]))
    _assert_unchanged(net, snap)
    model = lp.adapt(net, lp.LavaConfig(r=5, target_modules=["0", "3"], rank_pattern={"3": 3}))
    assert model.model[3].adapters["default"].r == 3


def test_other_config_errors():
    with pytest.raises(lp.LavaConfigError, match="target_modules is empty"):
        lp.LavaConfig(target_modules=[])
    # target_modules=None asks for the architecture's defaults: a model without any is a clear error
    with pytest.raises(lp.TargetModulesError, match="no default for a Sequential.*Architectures with defaults"):
        lp.adapt(nn.Sequential(nn.Linear(4, 4)), lp.LavaConfig())
    with pytest.raises(lp.LavaConfigError, match="not a valid regular expression"):
        lp.LavaConfig(target_modules="([")
    with pytest.raises(lp.LavaConfigError, match="orth_factors must be"):
        lp.LavaConfig(target_modules=["0"], orth_factors="middle")
    with pytest.raises(lp.LavaConfigError, match=r"has no field\(s\) \['rank'\]"):
        lp.LavaConfig.from_dict({"target_modules": ["0"], "rank": 4})


def test_adapter_name_exists_unknown_invalid():
    model = lp.adapt(_net(), lp.LavaConfig(r=2, target_modules=["0"]))
    snap = _snapshot(model)
    with pytest.raises(lp.AdapterNameError, match="an adapter named 'default' already exists"):
        model.add_adapter("default", lp.LoraConfig(r=2, target_modules=["3"]))
    _assert_unchanged(model, snap)
    with pytest.raises(lp.AdapterNameError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(lp.AdapterNameError, match="unknown adapter"):
        model.delete_adapter("nope")
    with pytest.raises(lp.AdapterNameError, match="invalid adapter name 'a.b'"):
        model.add_adapter("a.b", lp.LoraConfig(r=2, target_modules=["3"]))
    with pytest.raises(lp.AdapterNameError, match="unknown adapters"):
        model(torch.randn(2, 6), adapter_names=["default", "ghost"])
    _assert_unchanged(model, snap)
    assert model.active_adapters == ["default"]


def test_second_adapter_error_leaves_first_untouched():
    model = lp.adapt(_net(), lp.LavaConfig(r=2, target_modules=["0"]))
    snap = _snapshot(model)
    with pytest.raises(lp.LavaConfigError):
        model.add_adapter("big", lp.LoraConfig(r=5, target_modules=["0", "3"]))  # "3" has only 3 outputs
    _assert_unchanged(model, snap)
    assert list(model.peft_config) == ["default"]


@pytest.fixture
def saved(tmp_path):
    net = _net()
    fresh = copy.deepcopy(net)
    model = lp.adapt(net, lp.LavaConfig(r=2, target_modules=["0", "2", "3"]))
    model.save_pretrained(tmp_path / "ad")
    drop_manifest(tmp_path / "ad")  # these tests corrupt files by hand: the content checks must catch it
    return fresh, tmp_path / "ad"


def test_loading_into_a_different_base_model(saved, tmp_path):
    _, path = saved
    other = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Conv1d(10, 8, 1), nn.Linear(8, 3))
    snap = _snapshot(other)
    with pytest.raises(lp.IncompatibleBaseModelError) as err:
        lp.AdaptedModel.from_pretrained(other, path)
    msg = str(err.value)
    assert "0: weight shape [10, 6] here, [8, 6] in the adapter" in msg
    assert "2: weight shape [8, 10, 1] here, [8, 8, 1] in the adapter" in msg
    _assert_unchanged(other, snap)
    missing = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(lp.IncompatibleBaseModelError, match="2: no such module in this base model"):
        lp.AdaptedModel.from_pretrained(missing, path)


def test_truncated_or_corrupt_weights_file(saved):
    fresh, path = saved
    snap = _snapshot(fresh)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(lp.AdapterFileError, match="corrupt or truncated"):
        lp.AdaptedModel.from_pretrained(fresh, path)
    _assert_unchanged(fresh, snap)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(lp.AdapterFileError, match="corrupt or truncated"):
        lp.AdaptedModel.from_pretrained(fresh, path)
    _assert_unchanged(fresh, snap)


def test_weights_that_do_not_match_the_config(saved):
    from safetensors.torch import load_file, save_file

    fresh, path = saved
    snap = _snapshot(fresh)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors.pop("3.lava_U")
    tensors["9.lava_U"] = torch.zeros(2)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(lp.AdapterFileError, match=r"missing \['3.lava_U'\], unexpected \['9.lava_U'\]"):
        lp.AdaptedModel.from_pretrained(fresh, path)
    _assert_unchanged(fresh, snap)


def test_config_file_errors(saved):
    fresh, path = saved
    cfg_path = path / "adapter_config.json"
    good = json.loads(cfg_path.read_text())
    cases = [
        ('{"method": "lava", "con', "not valid JSON"),
        (json.dumps({**good, "method": "vera"}), r"unknown adapter method 'vera'; this lava-peft knows \[.*'lava'"),
        (json.dumps({**good, "format_version": 99}), "format version 99, newer than this lava-peft supports"),
        (json.dumps({"peft_type": "LORA"}), "not a lava-peft adapter config"),
        (json.dumps({**good, "config": {**good["config"], "rank": 3}}), r"no field\(s\) \['rank'\]"),
    ]
    snap = _snapshot(fresh)
    for text, pattern in cases:
        cfg_path.write_text(text)
        with pytest.raises(lp.AdapterFileError, match=pattern):
            lp.AdaptedModel.from_pretrained(fresh, path)
        _assert_unchanged(fresh, snap)
    with pytest.raises(lp.AdapterFileError, match="does not exist"):
        lp.AdaptedModel.from_pretrained(fresh, path / "nowhere")


def test_save_is_atomic_no_temp_files_left(tmp_path, monkeypatch):
    model = lp.adapt(_net(), lp.LavaConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    import lava_peft.io as io

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with torch.no_grad():
        model.model[0].adapters["default"].lava_V.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    # the previous complete save stays as it was: its files, its manifest, its generation copy, no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lava-gen-000001", ".lava-lock", "adapter_config.json", "adapter_model.safetensors", "lava_manifest.json"]


def test_adapting_an_adapted_model_is_refused():
    model = lp.adapt(_net(), lp.LavaConfig(r=2, target_modules=["0"]))
    with pytest.raises(lp.LavaError, match="already an AdaptedModel; use model.add_adapter"):
        lp.adapt(model, lp.LavaConfig(r=2, target_modules=["3"]))
