"""The engine: load a checkpoint with its experts offloaded, answer image + prompt requests.

It builds and wires: the model and the host store (loading.py), the expert cache and the offload
runtime (offload/), the transformers glue (offload/glue.py) and the two decode loops, static decode
(static_decode.py, on the device-decided path) and transformers' generate (generate_decode.py). A
request picks its loop, runs it, and turns the run's counters into RequestStats (stats.py).

Why it is over ~400 lines: it is the one public object (load, generate, reconfigure, warm_up, info,
reset_stats, traces, close) and each of those validates its input and says what to do instead; the
work itself lives in the modules named above.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import adapters, ops
from .checkpoint import checkpoint_files
from .config import EngineConfig, check_keys, load_config
from .errors import ConfigError, EngineClosedError, InputError, ModelLoadError
from .generate_decode import GenerateDecoder
from .layers.rms_norm import fuse_rms_norms
from .layers.rotary import fuse_rotary
from .layers.router import fuse_routers
from .inputs import (GENERATION_RULES, build_inputs, check_prompt, generate_parameters, load_image, load_processor,
                     placeholder_tokens)
from .loading import (budget_to_slots, generation_config, load_non_expert_weights, release_expert_params,
                      resolve_auto_budget, resolve_dtype)
# deploy/model_info.py and tests import these from here.
from .loading import load_hf_config as _load_hf_config, model_class as _model_class, resolve_device as _resolve_device
from .offload import glue
from .offload.cache import ExpertCache
from .offload import miss_paths
from .offload.device_path import device_copies_work
from .offload.predictor import LookaheadPredictor
from .offload.runtime import OffloadRuntime
from .offload.store import ExpertStore
from .pruning.settings import is_off as _pruning_off
from .static_decode import DecoderPool, model_context
from .stats import EngineInfo, RequestStats, dynamic_kv_bytes, memory_parts, request_stats, tensor_bytes

if TYPE_CHECKING:
    from .offload.trace import TraceRecorder


def _on_engine_device(method):
    """Run `method` with the engine's GPU as the current CUDA device.

    Streams, events, Triton launches, CUDA graphs and their memory pool follow the current device, and a
    caller's current device is normally cuda:0: an engine on cuda:1 (or two engines on two GPUs in one
    process) must not depend on it.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stats: RequestStats


