"""``AdaptedModel``: a base model with named adapters; the verbs users of HF PEFT know.

Every operation that changes the model first *plans* (finds targets, builds adapters,
checks files) without touching the model, then *commits*.  So a bad config, a wrong
base model or a corrupt file raises a clear error and leaves the model exactly as it
was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .adapter_files import SAVED_MARKER  # noqa: F401  (re-exported)
from .config import AdapterConfig, check_adapter_name
from .errors import AdapterNameError, LavaError
from .inject import (
    adapted_layers,
    find_module_targets,
    find_modules_to_save,
    find_targets,
    link_shared_input_layers,
    saved_module_wrappers,
    set_submodule,
    shared_input_groups,
)
from .model_files import AdapterFiles
from .base_init_files import apply_base_change, base_init_warnings, note_base_init, warn_residual_left
from .targets import resolve_for_model, untrained_new_modules
from .layers import BASE_NAME, AdaptedLayer, MixedBatch, SavedModuleWrapper, layer_ops, walk_modules
from .methods.base import ModuleAdapter
from .merge_checks import check_mergeable
from .module_layers import ModuleAdapterHost, host_of, module_spec, move_host


class _BaseModelView:
    """``AdaptedModel.base_model``: ``.model`` is the wrapped model, calling it runs the wrapped transformers
    model's backbone (its own ``base_model``), any other attribute is the :class:`AdaptedModel`'s."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "AdaptedModel"):
        object.__setattr__(self, "_owner", owner)

    @property
    def model(self) -> nn.Module:
        return self._owner.model

    def __call__(self, *args, **kwargs):
        return getattr(self._owner.model, "base_model", self._owner.model)(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._owner, name)


class _BoundForward:
    """``AdaptedModel.forward`` bound to a model; ``inspect.signature`` gives the wrapped model's forward
    signature plus ``adapter_names``, so that callers that pick inputs by the signature (transformers'
    ``Trainer`` drops dataset columns the forward does not name) see the real inputs, as for PEFT models."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, owner):
        self.__func__, self.__self__ = func, owner

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            base = inspect.signature(self.__self__.model.forward)
        except (TypeError, ValueError):
            return inspect.signature(functools.partial(self.__func__, self.__self__))
        params = [p for p in base.parameters.values() if p.name != "adapter_names"]
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        return base.replace(parameters=params[:at] + [extra] + params[at:])


class _ForwardWithBaseSignature:
    """Descriptor for :meth:`AdaptedModel.forward` (see :class:`_BoundForward`)."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, owner, owner_type=None):
        return self.func if owner is None else _BoundForward(self.func, owner)


@dataclass
class AdapterPlan:
    """Everything ``add_adapter`` will do, built without touching the model (:meth:`AdaptedModel.plan`)."""

    name: str
    config: AdapterConfig
    layers: list[tuple[str, nn.Module, nn.Module]] = field(default_factory=list)  # (path, found, adapter)
    saved: list[tuple[str, nn.Module]] = field(default_factory=list)  # (path, found)
    notes: list[str] = field(default_factory=list)  # choices made for the user (printed by commit)
    warnings: list[str] = field(default_factory=list)  # what the user should fix (warned by commit)


