"""Classification tasks on a user's own data: a table of labelled texts or a folder of images.

:func:`build_user_task` returns the same kind of :class:`~lava_peft.train.tasks.Task` as the
packaged data sets (a model with a fresh head + train/eval tensors), so the
:class:`~lava_peft.train.Trainer` and ``lava train`` run it unchanged.  It also carries the
label mapping (:class:`~lava_peft.data.labelled.LabelMap`), which ``run_info`` stores in
``run.json`` and which Hugging Face models get as ``config.id2label`` (so a merged model
keeps the class names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.image_folder import is_image_folder, list_image_folder, load_images
from ..data.labelled import LabelMap, LabelledTexts, labelled_texts, split_indices
from ..data.user_files import UserDataError, read_split_tables, read_table
from .tasks import Task, load_text_model, load_vision_model, model_kind

__all__ = ["UserTask", "build_user_task", "is_user_data_path", "label_map_of_run"]

PACKAGED = ("rotten_tomatoes", "fashion_mnist", "digits")


@dataclass
class UserTask(Task):
    """A :class:`Task` on user data, with its label mapping and a description of the data."""

    label_map: LabelMap | None = None
    data_info: dict = field(default_factory=dict)

    @property
    def run_info(self) -> dict:
        """What ``run.json`` keeps: ``{"labels": {...}, "user_data": {...}}``."""
        info = {"user_data": self.data_info}
        if self.label_map is not None:
            info["labels"] = self.label_map.to_json()
        return info


def is_user_data_path(data: str) -> bool:
    """``--data`` names a file or folder (not one of the packaged data sets)."""
    return data not in PACKAGED


def label_map_of_run(run_dir: str | Path) -> LabelMap:
    """The label mapping saved in a run's ``run.json``."""
    import json

    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserDataError(f"{run_dir} has no run.json; give the directory of a `lava train` run")
    info = json.loads(path.read_text())
    if "labels" not in info:
        raise UserDataError(f"{path} holds no label mapping: the run was not trained on user data")
    return LabelMap.from_json(info["labels"])


def _take(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """At most ``limit`` of ``indices``: a seeded random subset, kept in file order."""
    if not limit or limit >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))[:limit]
    return [indices[i] for i in sorted(pick.tolist())]


def _subset(texts: LabelledTexts, idx: list[int]) -> LabelledTexts:
    return LabelledTexts([texts.texts[i] for i in idx], None if texts.pairs is None else [texts.pairs[i] for i in idx],
                         [texts.labels[i] for i in idx], [texts.places[i] for i in idx])


def _tokenize(tok, texts: LabelledTexts, label_map: LabelMap, max_len: int) -> dict[str, torch.Tensor]:
    args = (texts.texts,) if texts.pairs is None else (texts.texts, texts.pairs)
    enc = tok(*args, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    out = dict(enc.items())
    out["labels"] = texts.encoded(label_map)
    return out


def build_user_task(model: str, data: str, eval_data: str | None = None, *, text_column: str = "text",
                    label_column: str = "label", pair_column: str | None = None, eval_split: float = 0.1,
                    n_train: int | None = None, n_eval: int | None = None, seed: int = 0, max_len: int = 64,
                    image_size: int = 64, dropout: float | None = None) -> UserTask:
    """``model`` with a fresh head for the classes in ``data`` (table file, saved data set or image
    folder), and the train/held-out tensors.  Held-out rows come from ``eval_data``, else from a
    ``validation``/``test`` split of a saved ``DatasetDict``, else a seeded ``eval_split`` fraction."""
    kind, key = model_kind(model)
    if key == "merged":
        raise UserDataError(f"{model} is a vision model merged by `lava merge` for a packaged data set; train user "
                            "images on mobilenet_v2, craft_vgg16_bn or small_cnn")
    if is_image_folder(data):
        if kind != "vision":
            raise UserDataError(f"{data} is an image folder but model {model!r} is a text model; use mobilenet_v2, "
                                "craft_vgg16_bn or small_cnn")
        return _image_task(model, key, data, eval_data, eval_split, n_train, n_eval, seed, image_size)
    if kind != "text":
        raise UserDataError(f"{data} is a table of texts but model {model!r} is a vision model; give an image folder "
                            "(one sub-folder per class) or a text model")
    train_table, heldout = read_split_tables(data)
    source = "--eval-data" if eval_data else ("the saved validation split" if heldout is not None else None)
    if eval_data:
        heldout = read_table(eval_data)
    texts = labelled_texts(train_table, text_column, label_column, pair_column)
    if heldout is None:
        train_idx, eval_idx = split_indices(len(texts), eval_split, seed, train_table.source)
        train, held = _subset(texts, train_idx), _subset(texts, eval_idx)
        source = f"a seeded {eval_split:.0%} split of {data}"
    else:
        train, held = texts, labelled_texts(heldout, text_column, label_column, pair_column)
    label_map = LabelMap.from_values(train.labels, f"{train_table.source} (training rows)")
    for value, where in zip(held.labels, held.places):  # unseen held-out labels: an error before any loading
        label_map.encode(value, where)
    train = _subset(train, _take(list(range(len(train))), n_train, seed))
    held = _subset(held, _take(list(range(len(held))), n_eval, seed))
    net, tok, path = load_text_model(model, label_map.num_classes, dropout)
    net.config.id2label = dict(enumerate(label_map.names))
    net.config.label2id = {name: i for i, name in enumerate(label_map.names)}
    info = {"data": str(data), "eval_data": eval_data, "held_out": source, "text_column": text_column,
            "label_column": label_column, "text_pair_column": pair_column, "train_rows": len(train),
            "eval_rows": len(held)}
    return UserTask(net, "text", key, _tokenize(tok, train, label_map, max_len), _tokenize(tok, held, label_map, max_len),
                    tokenizer=tok, model_path=path, label_map=label_map, data_info=info)


def _image_task(model, key, data, eval_data, eval_split, n_train, n_eval, seed, image_size) -> UserTask:
    files, labels, names = list_image_folder(data)
    if eval_data:
        eval_files, eval_labels, _ = list_image_folder(eval_data, names)
        train_idx, eval_idx = list(range(len(files))), None
        source = "--eval-data"
    else:
        train_idx, eval_idx = split_indices(len(files), eval_split, seed, str(data))
        eval_files, eval_labels = [files[i] for i in eval_idx], [labels[i] for i in eval_idx]
        source = f"a seeded {eval_split:.0%} split of {data}"
    train_idx = _take(train_idx, n_train, seed)
    train_labels = [labels[i] for i in train_idx]
    if len(set(train_labels)) < 2:
        raise UserDataError(f"{data}: the training images cover {len(set(train_labels))} class(es); a classifier "
                            "needs at least two (add images to the other class folders)")
    keep = _take(list(range(len(eval_files))), n_eval, seed)
    eval_files, eval_labels = [eval_files[i] for i in keep], [eval_labels[i] for i in keep]
    label_map = LabelMap(names)
    train = {"x": load_images([files[i] for i in train_idx], image_size), "labels": torch.tensor(train_labels)}
    held = {"x": load_images(eval_files, image_size), "labels": torch.tensor(eval_labels)}
    info = {"data": str(data), "eval_data": eval_data, "held_out": source, "train_rows": len(train_idx),
            "eval_rows": len(eval_files), "image_size": image_size}
    return UserTask(load_vision_model(model, len(names)), "vision", key, train, held, label_map=label_map, data_info=info)
