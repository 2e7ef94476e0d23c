"""Tiny random checkpoints of real VL-MoE architectures, built offline.

Tests, the training recipes (models/) and GPU mechanism benchmarks (eval/) need real transformers model classes with a
tokenizer, image processor and chat template, but no hub access. `build_checkpoint(family, dir)`
writes a directory that `vismmoe.load` and `transformers.from_pretrained` both read, exactly like a
downloaded checkpoint. Sizes can be overridden (for example full-size experts for GPU benchmarks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import image_only_processor_class

FAMILIES = ("qwen3_vl_moe", "glm4v_moe", "internvl_qwen3_moe", "llava_onevision_olmoe")

# A character-level vocabulary keeps the tokenizer tiny and deterministic; real checkpoints bring their own.
_CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


@dataclass
class TextShape:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    moe_intermediate_size: int = 24
    num_experts: int = 8
    top_k: int = 2
    extra: dict = field(default_factory=dict)


def _chat_template(image_markup: str) -> str:
    # Renders `<|im_start|>role\ncontent<|im_end|>\n`; an image part becomes the family's image markup.
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}" + image_markup +
        "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_tokenizer(special_tokens: list[str], chat_template: str, named_tokens: dict[str, str] | None = None):
    """A char-level fast tokenizer whose special tokens are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specials = base + [t for t in special_tokens if t not in base]
    vocab = {tok: i for i, tok in enumerate(specials + _CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {"extra_special_tokens": named_tokens} if named_tokens else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template, **kwargs
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]}, replace_extra_special_tokens=False)
    return tok


def save_processor(out: Path, processor_cls, image_processor, tokenizer, **kwargs):
    """Write the processor and tokenizer files as a real checkpoint of `processor_cls` has them."""
    proc = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template, **kwargs
    )
    proc.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _fix_processor_class(out, processor_cls.__name__, kwargs)


def _mrope_section(half: int) -> list[int]:
    # (T, H, W) rotary sections must sum to half the rotary dimension.
    return [half - 2 * (half // 3), half // 3, half // 3]


def _text_common(shape: TextShape, vocab_size: int) -> dict:
    """The text-model fields every family names the same way."""
    return dict(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        moe_intermediate_size=shape.moe_intermediate_size, num_experts_per_tok=shape.top_k,
        max_position_embeddings=4096,
    )


def _qwen3_vl_moe(shape: TextShape, image_size: int):
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = build_tokenizer(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        _chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    ids = tok.convert_tokens_to_ids
    section = _mrope_section(shape.head_dim // 2)
    text = dict(
        _text_common(shape, len(tok)), num_experts=shape.num_experts, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=section, mrope_interleaved=True),
    )
    text.update(shape.extra)
    n_deep = min(3, shape.num_hidden_layers)
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=shape.hidden_size, num_position_embeddings=64,
        deepstack_visual_indexes=list(range(n_deep)),
    )
    cfg = Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    ip = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=image_size * image_size
    )
    return cfg, Qwen3VLMoeForConditionalGeneration, (Qwen3VLProcessor, ip, tok, {})


def _glm4v_moe(shape: TextShape, image_size: int):
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    marks = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
    tok = build_tokenizer(marks, _chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    ids = tok.convert_tokens_to_ids
    section = _mrope_section(shape.head_dim // 4)  # partial_rotary_factor 0.5: rotary dim is head_dim / 2
    text = dict(
        _text_common(shape, len(tok)), n_routed_experts=shape.num_experts, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=section, partial_rotary_factor=0.5),
    )
    text.update(shape.extra)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=shape.hidden_size, image_size=28,
    )
    cfg = Glm4vMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"),
    )
    ip = Glm4vImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 28 * 28, "longest_edge": image_size * image_size},
    )
    return cfg, Glm4vMoeForConditionalGeneration, (Glm4vProcessor, ip, tok, {})


def _internvl_qwen3_moe(shape: TextShape, image_size: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = build_tokenizer(list(named.values()), _chat_template("<IMG_CONTEXT>"), named_tokens=named)
    side, patch = 28, 14
    seq = (side // patch) ** 2 // 4  # downsample_ratio 0.5 merges 2x2 patches
    text = dict(
        _text_common(shape, len(tok)), model_type="qwen3_moe", num_experts=shape.num_experts, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )
    text.update(shape.extra)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[side, side], patch_size=[patch, patch])
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=False)
    ip = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=False)
    return cfg, InternVLForConditionalGeneration, (InternVLProcessor, ip, tok, {"image_seq_length": seq})


