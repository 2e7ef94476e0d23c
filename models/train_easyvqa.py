"""Train the bundled demo model: a small Qwen3-VL-MoE, from scratch, on easy-VQA.

The model is transformers' own `Qwen3VLMoeForConditionalGeneration` (4 MoE decoder layers, 16 experts,
top-2, load-balancing aux loss on), built with `vismmoe.testing.tiny_models` so the checkpoint has the same
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

import contextlib
import json
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
from recipe_common import Geometry, encode_split, log, mrope_positions  # noqa: E402

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


# --------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = common.run_arguments(__doc__, out="models/easyvqa-qwen3vlmoe", steps=2000, lr=1.5e-3, warmup=100, eval_bs=512,
                              eval_every_help="teacher-forced check on --eval-subset test questions",
                              smoke_help="tiny CPU run: 3 steps, batch 8, small subsets")
    ap.add_argument("--data", default=".cache/easyvqa/easyvqa.npz", help="packed easy-VQA (models/pack_easyvqa.py); "
                    "falls back to the easy_vqa package when missing")
    ap.add_argument("--batch-size", type=int, default=512, help="sequences (questions) per step")
    ap.add_argument("--images-per-step", type=int, default=128, help="distinct images per step; each brings "
                    "batch-size/images-per-step of its questions (sampled with replacement)")
    ap.add_argument("--attr-weight", type=float, default=0.5, help="weight of the training-only image-attribute "
                    "loss (shape/colour of each train image, read off its answers, predicted from the max-pooled "
                    "visual tokens by a throw-away linear head); 0 disables")
    ap.add_argument("--val-images", type=int, default=300, help="train images held out (with their questions) "
                    "for validation")
    ap.add_argument("--no-augment", action="store_true", help="disable random flips/transposes")
    ap.add_argument("--eval-subset", type=int, default=2048)
    ap.add_argument("--max-train", type=int, default=0, help="use only the first N train questions")
    ap.add_argument("--stock-vision-attention", action="store_true", help="keep transformers' per-image loop")
    ap.add_argument("--no-shared-images", action="store_true", help="encode one image copy per row instead of "
                    "once per distinct image (same maths, slower; what the 1st bundled run used)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.images_per_step, args.warmup, args.log_every = 3, 8, 4, 1, 1
        args.max_train, args.max_test, args.generate_limit, args.eval_bs = 64, 16, 4, 8
        args.eval_every, args.eval_subset = 2, 8

    t_start = time.time()
    device, cuda = common.start_run(args.seed, args.device)

    data = load_data(args.data)
    model, processor, (proc_cls, ip, tok, proc_kwargs) = common.build_model_and_processor(
        args.seed, args.aux_coef, TEXT_SHAPE, VISION, GEOM)
    tc = model.config.text_config
    n_visual = GEOM.n_visual

    # ---- tokens / labels (precomputed once)
    sl_tr = slice(None, args.max_train or None)
    sl_te = slice(None, args.max_test or None)
    tr_q, tr_a, tr_i = data["train_questions"][sl_tr], data["train_answers"][sl_tr], data["train_image_ids"][sl_tr]
    te_q, te_a, te_i = data["test_questions"][sl_te], data["test_answers"][sl_te], data["test_image_ids"][sl_te]
    tr_ids, tr_lab, tr_mask, nq = encode_split(processor, tr_q, tr_a, n_visual)
    te_ids, te_lab, te_mask, _ = encode_split(processor, te_q, te_a, n_visual)
    ((tr_ids, tr_lab, tr_mask), (te_ids, te_lab, te_mask)), L = common.pad_splits(
        [(tr_ids, tr_lab, tr_mask), (te_ids, te_lab, te_mask)], tok.pad_token_id)
    pos = mrope_positions(tr_ids[0], model.config.image_token_id, GEOM.grid // GEOM.merge)
    log(f"train {len(tr_ids)} questions ({nq} distinct), test {len(te_ids)}; seq len {L}; {n_visual} visual tokens")

    # ---- cross-checks against the processor / the model's own rope index (one sample)
    from PIL import Image

    i0 = int(tr_i[0])
    common.check_against_processor(model, processor, ip, GEOM, str(tr_q[0]), Image.fromarray(data["train_images"][i0]),
                                   resized_images(ip, data["train_images"][[i0]]), tr_ids[0], tr_lab[0], pos)

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
    counts = common.parameter_counts(model)
    model.to(device)
    model.config.use_cache = False
    autocast = common.autocast_for(cuda)

    # ---- validation hold-out (whole images) and the per-image attributes of the rest
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
    # Rows: for each image, per_img of its questions (with replacement); each image augmented once.
    batches = common.ImageMajorBatches(tr_i, tr_imgs, tr_ids, tr_lab, tr_mask, pos, GEOM, ip, device,
                                       transform=None if args.no_augment else dihedral)

    # ---- training-only speed-ups (checked against the stock path) and the experts kernel
    def probe(share):
        return batches(train_images[:4], 2, torch.Generator().manual_seed(1), share, augment=False)[0]

    speedups = common.enable_checked_speedups(model, GEOM, probe, 2, batched_attention=not args.stock_vision_attention,
                                              shared_images=not args.no_shared_images)
    common.choose_experts_implementation(model, probe(False), autocast, cuda)

    # ---- auxiliary loss (training only): shape/colour heads on the max-pooled visual tokens (the merger output)
    hidden = tc.hidden_size
    attr_heads, capture = torch.nn.ModuleDict(), None
    if args.attr_weight:
        attr_heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(hidden, len(SHAPES)),
                                          "color": torch.nn.Linear(hidden, len(COLORS))}).to(device)
        capture = common.MergerCapture(model)

    def attr_loss(img_ids):
        encoded = img_ids if speedups.shared_images else img_ids.repeat_interleave(per_img)
        v = capture.pop().float().view(len(encoded), n_visual, -1).amax(1)
        return (F.cross_entropy(attr_heads["shape"](v), shape_lab[encoded], ignore_index=-100)
                + F.cross_entropy(attr_heads["color"](v), color_lab[encoded], ignore_index=-100))

    # ---- train
    opt = common.adamw(model, attr_heads, args.lr, args.weight_decay, cuda)
    u_step = args.batch_size // per_img
    epochs = args.steps * u_step * per_img / len(tr_ids)
    log(f"training {args.steps} steps x ({u_step} images x {per_img} questions) = {epochs:.1f} question-epochs, "
        f"{args.steps * u_step / len(train_images):.1f} image-epochs; lr {args.lr}, aux coef {args.aux_coef}; "
        f"shared image encoding {speedups.shared_images}")

    def monitor(step):
        k = min(args.eval_subset, len(te_ids))
        ok = common.teacher_forced_eval(model, te_ids[:k], te_lab[:k], te_mask[:k], te_img_idx[:k], te_imgs, ip, pos,
                                        args.eval_bs, device, autocast, GEOM)
        log(f"step {step}: teacher-forced test[:{k}] exact match {ok.float().mean().item():.4%} (monitoring only)")

    hist, steps_done, train_s = common.train(
        model, opt, args, pool=train_images, images_per_step=u_step, rows_per_image=per_img, batches=batches,
        speedups=speedups, autocast=autocast, aux_name="attr", aux_weight=args.attr_weight, aux_loss=attr_loss,
        capture=capture, periodic_eval=monitor)

    # ---- evaluate (float32, stock attention, stock vision forward)
    common.end_training(model, speedups, capture)
    fp32 = contextlib.nullcontext
    t0 = time.time()

    def accuracy(rows, ids, lab, mask, img_idx, imgs):
        return common.teacher_forced_eval(model, ids[rows], lab[rows], mask[rows], img_idx[rows], imgs, ip, pos,
                                          args.eval_bs, device, fp32, GEOM)

    tf_test = accuracy(slice(None), te_ids, te_lab, te_mask, te_img_idx, te_imgs)
    tf_val = accuracy(val_q.to(device), tr_ids, tr_lab, tr_mask, tr_img_idx, tr_imgs)
    tf_train = accuracy(torch.from_numpy(fit_q[:10000]).to(device), tr_ids, tr_lab, tr_mask, tr_img_idx, tr_imgs)
    log(f"teacher-forced exact match: test {tf_test.float().mean().item():.4%} ({int(tf_test.sum())}/{len(tf_test)}), "
        f"validation {tf_val.float().mean().item():.4%} ({len(tf_val)}), train {tf_train.float().mean().item():.4%} "
        f"({time.time() - t0:.1f}s)")
    per_answer = {}
    for a in sorted(set(map(str, te_a))):
        sel = torch.from_numpy(np.array([str(x) == a for x in te_a]))
        per_answer[a] = round(tf_test[sel].float().mean().item(), 4)
    log("teacher-forced test accuracy per answer:", json.dumps(per_answer))
    route = common.routing_stats(model, te_ids, te_mask, te_img_idx, te_imgs, ip, pos, device, GEOM)
    common.log_routing(route, tc.num_experts)

    # ---- save exactly as tiny_models.build_checkpoint does, with eos/pad = <|im_end|>
    out_dir = Path(args.out)
    dtype, size_mb = common.save_checkpoint(model, out_dir, (proc_cls, ip, tok, proc_kwargs), bf16_above_bytes=23e6)
    log(f"checkpoint ({dtype}) written to {out_dir}: {size_mb:.2f} MB; files: {sorted(f.name for f in out_dir.iterdir())}")

    # ---- reload the checkpoint and run the engine's path: processor + greedy generate (float32)
    gen = None
    if not args.no_generate:
        gen = common.reload_and_generate(out_dir, proc_cls, te_q, te_a, te_i, data["test_images"], args.eval_bs, device,
                                         args.generate_limit or None, tf_test)
        # batch-1 generation (as the engine runs) on a few questions must agree with the batched run
        _, one_preds, _ = common.generate_eval(gen["model"], gen["processor"], te_q[:32], te_a[:32], te_i[:32],
                                               data["test_images"], 1, device)
        preds = gen["preds"]
        log(f"batch-1 generate on {len(one_preds)} questions agrees with batched: "
            f"{one_preds[: len(preds)] == preds[: len(one_preds)]}")

    return common.finish(dict(
        seed=args.seed, steps=steps_done, planned_steps=args.steps,
        batch_size=args.batch_size, epochs=round(steps_done * args.batch_size / len(tr_ids), 2),
        train_wall_s=round(train_s, 1), params=counts,
        checkpoint_mb=round(size_mb, 2), checkpoint_dtype=dtype,
        test_teacher_forced_acc=round(tf_test.float().mean().item(), 6), test_n=len(tf_test),
        val_teacher_forced_acc=round(tf_val.float().mean().item(), 6), val_n=len(tf_val), val_images=n_val,
        train_teacher_forced_acc=round(tf_train.float().mean().item(), 6), attr_weight=args.attr_weight,
        test_generate_acc=None if gen is None else round(gen["acc"], 6),
        generate_vs_tf_disagreements=None if gen is None else gen["mismatches"],
        visual_tokens_per_image=None if gen is None else gen["n_visual"], per_answer=per_answer, routing=route,
        history=hist,
    ), args.metrics, t_start, device, cuda)


if __name__ == "__main__":
    main()
