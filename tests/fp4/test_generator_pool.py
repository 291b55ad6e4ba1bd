"""GeneratorPool: a step's random draws listed, then served from persistent generators that are
re-seeded per step exactly as the fresh generator of each draw (fp4/state.py)."""
import pytest
import torch

from fp4.state import GeneratorPool, QuantState, generator

CPU = torch.device("cpu")
SR = ("sr", 7, 5, 3, "wgrad", "dy", 1)        # the step at index 2, layer 3's call at index 6
FIXED = ("signs", 7, 3, "wgrad")              # fixed signs: no step, no call


def _draw(gen):
    return torch.rand(8, generator=gen)


def test_listing_hands_out_the_fresh_generators():
    pool = GeneratorPool()
    assert torch.equal(_draw(pool.take(CPU, SR, 2, 6, 3)), _draw(generator(CPU, *SR)))
    assert pool.draws == [(CPU, SR, 2, 6, 3)]


def test_reseed_gives_each_draw_its_fresh_generator_at_the_new_step():
    pool = GeneratorPool()
    pool.take(CPU, SR, 2, 6, 3)
    pool.take(CPU, FIXED, None)
    gens = pool.freeze(lambda device: torch.Generator(device=device), lambda layer: 1)  # layer 3 began at 1
    assert len(gens) == 2 and pool.take(CPU, SR, 2, 6, 3) is gens[0]
    for step, base in ((5, 1), (6, 1), (11, 4)):  # at step 11 an evaluation made 3 calls first
        pool.reseed(step, lambda layer: base)
        at_step = SR[:2] + (step,) + SR[3:6] + (base,)
        assert torch.equal(_draw(gens[0]), _draw(generator(CPU, *at_step)))
        assert torch.equal(_draw(gens[1]), _draw(generator(CPU, *FIXED)))
    # a draw of another step and call is the same draw (they are what reseed changes)
    pool.rewind()
    assert pool.take(CPU, SR[:2] + (9,) + SR[3:6] + (5,), 2, 6, 3) is gens[0]


@pytest.mark.parametrize("other", [("sr", 7, 5, 3, "wgrad", "x", 1), ("sr", 7, 5, 4, "wgrad", "dy", 2)])
def test_a_draw_out_of_the_listed_order_raises(other):
    pool = GeneratorPool()
    pool.take(CPU, SR, 2, 6, 3)
    pool.freeze(lambda device: torch.Generator(device=device))
    with pytest.raises(RuntimeError, match="fixed order"):
        pool.take(CPU, other, 2, 6, 4 if other[6] == 2 else 3)
    pool.rewind()
    pool.take(CPU, SR, 2, 6, 3)
    with pytest.raises(RuntimeError, match="fixed order"):  # more draws than listed
        pool.take(CPU, SR, 2, 6, 3)


def test_quant_state_draws_from_the_pool_only_while_one_is_set():
    state, pool = QuantState(seed=7), GeneratorPool()
    fresh = state.generator(CPU, SR, 2, 6, 3)
    state.generator_pool = pool
    assert torch.equal(_draw(state.generator(CPU, SR, 2, 6, 3)), _draw(fresh.manual_seed(fresh.initial_seed())))
    assert len(pool.draws) == 1
    state.generator_pool = None
    state.generator(CPU, SR, 2, 6, 3)
    assert len(pool.draws) == 1


def test_call_base_is_the_next_call_index_without_counting_it():
    state = QuantState(seed=7)
    assert state.call_base(3) == 0
    state.skip_calls({3: 2})  # an evaluation's two calls
    assert state.call_base(3) == 2 and state.next_call(3) == 2 and state.call_base(3) == 3
