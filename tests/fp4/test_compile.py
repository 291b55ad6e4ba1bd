"""QuantLinear under torch.compile (fp4/linear_op.py): no graph breaks, one graph for all layers, and
the same bits as eager for every recipe, step after step.

The aot_eager backend runs the traced forward and backward graphs op by op (no Inductor fusion), so
any difference from eager would come from the tracing itself: a random draw seeded from a stale
step, a call counter that counts twice, a Python int baked into the graph. Inductor fuses the
unquantized ops around the linears, which may round differently; the GPU bench checks that path.
"""
import copy

import pytest
import torch
from torch import nn

from fp4.linear import QuantLinear, QuantState, record_gemms, shared_input_linears
from fp4.recipe import Recipe

RECIPES = [Recipe("fprop", "none"), Recipe("wgrad", "none"), Recipe("wgrad", "sr"), Recipe("wgrad", "rht"),
           Recipe("wgrad", "h16"), Recipe("wgrad", "h16_all"), Recipe("fp8", "none"),
           Recipe("wgrad", "none", "nvfp4"), Recipe("wgrad", "none", "ufp4"),
           Recipe("wgrad", "rht", hadamard_signs="call")]


class Block(nn.Module):
    """A decoder-like block: two quantized linears around a nonlinearity, with a residual."""

    def __init__(self, dim: int, recipe: Recipe, state: QuantState, index: int):
        super().__init__()
        self.up = QuantLinear(dim, 2 * dim, bias=True, recipe=recipe, state=state, layer_index=2 * index,
                              name=f"b{index}.up")
        self.down = QuantLinear(2 * dim, dim, bias=False, recipe=recipe, state=state,
                                layer_index=2 * index + 1, name=f"b{index}.down")

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _model(recipe: Recipe, depth: int = 3, dim: int = 64):
    torch.manual_seed(0)
    state = QuantState(seed=11)
    return nn.Sequential(*[Block(dim, recipe, state, i) for i in range(depth)]), state


def _steps(model, state, n_steps: int = 2, micro: int = 2):
    """Losses and parameter gradients of n_steps steps (gradient accumulation over `micro`)."""
    out = []
    gen = torch.Generator().manual_seed(5)
    for _ in range(n_steps):
        model.zero_grad(set_to_none=True)
        for _ in range(micro):
            x = torch.randn(48, 64, generator=gen)
            loss = model(x).square().mean()
            loss.backward()
            out.append(loss.detach())
        out += [p.grad.clone() for p in model.parameters()]
        state.advance_step()
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_compiled_blocks_equal_eager_bit_for_bit(recipe):
    from torch._dynamo.utils import counters
    eager, eager_state = _model(recipe)
    compiled = copy.deepcopy(eager)
    compiled_state = compiled[0].up.state
    assert compiled_state is not eager_state
    torch._dynamo.reset()
    counters.clear()
    for block in compiled:  # regional compilation: each block in place, one shared compiled code
        block.compile(backend="aot_eager", fullgraph=True)
    expected = _steps(eager, eager_state)
    got = _steps(compiled, compiled_state)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert torch.equal(a, b), recipe.name
    assert compiled_state.step == eager_state.step
    # fullgraph=True would have raised on a graph break; one graph (maybe a second one once a
    # size or int goes dynamic) serves all three blocks, over two steps with four calls each.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_layers_record_all_three_gemms_with_their_forward_identities():
    recipe = Recipe("wgrad", "sr")
    model, state = _model(recipe, depth=2)
    torch._dynamo.reset()
    for block in model:
        block.compile(backend="aot_eager", fullgraph=True)
    state.step = 4
    with record_gemms() as records:
        model(torch.randn(16, 64, requires_grad=True)).sum().backward()
    seen = {(r.layer, r.gemm) for r in records}
    assert seen == {(f"b{i}.{p}", g) for i in range(2) for p in ("up", "down") for g in ("fprop", "dgrad", "wgrad")}
    assert {(r.step, r.call) for r in records} == {(4, 0)}


