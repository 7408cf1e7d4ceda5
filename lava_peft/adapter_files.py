"""The adapter directory on disk: the one reader and the one writer.

A lava-peft adapter directory holds ``adapter_config.json`` (the payload: library and format
versions, ``method``, ``config``, ``base_model_fingerprint``) and ``adapter_model.safetensors``
(per adapted module ``<module path>.<tensor>``; ``modules_to_save`` copies as
``<module path>.__saved__.<tensor>``).  HF PEFT directories use the same two file names with
PEFT's own content.  Every part of the library that reads or writes such a directory —
``save_pretrained`` / ``load_adapter`` / ``from_pretrained``, hot-swap, ``import_peft`` /
``export_peft``, `lava inspect` — goes through :func:`read_adapter_dir` /
:func:`write_adapter_dir`; the atomic writes and safe reads themselves are :mod:`lava_peft.io`'s.
Only safetensors and JSON are ever read (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._version import __version__
from .config import FORMAT_VERSION, AdapterConfig, config_from_payload
from .errors import AdapterFileError
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_json,
    json_from_bytes,
    read_adapter_files,
    tensors_from_bytes,
)

SAVED_MARKER = "__saved__"
"""Key infix of ``modules_to_save`` tensors: ``<module>.__saved__.<param>``."""


def saved_key(path: str, key: str) -> str:
    """The file key of tensor ``key`` of the ``modules_to_save`` copy at ``path``."""
    return f"{path}.{SAVED_MARKER}.{key}"


def split_saved_key(key: str) -> tuple[str, str] | None:
    """``(module path, tensor name)`` of a ``modules_to_save`` key, or ``None`` for an adapter tensor."""
    module, marker, param = key.partition(f".{SAVED_MARKER}.")
    return (module, param) if marker else None


@dataclass
class AdapterDirectory:
    """What :func:`read_adapter_dir` found: the JSON payload, the parsed config (lava-peft format
    only) and the tensors (when asked for).

    Both files are read together, as one consistent set (verified against the folder's
    manifest when it has one, :func:`lava_peft.io.read_adapter_files`): :meth:`read_tensors`
    parses the weights read with the config, never a newer file written in between.
    """

    directory: Path
    payload: dict
    config: AdapterConfig | None = None
    tensors: dict[str, torch.Tensor] | None = None
    weights_bytes: bytes | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def read_tensors(self, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
        """The validated tensors of the weights file (floating and finite, see :mod:`lava_peft.io`)."""
        if self.tensors is None:
            if self.weights_bytes is None:
                raise AdapterFileError(
                    f"no adapter weights at {self.weights_path}; expected {WEIGHTS_NAME} next to {CONFIG_NAME}"
                )
            self.tensors = tensors_from_bytes(self.weights_bytes, self.weights_path, allow_nonfinite=allow_nonfinite)
        return self.tensors


def read_adapter_dir(directory, *, kind: str = "adapter", parse_config: bool = True,
                     load_tensors: bool = True, allow_nonfinite: bool = False) -> AdapterDirectory:
    """Read an adapter directory (refusing a missing one with a clear :class:`AdapterFileError`).

    ``parse_config``: the payload is a lava-peft one and becomes an :class:`AdapterConfig`
    (``False`` for HF PEFT directories).  ``load_tensors``: also parse the safetensors file now
    (otherwise :meth:`AdapterDirectory.read_tensors` does it on demand, from the same read).
    ``kind`` names the directory in errors (``"adapter"``, ``"PEFT adapter"``).
    ``allow_nonfinite``: accept NaN/Inf values in the weights (refused by default).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{kind} directory {directory} does not exist")
    read = read_adapter_files(directory, (CONFIG_NAME, WEIGHTS_NAME))
    if CONFIG_NAME not in read.files:
        raise AdapterFileError(
            f"no adapter config at {directory / CONFIG_NAME}; expected the directory written by save_pretrained()"
        )
    payload = json_from_bytes(read.files[CONFIG_NAME], directory / CONFIG_NAME)
    found = AdapterDirectory(directory, payload, weights_bytes=read.files.get(WEIGHTS_NAME))
    if parse_config:
        found.config = config_from_payload(payload, str(directory / CONFIG_NAME))
    if load_tensors:
        found.read_tensors(allow_nonfinite)
    return found


def read_adapter_tensors(directory) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s ``adapter_model.safetensors`` (read as in :func:`read_adapter_dir`)."""
    return read_adapter_dir(directory, parse_config=False, load_tensors=False).read_tensors()


def read_tensor_index(weights_path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """``(metadata, {key: (shape, dtype)})`` of a safetensors file, from its header only (no tensor
    data is read); a file that is not safetensors raises :class:`AdapterFileError`."""
    from safetensors import safe_open

    index = {}
    try:
        with safe_open(str(weights_path), "pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                index[key] = (list(sl.get_shape()), sl.get_dtype())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise AdapterFileError(f"{weights_path} cannot be read as safetensors ({exc}); the file is corrupt or "
                               "truncated") from None
    return metadata, index


def adapter_payload(config: AdapterConfig, fingerprint: dict) -> dict:
    """The ``adapter_config.json`` content of a lava-peft adapter."""
    return {
        "library": "lava-peft",
        "library_version": __version__,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_dict(),
        "base_model_fingerprint": fingerprint,
    }


def adapter_metadata(config: AdapterConfig) -> dict[str, str]:
    """The safetensors header metadata of a lava-peft adapter file."""
    return {"format": "pt", "library": "lava-peft", "format_version": str(FORMAT_VERSION), "method": config.method}


def write_adapter_dir(directory, payload: dict, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` as one unit.

    Both files are staged, fsync'd and switched in together (:func:`lava_peft.io.atomic_directory`:
    a manifest with each file's sha256, renamed last, under a per-directory lock): a reader sees
    the previous complete pair or the new one, never new weights with an old config, even if the
    writer is killed or two processes save to the same directory at once.
    """
    with atomic_directory(directory) as staging:
        atomic_save_safetensors(tensors, staging / WEIGHTS_NAME, metadata if metadata is not None else {"format": "pt"})
        atomic_write_json(staging / CONFIG_NAME, payload)


FULL_WEIGHTS_NAME = "model.safetensors"
"""The weights file of a directory of plain trained tensors (a model trained without an adapter)."""


def write_weights_dir(directory, tensors: dict[str, torch.Tensor], name: str = FULL_WEIGHTS_NAME) -> None:
    """Write ``tensors`` as ``directory/name`` (safetensors), switched in as one unit like
    :func:`write_adapter_dir` (manifest with sha256, per-directory lock)."""
    with atomic_directory(directory) as staging:
        atomic_save_safetensors(tensors, Path(staging) / name, {"format": "pt", "library": "lava-peft"})


def read_weights_dir(directory, name: str = FULL_WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """The validated tensors of ``directory/name`` written by :func:`write_weights_dir` (verified
    against the folder's manifest when it has one)."""
    directory = Path(directory)
    files = read_adapter_files(directory, (name,)).files
    if name not in files:
        raise AdapterFileError(f"no {name} in {directory}; the folder is incomplete or holds something else")
    return tensors_from_bytes(files[name], directory / name)


__all__ = [
    "AdapterDirectory",
    "FULL_WEIGHTS_NAME",
    "CONFIG_NAME",
    "SAVED_MARKER",
    "WEIGHTS_NAME",
    "adapter_metadata",
    "adapter_payload",
    "read_adapter_dir",
    "read_adapter_tensors",
    "read_tensor_index",
    "read_weights_dir",
    "saved_key",
    "split_saved_key",
    "write_adapter_dir",
    "write_weights_dir",
]
