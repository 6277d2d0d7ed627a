#!/usr/bin/env python
"""Train nbllm's embedded vision-language model from scratch, offline and reproducibly.

The pipeline, one function per stage:

  (a) draw synthetic pictures (coloured circles, squares, triangles and stars
      on a white canvas) with known answers to questions about colour, shape,
      count and position (``random_scene``, ``draw_scene``, ``questions_for``);
  (b) train a byte-level BPE tokenizer on the questions and answers;
  (c) build a tiny Qwen2-VL with mlx-vlm's own classes, in the layout of
      ``nbllm.fixtures_vision`` ("qwen2_vl": same special tokens, chat
      template and Qwen2-VL image processor, with min/max pixels set so a
      112x112 picture becomes 16 image tokens);
  (d) train it on multi-turn conversations about each picture (loss on the
      assistant replies only);
  (e) write the folder and evaluate it through nbllm's real vision path
      (``nbllm.load`` -> ``VisionLM``, ``vlm.generate(q, images=...)``,
      ``nbllm.Chat``) on held-out pictures, and write MODEL_CARD.md.

Usage (from the repository root, with the project's venv):

    nice -n 5 .venv/bin/python scripts/train_vision_model.py               # 32 minute budget
    nice -n 5 .venv/bin/python scripts/train_vision_model.py --steps 3000  # fixed step count
    .venv/bin/python scripts/train_vision_model.py --eval-only             # re-evaluate the folder

The picture generator is importable without mlx, for notebooks:

    from train_vision_model import draw_scene, random_scene, answer
    scene = [("circle", "red", 30, 40, 12), ("square", "blue", 80, 70, 11)]
    image = draw_scene(scene)                  # a 112x112 PIL image
    answer(scene, "What colour is the circle?")  # 'The circle is red.'
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Configuration: every knob of the run. The model card quotes these values.
# ---------------------------------------------------------------------------
CONFIG = {
    "seed": 4321,
    "image_size": 112,  # pixels; 8x8 patches of 14, merged 2x2 -> 16 image tokens
    "vocab_size": 512,
    "tokenizer_conversations": 20_000,
    # language model (mlx_vlm.models.qwen2_vl TextConfig)
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "mrope_section": [4, 6, 6],  # sums to head_dim / 2 = 16
    # vision tower (mlx_vlm.models.qwen2_vl VisionConfig)
    "vision_depth": 3,
    "vision_embed_dim": 96,
    "vision_num_heads": 4,
    "vision_mlp_ratio": 2,
    # optimisation
    "batch_size": 32,
    "peak_lr": 2e-3,
    "min_lr_ratio": 0.05,
    "warmup_steps": 150,
    "weight_decay": 0.05,
    "adam_betas": (0.9, 0.98),
    "grad_clip": 1.0,
    "default_minutes": 32.0,
    # evaluation
    "eval_images": 150,
    "eval_seed": 987654,
    "save_dtype": "float16",
}

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20),
}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "nbllm" / "assets" / "default-vision"


def log(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------------------
# (a) Pictures and their questions. A scene is a list of objects
# (shape, colour, centre x, centre y, radius) in pixels of a square canvas.
# ---------------------------------------------------------------------------
def random_scene(rng, size=112, max_objects=3):
    """1 to ``max_objects`` non-overlapping shapes; shapes and colours may repeat."""
    n = rng.randint(1, max_objects)
    # a third of the pictures repeat one or two shapes, so counts above one are common
    shapes = rng.sample(SHAPES, rng.randint(1, 2)) if rng.random() < 0.35 else SHAPES
    objs = []
    tries = 0
    while len(objs) < n and tries < 200:
        tries += 1
        r = rng.randint(11, 16)
        x, y = rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)
        if all((x - o[2]) ** 2 + (y - o[3]) ** 2 > (r + o[4] + 4) ** 2 for o in objs):
            objs.append((rng.choice(shapes), rng.choice(sorted(COLOURS)), x, y, r))
    return objs


def draw_scene(scene, size=112):
    """Draw a scene as an RGB ``PIL.Image`` (white background)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for shape, colour, x, y, r in scene:
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            s = r * 0.85
            d.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        elif shape == "triangle":
            d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:  # a five-pointed star
            pts = []
            for k in range(10):
                ang = -math.pi / 2 + k * math.pi / 5
                rad = r if k % 2 == 0 else r * 0.42
                pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
            d.polygon(pts, fill=fill)
    return img


