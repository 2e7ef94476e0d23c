"""Greedy decoding over a static KV cache, one fixed-shape step per token, replayed as a CUDA graph.

transformers' `generate` re-enters Python for every layer of every token (on a GPU with a small model
that is most of the decode time). Here the prefill runs once through the full model (image and all,
experts through the host-decided cache path), and every decode step after it is the same call on
static buffers:

    token -> embeddings -> the text decoder (static KV cache, our own 4-D mask) -> lm_head -> argmax

with the experts decided on the device (`DeviceResidency`) or read straight from a complete cache.
The step also advances its own inputs (next token, positions, mask), so on CUDA it is captured once
per cache length and each token is one graph replay plus one 16-byte readback: the token, and under
`prefetch: auto` the count of prefetch limits on that the step's gate wrote. On the CPU the same step
runs eagerly (that is what the CPU tests compare with transformers).

Under `prefetch: auto` a decoder keeps two steps per cache length: the full one and one without the
lookahead (offload/device_path.py), which would predict and copy nothing where every layer is off but
still costs its launches. Each step the host picks one from what it already knows, the count read back
with the last token and its mirror of the gate's step counter (autoprefetch.LookaheadChoice); both are
captured in the same graph pool (one runs at a time), each once, and switching replays the other.

KV cache length: a request reserves the next of 256, 512, 1024, ... positions above its prompt plus at
most 256 new tokens (never past the model's context), and the cache doubles while decoding when the
answer runs longer; a CUDA graph is captured per cache length, so a grown cache captures once more.
`max_new_tokens` is a limit, not a reservation: a 9-token answer with max_new_tokens=800_000 keeps a
256-position cache.

Positions: the prefill's own position ids (whatever the family computes: M-RoPE rows for Qwen3-VL and
GLM-4.5V, plain positions elsewhere) are recorded, and each decode step continues every row by +1.
"""

from __future__ import annotations

import torch

from .stats import DecodeRun, RequestClock

_CACHE_BUCKET = 256  # cache lengths are this times a power of two, so graphs are reused across requests


