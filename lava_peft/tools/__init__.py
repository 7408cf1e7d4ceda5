"""Method features that need a whole model (the layer above :class:`~lava_peft.AdaptedModel`).

One module per method: :mod:`.dylora` (set/evaluate/truncate/save at a rank), :mod:`.mosa`
(module control, ``merge_modules``, the consistency loss), :mod:`.sft` (LT-SFT lottery-ticket
phase 1), :mod:`.shira` (masks from the model's weights or gradients, the HF PEFT SHiRA
format), :mod:`.sparse_masks` (calibration gradients, weight changes).  The adapters
themselves live in :mod:`lava_peft.methods` and never import this package.
"""
