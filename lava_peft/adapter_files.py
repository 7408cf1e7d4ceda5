"""The adapter directory on disk: the one reader and the one writer.

A lava-peft adapter directory holds ``adapter_config.json`` (the payload: library and format
versions, ``method``, ``config``, ``base_model_fingerprint``, ``layout``) and
``adapter_model.safetensors`` in one of two layouts:

* ``"lava-peft"`` (every format-1 file; methods PEFT cannot represent): per adapted module
  ``<module path>.<tensor>``, ``modules_to_save`` copies as ``<module path>.__saved__.<tensor>``;
* ``"peft"`` (format 2, adapters PEFT computes identically: LoRA, LAVA on Linear/Embedding): HF PEFT
  LoRA's own keys (``base_model.model.<path>.lora_A.weight`` ...) and, next to our fields, PEFT's
  config fields, so ``peft.PeftModel.from_pretrained`` and transformers' ``load_adapter`` read the
  folder as it is; ``peft_keys`` names our tensor behind PEFT's ``lora_A``/``lora_B``.

Reading a lava-peft folder always gives tensors in the ``"lava-peft"`` key layout
(:meth:`AdapterDirectory.read_tensors`), whatever the file holds.  HF PEFT directories use the
same two file names with PEFT's own content.  Every part of the library that reads or writes such a directory —
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
from .config import FORMAT_VERSION, AdapterConfig
from .config_payload import config_from_payload
from .errors import AdapterFileError
from .methods.sparse import index_dtype
from .peft_common import LORA_KEY, PREFIX, SHIRA_KEY, lora_factor_role, shira_flat_indices
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
        """The validated tensors of the weights file (floating and finite, see :mod:`lava_peft.io`); for a
        lava-peft folder (``config`` parsed) keyed in the ``"lava-peft"`` layout whatever the file's layout."""
        if self.tensors is None:
            if self.weights_bytes is None:
                raise AdapterFileError(
                    f"no adapter weights at {self.weights_path}; expected {WEIGHTS_NAME} next to {CONFIG_NAME}"
                )
            tensors = tensors_from_bytes(self.weights_bytes, self.weights_path, allow_nonfinite=allow_nonfinite)
            layout = tensor_layout(self.payload, self.config_path) if self.config is not None else LAYOUT_LAVA
            if layout == LAYOUT_PEFT:
                tensors = {lava_key(k, self.payload, self.weights_path): v.reshape(v.shape[0], -1)
                           if LORA_KEY.fullmatch(k[len(PREFIX):]) else v for k, v in tensors.items()}
            elif layout == LAYOUT_PEFT_SHIRA:
                tensors = shira_lava_tensors(tensors, self.payload, self.weights_path)
            self.tensors = tensors
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


def adapter_payload(config: AdapterConfig, fingerprint: dict, peft_fields: dict | None = None,
                    peft_keys: dict[str, str] | None = None, layout: str | None = None) -> dict:
    """The ``adapter_config.json`` content of a lava-peft adapter: ours only (``"lava-peft"`` layout), or PEFT's
    config fields ``peft_fields`` plus ours (``"peft"`` layout, ``peft_keys``: PEFT tensor name -> ours; or
    ``layout="peft-shira"``: PEFT's SHiRA keys, no ``peft_keys``)."""
    ours = {
        "library": "lava-peft",
        "library_version": __version__,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_dict(),
        "base_model_fingerprint": fingerprint,
        "layout": layout or (LAYOUT_LAVA if peft_fields is None else LAYOUT_PEFT),
    }
    if peft_fields is None:
        return ours
    return {**peft_fields, **ours, **({"peft_keys": dict(peft_keys)} if peft_keys is not None else {})}


LAYOUT_LAVA, LAYOUT_PEFT, LAYOUT_PEFT_SHIRA = "lava-peft", "peft", "peft-shira"
_LAYOUTS_SINCE = {LAYOUT_LAVA: 1, LAYOUT_PEFT: 2, LAYOUT_PEFT_SHIRA: 3}
"""The format version that introduced each layout."""


