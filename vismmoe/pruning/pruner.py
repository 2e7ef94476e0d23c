"""The pruning stage between the vision tower and the language model.

How a pruned prefill is built, for every family (Qwen3-VL-MoE, GLM-4.5V, InternVL, LLaVA-OneVision):

1. Capture. The family's own multimodal model (`model.model`) runs on the full request up to the
   call of its language model, where a pre-hook records that call's arguments and stops it. So the
   vision tower, projector, placeholder scatter and position computation are transformers' own code
   for the unpruned request: `inputs_embeds` [1, L, D], `position_ids` (M-RoPE t/h/w rows from the full
   grid for Qwen3-VL and GLM-4.5V; none, i.e. 0..L-1, elsewhere) and family extras (Qwen3-VL's
   `visual_pos_masks` and `deepstack_visual_embeds`). No decoder layer runs.
2. Select. A method (vismmoe/pruning/methods.py, affinity.py) picks the kept visual tokens.
3. Gather. Text tokens are all kept; pruned visual tokens are removed from the sequence (embeddings,
   positions, input ids, visual mask), deepstack features are gathered with the same indices (and
   averaged with the same groups when merging). Kept tokens keep their original positions.
4. Run. The request continues with the pruned `input_ids` (no pixels) through the normal prefill
   (static decode or transformers' generate); a pre-hook on the language model swaps in the pruned
   embeddings, positions and extras at the prefill. The KV cache therefore only ever holds kept
   tokens. Decode positions continue from the last prompt token's original position + 1, exactly as
   in the unpruned request: static decode records the prefill's position ids and adds 1 per step; in
   transformers' generate the hook sets each decode step's positions to cache length + shift (shift =
   original last position + 1 - pruned length), and the multimodal model's `rope_deltas` is set to
   the same shift for M-RoPE families.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from . import settings
from .affinity import routing_distributions, select_affinity
from .merge import merge_assignment, merge_rows
from .methods import SELECTORS, VisualTokens

# model_type -> what the capture records for it (checked against the captured call).
SUPPORTED = {
    "qwen3_vl_moe": "Qwen3-VL-MoE (M-RoPE positions, deepstack features)",
    "glm4v_moe": "GLM-4.5V (3-D rope positions)",
    "internvl": "InternVL (1-D positions)",
    "llava_onevision": "LLaVA-OneVision (1-D positions)",
}
# Arguments of the language model call the gather understands; anything else carrying per-token data
# means a structure this module was not written for, and pruning refuses rather than guess.
_PASSED_THROUGH = {"input_ids", "attention_mask", "cache", "past_key_values", "use_cache", "return_dict",
                   "output_attentions", "output_hidden_states", "output_router_logits", "cache_position"}


class _Captured(Exception):
    """Raised by the capture hook to stop the multimodal model before its language model runs."""


@dataclass
class PruneRecord:
    """What one request's pruning did (engine.last_pruning; tests rebuild the reference from it)."""
    method: str
    merge: bool
    total: int  # visual tokens of the request
    kept: torch.Tensor  # [k] ascending indices into the request's visual tokens
    assign: torch.Tensor | None  # [total] slot in `kept` each token was averaged into (None: dropped)
    seconds: float  # scoring + selection + gather (the vision tower is not counted)


@dataclass
class _PrefillState:
    length: int
    embeds: torch.Tensor
    positions: torch.Tensor | None
    extras: dict
    shift: torch.Tensor  # [rows] added to the cache length to give a decode position
    mrope_rows: int  # 0 for 1-D positions
    override_decode: bool
    prefilled: bool = False