class AdaptedModel(AdapterFiles, nn.Module):
    """Wraps ``model``; forward passes through unchanged (``model(**batch)`` / ``model(x)``)."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise LavaError("model is already an AdaptedModel; use model.add_adapter(name, config) instead")
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        self.inference_only: set[str] = set()
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "_BaseModelView":
        """Both meanings at once: PEFT's nesting (``peft_model.base_model.model`` is the wrapped model, other
        attributes are this model's) and transformers' (``model.base_model(...)`` runs the backbone, as TRL's
        fused LM head calls it on the model it is given)."""
        return _BaseModelView(self)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter wrappers in place)."""
        return self.model

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Turn on the transformers model's checkpointing, and make its inputs require grad.

        With a frozen embedding the checkpointed blocks would otherwise receive inputs
        that do not require grad, and no gradient would reach the adapters.
        """
        if not hasattr(self.model, "gradient_checkpointing_enable"):
            raise LavaError(f"{type(self.model).__name__} has no gradient_checkpointing_enable(); wrap its blocks "
                            "with torch.utils.checkpoint yourself")
        self.model.gradient_checkpointing_enable(**kwargs)
        if hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    @property
    def shared_input_fusion(self) -> bool:
        """Adapted Linears reading the same input (q/k/v, gate/up) run as one node (:mod:`~lava_peft.fused_siblings`);
        on by default, ``model.shared_input_fusion = False`` runs each layer on its own."""
        return self.__dict__.get("_shared_input_fusion", True)

    @shared_input_fusion.setter
    def shared_input_fusion(self, value: bool) -> None:
        self.__dict__["_shared_input_fusion"] = bool(value)
        for group in shared_input_groups(self.model):
            group.enabled = bool(value)

    # ================================================================= forward
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    forward = _ForwardWithBaseSignature(forward)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """``model.generate`` of the wrapped transformers model; ``adapter_names`` gives one adapter
        per input sequence (beam search / ``num_return_sequences`` expand each name with its rows)."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names, expand=True):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str], expand: bool = False):
        """Within the block every adapted layer (and ``modules_to_save`` module) uses
        ``adapter_names[i]`` for sample ``i``; ``expand=True`` also accepts batches that repeat
        every sample ``k`` times in a row (as ``generate`` builds them)."""
        if isinstance(adapter_names, str):
            raise AdapterNameError("adapter_names must be a list with one adapter name per sample, not a string")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_NAME and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(
                f"adapter_names contains unknown adapters {unknown}; known: {sorted(self.peft_config)} "
                f"(use {BASE_NAME!r} for the base model)"
            )
        if self.merged_adapters:
            raise LavaError(
                f"adapters {self.merged_adapters} are merged into the base weights; mixed-adapter batches need "
                "unmerged adapters: call model.unmerge_adapter() first"
            )
        plan = MixedBatch(names, expand=expand)
        # one walk finds every adapter host and saved-module wrapper (what adapted_layers + saved_module_wrappers yield)
        modules = [m for _, m in walk_modules(self.model) if isinstance(m, (AdaptedLayer, ModuleAdapterHost,
                                                                            SavedModuleWrapper))]
        for m in modules:
            m.mixed_adapter_names = plan
        try:
            yield
        finally:
            for m in modules:
                m.mixed_adapter_names = None

    # ================================================================= adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        return self._active[0] if self._active else None

    def check_new_name(self, name: str) -> None:
        """Refuse an invalid or taken adapter name (before anything is built or written)."""
        check_adapter_name(name, reserved=(BASE_NAME,))
        if name in self.peft_config:
            raise AdapterNameError(
                f"an adapter named {name!r} already exists (adapters: {sorted(self.peft_config)}); "
                "pick another name or delete_adapter() it first"
            )

    # ================================================================= building adapters
    # The public model-building API: ``plan`` builds and checks everything without touching the
    # model, the caller may fill the planned adapters' tensors, then ``commit`` installs them.
    # ``inference_only`` names adapters kept frozen by ``set_adapter`` (loaded with is_trainable=False).
    def check_known(self, names: Iterable[str]) -> list[str]:
        """``names`` as a list; raises :class:`AdapterNameError` if one is not an adapter of this model."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        return names

    def plan(self, name: str, config: AdapterConfig, target_names: list[str] | None = None) -> AdapterPlan:
        """Find the targets (or use ``target_names``), check every layer and build the adapters; the
        model is not touched.  Raises a :class:`LavaError` for anything that would fail."""
        if not isinstance(config, AdapterConfig):
            raise LavaError(f"config must be an lp.*Config (e.g. lp.LavaConfig), got {type(config).__name__}")
        self.check_new_name(name)
        config.validate()
        adapter_cls = config.adapter_type()
        module_kind = issubclass(adapter_cls, ModuleAdapter)  # the second kind: transforms a module's output
        notes: list[str] = []
        if target_names is not None:
            targets = [(n, self.model.get_submodule(n)) for n in target_names]
        else:  # a new adapter: the model fills what the config leaves open (targets.py)
            resolved = resolve_for_model(self.model, config)
            config, notes = resolved.config, resolved.notes
            if module_kind:
                targets = find_module_targets(self.model, config, adapter_cls.extra_targets(config))
            else:
                targets = find_targets(self.model, config)
        plan = AdapterPlan(name, config, notes=notes)
        for path, found in targets:
            base = found.base_layer if isinstance(found, AdaptedLayer) else found
            if module_kind:
                spec = module_spec(base, path)
                adapter_cls.check_module(spec, config, path)
                adapter = adapter_cls.for_module(spec, config, path)
            else:
                spec = layer_ops(base).spec(base)
                adapter_cls.check_layer(spec, config, path)
                adapter = adapter_cls.for_layer(spec, config, path)
                adapter.init_from_base(layer_ops(base).to_base_layout(base.weight))
                if adapter.initial_factors() is not None:
                    note_base_init(adapter, found, base, path)
            plan.layers.append((path, found, adapter))
        for path, found in find_modules_to_save(self.model, config.modules_to_save):
            plan.saved.append((path, found))
        plan.warnings.extend(base_init_warnings(name, config, self.peft_config))
        if target_names is None:
            for module in untrained_new_modules(self.model, [p for p, _, _ in plan.layers], [p for p, _ in plan.saved]):
                plan.warnings.append(
                    f"{module} was newly initialised by transformers (it is not in the checkpoint) and adapter {name!r} "
                    f"neither adapts nor saves it: it stays random and is missing from the saved adapter. Pass "
                    f"task_type='SEQ_CLS' (or 'TOKEN_CLS'), or modules_to_save=[{module.rsplit('.', 1)[-1]!r}]")
        return plan

    def commit(self, plan: AdapterPlan) -> None:
        """Install a :meth:`plan`: wrap the layers, add the adapters and ``modules_to_save`` copies."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for path, found, adapter in plan.layers:
            layer = found
            if isinstance(adapter, ModuleAdapter):
                layer = host_of(found) or ModuleAdapterHost(found, adapter.spec)
            elif not isinstance(found, AdaptedLayer):
                layer = AdaptedLayer(found, layer_ops(found))
                set_submodule(self.model, path, layer)
                move_host(found, layer)  # module adapters on the layer keep their hook and path
            layer.add(plan.name, adapter)
            apply_base_change(layer, adapter)
        for path, found in plan.saved:
            wrapper = found
            if not isinstance(found, SavedModuleWrapper):
                wrapper = SavedModuleWrapper(found)
                set_submodule(self.model, path, wrapper)
            wrapper.add(plan.name)
        self.peft_config[plan.name] = plan.config
        if plan.config.inference_mode:
            self.inference_only.add(plan.name)
        self._apply_active(self._active)
        link_shared_input_layers(self.model, self.shared_input_fusion)
        for note in plan.notes:
            print(f"lava-peft: {note}")
        for message in plan.warnings:
            warnings.warn(message, UserWarning, stacklevel=3)

    def add_adapter(self, adapter_name: str, config: AdapterConfig | None = None, *,
                    peft_config: AdapterConfig | None = None, low_cpu_mem_usage: bool = False) -> None:
        """Add a new (inactive) adapter; ``set_adapter`` activates it.  ``peft_config=`` is PEFT's name
        of ``config``; ``low_cpu_mem_usage`` is accepted (adapters are built small anyway)."""
        if (config is None) == (peft_config is None):
            raise LavaError("add_adapter(adapter_name, config): pass the config once (as config= or peft_config=)")
        self.commit(self.plan(adapter_name, config if config is not None else peft_config))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several) the active, trainable adapter(s).

        On an unmerged model this only flips flags (O(1) in the weights); on a merged
        model it unmerges the old and merges the new adapters in place.
        """
        names = self.check_known(adapter_name)
        pairs = list(adapted_layers(self.model))
        if not any(layer.merged_adapters for _, layer in pairs):
            self._apply_active(names)
            return
        self._check_mergeable(names, pairs)
        self._apply_active(names)
        for _, layer in pairs:
            layer.remerge(layer.active_adapters, backup=self.exact_unmerge, check=False)

    def replace_adapter(self, adapter_name: str, config: AdapterConfig, adapters: dict[str, nn.Module]) -> None:
        """Give adapter ``adapter_name`` a new config and a new adapter per layer (``{module path: adapter}``,
        exactly the layers that hold it now), keeping its active / merged / ``modules_to_save`` state;
        its trainable flags are set as for any adapter.  For tools that convert an adapter in place into
        an equivalent one (e.g. MoSA → plain LoRA/LAVA): a merged adapter's ``ΔW`` must not change.
        Checked before anything changes."""
        self.check_known(adapter_name)
        held = {path for path, _ in self.adapter_layers(adapter_name)}
        if set(adapters) != held:
            missing, extra = sorted(held - set(adapters))[:3], sorted(set(adapters) - held)[:3]
            raise AdapterNameError(f"replace_adapter({adapter_name!r}): give one adapter per layer holding it; "
                                   f"missing {missing}, not holding it {extra}")
        for path, layer in adapted_layers(self.model):
            if path in adapters:
                layer.adapters[adapter_name] = adapters[path]
        self.peft_config[adapter_name] = config
        self._apply_active(self._active)

    def _apply_active(self, names: list[str]) -> None:
        self._active = list(names)
        for _, layer in adapted_layers(self.model):
            layer.active_adapters = [n for n in names if n in layer.adapters]
            for n, adapter in layer.adapters.items():
                trainable = n in names and n not in self.inference_only
                for p in adapter.parameters():
                    p.requires_grad_(trainable)
        for _, wrapper in saved_module_wrappers(self.model):
            wrapper.active_copy = next((n for n in names if n in wrapper.copies), None)
            for n, copy in wrapper.copies.items():
                trainable = n == wrapper.active_copy and n not in self.inference_only
                for p in copy.parameters():
                    p.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_known(adapter_name)
        warn_residual_left(self.peft_config, [adapter_name] if adapter_name not in self.merged_adapters else [])
        for _, layer in adapted_layers(self.model):
            if adapter_name in layer.adapters:
                layer.remove(adapter_name)
        for _, wrapper in saved_module_wrappers(self.model):
            wrapper.remove(adapter_name)
        del self.peft_config[adapter_name]
        self.inference_only.discard(adapter_name)
        self._apply_active([n for n in self._active if n != adapter_name])

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str | None = None, **kwargs):
        """Add ``adapter_name`` combining ``adapters`` with ``weights``: ``exact_linear`` (the exact sum; the
        default) or one of PEFT's types with PEFT's results (``cat``, ``linear``, ``svd``, ``ties``, ``ties_svd``,
        ``dare_*``, ``magnitude_prune(_svd)``). See :mod:`lava_peft.combine` for the math and the keyword options
        (``density``, ``svd_rank``, ``svd_clamp``, ``seed``/``generator``, ``result_method``, ...).  Module
        adapters: ``linear`` only, parameter averaging (the default for them; :mod:`lava_peft.combine_modules`)."""
        from .combine import add_weighted_adapter
        from .combine_modules import average_module_adapters, involves_module_adapters

        if involves_module_adapters(self, self.check_known(adapters)):  # the second kind: parameter averaging
            return average_module_adapters(self, list(adapters), [float(w) for w in weights], adapter_name,
                                           combination_type or "linear")
        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type or "exact_linear", **kwargs)

    def adapter_layers(self, adapter_name: str | None = None) -> list[tuple[str, nn.Module]]:
        """``(module path, adapter module)`` for every layer hosting ``adapter_name``."""
        name = adapter_name or self.active_adapter
        return [(p, layer.adapters[name]) for p, layer in adapted_layers(self.model) if name in layer.adapters]

    # ================================================================= merge / disable
    @property
    def merged_adapters(self) -> list[str]:
        merged: list[str] = []
        for _, layer in adapted_layers(self.model):
            merged.extend(n for n in layer.merged_adapters if n not in merged)
        return merged

    @property
    def exact_unmerge(self) -> bool:
        """If True, merging keeps a copy of each touched base weight so that unmerging restores it
        bit for bit and switching adapters on a merged model is one fused pass per layer
        (``W ← W0 + ΔW_new``). Costs one extra copy of the adapted weights. Default False: unmerge
        subtracts ``ΔW`` (exact up to rounding, ~1 ulp of ``|W| + |ΔW|``)."""
        return self.__dict__.get("_exact_unmerge", False)

    @exact_unmerge.setter
    def exact_unmerge(self, value: bool) -> None:
        self.__dict__["_exact_unmerge"] = bool(value)

    def _check_mergeable(self, names: Sequence[str], layers=None) -> None:
        check_mergeable(self.model, names, layers)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the active adapters' ``ΔW`` into the base weights in place (no inference overhead).

        Every merge is "safe" in PEFT's sense: non-finite increments are refused before any weight
        changes, so ``safe_merge`` only exists for PEFT's signature.  See :attr:`exact_unmerge` for
        bit-exact unmerging."""
        names = self._active if adapter_names is None else self.check_known(adapter_names)
        self._check_mergeable(names)
        for _, layer in adapted_layers(self.model):
            layer.merge(names, backup=self.exact_unmerge, check=False)

    def unmerge_adapter(self) -> None:
        for _, layer in adapted_layers(self.model):
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged meanwhile)."""
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        modules = [m for _, m in adapted_layers(self.model)] + [m for _, m in saved_module_wrappers(self.model)]
        for m in modules:
            m.disabled = True
        try:
            yield
        finally:
            for m in modules:
                m.disabled = False
            if merged:
                self.merge_adapter(merged)

    def _unwrap(self, merge: bool, adapter_names: Sequence[str] | None = None) -> nn.Module:
        if merge:
            self.exact_unmerge = False  # the wrappers go away: no backup copy of the weights is needed
            if adapter_names is not None:
                self.unmerge_adapter()
            self.merge_adapter(adapter_names)
        else:
            self.unmerge_adapter()
        warn_residual_left(self.peft_config, [n for n in self.peft_config if n not in self.merged_adapters])
        for path, layer in list(adapted_layers(self.model)):
            set_submodule(self.model, path, layer.release())
        for path, wrapper in list(saved_module_wrappers(self.model)):
            keep = wrapper.current() if merge else wrapper.original_module
            set_submodule(self.model, path, keep)
        self.peft_config.clear()
        self._active = []
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) and return the plain base model (wrappers removed).

        ``safe_merge``/``progressbar`` are PEFT's keywords: merges always refuse non-finite increments."""
        return self._unwrap(merge=True, adapter_names=None if adapter_names is None else self.check_known(adapter_names))

    def unload(self) -> nn.Module:
        """Remove all adapters and return the original base model."""
        return self._unwrap(merge=False)

    # ================================================================= losses / counts
    def regularization_loss(self) -> torch.Tensor:
        """``Σ_adapters λ_a · mean over layers of the adapter's regularizer`` (fp32 scalar).

        For LAVA ``λ = orth_lambda`` and the term is ``‖UᵀU − I‖²_F`` per layer, computed
        on r×r Grams in fp32, batched over layers of equal factor shape
        (:func:`~lava_peft.methods.lava.batched_orth_penalty`, LAVA's
        :meth:`~lava_peft.methods.base.DeltaAdapter.batched_regularization`).
        """
        total = None
        for name in self._active:
            weight = self.peft_config[name].regularization_weight()
            if not weight:
                continue
            # batchable factors (e.g. LAVA's orthogonality factors) go to their class's batched
            # function, one call per function over all layers; the mean over layers is
            # (Σ of all per-layer terms) / #layers
            terms, n_layers = [], 0
            batches: dict = {}  # batched function -> factors of every layer that offers them
            for _, a in self.adapter_layers(name):
                fs = a.batchable_regularization_factors()
                if fs is not None:
                    batches.setdefault(type(a).batched_regularization, []).extend(fs)
                    n_layers += 1
                    continue
                t = a.regularization()
                if t is not None:
                    terms.append(t.float())
                    n_layers += 1
            for batched_fn, factors in batches.items():
                batched = batched_fn(factors) if factors else None
                if batched is not None:
                    terms.append(batched)
            if terms:
                summed = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
                term = weight * (summed / n_layers)
                total = term if total is None else total + term
        if total is None:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return total

    # ================================================================= sampler state
    def _step_clocks(self) -> dict:
        clocks = {}
        for name in self.peft_config:
            clock = next((c for _, a in self.adapter_layers(name) if (c := a.step_clock()) is not None), None)
            if clock is not None:
                clocks[name] = clock
        return clocks

    def sampler_state(self) -> dict[str, int]:
        """``{adapter name: the training step its next draw belongs to}`` for adapters whose layers share a
        sampler (DyLoRA ranks, MoSA modules); training checkpoints save it so that a resumed run draws
        exactly what the uninterrupted run would."""
        return {name: clock.next_step() for name, clock in self._step_clocks().items()}

    def load_sampler_state(self, state: dict[str, int]) -> None:
        """Restore :meth:`sampler_state` (adapters not in ``state`` are left alone)."""
        clocks = self._step_clocks()
        for name, step in state.items():
            if name in clocks:
                clocks[name].resume_at(step)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ================================================================= files (model_files.AdapterFiles)
    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
        allow_nonfinite: bool = False, strict_base: bool = False,
    ) -> "AdaptedModel":
        """Base model + saved adapter directory -> AdaptedModel with that adapter active (options as
        :meth:`load_adapter`; ``strict_base=True`` also checks the base weights' sha256)."""
        wrapped = cls(model)
        wrapped.load_adapter(model_id, adapter_name, is_trainable=is_trainable, allow_nonfinite=allow_nonfinite,
                             strict_base=strict_base)
        wrapped.set_adapter(adapter_name)
        if not is_trainable:
            wrapped.eval()
        return wrapped


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Freeze ``model``, add the adapter ``config`` as ``adapter_name`` and activate it."""
    return AdaptedModel(model, config, adapter_name)
