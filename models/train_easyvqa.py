"""Train the bundled demo model: a small Qwen3-VL-MoE, from scratch, on easy-VQA.

The model is transformers' own `Qwen3VLMoeForConditionalGeneration` (4 MoE decoder layers, 16 experts,
top-2, load-balancing aux loss on), built with `vismmoe.tiny_models` so the checkpoint has the same
char-level tokenizer, chat template and image-only processor as the other tiny checkpoints. Each 64x64
easy-VQA image is upscaled by the checkpoint's own image processor to 224x224: 14x14 patches of 16 px,
merged 2x2 into 49 visual tokens.

Prompt format (the engine's): user turn = image + question; the model answers `ANSWER<|im_end|>`.
Loss on the answer tokens and <|im_end|> only, plus (training only, --attr-weight) a shape/colour loss on
the max-pooled visual tokens through two throw-away linear heads, with labels read off the train answers.

The bundled checkpoint came from this command on one H100 (420 s of training, 3,186 steps; 99.98% on
the full test split through vismmoe; see models/easyvqa-qwen3vlmoe/README.md):

    .venv/bin/python models/pack_easyvqa.py --out .cache/easyvqa/easyvqa.npz
    PYTHONUNBUFFERED=1 python models/train_easyvqa.py --data .cache/easyvqa/easyvqa.npz \
        --out /tmp/ckA --seed 0 --steps 6000 --lr 2e-3 --warmup 200 --time-limit 420 \
        --eval-every 1000 --metrics metrics.json

CPU smoke run (a few steps on a subset, checks the pipeline end to end):

    .venv/bin/python models/train_easyvqa.py --smoke --out /tmp/easyvqa-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "models"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import recipe_common as common  # noqa: E402  (models/recipe_common.py, next to this file)
from recipe_common import (  # noqa: E402
    Geometry,
    enable_batched_vision_attention,
    encode_split,
    generate_eval,
    log,
    mrope_positions,
    render_prompt,
)
from vismmoe.tiny_models import image_only_processor_class  # noqa: E402

IMAGE_SIDE = 224  # 64x64 easy-VQA images are upscaled to this: 14x14 patches -> 7x7 = 49 merged tokens
PATCH, MERGE, TPATCH = 16, 2, 2

# Architecture of the demo model (kept in one place so the model card and the test can cite it).
TEXT_SHAPE = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, moe_intermediate_size=128, num_experts=16, top_k=2,
)
VISION = dict(
    depth=4, hidden_size=128, intermediate_size=256, num_heads=4, num_position_embeddings=196,
    deepstack_visual_indexes=[1, 2],
)


GEOM = Geometry(IMAGE_SIDE, PATCH, MERGE, TPATCH)


def build_model_and_processor(seed: int, aux_coef: float):
    return common.build_model_and_processor(seed, aux_coef, TEXT_SHAPE, VISION, GEOM)


def patchify(img_u8: torch.Tensor, ip) -> torch.Tensor:
    """uint8 (B, 3, 224, 224) -> pixel_values (B*196, 1536), exactly as Qwen2VLImageProcessor lays them out."""
    return GEOM.patchify(img_u8, ip)


def enable_shared_image_encoding(model):
    return common.enable_shared_image_encoding(model, GEOM)


def teacher_forced_eval(model, ids, lab, mask, img_idx, imgs_u8, ip, pos, grid_thw, bs, device, autocast):
    return common.teacher_forced_eval(model, ids, lab, mask, img_idx, imgs_u8, ip, pos, grid_thw, bs, device,
                                      autocast, GEOM)


def routing_stats(model, ids, mask, img_idx, imgs_u8, ip, pos, grid_thw, device, image_token_id, n=256):
    return common.routing_stats(model, ids, mask, img_idx, imgs_u8, ip, pos, grid_thw, device, image_token_id,
                                GEOM, n)

# --------------------------------------------------------------------------------------------- data
def load_data(path: str | None) -> dict[str, np.ndarray]:
    if path and Path(path).exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    # No packed file: read the easy_vqa package directly (dev dependency on CPU machines).
    import easy_vqa
    from PIL import Image

    data = {"answers": np.array(easy_vqa.get_answers())}
    for split in ("train", "test"):
        q, a, ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        data[f"{split}_images"] = np.stack(
            [np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.uint8) for i in range(len(paths))]
        )
        data[f"{split}_questions"], data[f"{split}_answers"] = np.array(q), np.array(a)
        data[f"{split}_image_ids"] = np.array(ids, dtype=np.int32)
    return data


SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def image_attributes(questions, answers, image_ids, n_images):
    """Per-image shape / colour read off the train answers (-100 where no answer states it).

    Direct answers ("what shape ..." -> circle) and affirmed yes/no questions ("is there a red shape?"
    -> yes) give the attribute; negated forms ("does the image not contain ...") count with flipped answers.
    """
    shape = np.full(n_images, -100, dtype=np.int64)
    color = np.full(n_images, -100, dtype=np.int64)
    for q, a, i in zip(map(str, questions), map(str, answers), image_ids):
        if a in SHAPES:
            shape[i] = SHAPES.index(a)
            continue
        if a in COLORS:
            color[i] = COLORS.index(a)
            continue
        words = q.rstrip("?").split()
        negated = "not" in words or "no" in words
        if (a == "yes") == negated:
            continue
        s = [w for w in words if w in SHAPES]
        c = [w for w in words if w in COLORS]
        if len(s) == 1:
            shape[i] = SHAPES.index(s[0])
        if len(c) == 1:
            color[i] = COLORS.index(c[0])
    return shape, color


def resized_images(ip, images: np.ndarray, chunk: int = 500) -> torch.Tensor:
    """The processor's own resize of each image, as uint8 (N, 3, 224, 224) (undoing its patch layout)."""
    from PIL import Image

    out = []
    for s in range(0, len(images), chunk):
        pil = [Image.fromarray(x) for x in images[s : s + chunk]]
        pv = ip(images=pil, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        g = IMAGE_SIDE // PATCH
        pv = pv.view(len(pil), g // MERGE, g // MERGE, MERGE, MERGE, 3, TPATCH, PATCH, PATCH)[:, :, :, :, :, :, 0]
        # (N, gh/m, gw/m, mh, mw, C, ph, pw) -> (N, C, gh/m, mh, ph, gw/m, mw, pw)
        img = pv.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(pil), 3, IMAGE_SIDE, IMAGE_SIDE)
        assert torch.equal(img, img.round()) and img.min() >= 0 and img.max() <= 255
        out.append(img.to(torch.uint8))
    return torch.cat(out)


def dihedral(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips / transposes per image: shape and colour answers are invariant to them."""
    b = img.shape[0]
    flips = torch.randint(0, 2, (3, b), generator=gen, device="cpu").bool().to(img.device).view(3, b, 1, 1, 1)
    img = torch.where(flips[0], img.flip(-1), img)
    img = torch.where(flips[1], img.flip(-2), img)
    return torch.where(flips[2], img.transpose(-1, -2), img)


# ------------------------------------------------------------------------- training-speed patch
# --------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".cache/easyvqa/easyvqa.npz", help="packed easy-VQA (models/pack_easyvqa.py); "
                    "falls back to the easy_vqa package when missing")
    ap.add_argument("--out", default="models/easyvqa-qwen3vlmoe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=512, help="sequences (questions) per step")
    ap.add_argument("--images-per-step", type=int, default=128, help="distinct images per step; each brings "
                    "batch-size/images-per-step of its questions (sampled with replacement)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.02)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef (load balancing)")
    ap.add_argument("--attr-weight", type=float, default=0.5, help="weight of the training-only image-attribute "
                    "loss (shape/colour of each train image, read off its answers, predicted from the max-pooled "
                    "visual tokens by a throw-away linear head); 0 disables")
    ap.add_argument("--val-images", type=int, default=300, help="train images held out (with their questions) "
                    "for validation")
    ap.add_argument("--no-augment", action="store_true", help="disable random flips/transposes")
    ap.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds; the cosine "
                    "then follows max(step fraction, time fraction) (0: off)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500, help="teacher-forced check on --eval-subset test questions")
    ap.add_argument("--eval-subset", type=int, default=2048)
    ap.add_argument("--eval-bs", type=int, default=512)
    ap.add_argument("--max-train", type=int, default=0, help="use only the first N train questions")
    ap.add_argument("--max-test", type=int, default=0, help="evaluate only the first N test questions")
    ap.add_argument("--generate-limit", type=int, default=0, help="greedy-generate only N test questions (0: all)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--stock-vision-attention", action="store_true", help="keep transformers' per-image loop")
    ap.add_argument("--no-shared-images", action="store_true", help="encode one image copy per row instead of "
                    "once per distinct image (same maths, slower; what the 1st bundled run used)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--metrics", default="", help="write a JSON summary here")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 3 steps, batch 8, small subsets")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.images_per_step, args.warmup, args.log_every = 3, 8, 4, 1, 1
        args.max_train, args.max_test, args.generate_limit, args.eval_bs = 64, 16, 4, 8
        args.eval_every, args.eval_subset = 2, 8

    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers

    log(f"torch {torch.__version__}  transformers {transformers.__version__}  device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    log("argv:", " ".join(sys.argv))

    data = load_data(args.data)
    model, processor, (proc_cls, ip, tok, proc_kwargs) = build_model_and_processor(args.seed, args.aux_coef)
    cfg = model.config
    image_token_id = cfg.image_token_id
    g = IMAGE_SIDE // PATCH
    n_visual = (g // MERGE) ** 2
    grid_thw = torch.tensor([[1, g, g]])

    # ---- tokens / labels (precomputed once)
    sl_tr = slice(None, args.max_train or None)
    sl_te = slice(None, args.max_test or None)
    tr_q, tr_a, tr_i = data["train_questions"][sl_tr], data["train_answers"][sl_tr], data["train_image_ids"][sl_tr]
    te_q, te_a, te_i = data["test_questions"][sl_te], data["test_answers"][sl_te], data["test_image_ids"][sl_te]
    tr_ids, tr_lab, tr_mask, nq = encode_split(processor, tr_q, tr_a, n_visual)
    te_ids, te_lab, te_mask, _ = encode_split(processor, te_q, te_a, n_visual)
    L = max(tr_ids.shape[1], te_ids.shape[1])
    pad = lambda t, v: F.pad(t, (0, L - t.shape[1]), value=v)  # noqa: E731
    tr_ids, tr_lab, tr_mask = pad(tr_ids, tok.pad_token_id), pad(tr_lab, -100), pad(tr_mask, 0)
    te_ids, te_lab, te_mask = pad(te_ids, tok.pad_token_id), pad(te_lab, -100), pad(te_mask, 0)
    pos = mrope_positions(tr_ids[0], image_token_id, g // MERGE)
    log(f"train {len(tr_ids)} questions ({nq} distinct), test {len(te_ids)}; seq len {L}; {n_visual} visual tokens")

    # ---- cross-checks against the processor / the model's own rope index (one sample)
    from PIL import Image

    im0 = Image.fromarray(data["train_images"][int(tr_i[0])])
    ref = processor(text=[render_prompt(processor, str(tr_q[0]))], images=[im0], return_tensors="pt")
    n_prompt = int((tr_lab[0] == -100).long().cumprod(0).sum())
    assert ref["input_ids"][0].tolist() == tr_ids[0, :n_prompt].tolist(), "prompt tokens differ from the processor's"
    assert int((ref["input_ids"] == image_token_id).sum()) == n_visual == 49
    u8 = resized_images(ip, data["train_images"][[int(tr_i[0])]])
    diff = (patchify(u8, ip) - ref["pixel_values"]).abs().max().item()
    log(f"patchify vs processor pixel_values: max abs diff {diff:.2e}")
    assert diff < 1e-4
    try:  # compare with the model's own M-RoPE index (its signature varies across transformers versions)
        kw = {"mm_token_type_ids": ref["mm_token_type_ids"]} if "mm_token_type_ids" in ref else {}
        want, _ = model.model.get_rope_index(ref["input_ids"], image_grid_thw=ref["image_grid_thw"], **kw)
        same = torch.equal(want[:, 0].cpu(), pos[:, :n_prompt])
        log("M-RoPE positions match get_rope_index" if same else
            f"WARNING: M-RoPE positions differ from get_rope_index:\n{want[:, 0, :64]}\n{pos[:, :64]}")
    except Exception as exc:  # noqa: BLE001
        log(f"WARNING: could not compare with get_rope_index: {type(exc).__name__}: {exc}")

    # ---- images: processor resize once, augmentation + normalisation + patchify on the device
    t0 = time.time()
    keep_tr = np.unique(tr_i)
    tr_imgs = torch.zeros(len(data["train_images"]), 3, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    tr_imgs[keep_tr] = resized_images(ip, data["train_images"][keep_tr])
    keep_te = np.unique(te_i)
    te_imgs = torch.zeros(len(data["test_images"]), 3, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    te_imgs[keep_te] = resized_images(ip, data["test_images"][keep_te])
    tr_imgs, te_imgs = tr_imgs.to(device), te_imgs.to(device)
    tr_ids, tr_lab, tr_mask = tr_ids.to(device), tr_lab.to(device), tr_mask.to(device)
    tr_img_idx, te_img_idx = torch.from_numpy(tr_i.astype(np.int64)), torch.from_numpy(te_i.astype(np.int64))
    tr_img_idx = tr_img_idx.to(device)
    log(f"resized {len(keep_tr)} train + {len(keep_te)} test images in {time.time() - t0:.1f}s")

    # ---- model
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    n_exp = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
    tc = cfg.text_config
    per_expert = n_exp // (tc.num_hidden_layers * tc.num_experts)
    n_active = n_params - n_exp + tc.num_hidden_layers * tc.num_experts_per_tok * per_expert
    counts = dict(total=n_params, vision=n_vis, text=n_params - n_vis, experts=n_exp, per_expert=per_expert,
                  active_per_token=n_active)
    log("parameters:", json.dumps(counts))
    model.to(device)
    model.config.use_cache = False

    restore_attn = None if args.stock_vision_attention else enable_batched_vision_attention()
    if cuda:
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext

    # questions grouped by image (CSR), for image-major batches
    q_order = torch.from_numpy(np.argsort(tr_i, kind="stable")).to(device)
    q_count = torch.from_numpy(np.bincount(tr_i, minlength=len(data["train_images"]))).to(device)
    q_start = torch.cumsum(q_count, 0) - q_count
    train_images = torch.from_numpy(np.unique(tr_i).astype(np.int64))
    n_val = min(args.val_images, len(train_images) // 4)
    perm_img = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))]
    val_images, train_images = perm_img[:n_val].sort().values, perm_img[n_val:].sort().values
    is_val = np.isin(tr_i, val_images.numpy())
    val_q = torch.from_numpy(np.nonzero(is_val)[0])
    fit_q = np.nonzero(~is_val)[0]
    shape_lab, color_lab = image_attributes(tr_q[fit_q], tr_a[fit_q], tr_i[fit_q], len(data["train_images"]))
    shape_lab, color_lab = torch.from_numpy(shape_lab).to(device), torch.from_numpy(color_lab).to(device)
    log(f"held out {n_val} train images ({len(val_q)} questions) for validation; image attributes known: "
        f"shape {int((shape_lab[train_images.to(device)] >= 0).sum())}, colour "
        f"{int((color_lab[train_images.to(device)] >= 0).sum())} of {len(train_images)} images")
    per_img = max(1, args.batch_size // args.images_per_step)
    shared = {"on": False}

    def batch(img_ids, augment, gen, r):
        """Rows: for each image, r of its questions (with replacement); images augmented once."""
        img_ids = img_ids.to(device)
        u = len(img_ids)
        pick = (torch.rand(u, r, generator=gen).to(device) * q_count[img_ids, None]).long()
        idx = q_order[q_start[img_ids, None] + pick].reshape(-1)
        img = tr_imgs[img_ids]
        if augment:
            img = dihedral(img, gen)
        pv = patchify(img, ip)
        b = u * r
        if not shared["on"]:
            pv = pv.view(u, -1, pv.shape[-1]).repeat_interleave(r, 0).reshape(-1, pv.shape[-1])
        batch.encoded = img_ids if shared["on"] else img_ids.repeat_interleave(r)
        return dict(
            input_ids=tr_ids[idx], attention_mask=tr_mask[idx], labels=tr_lab[idx], pixel_values=pv,
            position_ids=pos.to(device).unsqueeze(1).expand(3, b, -1), image_grid_thw=grid_thw.to(device).expand(b, 3),
        )

    # Check the batched vision attention against the stock per-image loop, and that the experts kernel runs.
    gen = torch.Generator().manual_seed(args.seed)
    probe = batch(train_images[:4], False, gen, 2)
    with torch.no_grad():
        model.eval()
        fast = model.model.visual(probe["pixel_values"], grid_thw=probe["image_grid_thw"]).pooler_output
        if restore_attn:
            restore_attn()
            stock = model.model.visual(probe["pixel_values"], grid_thw=probe["image_grid_thw"]).pooler_output
            restore_attn = enable_batched_vision_attention()
            log(f"batched vs stock vision attention: max abs diff {(fast - stock).abs().max().item():.2e}")
            if not torch.allclose(fast, stock, atol=1e-4, rtol=1e-3):
                log("WARNING: batched vision attention differs from the stock path; using the stock path")
                restore_attn()
                restore_attn = None
    if not args.no_shared_images:
        with torch.no_grad():
            # shared image encoding: same logits as feeding every row its own copy of the image
            restore_share = enable_shared_image_encoding(model)
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            plain = batch(train_images[:4], False, torch.Generator().manual_seed(1), 2)
            ref_logits = model(**plain).logits
            shared["on"] = True
            short = batch(train_images[:4], False, torch.Generator().manual_seed(1), 2)
            model.model.visual._share = 2
            try:
                d = (model(**short).logits - ref_logits).abs().max().item()
                ok = torch.equal(short["input_ids"], plain["input_ids"]) and short["pixel_values"].shape[0] * 2 == \
                    plain["pixel_values"].shape[0] and d < 1e-3
            except Exception as exc:  # noqa: BLE001
                d, ok = f"{type(exc).__name__}: {exc}", False
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            log(f"shared image encoding vs one image copy per row (fp32, no TF32): max abs logit diff {d}")
            if not ok:
                log("WARNING: shared image encoding disabled (mismatch); every row encodes its own image copy")
                shared["on"] = False
                model.model.visual._share = 1
                restore_share()
                restore_share = None
            probe = batch(train_images[:4], False, torch.Generator().manual_seed(2), 2)
    model.train()
    impls = ["grouped_mm", "batched_mm", "eager"] if cuda else ["eager"]
    for impl in impls:
        try:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            with autocast():
                out = model(**probe, output_router_logits=True)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            log(f"experts implementation: {impl}")
            break
        except Exception as exc:  # noqa: BLE001 - fall back to a slower but always-available kernel
            log(f"experts implementation {impl} failed: {type(exc).__name__}: {str(exc)[:200]}")
            model.zero_grad(set_to_none=True)
    else:
        raise RuntimeError("no experts implementation works")

    # ---- training-only image-attribute heads on the max-pooled visual tokens (the merger output)
    hidden = cfg.text_config.hidden_size
    attr_heads, captured, hook = torch.nn.ModuleDict(), {}, None
    if args.attr_weight:
        attr_heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(hidden, len(SHAPES)),
                                          "color": torch.nn.Linear(hidden, len(COLORS))}).to(device)
        hook = model.model.visual.merger.register_forward_hook(lambda mod, inp, out: captured.__setitem__("v", out))

    def attr_loss(encoded):
        v = captured.pop("v").float().view(len(encoded), n_visual, -1).amax(1)
        return (F.cross_entropy(attr_heads["shape"](v), shape_lab[encoded], ignore_index=-100)
                + F.cross_entropy(attr_heads["color"](v), color_lab[encoded], ignore_index=-100))

    # ---- optimiser
    decay, no_decay = [], []
    for n_, p in list(model.named_parameters()) + list(attr_heads.named_parameters()):
        (no_decay if p.ndim < 2 or "norm" in n_ or "embed" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}),
    )

    def lr_at(step, elapsed=0.0):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.time_limit:  # a binding time limit compresses the cosine so the run still anneals
            t = min(1.0, max(t, elapsed / args.time_limit))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    # ---- train
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    u_step = args.batch_size // per_img
    order, cursor = train_images[torch.randperm(len(train_images), generator=gen)], 0
    epochs = args.steps * u_step * per_img / len(tr_ids)
    log(f"training {args.steps} steps x ({u_step} images x {per_img} questions) = {epochs:.1f} question-epochs, "
        f"{args.steps * u_step / len(train_images):.1f} image-epochs; lr {args.lr}, aux coef {args.aux_coef}; "
        f"shared image encoding {shared['on']}")
    if shared["on"]:
        model.model.visual._share = per_img
    model.train()
    t_train = time.time()
    hist, step = [], 0
    for step in range(args.steps):
        if cursor + u_step > len(order):
            order, cursor = train_images[torch.randperm(len(train_images), generator=gen)], 0
        inputs = batch(order[cursor : cursor + u_step], not args.no_augment, gen, per_img)
        cursor += u_step
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, time.time() - t_train)
        with autocast():
            out = model(**inputs, output_router_logits=True)
        loss = out.loss
        if args.attr_weight:
            a_loss = attr_loss(batch.encoded)
            loss = loss + args.attr_weight * a_loss
        captured.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                y = inputs["labels"][:, 1:]
                m = y != -100
                tok_ok = ((out.logits[:, :-1].argmax(-1) == y) & m).sum() / m.sum()
            rec = dict(step=step + 1, loss=round(loss.item(), 5),
                       attr=round(a_loss.item(), 4) if args.attr_weight else None, aux=round(out.aux_loss.float().item(), 4),
                       tok_acc=round(tok_ok.item(), 4), lr=round(opt.param_groups[0]["lr"], 6), gnorm=round(gnorm.item(), 3),
                       elapsed_s=round(time.time() - t_train, 1))
            hist.append(rec)
            log(json.dumps(rec))
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            k = min(args.eval_subset, len(te_ids))
            model.model.visual._share = 1
            ok = teacher_forced_eval(model, te_ids[:k], te_lab[:k], te_mask[:k], te_img_idx[:k], te_imgs, ip, pos,
                                     grid_thw, args.eval_bs, device, autocast)
            if shared["on"]:
                model.model.visual._share = per_img
            log(f"step {step + 1}: teacher-forced test[:{k}] exact match {ok.float().mean().item():.4%} (monitoring only)")
            model.train()
        if args.time_limit and time.time() - t_train > args.time_limit:
            log(f"time limit reached: stopping after step {step + 1} of {args.steps}")
            break
    if cuda:
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    steps_done = step + 1
    log(f"training: {steps_done} steps in {train_s:.1f}s ({train_s / steps_done * 1000:.0f} ms/step)")

    # ---- evaluate (float32, stock attention, stock vision forward)
    if restore_attn:
        restore_attn()
    if shared["on"]:
        restore_share()
    if hook is not None:
        hook.remove()
    model.float().eval()
    fp32 = __import__("contextlib").nullcontext
    t0 = time.time()
    tf_test = teacher_forced_eval(model, te_ids, te_lab, te_mask, te_img_idx, te_imgs, ip, pos, grid_thw,
                                  args.eval_bs, device, fp32)
    vq = val_q.to(device)
    tf_val = teacher_forced_eval(model, tr_ids[vq], tr_lab[vq], tr_mask[vq], tr_img_idx[vq], tr_imgs, ip, pos,
                                 grid_thw, args.eval_bs, device, fp32)
    fq = torch.from_numpy(fit_q[:10000]).to(device)
    tf_train = teacher_forced_eval(model, tr_ids[fq], tr_lab[fq], tr_mask[fq], tr_img_idx[fq], tr_imgs, ip, pos,
                                   grid_thw, args.eval_bs, device, fp32)
    log(f"teacher-forced exact match: test {tf_test.float().mean().item():.4%} ({int(tf_test.sum())}/{len(tf_test)}), "
        f"validation {tf_val.float().mean().item():.4%} ({len(tf_val)}), train {tf_train.float().mean().item():.4%} "
        f"({time.time() - t0:.1f}s)")
    per_answer = {}
    for a in sorted(set(map(str, te_a))):
        sel = torch.from_numpy(np.array([str(x) == a for x in te_a]))
        per_answer[a] = round(tf_test[sel].float().mean().item(), 4)
    log("teacher-forced test accuracy per answer:", json.dumps(per_answer))
    route = routing_stats(model, te_ids, te_mask, te_img_idx, te_imgs, ip, pos, grid_thw, device, image_token_id)
    for r in route:
        log(f"routing layer {r['layer']}: expert perplexity visual {r['visual']['perplexity']} "
            f"text {r['text']['perplexity']} (of {tc.num_experts}); visual max share {max(r['visual']['share']):.3f}")

    # ---- save exactly as tiny_models.build_checkpoint does, with eos/pad = <|im_end|>
    out_dir = Path(args.out)
    dtype, size_mb = common.save_checkpoint(model, out_dir, (proc_cls, ip, tok, proc_kwargs), bf16_above_bytes=23e6)
    size = size_mb * 1e6
    log(f"checkpoint ({dtype}) written to {out_dir}: {size / 1e6:.2f} MB; files: {sorted(f.name for f in out_dir.iterdir())}")

    # ---- reload the checkpoint and run the engine's path: processor + greedy generate (float32)
    gen_acc = gen_mism = None
    n_vis_seen = None
    if not args.no_generate:
        from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

        t0 = time.time()
        reloaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(out_dir), dtype=torch.float32).to(device)
        proc = image_only_processor_class(proc_cls).from_pretrained(str(out_dir))
        assert AutoConfig.from_pretrained(str(out_dir)).text_config.num_experts == tc.num_experts
        limit = args.generate_limit or None
        gen_ok, preds, n_vis_seen = generate_eval(reloaded, proc, te_q, te_a, te_i, data["test_images"],
                                                  args.eval_bs, device, limit)
        gen_acc = float(gen_ok.mean())
        tf_ok = tf_test.numpy()[: len(gen_ok)]
        gen_mism = int((gen_ok != tf_ok).sum())
        log(f"greedy generate (reloaded checkpoint, processor path): test accuracy {gen_acc:.4%} "
            f"({int(gen_ok.sum())}/{len(gen_ok)}); visual tokens per prompt {n_vis_seen}; "
            f"disagreements with teacher-forced {gen_mism}; {time.time() - t0:.1f}s")
        wrong = [(str(q), str(a), p) for q, a, p, ok in zip(te_q, te_a, preds, gen_ok) if not ok][:15]
        for w in wrong:
            log("  wrong:", w)
        # batch-1 generation (as the engine runs) on a few questions must agree with the batched run
        one_ok, one_preds, _ = generate_eval(reloaded, proc, te_q[:32], te_a[:32], te_i[:32], data["test_images"], 1,
                                             device)
        log(f"batch-1 generate on {len(one_preds)} questions agrees with batched: "
            f"{one_preds[: len(preds)] == preds[: len(one_preds)]}")

    total_s = time.time() - t_start
    summary = dict(
        command="python " + " ".join(sys.argv), seed=args.seed, steps=steps_done, planned_steps=args.steps,
        batch_size=args.batch_size, epochs=round(steps_done * args.batch_size / len(tr_ids), 2),
        train_wall_s=round(train_s, 1), total_wall_s=round(total_s, 1), params=counts,
        checkpoint_mb=round(size / 1e6, 2), checkpoint_dtype=dtype,
        test_teacher_forced_acc=round(tf_test.float().mean().item(), 6), test_n=len(tf_test),
        val_teacher_forced_acc=round(tf_val.float().mean().item(), 6), val_n=len(tf_val), val_images=n_val,
        train_teacher_forced_acc=round(tf_train.float().mean().item(), 6), attr_weight=args.attr_weight,
        test_generate_acc=None if gen_acc is None else round(gen_acc, 6), generate_vs_tf_disagreements=gen_mism,
        visual_tokens_per_image=n_vis_seen, per_answer=per_answer, routing=route, history=hist,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(summary, indent=1))
    log(f"done in {total_s:.1f}s")
    return summary


if __name__ == "__main__":
    main()
