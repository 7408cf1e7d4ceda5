"""The pieces DyLoRA, MoSA and low-bit share (``lava_peft.methods.factorized``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lava_peft as lp
from lava_peft.config import adapter_class
from lava_peft.methods import factorized as fz
from lava_peft.methods.dylora import DyLoraConfig, RankSampler
from lava_peft.methods.lava import LavaAdapter
from lava_peft.methods.lora import LoraAdapter
from lava_peft.methods.lowbit import LowBitConfig
from lava_peft.methods.mosa import ModuleSampler, MosaConfig

CONFIGS = [DyLoraConfig, MosaConfig, LowBitConfig]
BASE = dict(r=2, alpha=4.0, target_modules=["0"])


# =============================================================================== config
@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize("factorization", ["lora", "lava"])
def test_json_round_trip_and_plain_config(cls, factorization):
    cfg = cls(**BASE, factorization=factorization)
    assert isinstance(cfg, fz.FactorizedConfig)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert cls.from_dict(data) == cfg and data["factorization"] == factorization
    assert set(fz.LAVA_FIELDS) <= set(data) and "_shared_runtime" not in data
    plain = cfg.plain_config(r=1)
    assert type(plain) is (lp.LavaConfig if factorization == "lava" else lp.LoraConfig)
    assert (plain.r, plain.alpha, plain.target_modules) == (1, 4.0, ["0"])
    assert plain.init == ("orthogonal" if factorization == "lava" else "default")


def test_defaults_stay_per_method():
    # DyLoRA takes (and stores) LAVA's defaults; MoSA and low-bit keep orth_lambda = 0
    dy = DyLoraConfig(**BASE, factorization="lava")
    assert (dy.init, dy.orth_lambda, dy.orth_factors, dy.spatial_init, dy.conv_path) == (
        "orthogonal", 0.1, "out", "gaussian", "auto")
    assert DyLoraConfig(**BASE, factorization="lava", init="lora").orth_factors == "in"
    assert DyLoraConfig(**BASE).to_dict()["orth_lambda"] is None
    mosa = MosaConfig(**BASE, factorization="lava")
    assert (mosa.init, mosa.orth_lambda, mosa.spatial_init) == (None, 0.0, None)
    low = LowBitConfig(**BASE, factorization="lava")
    assert (low.init, low.factor_init, low.orth_lambda, low.spatial_init, low.conv_path) == (
        "zero_delta", None, 0.0, "gaussian", "auto")
    assert low.factor_config() == low.plain_config()
    for cfg, weight in [(dy, 0.1), (mosa, 0.0), (low, 0.0), (DyLoraConfig(**BASE), 0.0),
                        (MosaConfig(**BASE, factorization="lava", orth_lambda=0.3), 0.3)]:
        assert cfg.regularization_weight() == weight


@pytest.mark.parametrize("cls,field", [(DyLoraConfig, "orth_lambda"), (DyLoraConfig, "conv_path"),
                                       (MosaConfig, "orth_lambda"), (MosaConfig, "spatial_init"),
                                       (LowBitConfig, "orth_lambda")])
def test_lava_only_fields_are_refused_with_lora_naming_the_config(cls, field):
    value = {"orth_lambda": 0.2, "conv_path": "weight", "spatial_init": "uniform"}[field]
    with pytest.raises(lp.LavaConfigError) as err:
        cls(**BASE, **{field: value})
    assert f"{cls.__name__} fields ['{field}'] apply to factorization='lava' only" in str(err.value)
    assert "set factorization='lava'" in str(err.value)
    cls(**BASE, factorization="lava", **{field: value})  # fine with LAVA


def test_low_bit_checks_only_orth_lambda_with_lora_as_before():
    cfg = LowBitConfig(**BASE, spatial_init="uniform", conv_path="weight", orth_factors="all")
    assert type(cfg.plain_config()) is lp.LoraConfig


@pytest.mark.parametrize("cls,field", [(DyLoraConfig, "init"), (MosaConfig, "init"), (LowBitConfig, "factor_init")])
def test_factor_init_errors_name_the_field_and_the_allowed_values(cls, field):
    with pytest.raises(lp.LavaConfigError, match=rf"{cls.__name__}\.{field} for factorization='lava' must be one of "
                                                 r"\('orthogonal', 'lora'\) \(as LavaConfig.init\)"):
        cls(**BASE, factorization="lava", **{field: "gaussian"})
    with pytest.raises(lp.LavaConfigError, match=rf"{cls.__name__}\.{field} for factorization='lora'"):
        cls(**BASE, **{field: "orthogonal"})


@pytest.mark.parametrize("cls", CONFIGS)
def test_factorization_and_lava_option_errors_name_the_config(cls):
    with pytest.raises(lp.LavaConfigError, match=rf"{cls.__name__}\.factorization must be 'lora' or 'lava'"):
        cls(**BASE, factorization="tucker")
    with pytest.raises(lp.LavaConfigError, match=rf"{cls.__name__}\(factorization='lava'\): conv_path must be"):
        cls(**BASE, factorization="lava", conv_path="fast")


# =============================================================================== step counter
def test_step_advances_when_a_layer_draws_again():
    clock = fz.StepCounter()
    assert [clock.register() for _ in range(3)] == [0, 1, 2]
    assert [clock.tick(i) for i in (0, 1, 2)] == [0, 0, 0]
    assert [clock.tick(i) for i in (2, 0, 1)] == [1, 1, 1]  # any order within a step
    assert clock.tick(1) == 2 and clock.tick(1) == 3  # shared weights: the second call starts a new step
    assert clock.tick(0) == 3
    clock.step = 10  # resume
    assert clock.tick(2) == 10 and clock.tick(2) == 11


def test_samplers_use_the_counter():
    ranks = RankSampler(seed=3, r_min=1, mode="per_layer")
    modules = ModuleSampler(seed=3, n_modules=4, mode="per_layer")
    assert isinstance(ranks, fz.StepCounter) and isinstance(modules, fz.StepCounter)
    assert [ranks.register(4), ranks.register(4)] == [modules.register(), modules.register()] == [0, 1]
    got = [ranks.draw(i, 4) for i in (0, 1, 0, 1)]
    assert ranks.step == 1 and got == [ranks.rank(t, i, 4) for t in (0, 1) for i in (0, 1)]
    got = [modules.draw(i) for i in (0, 1, 0)]
    assert modules.step == 1 and got == [modules.module(0, 0), modules.module(0, 1), modules.module(1, 0)]


def test_shared_per_config_keeps_one_object_per_config_and_arguments():
    cfg = DyLoraConfig(**BASE)
    first = fz.shared_per_config(cfg, RankSampler, 0, 1, "per_layer")
    assert fz.shared_per_config(cfg, RankSampler, 0, 1, "per_layer") is first
    assert fz.shared_per_config(DyLoraConfig(**BASE), RankSampler, 0, 1, "per_layer") is not first  # another name
    second = fz.shared_per_config(cfg, RankSampler, 5, 1, "per_layer")
    assert second is not first and second.seed == 5
    assert "_shared_runtime" not in cfg.to_dict()
    # the adapters of one add_adapter call share one sampler; another call gets its own
    model = lp.adapt(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), MosaConfig(r=2, target_modules=["0", "1"]))
    model.add_adapter("b", MosaConfig(r=2, target_modules=["0", "1"]))
    a = [ad._sampler for _, ad in model.adapter_layers("default")]
    b = [ad._sampler for _, ad in model.adapter_layers("b")]
    assert a[0] is a[1] and b[0] is b[1] and a[0] is not b[0]


def test_in_backward_is_true_only_during_a_backward_pass():
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(fz.in_backward()))
    assert not fz.in_backward()
    y.sum().backward()
    assert seen == [True] and not fz.in_backward()


# =============================================================================== dispatch
@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize("factorization,layer", [("lora", "linear"), ("lava", "linear"), ("lava", "conv")])
def test_registered_class_builds_its_variant_and_copies_keep_it(cls, factorization, layer):
    base = nn.Sequential(nn.Linear(6, 5) if layer == "linear" else nn.Conv2d(3, 4, 3))
    model = lp.adapt(base, cls(**BASE, factorization=factorization))
    adapter = model.adapter_layers()[0][1]
    registered = adapter_class(cls.method)
    variant = registered.variants[factorization]
    plain = LavaAdapter if factorization == "lava" else LoraAdapter
    assert type(adapter) is variant and isinstance(adapter, registered) and isinstance(adapter, plain)
    assert (variant.plain_method, variant.plain_class) == (factorization, plain)
    up, down = ("lava_U", "lava_V") if factorization == "lava" else ("lora_B", "lora_A")
    spatial = ("lava_P.0", "lava_P.1") if (factorization, layer) == ("lava", "conv") else ()
    assert adapter.factor_keys() == (up, down, *spatial)
    assert adapter.factor(up) is getattr(adapter, "_parameters")[up]
    for clone in (copy.deepcopy(adapter), copy.copy(adapter)):
        assert type(clone) is variant
    clone = copy.deepcopy(adapter)
    for key in adapter.factor_keys():
        assert torch.equal(clone.factor(key), adapter.factor(key)) and clone.factor(key) is not adapter.factor(key)
    assert type(copy.deepcopy(model).adapter_layers()[0][1]) is variant


@pytest.mark.parametrize("cls", CONFIGS)
def test_check_layer_uses_the_plain_method_of_the_factorization(cls):
    # Conv2d(3, 4, 3): LoRA (flattened) allows r <= min(4, 27) = 4, LAVA's CP bound is 108 / 4 = 27
    base = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(lp.LavaConfigError, match="LoRA rank r=5"):
        lp.adapt(copy.deepcopy(base), cls(r=5, target_modules=["0"]))
    lp.adapt(copy.deepcopy(base), cls(r=5, target_modules=["0"], factorization="lava"))
    with pytest.raises(lp.LavaConfigError, match="LAVA rank r=28"):
        lp.adapt(copy.deepcopy(base), cls(r=28, target_modules=["0"], factorization="lava"))


@pytest.mark.parametrize("cls", CONFIGS)
def test_registered_class_is_built_through_for_layer(cls):
    """The variant is chosen by the explicit ``for_layer`` hook; constructing the registered class is refused."""
    from lava_peft.methods.base import LayerSpec

    spec, registered = LayerSpec("linear", 5, 6), adapter_class(cls.method)
    for factorization in ("lora", "lava"):
        config = cls(**BASE, factorization=factorization)
        assert type(registered.for_layer(spec, config, "0")) is registered.variants[factorization]
        with pytest.raises(lp.LavaError, match="for_layer"):
            registered(spec, config, "0")


@pytest.mark.parametrize("cls", [DyLoraConfig, MosaConfig])
def test_sampler_state_is_the_models(cls):
    """``AdaptedModel.sampler_state`` counts training forwards (the step of the next draw) and restores it;
    the checkpoint helpers read and write exactly that."""
    from lava_peft.train import checkpoint as ckpt

    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), cls(r=2, alpha=4.0, target_modules=["0", "1"]))
    model.train()
    assert model.sampler_state() == {"default": 0}
    x = torch.randn(3, 6)
    for _ in range(3):
        model(x)
    assert model.sampler_state() == {"default": 3} == ckpt.sampler_state(model)
    clock = model.adapter_layers()[0][1].step_clock()
    assert all(a.step_clock() is clock for _, a in model.adapter_layers())
    ckpt.load_sampler_state(model, {"default": 7, "absent": 1})
    assert model.sampler_state() == {"default": 7} and clock.step == 7
    model.load_sampler_state({"default": 2})
    model(x)
    assert model.sampler_state() == {"default": 3}
    assert ckpt.sampler_state(nn.Linear(2, 2)) == {}
    plain = lp.adapt(nn.Sequential(nn.Linear(6, 5)), lp.LoraConfig(r=2, target_modules=["0"]))
    assert plain.sampler_state() == {}


# ----------------------------------------------------------------------------- the effective_factors hook
def _cp_delta(up, modes, scale, shape):
    """Independent ΔW: einsum over the CP modes (matrix form when one mode)."""
    if len(modes) == 1:
        return (scale * up @ modes[0]).reshape(shape)
    letters = "abcdefgh"[: len(modes) - 1]
    eq = "oj,ji," + ",".join(f"j{c}" for c in letters) + "->oi" + letters
    return scale * torch.einsum(eq, up, *modes)


@pytest.mark.parametrize("factorization,layer", [("lora", "linear"), ("lava", "linear"), ("lava", "conv")])
def test_effective_factors_of_each_variant(factorization, layer):
    """What each variant hands to the shared LoRA/LAVA code, against a computation from the stored factors:
    DyLoRA the first b components at α/b, MoSA in training a module's masked factors at c·s (merged otherwise),
    low-bit the fake-quantized factors; ``delta_weight`` is built from exactly these (MoSA: the merged ones)."""
    from lava_peft.lowbit import fake_quantize

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5)) if layer == "linear" else nn.Sequential(nn.Conv2d(3, 4, 3))
    shape = tuple(base[0].weight.shape)
    lava = {"orth_lambda": 0.0} if factorization == "lava" else {}
    configs = {
        "dylora": DyLoraConfig(r=3, alpha=6.0, r_min=1, eval_rank=2, factorization=factorization, target_modules=["0"], **lava),
        "mosa": MosaConfig(r=3, alpha=6.0, n_modules=2, split="all", factorization=factorization, target_modules=["0"]),
        "lowbit": LowBitConfig(r=3, alpha=6.0, bits=2, factorization=factorization, target_modules=["0"]),
    }
    for method, config in configs.items():
        model = lp.adapt(copy.deepcopy(base), config)
        adapter = model.adapter_layers()[0][1]
        with torch.no_grad():
            for key in adapter.factor_keys():
                adapter.factor(key).normal_()
        up, modes = adapter.factor(adapter.factor_keys()[0]), [adapter.factor(k) for k in adapter.factor_keys()[1:]]
        model.eval()
        with torch.no_grad():
            eff_up, eff_modes, scale = adapter.effective_factors()
            if method == "dylora":
                assert scale == 6.0 / 2 and torch.equal(eff_up, up[:, :2])
                assert all(torch.equal(e, m[:2]) for e, m in zip(eff_modes, modes))
            elif method == "mosa":
                assert scale == adapter.scale and torch.equal(eff_up, up)
            else:
                assert scale == 6.0 / 3 and torch.equal(eff_up, fake_quantize(up, 2))
                assert all(torch.equal(e, fake_quantize(m, 2)) for e, m in zip(eff_modes, modes))
            torch.testing.assert_close(adapter.delta_weight(), _cp_delta(eff_up, eff_modes, scale, shape),
                                       rtol=1e-5, atol=1e-6)
        if method == "mosa":  # training: the drawn module's masks at the training scale; ΔW stays the merged one
            model.train()
            eff_up, eff_modes, scale = adapter.effective_factors()
            k = adapter.last_module
            assert scale == adapter.train_scale == adapter.scale * 2 ** len(adapter.factor_keys())
            assert torch.equal(eff_up, up * adapter.module_mask(adapter.factor_keys()[0], k))
            merged = _cp_delta(up.detach(), [m.detach() for m in modes], adapter.scale, shape)
            torch.testing.assert_close(adapter.delta_weight().detach(), merged, rtol=1e-5, atol=1e-6)


def test_replace_adapter_checks_the_layers_and_keeps_the_flags():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), lp.LoraConfig(r=2, target_modules=["0", "1"]))
    layers = dict(model.adapter_layers())
    before = {p: a for p, a in layers.items()}
    with pytest.raises(lp.AdapterNameError, match=r"missing \['1'\]"):
        model.replace_adapter("default", model.peft_config["default"], {"0": layers["0"]})
    assert dict(model.adapter_layers()) == before  # nothing changed
    cfg = lp.LoraConfig(r=2, alpha=4.0, target_modules=["0", "1"])
    new = {p: LoraAdapter(a.spec, cfg, p) for p, a in layers.items()}
    for a in new.values():
        a.requires_grad_(False)
    model.replace_adapter("default", cfg, new)
    assert model.peft_config["default"] is cfg and all(dict(model.adapter_layers())[p] is a for p, a in new.items())
    assert all(p.requires_grad for a in new.values() for p in a.parameters())  # active adapter: trainable again