def _count_phrase(n, shape):
    if n == 1:
        return f"There is one {shape}."
    return f"There are {NUMBER_WORDS[n]} {PLURAL[shape]}."


def questions_for(scene, rng=None):
    """Every question this scene answers unambiguously, as (kind, question, answer)."""
    by_shape = {s: [o for o in scene if o[0] == s] for s in SHAPES}
    by_colour = {c: [o for o in scene if o[1] == c] for c in COLOURS}
    qs = []
    for s in SHAPES:
        if len(by_shape[s]) == 1:
            c = by_shape[s][0][1]
            qs.append(("colour", f"What colour is the {s}?", f"The {s} is {c}."))
            qs.append(("colour", f"What color is the {s}?", f"The {s} is {c}."))
        qs.append(("count", f"How many {PLURAL[s]} are there?", _count_phrase(len(by_shape[s]), s)))
    n = len(scene)
    qs.append(("count", "How many shapes are there?",
               "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."))
    for c in COLOURS:
        if len(by_colour[c]) == 1:
            qs.append(("shape", f"What shape is {c}?", f"The {c} shape is a {by_colour[c][0][0]}."))
    for a in SHAPES:
        for b in SHAPES:
            if a != b and len(by_shape[a]) == 1 and len(by_shape[b]) == 1:
                ax, ay, bx, by = by_shape[a][0][2], by_shape[a][0][3], by_shape[b][0][2], by_shape[b][0][3]
                if abs(ax - bx) >= 10:
                    yes = "Yes." if ax < bx else "No."
                    qs.append(("position", f"Is the {a} left of the {b}?", yes))
                    qs.append(("position", f"Is the {a} right of the {b}?", "Yes." if ax > bx else "No."))
                if abs(ay - by) >= 10:
                    qs.append(("position", f"Is the {a} above the {b}?", "Yes." if ay < by else "No."))
    return qs


def answer(scene, question):
    """The expected answer to ``question`` about ``scene`` (``None`` if it has none)."""
    for _, q, a in questions_for(scene):
        if q == question:
            return a
    return None


KIND_WEIGHTS = {"colour": 3, "count": 3, "shape": 2, "position": 3}


def pick_question(qs, kind, rng, exclude=()):
    """A question of ``kind``; counts of shapes that are there are preferred
    (most shapes are absent from a picture, and "no" would dominate)."""
    pool = [q for q in qs if q[0] == kind and q not in exclude]
    if kind == "count" and rng.random() < 0.7:
        pool = [q for q in pool if " no " not in q[2]] or pool
    return rng.choice(pool) if pool else None


def conversation(scene, rng, turns=None):
    """1-3 questions about one picture, question kinds balanced."""
    qs = questions_for(scene)
    kinds = sorted({k for k, _, _ in qs})
    n = turns or rng.choice([1, 2, 3, 4])
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
        q = pick_question(qs, kind, rng, out)
        if q is not None:
            out.append(q)
    return out


# ---------------------------------------------------------------------------
# (b) + (c) Tokenizer and model folder (the layout of nbllm.fixtures_vision's qwen2_vl)
# ---------------------------------------------------------------------------
def model_config(cfg, tokenizer):
    from nbllm.fixtures_vision import VISION_ARCHITECTURES

    spec = VISION_ARCHITECTURES["qwen2_vl"]
    config = json.loads(json.dumps(spec["config"]))
    config.update({
        "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
        "intermediate_size": cfg["intermediate_size"], "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"], "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg["mrope_section"])},
    })
    config["vision_config"].update({
        "depth": cfg["vision_depth"], "embed_dim": cfg["vision_embed_dim"], "hidden_size": cfg["hidden_size"],
        "num_heads": cfg["vision_num_heads"], "mlp_ratio": cfg["vision_mlp_ratio"],
    })
    config["vocab_size"] = len(tokenizer)
    for key, token in spec["token_ids"].items():
        config[key] = tokenizer.convert_tokens_to_ids(token)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids(spec["eos"])
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    config["torch_dtype"] = cfg["save_dtype"]
    return config


