"""torch.compile(fullgraph=True) of a wrapped layer: no graph breaks, one graph, same numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lava_peft as lp
from test_contract import CONFIGS, LAYERS
from _tiny_models import randomize_adapters


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("active", ["one", "several"])
def test_unmerged_wrapped_layer_compiles_without_graph_breaks(layer, active):
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[layer]
    model = lp.adapt(nn.Sequential(make_layer()), CONFIGS["lava"](), "a")
    model.add_adapter("b", CONFIGS["lora"]())
    model.add_adapter("c", CONFIGS["lava_rslora_uniform"]())
    randomize_adapters(model)
    model.set_adapter("a" if active == "one" else ["a", "b", "c"])
    wrapped = model.model[0]
    x = make_input()
    for training in (False, True):
        wrapped.train(training)
        torch._dynamo.reset()
        backend = CountingBackend()
        compiled = torch.compile(wrapped, backend=backend, fullgraph=True)  # raises on any graph break
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), wrapped(x), rtol=1e-6, atol=1e-6)
            compiled(x)
        assert backend.graphs == 1


def test_compiled_training_step_with_dropout_and_backward():
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(8, 6)), lp.LavaConfig(r=2, dropout=0.1, target_modules=["0"]), "a")
    model.add_adapter("b", lp.LoraConfig(r=3, target_modules=["0"]))
    randomize_adapters(model)
    model.set_adapter(["a", "b"])
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model.model[0], backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8)
    compiled(x).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.model[0](x))
