"""The planner's per-layer slot plan (SwapMoE-style): expert-cache slots per MoE layer ("quotas"), chosen
by an exact DP over per-layer curves from replays of the model's routing trace.

With quotas summing to the budget the layers' caches are independent, so one replay with q slots for
every layer gives every layer's figures at q. Two DPs run over them:
  * misses-only: each layer's misses (prefill and decode steps together) at each quota;
  * time-aware: each layer's share of a request's predicted time (ms) at each quota, from the same
    inputs and rates time_model._times charges: decode misses and prefetch reads per token x the
    envelope's new tokens, the prefill's misses on the link and on the host, and the experts a prefill
    computes one at a time where the layer's quota is below the distinct experts it touches
    (host_path.run_layer's waves, loop_expert_ms each), which the misses alone do not see: a plan from
    the bench model's trace gave layer 1 10 slots where its prefills touch ~49 experts, so it looped in
    every request.
Each DP's quotas are replayed and predicted by `_times`; the per-layer plan is the faster (the
misses-only one on a tie), and it replaces one global pool only where its predicted request time
(TTFT + new tokens x decode ms/token) is lower.
"""

from __future__ import annotations

import numpy as np

from .model_info import ModelInfo
from .profiles import DeviceProfile
from .time_model import _times, host_rates, loop_experts, looped_layers, read_ms, request_ms

# How the DP weighs the prefill's two chains, (link, host). TTFT charges max(link, host): the misses'
# copies on the link, and beside them the host's work (per miss prefill_miss_host_ms and an mmap read, per
# expert computed one at a time loop_expert_ms). A DP needs a cost that adds up over layers, and a max of
# two sums does not. For every w in [0, 1], w link + (1 - w) host <= max(link, host), with equality where
# the chain weighed 1 is the longer: with w = 1 or 0 the DP minimises TTFT exactly among the plans where
# that chain dominates, and the weights between cover plans near the crossover. link + host (first)
# bounds the max from above and ranks plans as the max does where one chain is far the longer (the usual
# case: an offloaded prefill is host-bound on a fast link, link-bound on a slow one). No one weighing is
# exact for every trace, so each weighing's quotas are replayed and predicted by `_times` (the max
# included) and the fastest kept, the misses-only plan among the contenders: the plan written is never
# predicted slower than the misses-only one.
CHAIN_WEIGHTS = ((1.0, 1.0), (1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0))


def layer_miss_curves(sim, policy: str, prefetch: str, max_quota: int, min_quota: int = 1) -> np.ndarray:
    """[L, max_quota + 1]: misses of each layer when it holds q slots of its own (inf below min_quota),
    summed over the replay's counted requests (planner._Simulator: all but the first), prefill and decode
    steps together."""
    from ..offload.policies import SlotPlan

    L = sim.model.num_moe_layers
    curves = np.full((L, max_quota + 1), np.inf)
    for q in range(min_quota, max_quota + 1):
        r = sim.run(policy, q * L, prefetch, SlotPlan(np.full(L, q)))
        curves[:, q] = r["misses_per_layer"]
    return curves


def layer_time_curves(sim, policy: str, prefetch: str, slots: int, max_quota: int, min_quota: int = 1) -> dict:
    """Each layer's share of `_times`' inputs when it holds q of the plan's `slots` (the replays of
    layer_miss_curves), [L, max_quota + 1] each, in `_times`' units: `decode_misses` and `decode_prefetch`
    (copies) per decode token, `prefill_misses` per counted request, `loop_experts`: the experts the layer's
    prefill computes one at a time per request (time_model.looped_layers at wave min(slots, q): every
    layer loops where `slots` > ops.MAX_GROUPS, whatever q), averaged over the trace's requests as
    loop_experts averages them. `allowed` [L, max_quota + 1] is False below min_quota. Summed over a
    plan's layers at its quotas they are the plan's own inputs to `_times` (tests/test_time_model.py)."""
    from ..offload.policies import SlotPlan

    L = sim.model.num_moe_layers
    names = ("decode_misses", "decode_prefetch", "prefill_misses", "loop_experts")
    curves = {n: np.zeros((L, max_quota + 1)) for n in names}
    curves["allowed"] = np.zeros((L, max_quota + 1), bool)
    distinct = sim.prefill_distinct_by_request  # [requests, L], every request (as loop_experts counts them)
    for q in range(min_quota, max_quota + 1):
        r = sim.run(policy, q * L, prefetch, SlotPlan(np.full(L, q)))
        curves["decode_misses"][:, q] = r["decode_misses_per_layer_per_token"]
        curves["decode_prefetch"][:, q] = r["decode_prefetch_per_layer_per_token"]
        curves["prefill_misses"][:, q] = r["prefill_misses_per_layer"]
        if len(distinct):
            curves["loop_experts"][:, q] = (distinct * looped_layers(distinct, slots, np.full(L, q), sim.model)).mean(0)
        curves["allowed"][:, q] = True
    return curves


