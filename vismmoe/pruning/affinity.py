"""The affinity method: keep visual tokens that cover the image while concentrating expert demand.

1. Routing: each visual token's routing distribution at the first `layers` MoE layers, from those
   layers' own routers applied to the token's normed embedding (the router after the layer's
   pre-MoE norm, as the lookahead predictor does; vismmoe/offload/predictor.py). Softmax routers give
   their softmax; sigmoid routers (GLM-4.5V) their sigmoid scores normalised to sum 1.
2. Dominant visual-expert set D: the fewest experts that hold half of the request's summed visual
   routing mass.
3. Greedy selection of k tokens. Token i's score when it is considered:
       w_importance    * relevance_i      (text-conditioned relevance, as the importance method)
     + w_concentration * mass_i(D)        (its routing mass on the dominant set)
     + w_diversity     * d_i              (distance to its nearest kept token)
   where d_i mixes embedding and routing distance, d = (1 - w_routing) * d_embed + w_routing * d_route
   (cosine distances), so tokens whose routing distributions are near-duplicates of a kept token's
   count as redundant even when their embeddings differ a little. Relevance and mass are rescaled to
   [0, 1] over the request's visual tokens so the weights are comparable. The first pick is the token
   with the best relevance + mass. The greedy loop is greedy.py's (a distance matrix and one numba loop
   on the host), shared with the diversity method.
Weights are configuration (visual_affinity_weights); the defaults (settings.py) were chosen by measured
accuracy retention on the two bundled models. Measured there, the concentration term costs accuracy as
soon as it outweighs diversity: a request's dominant visual experts are mostly its background's, so
mass on them favours background tokens. The default keeps it at a quarter of the diversity weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..offload.predictor import _pre_router_norm, _router
from .greedy import greedy_max_min
from .methods import Selection, VisualTokens, relevance, unit


def routing_distributions(layout, embeds: torch.Tensor, layers: int) -> torch.Tensor:
    """[N, E] mean routing distribution of `embeds` over the first `layers` MoE layers' routers."""
    total = None
    used = 0
    for layer in layout.layers[:layers]:
        router, norm = _router(layer.block), _pre_router_norm(layer.decoder_layer)
        weight = getattr(router, "weight", None) if router is not None else None
        if weight is None or norm is None:
            continue
        x = norm(embeds.to(weight.device, dtype=next(norm.parameters()).dtype))
        logits = F.linear(x.float(), weight.float())
        if hasattr(router, "e_score_correction_bias"):  # sigmoid router (GLM-4.5V, DeepSeek-V3 style)
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = logits.softmax(-1)
        total = probs if total is None else total + probs
        used += 1
    if total is None:
        raise NotImplementedError("no MoE layer with a linear router and a pre-MoE norm to score visual tokens")
    return total / used


def dominant_set(routing: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """Bool [E]: the fewest experts holding `mass` of the summed routing mass."""
    demand = routing.sum(0)
    order = demand.argsort(descending=True)
    cum = demand[order].cumsum(0) / demand.sum()
    n = int((cum < mass).sum()) + 1
    chosen = torch.zeros_like(demand, dtype=torch.bool)
    chosen[order[:n]] = True
    return chosen


def _rescale(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def select_affinity(tokens: VisualTokens, k: int, weights: dict) -> Selection:
    routing = tokens.routing
    rel = _rescale(relevance(tokens))
    mass = _rescale(routing[:, dominant_set(routing)].sum(-1))
    base = weights["importance"] * rel + weights["concentration"] * mass
    w_route = min(max(weights["routing"], 0.0), 1.0)
    terms = [(unit(tokens.embeds), 1 - w_route), (unit(routing), w_route)]
    kept = greedy_max_min(terms, k, int(base.argmax()), base, weights["diversity"])
    return Selection(kept=kept)