class StaticDecoder:
    """Greedy decoding of one request at a time over its own static KV cache.

    Collaborators, all passed in: the model (its prefill, embeddings and lm_head), the text decoder
    that holds the MoE layers, the offload runtime (cache, device residency, prediction ledger) and
    the KV cache. `run` returns a DecodeRun: the tokens, when the first and the last were known, and
    the request's counters."""

    def __init__(self, model, text_model, runtime, kv_cache, max_cache_len: int, *, eos_token_id, image_token_id,
                 graphs: bool, graph_pool=None, capture_stream=None):
        self.model = model
        self.runtime = runtime
        self.device = runtime.cache.device
        self.text_model = text_model
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.image_token_id = image_token_id
        self.kv_cache = kv_cache
        self.max_cache_len = max_cache_len  # positions `kv_cache` holds
        # The model's own forward takes the cache as `cache` from transformers 5.2x on (`past_key_values`
        # is deprecated there with a FutureWarning per call); older versions only know `past_key_values`.
        self.cache_kwarg = _cache_kwarg(model)
        self.text_cache_kwarg = _cache_kwarg(self.text_model)
        attn = model.config.get_text_config()._attn_implementation
        self.additive_mask = attn == "eager"  # eager adds a float mask; sdpa and xformers take booleans
        eos = eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.eos_ids = torch.tensor(eos or [0], **i64)
        self.has_eos = bool(eos)
        # What a step hands back, read in one transfer: [its token, the gate's count of limits on].
        self.readback = torch.zeros(2, **i64)
        # Static inputs of one decode step; the step advances them itself.
        self.token = self.readback[:1].view(1, 1)
        self.kv_len = torch.zeros((), **i64)  # tokens already in the cache = position of this token
        self.min_left = torch.zeros((), **i64)  # steps during which EOS is suppressed (min_new_tokens)
        self.kv_index = torch.arange(self.max_cache_len, **i64)
        self.grown = 0  # how many times this decoder's cache has grown (tests and stats read it)
        self._retired = ()  # the last graphs dropped, held until the next capture (see _retire_graph)
        self.positions = None  # [rows..., 1, 1] recorded from the prefill
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # by "runs the lookahead": at most both
        self.captures = 0  # graphs captured so far (tests read it: switching steps captures nothing)
        # The last request's decode steps of each kind under auto ("full", "no_lookahead"); {} otherwise.
        self.steps: dict = {}
        self.graph_pool = graph_pool  # CUDA graph memory pool shared with the engine's other decoders
        self.capture_stream = capture_stream  # the engine's side stream for warm-up and capture (see _capture)
        self.mode = "graph" if graphs else "eager"

    # -- one request -----------------------------------------------------------------------------

    def grow(self, length: int) -> None:
        """Move the cached keys and values into a cache of `length` positions (on the same device); the
        captured step read the old buffers, so the next step captures again."""
        new = new_kv_cache(self.model.config, length)
        for old_layer, new_layer in zip(self.kv_cache.layers, new.layers):
            if not getattr(old_layer, "is_initialized", True) or getattr(old_layer, "keys", None) is None:
                continue
            try:
                new_layer.lazy_initialization(old_layer.keys, old_layer.values)
            except TypeError:  # versions whose lazy_initialization takes the keys only
                new_layer.lazy_initialization(old_layer.keys)
            new_layer.keys[:, :, : self.max_cache_len].copy_(old_layer.keys)
            new_layer.values[:, :, : self.max_cache_len].copy_(old_layer.values)
            counter = getattr(old_layer, "cumulative_length", None)  # where the next update writes (5.2x)
            if isinstance(counter, torch.Tensor):
                new_layer.cumulative_length = counter.clone()
            elif counter is not None:
                new_layer.cumulative_length = counter
        self.kv_cache = new
        self.max_cache_len = length
        self.kv_index = torch.arange(length, dtype=torch.int64, device=self.device)
        self._retire_graph()
        self.grown += 1

    def run(self, inputs, max_new_tokens: int, min_new_tokens: int, context: int | None) -> DecodeRun:
        """Greedy tokens for `inputs` (this decoder's cache is reset first).

        The caller caps `max_new_tokens` at the model's `context` (prompt + max_new_tokens - 1
        positions are cached at most); the cache grows on the way when the answer needs it."""
        runtime = self.runtime
        clock = RequestClock(runtime.cache)
        runtime.begin_request()
        try:
            tokens = self._decode(inputs, max_new_tokens, min_new_tokens, context, clock)
        finally:
            runtime.end_request()
        return clock.finish(tokens, f"static-{self.mode}", runtime, step_variants=self.steps)

    def _decode(self, inputs, max_new_tokens, min_new_tokens, context, clock) -> list[int]:
        runtime = self.runtime
        self.kv_cache.reset()
        self.steps = {}
        recorded = {}

        def record_positions(module, args, kwargs):
            recorded["position_ids"] = kwargs.get("position_ids")

        input_ids = inputs["input_ids"]
        visual = (input_ids == self.image_token_id).reshape(-1) if self.image_token_id is not None else None
        runtime.begin_step(0, visual)  # the prefill: the host-decided path, with its visual tokens
        hook = self.text_model.register_forward_pre_hook(record_positions, with_kwargs=True)
        try:
            out = self.model(**inputs, **{self.cache_kwarg: self.kv_cache}, use_cache=True, logits_to_keep=1)
        finally:
            hook.remove()
        prompt_len = input_ids.shape[1]
        logits = out.logits[:, -1, :].float()
        if min_new_tokens > 0 and self.has_eos:
            logits[:, self.eos_ids] = float("-inf")
        first = int(logits.argmax(-1))
        clock.first_token()
        tokens = [first]
        if max_new_tokens == 1 or first in self.eos:
            return tokens
        self._set_inputs(first, prompt_len, recorded.get("position_ids"), min_new_tokens - 1)
        runtime.begin_static()
        choice = runtime.lookahead_choice  # None: one step, as captured
        if choice is not None:
            self.steps = {"full": 0, "no_lookahead": 0}
        try:
            for step in range(max_new_tokens - 1):
                position = prompt_len + step  # where this step's token goes in the cache
                if position >= self.max_cache_len:
                    self.grow(cache_length(position + 1, context))
                lookahead = choice is None or choice.lookahead()
                self._run_step(lookahead)
                token, limits_on = self.readback.tolist()  # the one readback of the step
                if choice is not None:
                    choice.read_back(limits_on)
                    self.steps["full" if lookahead else "no_lookahead"] += 1
                tokens.append(token)
                if token in self.eos:
                    break
        finally:
            runtime.end_static()
        return tokens

    def _set_inputs(self, first: int, prompt_len: int, prefill_positions, min_left: int) -> None:
        self.token.fill_(first)
        self.kv_len.fill_(prompt_len)
        self.min_left.fill_(max(min_left, 0))
        if prefill_positions is None:
            positions = torch.full((1, 1), prompt_len, dtype=torch.int64, device=self.device)
        else:
            positions = prefill_positions[..., -1:].to(torch.int64) + 1
        if self.positions is not None and self.positions.shape != positions.shape:
            self._retire_graph()  # a different position layout: the captured step no longer fits
            self.positions = None
        if self.positions is None:
            self.positions = positions.clone()
        else:
            self.positions.copy_(positions)

    # -- the step --------------------------------------------------------------------------------

    def _step(self, lookahead: bool = True) -> None:
        """One decode step on the static buffers (no host sync; capturable); `lookahead` False: without it."""
        self.runtime.begin_static_step(self.readback[1:], lookahead)
        embeds = self.embed(self.token)
        keep = (self.kv_index <= self.kv_len).view(1, 1, 1, -1)
        if self.additive_mask:
            mask = torch.zeros(keep.shape, dtype=embeds.dtype, device=self.device)
            mask = mask.masked_fill(~keep, torch.finfo(embeds.dtype).min)
        else:
            mask = keep
        out = self.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions,
                              **{self.text_cache_kwarg: self.kv_cache}, use_cache=True)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        logits = self.lm_head(hidden[:, -1, :]).float()
        if self.has_eos:
            suppress = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
            suppress.index_fill_(0, self.eos_ids, True)
            logits = logits.masked_fill(suppress & (self.min_left > 0), float("-inf"))
        self.token.copy_(logits.argmax(-1).view(1, 1))
        self.kv_len.add_(1)
        self.positions.add_(1)
        self.min_left.sub_(1).clamp_(min=0)

    def _run_step(self, lookahead: bool = True) -> None:
        if self.mode == "eager":
            self._step(lookahead)
        elif lookahead not in self.graphs:
            self._capture(lookahead)
        else:
            self.graphs[lookahead].replay()

    def _retire_graph(self) -> None:
        """Drop the captured steps, but keep them alive until the next capture has begun: the graphs share
        one memory pool, and torch cannot capture into a shared pool whose graphs are all gone while a
        block of it is still held (an internal assert in capture_begin, which also leaves the CUDA RNG
        in capture mode)."""
        if self.graphs:
            self._retired = tuple(self.graphs.values())
        self.graphs = {}

    def _capture(self, lookahead: bool) -> None:
        """Take this step eagerly on a side stream (the warm-up CUDA graphs need: allocator, cuBLAS and
        Triton initialised), then capture the step on that same stream; the capture executes nothing, so
        later steps replay it. The side stream is the engine's one capture stream, the same for every
        capture: a new stream per capture (as before) drew new streams from torch's pool of 32 per device,
        and cuBLAS keeps a workspace (32 MiB on sm90) per stream it ran on until the process ends."""
        compute = torch.cuda.current_stream(self.device)
        side = self.capture_stream if self.capture_stream is not None else torch.cuda.Stream(device=self.device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            self._step(lookahead)
        compute.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # Our own capture stream on the engine's device (never the default stream, which cannot be
            # captured): torch.cuda.graph's default is one stream per process, made on whichever device
            # was current at the first capture, and a capture on another device's stream records nothing
            # (an empty graph, and replays that do nothing). The warm-up above ran on it and the capture
            # waits for nothing else: torch.cuda.graph synchronizes the device before it begins.
            # One memory pool for every decoder's graphs (`graph_pool`), both steps of a cache length among
            # them: they never run concurrently, and nothing a step allocates outlives it (its results go to
            # static buffers), so the second capture reuses the blocks the first freed.
            with torch.cuda.graph(graph, pool=self.graph_pool, stream=side):
                self._step(lookahead)
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep decoding eagerly, say why
            import warnings

            import traceback

            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[::-1][:4])
            warnings.warn(f"CUDA graph capture of the decode step failed ({exc}; at {where}); decoding eagerly",
                          stacklevel=3)
            self.mode = "eager"  # the next step builds its context afresh (begin_static_step)
            return
        self.graphs[lookahead] = graph
        self.captures += 1
        self._retired = ()  # the new graph keeps the shared pool alive now
        # The warm-up step above already produced this step's token: the graph runs from the next one.


