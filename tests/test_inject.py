"""Which modules get adapted: names, suffixes, regex, keywords, layer types, exclusions, patterns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lava_peft as lp


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 11)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.lm_head(h)


def _paths(config):
    torch.manual_seed(0)
    return sorted(p for p, _ in lp.adapt(Net(), config).adapter_layers())


def test_suffix_list_regex_and_keywords():
    assert _paths(lp.LoraConfig(r=2, target_modules=["q_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    assert _paths(lp.LoraConfig(r=2, target_modules=r"blocks\.1\..*_proj")) == ["blocks.1.q_proj", "blocks.1.v_proj"]
    assert _paths(lp.LoraConfig(r=2, target_modules="all-linear")) == [
        "blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj",
    ]  # lm_head (the output head) excluded
    assert _paths(lp.LoraConfig(r=2, target_modules="all-conv")) == ["blocks.0.conv", "blocks.1.conv"]
    assert len(_paths(lp.LoraConfig(r=2, target_modules="all"))) == 6


def test_layer_types_and_exclude():
    assert _paths(lp.LavaConfig(r=2, target_modules=[nn.Conv2d, nn.Embedding])) == ["blocks.0.conv", "blocks.1.conv", "embed"]
    cfg = lp.LavaConfig(r=2, target_modules=[nn.Conv2d])
    assert cfg.target_modules == ["type:Conv2d"]
    assert lp.LavaConfig.from_dict(cfg.to_dict()) == cfg
    assert _paths(lp.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["blocks.0.v_proj"])) == [
        "blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.v_proj",
    ]
    assert _paths(lp.LoraConfig(r=2, target_modules="all-linear", exclude_modules=r"blocks\.1\..*")) == [
        "blocks.0.q_proj", "blocks.0.v_proj",
    ]


def test_rank_and_alpha_patterns():
    torch.manual_seed(0)
    cfg = lp.LavaConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"blocks.1.q_proj": 2, r"blocks\.0\.v.*": 3}, alpha_pattern={"v_proj": 1.0},
    )
    model = lp.adapt(Net(), cfg)
    got = {p: (a.r, a.scale) for p, a in model.adapter_layers()}
    assert got == {
        "blocks.0.q_proj": (4, 2.0),
        "blocks.0.v_proj": (3, 1.0 / 3),
        "blocks.1.q_proj": (2, 4.0),
        "blocks.1.v_proj": (4, 0.25),
    }
    rs = lp.adapt(Net(), lp.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert all(a.scale == 4.0 for _, a in rs.adapter_layers())


def test_second_adapter_reuses_wrappers_and_attribute_fallthrough():
    torch.manual_seed(0)
    model = lp.adapt(Net(), lp.LavaConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules="all-linear"))
    layer = model.model.blocks[0].q_proj
    assert list(layer.adapters) == ["default", "b"]
    assert isinstance(layer.base_layer, nn.Linear)
    assert layer.in_features == 8 and layer.weight is layer.base_layer.weight  # falls through to the base
    assert model.get_output_embeddings() is model.model.lm_head  # AdaptedModel falls through to the model
    ids = torch.randint(0, 11, (2, 5))
    assert model(ids).shape == (2, 5, 11)


def test_modules_to_save_unknown_name():
    with pytest.raises(lp.TargetModulesError, match=r"modules_to_save entries \['head'\] match no module"):
        lp.adapt(Net(), lp.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"]))