def write_folder_files(out, cfg, corpus):
    """Tokenizer, config and image-processor files (no weights yet)."""
    from nbllm.fixtures import build_tokenizer
    from nbllm.fixtures_vision import VISION_ARCHITECTURES

    spec = VISION_ARCHITECTURES["qwen2_vl"]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, cfg["vocab_size"], corpus, specials=spec["specials"], bos=spec["bos"],
                          eos=spec["eos"], pad=spec["pad"], template=spec["template"])
    config = model_config(cfg, tok)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    pre = dict(spec["files"]["preprocessor_config.json"])
    # every picture of about image_size^2 pixels becomes one 8x8 patch grid
    side = cfg["image_size"]
    pre.update({"min_pixels": side * side, "max_pixels": side * side})
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": config["eos_token_id"], "pad_token_id": tok.convert_tokens_to_ids(spec["pad"]),
         "do_sample": False}, indent=2) + "\n")
    return tok, config


def build_model(config, seed):
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    module, _ = get_model_and_args(dict(config))
    cfg = json.loads(json.dumps(config))
    for part in ("text_config", "vision_config", "audio_config"):
        cfg.setdefault(part, {})
    mc = module.ModelConfig.from_dict(cfg)
    mc = update_module_configs(mc, module, cfg, ["text", "vision", "perceiver", "projector", "audio"])
    mx.random.seed(seed)
    model = module.Model(mc)
    model.set_dtype(mx.float32)
    return model


