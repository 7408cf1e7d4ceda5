"""CPU conv scenario: the packaged, ImageNet-pretrained MobileNetV2 with every conv adapted.

    python -m benchmarks.run cpu-conv --device cpu --json benchmarks/results/cpu-conv.json

Rows (one interleaved run, the same pretrained weights in each):

* ``frozen`` — no trainable parameters, the input image requires grad (the full backward runs);
* ``peft-lora-conv`` — HF PEFT ``LoraConfig`` on the convs PEFT accepts: it refuses a conv whose
  ``groups`` does not divide ``r`` (MobileNetV2's depthwise convs at ``r = 8``), so it adapts
  the ``groups == 1`` convs (what it refuses is recorded in the notes);
* ``lava-lora-conv-peft-targets`` — our LoRA (``conv_path="auto"``) on exactly PEFT's convs;
* ``lava-lora-conv`` — our LoRA on every conv, depthwise included (``auto``), and the same
  with the path forced (``-weight``, ``-factored``) so the automatic choice is checked by measurement;
* ``lava-conv`` — LAVA (CP on the kernels) on every conv at equal rank, ``conv_path="auto"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lava_peft as lp

from .harness import Variant
from .scenarios import Scenario, _peft_lora, _quiet_transformers, _want, scenario

CONV_KINDS = ["frozen", "peft-lora-conv", "lava-lora-conv-peft-targets", "lava-lora-conv", "lava-lora-conv-weight",
              "lava-lora-conv-factored", "lava-conv"]


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


@scenario("cpu-conv")
def cpu_conv(args, device) -> Scenario:
    """MobileNetV2 (ImageNet weights), fp32, batch 32 at 64 px, every conv adapted, r=8."""
    from lava_peft.models import load_pretrained_mobilenet_v2

    _quiet_transformers()
    B, S = args.batch or 32, args.image_size or 64
    r = args.rank or 8
    gen = torch.Generator().manual_seed(1)

    def make_batch():
        x = torch.randn(B, 3, S, S, generator=gen).to(device)
        y = torch.randint(0, 1000, (B,), generator=gen).to(device)
        return x, y

    def build():
        return load_pretrained_mobilenet_v2().to(device)

    probe = build()
    all_convs = _convs(probe)
    peft_targets = [n for n, m in all_convs if m.groups == 1 or r % m.groups == 0]
    refused = len(all_convs) - len(peft_targets)
    refusal = _peft_refusal(build, r) if refused else "accepted every conv"

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
        else:
            model = lp.adapt(model, lp.LavaConfig(r=r, alpha=2 * r, target_modules=[n for n, _ in all_convs],
                                                  orth_lambda=args.orth_lambda, conv_path="auto"))
            reg_model = model
            role = "lava"
            notes = f"LAVA CP-conv r={r} on {len(all_convs)} convs, conv_path='auto', orth_lambda={args.orth_lambda}"
        model.train()

        def step(batch, model=model, reg_model=reg_model, frozen_input=frozen_input):
            x, y = batch
            if frozen_input:
                x = x.requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            if reg_model is not None:
                loss = loss + reg_model.regularization_loss()
            return loss

        variants.append(Variant(kind, model, step, make_batch, B, role=role, group="eager", notes=notes))
    depthwise = sum(1 for _, m in all_convs if m.groups > 1)
    setup = (f"MobileNetV2 (ImageNet-1k weights, lava_peft.models), fp32, NCHW, batch {B}x3x{S}x{S}, CE loss on "
             f"random labels, AdamW, BatchNorm in train mode; {len(all_convs)} Conv2d ({depthwise} depthwise), "
             f"r={r}, alpha={2 * r}; classifier frozen")
    notes = [
        f"HF PEFT on every conv: {refusal!r}; so the PEFT row adapts the {len(peft_targets)} convs with groups "
        f"dividing r and skips {refused} depthwise convs. 'lava-lora-conv-peft-targets' is our LoRA on the same "
        f"{len(peft_targets)} convs (the like-for-like comparison); the other lava rows adapt all {len(all_convs)}.",
        "lava-lora-conv-weight / -factored force LoRA's conv path; lava-lora-conv lets the cost model "
        "(lava_peft.methods.cp_conv.choose_conv_path, chain='factored') choose per layer.",
    ]
    return Scenario("cpu-conv", "images", setup, variants, notes)