class DecoderPool:
    """The static decoders an engine keeps, by KV cache length, most recently used last.

    Each decoder holds a KV cache (and on a GPU its captured graphs: one, or two under `prefetch: auto`),
    so only the few most recently used are kept. Their graphs share one CUDA graph memory pool: decoders run one at a time, so a graph's
    scratch memory can serve the others' too. A pool belongs to one runtime (captured steps bake in its
    slot pool): the engine builds a new one with every runtime."""

    MAX_HELD = 4

    def __init__(self, model, layout, runtime, *, eos_token_id, image_token_id, cuda_graphs: bool,
                 capture_stream=None):
        self.model, self.layout, self.runtime = model, layout, runtime
        self.capture_stream = capture_stream  # the engine's, kept across runtimes (see StaticDecoder._capture)
        self.eos_token_id, self.image_token_id = eos_token_id, image_token_id
        self.cuda_graphs = runtime.cache.device.type == "cuda" and cuda_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.held: dict[int, StaticDecoder] = {}

    def get(self, prompt_len: int, max_new_tokens: int, context: int | None) -> StaticDecoder:
        """The decoder whose cache fits the prompt and a first bucket of new tokens (it grows as needed).
        Raises NotImplementedError for a model the static cache cannot hold (e.g. sliding windows)."""
        length = initial_cache_length(prompt_len, max_new_tokens, context)
        final = cache_length(prompt_len + max_new_tokens - 1, context)
        if final > length and final in self.held:
            # A held cache already holds the whole request: take it rather than grow another one to its
            # length (which would hold both, and the old buffer, while it grows: deploy/memory.kv_bound).
            length = final
        decoder = self.held.pop(length, None)
        if decoder is None:
            while len(self.held) >= self.MAX_HELD:
                self.held.pop(next(iter(self.held)))
            # Graphs need every op of the step on the device: the grouped kernel (the per-expert loop
            # reads the routing on the host).
            decoder = StaticDecoder(self.model, _text_model(self.model, self.layout), self.runtime,
                                    new_kv_cache(self.model.config, length), length, eos_token_id=self.eos_token_id,
                                    image_token_id=self.image_token_id,
                                    graphs=self.cuda_graphs and self.runtime.grouped, graph_pool=self.graph_pool,
                                    capture_stream=self.capture_stream)
        self.held[length] = decoder
        return decoder

    def refile(self, decoder: StaticDecoder, length: int) -> None:
        """A decoder whose cache grew from `length` during a request is filed under its new length
        (replacing any decoder of that length), so the number of KV caches held stays bounded."""
        if decoder.max_cache_len == length or self.held.get(length) is not decoder:
            return
        del self.held[length]
        self.held.pop(decoder.max_cache_len, None)
        self.held[decoder.max_cache_len] = decoder

    def drop_graphs(self) -> None:
        """The runtime changed what a captured step bakes in (a layer now reads host rows): every decoder
        captures its step again at its next request (the KV caches are kept)."""
        for decoder in self.held.values():
            decoder._retire_graph()

    def kv_bytes(self) -> int:
        """Bytes of every KV cache held."""
        total = 0
        for decoder in self.held.values():
            for layer in decoder.kv_cache.layers:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return total

    def clear(self) -> None:
        self.held = {}


