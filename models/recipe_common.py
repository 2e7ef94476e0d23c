"""The shared part of the bundled models' training recipes (models/train_easyvqa.py, models/train_scenevqa.py).

A recipe trains transformers' own Qwen3-VL-MoE from scratch on one synthetic VQA task: every image of the
task is resized to one fixed square side, so every prompt has the same number of visual tokens and the
same M-RoPE positions up to its question. A recipe supplies its data, its model geometry (`Geometry` + the
text/vision shapes) and its training-only auxiliary loss on the merger output; everything else is here, in
the order a recipe runs it:

  run_arguments             the command-line options every recipe has
  start_run                 seeds, TF32, the version/device/argv header of the log
  build_model_and_processor the model and its image-only processor (vismmoe.testing.tiny_models' tokenizer)
  encode_split, pad_splits  token ids / labels, right-padded to one length; mrope_positions
  check_against_processor   prompt tokens, pixel layout and M-RoPE positions equal the processor's/model's
  parameter_counts          total / vision / expert / active parameters
  ImageMajorBatches         training batches of U images x r questions, pixels patchified on the device
  enable_checked_speedups   two training-only speed-ups, each checked against the stock path
  choose_experts_implementation, MergerCapture, adamw, cosine_lr, train
  end_training, teacher_forced_eval, routing_stats, log_routing
  save_checkpoint, reload_and_generate, finish

Why one module of more than 400 lines: it is one concept (the recipe minus the task), and splitting it
would make each recipe import from several places for what reads as a single sequence.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vismmoe.inputs import image_only_processor_class
from vismmoe.testing.tiny_models import TextShape, family_parts, save_processor


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

    @property
    def grid_thw(self) -> torch.Tensor:  # the processor's image_grid_thw of one image
        return torch.tensor([[1, self.grid, self.grid]])

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
    cfg, model_cls, (proc_cls, _ip, tok, proc_kwargs) = family_parts("qwen3_vl_moe", shape, geom.side)
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


# ------------------------------------------------------------------------------------- run set-up
def run_arguments(description: str, *, out: str, steps: int, lr: float, warmup: int, eval_bs: int,
                  eval_every_help: str, smoke_help: str):
    """The argument parser with the options every recipe has (and that `train`/`cosine_lr` read); a
    recipe adds its data / batch / auxiliary-loss options to it."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--min-lr-ratio", type=float, default=0.02)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef (load balancing)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds; the cosine "
                    "then follows max(step fraction, time fraction) (0: off)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500, help=eval_every_help)
    ap.add_argument("--eval-bs", type=int, default=eval_bs)
    ap.add_argument("--max-test", type=int, default=0, help="evaluate only the first N test questions")
    ap.add_argument("--generate-limit", type=int, default=0, help="greedy-generate only N test questions (0: all)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--metrics", default="", help="write a JSON summary here")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    return ap


def start_run(seed: int, device_name: str) -> tuple[torch.device, bool]:
    """Seed Python, NumPy and torch; allow TF32 on CUDA (training runs in bf16 autocast anyway); log the
    versions, the device and the command line. Returns (device, is_cuda)."""
    import transformers

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"torch {torch.__version__}  transformers {transformers.__version__}  device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    log("argv:", " ".join(sys.argv))
    return device, cuda


