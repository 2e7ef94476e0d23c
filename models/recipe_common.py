"""Pieces shared by the bundled models' training recipes (models/train_easyvqa.py, models/train_scenevqa.py).

A recipe trains transformers' own Qwen3-VL-MoE from scratch on one synthetic VQA task: every image of the
task is resized to one fixed square side, so every prompt has the same number of visual tokens and the
same M-RoPE positions up to its question. `Geometry` holds that side and the vision patching; the
helpers below build the model, tokenise the prompts, lay out pixel values on the device exactly as the
image processor does, patch two training-only speed-ups into the model (both checked against the stock
path by the recipes), evaluate (teacher-forced and through the processor + `generate`) and save the
checkpoint the way `vismmoe.load` reads it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vismmoe.tiny_models import (
    TextShape,
    _fix_processor_class,
    _qwen3_vl_moe,
    _save_processor,
    image_only_processor_class,
)


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


@dataclass(frozen=True)
class Geometry:
    side: int  # every image is resized to side x side by the image processor
    patch: int
    merge: int
    tpatch: int = 2

    @property
    def grid(self) -> int:  # patches per side
        return self.side // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_visual(self) -> int:  # merged visual tokens per image
        return (self.grid // self.merge) ** 2

    def patchify(self, img_u8: torch.Tensor, ip) -> torch.Tensor:
        """uint8 (B, 3, side, side) -> pixel_values (B*n_patches, 3*tpatch*patch^2), as Qwen2VLImageProcessor lays them out."""
        b, g, m, p, t = img_u8.shape[0], self.grid, self.merge, self.patch, self.tpatch
        mean = torch.tensor(ip.image_mean, device=img_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, device=img_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
        x = (img_u8.float() * ip.rescale_factor - mean) / std
        x = x.view(b, 3, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(b, g // m, g // m, m, m, 3, t, p, p)
        return x.reshape(b * g * g, 3 * t * p * p)

    def image_processor(self):
        from transformers import Qwen2VLImageProcessorPil

        # min_pixels = max_pixels = side^2: every image, whatever its size, becomes side x side.
        return Qwen2VLImageProcessorPil(
            patch_size=self.patch, merge_size=self.merge, temporal_patch_size=self.tpatch,
            min_pixels=self.side * self.side, max_pixels=self.side * self.side,
        )


def build_model_and_processor(seed: int, aux_coef: float, text_shape: dict, vision: dict, geom: Geometry):
    shape = TextShape(**text_shape, extra=dict(router_aux_loss_coef=aux_coef))
    cfg, model_cls, (proc_cls, _ip, tok, proc_kwargs) = _qwen3_vl_moe(Path("."), shape, seed, geom.side)
    cfg.vision_config.patch_size = geom.patch
    cfg.vision_config.spatial_merge_size = geom.merge
    cfg.vision_config.temporal_patch_size = geom.tpatch
    for k, v in vision.items():
        setattr(cfg.vision_config, k, v)
    ip = geom.image_processor()
    processor = image_only_processor_class(proc_cls)(
        image_processor=ip, tokenizer=tok, chat_template=tok.chat_template, **proc_kwargs
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    return model, processor, (proc_cls, ip, tok, proc_kwargs)


def render_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_split(processor, questions, answers, n_visual: int):
    """Token ids / labels for every (question, answer), right-padded to a common length."""
    tok = processor.tokenizer
    pad = "<|image_pad|>"
    prompt_cache: dict[str, list[int]] = {}
    answer_cache: dict[str, list[int]] = {}
    rows, labels = [], []
    for q, a in zip(questions, answers):
        q, a = str(q), str(a)
        if q not in prompt_cache:
            text = render_prompt(processor, q).replace(pad, pad * n_visual)
            prompt_cache[q] = tok(text, add_special_tokens=False)["input_ids"]
        p = prompt_cache[q]
        if a not in answer_cache:
            answer_cache[a] = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ans = answer_cache[a]
        rows.append(p + ans)
        labels.append([-100] * len(p) + ans)
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tok.pad_token_id, dtype=np.int64)
    lab = np.full((len(rows), length), -100, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(r)], mask[i, : len(r)] = r, l, 1
    return torch.from_numpy(ids), torch.from_numpy(lab), torch.from_numpy(mask), len(prompt_cache)


def mrope_positions(input_ids: torch.Tensor, image_token_id: int, grid: int) -> torch.Tensor:
    """(3, L) M-RoPE position ids for a row with one image of grid x grid merged tokens (Qwen3-VL rule).

    Every row shares the prefix `<|im_start|>user\\n<|vision_start|>` + image tokens, so one row's
    positions serve the whole (right-padded) batch.
    """
    row = input_ids.tolist()
    start = row.index(image_token_id)
    n = grid * grid
    assert row[start : start + n] == [image_token_id] * n
    pos = torch.zeros(3, len(row), dtype=torch.long)
    pos[:, :start] = torch.arange(start)
    k = torch.arange(n)
    pos[0, start : start + n] = start
    pos[1, start : start + n] = start + k // grid
    pos[2, start : start + n] = start + k % grid
    nxt = start + grid
    pos[:, start + n :] = torch.arange(len(row) - start - n) + nxt
    return pos




def enable_batched_vision_attention():
    """With sdpa/eager, transformers' vision attention loops over the images of a batch one by one.

    All training images have the same number of patches, so the same attention can run as one batched
    sdpa call (mathematically identical; checked against the stock path before training). Training
    only: the saved checkpoint is the stock model.
    """
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    cls = m.Qwen3VLMoeVisionAttention
    original = cls.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        n, total = cu_seqlens.numel() - 1, hidden_states.shape[0]
        if position_embeddings is None or n < 1 or total % n:
            return original(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        s = total // n
        q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = m.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n, s, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(total, -1))

    cls.forward = forward
    return lambda: setattr(cls, "forward", original)


def enable_shared_image_encoding(model, geom: Geometry):
    """Encode each distinct image of a batch once when consecutive rows share an image (training only).

    Batches are built as U images x r questions (rows image-major). The caller passes the U images'
    pixel_values with the full B = U*r image_grid_thw and sets `visual._share = r`; the wrapper encodes
    U images and repeats every per-token output r times, which is what the vision tower would have
    returned for the B (identical) images. Gradients sum over the copies. Checked against the plain path
    before training.
    """
    visual = model.model.visual
    original = visual.forward

    def expand(obj, u, r):
        if torch.is_tensor(obj):
            for k in geom.n_patches, geom.n_visual:
                if obj.ndim >= 1 and obj.shape[0] == u * k:
                    return obj.reshape(u, k, *obj.shape[1:]).repeat_interleave(r, 0).reshape(u * r * k, *obj.shape[1:])
            return obj
        if isinstance(obj, dict):  # ModelOutput included
            for key in list(obj.keys()):
                obj[key] = expand(obj[key], u, r)
            return obj
        if isinstance(obj, (list, tuple)):
            items = [expand(x, u, r) for x in obj]
            return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else type(obj)(*items)
        return obj

    def forward(hidden_states, grid_thw=None, **kwargs):
        r = getattr(visual, "_share", 1)
        if r <= 1:
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        u = grid_thw.shape[0] // r
        return expand(original(hidden_states, grid_thw=grid_thw[:u], **kwargs), u, r)

    visual.forward = forward
    visual._share = 1
    return lambda: (delattr(visual, "forward"), delattr(visual, "_share"))


# ----------------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_forced_eval(model, ids, lab, mask, img_idx, imgs_u8, ip, pos, grid_thw, bs, device, autocast,
                        geom: Geometry):
    """Exact match of the argmax at every answer position (= greedy decoding of the answer)."""
    model.eval()
    correct = torch.zeros(len(ids), dtype=torch.bool)
    for s in range(0, len(ids), bs):
        sl = slice(s, s + bs)
        b = ids[sl].shape[0]
        x, y, am = ids[sl].to(device), lab[sl].to(device), mask[sl].to(device)
        pv = geom.patchify(imgs_u8[img_idx[sl].to(imgs_u8.device)].to(device), ip)
        with autocast():
            logits = model(
                input_ids=x, attention_mask=am, position_ids=pos.to(device).unsqueeze(1).expand(3, b, -1),
                pixel_values=pv, image_grid_thw=grid_thw.to(device).expand(b, 3),
            ).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = y[:, 1:]
        ok = (pred == tgt) | (tgt == -100)
        correct[sl] = ok.all(-1).cpu()
    return correct

@torch.no_grad()
def generate_eval(model, processor, questions, answers, image_ids, images, bs, device, limit=None):
    """The engine's path: chat template + processor + transformers' greedy `generate`, left-padded batches."""
    from PIL import Image

    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    n = len(questions) if limit is None else min(limit, len(questions))
    preds, n_visual = [], set()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for s in range(0, n, bs):
        e = min(n, s + bs)
        texts = [render_prompt(processor, str(q)) for q in questions[s:e]]
        pil = [Image.fromarray(images[i]) for i in image_ids[s:e]]
        inputs = processor(text=texts, images=pil, padding=True, return_tensors="pt").to(device)
        n_visual.update((inputs["input_ids"] == image_token).sum(-1).tolist())
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        preds += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    tok.padding_side = "right"
    correct = np.array([p == str(a) for p, a in zip(preds, answers[:n])])
    return correct, preds, sorted(n_visual)


@torch.no_grad()
def routing_stats(model, ids, mask, img_idx, imgs_u8, ip, pos, grid_thw, device, image_token_id, geom: Geometry,
                  n=256):
    """Per layer: share of top-k picks going to each expert, for visual and for text tokens."""
    model.eval()
    b = min(n, len(ids))
    x, am = ids[:b].to(device), mask[:b].to(device)
    pv = geom.patchify(imgs_u8[img_idx[:b].to(imgs_u8.device)].to(device), ip)
    out = model(
        input_ids=x, attention_mask=am, position_ids=pos.to(device).unsqueeze(1).expand(3, b, -1),
        pixel_values=pv, image_grid_thw=grid_thw.to(device).expand(b, 3), output_router_logits=True,
    )
    k = model.config.text_config.num_experts_per_tok
    e = model.config.text_config.num_experts
    vis = (x == image_token_id).reshape(-1)
    valid = am.reshape(-1).bool()
    stats = []
    for layer, logits in enumerate(out.router_logits):
        top = logits.float().topk(k, dim=-1).indices
        row = {"layer": layer}
        for name, sel in (("visual", vis & valid), ("text", ~vis & valid)):
            counts = torch.bincount(top[sel].reshape(-1), minlength=e).float()
            share = counts / counts.sum()
            ent = -(share.clamp_min(1e-12) * share.clamp_min(1e-12).log()).sum().item()
            row[name] = {"share": [round(v, 4) for v in share.tolist()], "perplexity": round(math.exp(ent), 2)}
        stats.append(row)
    return stats




def save_checkpoint(model, out_dir: Path, proc_parts, bf16_above_bytes: float) -> tuple[str, float]:
    """Write the checkpoint as tiny_models.build_checkpoint does, with eos/pad = <|im_end|> and greedy decoding.

    float32 unless the float32 weights would exceed `bf16_above_bytes`, then bfloat16. Returns (dtype, MB).
    """
    proc_cls, ip, tok, proc_kwargs = proc_parts
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = tok.eos_token_id
    tc = model.config.text_config
    model.config.use_cache = True
    tc.eos_token_id = eos
    tc.pad_token_id = eos
    for attr in ("eos_token_id", "pad_token_id"):
        try:
            setattr(model.config, attr, eos)
        except Exception:  # noqa: BLE001 - strict configs may refuse unknown attributes; text_config has them
            pass
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = eos, eos, None
    gc.do_sample = False
    dtype = "float32"
    if sum(p.numel() for p in model.parameters()) * 4 > bf16_above_bytes:
        dtype = "bfloat16"
        model.to(torch.bfloat16)
    model.cpu().save_pretrained(str(out_dir))
    _save_processor(out_dir, proc_cls, ip, tok, **proc_kwargs)
    _fix_processor_class(out_dir, proc_cls.__name__)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return dtype, size / 1e6
