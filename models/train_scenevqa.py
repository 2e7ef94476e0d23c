"""Train the second bundled model: a Qwen3-VL-MoE, from scratch, on scene-VQA (vismmoe/evaluation/scenevqa.py).

The model is transformers' own `Qwen3VLMoeForConditionalGeneration` (6 MoE decoder layers, 32 experts,
top-4, load-balancing aux loss on), with the same char-level tokenizer, chat template and image-only
processor as the other tiny checkpoints (vismmoe.tiny_models). Scene images are 224x224; the vision
tower uses 8 px patches merged 2x2, so 16 px per visual token: 28x28 patches -> 14x14 = 196 visual
tokens per image. Objects are 16-36 px, so each covers 1-9 tokens: the task is pruning-sensitive.

Prompt format (the engine's): user turn = image + question; the model answers `ANSWER<|im_end|>`. Loss on
the answer tokens and <|im_end|>; plus, training only (--token-weight), a dense per-visual-token loss: from
each merged visual token (the merger output the LLM sees) throw-away linear heads predict the colour,
kind (shape or digit tile), digit, size class and "holds an object centre" of the object covering that
token's 16x16 block (from the scene's own object mask). It teaches the small ViT where the small objects
are far faster than the answer loss alone; the saved checkpoint is the stock model.

Data: generated at start from (split, index) seeds in --workers processes (same pixels for any worker
count); train = `scenevqa.SPLITS["train"]` images x 7 questions, val and test 1 question per image.

GPU command (one H200; nothing to carry beyond the repository; about 7 minutes wall in total):

    PYTHONUNBUFFERED=1 python3 models/train_scenevqa.py --out $OUT/scenevqa-qwen3vlmoe --time-limit 330 \\
        --metrics $OUT/metrics.json

It writes the checkpoint directory (36.6 MB float32 weights + tokenizer/processor/chat template,
generation_config, examples/, train_log.txt), ready to copy to models/scenevqa-qwen3vlmoe.

CPU smoke run (a few steps on a small subset, checks the pipeline end to end):

    .venv/bin/python models/train_scenevqa.py --smoke --out /tmp/scene-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
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

import recipe_common as common  # noqa: E402
from recipe_common import Geometry, encode_split, log, mrope_positions, render_prompt  # noqa: E402
from vismmoe.evaluation import scenevqa  # noqa: E402
from vismmoe.tiny_models import image_only_processor_class  # noqa: E402

GEOM = Geometry(side=scenevqa.SIDE, patch=8, merge=2, tpatch=2)  # 196 visual tokens
TEXT_SHAPE = dict(
    hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, moe_intermediate_size=64, num_experts=32, top_k=4,
)
VISION = dict(
    depth=6, hidden_size=192, intermediate_size=384, num_heads=4, num_position_embeddings=GEOM.n_patches,
    deepstack_visual_indexes=[1, 3],
)
MAX_BYTES = 40e6
# per-token label channels: colour (0 = none), kind (0 none, shapes, 5 = digit tile), digit (0 none, 1+d),
# size (0 none, 1 small, 2 large), centre (1 = the token holds an object's centre)
HEADS = {"color": 1 + len(scenevqa.COLORS), "kind": 2 + len(scenevqa.SHAPES), "digit": 11, "size": 3, "center": 2}


# --------------------------------------------------------------------------------------------- data
def token_labels(scene, mask) -> np.ndarray:
    """(196, 5) uint8 labels of each 16x16 block: the object covering most of it (>= 1/8 of its pixels)."""
    tok = GEOM.patch * GEOM.merge
    g = GEOM.side // tok
    m = np.asarray(mask).reshape(g, tok, g, tok).transpose(0, 2, 1, 3).reshape(g * g, tok * tok)
    counts = np.stack([(m == i + 1).sum(1) for i in range(len(scene.objects))], 1)
    best = counts.argmax(1)
    covered = counts.max(1) >= tok * tok // 8
    colors, kinds = list(scenevqa.COLORS), list(scenevqa.SHAPES)
    table = np.zeros((len(scene.objects) + 1, 5), dtype=np.uint8)
    for i, o in enumerate(scene.objects):
        if o.kind == "digit":
            table[i + 1, :4] = (0, len(kinds) + 1, o.digit + 1, 0)
        else:
            table[i + 1, :4] = (colors.index(o.color) + 1, kinds.index(o.kind) + 1, 0, 1 + o.large)
    out = table[np.where(covered, best + 1, 0)]
    for o in scene.objects:
        out[(o.cy // tok) * g + o.cx // tok, 4] = 1
    return out


def _make_chunk(job):
    split, start, stop = job
    scenes = scenevqa.split_items(split, start, stop)
    images = np.empty((len(scenes), GEOM.side, GEOM.side, 3), dtype=np.uint8)
    labels = np.empty((len(scenes), GEOM.n_visual, 5), dtype=np.uint8)
    for k, scene in enumerate(scenes):
        img, mask = scenevqa.render(scene, mask=True)
        images[k] = np.asarray(img)
        labels[k] = token_labels(scene, mask)
    questions = [[(i, t, q, a) for t, q, a in s.questions] for i, s in zip(range(start, stop), scenes)]
    return images, labels, [x for qs in questions for x in qs]


def generate(split: str, n_images: int, workers: int, chunk: int = 250):
    jobs = [(split, s, min(n_images, s + chunk)) for s in range(0, n_images, chunk)]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_make_chunk, jobs)
    else:
        parts = [_make_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    rows = [r for p in parts for r in p[2]]
    image_ids = np.array([r[0] for r in rows], dtype=np.int64)
    return dict(images=images, labels=labels, image_ids=image_ids, types=[r[1] for r in rows],
                questions=[r[2] for r in rows], answers=[r[3] for r in rows])


def encode(processor, questions, answers):
    """encode_split over the distinct (question, answer) pairs, gathered back to rows (fast for 10^5 rows)."""
    pairs = {}
    index = np.array([pairs.setdefault((q, a), len(pairs)) for q, a in zip(questions, answers)])
    uq = list(pairs)
    ids, lab, mask, _ = encode_split(processor, [q for q, _ in uq], [a for _, a in uq], GEOM.n_visual)
    index = torch.from_numpy(index)
    return ids[index], lab[index], mask[index], len(uq)


def cosine_lr(step, elapsed, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_limit:  # a binding time limit compresses the cosine so the run still anneals
        t = min(1.0, max(t, elapsed / args.time_limit))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, s):
        self.buffer_.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


# --------------------------------------------------------------------------------------- main
def main(argv=None):
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        return _main(argv, tee)


def _main(argv, tee):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/scenevqa-qwen3vlmoe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, default=scenevqa.SPLITS["train"][0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--images-per-step", type=int, default=64)
    ap.add_argument("--questions-per-image", type=int, default=6, help="rows per image per step, drawn from its 7 "
                    "(the ViT dominates the step: one 784-patch image costs about as much as 11 question rows)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.02)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef (load balancing)")
    ap.add_argument("--token-weight", type=float, default=0.5, help="weight of the training-only per-token "
                    "scene-label loss on the merger output; 0 disables")
    ap.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds; the cosine "
                    "then follows max(step fraction, time fraction) (0: off)")
    ap.add_argument("--workers", type=int, default=min(16, mp.cpu_count()), help="data-generation processes")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500, help="teacher-forced accuracy on the val split")
    ap.add_argument("--eval-bs", type=int, default=256)
    ap.add_argument("--max-val", type=int, default=0)
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--generate-limit", type=int, default=0, help="greedy-generate only N test questions (0: all)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--metrics", default="", help="write a JSON summary here")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 3 steps, 4 images x 2 questions")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.images_per_step, args.questions_per_image, args.warmup, args.log_every = 3, 4, 2, 1, 1
        args.train_images, args.max_val, args.max_test, args.generate_limit, args.eval_bs = 32, 8, 8, 4, 8
        args.eval_every, args.workers = 2, 1

    t_start = time.time()
    # ---- data, generated before anything touches CUDA (the workers are forked)
    n_val = args.max_val or scenevqa.SPLITS["val"][0]
    n_test = args.max_test or scenevqa.SPLITS["test"][0]
    tr = generate("train", args.train_images, args.workers)
    va = generate("val", n_val, args.workers)
    te = generate("test", n_test, args.workers)
    data_s = time.time() - t_start

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
    log(f"generated {len(tr['images'])} train images ({len(tr['questions'])} questions), {n_val} val, {n_test} test "
        f"in {data_s:.1f}s with {args.workers} workers")


    model, processor, (proc_cls, ip, tok, proc_kwargs) = common.build_model_and_processor(
        args.seed, args.aux_coef, TEXT_SHAPE, VISION, GEOM)
    cfg = model.config
    image_token_id = cfg.image_token_id
    n_visual, gm = GEOM.n_visual, GEOM.grid // GEOM.merge
    grid_thw = torch.tensor([[1, GEOM.grid, GEOM.grid]])

    t0 = time.time()
    enc = {name: encode(processor, d["questions"], d["answers"]) for name, d in (("train", tr), ("val", va), ("test", te))}
    L = max(e[0].shape[1] for e in enc.values())
    pad = lambda t, v: F.pad(t, (0, L - t.shape[1]), value=v)  # noqa: E731
    enc = {k: (pad(i, tok.pad_token_id), pad(lb, -100), pad(m, 0)) for k, (i, lb, m, _) in enc.items()}
    tr_ids, tr_lab, tr_mask = enc["train"]
    pos = mrope_positions(tr_ids[0], image_token_id, gm)
    log(f"tokenised in {time.time() - t0:.1f}s; seq len {L}; {n_visual} visual tokens per image")

    # ---- cross-checks against the processor (one sample): prompt tokens and pixel layout
    from PIL import Image

    ref = processor(text=[render_prompt(processor, tr["questions"][0])], images=[Image.fromarray(tr["images"][0])],
                    return_tensors="pt")
    n_prompt = int((tr_lab[0] == -100).long().cumprod(0).sum())
    assert ref["input_ids"][0].tolist() == tr_ids[0, :n_prompt].tolist(), "prompt tokens differ from the processor's"
    assert int((ref["input_ids"] == image_token_id).sum()) == n_visual
    to_chw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    diff = (GEOM.patchify(to_chw(tr["images"][:1]), ip) - ref["pixel_values"]).abs().max().item()
    log(f"patchify vs processor pixel_values: max abs diff {diff:.2e}")
    assert diff < 1e-4
    try:
        kw = {"mm_token_type_ids": ref["mm_token_type_ids"]} if "mm_token_type_ids" in ref else {}
        want, _ = model.model.get_rope_index(ref["input_ids"], image_grid_thw=ref["image_grid_thw"], **kw)
        same = torch.equal(want[:, 0].cpu(), pos[:, :n_prompt])
        log("M-RoPE positions match get_rope_index" if same else "WARNING: M-RoPE positions differ from get_rope_index")
    except Exception as exc:  # noqa: BLE001 - signature varies across transformers versions
        log(f"WARNING: could not compare with get_rope_index: {type(exc).__name__}: {exc}")

    tr_imgs, va_imgs, te_imgs = (to_chw(d["images"]).to(device) for d in (tr, va, te))
    tr_tok = torch.from_numpy(tr["labels"]).long().to(device)
    tr_ids, tr_lab, tr_mask = tr_ids.to(device), tr_lab.to(device), tr_mask.to(device)

    # ---- model
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    n_exp = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
    tc = cfg.text_config
    per_expert = n_exp // (tc.num_hidden_layers * tc.num_experts)
    n_active = n_params - n_exp + tc.num_hidden_layers * tc.num_experts_per_tok * per_expert
    counts = dict(total=n_params, vision=n_vis, text=n_params - n_vis, experts=n_exp, per_expert=per_expert,
                  active_per_token=n_active)
    log("parameters:", json.dumps(counts), f"(float32 {n_params * 4 / 1e6:.1f} MB)")
    model.to(device)
    model.config.use_cache = False
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    # questions grouped by image (CSR), for image-major batches
    q_order = torch.from_numpy(np.argsort(tr["image_ids"], kind="stable")).to(device)
    q_count = torch.from_numpy(np.bincount(tr["image_ids"], minlength=len(tr_imgs))).to(device)
    q_start = torch.cumsum(q_count, 0) - q_count
    U, R = args.images_per_step, args.questions_per_image

    def batch(img_ids, gen, share):
        img_ids = img_ids.to(device)
        pick = (torch.rand(len(img_ids), R, generator=gen).to(device) * q_count[img_ids, None]).long()
        idx = q_order[q_start[img_ids, None] + pick].reshape(-1)
        pv = GEOM.patchify(tr_imgs[img_ids], ip)
        if not share:
            pv = pv.view(len(img_ids), -1, pv.shape[-1]).repeat_interleave(R, 0).reshape(-1, pv.shape[-1])
        b = len(idx)
        return dict(input_ids=tr_ids[idx], attention_mask=tr_mask[idx], labels=tr_lab[idx], pixel_values=pv,
                    position_ids=pos.to(device).unsqueeze(1).expand(3, b, -1),
                    image_grid_thw=grid_thw.to(device).expand(b, 3)), img_ids

    # ---- training-only speed-ups, each checked against the stock path on this machine (fp32, no TF32);
    # one that disagrees is switched off (slower, same maths) rather than trusted
    restore_attn = common.enable_batched_vision_attention()
    probe, _ = batch(torch.arange(2), torch.Generator().manual_seed(1), False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    with torch.no_grad():
        fast = model(**probe).logits
        restore_attn()
        stock = model(**probe).logits
        d_attn = (fast - stock).abs().max().item()
        restore_attn = common.enable_batched_vision_attention() if d_attn < 1e-3 else (lambda: None)
        restore_share = common.enable_shared_image_encoding(model, GEOM)
        short, _ = batch(torch.arange(2), torch.Generator().manual_seed(1), True)
        model.model.visual._share = R
        d_share = (model(**short).logits - stock).abs().max().item()
        model.model.visual._share = 1
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    share_on = d_share < 1e-3
    log(f"batched vision attention vs stock: max abs logit diff {d_attn:.2e} ({'on' if d_attn < 1e-3 else 'OFF'}); "
        f"shared image encoding: {d_share:.2e} ({'on' if share_on else 'OFF'})")
    if not share_on:
        restore_share()
        restore_share = lambda: None  # noqa: E731
    model.train()
    for impl in (["grouped_mm", "batched_mm", "eager"] if cuda else ["eager"]):
        try:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            with autocast():
                model(**probe, output_router_logits=True).loss.backward()
            model.zero_grad(set_to_none=True)
            log(f"experts implementation: {impl}")
            break
        except Exception as exc:  # noqa: BLE001 - fall back to a slower but always-available kernel
            log(f"experts implementation {impl} failed: {type(exc).__name__}: {str(exc)[:200]}")
            model.zero_grad(set_to_none=True)
    else:
        raise RuntimeError("no experts implementation works")

    # ---- training-only per-token scene-label heads on the merger output
    hidden = tc.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in HEADS.items()}).to(device)
    captured, hook = {}, None
    if args.token_weight:
        hook = model.model.visual.merger.register_forward_hook(lambda mod, inp, out: captured.__setitem__("v", out))

    def token_loss(img_ids):
        v = captured.pop("v").float().view(len(img_ids), -1, n_visual, hidden)[:, 0]  # one copy per image
        lab = tr_tok[img_ids]
        return sum(F.cross_entropy(h(v).flatten(0, 1), lab[..., c].flatten()) for c, h in enumerate(heads.values()))

    decay, no_decay = [], []
    for n_, p in list(model.named_parameters()) + list(heads.named_parameters()):
        (no_decay if p.ndim < 2 or "norm" in n_ or "embed" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}),
    )

    va_ids, va_lab, va_mask = enc["val"]
    te_ids, te_lab, te_mask = enc["test"]
    va_idx, te_idx = torch.from_numpy(va["image_ids"]), torch.from_numpy(te["image_ids"])

    def val_accuracy(dtype_ctx):
        model.model.visual._share = 1
        ok = common.teacher_forced_eval(model, va_ids, va_lab, va_mask, va_idx, va_imgs, ip, pos, grid_thw,
                                        args.eval_bs, device, dtype_ctx, GEOM)
        return ok

    # ---- train
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n_train = len(tr_imgs)
    order, cursor = torch.randperm(n_train, generator=gen), 0
    log(f"training {args.steps} steps x ({U} images x {R} questions); lr {args.lr}, aux coef {args.aux_coef}, "
        f"token weight {args.token_weight}, time limit {args.time_limit or 'none'}")
    model.train()
    t_train = time.time()
    hist, step = [], 0
    for step in range(args.steps):
        if cursor + U > n_train:
            order, cursor = torch.randperm(n_train, generator=gen), 0
        inputs, img_ids = batch(order[cursor: cursor + U], gen, share_on)
        cursor += U
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, time.time() - t_train, args)
        model.model.visual._share = R if share_on else 1
        with autocast():
            out = model(**inputs, output_router_logits=True)
        loss = out.loss
        t_loss = None
        if args.token_weight:
            t_loss = token_loss(img_ids)
            loss = loss + args.token_weight * t_loss
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
            rec = dict(step=step + 1, loss=round(loss.item(), 5), token=None if t_loss is None else round(t_loss.item(), 4),
                       aux=round(out.aux_loss.float().item(), 4), tok_acc=round(tok_ok.item(), 4),
                       lr=round(opt.param_groups[0]["lr"], 6), gnorm=round(gnorm.item(), 3),
                       elapsed_s=round(time.time() - t_train, 1))
            hist.append(rec)
            log(json.dumps(rec))
        stop = args.time_limit and time.time() - t_train > args.time_limit
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps and not stop:
            ok = val_accuracy(autocast)
            log(f"step {step + 1}: val teacher-forced exact match {ok.float().mean().item():.4%} ({len(ok)})")
            hist.append(dict(step=step + 1, val_acc=round(ok.float().mean().item(), 4)))
            model.train()
        if stop:
            log(f"time limit reached: stopping after step {step + 1} of {args.steps}")
            break
    if cuda:
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    steps_done = step + 1
    log(f"training: {steps_done} steps in {train_s:.1f}s ({train_s / steps_done * 1000:.0f} ms/step)")

    # ---- evaluate (float32, stock vision forward)
    restore_attn()
    restore_share()
    if hook is not None:
        hook.remove()
    model.float().eval()
    fp32 = contextlib.nullcontext
    t0 = time.time()
    tf_val = val_accuracy(fp32)
    tf_test = common.teacher_forced_eval(model, te_ids, te_lab, te_mask, te_idx, te_imgs, ip, pos, grid_thw,
                                         args.eval_bs, device, fp32, GEOM)
    per_type = {t: round(tf_test[[x == t for x in te["types"]]].float().mean().item(), 4)
                for t in scenevqa.QUESTION_TYPES if t in te["types"]}
    log(f"teacher-forced exact match: test {tf_test.float().mean().item():.4%} ({int(tf_test.sum())}/{len(tf_test)}), "
        f"val {tf_val.float().mean().item():.4%} ({len(tf_val)}) ({time.time() - t0:.1f}s)")
    log("teacher-forced test accuracy per question type:", json.dumps(per_type))
    route = common.routing_stats(model, te_ids, te_mask, te_idx, te_imgs, ip, pos, grid_thw, device, image_token_id,
                                 GEOM, n=min(128, len(te_ids)))
    for r in route:
        log(f"routing layer {r['layer']}: expert perplexity visual {r['visual']['perplexity']} "
            f"text {r['text']['perplexity']} (of {tc.num_experts})")

    # ---- save (+ examples: a few test scenes with their questions)
    out_dir = Path(args.out)
    dtype, size_mb = common.save_checkpoint(model, out_dir, (proc_cls, ip, tok, proc_kwargs), bf16_above_bytes=MAX_BYTES)
    examples = out_dir / "examples"
    examples.mkdir(exist_ok=True)
    ex = {}
    for i in range(min(3, len(te["questions"]))):
        name = f"test_{te['image_ids'][i]}.png"
        Image.fromarray(te["images"][te["image_ids"][i]]).save(examples / name)
        ex[name] = {"question": te["questions"][i], "answer": te["answers"][i],
                    "source": f"scene-VQA test image {te['image_ids'][i]} ({te['types'][i]})"}
    (examples / "questions.json").write_text(json.dumps(ex, indent=1) + "\n")
    log(f"checkpoint ({dtype}) written to {out_dir}: {size_mb:.2f} MB of weights + processor files")

    # ---- reload the checkpoint and run the engine's path: processor + greedy generate (float32)
    gen_acc = gen_mism = n_vis_seen = None
    if not args.no_generate:
        from transformers import Qwen3VLMoeForConditionalGeneration

        t0 = time.time()
        reloaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(out_dir), dtype=torch.float32).to(device)
        proc = image_only_processor_class(proc_cls).from_pretrained(str(out_dir))
        gen_ok, preds, n_vis_seen = common.generate_eval(reloaded, proc, te["questions"], te["answers"], te["image_ids"],
                                                         te["images"], args.eval_bs, device, args.generate_limit or None)
        gen_acc = float(gen_ok.mean())
        gen_mism = int((gen_ok != tf_test.numpy()[: len(gen_ok)]).sum())
        log(f"greedy generate (reloaded checkpoint, processor path): test accuracy {gen_acc:.4%} "
            f"({int(gen_ok.sum())}/{len(gen_ok)}); visual tokens per prompt {n_vis_seen}; "
            f"disagreements with teacher-forced {gen_mism}; {time.time() - t0:.1f}s")
        for w in [(q, a, p) for q, a, p, ok in zip(te["questions"], te["answers"], preds, gen_ok) if not ok][:15]:
            log("  wrong:", w)

    total_s = time.time() - t_start
    summary = dict(
        command="python " + " ".join(sys.argv), seed=args.seed, steps=steps_done, planned_steps=args.steps,
        images_per_step=U, questions_per_image=R, train_images=n_train, train_wall_s=round(train_s, 1),
        total_wall_s=round(total_s, 1), params=counts, checkpoint_mb=round(size_mb, 2), checkpoint_dtype=dtype,
        test_teacher_forced_acc=round(tf_test.float().mean().item(), 6), test_n=len(tf_test),
        val_teacher_forced_acc=round(tf_val.float().mean().item(), 6), val_n=len(tf_val), per_type=per_type,
        token_weight=args.token_weight, test_generate_acc=None if gen_acc is None else round(gen_acc, 6),
        generate_vs_tf_disagreements=gen_mism, visual_tokens_per_image=n_vis_seen, routing=route, history=hist,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(summary, indent=1))
    log(f"done in {total_s:.1f}s")
    (out_dir / "train_log.txt").write_text(tee.buffer_.getvalue())
    return summary


if __name__ == "__main__":
    main()
