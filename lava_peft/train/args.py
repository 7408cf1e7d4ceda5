"""``TrainingArguments``: every knob of :class:`lava_peft.train.Trainer`, validated up front."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import LavaConfigError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainingArguments:
    """Arguments of :class:`~lava_peft.train.Trainer`.

    Batches: ``batch_size`` is per process; one optimizer step sees
    ``batch_size × grad_accum_steps × world_size`` samples (the *global batch*), and the
    result does not depend on how that product is split (see ``docs``/tests).

    Args:
        output_dir: run directory (metrics, checkpoints, adapter). A directory holding
            another run is refused unless ``overwrite`` (or ``resume_from``) is set.
        epochs: passes over the training data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run (overrides ``epochs``).
        lr / weight_decay: AdamW settings of the adapter (and any other trainable) parameters.
        head_lr / head_weight_decay: the same for ``modules_to_save`` (e.g. a new
            classifier head); ``None`` means "same as the adapter".
        schedule: ``"linear"``, ``"cosine"`` (to 0) or ``"constant"`` after warmup.
        warmup_steps / warmup_ratio: linear warmup from 0 (steps win over ratio).
        max_grad_norm: clip the global gradient norm (``None`` or 0: no clipping).
        mixed_precision: ``"auto"`` (bf16 on CUDA when supported, else fp16 on CUDA,
            none on CPU), ``"no"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        eval_every: evaluate every N optimizer steps (``None``: at the end of every epoch).
        save_every: write a resumable checkpoint every N steps (``None``: only at the
            end of each epoch; 0: never).
        save_final: write the final adapter (or trainable weights) to ``output_dir/adapter``.
        eval_at_start: evaluate once before the first step (the zero-shot baseline, logged at step 0).
        save_best: keep the adapter with the best ``metric`` in ``output_dir/best``.
        metric / greater_is_better: what "best" means (``"accuracy"`` or ``"loss"``).
        freeze_batchnorm: keep BatchNorm running statistics fixed while training
            (BatchNorm layers run in eval mode); default True.
        group_by_length: batch token sequences of similar length together (less padding,
            faster on CPU; the order stays random and reproducible).
        seed: seeds Python, NumPy and torch, and the data order.
        resume_from: a checkpoint directory, a run directory (its latest checkpoint)
            or ``"auto"`` (the latest checkpoint in ``output_dir`` if there is one).
    """

    output_dir: str = "runs/lava"
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum_steps: int = 1
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    head_weight_decay: float | None = None
    schedule: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    eval_every: int | None = None
    save_every: int | None = None
    save_best: bool = True
    save_final: bool = True
    eval_at_start: bool = False
    metric: str = "accuracy"
    greater_is_better: bool | None = None
    freeze_batchnorm: bool = True
    group_by_length: bool = False
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    summary: bool = True
    overwrite: bool = False
    resume_from: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise LavaConfigError(f"TrainingArguments: {msg}")

        if self.max_steps is None and not self.epochs > 0:
            bad(f"epochs must be > 0 (or set max_steps); got {self.epochs}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            bad(f"max_steps must be a positive integer; got {self.max_steps!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer; got {value!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                bad(f"{name} must be > 0; got {value}")
        for name in ("weight_decay", "head_weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                bad(f"{name} must be >= 0; got {value}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            bad(f"mixed_precision must be one of {PRECISIONS}; got {self.mixed_precision!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                bad(f"{name} must be a non-negative integer or None; got {value!r}")
        if self.metric not in ("accuracy", "loss") and self.greater_is_better is None:
            bad(f"metric={self.metric!r} is a custom metric: set greater_is_better=True/False")

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.metric != "loss"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingArguments":
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, known, 1)[0]!r}?)"
                     if difflib.get_close_matches(u, known, 1) else repr(u) for u in unknown]
            raise LavaConfigError(f"TrainingArguments has no field(s) {', '.join(hints)}; valid: {sorted(known)}")
        return cls(**data)
