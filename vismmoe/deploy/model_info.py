"""What the planner needs to know about a model, read without loading any weight.

From config.json the model is built on the meta device (transformers' own class, so shapes are the
engine's); the expert and non-expert element counts come from the safetensors headers when the
directory has weights, else from that meta skeleton (a config-only description of a model too big to
have here, e.g. configs/models/qwen3-vl-30b-a3b). Bytes are counts x the element size of the dtype the
plan runs in, as the engine converts on load.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Tokens the chat template adds around a question and its image, for a model directory without a
# tokenizer (a config-only description): Qwen3-VL's template around one image and one question is
# about 15 BPE tokens; the allowance is twice that.
TEMPLATE_PRIOR = 32


@dataclass
class ModelInfo:
    name: str
    model_type: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    record_numel: int  # one expert's gate_up + down elements
    expert_numel: int  # all routed experts
    non_expert_numel: int  # everything else (attention, shared experts, embeddings, vision tower)
    vision_numel: int
    vision_hidden: int
    num_attention_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    patch_size: int  # vision patch edge in pixels (0: no vision tower)
    merge_size: int  # spatial merge: one LLM token covers (patch*merge)^2 pixels
    checkpoint_dtype: str
    sizes_from: str  # "safetensors headers" or "config (meta skeleton)"
    num_heads: int = 0  # query heads of the text model (0: unknown)
    buffer_numel: int = 0  # the model's buffers (rotary frequencies, ...): on the device too, not in the files
    processor_dir: str = ""  # where the checkpoint's processor is ("": none; token counts use the formulas)

    def expert_bytes(self, dtype: str) -> int:
        return self.record_numel * DTYPE_BYTES[dtype]

    def total_expert_bytes(self, dtype: str) -> int:
        return self.expert_numel * DTYPE_BYTES[dtype]

    def non_expert_bytes(self, dtype: str) -> int:
        """Non-expert weights in `dtype`, and the buffers (counted as float32: the widest they are kept in)."""
        return self.non_expert_numel * DTYPE_BYTES[dtype] + self.buffer_numel * 4

    def kv_bytes(self, tokens: int, dtype: str) -> int:
        return 2 * self.num_attention_layers * self.num_kv_heads * self.head_dim * tokens * DTYPE_BYTES[dtype]

    def kv_cache_bytes(self, context: int, dtype: str) -> int:
        """What the engine holds for a request of `context` tokens: static decode reserves its KV cache in
        buckets of positions (static_decode.cache_length: 256, 512, 1024, ...)."""
        from ..static_decode import cache_length

        return self.kv_bytes(cache_length(context, None), dtype)

    def visual_tokens(self, image_size: int) -> int:
        """LLM tokens of one square image of `image_size` pixels: counted by the checkpoint's own processor
        (which resizes images to its pixel bounds) when the directory has one, else Qwen-VL style patch
        merging of the image as it is."""
        if not self.patch_size or image_size <= 0:
            return 0
        if self.processor_dir:
            return _processor_counts(self.processor_dir, int(image_size))[1]
        side = max(1, math.ceil(image_size / (self.patch_size * self.merge_size)))
        return side * side

    def prompt_tokens(self, image_size: int, question_tokens: int) -> int:
        """Prompt tokens of one request: the chat template, one `image_size` image and a question of
        `question_tokens` tokens; the template counted by the checkpoint's processor (what the engine
        builds) when there is one, else TEMPLATE_PRIOR."""
        if self.processor_dir:
            return _processor_counts(self.processor_dir, int(image_size) if self.patch_size else 0)[0] - 1 + question_tokens
        return TEMPLATE_PRIOR + self.visual_tokens(image_size) + question_tokens

    def activation_peak_bytes(self, tokens: int, visual_tokens: int, dtype: str) -> int:
        """Transient memory of the prefill, the largest step: the MoE layer's grouped GEMMs over every
        (token, expert) pair (gathered inputs, gate_up output, gated rows, down output, weighted and
        re-ordered copies: ops.experts_from_slots), a few hidden-state buffers, the attention scores of
        one layer in float32 (sdpa's math kernel, which a 4-D mask can select) and the mask, the last
        position's float32 logits, and the vision tower's patch activations and attention scores
        (`visual_tokens` LLM tokens of images, merge_size^2 patches each).
        An upper estimate: eval/measure_memory.py compares it with torch's peak on the GPU."""
        b = DTYPE_BYTES[dtype]
        inter = self.record_numel // (3 * self.hidden_size) if self.hidden_size else 0
        moe = tokens * self.top_k * (3 * inter + 3 * self.hidden_size) * b
        hidden = 8 * tokens * self.hidden_size * b
        heads = self.num_heads or max(1, self.num_kv_heads) * 8
        attention = heads * tokens * tokens * 4 + tokens * tokens
        logits = 2 * self.vocab_size * 4
        vision = 0
        if self.patch_size and visual_tokens:
            patches = visual_tokens * self.merge_size ** 2
            vision_heads = max(1, self.vision_hidden // 64)
            vision = patches * 16 * self.vision_hidden * b + vision_heads * patches * patches * 4
        return int(1.25 * (moe + hidden + attention + logits + vision))


def model_info(model_dir) -> ModelInfo:
    import torch

    from .. import adapters
    from ..engine import _load_hf_config, _model_class
    from ..offload.store import is_expert_key

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{str(model_dir)!r} has no config.json; pass a Hugging Face checkpoint directory "
                             "(or a directory with only its config.json)")
    hf_config = _load_hf_config(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = _model_class(hf_config)(hf_config)
    layout = adapters.discover(skeleton)
    expert_ids = {id(getattr(layer.experts, n)) for layer in layout.layers for n in ("gate_up_proj", "down_proj")}
    skeleton_expert = sum(p.numel() for p in skeleton.parameters() if id(p) in expert_ids)
    skeleton_other = sum(p.numel() for p in skeleton.parameters() if id(p) not in expert_ids)
    vision = getattr(skeleton, "model", skeleton)
    vision = getattr(vision, "visual", None) or getattr(vision, "vision_tower", None)
    vision_numel = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    files = sorted(model_dir.glob("*.safetensors"))
    expert_numel, other_numel, sizes_from = skeleton_expert, skeleton_other, "config (meta skeleton)"
    dtype = _config_dtype(hf_config)
    if files:
        expert_numel, other_numel, header_dtype = _header_counts(files, is_expert_key)
        dtype = header_dtype or dtype
        sizes_from = "safetensors headers"
        if expert_numel != skeleton_expert:
            raise ModelLoadError(f"the safetensors files of {model_dir} hold {expert_numel} expert elements but "
                                 f"config.json describes {skeleton_expert}; the checkpoint and config disagree")
    text = hf_config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    attn_layers = (sum(1 for t in layer_types if "attention" in t) if layer_types else text.num_hidden_layers)
    vcfg = getattr(hf_config, "vision_config", None)
    return ModelInfo(
        name=model_dir.name, model_type=hf_config.model_type, num_moe_layers=len(layout.layers),
        num_experts=layout.num_experts, top_k=layout.top_k, hidden_size=layout.hidden_size,
        record_numel=layout.record_numel, expert_numel=expert_numel, non_expert_numel=other_numel,
        vision_numel=vision_numel, vision_hidden=int(getattr(vcfg, "hidden_size", 0) or 0) if vcfg else 0,
        num_attention_layers=attn_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vocab_size=text.vocab_size, patch_size=int(getattr(vcfg, "patch_size", 0) or 0) if vcfg else 0,
        merge_size=int(getattr(vcfg, "spatial_merge_size", 1) or 1) if vcfg else 1,
        checkpoint_dtype=dtype, sizes_from=sizes_from,
        buffer_numel=sum(b.numel() for b in skeleton.buffers()), num_heads=int(getattr(text, "num_attention_heads", 0) or 0),
        processor_dir=str(model_dir) if _has_processor(model_dir) else "",
    )


def _has_processor(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


@functools.lru_cache(maxsize=64)
def _processor_counts(processor_dir: str, image_size: int) -> tuple[int, int]:
    """(prompt tokens, image tokens) the engine's own input builder (inputs.build_inputs) makes for a blank
    `image_size` square image (none if 0) and the one-character question "a"."""
    from PIL import Image

    from ..inputs import build_inputs, load_processor

    processor = load_processor(Path(processor_dir))
    image = Image.new("RGB", (image_size, image_size)) if image_size else None
    ids = build_inputs(processor, image, "a")["input_ids"][0]
    from .. import adapters
    from ..engine import _load_hf_config

    image_token = adapters.image_token_id(_load_hf_config(Path(processor_dir), trust_remote_code=False))
    visual = int((ids == image_token).sum()) if image is not None and image_token is not None else 0
    return int(ids.numel()), visual


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _header_counts(files, is_expert_key) -> tuple[int, int, str | None]:
    """(expert elements, other elements, the dominant float dtype) from the files' JSON headers only."""
    expert = other = 0
    dtypes: dict[str, int] = {}
    for path in files:
        with open(path, "rb") as fh:
            try:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            except (ValueError, OSError) as exc:
                raise ModelLoadError(f"{path} has no readable safetensors header ({exc})") from None
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            numel = math.prod(entry["shape"])
            if is_expert_key(key):
                expert += numel
            else:
                other += numel
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + numel
    top = max(dtypes, key=dtypes.get) if dtypes else None
    return expert, other, _ST_DTYPES.get(top)


def _config_dtype(hf_config) -> str:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config.get_text_config(), "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "bfloat16"
    return name if name in DTYPE_BYTES else "bfloat16"