def layer_cost_curves(curves: dict, profile: DeviceProfile, miss_ms: float, read: float, new_tokens: float,
                      link_weight: float = 1.0, host_weight: float = 1.0) -> np.ndarray:
    """[L, Q + 1] ms per request of each layer at each quota (inf where not allowed), from
    layer_time_curves and `_times`' rates: `new_tokens` decode tokens' misses (miss_ms each) and prefetch
    copies' disk reads (`read`: an mmap store's, else 0), plus the prefill's link chain (misses x miss_ms)
    and host chain (misses x (prefill_miss_host_ms + read) + loop experts x loop_expert_ms), weighed as
    CHAIN_WEIGHTS says. (The link time of prefetch copies, which `_times` charges only where it exceeds
    the step's compute, is left to the replayed prediction that picks among the DPs' plans.)"""
    per_loop_expert, per_miss_host = host_rates(profile)
    decode = new_tokens * (curves["decode_misses"] * miss_ms + curves["decode_prefetch"] * read)
    link = curves["prefill_misses"] * miss_ms
    host = curves["prefill_misses"] * (per_miss_host + read) + curves["loop_experts"] * per_loop_expert
    return np.where(curves["allowed"], decode + link_weight * link + host_weight * host, np.inf)


def best_quotas(curves: np.ndarray, slots: int) -> np.ndarray:
    """Quotas (>= 1 each, summing to `slots`) minimising the summed cost: exact DP over any [L, Q + 1]
    per-layer cost curves (misses: layer_miss_curves, or ms: layer_cost_curves; inf = not allowed)."""
    L, Q = curves.shape[0], curves.shape[1] - 1
    if slots < L or slots > L * Q:
        raise ValueError(f"{slots} slots cannot be split over {L} layers with quotas 1..{Q}")
    cost = np.full(slots + 1, np.inf)
    cost[0] = 0.0
    choice = np.zeros((L, slots + 1), np.int64)
    for layer in range(L):
        new = np.full(slots + 1, np.inf)
        for q in range(1, min(Q, slots) + 1):
            cand = np.full(slots + 1, np.inf)
            cand[q:] = cost[:slots + 1 - q] + curves[layer, q]
            better = cand < new
            new[better], choice[layer, better] = cand[better], q
        cost = new
    quotas, s = np.zeros(L, np.int64), slots
    for layer in range(L - 1, -1, -1):
        quotas[layer] = choice[layer, s]
        s -= quotas[layer]
    return quotas


def plan_times(model: ModelInfo, profile: DeviceProfile, dtype: str, chosen, r: dict, quotas, sim, prompt: int) -> dict:
    """`_times` of the planner's chosen candidate under per-layer `quotas`, from their replay `r`."""
    looped_experts, looped = loop_experts(sim.prefill_distinct_by_request, chosen.budget_slots, quotas, model)
    predicted = _times(model, profile, dtype, chosen.decode_path, False, chosen.miss_ms, r["decode_misses_per_token"],
                       r["prefill_misses"], r["decode_prefetch_per_token"] if chosen.prefetch else 0.0, prompt,
                       looped_experts, read_ms(profile, chosen.store, model.expert_bytes(dtype)), prefetch=chosen.prefetch)
    predicted["prefill_looped_layers"] = looped
    return predicted


