"""A plain PyTorch training loop over an :class:`~lava_peft.AdaptedModel` (or any module).

    trainer = lp.Trainer(model, lp.TrainingArguments(output_dir="runs/x", lr=2e-3),
                         train_data={"input_ids": ..., "attention_mask": ..., "labels": ...},
                         eval_data=...)
    result = trainer.train()

What it does, in order, each optimizer step: the next global batch (see ``data.py``),
``grad_accum_steps`` forward/backward passes under autocast with
``loss = task loss + model.regularization_loss()`` (the adapters' terms, e.g. LAVA's
orthogonality penalty), gradient clipping, AdamW (adapter and head groups with their own
lr / weight decay), the lr schedule.  Under ``torchrun`` / ``accelerate launch`` the
model is wrapped in DDP automatically and rank 0 writes every file.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..model import AdaptedModel
from . import dist
from .args import TrainingArguments
from .checkpoint import (
    METRICS_NAME,
    RUN_MARKER,
    SUMMARY_NAME,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    resolve_checkpoint,
    save_checkpoint,
    save_trainable,
    set_seed,
    unwrap,
)
from .data import IndexedData, epoch_order, global_steps, sample_lengths, step_shards
from .metrics import MetricsLogger
from .schedule import build_optimizer, build_scheduler
from .summary import render_summary

LossFn = Callable[[nn.Module, dict], Any]


def default_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of ``model`` on ``batch``: ``model(x)`` for ``{"x", "labels"}`` batches,
    ``model(**inputs)`` otherwise (Hugging Face style); ``.logits`` is taken if present."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(inputs["x"]) if set(inputs) == {"x"} else model(**inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32; token-level logits ``[B, T, C]`` are flattened (label -100 ignored)."""
    if logits.dim() > 2:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
    return F.cross_entropy(logits.float(), labels)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    if logits.dim() > 2:
        mask = labels != -100
        return int((logits.argmax(-1)[mask] == labels[mask]).sum()), int(mask.sum())
    return int((logits.argmax(-1) == labels).sum()), int(labels.numel())


def describe_model(model: nn.Module) -> str:
    model = unwrap(model)
    if isinstance(model, AdaptedModel) and model.active_adapter:
        cfg = model.peft_config[model.active_adapter]
        extra = f", orth_lambda={cfg.orth_lambda}" if hasattr(cfg, "orth_lambda") else ""
        layers = len(model.adapter_layers())
        base = type(model.model).__name__
        return f"{base} + {cfg.method} adapter (r={cfg.r}, alpha={cfg.alpha}{extra}) on {layers} layers"
    return f"{type(model).__name__} (all trainable parameters)"