def new_kv_cache(config, length: int):
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=length)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise NotImplementedError("sliding-window attention layers")
    return cache


def _text_model(model, layout):
    first = layout.layers[0].decoder_layer
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(layer is first for layer in layers):
            return module
    raise NotImplementedError("cannot find the text decoder that holds the MoE layers")


def _cache_kwarg(module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def model_context(model) -> int | None:
    """The longest sequence the text model supports (max_position_embeddings), or None if unknown."""
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def cache_length(needed: int, context: int | None) -> int:
    """Positions to reserve for `needed`: the next of 256, 512, 1024, ... never past the model's context."""
    length = _CACHE_BUCKET
    while length < needed:
        length *= 2
    return min(length, context) if context else length


def initial_cache_length(prompt_len: int, max_new_tokens: int, context: int | None) -> int:
    """The cache a request starts with: its prompt and at most one bucket of new tokens (it grows later).
    Where this transformers version's static cache cannot be grown in place, the whole request's length."""
    if not cache_can_grow():
        return cache_length(prompt_len + max_new_tokens - 1, context)
    return cache_length(prompt_len + min(max_new_tokens - 1, _CACHE_BUCKET), context)


_CAN_GROW = None


def cache_can_grow() -> bool:
    """`grow` relies on StaticLayer.lazy_initialization(keys, values) and its on-device write counter
    (`cumulative_length`, transformers 5.2x); checked once on a tiny layer."""
    global _CAN_GROW
    if _CAN_GROW is None:
        import inspect

        from transformers.cache_utils import StaticLayer

        try:
            layer = StaticLayer(max_cache_len=4)
            params = inspect.signature(layer.lazy_initialization).parameters
            _CAN_GROW = isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) and len(params) >= 2
        except Exception:  # noqa: BLE001 - any surprise: reserve the whole request instead of growing
            _CAN_GROW = False
    return _CAN_GROW