def _llava_onevision_olmoe(shape: TextShape, image_size: int):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    tok = build_tokenizer(["<image>", "<video>"], _chat_template("<image>"))
    side, patch = 28, 14
    text = dict(
        model_type="olmoe", vocab_size=len(tok), hidden_size=shape.hidden_size,
        intermediate_size=shape.moe_intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        num_experts=shape.num_experts, num_experts_per_tok=shape.top_k, norm_topk_prob=False,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    text.update(shape.extra)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=side, patch_size=patch)
    cfg = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=[[side, side]],
        vision_aspect_ratio="anyres_max_1", vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=[[side, side]], do_pad=True,
    )
    n_tokens = (side // patch) ** 2
    extra = {"num_image_tokens": n_tokens, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_1"}
    return cfg, LlavaOnevisionForConditionalGeneration, (LlavaOnevisionProcessor, ip, tok, extra)


_BUILDERS = {
    "qwen3_vl_moe": _qwen3_vl_moe,
    "glm4v_moe": _glm4v_moe,
    "internvl_qwen3_moe": _internvl_qwen3_moe,
    "llava_onevision_olmoe": _llava_onevision_olmoe,
}


def family_parts(family: str, shape: TextShape, image_size: int):
    """(config, model class, (processor class, image processor, tokenizer, processor kwargs)) of a tiny
    `family` model of `shape`, nothing built or written."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _BUILDERS[family](shape, image_size)


def build_checkpoint(
    family: str,
    out_dir: str | os.PathLike,
    *,
    shape: TextShape | None = None,
    seed: int = 0,
    dtype: str = "float32",
    image_size: int = 96,
    init_std: float | None = None,
    router_std: float | None = None,
    device: str = "cpu",
):
    """Write a random checkpoint of `family` to `out_dir`; returns the in-memory model.

    `device`: where the random init runs ("cuda": seconds instead of minutes for a full-size model; the
    weights differ from a CPU build's, drawn from the same distributions).

    `init_std` overrides the initializer range of all weights and `router_std` that of the routers
    (default: init_std). Random routers at the default 0.02 are nearly uniform, with near-tied top-k
    choices; tests raise the scale to get decisive, reproducible routing.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = shape or TextShape()
    cfg, model_cls, (proc_cls, image_processor, tok, proc_kwargs) = family_parts(family, shape, image_size)
    # Special-token ids come from the local tokenizer, not from the defaults of the real checkpoints.
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        c.eos_token_id, c.pad_token_id, c.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    if init_std is not None:
        cfg.initializer_range = init_std
        cfg.get_text_config().initializer_range = init_std
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build directly in the target dtype: no float32 copy
    try:
        with torch.device(device):
            model = model_cls(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    router_std = router_std if router_std is not None else init_std
    if router_std is not None:
        _spread_routers(model, router_std, seed)
    model.save_pretrained(str(out))
    save_processor(out, proc_cls, image_processor, tok, **proc_kwargs)
    return model


def _spread_routers(model, std: float, seed: int):
    # Random routers with std 0.02 give near-ties; larger weights give stable top-k under float noise.
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def _fix_processor_class(out: Path, name: str, proc_kwargs: dict | None = None):
    # The image-only subclass saves its own name; a real checkpoint names the transformers class and
    # records the processor's own arguments (image_seq_length, num_image_tokens, ...).
    for fname in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = out / fname
        if path.exists():
            data = json.loads(path.read_text())
            if "processor_class" in data:
                data["processor_class"] = name
                if fname == "processor_config.json":
                    data.update(proc_kwargs or {})
                path.write_text(json.dumps(data, indent=2))


# Qwen3-VL-30B-A3B's text MoE shapes (hidden 2048, 32/4 heads of 128, 128 experts of I=768, top-8):
# random models of these shapes measure mechanism costs (copies, overheads) at real sizes.
QWEN3_VL_30B_A3B_TEXT = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             intermediate_size=6144, moe_intermediate_size=768, num_experts=128, top_k=8)


def full_size_description(num_layers: int, out_dir, image_size: int = 256) -> Path:
    """The bench model of full_size_checkpoint described without weights: its config.json (bf16), processor
    and tokenizer only, in seconds; for what reads sizes alone (deploy.model_info, the planner's tests)."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg, _, (proc_cls, image_processor, tok, proc_kwargs) = family_parts(
        "qwen3_vl_moe", TextShape(num_hidden_layers=num_layers, **QWEN3_VL_30B_A3B_TEXT), image_size)
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        c.eos_token_id, c.pad_token_id, c.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
        c.dtype = "bfloat16"
    cfg.save_pretrained(str(out))
    save_processor(out, proc_cls, image_processor, tok, **proc_kwargs)
    return out


def full_size_checkpoint(num_layers: int, root=None, image_size: int = 256, device: str = "cpu") -> Path:
    """A bf16 random Qwen3-VL-MoE with Qwen3-VL-30B-A3B-sized experts and `num_layers` layers, built once.

    Building writes ~1.2 GB per layer from random init, minutes at 12 layers; so another `image_size`
    (the processor's pixel cap, the only file that differs) is a sibling directory whose other files
    are links to the first build's. `device="cuda"` runs the random init on the GPU (see build_checkpoint)."""
    import tempfile

    root = Path(root or tempfile.gettempdir())
    path = root / f"vismmoe-fullsize-{num_layers}"
    if not (path / "config.json").exists():
        build_checkpoint("qwen3_vl_moe", path, shape=TextShape(num_hidden_layers=num_layers, **QWEN3_VL_30B_A3B_TEXT),
                         dtype="bfloat16", router_std=0.05, image_size=256, device=device)
    if image_size == 256:
        return path
    variant = root / f"vismmoe-fullsize-{num_layers}-{image_size}px"
    if not (variant / "processor_config.json").exists():
        variant.mkdir(exist_ok=True)
        for f in path.iterdir():
            if f.name != "processor_config.json" and not (variant / f.name).exists():
                (variant / f.name).symlink_to(f.resolve())
        processor = json.loads((path / "processor_config.json").read_text())
        processor["image_processor"]["size"]["longest_edge"] = image_size * image_size
        (variant / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return variant
