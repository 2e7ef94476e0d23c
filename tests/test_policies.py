"""Eviction policies and slot plans: each policy evicts what its formula says it should.

The policies run inside the cache's state machine (offload/core.py); `Harness` drives its
transitions one at a time: install a record, use it, ask for the victim among some slots.
"""

from __future__ import annotations

import numpy as np
import pytest

from vismmoe.offload import core
from vismmoe.offload.policies import POLICIES, SlotPlan, make_policy

ALL = np.ones(4, bool)


class Harness:
    def __init__(self, name, slots, layers, experts, **options):
        self.st = make_policy(name, **options).new_state(slots, layers, experts)

    def on_insert(self, slot, layer, expert, now):
        core.install(self.st, slot, layer, expert, now)

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        core.use(self.st, slot, layer, expert, now, n_visual, n_text)

    def victim(self, evictable, layer, quota=core.NO_PLAN):
        """The slot a miss of `layer` would take among `evictable` (the rest count as in use)."""
        self.st.protected[:] = ~np.asarray(evictable)
        try:
            return core.victim(self.st, layer, layer, np.asarray(quota, np.int64), True)
        finally:
            self.st.protected[:] = False

    def reset_request(self):
        core.begin_request(self.st)

    def modality_weights(self):
        return core.mix_weights(self.st.mix[0], self.st.mix[1], 1.0)


def make(name, slots, layers, experts, **options):
    return Harness(name, slots, layers, experts, **options)


def filled(name, slots=4, layers=2, experts=8, **options):
    """A policy whose slots 0..slots-1 hold (layer 0, expert s), inserted at clocks 1..slots."""
    policy = make(name, slots, layers, experts, **options)
    for s in range(slots):
        policy.on_insert(s, 0, s, s + 1)
        policy.on_access(s, 0, s, s + 1, 0, 1)
    return policy


def test_registry_has_every_policy_and_rejects_unknown():
    assert set(POLICIES) == {"lru", "lfu", "lfru", "cost", "affinity"}
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_empty_slots_first_and_mask_respected(name):
    policy = make(name, 4, 2, 8)
    policy.on_insert(0, 0, 3, 1)
    policy.on_access(0, 0, 3, 1, 1, 0)
    assert policy.victim(ALL, 0) == 1  # lowest empty slot before any resident one
    assert policy.victim(np.array([True, False, False, True]), 0) == 3
    policy = filled(name)
    for s in range(4):
        only = np.zeros(4, bool)
        only[s] = True
        assert policy.victim(only, 1) == s


def test_lru_evicts_oldest_use():
    policy = filled("lru")
    policy.on_access(0, 0, 0, 10)
    assert policy.victim(ALL, 0) == 1


def test_lfu_evicts_least_used_then_oldest():
    policy = filled("lfu")
    for now in (10, 11, 12):
        policy.on_access(0, 0, 0, now)  # expert 0: 4 uses
        policy.on_access(2, 0, 2, now)  # expert 2: 4 uses
    policy.on_access(1, 0, 1, 13)  # expert 1: 2 uses, most recent
    assert policy.victim(ALL, 0) == 3  # 1 use
    policy.on_access(3, 0, 3, 14)
    assert policy.victim(ALL, 0) == 1  # tie at 2 uses: slot 1 used at 13, slot 3 at 14


def test_lfu_count_survives_eviction():
    policy = filled("lfu")
    for now in range(10, 20):
        policy.on_access(0, 0, 0, now)
    policy.on_insert(0, 1, 5, 20)  # expert (0, 0) evicted for (1, 5)
    policy.on_insert(1, 0, 0, 21)  # ... and reloaded elsewhere: its 11 uses come back with it
    policy.on_access(1, 0, 0, 21)
    assert policy.victim(np.array([True, True, False, False]), 0) == 0


def test_lfru_recent_uses_outweigh_old_ones():
    policy = filled("lfru", half_life=2.0)
    for now in range(10, 16):  # expert 0: six uses long ago
        policy.on_access(0, 0, 0, now)
    for now in range(16, 40):  # many later calls of layer 0 that use experts 1 and 2
        policy.on_access(1, 0, 1, now)
        if now > 36:
            policy.on_access(2, 0, 2, now)
    # expert 0 (6 old uses) has decayed below expert 2 (3 recent uses); expert 3 (1 old use) is lowest
    assert policy.victim(ALL, 0) == 3
    assert policy.victim(np.array([True, False, True, False]), 0) == 0
    lfu = filled("lfu")
    for now in range(10, 16):
        lfu.on_access(0, 0, 0, now)
    for now in range(37, 40):
        lfu.on_access(2, 0, 2, now)
    assert lfu.victim(np.array([True, False, True, False]), 0) == 2  # undecayed counts say the opposite