def per_layer_plans(model: ModelInfo, profile: DeviceProfile, dtype: str, chosen, sim, prompt: int,
                    new_tokens: int) -> list[dict]:
    """The contenders for the chosen candidate's budget: the misses-only DP's plan first, then the
    time-aware DP's under each CHAIN_WEIGHTS weighing; each a dict of `quotas`, its `replay`, `predicted`
    (plan_times) and `request_ms` (TTFT + `new_tokens` x decode ms/token)."""
    from ..offload.policies import SlotPlan

    L, E, S, k = model.num_moe_layers, model.num_experts, chosen.budget_slots, model.top_k
    prefetch = "trace" if chosen.prefetch else "none"
    max_quota = min(E, S - L * k + k)
    read = read_ms(profile, chosen.store, model.expert_bytes(dtype))
    quotas = [best_quotas(layer_miss_curves(sim, chosen.policy, prefetch, max_quota, min_quota=k), S)]
    curves = layer_time_curves(sim, chosen.policy, prefetch, S, max_quota, min_quota=k)
    quotas += [best_quotas(layer_cost_curves(curves, profile, chosen.miss_ms, read, new_tokens, *w), S)
               for w in CHAIN_WEIGHTS]
    plans = []
    for q in quotas:
        r = sim.run(chosen.policy, S, prefetch, SlotPlan(q))
        predicted = plan_times(model, profile, dtype, chosen, r, q, sim, prompt)
        plans.append(dict(quotas=q, replay=r, predicted=predicted, request_ms=request_ms(predicted, new_tokens)))
    return plans


def choose_slot_plan(model: ModelInfo, profile: DeviceProfile, dtype: str, chosen, sim, prompt: int,
                     new_tokens: int) -> tuple[list | None, str]:
    """(quotas or None for one global pool, why). The per-layer plan is the time-aware DP's fastest
    where it is predicted faster than the misses-only DP's, else the latter; it replaces the global pool
    only where its predicted request time is lower than the pool's (`chosen.predicted`), and the chosen
    candidate's predictions (and `per_layer_plan` hit rate) are then the plan's."""
    from ..offload.policies import SlotPlan

    L, E, S, k = model.num_moe_layers, model.num_experts, chosen.budget_slots, model.top_k
    if S >= L * E:
        return None, "every expert resident: no eviction, no plan needed"
    if S < L * k:
        return None, f"{S} slots are fewer than top-k = {k} for each of the {L} layers: one global pool"
    if sim is None:
        return None, "one global pool (the routing prior makes all layers alike: no trace to plan from)"
    plans = per_layer_plans(model, profile, dtype, chosen, sim, prompt, new_tokens)
    by_misses = plans[0]
    aware = min(plans[1:], key=lambda p: p["request_ms"])  # the first of the fastest
    plan = aware if aware["request_ms"] < by_misses["request_ms"] else by_misses
    prefetch = "trace" if chosen.prefetch else "none"
    uniform = sim.run(chosen.policy, S, prefetch, SlotPlan.uniform(S, L))
    glob = sim.run(chosen.policy, S, prefetch)
    glob_ms = request_ms(chosen.predicted, new_tokens)
    chosen.request_ms.update(global_pool=glob_ms, per_layer_plan=plan["request_ms"],
                             misses_only_plan=by_misses["request_ms"])
    chosen.hit_rates.update(per_layer_plan=plan["replay"]["hit_rate"], misses_only_plan=by_misses["replay"]["hit_rate"],
                            uniform_plan=uniform["hit_rate"])
    other = by_misses if plan is aware else aware
    why = (f"simulated hit rate {plan['replay']['hit_rate']:.1%} per-layer plan vs {uniform['hit_rate']:.1%} uniform "
           f"and {glob['hit_rate']:.1%} global pool; predicted request (TTFT + {new_tokens} x decode) "
           f"{plan['request_ms']:.1f} ms per-layer plan {plan['quotas'].tolist()} vs {glob_ms:.1f} ms global pool. "
           "The per-layer plan is the "
           + ("time-aware DP's (on each layer's predicted ms per quota: misses and prefill loops)" if plan is aware
              else "misses-only DP's (on each layer's replayed misses)")
           + f"; the {'misses-only' if plan is aware else 'time-aware'} DP's {other['quotas'].tolist()} "
           f"({other['replay']['hit_rate']:.1%} hits) predicted {other['request_ms']:.1f} ms")
    if not plan["request_ms"] < glob_ms:
        return None, f"one global pool: {why}"
    chosen.predicted = plan["predicted"]
    return plan["quotas"].tolist(), f"per-layer plan: {why}"
