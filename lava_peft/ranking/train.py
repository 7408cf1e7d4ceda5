"""Train a :class:`RankingAdapter` on a :class:`RankingTask` with lava-peft's :class:`~lava_peft.train.Trainer`.

    model = RankingAdapter(*mobilenet_minilm_towers())
    task = build_task("rank-count", n_train=1000, n_eval=400)
    result = train_ranking(model, task, "runs/rank-count", epochs=10)

How it plugs into the Trainer: batches are dicts of tensors with ``labels`` = the float
targets; ``loss_fn`` runs the adapter (all ordered pairs of the batch) and returns the
ranking loss, plus the scores as ``[B, 1]`` "logits" in evaluation, which
``compute_metrics`` turns into PLCC / SRCC / pairwise accuracy / MAE.  The Trainer's
``accuracy`` of an eval record is replaced by the pairwise accuracy (its train records carry
no accuracy for this task).  Progress bars, ``metrics.jsonl``, ``summary.json`` come from the
Trainer; this module adds ``ranking_metrics.json`` and the adapter files.

Frozen towers make their outputs a fixed function of the input, so by default the tower
tokens are computed once (``cache=True``) and the heads train on them: the same numbers as
running the towers every step, far cheaper.  A tower with a trainable adapter is never cached.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import to_image_tensor
from ..errors import LavaConfigError
from ..io import atomic_write_json
from ..train import Trainer, TrainingArguments
from .adapter import RankingAdapter
from .files import save_ranking_adapter
from .loss import ranking_loss
from .metrics import ranking_metrics
from .tasks import RankingTask

__all__ = ["RANKING_METRICS", "make_loss_fn", "make_compute_metrics", "predict", "prepare_split", "train_ranking"]

RANKING_METRICS = "ranking_metrics.json"


@torch.no_grad()
def prepare_split(model: RankingAdapter, images, texts, targets, *, image_size: int = 224, cache: bool = True,
                  batch_size: int = 64, progress: bool = True, desc: str = "tower features",
                  cache_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Trainer data for one split: ``{"pixel_values" | "image_tokens", "input_ids"+"attention_mask" |
    "text_tokens"+"text_mask", "labels"}``.  Cached tokens are kept in ``cache_dtype`` (float32:
    exactly what the towers return; float16 halves the memory at a 2⁻¹¹ relative rounding)."""
    if len(images) != len(texts) or len(texts) != len(targets):
        raise LavaConfigError(f"{len(images)} images, {len(texts)} texts and {len(targets)} targets: give one of each per sample")
    unique = sorted(set(texts))
    enc = model.tokenize(unique)
    which = torch.tensor([unique.index(t) for t in texts])
    pixels = to_image_tensor(images, size=image_size)
    data: dict[str, torch.Tensor] = {"labels": torch.as_tensor(targets, dtype=torch.float32)}
    cache_images = cache and not model._tower_trains(model.image_tower)
    cache_text = cache and not model._tower_trains(model.text_tower)
    device = next(model.parameters()).device
    model.eval()
    if cache_images:
        chunks = []
        for s in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
            chunks.append(model.encode_images(pixels[s:s + batch_size].to(device)).to("cpu", cache_dtype))
        data["image_tokens"] = torch.cat(chunks)
    else:
        data["pixel_values"] = pixels
    if cache_text:
        tokens, mask = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        data["text_tokens"], data["text_mask"] = tokens.to("cpu", cache_dtype)[which], mask.cpu()[which]
    else:
        data["input_ids"], data["attention_mask"] = enc["input_ids"][which], enc["attention_mask"][which]
    return data