@dataclass
class VisualPruner:
    model: torch.nn.Module
    layout: object
    image_token_id: int
    state: _PrefillState | None = None
    last: PruneRecord | None = None
    text_model: torch.nn.Module = field(default=None, repr=False)
    _hook: object = field(default=None, repr=False)

    def __post_init__(self):
        self.text_model = _language_model(self.model, self.layout)
        # prepend: runs before static decode's position recorder, which must see the pruned positions.
        self._hook = self.text_model.register_forward_pre_hook(self._swap_inputs, with_kwargs=True, prepend=True)

    @staticmethod
    def check_supported(model_type: str) -> None:
        if model_type not in SUPPORTED:
            raise ConfigError(
                f"visual token pruning is not supported for model type {model_type!r} (supported: "
                f"{', '.join(SUPPORTED)}); use visual_keep: 1.0 for this model"
            )

    # -- one request -----------------------------------------------------------------------------

    def prune(self, inputs, config, *, override_decode: bool) -> tuple[dict, PruneRecord] | None:
        """Pruned request inputs (input_ids and attention_mask only) and the record, or None when
        `visual_keep` keeps every visual token. Arms the language-model hook for the next prefill."""
        self.check_supported(getattr(self.model.config, "model_type", type(self.model).__name__))
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ConfigError("visual token pruning serves one request at a time (batch size 1)")
        visual = (input_ids[0] == self.image_token_id).nonzero().squeeze(1)
        k = settings.keep_count(config.visual_keep, len(visual))
        if len(visual) == 0 or k >= len(visual):
            return None
        call = self._capture(inputs)
        t0 = time.perf_counter()
        embeds = call["inputs_embeds"]
        L = embeds.shape[1]
        positions = call.get("position_ids")
        mrope_rows = positions.shape[0] if positions is not None and positions.dim() == 3 else 0
        if positions is None:
            positions = torch.arange(L, device=embeds.device).view(1, L)
        method = config.visual_prune or settings.DEFAULT_METHOD
        tokens = VisualTokens(
            embeds=embeds[0, visual].float(), coords=self._coords(visual, positions, mrope_rows),
            text=embeds[0, int(visual[-1]) + 1:].float(),
        )
        if method == "affinity":
            tokens.routing = routing_distributions(self.layout, embeds[0, visual], config.visual_affinity_layers)
            tokens.routing = tokens.routing.to(tokens.embeds.device)
            selection = select_affinity(tokens, k, settings.affinity_weights(config.visual_affinity_weights))
        else:
            selection = SELECTORS[method](tokens, k, config.visual_prune_seed)
        assign = selection.assign
        if assign is None and config.visual_merge:
            assign = merge_assignment(tokens.embeds, selection.kept)
        kept_seq = visual[selection.kept]
        keep_mask = torch.ones(L, dtype=torch.bool, device=embeds.device)
        keep_mask[visual] = False
        keep_mask[kept_seq] = True
        new_embeds = embeds.clone()
        if assign is not None:
            new_embeds[0, kept_seq] = merge_rows(embeds[0, visual], assign, len(selection.kept))
        extras = self._gather_extras(call, keep_mask, visual, selection.kept, assign)
        new_positions = positions[..., keep_mask]
        length = int(keep_mask.sum())
        # The last prompt token's original position, per rope row: decode continues from it + 1.
        last = positions[:, 0, -1] if mrope_rows else positions[0, -1:]
        self.state = _PrefillState(
            length=length, embeds=new_embeds[:, keep_mask], positions=new_positions,
            extras=extras, shift=(last + 1 - length).to(torch.int64), mrope_rows=mrope_rows,
            override_decode=override_decode,
        )
        if embeds.device.type == "cuda":
            torch.cuda.synchronize(embeds.device)
        record = PruneRecord(method=method, merge=assign is not None, total=len(visual), kept=selection.kept.cpu(),
                             assign=None if assign is None else assign.cpu(), seconds=time.perf_counter() - t0)
        self.last = record
        pruned = {"input_ids": input_ids[:, keep_mask],
                  "attention_mask": torch.ones((1, length), dtype=torch.int64, device=input_ids.device)}
        return pruned, record

    def clear(self) -> None:
        self.state = None

    # -- steps -----------------------------------------------------------------------------------

    def _capture(self, inputs) -> dict:
        captured = {}

        def stop(module, args, kwargs):
            captured.update(kwargs)
            raise _Captured

        handle = self.text_model.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        state, self.state = self.state, None
        try:
            self.model.model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
            self.state = state
        if "inputs_embeds" not in captured or captured["inputs_embeds"] is None:
            raise ConfigError(f"cannot prune visual tokens of {type(self.model).__name__}: its language model "
                              "is not called with inputs_embeds")
        return captured

    def _coords(self, visual: torch.Tensor, positions: torch.Tensor, mrope_rows: int) -> torch.Tensor:
        """(image id, row, column) of each visual token, for the pool method.

        M-RoPE families: rows and columns are the token's own h/w rope indices. Others: contiguous runs
        of image tokens are images; a run is cut into tiles of the vision tower's token grid (InternVL
        tiles, LLaVA-OneVision's base image); what remains (LLaVA-OneVision's any-res grid with its
        newline tokens) is laid out row-major on a near-square grid (an approximation)."""
        vis = visual.cpu()
        run = torch.zeros(len(vis), dtype=torch.int64)
        run[1:] = (vis[1:] - vis[:-1] != 1).long().cumsum(0)
        coords = torch.zeros((len(vis), 3), dtype=torch.int64)
        if mrope_rows:
            hw = positions[-2:, 0, :].cpu()[:, vis]
            coords[:, 0], coords[:, 1], coords[:, 2] = run, hw[0], hw[1]
            return coords
        tile = _tile_tokens(self.model.config)
        next_id = 0
        for r in run.unique().tolist():
            idx = (run == r).nonzero().squeeze(1)
            start = 0
            while start < len(idx):
                size = tile if tile and len(idx) - start >= tile else len(idx) - start
                side = max(1, round(size ** 0.5))
                local = torch.arange(size)
                chunk = idx[start:start + size]
                coords[chunk, 0], coords[chunk, 1], coords[chunk, 2] = next_id, local // side, local % side
                next_id += 1
                start += size
        return coords

    def _gather_extras(self, call: dict, keep_mask, visual, kept, assign) -> dict:
        extras = {}
        for key, value in call.items():
            if key in ("inputs_embeds", "position_ids") or key in _PASSED_THROUGH:
                continue
            if key == "visual_pos_masks" and value is not None:
                extras[key] = value[:, keep_mask]
            elif key == "deepstack_visual_embeds" and value is not None:
                # One [visual tokens, D] tensor per deepstack layer, in sequence order of the visual mask.
                mask = call["visual_pos_masks"][0]
                if not torch.equal(mask.nonzero().squeeze(1), visual):
                    raise ConfigError("deepstack features cover other tokens than the image placeholders "
                                      "(video input?); pruning supports image requests")
                extras[key] = [merge_rows(d, assign, len(kept)) if assign is not None else d[kept] for d in value]
            elif torch.is_tensor(value) or (isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value)):
                raise ConfigError(
                    f"visual token pruning does not know the language-model input {key!r} of "
                    f"{type(self.model).__name__}; use visual_keep: 1.0 for this model"
                )
        return extras

    def _swap_inputs(self, module, args, kwargs):
        state = self.state
        if state is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not state.prefilled:
            if embeds is None or embeds.shape[1] != state.length:
                return None  # not the pruned prefill (e.g. another call while armed): leave it alone
            kwargs["inputs_embeds"] = state.embeds
            kwargs["position_ids"] = state.positions
            kwargs.update(state.extras)
            kwargs["input_ids"] = None
            state.prefilled = True
            deltas = getattr(self.model.model, "rope_deltas", "absent")
            if state.mrope_rows and deltas != "absent":
                # transformers derives M-RoPE decode positions from rope_deltas: make them the pruned shift.
                self.model.model.rope_deltas = state.shift[-1:].view(1, 1).to(state.embeds.device)
            if not state.override_decode:
                self.state = None
            return args, kwargs
        past = cache.get_seq_length() if cache is not None else 0
        n = embeds.shape[1]
        steps = torch.arange(past, past + n, device=embeds.device)
        if state.mrope_rows:
            rows = steps.view(1, 1, n) + state.shift.to(embeds.device).view(-1, 1, 1)[-3:]
            incoming = kwargs.get("position_ids")
            if incoming is not None and incoming.dim() == 3 and incoming.shape[0] == 4:
                rows = torch.cat([incoming[:1].to(rows.device), rows], dim=0)  # text row: physical index
            kwargs["position_ids"] = rows
        else:
            kwargs["position_ids"] = (steps + state.shift.to(embeds.device)).view(1, n)
        return args, kwargs


def _language_model(model, layout) -> torch.nn.Module:
    """The decoder module that holds the MoE layers (what the multimodal model calls with inputs_embeds)."""
    first = layout.layers[0].decoder_layer
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(layer is first for layer in layers):
            return module
    raise ConfigError(f"cannot find the language model of {type(model).__name__}; visual token pruning needs it")


def _tile_tokens(config) -> int:
    """Visual tokens per tile of the vision tower (0 if unknown)."""
    seq = getattr(config, "image_seq_length", None)
    if isinstance(seq, int) and seq > 0:
        return seq
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        n = (size // patch) ** 2
        ratio = getattr(config, "downsample_ratio", None)
        return int(n * ratio * ratio) if isinstance(ratio, float) else n
    return 0
