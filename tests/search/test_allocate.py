"""The allocation of a search (pure functions): greedy choices stay within every gate's predicted budget,
take every free saving, spend the budget where it saves most, are deterministic, and back-off walks each
group towards keep until nothing is left to undo."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from mlqpipe.search.allocate import Budget, Option, _load, allocate, back_off, budget, costs, improvements

KEEP = Option("keep", 0, (0.0,))


def _groups(data):
    """Groups of options: keep first, then candidates with savings and one cost per gate."""
    return [[KEEP] + [Option(f"c{i}", s, (c,), e) for i, (s, c, e) in enumerate(options)] for options in data]


options = st.lists(st.tuples(st.integers(1, 10_000), st.floats(0, 0.05), st.floats(0, 1)), min_size=1, max_size=5)
groups_st = st.lists(options, min_size=1, max_size=6).map(_groups)
limits = st.floats(0, 0.1)


@given(groups_st, limits)
def test_the_choice_stays_within_the_predicted_budget(groups, limit):
    chosen = allocate(groups, Budget(("max_accuracy_drop",), (limit,)))
    assert len(chosen) == len(groups)
    assert _load([g[i] for g, i in zip(groups, chosen)], Budget(("g",), (limit,))) <= 1.0 + 1e-9


@given(groups_st, limits)
def test_no_single_move_to_a_larger_saving_still_fits(groups, limit):
    """Greedy ends only when every remaining move would break the budget."""
    b = Budget(("g",), (limit,))
    chosen = allocate(groups, b)
    current = [g[i] for g, i in zip(groups, chosen)]
    for gi, g in enumerate(groups):
        for o in g:
            if o.saved > g[chosen[gi]].saved:
                assert _load(current[:gi] + [o] + current[gi + 1:], b) > 1.0 + 1e-9


@given(groups_st, limits)
def test_allocation_is_deterministic(groups, limit):
    b = Budget(("g",), (limit,))
    assert allocate(groups, b) == allocate([list(g) for g in groups], b)


def test_free_savings_are_all_taken_and_the_budget_goes_where_it_saves_most():
    groups = [[KEEP, Option("8", 100, (0.0,)), Option("4", 300, (0.004,))],
              [KEEP, Option("8", 80, (0.0,)), Option("4", 200, (0.004,)), Option("2", 260, (0.02,))]]
    # budget for one 4-bit step: group 0 saves 200 more for it, group 1 saves 120 more
    assert allocate(groups, Budget(("g",), (0.005,))) == [2, 1]
    assert allocate(groups, Budget(("g",), (0.0,))) == [1, 1]
    assert allocate(groups, Budget(("g",), (1.0,))) == [2, 3]


@given(groups_st)
def test_back_off_reaches_keep_in_finitely_many_steps(groups):
    chosen = [len(g) - 1 for g in groups]
    steps = 0
    while chosen is not None:
        saved = sum(g[i].saved for g, i in zip(groups, chosen))
        nxt = back_off(groups, chosen)
        if nxt is not None:
            assert sum(g[i].saved for g, i in zip(groups, nxt)) < saved  # every step gives bytes back
        chosen = nxt
        steps += 1
        assert steps <= sum(len(g) for g in groups) + 1


def test_back_off_undoes_the_costliest_choice_first():
    groups = [[KEEP, Option("4", 300, (0.001,), 0.1)], [KEEP, Option("2", 200, (0.003,), 0.2), Option("4", 150, (0.001,), 0.05)]]
    assert back_off(groups, [1, 1]) == [1, 2]  # group 1's 2-bit costs most; its 4-bit is cheaper
    assert back_off(groups, [1, 2]) == [0, 2]  # equal costs: the larger output error goes first
    assert back_off(groups, [0, 0]) is None


def test_costs_and_budget_are_measured_beyond_the_base():
    base = {"accuracy_float": 0.98, "accuracy_quantized": 0.975, "top1_agreement": 0.99, "output_error": 0.01}
    trial = {"accuracy_float": 0.98, "accuracy_quantized": 0.970, "top1_agreement": 0.985, "output_error": 0.03}
    gates = {"max_accuracy_drop": 0.01, "min_top1_agreement": 0.98, "max_output_error": 0.05}
    c = costs(trial, base, gates)
    assert c[0] == pytest.approx(0.005) and c[1] == pytest.approx(0.005)
    assert c[2] == pytest.approx(0.03 ** 2 - 0.01 ** 2)
    b = budget(base, gates)
    assert b.limits == pytest.approx((0.005, 0.01, 0.05 ** 2 - 0.01 ** 2))
    better = {**trial, "accuracy_quantized": 0.99}
    assert costs(better, base, gates)[0] == 0.0  # an improvement costs nothing (and earns nothing)


def test_improvements_try_every_smaller_uniform_setting_then_single_steps_down():
    groups = [[KEEP, Option("8", 100, (0.0,)), Option("4", 300, (0.004,)), Option("2", 400, (0.01,))],
              [KEEP, Option("8", 80, (0.0,)), Option("4", 200, (0.004,)), Option("2", 260, (0.02,))]]
    # from [4, 8] (saves 380): uniform 2 (660) and 4 (500), largest first — uniform 8 (180) saves less —, then one
    # step down per group: group 1 to 4 is uniform 4 again (not repeated), group 0 to 2 saves 480
    assert list(improvements(groups, [2, 1])) == [[3, 3], [2, 2], [3, 1]]


@given(groups_st, st.data())
def test_improvements_are_distinct_and_never_the_current_choice(groups, data):
    chosen = [data.draw(st.integers(0, len(g) - 1)) for g in groups]
    tried = list(improvements(groups, chosen))
    assert chosen not in tried and len(tried) == len({tuple(t) for t in tried})
    saved = sum(g[i].saved for g, i in zip(groups, chosen))
    assert all(sum(g[i].saved for g, i in zip(groups, t)) > saved for t in tried)