def autocast_for(cuda: bool):
    """The training compute context: bf16 autocast on CUDA, plain float32 on the CPU."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext


def pad_splits(splits, pad_token_id: int):
    """Right-pad every split's (ids, labels, mask) to the longest split's length; returns (splits, length)."""
    length = max(ids.shape[1] for ids, _, _ in splits)

    def pad(t, value):
        return F.pad(t, (0, length - t.shape[1]), value=value)

    return [(pad(ids, pad_token_id), pad(lab, -100), pad(mask, 0)) for ids, lab, mask in splits], length


def check_against_processor(model, processor, ip, geom: Geometry, question: str, image, image_u8: torch.Tensor,
                            ids_row: torch.Tensor, lab_row: torch.Tensor, pos: torch.Tensor) -> None:
    """One training row against the stock pipeline: the recipe's prompt tokens and visual-token count equal
    the processor's (assert), its on-device patchify of `image_u8` (1, 3, side, side) equals the processor's
    pixel_values for the PIL `image` (assert), and its M-RoPE positions equal the model's get_rope_index
    (logged: that method's signature varies across transformers versions)."""
    image_token_id = model.config.image_token_id
    ref = processor(text=[render_prompt(processor, question)], images=[image], return_tensors="pt")
    n_prompt = int((lab_row == -100).long().cumprod(0).sum())
    assert ref["input_ids"][0].tolist() == ids_row[:n_prompt].tolist(), "prompt tokens differ from the processor's"
    assert int((ref["input_ids"] == image_token_id).sum()) == geom.n_visual
    diff = (geom.patchify(image_u8, ip) - ref["pixel_values"]).abs().max().item()
    log(f"patchify vs processor pixel_values: max abs diff {diff:.2e}")
    assert diff < 1e-4
    try:
        kw = {"mm_token_type_ids": ref["mm_token_type_ids"]} if "mm_token_type_ids" in ref else {}
        want, _ = model.model.get_rope_index(ref["input_ids"], image_grid_thw=ref["image_grid_thw"], **kw)
        same = torch.equal(want[:, 0].cpu(), pos[:, :n_prompt])
        log("M-RoPE positions match get_rope_index" if same else
            f"WARNING: M-RoPE positions differ from get_rope_index:\n{want[:, 0, :64]}\n{pos[:, :64]}")
    except Exception as exc:  # noqa: BLE001 - signature varies across transformers versions
        log(f"WARNING: could not compare with get_rope_index: {type(exc).__name__}: {exc}")


def parameter_counts(model) -> dict:
    """Total, vision, text, expert, per-expert and active-per-token parameter counts (logged)."""
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    n_exp = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
    tc = model.config.text_config
    per_expert = n_exp // (tc.num_hidden_layers * tc.num_experts)
    n_active = n_params - n_exp + tc.num_hidden_layers * tc.num_experts_per_tok * per_expert
    counts = dict(total=n_params, vision=n_vis, text=n_params - n_vis, experts=n_exp, per_expert=per_expert,
                  active_per_token=n_active)
    log("parameters:", json.dumps(counts), f"(float32 {n_params * 4 / 1e6:.1f} MB)")
    return counts


# ------------------------------------------------------------------------------------------ batches
class ImageMajorBatches:
    """Training batches of U images x r questions each, image-major (the layout shared image encoding needs).

    `row_image` gives each training row's image index (into `images_u8`, uint8 (N, 3, side, side) on the
    device); ids / labels / mask are the padded rows on the device. A batch draws, for each image, r of its
    rows uniformly with replacement, then applies `transform(images, gen)` (augmentation; skipped for
    augment=False) and patchifies on the device. With share=True pixel_values hold one copy per image (for the shared image
    encoding), else one copy per row. Returns (inputs, image ids).
    """

    def __init__(self, row_image: np.ndarray, images_u8, ids, lab, mask, pos, geom: Geometry, ip, device,
                 transform=None):
        self.images, self.ids, self.lab, self.mask = images_u8, ids, lab, mask
        self.geom, self.ip, self.device, self.transform = geom, ip, device, transform
        self.order = torch.from_numpy(np.argsort(row_image, kind="stable")).to(device)
        self.count = torch.from_numpy(np.bincount(row_image, minlength=len(images_u8))).to(device)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.pos = pos.to(device)
        self.grid_thw = geom.grid_thw.to(device)

    def __call__(self, img_ids, r: int, gen: torch.Generator, share: bool, augment: bool = True):
        img_ids = img_ids.to(self.device)
        u = len(img_ids)
        pick = (torch.rand(u, r, generator=gen).to(self.device) * self.count[img_ids, None]).long()
        idx = self.order[self.start[img_ids, None] + pick].reshape(-1)
        img = self.images[img_ids]
        if augment and self.transform is not None:
            img = self.transform(img, gen)
        pv = self.geom.patchify(img, self.ip)
        if not share:
            pv = pv.view(u, -1, pv.shape[-1]).repeat_interleave(r, 0).reshape(-1, pv.shape[-1])
        b = u * r
        self.last_rows = idx  # the training rows of this batch, in batch order (for per-row auxiliary labels)
        return dict(input_ids=self.ids[idx], attention_mask=self.mask[idx], labels=self.lab[idx], pixel_values=pv,
                    position_ids=self.pos.unsqueeze(1).expand(3, b, -1),
                    image_grid_thw=self.grid_thw.expand(b, 3)), img_ids


# -------------------------------------------------------------------- checked training speed-ups
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


@dataclass
class SpeedUps:
    """Which training-only speed-ups are on, and how to take them out again before evaluation."""

    batched_attention: bool
    shared_images: bool
    _restore: list

    def restore(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()


def enable_checked_speedups(model, geom: Geometry, make_probe, r: int, batched_attention: bool = True,
                            shared_images: bool = True) -> SpeedUps:
    """Turn on batched vision attention and shared image encoding, each only if it gives the stock path's
    logits on this machine (float32, TF32 off, max abs difference < 1e-3): one that disagrees is switched
    off (slower, same maths) rather than trusted.

    make_probe(share) -> a few images x r rows of training inputs (pixels one copy per image when share).
    """
    undo, attn_on, share_on = [], False, False
    probe = make_probe(False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        with torch.no_grad():
            stock = model(**probe).logits
            if batched_attention:
                restore_attn = enable_batched_vision_attention()
                d = (model(**probe).logits - stock).abs().max().item()
                attn_on = d < 1e-3
                log(f"batched vision attention vs stock: max abs logit diff {d:.2e} ({'on' if attn_on else 'OFF'})")
                if attn_on:
                    undo.append(restore_attn)
                else:
                    restore_attn()
            if shared_images:
                restore_share = enable_shared_image_encoding(model, geom)
                short = make_probe(True)
                model.model.visual._share = r
                try:
                    d = (model(**short).logits - stock).abs().max().item()
                    share_on = torch.equal(short["input_ids"], probe["input_ids"]) and d < 1e-3
                except Exception as exc:  # noqa: BLE001 - a failing speed-up is switched off, not fatal
                    d = f"{type(exc).__name__}: {exc}"
                model.model.visual._share = 1
                log(f"shared image encoding vs one image copy per row: max abs logit diff {d} "
                    f"({'on' if share_on else 'OFF'})")
                if share_on:
                    undo.append(restore_share)
                else:
                    restore_share()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return SpeedUps(attn_on, share_on, undo)


def choose_experts_implementation(model, probe: dict, autocast, cuda: bool) -> str:
    """The fastest experts kernel that runs a forward and backward here (grouped_mm > batched_mm > eager)."""
    model.train()
    for impl in (["grouped_mm", "batched_mm", "eager"] if cuda else ["eager"]):
        try:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            with autocast():
                model(**probe, output_router_logits=True).loss.backward()
            model.zero_grad(set_to_none=True)
            log(f"experts implementation: {impl}")
            return impl
        except Exception as exc:  # noqa: BLE001 - fall back to a slower but always-available kernel
            log(f"experts implementation {impl} failed: {type(exc).__name__}: {str(exc)[:200]}")
            model.zero_grad(set_to_none=True)
    raise RuntimeError("no experts implementation works")


class OutputCapture:
    """Holds a module's output of the last forward (the LM's final norm: a recipe's auxiliary loss reads
    the last hidden state of chosen positions)."""

    def __init__(self, module):
        self.value = None
        self.hook = module.register_forward_hook(self._store)

    def _store(self, module, inputs, output):
        self.value = output

    def pop(self):
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.hook.remove()


class MergerCapture(OutputCapture):
    """The vision merger's output (the visual tokens the LLM sees) of the last forward, for a recipe's
    training-only auxiliary loss."""

    def __init__(self, model):
        super().__init__(model.model.visual.merger)


# ----------------------------------------------------------------------------------------- training
def adamw(model, extra: torch.nn.Module, lr: float, weight_decay: float, cuda: bool):
    """AdamW over the model and the auxiliary heads; no decay on norms, embeddings and biases."""
    decay, no_decay = [], []
    for n_, p in list(model.named_parameters()) + list(extra.named_parameters()):
        (no_decay if p.ndim < 2 or "norm" in n_ or "embed" in n_ else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}),
    )


def cosine_lr(step: int, elapsed: float, args) -> float:
    """Linear warm-up, then cosine to min_lr_ratio * lr; a binding --time-limit compresses the cosine
    (it follows max(step fraction, time fraction)) so the run still anneals."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_limit:
        t = min(1.0, max(t, elapsed / args.time_limit))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, opt, args, *, pool: torch.Tensor, images_per_step: int, rows_per_image: int, batches,
          speedups: SpeedUps, autocast, aux_name: str, aux_weight: float, aux_loss, capture, periodic_eval=None):
    """The training loop: epochs over a shuffled `pool` of image ids, U images x r rows per step.

    Loss = the model's (answer tokens + router aux) + aux_weight * aux_loss(image ids) (the recipe's
    auxiliary loss on `capture`'s merger output); gradient clipping at 1.0; cosine_lr. Every
    args.log_every steps a history record (step, loss, <aux_name>, aux, tok_acc, lr, gnorm, elapsed_s)
    is logged; every args.eval_every steps `periodic_eval(step)` runs (its non-None return joins the
    history). Stops after args.steps or args.time_limit seconds. Returns (history, steps done, seconds).
    """
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    u, r = images_per_step, rows_per_image
    order, cursor = pool[torch.randperm(len(pool), generator=gen)], 0
    share = r if speedups.shared_images else 1
    model.train()
    t_train = time.time()
    hist, step = [], 0
    for step in range(args.steps):
        if cursor + u > len(order):
            order, cursor = pool[torch.randperm(len(pool), generator=gen)], 0
        inputs, img_ids = batches(order[cursor: cursor + u], r, gen, speedups.shared_images)
        cursor += u
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, time.time() - t_train, args)
        model.model.visual._share = share
        with autocast():
            out = model(**inputs, output_router_logits=True)
        loss, extra = out.loss, None
        if aux_weight:
            extra = aux_loss(img_ids)
            loss = loss + aux_weight * extra
        if capture is not None:
            capture.pop()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                y = inputs["labels"][:, 1:]
                m = y != -100
                tok_ok = ((out.logits[:, :-1].argmax(-1) == y) & m).sum() / m.sum()
            rec = {"step": step + 1, "loss": round(loss.item(), 5),
                   aux_name: None if extra is None else round(extra.item(), 4),
                   "aux": round(out.aux_loss.float().item(), 4), "tok_acc": round(tok_ok.item(), 4),
                   "lr": round(opt.param_groups[0]["lr"], 6), "gnorm": round(gnorm.item(), 3),
                   "elapsed_s": round(time.time() - t_train, 1)}
            hist.append(rec)
            log(json.dumps(rec))
        stop = args.time_limit and time.time() - t_train > args.time_limit
        if periodic_eval and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps \
                and not stop:
            model.model.visual._share = 1
            rec = periodic_eval(step + 1)
            if rec is not None:
                hist.append(rec)
            model.train()
        if stop:
            log(f"time limit reached: stopping after step {step + 1} of {args.steps}")
            break
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    log(f"training: {step + 1} steps in {train_s:.1f}s ({train_s / (step + 1) * 1000:.0f} ms/step)")
    return hist, step + 1, train_s


def end_training(model, speedups: SpeedUps, capture) -> None:
    """Back to the stock model for evaluation and saving: speed-ups out, hook off, float32, eval mode."""
    speedups.restore()
    if capture is not None:
        capture.remove()
    model.float().eval()


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_forced_eval(model, ids, lab, mask, img_idx, imgs_u8, ip, pos, bs, device, autocast, geom: Geometry):
    """Exact match of the argmax at every answer position (= greedy decoding of the answer)."""
    model.eval()
    grid_thw = geom.grid_thw
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
def routing_stats(model, ids, mask, img_idx, imgs_u8, ip, pos, device, geom: Geometry, n=256):
    """Per layer: share of top-k picks going to each expert, for visual and for text tokens."""
    model.eval()
    grid_thw, image_token_id = geom.grid_thw, model.config.image_token_id
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


def log_routing(route: list[dict], n_experts: int) -> None:
    for r in route:
        log(f"routing layer {r['layer']}: expert perplexity visual {r['visual']['perplexity']} "
            f"text {r['text']['perplexity']} (of {n_experts}); visual max share {max(r['visual']['share']):.3f}")


# ------------------------------------------------------------------------------------------- saving
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
    save_processor(out_dir, proc_cls, ip, tok, **proc_kwargs)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return dtype, size / 1e6


def reload_and_generate(out_dir: Path, proc_cls, questions, answers, image_ids, images, bs: int, device,
                        limit: int | None, tf_correct: torch.Tensor) -> dict:
    """Reload the saved checkpoint (float32) and answer the test questions through the engine's path
    (processor + greedy generate); logs accuracy, disagreements with teacher forcing and the first wrong
    answers. Returns model, processor, correct, preds, n_visual, acc, mismatches."""
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    t0 = time.time()
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(out_dir), dtype=torch.float32).to(device)
    proc = image_only_processor_class(proc_cls).from_pretrained(str(out_dir))
    assert AutoConfig.from_pretrained(str(out_dir)).text_config.num_experts == model.config.text_config.num_experts
    correct, preds, n_visual = generate_eval(model, proc, questions, answers, image_ids, images, bs, device, limit)
    acc = float(correct.mean())
    mismatches = int((correct != tf_correct.numpy()[: len(correct)]).sum())
    log(f"greedy generate (reloaded checkpoint, processor path): test accuracy {acc:.4%} "
        f"({int(correct.sum())}/{len(correct)}); visual tokens per prompt {n_visual}; "
        f"disagreements with teacher-forced {mismatches}; {time.time() - t0:.1f}s")
    for w in [(str(q), str(a), p) for q, a, p, ok in zip(questions, answers, preds, correct) if not ok][:15]:
        log("  wrong:", w)
    return dict(model=model, processor=proc, correct=correct, preds=preds, n_visual=n_visual, acc=acc,
                mismatches=mismatches)


def finish(summary: dict, metrics_path: str, t_start: float, device, cuda: bool) -> dict:
    """Add the wall time, device and versions to the run summary, write it to `metrics_path` (if given)."""
    import transformers

    total_s = time.time() - t_start
    summary = dict(command="python " + " ".join(sys.argv), **summary, total_wall_s=round(total_s, 1),
                   device=torch.cuda.get_device_name(device) if cuda else "cpu",
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    if metrics_path:
        Path(metrics_path).write_text(json.dumps(summary, indent=1))
    log(f"done in {total_s:.1f}s")
    return summary
