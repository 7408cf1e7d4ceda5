"""Saving and loading an :class:`~lava_peft.model.AdaptedModel`'s adapters (a mixin of the model).

The adapter directory itself (atomic writes, manifest, the two file names) is
:mod:`lava_peft.adapter_files`'; this module decides what goes into it for one adapter and
checks a directory against the model before anything changes (fingerprint, keys, shapes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .adapter_files import (
    LAYOUT_PEFT_SHIRA,
    adapter_metadata,
    adapter_payload,
    lava_key,
    read_adapter_dir,
    saved_key,
    split_saved_key,
    write_adapter_dir,
)
from .base_init_files import (
    check_loadable,
    check_original_base,
    converted_config,
    converted_peft_fields,
    converted_state,
    initial_factors_from_dir,
    initial_factors_from_model,
    saved_base_note,
    warn_unreloadable,
)
from .errors import AdapterFileError
from .fingerprint import base_fingerprint, check_base_fingerprint
from .inject import adapted_layers, saved_module_wrappers
from .io import check_tensors_match
from .layers import ConvOps, GPT2Conv1DOps, LinearOps, SavedModuleWrapper
from .methods.base import ModuleAdapter
from .methods.factors import factor_codec
from .peft_common import (LORA_KEY, PREFIX, SHIRA_KEY, conv_matches_peft, lora_config_fields, lora_tensors,
                          shira_config_fields, shira_flat_indices, shira_tensors)


class AdapterFiles:
    """``save_pretrained`` / ``load_adapter`` and the state they read and write (mixed into ``AdaptedModel``)."""

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one adapter, keyed as in the file (see docs/format.md).

        Under FSDP2 (``fully_shard``) sharded tensors are gathered (``DTensor.full_tensor()``,
        a collective): call it on every rank.
        """
        name = adapter_name or self.active_adapter
        self.check_known(name)
        state = {}
        for path, adapter in self.adapter_layers(name):
            for key, value in adapter.state_dict().items():
                state[f"{path}.{key}"] = _full(value)
        for path, wrapper in saved_module_wrappers(self.model):
            if name in wrapper.copies:
                for key, value in wrapper.copies[name].state_dict().items():
                    state[saved_key(path, key)] = _full(value)
        return state

    def peft_layout(self, adapter_name: str) -> tuple[dict[str, str], dict] | None:
        """``(peft_keys, PEFT config fields)`` when HF PEFT computes adapter ``adapter_name`` exactly as a PEFT
        LoRA (``save_pretrained`` then writes PEFT's layout), else ``None`` (our layout).

        Exact means: every layer's file tensors are precisely its two factors (``ΔW = s·up@down`` read
        through the method's codec: LoRA, LAVA on Linear/Conv1D/Embedding), on convs PEFT runs the same
        way (no dilation or groups, zero padding), and the saved modules are ones PEFT wraps alone.
        """
        config = self.peft_config[adapter_name]
        codec = factor_codec(config.method)
        if codec is None or config.peft_export is not None or config.peft_export_refusal is not None:
            return None
        keys, ranks, alphas, fan_in_fan_out = None, {}, {}, False
        for path, layer in adapted_layers(self.model):
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            factors = codec.read(adapter, scaled=False)
            by_id = {id(t): k for k, t in adapter.state_dict(keep_vars=True).items()}
            if factors.is_cp or len(by_id) != 2 or not {id(factors.up), id(factors.modes[0])} <= set(by_id):
                return None
            pair = {"lora_A": by_id[id(factors.modes[0])], "lora_B": by_id[id(factors.up)]}
            if keys not in (None, pair) or (isinstance(layer.ops, ConvOps) and not conv_matches_peft(layer.base_layer)):
                return None
            keys, r = pair, factors.rank
            fan_in_fan_out = fan_in_fan_out or isinstance(layer.ops, GPT2Conv1DOps)
            ranks[path] = r
            exact = r == adapter.r and config.scale_for(path) == adapter.scale
            alphas[path] = float(config.alpha_for(path)) if exact else adapter.scale * (
                math.sqrt(r) if config.use_rslora else r)
        saved = [p for p, w in saved_module_wrappers(self.model) if adapter_name in w.copies]
        names = [n for n, _ in self.model.named_modules()]
        clash = any(n != s and n.endswith("." + s) and ".copies." not in n for s in saved for n in names)
        if not ranks or clash or any(p == s or p.startswith(s + ".") for p in ranks for s in saved):
            return None
        fields = lora_config_fields(ranks, alphas, use_rslora=config.use_rslora, dropout=config.dropout,
                                    fan_in_fan_out=fan_in_fan_out, saved=saved,
                                    base_model_name_or_path=config.base_model_name_or_path, task_type=config.task_type)
        if saved_base_note(config):  # PiSSA / OLoRA: PEFT re-derives the residual on load, as we do
            fields["init_lora_weights"] = config.init
        return keys, fields

    def peft_shira_layout(self, adapter_name: str, scaled: bool = False) -> tuple[dict | None, str | None]:
        """``(PEFT SHiRA config fields, None)`` when HF PEFT's SHiRA computes adapter ``adapter_name`` exactly, else
        ``(None, why)``.  Exact means: a ``"shira"`` adapter on ``nn.Linear`` layers only, each with PEFT's budget
        ``r·(O + I)`` for one ``r``, no ``modules_to_save``; and, unless ``scaled`` (an export, where ``α`` is folded
        into PEFT's values), ``α = 1`` on every layer, so that the file's values are ours bit for bit."""
        config = self.peft_config[adapter_name]
        if config.method != "shira":
            return None, f"adapter {adapter_name!r} is a {config.method!r} adapter, not SHiRA"
        if config.modules_to_save:
            return None, f"adapter {adapter_name!r} has modules_to_save {config.modules_to_save}; PEFT SHiRA has none"
        ranks = {}
        for path, layer in adapted_layers(self.model):
            if adapter_name not in layer.adapters:
                continue
            if type(layer.ops) is not LinearOps or type(layer.base_layer) is not torch.nn.Linear:
                return None, f"{path} is a {type(layer.base_layer).__name__}; PEFT SHiRA adapts nn.Linear only"
            per_rank = layer.spec.out_dim + layer.spec.in_dim
            count = layer.adapters[adapter_name].sparse_indices.numel()
            if count % per_rank:
                return None, f"{path} has {count} entries, not r·(O + I) = r·{per_rank}; PEFT SHiRA sizes every layer by r"
            if not scaled and layer.adapters[adapter_name].scale != 1.0:
                return None, f"{path} has alpha {layer.adapters[adapter_name].scale}; PEFT SHiRA has no scale"
            ranks[path] = count // per_rank
        if len(set(ranks.values())) != 1:
            return None, (f"adapter {adapter_name!r} has per-layer budgets (r = {sorted(set(ranks.values()))}); PEFT "
                          "SHiRA has one r for every layer")
        return shira_config_fields(ranks, config.seed, config.base_model_name_or_path, config.task_type), None

    def _to_peft_shira_keys(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in adapted_layers(self.model):
            if adapter_name in layer.adapters:
                indices, values = state.pop(f"{path}.sparse_indices"), state.pop(f"{path}.sparse_values")
                out.update(shira_tensors(path, layer.spec.in_dim, indices, values))
        return out

    def _to_peft_keys(self, adapter_name: str, state: dict[str, torch.Tensor], keys: dict[str, str]) -> dict:
        out = {}
        for path, layer in adapted_layers(self.model):
            if adapter_name in layer.adapters:
                up, down = state.pop(f"{path}.{keys['lora_B']}"), state.pop(f"{path}.{keys['lora_A']}")
                out.update(lora_tensors(path, layer.ops, layer.spec, up, down))
        for key, value in state.items():
            module, param = split_saved_key(key)
            out[f"{PREFIX}{module}.{param}"] = value
        return {k: v.contiguous() for k, v in out.items()}

    def adapter_file_tensors(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter_name``, keyed as in the file (PEFT's keys for
        adapters PEFT can represent, :meth:`peft_layout`)."""
        name = adapter_name or self.active_adapter
        state = self.adapter_state_dict(name)
        layout = self.peft_layout(name)
        if layout is None and self.peft_shira_layout(name)[0] is not None:
            return self._to_peft_shira_keys(name, state)
        return state if layout is None else self._to_peft_keys(name, state, layout[0])

    def load_adapter_file_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors keyed as in :meth:`adapter_file_tensors` (or as in :meth:`adapter_state_dict`) into the
        existing adapter (every key and shape checked first: :class:`AdapterFileError` names the differences)."""
        self.check_known(adapter_name)
        tensors = dict(tensors)
        layout = self.peft_layout(adapter_name)
        if any(SHIRA_KEY.fullmatch(k[len(PREFIX):]) for k in tensors if k.startswith(PREFIX)):
            tensors = shira_state_from_peft(self, adapter_name, tensors)
        elif layout is not None and any(k.startswith(PREFIX) for k in tensors):
            payload = {"peft_keys": layout[0], "modules_to_save": layout[1]["modules_to_save"]}
            tensors = {lava_key(k, payload, "the state dict"): v.reshape(v.shape[0], -1)
                       if LORA_KEY.fullmatch(k[len(PREFIX):]) else v for k, v in tensors.items()}
        check_tensors_match(self.adapter_state_dict(adapter_name), tensors, f"the state dict of {adapter_name!r}")
        self.load_adapter_tensors(adapter_name, tensors)

    def base_fingerprint(self, adapter_name: str | None = None) -> dict:
        """What a saved adapter records about its base layers: shapes and the sha256 of their weights."""
        return base_fingerprint(self.model, adapter_name or self.active_adapter)

    def save_pretrained(self, save_directory: str, adapter_name: str | Sequence[str] | None = None,
                        is_main_process: bool | None = None, *, selected_adapters: Sequence[str] | None = None,
                        safe_serialization: bool = True, convert_pissa_to_lora: bool = False,
                        path_initial_model_for_weight_conversion: str | None = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically).

        ``adapter_name=None`` saves every adapter: ``"default"`` in ``save_directory``
        itself, each other adapter in ``save_directory/<name>`` (the HF PEFT layout).
        ``selected_adapters`` (PEFT's keyword) saves those adapters in that layout; ``adapter_name``
        (ours) puts a single adapter in ``save_directory`` whatever its name.
        ``safe_serialization=False`` (a pickle ``adapter_model.bin``) is refused: only safetensors are written.

        Distributed training: call it on every rank; only the main process writes
        (``is_main_process``; default: rank 0 when ``torch.distributed`` is initialized).
        Every rank takes part in gathering FSDP-sharded adapters.

        A PiSSA / OLoRA adapter (``init="pissa"``, ...) is saved as it is (to be loaded onto the original base,
        which loading turns into the residual again, as in PEFT), or converted to a plain rank-``2r`` LoRA on the
        original base (:mod:`lava_peft.base_init_files`): ``convert_pissa_to_lora=True`` uses the initial factors
        the adapter kept, ``path_initial_model_for_weight_conversion`` (PEFT's keyword) reads them from the folder
        saved right after initialisation.
        """
        if is_main_process is None:
            dist = torch.distributed
            is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

        if safe_serialization is not True:
            raise AdapterFileError(
                "save_pretrained(safe_serialization=False) would write a pickle (adapter_model.bin); lava-peft writes "
                "only adapter_model.safetensors, which PEFT and transformers read as well. Drop the argument"
            )
        if selected_adapters is not None:
            if adapter_name is not None:
                raise AdapterFileError("pass adapter_name= or selected_adapters=, not both")
            names = self.check_known(selected_adapters)
            targets = {n: Path(save_directory) if n == "default" else Path(save_directory) / n for n in names}
        elif adapter_name is None:
            names = list(self.peft_config)
            targets = {n: Path(save_directory) if n == "default" or len(names) == 1 else Path(save_directory) / n for n in names}
        else:
            names = self.check_known(adapter_name)
            targets = {n: Path(save_directory) if len(names) == 1 else Path(save_directory) / n for n in names}
        convert = convert_pissa_to_lora or path_initial_model_for_weight_conversion is not None
        for name, directory in targets.items():
            if directory.exists() and not directory.is_dir():
                raise AdapterFileError(f"{directory} exists and is not a directory; choose another save_directory")
            config = self.peft_config[name]
            state = self.adapter_state_dict(name)  # on every rank: gathering sharded tensors is collective
            layout = self.peft_layout(name)
            if convert:
                layers = self.adapter_layers(name)
                initial = (initial_factors_from_model(layers, name) if path_initial_model_for_weight_conversion is None
                           else initial_factors_from_dir(path_initial_model_for_weight_conversion, layers))
                state = converted_state(layers, state, initial)
                layout = None if layout is None else (layout[0], converted_peft_fields(layout[1], config.use_rslora))
                config = converted_config(config)
            else:
                warn_unreloadable(config, directory)
            shira_fields = self.peft_shira_layout(name)[0] if layout is None else None
            if shira_fields is not None:  # PEFT's SHiRA layout (format 3)
                payload = adapter_payload(config, self.base_fingerprint(name), shira_fields, layout=LAYOUT_PEFT_SHIRA)
                state = self._to_peft_shira_keys(name, state)
            elif layout is None:
                payload = adapter_payload(config, self.base_fingerprint(name))
            else:
                payload = adapter_payload(config, self.base_fingerprint(name), layout[1], layout[0])
                state = self._to_peft_keys(name, state, layout[0])
            payload.update(saved_base_note(config))
            if is_main_process:
                write_adapter_dir(directory, payload, state, adapter_metadata(config))

    def check_fingerprint(self, fp: dict, source: str, strict_base: bool = False, module_kind: bool = False) -> list[str]:
        """Refuse (changing nothing) a base model that does not fit a saved ``base_model_fingerprint``: module
        names and shapes (``module_kind``: a module adapter's targets, ``[type, in, out]``), and with
        ``strict_base`` the weights' sha256; returns the adapted module paths."""
        return check_base_fingerprint(self.model, fp, source, strict_base, module_kind)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     allow_nonfinite: bool = False, strict_base: bool = False) -> None:
        """Load a saved adapter as ``adapter_name`` (inactive; ``set_adapter`` activates it).

        Everything is checked before the model changes: the config's fields and types, the base
        model's fingerprint (module names and weight shapes; with ``strict_base=True`` also the
        sha256 of every targeted base weight's bytes), every tensor's key, shape and dtype, and that
        values are finite (``allow_nonfinite=True`` accepts NaN/Inf, e.g. to inspect a diverged run).
        """
        files = read_adapter_dir(model_id, load_tensors=False)
        directory, config = files.directory, files.config
        self.check_new_name(adapter_name)
        fingerprint = files.payload.get("base_model_fingerprint")
        target_names = self.check_fingerprint(fingerprint, str(directory), strict_base,
                                              issubclass(config.adapter_type(), ModuleAdapter))
        if check_loadable(config, str(directory)):  # PiSSA / OLoRA: the original base weights, always checked
            check_original_base(self.model, fingerprint, config, str(directory))
        tensors = files.read_tensors(allow_nonfinite)
        plan = self.plan(adapter_name, config.replace(inference_mode=not is_trainable), target_names=target_names)
        expected: dict[str, torch.Tensor] = {}
        for path, _, adapter in plan.layers:
            for key, value in adapter.state_dict().items():
                expected[f"{path}.{key}"] = value
        for path, found in plan.saved:
            source = found.original_module if isinstance(found, SavedModuleWrapper) else found
            for key, value in source.state_dict().items():
                expected[saved_key(path, key)] = value
        check_tensors_match(expected, tensors, files.weights_path)
        with torch.no_grad():
            for path, _, adapter in plan.layers:
                adapter.load_state_dict({k: tensors[f"{path}.{k}"] for k in adapter.state_dict()})
        if not is_trainable:
            self.inference_only.add(adapter_name)
        self.commit(plan)
        self.load_adapter_tensors(adapter_name, tensors, layers=False)

    @torch.no_grad()
    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], layers: bool = True) -> None:
        """Load file tensors (keys as in :meth:`adapter_state_dict`) into the existing adapter, in place.

        Goes through each module's ``load_state_dict``, so an adapter whose file tensors are
        derived from its parameters (e.g. low-bit packed codes) restores them itself.  The
        caller checks keys and shapes first (``io.check_tensors_match``).
        """
        if layers:
            for path, adapter in self.adapter_layers(adapter_name):
                adapter.load_state_dict({k: tensors[f"{path}.{k}"] for k in adapter.state_dict()})
        for path, wrapper in saved_module_wrappers(self.model):
            if adapter_name in wrapper.copies:
                copy = wrapper.copies[adapter_name]
                copy.load_state_dict({k: tensors[saved_key(path, k)] for k in copy.state_dict()})


def shira_state_from_peft(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in PEFT's SHiRA keys -> ours (``<path>.sparse_indices`` sorted flat indices in the adapter's
    dtype, ``<path>.sparse_values``); other keys pass unchanged (then checked by the caller)."""
    out = {}
    layers = dict(model.adapter_layers(adapter_name))
    for key, value in tensors.items():
        match = SHIRA_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match is None or match.group(1) not in layers:
            out[key] = value
        elif match.group(2) == "shira_indices":
            adapter = layers[match.group(1)]
            out[f"{match.group(1)}.sparse_indices"] = shira_flat_indices(value, adapter.spec.in_dim).to(
                adapter.sparse_indices.dtype)
        else:
            out[f"{match.group(1)}.sparse_values"] = value
    return out


def _full(value: torch.Tensor) -> torch.Tensor:
    """A plain local tensor: FSDP2 ``DTensor`` shards are gathered (collective)."""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else value
