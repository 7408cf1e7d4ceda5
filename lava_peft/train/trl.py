"""TRL interop: ``trl.SFTTrainer`` with lava-peft adapters, with only the import changed.

TRL 1.16 creates the adapter itself when given ``peft_config=``, but only for ``peft.PeftConfig``
instances (it checks ``isinstance`` and calls ``peft.get_peft_model``), so a lava-peft config passed to
the stock ``trl.SFTTrainer`` fails with TRL's ``TypeError`` ("peft_config must be a peft.PeftConfig
instance").  This module's :class:`SFTTrainer` is TRL's, plus:

* ``peft_config=`` accepts a lava-peft config (``lp.LoraConfig``, ``lp.LavaConfig``, ...): the model (an
  instance, or a model id / folder loaded the way TRL loads it, with ``args.model_init_kwargs``) is adapted
  with :func:`lava_peft.get_peft_model` before TRL sees it; a ``peft.PeftConfig`` still goes to TRL/PEFT;
* :class:`~lava_peft.train.hf.LavaLossMixin`: the adapters' regularizer joins the loss, and ``save_model`` /
  checkpoints hold the adapter files only (the stock Trainer writes the whole state dict for a model that is
  not a ``PreTrainedModel``).

``from lava_peft.train.trl import SFTTrainer`` and the rest of a TRL script stays as it is.  An adapted model
passed as ``model=`` works too (``peft_config=None``).
"""

from __future__ import annotations

import trl

from ..config import AdapterConfig
from ..errors import LavaConfigError
from ..peft_api import get_peft_model
from .hf import LavaLossMixin


def _load_like_trl(model_id: str, args) -> object:
    """A model id / folder loaded as ``trl.SFTTrainer`` loads it (``create_model_from_path`` with the
    ``model_init_kwargs`` of ``args``)."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    kwargs.setdefault("trust_remote_code", bool(getattr(args, "trust_remote_code", False)))
    return create_model_from_path(model_id, **kwargs)


class SFTTrainer(LavaLossMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` that takes a lava-peft config as ``peft_config`` (see the module docstring)."""

    def __init__(self, model, args=None, *positional, peft_config=None, **kwargs):
        if isinstance(peft_config, AdapterConfig):
            if hasattr(model, "peft_config"):
                raise LavaConfigError(
                    "SFTTrainer(model=<an adapted model>, peft_config=...): the model already has adapters; pass "
                    "either the base model with peft_config, or the adapted model without it (as TRL asks)")
            if isinstance(model, str):
                model = _load_like_trl(model, args)
            model = get_peft_model(model, peft_config)
            peft_config = None
        super().__init__(model, args, *positional, peft_config=peft_config, **kwargs)


LavaSFTTrainer = SFTTrainer
"""The same class under a name that does not shadow TRL's."""

__all__ = ["LavaSFTTrainer", "SFTTrainer"]