def make_loss_fn(config):
    """``loss_fn(model, batch) -> loss`` (training) or ``(loss, scores [B, 1])`` (evaluation)."""

    def loss_fn(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = batch["labels"]
        pairs = model.pair_head is not None and (model.training or len(targets) >= 2)
        out = model(**inputs, with_pairs=pairs)
        loss, _ = ranking_loss(out, targets, config)
        return (loss, None) if model.training else (loss, out.scores.detach()[:, None])

    return loss_fn


def make_compute_metrics(integer_targets: bool):
    def compute_metrics(logits, labels):
        metrics = ranking_metrics(logits[:, 0], labels, integer_targets)
        metrics["accuracy"] = metrics["pairwise_accuracy"]
        return metrics

    return compute_metrics


@torch.no_grad()
def predict(model: RankingAdapter, data: dict[str, torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """Scores ``[N]`` (eval mode, no pairs) of a split made by :func:`prepare_split`."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v for k, v in data.items() if k != "labels"}
    n = len(next(iter(inputs.values())))
    try:
        return torch.cat([model(**{k: v[s:s + batch_size].to(device) for k, v in inputs.items()},
                                with_pairs=False).scores.float().cpu() for s in range(0, n, batch_size)])
    finally:
        model.train(was)


def _eval_batch_size(n: int, wanted: int) -> int:
    """An eval batch size that leaves no final batch of one image (pairs need two)."""
    size = wanted
    while n > size and n % size == 1:
        size += 1
    return size


def train_ranking(model: RankingAdapter, task: RankingTask, output_dir: str | os.PathLike, *, epochs: float = 10,
                  batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
                  image_size: int = 224, cache: bool = True, data: tuple[dict, dict] | None = None,
                  progress: bool = True, summary: bool = True, overwrite: bool = False, device: str = "auto",
                  run_info: dict | None = None) -> dict:
    """Train ``model`` on ``task``; write metrics, the adapter (``<out>/ranking_adapter``) and
    ``ranking_metrics.json``.  ``data``: precomputed ``(train, eval)`` from :func:`prepare_split`
    (the benchmark reuses cached tower tokens across runs).  Returns ``{"eval", "summary", "report",
    "eval_scores"}`` (the final model's scores of the eval split)."""
    if batch_size < 2 and model.pair_head is not None:
        raise LavaConfigError(f"batch_size={batch_size}: the ranking branch needs at least 2 images per batch")
    out = Path(output_dir)
    t0 = time.perf_counter()
    if data is None:
        train = prepare_split(model, task.train_images, task.train_texts, task.train_targets, image_size=image_size,
                              cache=cache, progress=progress, desc="tower features (train)")
        evals = prepare_split(model, task.eval_images, task.eval_texts, task.eval_targets, image_size=image_size,
                              cache=cache, progress=progress, desc="tower features (eval)")
    else:
        train, evals = data
    prep_seconds = time.perf_counter() - t0
    args = TrainingArguments(
        output_dir=str(out), epochs=epochs, batch_size=batch_size, eval_batch_size=_eval_batch_size(len(evals["labels"]), 128),
        lr=lr, weight_decay=weight_decay, schedule="cosine", warmup_ratio=0.05, metric="srcc", greater_is_better=True,
        save_every=0, save_best=False, save_final=False, seed=seed, progress=progress, summary=summary,
        overwrite=overwrite, device=device, log_every=10)
    info = {"task": task.name, "ranking_config": model.config.to_dict(), "cached_tower_tokens": "image_tokens" in train,
            **(run_info or {})}
    trainer = Trainer(model, args, train, evals, loss_fn=make_loss_fn(model.config),
                      compute_metrics=make_compute_metrics(task.integer_targets), run_info=info)
    result = trainer.train()
    final = dict(trainer.last_eval or trainer.evaluate(log=False))
    save_ranking_adapter(model, out / "ranking_adapter", {"task": task.name, "instruction_examples": sorted(set(task.eval_texts))[:3]})
    report = {"task": task.name, "eval": final, "prep_seconds": prep_seconds, "train_seconds": result["train_seconds"],
              "trainable_params": result["trainable_params"], "config": model.config.to_dict(), "seed": seed,
              "epochs": epochs, "batch_size": batch_size, "lr": lr}
    atomic_write_json(out / RANKING_METRICS, json.loads(json.dumps(report, default=float)))
    return {"eval": final, "summary": result, "report": report, "eval_scores": predict(model, evals)}
