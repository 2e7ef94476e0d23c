"""The transformers glue: vismmoe's experts implementation and the hooks it needs on the model.

transformers 5 dispatches every decorated experts module's forward through `ExpertsInterface`; the
function gets the module, `hidden_states [T, H]`, `top_k_index [T, k]` and `top_k_weights [T, k]`
and owns execution. The model's own router has already run, so every router type works unchanged.
Each experts module carries its binding `(runtime, MoE layer position)` (set by `bind`, replaced when
the engine builds a new runtime); a pre-forward hook on each MoE decoder layer hands the hidden state
entering it to the runtime's lookahead predictor.
"""

from __future__ import annotations

import functools

IMPLEMENTATION = "vismmoe_offload"


def offload_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    runtime, layer = self._vismmoe
    return runtime.run_layer(layer, self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, offload_experts_forward)


def install(model, layout) -> None:
    """Run every MoE layer of `model` through vismmoe (once per model; `bind` picks the runtime)."""
    bind(layout, None)
    for layer in layout.layers:
        layer.decoder_layer.register_forward_pre_hook(functools.partial(_predict, layer.experts), with_kwargs=True)
    register()
    model.set_experts_implementation(IMPLEMENTATION)
    for layer in layout.layers:
        if layer.experts.config._experts_implementation != IMPLEMENTATION:
            layer.experts.config._experts_implementation = IMPLEMENTATION


def bind(layout, runtime) -> None:
    """Point every experts module at `runtime` (None: unbound, e.g. while a new runtime is built)."""
    for layer in layout.layers:
        layer.experts._vismmoe = None if runtime is None else (runtime, layer.position)


def _predict(experts, module, args, kwargs):
    binding = getattr(experts, "_vismmoe", None)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if binding is not None and hidden is not None:
        runtime, position = binding
        runtime.predict(position, hidden)