def load(model_dir, config=None, **overrides) -> "Engine":
    """Load a local Hugging Face checkpoint directory with its experts offloaded.

    `config` is a YAML path, a dict or an EngineConfig; keyword overrides win (e.g. expert_budget=0.25).
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise ModelLoadError(f"model_dir must be the path of a checkpoint directory, got {type(model_dir).__name__} "
                             f"{model_dir!r}")
    return Engine(model_dir, load_config(config, **overrides))


class Engine:
    def __init__(self, model_dir, config: EngineConfig):
        self.config = config
        self.model_dir = Path(model_dir)
        self.device = _resolve_device(config.device)
        files = checkpoint_files(self.model_dir)
        # Only the boolean True runs checkpoint code (EngineConfig already refuses strings such as "false").
        hf_config = _load_hf_config(self.model_dir, config.trust_remote_code is True)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        model_cls = _model_class(hf_config)
        try:
            with torch.device("meta"):
                skeleton = model_cls(hf_config)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ModelLoadError(f"{self.model_dir}/config.json does not describe a buildable "
                                 f"{hf_config.model_type!r} model ({type(exc).__name__}: {exc})") from None
        self.layout = adapters.discover(skeleton)
        self.config = config = resolve_auto_budget(config, self.model_dir, self.device, self.dtype)
        self.num_slots = budget_to_slots(config.expert_budget, self.layout, self.dtype)
        _check_static_settings(config, self.num_slots, self.layout)
        self.slot_plan = _slot_plan(config, self.num_slots, self.layout)
        self.model = load_non_expert_weights(model_cls, hf_config, files, self.layout, self.dtype, config)
        del skeleton
        self.layout = adapters.discover(self.model)
        release_expert_params(self.layout, self.dtype)
        self.model.to(self.device).eval()
        self.fused_norms = 0  # RMSNorm modules on the fused kernel (set with the runtime: norm_kernel)
        self.fused_routers = 0  # routers on the fused kernel (set with the runtime: router_kernel)
        self.fused_rotary = 0  # modeling modules whose rotary embedding takes the kernel (rope_kernel)
        self.non_expert_bytes = sum(t.numel() * t.element_size() for t in
                                    (*self.model.parameters(), *self.model.buffers()))
        self.layout_record_bytes = self.layout.record_numel * torch.empty((), dtype=self.dtype).element_size()
        self.emulation = _emulation(config, self)
        # The one side stream every CUDA-graph capture of this engine runs on (static_decode: a stream per
        # capture left a cuBLAS workspace per stream behind; deploy/memory.py counts this one).
        self.capture_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

        self.trace = None
        self.closed = False
        self._requests = 0
        self._device_copies = None  # can static decode copy misses on the device? (checked once)
        self.store = ExpertStore(self.layout, files, self.dtype, mode=config.store,
                                 pin=config.store == "pinned" and self.device.type == "cuda", device=self.device)
        self.image_token_id = adapters.image_token_id(hf_config)
        self.processor = load_processor(self.model_dir)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.generation_config = generation_config(self.model_dir, self.model, self.tokenizer)
        self.context = model_context(self.model)
        # Placeholder tokens the processor expands for images/videos: a prompt must not contain them.
        self._placeholders = placeholder_tokens(self.processor, self.tokenizer, self.image_token_id)
        glue.install(self.model, self.layout)
        if self.emulation is not None:
            self.emulation.calibrate(self.store)  # this machine's copy times, before any copy is paced
            if self.store.slab is None:  # mmap: every record read is held to the emulated disk's time
                self.store.read_pacer = self.emulation
        self.generate_decoder = GenerateDecoder(self.model, self.image_token_id)
        self._build_runtime()
        self.pruner = None  # built on the first request that prunes: keep 1.0 leaves the model untouched
        self.last_pruning = None  # PruneRecord of the last pruned request (kept indices, timing)
        self._check_pruning(config)
        if self.emulation is not None:
            self.emulation.cap_allocator()  # last: a failed load leaves no cap behind

    def _check_pruning(self, config: EngineConfig) -> None:
        from .pruning import VisualPruner

        if self.image_token_id is not None and not _pruning_off(config.visual_keep):
            VisualPruner.check_supported(self.model.config.model_type)

    def _visual_pruner(self):
        if self.pruner is None:
            from .pruning import VisualPruner

            self.pruner = VisualPruner(self.model, self.layout, self.image_token_id)
        return self.pruner

    @_on_engine_device
    def _build_runtime(self) -> None:
        config = self.config
        grouped, fused = self._experts_kernels()  # validates experts_kernel before the old runtime is torn down
        store_kind = "mmap" if self.store.slab is None else "page-locked" if self.store.pinned else "pageable"
        miss_paths.check_setting(config.miss_path, config.decode, store_kind, self.device.type == "cuda", fused)
        # Before any decoder captures the model's forward; raises ConfigError before anything changed.
        self.fused_norms = fuse_rms_norms(self.model, self.device, config.norm_kernel)
        self.fused_routers = fuse_routers(self.model, self.device, config.router_kernel)
        self.fused_rotary = fuse_rotary(self.model, self.device, self.dtype, config.rope_kernel)
        if self.device.type == "cuda":
            # Copies may still be writing into the old slot pool on the copy stream: let them land
            # before its memory goes back to the allocator.
            torch.cuda.synchronize(self.device)
        # Drop every reference to the old slot pool before allocating the new one (peak = one pool).
        self.cache = self.runtime = self.decoders = None
        glue.bind(self.layout, None)
        self.cache = ExpertCache(self.store, self.num_slots, self.device, config.policy, slot_plan=self.slot_plan)
        self.cache.measure_stalls = config.measure_stalls
        self.cache.pacer = self.emulation  # paces expert copies to an emulated device's link, or None
        if self.num_slots >= len(self.layout.layers) * self.layout.num_experts:
            self.cache.load_all()
        predictor = LookaheadPredictor(self.layout, config.prefetch_depth) if config.prefetch else None
        self.runtime = OffloadRuntime(self.cache, self.layout.is_transposed, predictor,
                                      prefetch_limit=config.prefetch_limit or self.layout.top_k,
                                      grouped=grouped, prefetch_prefill=config.prefetch_prefill, fused_decode=fused,
                                      auto_prefetch=config.prefetch == "auto")
        if not self.cache.complete and self._device_copies_work():
            self.runtime.use_device_residency(self.layout.top_k, zero_copy=config.miss_path in ("auto", "zerocopy") and
                                              miss_paths.zero_copy_runs(self.store, self.device, self.runtime.compute))
        # Each layer's miss path (auto: measured at load on a GPU, into the still empty slots).
        self.miss = miss_paths.MissPathControl(config.miss_path, self.runtime, self.store, self.layout, self.num_slots,
                                               config.decode, self.emulation)
        glue.bind(self.layout, self.runtime)
        # Captured decode steps bake in the runtime and its slot pool: new decoders with a new runtime.
        self.decoders = DecoderPool(self.model, self.layout, self.runtime,
                                    eos_token_id=self.generation_config.eos_token_id,
                                    image_token_id=self.image_token_id, cuda_graphs=config.cuda_graphs,
                                    capture_stream=self.capture_stream)
        if self.trace is not None:
            self.runtime.add_observer(self.trace)

    # -- routing traces --------------------------------------------------------------------------

    def start_trace(self, model_name: str = "") -> "TraceRecorder":
        """Record every layer call's routed experts (and lookahead predictions) from now on."""
        from .offload.trace import TraceRecorder

        self.stop_trace()
        self.trace = TraceRecorder(len(self.layout.layers), self.layout.num_experts, self.layout.top_k,
                                   self.store.record_bytes, model_name or str(self.model_dir))
        self.runtime.add_observer(self.trace)
        return self.trace

    def stop_trace(self, path=None):
        """Stop recording; save the trace to `path` if given. Returns the recorder (or None)."""
        recorder, self.trace = self.trace, None
        if recorder is not None:
            self.runtime.remove_observer(recorder)
            if path is not None:
                recorder.save(path)
        return recorder

    def _experts_kernels(self) -> tuple[bool, bool]:
        """(grouped GEMMs for the expert compute, the fused decode kernel for steps of <= 16 tokens)."""
        kernel = self.config.experts_kernel
        grouped = ops.grouped_mm_available(self.device, self.dtype)
        if kernel == "grouped_mm" and not grouped:
            raise ConfigError(
                f"experts_kernel: grouped_mm needs a CUDA device and bfloat16 (here {self.device}, {self.dtype}); "
                "use auto or loop"
            )
        fused = kernel in ("auto", "fused") and ops.fused_moe_usable(self.layout.layers[0].experts, self.device)
        if kernel == "fused" and not fused:
            raise ConfigError(
                f"experts_kernel: fused needs a CUDA device with triton, an experts module whose gate is "
                f"SiLU(gate) * up, and a kernel that passed its check against the torch twin (here {self.device}); "
                "use auto, grouped_mm or loop")
        return grouped and kernel != "loop", fused

    _RECONFIGURABLE = {"expert_budget", "budget", "policy", "prefetch", "prefetch_depth", "prefetch_limit",
                       "measure_stalls", "max_new_tokens", "do_sample", "experts_kernel", "norm_kernel", "router_kernel", "rope_kernel",
                       "prefetch_prefill", "decode", "cuda_graphs", "visual_keep", "visual_prune", "visual_merge",
                       "visual_affinity_weights", "visual_affinity_layers", "visual_prune_seed"}
    _RECONFIGURABLE |= {"slot_plan", "miss_path"}  # per-layer quotas, miss paths: a new runtime

    def _device_copies_work(self) -> bool:
        """Can misses be copied by device-decided work (static decode)? Checked once per engine."""
        if self._device_copies is None:
            self._device_copies = device_copies_work(self.store, self.device, self.dtype)
        return self._device_copies

    def reconfigure(self, **overrides) -> "Engine":
        """Change cache and prefetch settings without reloading the model or the host store.

        The GPU cache starts empty again. Settings that need a reload (device, dtype, store,
        attention) raise ConfigError: use vismmoe.load for those.
        """
        self._check_open()
        check_keys(overrides, "reconfigure()")  # an unknown key is a typo, not a setting that needs a reload
        fixed = sorted(set(overrides) - self._RECONFIGURABLE)
        if fixed:
            raise ConfigError(f"{fixed} cannot change on a loaded engine; call vismmoe.load with the new values")
        config = self.config.replace(**{("expert_budget" if k == "budget" else k): v for k, v in overrides.items()})
        config = resolve_auto_budget(config, self.model_dir, self.device, self.dtype)
        num_slots = budget_to_slots(config.expert_budget, self.layout, self.dtype)
        _check_static_settings(config, num_slots, self.layout)
        slot_plan = _slot_plan(config, num_slots, self.layout)
        if self.emulation is not None:
            self.emulation.check_engine(self, num_slots)
        self._check_pruning(config)
        if self._set_prefetch_in_place(config, num_slots):
            return self
        previous = self.config, self.num_slots, self.slot_plan
        self.config, self.num_slots, self.slot_plan = config, num_slots, slot_plan
        try:
            self._build_runtime()
        except ConfigError:  # raised before the old runtime is touched: it keeps serving
            self.config, self.num_slots, self.slot_plan = previous
            raise
        return self

    def _set_prefetch_in_place(self, config, num_slots: int) -> bool:
        """Only the prefetch switch, limit or a smaller depth changed, on a runtime built with prefetch:
        set the controls (device scalars on the static path) and keep the cache and captured graphs."""
        changed = {k for k in ("prefetch", "prefetch_limit", "prefetch_depth") if getattr(config, k) != getattr(self.config, k)}
        same_rest = config.replace(**{k: getattr(self.config, k) for k in changed}) == self.config
        if (not changed or not same_rest or num_slots != self.num_slots or self.runtime.predictor is None
                or config.prefetch_depth > self.runtime.depth
                or (config.prefetch == "auto") != (self.runtime.auto is not None)):  # auto: its own runtime
            return False
        self.runtime.set_prefetch(limit=(config.prefetch_limit or self.layout.top_k) if config.prefetch else 0,
                                  depth=config.prefetch_depth)
        self.config = config
        return True

    # -- requests ----------------------------------------------------------------------------------

    @_on_engine_device
    def generate(self, image=None, prompt: str = "", max_new_tokens: int | None = None, request_id=None,
                 **generation_kwargs) -> Result:
        """Answer `prompt` about `image` (a path, a PIL image or None). Greedy unless do_sample=True.

        `request_id` names the request in a routing trace being recorded (see start_trace).
        Every bad argument raises InputError naming it, before any work; the engine keeps serving."""
        self._check_open()
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        # Generation arguments are checked before the inputs are built: an error later, while decoding,
        # is reported as what it is.
        generation_config, kwargs = self._generation_arguments(max_new_tokens, generation_kwargs)
        t_start = time.perf_counter()
        pil = load_image(image)
        check_prompt(prompt, self._placeholders)
        inputs = build_inputs(self.processor, pil, prompt).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs_s = time.perf_counter() - t_start  # (host work: the copies are queued, not waited for)
        input_ids = inputs["input_ids"]
        prompt_len = int(input_ids.shape[1])
        if self.context is not None:
            if prompt_len > self.context:
                raise InputError(
                    f"the prompt is {prompt_len} tokens (image included) but the model's context is {self.context} "
                    "tokens; shorten the prompt or use a smaller image")
            # The answer ends where the context does (the last token needs no cache position).
            max_new_tokens = min(max_new_tokens, self.context - prompt_len + 1)
            generation_config.max_new_tokens = max_new_tokens
        visual_total = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        pruning = None
        self._clear_pruning()  # nothing armed by an earlier request that failed half-way may reach this one
        if visual_total and not _pruning_off(self.config.visual_keep):
            with torch.inference_mode():
                pruning = self._visual_pruner().prune(inputs, self.config, override_decode=True)
            if pruning is not None:
                inputs, self.last_pruning = pruning
                input_ids = inputs["input_ids"]

        if self.miss.before_request():  # auto moved a layer to zero-copy whose captured steps read no host rows
            self.decoders.drop_graphs()
        static_reason = self._static_unavailable(generation_kwargs)
        decoder = None
        if static_reason is None:
            try:
                decoder = self.decoders.get(int(input_ids.shape[1]), max_new_tokens, self.context)  # pruned length
            except NotImplementedError as exc:  # e.g. sliding-window layers: the static cache cannot hold them
                static_reason = f"static decode does not support this model ({exc})"
        if static_reason and self.config.decode == "static":
            self._clear_pruning()
            raise InputError(f"decode: static cannot serve this request: {static_reason}; use decode: auto")
        if self.emulation is not None:
            try:
                emulated = self.emulation.check_request(self, int(input_ids.shape[1]), max_new_tokens, decoder,
                                                        visual_total)
            except ConfigError:
                self._clear_pruning()
                raise
        if pruning is not None and decoder is not None:
            self.pruner.state.override_decode = False  # static decode continues the recorded positions itself
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.trace is not None:
            self._requests += 1
            self.trace.begin_request(request_id if request_id is not None else self._requests)
        try:
            with torch.inference_mode():
                if decoder is not None:
                    length = decoder.max_cache_len
                    try:
                        run = decoder.run(inputs, max_new_tokens, int(generation_kwargs.get("min_new_tokens") or 0),
                                          self.context)
                    finally:
                        self.decoders.refile(decoder, length)
                else:
                    run = self.generate_decoder.run(self.runtime, inputs, kwargs)
        finally:
            self._clear_pruning()
            if self.trace is not None:
                self.trace.end_request()
        prompt_tokens = int(input_ids.shape[1])
        stats = request_stats(
            run, started_at=t_start, prompt_tokens=prompt_tokens, visual_total=visual_total,
            visual_kept=len(pruning[1].kept) if pruning is not None else visual_total,
            pruning_s=pruning[1].seconds if pruning is not None else 0.0, budget_bytes=self.cache.budget_bytes,
            num_slots=self.num_slots, record_bytes=self.store.record_bytes, device=self.device, inputs_s=inputs_s)
        dynamic_kv = prompt_tokens + len(run.tokens) if run.path == "generate" else 0
        stats.memory = self._memory_parts(dynamic_kv, stats.peak_gpu_bytes)
        stats.miss_paths = self.miss.names()
        if self.emulation is not None:
            stats.emulation = self.emulation.request_report(emulated, stats.peak_gpu_bytes)
        text = self.tokenizer.decode(run.tokens, skip_special_tokens=True)
        return Result(text=text, token_ids=run.tokens, stats=stats)

    def warm_up(self, image=None, prompt: str = "", max_new_tokens: int | None = None) -> None:
        """Answer one request and discard it, so that JIT compilation (numba, Triton) and CUDA graph
        capture happen here rather than in the first measured request. Nothing is recorded while a
        routing trace is being recorded (the trace would gain a request)."""
        if self.trace is None:
            self.generate(image=image, prompt=prompt, max_new_tokens=max_new_tokens)

    def info(self) -> EngineInfo:
        """What this engine is and how it serves now (model, device, cache, store, decode path, kernels,
        prefetch), as one record: for logs and benchmark reports (`dataclasses.asdict` or `.to_dict()`)."""
        self._check_open()
        config, layout, cache = self.config, self.layout, self.cache
        static_unavailable = self._static_unavailable({})
        # The slot pool is computed over in one op when every expert is resident or the slots fit the
        # grouped kernel's group limit; else expert by expert (the host-decided path's rule).
        pooled = cache.complete or self.num_slots <= ops.MAX_GROUPS
        prefill_kernel = "grouped_mm" if self.runtime.grouped and pooled else "loop"
        return EngineInfo(
            model_dir=str(self.model_dir), model_type=layout.model_type, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), layers=len(layout.layers), experts=layout.num_experts,
            top_k=layout.top_k, record_bytes=self.store.record_bytes, num_slots=self.num_slots,
            budget_bytes=cache.budget_bytes, all_resident=cache.complete, policy=config.policy, store=config.store,
            host_store_kind="mmap" if self.store.slab is None else "page-locked" if self.store.pinned else "pageable",
            host_store_bytes=0 if self.store.slab is None else self.store.total_bytes,
            non_expert_bytes=self.non_expert_bytes, decode=config.decode,
            decode_path="generate" if static_unavailable else "static", static_unavailable=static_unavailable,
            cuda_graphs=config.cuda_graphs, experts_kernel=config.experts_kernel, prefill_kernel=prefill_kernel,
            norm_kernel=config.norm_kernel, fused_norms=self.fused_norms,
            router_kernel=config.router_kernel, fused_routers=self.fused_routers,
            rope_kernel=config.rope_kernel, fused_rotary=self.fused_rotary,
            decode_kernel="fused" if self.runtime.fused_decode and pooled else prefill_kernel,
            prefetch=config.prefetch, prefetch_depth=config.prefetch_depth,
            prefetch_auto=None if self.runtime.auto is None else self.runtime.auto.info(),
            prefetch_limit=config.prefetch_limit or layout.top_k, prefetch_prefill=config.prefetch_prefill,
            emulation=None if self.emulation is None else self.emulation.info(), miss_path=config.miss_path,
            miss_paths=self.miss.info())

    def reset_stats(self) -> None:
        """Zero the request counters (expert hits and misses, bytes copied, the prefetch ledger, prediction
        scores) and the CUDA peak-memory statistic. generate() starts every request this way; call it to
        measure work done outside a request, or to drop a warm-up's counts."""
        self._check_open()
        self.cache.reset_counters()
        self.runtime.begin_request()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _memory_parts(self, dynamic_kv_tokens: int, peak) -> dict:
        """Bytes by part (stats.memory_parts): the KV caches are every static cache the engine keeps,
        plus what this request's dynamic cache held for `dynamic_kv_tokens` on the generate path."""
        kv = self.decoders.kv_bytes()
        if dynamic_kv_tokens:
            kv += dynamic_kv_bytes(self.model.config.get_text_config(), dynamic_kv_tokens,
                                   self.store.record_bytes // self.store.record_numel)
        return memory_parts(held=self.held_bytes(), kv_bytes=kv, peak=peak, store=self.store)

    def held_bytes(self) -> dict:
        """What the engine has allocated on its device, by the planner's part names (deploy/memory.py):
        non-expert weights, the expert cache, and once the runtime is built the stacked routers of static
        decode's lookahead, the kernels' workspaces (each fused router's, the stacked routers' prediction
        workspace) and the device cache state (slot table, device-side policy state, copy lists,
        prediction ledger)."""
        from .offload.router_stack import RouterStack

        cache, runtime = getattr(self, "cache", None), getattr(self, "runtime", None)
        parts = dict(non_expert_weights=self.non_expert_bytes,
                     expert_cache=tensor_bytes(cache.slots) if cache is not None else self.num_slots * self.layout_record_bytes)
        if runtime is not None:  # (not yet while loading: then the planner's allowances stand for these)
            lookahead = runtime.device.lookahead
            parts["router_stack"] = parts["kernel_scratch"] = 0
            scratch = [t for m in self.model.modules() for t in getattr(m, "fused_router_scratch", None) or ()]
            if isinstance(lookahead, RouterStack):
                parts["router_stack"] = tensor_bytes(lookahead.norm_w, lookahead.router_w)
                scratch += list(lookahead.scratch or ())
            parts["kernel_scratch"] = tensor_bytes(*scratch)
            residency = runtime.residency
            parts["device_state"] = tensor_bytes(cache.slot_table_storage, cache.device_hits, runtime.ledger, residency,
                                                 residency.state if residency is not None else None)
        return parts

    def _clear_pruning(self) -> None:
        if self.pruner is not None:
            self.pruner.clear()

    def _generation_arguments(self, max_new_tokens: int, generation_kwargs: dict):
        """This request's GenerationConfig and the other arguments of transformers' generate, checked."""
        generation_config = copy.deepcopy(self.generation_config)
        for key, value in generation_kwargs.items():
            rule = GENERATION_RULES.get(key)
            if rule is not None and not rule[0](value):
                raise InputError(f"invalid generation arguments: {key} must be {rule[1]}, got {value!r}")
        try:
            # GenerationConfig.update validates the values and returns what it does not know (streamer,
            # logits_processor, ...), which must be arguments of generate itself.
            kwargs = generation_config.update(**{"do_sample": self.config.do_sample, "max_new_tokens": max_new_tokens,
                                                 **generation_kwargs})
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid generation arguments: {exc}") from None
        unknown = sorted(set(kwargs) - generate_parameters(self.model))
        if unknown:
            raise InputError(
                f"invalid generation arguments: unknown argument(s) {unknown}; pass GenerationConfig fields "
                "(e.g. do_sample, temperature, min_new_tokens) or arguments of transformers' generate")
        kwargs["generation_config"] = generation_config
        return generation_config, kwargs

    def _check_open(self) -> None:
        if self.closed:
            raise EngineClosedError("this engine is closed (close() was called); load a new one with vismmoe.load")

    _STATIC_KWARGS = {"min_new_tokens"}

    def _static_unavailable(self, generation_kwargs) -> str | None:
        """Why this request cannot take the static decode path (None if it can)."""
        if self.config.decode == "generate":
            return "decode: generate"
        if self.config.do_sample or generation_kwargs.get("do_sample"):
            return "sampling (the static path is greedy)"
        other = sorted(set(generation_kwargs) - self._STATIC_KWARGS)
        if other:
            return f"generation arguments {other}"
        if self.trace is not None:
            return "a routing trace is being recorded (traces come from the host-decided path)"
        if not self.cache.complete and self.miss.static_unavailable():
            return self.miss.static_unavailable()
        if not self.cache.complete and self.runtime.residency is None:
            return "expert copies cannot be decided on the device here (mmap store, or no page-locked slab / triton)"
        if not self.cache.complete and self.runtime.grouped and self.num_slots > ops.MAX_GROUPS:
            return (f"{self.num_slots} cache slots exceed the {ops.MAX_GROUPS} groups of the grouped kernel; "
                    "use a smaller expert_budget or decode: generate")
        return None

    def close(self):
        """Release the host store, the decoders, the expert cache and the model; later calls raise
        EngineClosedError. The GPU memory goes back to torch's allocator here, not when the garbage
        collector finds the engine: the engine's objects refer to each other (runtime, cache, decoders,
        the model's hooks), so without this a closed engine kept its GPU memory until the next
        gc.collect(), and a next engine in the same process (or its emulated memory cap) ran short."""
        if self.closed:
            return
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy or graph may still use what is dropped below
        self.decoders.clear()
        self.runtime.host.cpu.close()
        glue.bind(self.layout, None)
        self.store.close()
        self.cache = self.runtime = self.decoders = self.generate_decoder = self.pruner = None
        # The model's modules refer to each other (transformers' own structure, our hooks): moving its
        # tensors to the meta device frees their memory now.
        self.model.to("meta")
        if self.emulation is not None:
            self.emulation.release()


def _check_static_settings(config: EngineConfig, num_slots: int, layout) -> None:
    """decode: static decides every cache load on the device: below a budget that holds every expert it
    needs a host slab (not mmap). Refused here, not on every request. (Every policy has a device twin.)"""
    if config.decode != "static" or num_slots >= len(layout.layers) * layout.num_experts:
        return
    if config.store == "mmap":
        raise ConfigError(
            "decode: static below a full budget cannot use store: mmap (experts are read by the host first); "
            "use store: pinned or memory, decode: auto, or a budget holding every expert")




def _slot_plan(config: EngineConfig, num_slots: int, layout):
    """The `slot_plan` key for this budget (offload/policies/slot_plan.py): None (one pool) or a SlotPlan."""
    from .offload.policies.slot_plan import resolve_slot_plan

    return resolve_slot_plan(config.slot_plan, num_slots, len(layout.layers), layout.top_k)


def _emulation(config: EngineConfig, engine):
    """`emulate: PROFILE` (deploy/emulate.py): the emulated device's memory checked for what is loaded."""
    if config.emulate is None:
        return None
    from .deploy.emulate import Emulation, load_emulated_profile
    from .deploy.model_info import model_info

    emulation = Emulation(load_emulated_profile(config.emulate), config.store, engine.layout_record_bytes,
                          engine.device)
    emulation.model = model_info(engine.model_dir)
    emulation.check_engine(engine, engine.num_slots)
    return emulation