def tensor_layout(payload: dict, source) -> str:
    """The key layout of a lava-peft folder's weights (format 1: always ``"lava-peft"``; ``"peft"`` since format 2,
    ``"peft-shira"`` since format 3)."""
    version = payload.get("format_version", 1)
    layout = payload.get("layout", LAYOUT_LAVA) if version >= 2 else LAYOUT_LAVA
    if _LAYOUTS_SINCE.get(layout, FORMAT_VERSION + 1) > version:
        known = [name for name, since in _LAYOUTS_SINCE.items() if since <= version]
        raise AdapterFileError(f"{source}: layout must be one of {known} in format {version}; got {layout!r}")
    if layout == LAYOUT_PEFT:
        keys = payload.get("peft_keys")
        if not (isinstance(keys, dict) and set(keys) == {"lora_A", "lora_B"}
                and all(isinstance(v, str) for v in keys.values())):
            raise AdapterFileError(f"{source}: a 'peft' layout needs peft_keys {{'lora_A': ..., 'lora_B': ...}}; "
                                   f"got {keys!r}. The file is corrupt: save the adapter again")
    return layout


def lava_key(file_key: str, payload: dict, source) -> str:
    """The ``"lava-peft"``-layout key of a key of a ``"peft"``-layout file: ``<path>.<our tensor>`` for a LoRA tensor,
    :func:`saved_key` for a ``modules_to_save`` tensor (its module from the payload's ``modules_to_save``)."""
    if not file_key.startswith(PREFIX):
        raise AdapterFileError(f"{source}: key {file_key!r} does not start with {PREFIX!r} (a 'peft' layout file)")
    rest = file_key[len(PREFIX):]
    match = LORA_KEY.fullmatch(rest)
    if match:
        path, peft_name = match.groups()
        ours = payload["peft_keys"]["lora_A" if lora_factor_role(peft_name) == "down" else "lora_B"]
        return f"{path}.{ours}"
    owners = [m for m in payload.get("modules_to_save") or [] if isinstance(m, str) and rest.startswith(m + ".")]
    if not owners:
        raise AdapterFileError(f"{source}: tensor {file_key!r} is neither a LoRA tensor nor part of a saved module")
    owner = max(owners, key=len)
    return saved_key(owner, rest[len(owner) + 1:])


def shira_lava_tensors(tensors: dict[str, torch.Tensor], payload: dict, source) -> dict[str, torch.Tensor]:
    """A ``"peft-shira"`` file's tensors in the ``"lava-peft"`` layout: per module ``<path>.sparse_values`` (PEFT's
    ``shira_weight``) and ``<path>.sparse_indices`` (the flat row-major indices of PEFT's (row, column) pairs,
    with the weight's ``in`` size from the fingerprint, in the adapter's index dtype)."""
    shapes = (payload.get("base_model_fingerprint") or {}).get("modules") or {}
    out = {}
    for key, value in tensors.items():
        match = SHIRA_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        shape = shapes.get(match.group(1)) if match else None
        if match is None or not (isinstance(shape, list) and len(shape) == 2):
            raise AdapterFileError(f"{source}: key {key!r} is not a PEFT SHiRA tensor of a module in the fingerprint")
        path, name = match.groups()
        if name == "shira_weight":
            out[f"{path}.sparse_values"] = value
        elif value.dim() != 2 or value.shape[0] != 2 or value.is_floating_point():
            raise AdapterFileError(f"{source}: {key} must be (2, nnz) integer (row, column) pairs; got {tuple(value.shape)}")
        else:
            out[f"{path}.sparse_indices"] = shira_flat_indices(value, shape[1]).to(index_dtype(shape[0] * shape[1]))
    return out


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
    "LAYOUT_PEFT_SHIRA",
    "adapter_metadata",
    "adapter_payload",
    "lava_key",
    "tensor_layout",
    "read_adapter_dir",
    "read_adapter_tensors",
    "read_tensor_index",
    "read_weights_dir",
    "saved_key",
    "split_saved_key",
    "write_adapter_dir",
    "write_weights_dir",
]