class Trainer:
    """Train ``model`` on ``train_data``, evaluating on ``eval_data``.

    Args:
        model: an :class:`AdaptedModel` (adapter + ``modules_to_save`` are trained) or any
            ``nn.Module`` (its ``requires_grad`` parameters are trained, e.g. full fine-tuning).
        args: :class:`TrainingArguments`; keyword arguments override / replace it
            (``Trainer(model, output_dir="runs/x", lr=1e-3, ...)``).
        train_data / eval_data: dict of equal-length tensors with a ``labels`` entry
            (``{"x": images, "labels": y}`` or tokenizer outputs + labels), an
            ``(inputs, labels)`` tuple, or a map-style Dataset.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, logits)``; default
            cross-entropy on :func:`default_forward`'s logits.
        compute_metrics: ``f(logits, labels) -> dict`` of extra eval metrics.
        callbacks: callables ``cb(trainer, event)`` with ``event`` in
            ``"step_end"``, ``"eval_end"``, ``"train_end"``.
        run_info: extra JSON stored in ``run.json`` (the CLI records model/data there).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_data: Any = None,
        eval_data: Any = None,
        *,
        loss_fn: LossFn | None = None,
        compute_metrics: Callable | None = None,
        callbacks: Sequence[Callable] = (),
        run_info: dict | None = None,
        **overrides,
    ):
        if args is None:
            args = TrainingArguments.from_dict(overrides)
        elif overrides:
            args = TrainingArguments.from_dict({**args.to_dict(), **overrides})
        self.args = args
        self.device = dist.default_device() if args.device == "auto" else torch.device(args.device)
        dist.init_from_env(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = dist.is_main()
        self.model = model.to(self.device)
        self.train_data = IndexedData(train_data, "train_data") if train_data is not None else None
        self.eval_data = IndexedData(eval_data, "eval_data") if eval_data is not None else None
        self.loss_fn = loss_fn
        self.compute_metrics = compute_metrics
        self.callbacks = list(callbacks)
        self.run_info = run_info or {}
        self.precision = self._precision()
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.baseline: dict | None = None
        self.last_eval: dict | None = None
        self._ddp: nn.Module | None = None
        resume = self._resume_target()
        self.run_dir = Path(args.output_dir)
        if self.train_data is not None:  # evaluation-only trainers never touch the directory
            if self.is_main:
                prepare_run_dir(self.run_dir, args.overwrite, resuming=resume is not None)
            dist.barrier()
        self._resume = resume
        self.logger = MetricsLogger(self.run_dir / METRICS_NAME, enabled=self.is_main and self.train_data is not None)
        self.optimizer = self.scheduler = None
        self.group_sizes: dict[str, int] = {}
        if self.train_data is not None:
            self.optimizer, self.group_sizes = build_optimizer(self.model, args)
            self.global_batch = args.batch_size * args.grad_accum_steps * self.world
            self.steps_per_epoch = global_steps(len(self.train_data), self.global_batch, args.grad_accum_steps, self.world)
            if self.steps_per_epoch == 0:
                raise _error(f"train_data has {len(self.train_data)} samples, fewer than one global batch needs "
                                 f"({args.grad_accum_steps * self.world}); lower grad_accum_steps or use more data")
            self.total_steps = args.max_steps or max(1, math.ceil(args.epochs * self.steps_per_epoch))
            self.scheduler = build_scheduler(self.optimizer, args, self.total_steps)
        else:
            self.global_batch, self.steps_per_epoch, self.total_steps = args.batch_size, 1, 1
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    # ------------------------------------------------------------------ setup helpers
    def _precision(self) -> str:
        mp, dev = self.args.mixed_precision, self.device.type
        if mp == "auto":
            if dev == "cuda":
                return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return "no"
        if mp == "fp16" and dev != "cuda":
            raise _error("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
        return mp

    def _autocast(self):
        if self.precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _resume_target(self) -> Path | None:
        target = self.args.resume_from
        if not target:
            return None
        if target == "auto":
            return latest_checkpoint(self.args.output_dir)
        return resolve_checkpoint(target)

    @property
    def unwrapped(self) -> nn.Module:
        return unwrap(self.model)

    def _train_mode(self) -> None:
        self.model.train()
        if self.args.freeze_batchnorm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _loss_and_logits(self, model: nn.Module, batch: dict):
        if self.loss_fn is not None:
            out = self.loss_fn(model, batch)
            return out if isinstance(out, tuple) else (out, None)
        logits = default_forward(model, batch)
        if "labels" not in batch:
            raise _error("batches need a 'labels' entry for the default loss; pass loss_fn=... otherwise")
        return classification_loss(logits, batch["labels"]), logits

    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            cb(self, event)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_data: Any = None, log: bool = True, desc: str = "eval") -> dict:
        """Loss and accuracy (plus ``compute_metrics``) on ``eval_data`` (default: the trainer's).

        Under DDP each rank evaluates a shard and the results are summed over ranks.
        """
        data = IndexedData(eval_data, "eval_data") if eval_data is not None else self.eval_data
        if data is None:
            raise _error("no eval data: pass eval_data to Trainer(...) or to evaluate()")
        model = self.unwrapped
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        idx = torch.arange(len(data))[self.rank :: self.world]
        lengths = sample_lengths(data)
        if lengths is not None:  # longest first: little padding per batch (order does not change the metrics)
            idx = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        loss_sum = correct = count = 0.0
        all_logits, all_labels = [], []
        bs = self.args.eval_batch_size
        bar = tqdm(total=len(idx), desc=desc, unit="ex", leave=False, dynamic_ncols=True,
                   disable=not (self.args.progress and self.is_main))
        for start_i in range(0, len(idx), bs):
            batch = self._to_device(data.batch(idx[start_i : start_i + bs]))
            with self._autocast():
                loss, logits = self._loss_and_logits(model, batch)
            n = len(next(iter(batch.values())))
            loss_sum += float(loss) * n
            if logits is not None and "labels" in batch:
                c, k = _correct(logits, batch["labels"])
                correct += c
                count += k
                if self.compute_metrics is not None:
                    all_logits.append(logits.float().cpu())
                    all_labels.append(batch["labels"].cpu())
            bar.update(n)
        bar.close()
        loss_sum, correct, count, n_total = dist.all_reduce_sum([loss_sum, correct, count, float(len(idx))], self.device)
        result = {"loss": loss_sum / max(1.0, n_total), "samples": int(n_total)}
        if count:
            result["accuracy"] = correct / count
        if self.compute_metrics is not None and all_logits:
            logits, labels = torch.cat(all_logits), torch.cat(all_labels)
            if dist.is_distributed():
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, (logits, labels))
                logits = torch.cat([g[0] for g in gathered])
                labels = torch.cat([g[1] for g in gathered])
            result.update(self.compute_metrics(logits, labels))
        result["seconds"] = time.perf_counter() - start
        if was_training:
            self._train_mode()
        if log:
            self.logger.log({"split": "eval", "step": self.step, "epoch": self._epoch_float(), **result})
        self.last_eval = result
        return result

    def _epoch_float(self) -> float:
        return self.step / self.steps_per_epoch if self.train_data is not None else 0.0

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """Run training; returns the summary dict (also written to ``summary.json``)."""
        if self.train_data is None:
            raise _error("Trainer has no train_data; pass train_data=... to Trainer(...)")
        args = self.args
        set_seed(args.seed)
        resumed_from = None
        if self._resume is not None:
            state = load_checkpoint(self._resume, self.model, self.optimizer, self.scheduler, self.rank)
            if state.get("global_batch", self.global_batch) != self.global_batch:
                raise _error(f"checkpoint {self._resume} was trained with global batch {state.get('global_batch')}, "
                                 f"this run has {self.global_batch}; resume with the same batch settings")
            self.step, self.best_metric, self.best_step = state["step"], state.get("best_metric"), state.get("best_step")
            self.baseline = state.get("baseline")
            resumed_from = self.step
            if self.is_main:
                self.logger.truncate_after(self.step)
        if self.is_main:
            self._write_run_marker()
        model = self.model
        if dist.is_distributed() and any(p.requires_grad for p in model.parameters()):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = model = DDP(model, device_ids=ids)
        if args.eval_at_start and self.eval_data is not None and resumed_from is None:
            self.baseline = self.evaluate(desc="eval (before training)")
        self._train_mode()
        trainable = [p for p in model.parameters() if p.requires_grad]
        accum = args.grad_accum_steps
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (args.progress and self.is_main))
        train_time = eval_time = 0.0
        samples_done = 0
        window = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss*n, n, reg, steps, correct
        last_train_loss = None
        cur_epoch, order = -1, None
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            epoch, s_in = divmod(self.step, self.steps_per_epoch)
            if epoch != cur_epoch:
                lengths = sample_lengths(self.train_data) if args.group_by_length else None
                order = epoch_order(len(self.train_data), args.seed, epoch, lengths, self.global_batch)
                cur_epoch = epoch
            shards, n_global = step_shards(order, s_in, self.global_batch, accum, self.world, self.rank)
            reg_value = 0.0
            for m, idx in enumerate(shards):
                batch = self._to_device(self.train_data.batch(idx))
                sync = self._ddp is None or m == accum - 1
                ctx = contextlib.nullcontext() if sync else self._ddp.no_sync()
                with ctx:
                    with self._autocast():
                        task, logits = self._loss_and_logits(model, batch)
                    reg = self.unwrapped.regularization_loss() if isinstance(self.unwrapped, AdaptedModel) else None
                    total = task if reg is None else task + reg
                    weight = len(idx) * self.world / n_global
                    scaled = total * weight
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                window[0] += float(task.detach()) * len(idx)
                window[1] += len(idx)
                if reg is not None:
                    reg_value = float(reg.detach())
                if logits is not None and "labels" in batch:
                    window[4] += _correct(logits.detach(), batch["labels"])[0]
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = None
            if args.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            samples_done += n_global
            window[2] += reg_value
            window[3] += 1
            bar.update(1)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if self.step % args.log_every == 0 or self.step == self.total_steps:
                loss_sum, n, correct = dist.all_reduce_sum([window[0], window[1], window[4]], self.device)
                elapsed = train_time + (time.perf_counter() - t0)
                last_train_loss = loss_sum / max(1.0, n)
                record = {
                    "split": "train", "step": self.step, "epoch": round(self._epoch_float(), 4),
                    "loss": last_train_loss, "accuracy": correct / max(1.0, n),
                    "reg_loss": window[2] / max(1.0, window[3]),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm, "samples_per_second": samples_done / max(1e-9, elapsed),
                }
                self.logger.log(record)
                bar.set_postfix(self._postfix(record), refresh=False)
                window = [0.0, 0.0, 0.0, 0.0, 0.0]
            do_eval = self.eval_data is not None and (
                (args.eval_every and self.step % args.eval_every == 0)
                or (not args.eval_every and end_of_epoch)
                or self.step == self.total_steps
            )
            do_save = (args.save_every and self.step % args.save_every == 0) or (args.save_every is None and end_of_epoch)
            if do_eval or do_save:
                train_time += time.perf_counter() - t0
                t_eval = time.perf_counter()
                if do_eval:
                    self._eval_and_keep_best()
                    bar.set_postfix(self._postfix(None), refresh=True)
                if do_save:
                    self._save_checkpoint()
                eval_time += time.perf_counter() - t_eval
                t0 = time.perf_counter()
            self._emit("step_end")
        train_time += time.perf_counter() - t0
        bar.close()
        files = {}
        if args.save_final:
            if self.is_main:
                save_trainable(self.model, self.run_dir / "adapter")
            dist.barrier()
            files["adapter"] = str(self.run_dir / "adapter")
        if self.best_step is not None and args.save_best:
            files["best"] = str(self.run_dir / "best")
        files["metrics"] = str(self.run_dir / METRICS_NAME)
        model_u = self.unwrapped
        summary = {
            "output_dir": str(self.run_dir),
            "model": describe_model(model_u),
            "trainable_params": sum(p.numel() for p in model_u.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model_u.parameters()),
            "param_groups": self.group_sizes,
            "train_samples": len(self.train_data),
            "eval_samples": len(self.eval_data) if self.eval_data is not None else 0,
            "steps": self.step, "epochs": self._epoch_float(), "global_batch": self.global_batch,
            "resumed_from_step": resumed_from,
            "train_seconds": train_time, "eval_seconds": eval_time,
            "samples_per_second": samples_done / max(1e-9, train_time),
            "device": str(self.device), "precision": self.precision, "world_size": self.world,
            "final_train_loss": last_train_loss,
            "final_eval": self.last_eval, "baseline_eval": self.baseline,
            "metric": args.metric, "best_metric": self.best_metric, "best_step": self.best_step,
            "files": files,
        }
        if self.is_main:
            (self.run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
            if args.summary:
                print(render_summary(summary), flush=True)
        self.summary = summary
        self._emit("train_end")
        return summary

    def _postfix(self, record: dict | None) -> dict:
        post = {}
        if record is not None:
            post["loss"] = f"{record['loss']:.4f}"
            post["samples/s"] = f"{record['samples_per_second']:.1f}"
            self._last_post = post
        post = dict(getattr(self, "_last_post", {}))
        if self.last_eval is not None:
            m = self.args.metric
            value = self.last_eval.get(m)
            if value is not None:
                post[f"eval_{m}"] = f"{100 * value:.2f}%" if m == "accuracy" else f"{value:.4f}"
        return post

    def _eval_and_keep_best(self) -> None:
        result = self.evaluate()
        value = result.get(self.args.metric)
        if value is None:
            raise _error(f"metric {self.args.metric!r} is not among the eval results {sorted(result)}; "
                             "set metric= to one of them")
        better = self.best_metric is None or (value > self.best_metric if self.args.higher_is_better else value < self.best_metric)
        if better:
            self.best_metric, self.best_step = value, self.step
            if self.args.save_best:
                if self.is_main:
                    save_trainable(self.model, self.run_dir / "best")
                dist.barrier()
        self._emit("eval_end")

    def _save_checkpoint(self) -> None:
        state = {
            "step": self.step, "epoch": self._epoch_float(), "best_metric": self.best_metric,
            "best_step": self.best_step, "baseline": self.baseline, "batch_size": self.args.batch_size,
            "grad_accum_steps": self.args.grad_accum_steps, "global_batch": self.global_batch,
            "total_steps": self.total_steps, "seed": self.args.seed,
        }
        save_checkpoint(checkpoint_dir(self.run_dir, self.step), self.model, self.optimizer, self.scheduler,
                        state, self.rank, self.world, self.is_main)

    def _write_run_marker(self) -> None:
        payload = {
            "library": "lava-peft", "version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": describe_model(self.model), "args": self.args.to_dict(), **self.run_info,
        }
        (self.run_dir / RUN_MARKER).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _error(msg: str):
    from ..errors import LavaError

    return LavaError(msg)