def test_a_deep_copy_is_a_new_layer():
    """The ops find a layer by its handle: a copy must not compute with the original's state."""
    layer = QuantLinear(32, 16, recipe=Recipe("wgrad", "sr"), state=QuantState(seed=1))
    twin = copy.deepcopy(layer)
    assert int(twin.op_layer[0]) != int(layer.op_layer[0])
    twin.state.step = 9
    with record_gemms() as records:
        twin(torch.randn(8, 32))
    assert records and {r.step for r in records} == {9}


def test_a_layer_without_bias_on_an_input_without_grad_trains():
    """Two gradients not needed (dX, db): the op's empty outputs must not alias each other."""
    layer = QuantLinear(32, 16, bias=False, recipe=Recipe("wgrad", "none"), state=QuantState(seed=1))
    layer(torch.randn(8, 32)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (16, 32)


@pytest.mark.parametrize("recipe", [Recipe("fp8", "none"), Recipe("wgrad", "h16"), Recipe("wgrad", "sr")],
                         ids=lambda r: r.name)
def test_compiled_blocks_take_new_batch_sizes(recipe):
    """A second row count makes dynamo recompile with a symbolic one (a run's evaluation ends on a
    short batch: 511 sequences in batches of 64). Nothing in the layer may then need the row count
    as a Python constant (the FP8 sharing decision once did: every compiled FP8/FP4 run failed at its
    first evaluation on the GPU). Real FP8 allowed, as on CUDA; eager gives the same bits."""
    from fp4.state import ExecutionConfig
    torch.manual_seed(0)
    eager_state = QuantState(seed=11, execution=ExecutionConfig(real_fp8=True))
    eager = nn.Sequential(*[Block(64, recipe, eager_state, i) for i in range(2)])
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    for block in compiled:
        block.compile(backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    for rows in (48, 48, 37, 32, 21):  # 37 and 21 are not multiples of 16
        x = torch.randn(rows, 64, generator=gen)
        losses = [m(x).square().mean() for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        assert torch.equal(losses[0].detach(), losses[1].detach()), rows
        for a, b in zip(eager.parameters(), compiled.parameters()):
            assert torch.equal(a.grad, b.grad), rows


class SiblingBlock(nn.Module):
    """Gate and up read one X (fp4.linear.shared_input_linears), or are called one by one."""

    def __init__(self, dim: int, recipe: Recipe, state: QuantState, index: int, grouped: bool):
        super().__init__()
        self.gate, self.up, self.down = (
            QuantLinear(i, o, bias=bias, recipe=recipe, state=state, layer_index=3 * index + j,
                        name=f"b{index}.{j}")
            for j, (i, o, bias) in enumerate(((dim, 2 * dim, True), (dim, dim, True), (dim, dim, False))))
        self.grouped = grouped

    def forward(self, x):
        if self.grouped:
            gate, up = shared_input_linears(x, (self.gate, self.up))
        else:
            gate, up = self.gate(x), self.up(x)
        return x + self.down(torch.nn.functional.silu(gate[:, :64]) * up)


@pytest.mark.parametrize("recipe", [Recipe("wgrad", "h16"), Recipe("wgrad", "sr", sr_operands="all"),
                                    Recipe("wgrad", "rht"), Recipe("fp8", "none")], ids=lambda r: r.name)
def test_shared_input_linears_equal_separate_linears_compiled_or_not(recipe):
    def model(grouped):
        torch.manual_seed(0)
        state = QuantState(seed=11)
        return nn.Sequential(*[SiblingBlock(64, recipe, state, i, grouped) for i in range(2)]), state

    separate, separate_state = model(False)
    expected = _steps(separate, separate_state)
    grouped, grouped_state = model(True)
    assert [a.equal(b) for a, b in zip(expected, _steps(grouped, grouped_state))] == [True] * len(expected)
    compiled, compiled_state = model(True)
    torch._dynamo.reset()
    for block in compiled:
        block.compile(backend="aot_eager", fullgraph=True)
    got = _steps(compiled, compiled_state)
    assert [a.equal(b) for a, b in zip(expected, got)] == [True] * len(expected), recipe.name