def test_decayed_counts_renormalise_without_changing_ratios():
    policy = make("lfru", 2, 1, 2, half_life=0.5)  # weight x4 per call: crosses 1e100 within ~170 calls
    policy.on_insert(0, 0, 0, 0)
    policy.on_insert(1, 0, 1, 0)
    for now in range(1, 400):
        policy.on_access(0, 0, 0, now)
        if now % 2:
            policy.on_access(1, 0, 1, now)
    st = policy.st
    value = st.counts[0, 0] / st.weight[0]
    assert np.isfinite(value).all() and st.weight[0] < 1e101
    # expert 0 used every call, expert 1 every other call (ending on an odd call): steady-state values
    assert value[0] == pytest.approx(4 / 3)
    assert value[1] == pytest.approx(16 / 15)


def test_cost_aware_keeps_expensive_experts():
    cost = np.ones((2, 8))
    cost[0, 1] = 10.0
    policy = filled("cost", load_cost=cost, use_distance=False)
    assert policy.victim(ALL, 0) == 0  # all used once; expert 0 is cheap and oldest
    assert policy.victim(np.array([False, True, True, False]), 0) == 2  # expert 1 costs 10x to reload
    with pytest.raises(ValueError, match="load_cost"):
        make("cost", 4, 2, 8, load_cost=np.ones(3))


def test_cost_aware_distance_keeps_the_next_layers_experts():
    policy = make("cost", 2, 3, 4)
    policy.on_insert(0, 1, 0, 1)
    policy.on_access(0, 1, 0, 1)  # layer 1's expert, used at clock 1 (least recent)
    policy.on_insert(1, 2, 0, 2)
    policy.on_access(1, 2, 0, 2)  # layer 2's expert, used at clock 2
    # Loading into layer 0: layer 1 runs next (distance 1), layer 2 after it (distance 2).
    assert policy.victim(np.ones(2, bool), 0) == 1
    plain = make("cost", 2, 3, 4, use_distance=False)
    plain.on_insert(0, 1, 0, 1)
    plain.on_access(0, 1, 0, 1)
    plain.on_insert(1, 2, 0, 2)
    plain.on_access(1, 2, 0, 2)
    assert plain.victim(np.ones(2, bool), 0) == 0  # without distance: equal scores, least recent goes


def test_affinity_follows_the_request_modality_mix():
    def setup():
        policy = make("affinity", 2, 1, 4)
        policy.on_insert(0, 0, 0, 1)
        policy.on_access(0, 0, 0, 1, 5, 0)  # expert 0: visual tokens only
        policy.on_insert(1, 0, 1, 1)
        policy.on_access(1, 0, 1, 1, 0, 5)  # expert 1: text tokens only
        policy.reset_request()
        return policy

    visual_heavy = setup()
    visual_heavy.on_access(0, 0, 0, 2, 60, 0)
    visual_heavy.on_access(1, 0, 1, 2, 0, 2)
    assert visual_heavy.victim(np.ones(2, bool), 0) == 1  # mix ~95% visual: keep the visual expert
    text_heavy = setup()
    text_heavy.on_access(0, 0, 0, 2, 2, 0)
    text_heavy.on_access(1, 0, 1, 2, 0, 60)
    assert text_heavy.victim(np.ones(2, bool), 0) == 0
    assert text_heavy.modality_weights() == pytest.approx((3 / 64, 61 / 64))


def test_slot_plan_from_budget():
    plan = SlotPlan.from_budget(10, 4)
    assert plan.quota.tolist() == [3, 3, 2, 2] and plan.quota.sum() == 10
    weighted = SlotPlan.from_budget(20, 3, weights=[1, 0, 3])
    assert weighted.quota.sum() == 20 and weighted.quota.min() >= 1 and weighted.quota[2] > weighted.quota[0]
    assert SlotPlan.uniform(8, 4).wave_size(0, 8) == 2
    with pytest.raises(ValueError):
        SlotPlan.from_budget(3, 4)
    with pytest.raises(ValueError):
        SlotPlan([2, 0])


def test_a_layer_at_its_quota_replaces_its_own():
    policy = make("lru", 4, 2, 8)
    policy.on_insert(0, 0, 0, 1)
    policy.on_insert(1, 0, 1, 2)
    policy.on_insert(2, 1, 0, 3)  # slot 3 stays empty
    quota = [2, 2]
    # layer 0 holds 2 = its quota: only its own slots, not the empty one
    assert policy.victim(ALL, 0, quota) == 0
    assert policy.victim(np.array([False, True, True, True]), 0, quota) == 1
    # layer 1 holds 1 < 2: any slot (the empty one first); without a plan likewise
    assert policy.victim(ALL, 1, quota) == 3
    assert policy.victim(ALL, 0) == 3
