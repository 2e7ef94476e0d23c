"""Train the second bundled model: a Qwen3-VL-MoE, from scratch, on scene-VQA (vismmoe/evaluation/scenevqa.py).

The model is transformers' own `Qwen3VLMoeForConditionalGeneration` (6 MoE decoder layers, 32 experts,
top-4, load-balancing aux loss on), with the same char-level tokenizer, chat template and image-only
processor as the other tiny checkpoints (vismmoe.testing.tiny_models). Scene images are 224x224; the vision
tower uses 8 px patches merged 2x2, so 16 px per visual token: 28x28 patches -> 14x14 = 196 visual
tokens per image. Objects are 22-42 px, so each covers about 2-12 tokens: the task is pruning-sensitive.

Prompt format (the engine's): user turn = image + question; the model answers `ANSWER<|im_end|>`. Loss on
the answer tokens and <|im_end|>; plus two training-only losses. The name loss (--name-weight): from the LM's
last hidden state at the last character of each object the question names, throw-away heads predict that
object's size class, row and column (questions about two objects stay at chance without it). The token loss
(--token-weight), a dense per-visual-token loss: from
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

import contextlib
import io
import json
import multiprocessing as mp
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
from recipe_common import Geometry, encode_split, log, mrope_positions  # noqa: E402
from vismmoe.evaluation import scenevqa  # noqa: E402

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
# name loss: from the LM's last hidden state at the last character of each object the question names, predict
# that object's size class, row and column. Relative-position and relative-size questions name two objects;
# without this loss a 6-layer char-level LM stayed at chance on them (57% and 47% after 470 s of training).
NAME_HEADS = {"size": 2, "row": 3, "col": 3}


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


def name_bindings(scene, question: str) -> list[tuple[int, int, int, int]]:
    """(end offset in the question, size class, row, column) of each object the question names ("red circle"),
    in order of appearance: the training-only name loss teaches the LM to look an object up at its name."""
    found = []
    for o in scene.shapes():
        name = f"{o.color} {o.kind}"
        at = question.find(name)
        if at >= 0:
            found.append((at + len(name), int(o.large), o.cell // 3, o.cell % 3))
    return sorted(found)[:2]


def _make_chunk(job):
    split, start, stop = job
    scenes = scenevqa.split_items(split, start, stop)
    images = np.empty((len(scenes), GEOM.side, GEOM.side, 3), dtype=np.uint8)
    labels = np.empty((len(scenes), GEOM.n_visual, 5), dtype=np.uint8)
    for k, scene in enumerate(scenes):
        img, mask = scenevqa.render(scene, mask=True)
        images[k] = np.asarray(img)
        labels[k] = token_labels(scene, mask)
    questions = [[(i, t, q, a, name_bindings(s, q)) for t, q, a in s.questions]
                 for i, s in zip(range(start, stop), scenes)]
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
    names = np.full((len(rows), 2, 4), -1, dtype=np.int64)  # (end offset, size, row, col) per named object
    for i, r in enumerate(rows):
        for j, b in enumerate(r[4]):
            names[i, j] = b
    return dict(images=images, labels=labels, image_ids=image_ids, types=[r[1] for r in rows],
                questions=[r[2] for r in rows], answers=[r[3] for r in rows], names=names)


def question_start(processor, tok, question: str, row_ids: list[int], n_visual: int) -> int:
    """Token index of the question's first character in an encoded row (the prompt prefix before the question
    is the same for every row; char-level tokens, so character j of the question is token start + j)."""
    pad = "<|image_pad|>"
    text = common.render_prompt(processor, question).replace(pad, pad * n_visual)
    start = len(tok(text[: text.index(question)], add_special_tokens=False)["input_ids"])
    assert row_ids[start: start + len(question)] == tok(question, add_special_tokens=False)["input_ids"], \
        "the question's characters are not one token each at the expected place"
    return start


def encode(processor, questions, answers):
    """encode_split over the distinct (question, answer) pairs, gathered back to rows (fast for 10^5 rows)."""
    pairs = {}
    index = np.array([pairs.setdefault((q, a), len(pairs)) for q, a in zip(questions, answers)])
    uq = list(pairs)
    ids, lab, mask, _ = encode_split(processor, [q for q, _ in uq], [a for _, a in uq], GEOM.n_visual)
    index = torch.from_numpy(index)
    return ids[index], lab[index], mask[index], len(uq)


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
    ap = common.run_arguments(__doc__, out="models/scenevqa-qwen3vlmoe", steps=4000, lr=2e-3, warmup=200, eval_bs=256,
                              eval_every_help="teacher-forced accuracy on the val split",
                              smoke_help="tiny CPU run: 3 steps, 4 images x 2 questions")
    ap.add_argument("--train-images", type=int, default=scenevqa.SPLITS["train"][0])
    ap.add_argument("--images-per-step", type=int, default=64)
    ap.add_argument("--questions-per-image", type=int, default=6, help="rows per image per step, drawn from its 7 "
                    "(the ViT dominates the step: one 784-patch image costs about as much as 11 question rows)")
    ap.add_argument("--token-weight", type=float, default=0.5, help="weight of the training-only per-token "
                    "scene-label loss on the merger output; 0 disables")
    ap.add_argument("--name-weight", type=float, default=0.5, help="weight of the training-only name loss (see "
                    "NAME_HEADS); 0 disables")
    ap.add_argument("--workers", type=int, default=min(16, mp.cpu_count()), help="data-generation processes")
    ap.add_argument("--max-val", type=int, default=0)
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

    device, cuda = common.start_run(args.seed, args.device)
    log(f"generated {len(tr['images'])} train images ({len(tr['questions'])} questions), {n_val} val, {n_test} test "
        f"in {data_s:.1f}s with {args.workers} workers")

    # ---- model geometry (TEXT_SHAPE, VISION, GEOM above) and tokens / labels
    model, processor, (proc_cls, ip, tok, proc_kwargs) = common.build_model_and_processor(
        args.seed, args.aux_coef, TEXT_SHAPE, VISION, GEOM)
    tc = model.config.text_config
    n_visual = GEOM.n_visual

    t0 = time.time()
    enc = [encode(processor, d["questions"], d["answers"])[:3] for d in (tr, va, te)]
    ((tr_ids, tr_lab, tr_mask), (va_ids, va_lab, va_mask), (te_ids, te_lab, te_mask)), L = common.pad_splits(
        enc, tok.pad_token_id)
    pos = mrope_positions(tr_ids[0], model.config.image_token_id, GEOM.grid // GEOM.merge)
    log(f"tokenised in {time.time() - t0:.1f}s; seq len {L}; {n_visual} visual tokens per image")

    # ---- cross-checks against the processor (one sample): prompt tokens, pixel layout, M-RoPE positions
    from PIL import Image

    to_chw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    common.check_against_processor(model, processor, ip, GEOM, tr["questions"][0], Image.fromarray(tr["images"][0]),
                                   to_chw(tr["images"][:1]), tr_ids[0], tr_lab[0], pos)

    tr_imgs, va_imgs, te_imgs = (to_chw(d["images"]).to(device) for d in (tr, va, te))
    tr_tok = torch.from_numpy(tr["labels"]).long().to(device)
    tr_ids, tr_lab, tr_mask = tr_ids.to(device), tr_lab.to(device), tr_mask.to(device)
    va_idx, te_idx = torch.from_numpy(va["image_ids"]), torch.from_numpy(te["image_ids"])

    counts = common.parameter_counts(model)
    model.to(device)
    model.config.use_cache = False
    autocast = common.autocast_for(cuda)
    U, R = args.images_per_step, args.questions_per_image
    batches = common.ImageMajorBatches(tr["image_ids"], tr_imgs, tr_ids, tr_lab, tr_mask, pos, GEOM, ip, device)

    # ---- training-only speed-ups (checked against the stock path) and the experts kernel
    def probe(share):
        return batches(torch.arange(2), R, torch.Generator().manual_seed(1), share)[0]

    speedups = common.enable_checked_speedups(model, GEOM, probe, R)
    common.choose_experts_implementation(model, probe(False), autocast, cuda)

    # ---- auxiliary losses (training only): per-token scene-label heads on the merger output, name heads on
    # the LM's last hidden state
    hidden = tc.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in HEADS.items()}).to(device)
    name_heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in NAME_HEADS.items()}).to(device)
    capture = common.MergerCapture(model) if args.token_weight else None
    lm_capture = common.OutputCapture(model.model.language_model.norm) if args.name_weight else None
    q_start = question_start(processor, tok, tr["questions"][0], tr_ids[0].tolist(), n_visual)
    tr_names = torch.from_numpy(tr["names"]).to(device)
    tr_names[..., 0] = torch.where(tr_names[..., 0] >= 0, tr_names[..., 0] - 1 + q_start, -1)  # last char's token

    def token_loss(img_ids):
        v = capture.pop().float().view(len(img_ids), -1, n_visual, hidden)[:, 0]  # one copy per image
        lab = tr_tok[img_ids]
        return sum(F.cross_entropy(h(v).flatten(0, 1), lab[..., c].flatten()) for c, h in enumerate(heads.values()))

    def name_loss():
        states = lm_capture.pop().float()  # [rows, L, hidden]
        names = tr_names[batches.last_rows].view(-1, 4)  # [rows * 2, 4]
        row = torch.arange(states.shape[0], device=device).repeat_interleave(2)
        has = names[:, 0] >= 0
        if not bool(has.any()):  # no question in this batch names an object
            return states.sum() * 0.0
        h = states[row[has], names[has, 0]]
        return sum(F.cross_entropy(head(h), names[has, c + 1]) for c, head in enumerate(name_heads.values()))

    def aux_loss(img_ids):
        total = args.token_weight * token_loss(img_ids) if capture is not None else 0.0
        return total + (args.name_weight * name_loss() if lm_capture is not None else 0.0)

    # ---- train
    opt = common.adamw(model, torch.nn.ModuleList([heads, name_heads]), args.lr, args.weight_decay, cuda)

    def val_accuracy(dtype_ctx):
        return common.teacher_forced_eval(model, va_ids, va_lab, va_mask, va_idx, va_imgs, ip, pos,
                                          args.eval_bs, device, dtype_ctx, GEOM)

    def monitor(step):
        ok = val_accuracy(autocast)
        log(f"step {step}: val teacher-forced exact match {ok.float().mean().item():.4%} ({len(ok)})")
        return dict(step=step, val_acc=round(ok.float().mean().item(), 4))

    n_train = len(tr_imgs)
    log(f"training {args.steps} steps x ({U} images x {R} questions); lr {args.lr}, aux coef {args.aux_coef}, "
        f"token weight {args.token_weight}, time limit {args.time_limit or 'none'}")
    hist, steps_done, train_s = common.train(
        model, opt, args, pool=torch.arange(n_train), images_per_step=U, rows_per_image=R, batches=batches,
        speedups=speedups, autocast=autocast, aux_name="scene_aux",
        aux_weight=1.0 if (args.token_weight or args.name_weight) else 0.0, aux_loss=aux_loss,
        capture=capture, periodic_eval=monitor)

    # ---- evaluate (float32, stock vision forward)
    if lm_capture is not None:
        lm_capture.remove()
    common.end_training(model, speedups, capture)
    fp32 = contextlib.nullcontext
    t0 = time.time()
    tf_val = val_accuracy(fp32)
    tf_test = common.teacher_forced_eval(model, te_ids, te_lab, te_mask, te_idx, te_imgs, ip, pos,
                                         args.eval_bs, device, fp32, GEOM)
    per_type = {t: round(tf_test[[x == t for x in te["types"]]].float().mean().item(), 4)
                for t in scenevqa.QUESTION_TYPES if t in te["types"]}
    log(f"teacher-forced exact match: test {tf_test.float().mean().item():.4%} ({int(tf_test.sum())}/{len(tf_test)}), "
        f"val {tf_val.float().mean().item():.4%} ({len(tf_val)}) ({time.time() - t0:.1f}s)")
    log("teacher-forced test accuracy per question type:", json.dumps(per_type))
    route = common.routing_stats(model, te_ids, te_mask, te_idx, te_imgs, ip, pos, device, GEOM,
                                 n=min(128, len(te_ids)))
    common.log_routing(route, tc.num_experts)

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
    gen = None
    if not args.no_generate:
        gen = common.reload_and_generate(out_dir, proc_cls, te["questions"], te["answers"], te["image_ids"],
                                         te["images"], args.eval_bs, device, args.generate_limit or None, tf_test)

    summary = common.finish(dict(
        seed=args.seed, steps=steps_done, planned_steps=args.steps,
        images_per_step=U, questions_per_image=R, train_images=n_train, train_wall_s=round(train_s, 1),
        params=counts, checkpoint_mb=round(size_mb, 2), checkpoint_dtype=dtype,
        test_teacher_forced_acc=round(tf_test.float().mean().item(), 6), test_n=len(tf_test),
        val_teacher_forced_acc=round(tf_val.float().mean().item(), 6), val_n=len(tf_val), per_type=per_type,
        token_weight=args.token_weight, name_weight=args.name_weight, test_generate_acc=None if gen is None else round(gen["acc"], 6),
        generate_vs_tf_disagreements=None if gen is None else gen["mismatches"],
        visual_tokens_per_image=None if gen is None else gen["n_visual"], routing=route, history=hist,
    ), args.metrics, t_start, device, cuda)
    (out_dir / "train_log.txt").write_text(tee.buffer_.getvalue())
    return summary


if __name__ == "__main__":
    main()