def save_weights(out, model, dtype):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    target = getattr(mx, dtype)
    weights = {k: v.astype(target) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


# ---------------------------------------------------------------------------
# (d) Training. Inputs are built exactly as nbllm's vision path builds them
# (checked on samples): the processor's pixel layout and the chat template's
# token ids; the forward pass is a batched twin of mlx-vlm's Qwen2-VL forward
# on the same modules (checked against mlx-vlm's own call before training).
# ---------------------------------------------------------------------------
class Batcher:
    """Turns scenes and conversations into padded training arrays."""

    def __init__(self, vlm, cfg):
        import numpy as np

        self.np = np
        self.vlm = vlm
        self.tok = vlm.tokenizer
        proc = vlm.processor.image_processor
        self.mean = np.array(proc.image_mean, dtype=np.float32)
        self.std = np.array(proc.image_std, dtype=np.float32)
        self.size = cfg["image_size"]
        self.patch, self.merge, self.tpatch = 14, 2, 2
        # the chat template puts the picture after the first question:
        # system turn, "<|im_start|>user\n" question <|vision_start|> pads <|vision_end|> <|im_end|> ...
        self.image_id = vlm.vlm.config.image_token_id
        probe = vlm.encode("Q", images=draw_scene([], self.size))
        self.n_image = sum(t == self.image_id for t in probe)
        conv = lambda n: self.tok.convert_tokens_to_ids(n)  # noqa: E731
        self.image_block = [conv("<|vision_start|>")] + [self.image_id] * self.n_image + [conv("<|vision_end|>")]
        self.head = self.tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                                    add_special_tokens=False)
        self.im_end = conv("<|im_end|>")
        self.pad = conv("<|endoftext|>")

    def pixels(self, images):
        """The Qwen2-VL processor's patches for pictures already of the target size:
        (n_images * grid_h * grid_w, C * T * P * P), patches grouped 2x2 for the merger."""
        np = self.np
        P, M, T = self.patch, self.merge, self.tpatch
        x = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0  # (B, H, W, C)
        x = (x - self.mean) / self.std
        B, H, W, C = x.shape
        gh, gw = H // P, W // P
        x = x.transpose(0, 3, 1, 2)[:, None].repeat(T, axis=1)  # (B, T, C, H, W): one frame twice
        x = x.reshape(B, T, C, gh // M, M, P, gw // M, M, P)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, gh/M, gw/M, M, M, C, T, P, P)
        return x.reshape(B * gh * gw, C * T * P * P)

    def conversation_ids(self, turns):
        """Token ids and loss mask of one conversation (picture after the first question)."""
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        ids, mask = list(self.head), [0] * len(self.head)
        for i, (_, q, a) in enumerate(turns):
            user = enc(q) + self.image_block if i == 0 else enc(f"<|im_start|>user\n{q}")
            user += [self.im_end] + enc("\n<|im_start|>assistant\n")
            reply = enc(a) + [self.im_end]
            ids += user + reply
            mask += [0] * len(user) + [1] * len(reply)
            ids += enc("\n")
            mask += [0]
        return ids, mask

    def positions(self, ids):
        """mRoPE positions (3, B, L) as mlx-vlm's get_rope_index gives them for one
        picture per row: text counts up; the 4x4 image tokens share the temporal
        position and take row / column offsets; text after the image resumes after
        the largest image position. (Checked against get_rope_index.)"""
        np = self.np
        B, L = ids.shape
        side = int(round(self.n_image ** 0.5))
        pos = np.broadcast_to(np.arange(L), (3, B, L)).copy()
        for b in range(B):
            s = int(np.argmax(ids[b] == self.image_id))
            k = np.arange(self.n_image)
            pos[0, b, s : s + self.n_image] = s
            pos[1, b, s : s + self.n_image] = s + k // side
            pos[2, b, s : s + self.n_image] = s + k % side
            pos[:, b, s + self.n_image :] = s + side + np.arange(L - s - self.n_image)
        return pos.astype(np.int32)

    def batch(self, rng, n):
        np = self.np
        scenes = [random_scene(rng, self.size) for _ in range(n)]
        convs = [conversation(s, rng) for s in scenes]
        rows = [self.conversation_ids(c) for c in convs]
        L = -(-max(len(r[0]) for r in rows) // 16) * 16  # a multiple of 16: few shapes to compile
        ids = np.full((n, L), self.pad, dtype=np.int32)
        mask = np.zeros((n, L), dtype=np.float32)
        for i, (r, m) in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(m)] = m
        pix = self.pixels([draw_scene(s, self.size) for s in scenes])
        return ids, mask, pix


# The vision blocks' attention in batched_forward; training swaps in the fast
# version (scripts/fast_training_math.py), the twin check runs the stock one.
_VISION_SDPA = [None]


def _stock_sdpa(q, k, v, scale):
    import mlx.core as mx

    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


_VISION_SDPA[0] = _stock_sdpa


def batched_forward(vlm_model, ids, pixels, positions, rot, n_image):
    """Logits for a batch: mlx-vlm's Qwen2-VL forward with batched vision attention.

    ids (B, L); pixels (B * 64, 1176); positions (3, B, L); rot: the vision
    rotary frequencies of one 8x8 grid (64, head_dim / 2).
    """
    import mlx.core as mx
    from mlx_vlm.models.qwen2_vl.vision import apply_rotary_pos_emb_vision

    vt = vlm_model.vision_tower
    B = ids.shape[0]
    h = vt.patch_embed(pixels)  # (B * 64, D)
    n = h.shape[0] // B
    D = h.shape[-1]
    for blk in vt.blocks:
        att = blk.attn
        x = blk.norm1(h)
        qkv = att.qkv(x).reshape(B, n, 3, att.num_heads, -1)  # (B, n, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, n, heads, hd)
        q = apply_rotary_pos_emb_vision(q, rot)
        k = apply_rotary_pos_emb_vision(k, rot)
        o = _VISION_SDPA[0](q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                            v.transpose(0, 2, 1, 3), scale=att.scale)
        h = h + att.proj(o.transpose(0, 2, 1, 3).reshape(B * n, D))
        h = h + blk.mlp(blk.norm2(h))
    feats = vt.merger(h)  # (B * n_image, hidden)
    lm = vlm_model.language_model
    emb = lm.model.embed_tokens(ids)
    is_img = ids == vlm_model.config.image_token_id
    index = mx.maximum(mx.cumsum(is_img.astype(mx.int32), axis=1) - 1, 0) + mx.arange(B)[:, None] * n_image
    emb = mx.where(is_img[..., None], feats[index], emb)
    out = lm.model(ids, inputs_embeds=emb, position_ids=positions)
    return lm.model.embed_tokens.as_linear(out)


def check_twin(vlm, batcher, rng):
    """The batched training forward must give mlx-vlm's own logits."""
    import mlx.core as mx
    import numpy as np

    ids, mask, pix = batcher.batch(rng, 2)
    grid = mx.array([[1, 8, 8]] * 2)
    rot = vlm.vlm.vision_tower.rot_pos_emb(grid[:1])
    pos, _ = vlm.vlm.language_model.get_rope_index(mx.array(ids), grid, None, None)
    assert np.array_equal(np.array(pos), batcher.positions(ids)), "batcher positions differ from get_rope_index"
    mine = batched_forward(vlm.vlm, mx.array(ids), mx.array(pix), pos, rot, batcher.n_image)
    for i in range(2):
        ref = vlm.vlm(mx.array(ids[i : i + 1]), mx.array(pix[i * 64 : (i + 1) * 64]), image_grid_thw=grid[:1]).logits
        err = float(mx.abs(ref[0] - mine[i]).max())
        assert err < 1e-3, f"training forward differs from mlx-vlm's by {err}"
    # and the processor's own pixels and ids match the batcher's
    scene = random_scene(rng)
    img = draw_scene(scene)
    turns = conversation(scene, rng, turns=2)
    msgs = [{"role": "user", "content": turns[0][1]}, {"role": "assistant", "content": turns[0][2]},
            {"role": "user", "content": turns[1][1]}]
    real = vlm.encode(msgs, images=img)
    mine_ids, _ = batcher.conversation_ids(turns)
    want = list(real)
    assert mine_ids[: len(want)] == want, "batcher token ids differ from nbllm's encode"
    proc_pix = np.array(real.vision.inputs["pixel_values"])
    assert np.abs(proc_pix - batcher.pixels([img])).max() < 1e-4, "batcher pixels differ from the processor's"
    log("checked: batched forward == mlx-vlm forward; ids and pixels == nbllm/processor")


def lr_at(step, total, cfg):
    peak, warm = cfg["peak_lr"], cfg["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    prog = min(1.0, (step - warm) / max(1, total - warm))
    lo = peak * cfg["min_lr_ratio"]
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * prog))


