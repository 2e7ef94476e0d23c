"""transformers' `generate` as a decode loop: the path for sampling, traces and other generation arguments.

transformers owns this loop, so a pre-forward hook on the top model marks each of its forward steps
(0 = the prefill) and builds that step's context in the runtime (offload/context.py); every layer
call then takes the host-decided path. The hook does nothing outside `run`. Like the static decoder,
`run` returns a DecodeRun: the tokens, when the first and the last were known, and the counters.
"""

from __future__ import annotations

from .stats import DecodeRun, RequestClock


class GenerateDecoder:
    def __init__(self, model, image_token_id: int | None):
        self.model = model
        self.image_token_id = image_token_id
        self._runtime = None  # set while `run` runs
        self._clock = None
        self._index = -1
        model.register_forward_pre_hook(self._begin_step, with_kwargs=True)

    def run(self, runtime, inputs, generate_kwargs: dict) -> DecodeRun:
        clock = RequestClock(runtime.cache)
        runtime.begin_request()
        self._runtime, self._clock, self._index = runtime, clock, -1
        try:
            output = self.model.generate(**inputs, **generate_kwargs)
        finally:
            self._runtime = self._clock = None
            runtime.end_request()
        tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
        return clock.finish(tokens, "generate", runtime)

    def _begin_step(self, module, args, kwargs):
        runtime = self._runtime
        if runtime is None:
            return
        if self._index == 0:
            self._clock.first_token()  # the previous step was the prefill, and its token has been sampled by now
        self._index += 1
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        visual = None
        if input_ids is not None and self.image_token_id is not None and self._index == 0:
            visual = (input_ids == self.image_token_id).reshape(-1)
        runtime.begin_step(self._index, visual)
