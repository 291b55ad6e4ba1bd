"""GeneratorPool: a step's random draws listed, then served from persistent generators that are
re-seeded per step exactly as the fresh generator of each draw (fp4/state.py)."""
import pytest
import torch

from fp4.state import GeneratorPool, QuantState, generator

CPU = torch.device("cpu")
SR = ("sr", 7, 5, 3, "wgrad", "dy", 1)        # the step at index 2
FIXED = ("signs", 7, 3, "wgrad")              # fixed signs: no step


def _draw(gen):
    return torch.rand(8, generator=gen)


def test_listing_hands_out_the_fresh_generators():
    pool = GeneratorPool()
    assert torch.equal(_draw(pool.take(CPU, SR, 2)), _draw(generator(CPU, *SR)))
    assert pool.draws == [(CPU, SR, 2)]


def test_reseed_gives_each_draw_its_fresh_generator_at_the_new_step():
    pool = GeneratorPool()
    pool.take(CPU, SR, 2)
    pool.take(CPU, FIXED, None)
    gens = pool.freeze(lambda device: torch.Generator(device=device))
    assert len(gens) == 2 and pool.take(CPU, SR, 2) is gens[0]
    for step in (5, 6, 11):
        pool.reseed(step)
        at_step = SR[:2] + (step,) + SR[3:]
        assert torch.equal(_draw(gens[0]), _draw(generator(CPU, *at_step)))
        assert torch.equal(_draw(gens[1]), _draw(generator(CPU, *FIXED)))
    # a draw of another step is the same draw (the step is what reseed changes)
    pool.rewind()
    assert pool.take(CPU, SR[:2] + (9,) + SR[3:], 2) is gens[0]


@pytest.mark.parametrize("other", [("sr", 7, 5, 3, "wgrad", "x", 1), ("sr", 7, 5, 3, "wgrad", "dy", 2)])
def test_a_draw_out_of_the_listed_order_raises(other):
    pool = GeneratorPool()
    pool.take(CPU, SR, 2)
    pool.freeze(lambda device: torch.Generator(device=device))
    with pytest.raises(RuntimeError, match="fixed order"):
        pool.take(CPU, other, 2)
    pool.rewind()
    pool.take(CPU, SR, 2)
    with pytest.raises(RuntimeError, match="fixed order"):  # more draws than listed
        pool.take(CPU, SR, 2)


def test_quant_state_draws_from_the_pool_only_while_one_is_set():
    state, pool = QuantState(seed=7), GeneratorPool()
    fresh = state.generator(CPU, SR, 2)
    state.generator_pool = pool
    assert torch.equal(_draw(state.generator(CPU, SR, 2)), _draw(fresh.manual_seed(fresh.initial_seed())))
    assert len(pool.draws) == 1
    state.generator_pool = None
    state.generator(CPU, SR, 2)
    assert len(pool.draws) == 1