def train(vlm, batcher, cfg, steps, minutes, seed):
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    model = vlm.vlm
    rng = random.Random(seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M)")
    B = cfg["batch_size"]
    grid = mx.array([[1, 8, 8]])
    rot = model.vision_tower.rot_pos_emb(grid)
    opt = optim.AdamW(learning_rate=cfg["peak_lr"], betas=list(cfg["adam_betas"]), weight_decay=cfg["weight_decay"])

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_training_math import fast_attention, fast_cross_entropy, fast_swiglu, patched

    def loss_fn(m, ids, mask, pix, pos):
        logits = batched_forward(m, ids[:, :-1], pix, pos[:, :, :-1], rot, batcher.n_image)
        ce = fast_cross_entropy(logits, ids[:, 1:], reduction="none")
        w = mask[:, 1:]
        return (ce * w).sum() / w.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(ids, mask, pix, pos):
        loss, grads = loss_and_grad(model, ids, mask, pix, pos)
        grads, gnorm = optim.clip_grad_norm(grads, cfg["grad_clip"])
        opt.update(model, grads)
        return loss, gnorm

    def positions(ids):
        return mx.array(batcher.positions(ids))

    # training-only fast math (see scripts/fast_training_math.py): the same formulas with a
    # polynomial exp, for the language model's attention and SwiGLU and the vision attention
    fast = patched({"mlx_vlm.models.qwen2_vl.language": {"scaled_dot_product_attention": fast_attention},
                    "mlx_vlm.models.mlp": {"swiglu": fast_swiglu}})
    fast.__enter__()
    _VISION_SDPA[0] = lambda q, k, v, scale: fast_attention(q, k, v, scale=scale)
    total = steps
    budget_s = None if steps else minutes * 60.0
    t0 = t_calib = time.time()
    step, ema, history, loads = 0, None, [], []
    while total is None or step < total:
        lr = lr_at(step, total if total else 10**9, cfg)
        opt.learning_rate = mx.array(lr, dtype=mx.float32)
        ids, mask, pix = batcher.batch(rng, B)
        loss, gnorm = step_fn(mx.array(ids), mx.array(mask), mx.array(pix), positions(ids))
        mx.eval(loss, gnorm, state)
        step += 1
        lv = loss.item()
        ema = lv if ema is None else 0.97 * ema + 0.03 * lv
        if total is None and step == 5:
            t_calib = time.time()
        if total is None and step == 60:
            per = (time.time() - t_calib) / 55
            total = 60 + int((budget_s - (time.time() - t0)) / per)
            log(f"budget {minutes:.1f} min at {per:.3f} s/step -> --steps {total}")
        if step % 50 == 0 or step == 1 or step == total:
            log(f"step {step:5d}/{total or '?'}  loss {lv:.4f}  ema {ema:.4f}  lr {lr:.2e}  "
                f"gnorm {gnorm.item():.2f}  elapsed {(time.time() - t0) / 60:.1f} min")
            history.append({"step": step, "loss": round(ema, 4)})
            loads.append(float(loadavg().split()[0]))
    fast.__exit__(None, None, None)
    _VISION_SDPA[0] = _stock_sdpa
    train_s = time.time() - t0
    log(f"trained {step} steps ({step * B:,} conversations) in {train_s / 60:.1f} min")
    return {"steps": step, "conversations": step * B, "train_seconds": round(train_s, 1), "params": n_params,
            "final_loss_ema": round(ema, 4), "loss_history": history,
            "load_1min_during": {"min": min(loads), "median": sorted(loads)[len(loads) // 2], "max": max(loads)}}


# ---------------------------------------------------------------------------
# (e) Evaluation through nbllm's public vision path
# ---------------------------------------------------------------------------
def evaluate(folder, cfg):
    import nbllm

    t = time.time()
    vlm = nbllm.load(str(folder))
    res = {"load_seconds": round(time.time() - t, 3), "class": type(vlm).__name__}
    rng = random.Random(cfg["eval_seed"])
    by_kind, wrong = {}, []
    n_q = 0
    t = time.time()
    for _ in range(cfg["eval_images"]):
        scene = random_scene(rng, cfg["image_size"])
        img = draw_scene(scene, cfg["image_size"])
        qs = questions_for(scene)
        kinds = sorted({k for k, _, _ in qs})
        for kind in kinds:  # one question of every kind this picture answers
            _, q, want = pick_question(qs, kind, rng)
            got = vlm.generate(q, images=img, max_tokens=16).text
            ok = got == want
            k = by_kind.setdefault(kind, [0, 0])
            k[0] += ok
            k[1] += 1
            n_q += 1
            if not ok:
                wrong.append((scene, q, want, got))
    single_s = time.time() - t
    correct = sum(v[0] for v in by_kind.values())
    res["single"] = {"accuracy": round(correct / n_q, 4), "correct": correct, "total": n_q,
                     "by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_kind.items())},
                     "examples_wrong": [(str(s), q, w, g) for s, q, w, g in wrong[:10]],
                     "seconds_per_question": round(single_s / n_q, 3)}
    log(f"held-out single questions {correct}/{n_q} {res['single']['by_kind']} ({single_s:.0f}s)")

    # chat: the picture goes in with the first question; follow-ups reuse it
    fu = {}
    transcripts = []
    for i in range(max(4, cfg["eval_images"] * 2 // 5)):
        scene = random_scene(rng, cfg["image_size"])
        img = draw_scene(scene, cfg["image_size"])
        turns = conversation(scene, rng, turns=3)
        chat = nbllm.Chat(vlm)
        lines = []
        for j, (kind, q, want) in enumerate(turns):
            reply = chat.send(q, images=img) if j == 0 else chat.send(q)
            for _ in reply:
                pass
            got = reply.text
            key = "first turn" if j == 0 else "follow-up turns"
            k = fu.setdefault(key, [0, 0])
            k[0] += got == want
            k[1] += 1
            lines.append((q, got, want))
        if len(transcripts) < 3:
            transcripts.append({"scene": str(scene), "turns": lines})
    res["chat"] = {k: f"{v[0]}/{v[1]}" for k, v in fu.items()}
    res["chat_pictures"] = max(4, cfg["eval_images"] * 2 // 5)
    res["chat_followup_accuracy"] = round(fu["follow-up turns"][0] / fu["follow-up turns"][1], 4)
    res["chat_transcripts"] = transcripts
    log(f"chat {res['chat']}")
    res["image_tokens"] = sum(t == vlm.vlm.config.image_token_id for t in vlm.encode("Q", images=draw_scene([])))
    return res


def folder_size_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def write_card(out, report):
    cfg, tr, ev = report["config"], report["training"], report["eval"]
    s = ev["single"]
    kinds = "\n".join(f"| {k} | {v} | {int(v.split('/')[0]) / int(v.split('/')[1]) * 100:.1f}% |"
                      for k, v in s["by_kind"].items())
    trans = []
    for tr_ in ev["chat_transcripts"]:
        trans.append(f"- scene `{tr_['scene']}`")
        for q, got, want in tr_["turns"]:
            mark = "" if got == want else f" (expected {want!r})"
            trans.append(f"  - {q!r} → {got!r}{mark}")
    trans = "\n".join(trans)
    card = f"""# nbllm default vision model ("nbllm-tiny-shapes")

A tiny vision-language model trained from scratch, in {tr['train_seconds'] / 60:.0f} minutes on a
2-core CPU, by `scripts/train_vision_model.py`. It looks at small generated pictures of
coloured shapes and answers questions about colour, shape, count and position. **It is
for teaching only**: it has never seen a photograph, and outside its world of
{len(SHAPES)} shapes in {len(COLOURS)} colours on a white canvas its answers mean nothing.

## Architecture

- mlx-vlm's own Qwen2-VL classes (`model_type: "qwen2_vl"`), in the folder layout of
  `nbllm.fixtures_vision` ("qwen2_vl"): the same special tokens and chat template, and the
  Qwen2-VL-2B-Instruct image-processor configuration with `min_pixels = max_pixels =
  {cfg['image_size']}*{cfg['image_size']}`, so every picture is resized to about
  {cfg['image_size']}x{cfg['image_size']} pixels = 8x8 patches of 14 px, merged 2x2 into
  **{ev['image_tokens']} image tokens**. Loads with `mlx_vlm.load` and `nbllm.load` (a `VisionLM`).
- {tr['params']:,} parameters ({tr['params'] / 1e6:.2f}M). Vision tower: {cfg['vision_depth']} blocks,
  width {cfg['vision_embed_dim']}, {cfg['vision_num_heads']} heads, MLP ratio {cfg['vision_mlp_ratio']}, patch merger
  to {cfg['hidden_size']}. Language model: hidden size {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers,
  {cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV heads), MLP {cfg['intermediate_size']},
  mRoPE sections {cfg['mrope_section']}, tied embeddings.
- Tokenizer: byte-level BPE (vocabulary {report['vocab_size']}) trained on the questions and answers, with
  the Qwen2-VL special tokens; ChatML template with a default system message.
- Weights stored as {cfg['save_dtype']}; folder size {report['folder_bytes'] / 1e6:.1f} MB.

## Training

- Command (measured run): `{report['command']}`
- Seed {cfg['seed']}; {tr['steps']:,} steps of {cfg['batch_size']} conversations
  ({tr['conversations']:,} conversations, each about a freshly drawn picture; no picture is reused).
- Each conversation has 1-3 questions about its picture (the picture in the first user turn, as
  `nbllm.Chat(vlm).send(q, images=img)` renders it); the loss is on the assistant replies only.
- AdamW (betas {tuple(cfg['adam_betas'])}, weight decay {cfg['weight_decay']}), peak learning rate
  {cfg['peak_lr']:g}, {cfg['warmup_steps']} warm-up steps, cosine decay to {cfg['min_lr_ratio']:g}x; clipping at {cfg['grad_clip']}.
- Training inputs are built as nbllm builds them at inference (checked before training: token ids
  equal `VisionLM.encode`, pixels equal the Qwen2-VL processor's, and the batched training forward
  equals mlx-vlm's `Model.__call__` logits).
- Training time: {tr['train_seconds'] / 60:.1f} minutes ({tr['train_seconds']:.0f} s) of wall time on
  {report['machine']}, under `nice -n 5` while other work shared the CPU (load average
  {report['load_before']} before, {report['load_after']} after). Final loss (EMA): {tr['final_loss_ema']}.
- Library versions: {report['versions']}.

## Data

Pictures are drawn by the script (`random_scene`, `draw_scene`): 1-3 non-overlapping shapes
({', '.join(SHAPES)}) of radius 11-16 px in {', '.join(COLOURS)}, on a white
{cfg['image_size']}x{cfg['image_size']} canvas. Shapes and colours may repeat. Questions are asked only
when the picture answers them unambiguously (`questions_for`):

- colour: "What colour is the circle?" (one circle in the picture) → "The circle is red."
- count: "How many squares are there?" → "There are two squares." / "There is one square." / "There are no squares."; "How many shapes are there?"
- shape: "What shape is blue?" (one blue shape) → "The blue shape is a star."
- position: "Is the triangle left of the star?" / "right of" / "above" (one of each, at least 10 px apart) → "Yes." / "No."

## Evaluation (held-out pictures, through nbllm's public API)

Reproduce: `{report['eval_command']}`

{cfg['eval_images']} pictures drawn from a seed never used in training (seed {cfg['eval_seed']}); for each
picture one question of every kind it answers; the reply of
`nbllm.load(folder).generate(question, images=picture)` (greedy) must equal the expected answer exactly.

| question kind | correct | accuracy |
| --- | --- | --- |
{kinds}
| **all** | {s['correct']}/{s['total']} | **{s['accuracy'] * 100:.1f}%** |

Chat ({ev['chat_pictures']} pictures, 3 questions each, `nbllm.Chat(vlm)`: the picture is sent with the first
question only; the follow-ups reuse it from the conversation): first turn {ev['chat']['first turn']},
follow-up turns {ev['chat']['follow-up turns']} exactly right.

Example chats (held-out pictures):

{trans}

## Using it

```python
import nbllm
from train_vision_model import draw_scene   # scripts/ on sys.path
vlm = nbllm.load("nbllm/assets/default-vision")
img = draw_scene([("circle", "red", 30, 40, 12), ("square", "blue", 80, 70, 11)])
vlm.generate("What colour is the circle?", images=img).text   # 'The circle is red.'
chat = nbllm.Chat(vlm)
chat.send("What colour is the circle?", images=img)
chat.send("How many squares are there?")
```
"""
    (out / "MODEL_CARD.md").write_text(card)


def versions():
    import importlib.metadata as md
    return ", ".join(f"{p} {md.version(p)}" for p in ["mlx", "mlx-lm", "mlx-vlm", "tokenizers", "transformers"])


def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"training budget (default {CONFIG['default_minutes']}); sets --steps from measured speed")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of optimizer steps")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate an existing folder")
    ap.add_argument("--seed", type=int, default=CONFIG["seed"])
    ap.add_argument("--eval-images", type=int, default=CONFIG["eval_images"])
    a = ap.parse_args()
    cfg = dict(CONFIG, seed=a.seed, eval_images=a.eval_images)
    out = Path(a.out)
    import nbllm  # noqa: F401  (fast BLAS: must come before mlx.core)
    import mlx.core as mx

    report_path = out / "training_report.json"
    if a.eval_only:
        report = json.loads(report_path.read_text())
        report["eval"] = evaluate(out, cfg)
        report["folder_bytes"] = folder_size_bytes(out)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
        write_card(out, report)
        return

    load_before = loadavg()
    rng = random.Random(cfg["seed"])
    corpus = []
    for _ in range(cfg["tokenizer_conversations"]):
        for _, q, ans in conversation(random_scene(rng, cfg["image_size"]), rng):
            corpus.append(q + "\n" + ans)
    _, config = write_folder_files(out, cfg, corpus)
    model = build_model(config, cfg["seed"])
    save_weights(out, model, "float32")
    vlm = nbllm.load(str(out))  # the real loading path, random weights for now
    vlm.vlm.update(model.parameters())
    batcher = Batcher(vlm, cfg)
    check_twin(vlm, batcher, random.Random(1))
    minutes = a.minutes if a.minutes is not None else cfg["default_minutes"]
    tr = train(vlm, batcher, cfg, a.steps, minutes, cfg["seed"])
    save_weights(out, vlm.vlm, cfg["save_dtype"])
    load_after = loadavg()
    cmd = "nice -n 5 .venv/bin/python scripts/train_vision_model.py --steps " + str(tr["steps"])
    if a.seed != CONFIG["seed"]:
        cmd += f" --seed {a.seed}"
    if a.out != str(DEFAULT_OUT):
        cmd += f" --out {a.out}"
    report = {
        "command": cmd,
        "eval_command": ".venv/bin/python scripts/train_vision_model.py --eval-only"
                        + (f" --out {a.out}" if a.out != str(DEFAULT_OUT) else ""),
        "config": cfg, "vocab_size": len(vlm.tokenizer._tokenizer), "training": tr,
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} cores" if platform.system() == "Linux"
                   else platform.platform(),
        "versions": versions(), "load_before": load_before, "load_after": load_after,
    }
    del vlm
    mx.clear_cache()
    report["eval"] = evaluate(out, cfg)
    report["folder_bytes"] = folder_size_bytes(out)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    write_card(out, report)
    report["folder_bytes"] = folder_size_bytes(out)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    write_card(out, report)
    log(json.dumps({k: v for k, v in report["eval"].items() if k != "chat_transcripts"}, indent=1))
    log(f"folder size {report['folder_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
