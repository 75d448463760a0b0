"""Tiny word-level text encoder: the stand-in for CLIP-ViT-L.

Paper: Sec. D.2 runs a CLIP-ViT-L text encoder on the device to turn the prompt into the
embeddings the DiT cross-attends to; the teacher side (Wan) uses umT5. Neither can be downloaded
here, so this file holds a tiny replacement with the same role and the same interface:

    prompt --Tokenizer--> ids (B, L), mask (B, L) --TextEncoder--> tokens (B, L, D), pooled (B, D)

ASSUMPTION (how it is trained): like CLIP, it is pretrained contrastively against a vision tower,
here a tiny 3D-conv `VideoTower` on the toy world's clips, with the symmetric InfoNCE loss and a
learnable temperature (CLIP, Radford et al. 2021). Contrastive pretraining is what makes two
paraphrases of the same scene ("a red circle moves left", "a crimson ball slides to the left")
land close together, which is what CLIP gives the DiT. After pretraining the encoder is frozen
for every diffusion stage, as CLIP is in the paper.

ASSUMPTION (keeping every word): video-text contrast alone lets the encoder drop any word the
vision tower cannot yet see: measured on the toy world, "moves left" and "moves right" ended at
pooled cosine 0.999, so no DiT could learn direction from them. CLIP keeps such words because its
400M pairs contain captions that differ in them. We give it the same pressure directly, with two
more terms (both standard for sentence encoders):
  - caption-caption contrast: two captions of the same clip are a positive pair, every other
    caption in the batch a negative (supervised SimCSE; COCO's several captions per image);
  - one-word hard negatives: each clip also gets a caption with one attribute word swapped
    ("... moves right" for "... moves left"), a negative for both its video and its captions.
`probe` measures the result: a linear classifier on frozen features must recover colour, shape
and motion from captions of combinations the encoder never saw.

Classifier-free guidance needs an "empty prompt". Users may not pass "" (a clear ValueError);
internally `TextEncoder.null_embedding` encodes an all-<pad> sequence instead.

Legend: B batch, L tokens per prompt (max_len), D width, H heads, F pixel frames.

Demo: `python text.py` tokenizes a few prompts, pretrains for a few steps, prints shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import dist
import safeio

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1 in every vocabulary


# ----------------------------------------------------------------------------- config
@dataclass
class TextConfig:
    vocab_size: int = 0        # rows of the embedding table; set from the tokenizer by build_text (CLIP BPE: 49408)
    max_len: int = 16          # tokens per prompt, longer prompts are truncated (CLIP: 77)
    dim: int = 32              # width D (CLIP-ViT-L text tower: 768)
    layers: int = 2            # transformer blocks (CLIP-ViT-L text tower: 12)
    heads: int = 2             # attention heads (CLIP-ViT-L text tower: 12)
    mlp_ratio: int = 4         # MLP hidden width = mlp_ratio * dim (CLIP: 4)
    video_width: int = 16      # channels of the VideoTower's first conv (ASSUMPTION: tiny 3D-conv tower)
    fit_lr: float = 1e-3       # AdamW learning rate for pretraining (ASSUMPTION); the pipeline's
                               # text_steps / text_batch set how long and how wide (CLIP's batch: 32768)


PRESETS = {
    "tiny": TextConfig(),
    "small": TextConfig(dim=64, heads=4, video_width=24),
}


def get_config(name: str, **overrides) -> TextConfig:
    """A fresh copy of the named preset with `overrides`; an unknown name or field is a ValueError."""
    return safeio.preset(PRESETS, name, "text", **overrides)


# ----------------------------------------------------------------------------- tokenizer
def normalize(text: str) -> list[str]:
    """Lower case, punctuation replaced by spaces, split on whitespace: "Red, circle!" -> [red, circle]."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


class Tokenizer:
    """Word-level tokenizer. DEVIATION: CLIP uses byte-pair encoding with 49408 tokens; the toy
    world's captions use a few dozen words, so one id per word is enough and easy to read."""

    def __init__(self, words: list[str], max_len: int = 16):
        if max_len < 1:
            raise ValueError(f"expected max_len >= 1, got {max_len}")
        self.itos = [PAD, UNK]                                 # id -> word; <pad> = 0, <unk> = 1
        for w in words:
            for piece in ([w] if w in (PAD, UNK) else normalize(w)):
                if piece not in self.itos:
                    self.itos.append(piece)
        self.stoi = {w: i for i, w in enumerate(self.itos)}    # word -> id
        self.max_len = max_len
        self.pad_id, self.unk_id = 0, 1

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, L) long and mask (B, L) bool (True = real token), L = max_len.

        Fixed length L (static shapes for Core ML). ASSUMPTION: words past max_len are dropped,
        as CLIP truncates at 77 tokens.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"expected a list of prompts, got {type(prompts).__name__}")
        ids = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(prompts), self.max_len, dtype=torch.bool)                # (B, L)
        for b, prompt in enumerate(prompts):
            words = normalize(prompt)[: self.max_len]
            if not words:
                raise ValueError(f"empty prompt at position {b} ({prompt!r}): describe the video "
                                 f"in words, e.g. 'a red circle moves left'")
            ids[b, : len(words)] = torch.tensor([self.stoi.get(w, self.unk_id) for w in words])
            mask[b, : len(words)] = True
        return ids, mask

    def save_vocab(self, path: str) -> None:
        """Write the vocabulary as JSON (atomic), the file the Core ML app reads as vocab.json."""
        blob = {"tokens": self.itos, "max_len": self.max_len, "pad_id": self.pad_id,
                "unk_id": self.unk_id, "lowercase": True, "punctuation": "replaced by spaces"}
        _atomic_write_text(path, json.dumps(blob, indent=1))

    @classmethod
    def from_json(cls, path: str) -> "Tokenizer":
        if not os.path.exists(path):
            raise FileNotFoundError(f"vocabulary file {path} not found")
        try:
            with open(path) as f:
                blob = json.load(f)
            tokens, max_len = blob["tokens"], int(blob["max_len"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"vocabulary file {path} is not a valid vocab JSON: {e}") from e
        if tokens[:2] != [PAD, UNK]:
            raise ValueError(f"vocabulary file {path} must start with {PAD}, {UNK}; got {tokens[:2]}")
        return cls(tokens, max_len)


# ----------------------------------------------------------------------------- text encoder
class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (as CLIP's text tower)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"expected dim divisible by heads, got dim {dim}, heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.heads
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)                     # 3 x (B, L, D)
        q, k, v = (z.view(B, L, H, D // H).transpose(1, 2) for z in (q, k, v))  # 3 x (B, H, L, D/H)
        # softmax(q k^T / sqrt(d)) over the real tokens only: <pad> keys get -inf
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)                 # (B, H, L, L)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, H, L, L)
        a = scores.softmax(dim=-1) @ v                                       # (B, H, L, D/H)
        x = x + self.out(a.transpose(1, 2).reshape(B, L, D))                 # (B, L, D)
        return x + self.mlp(self.ln2(x))                                     # (B, L, D)


class TextEncoder(nn.Module):
    """ids (B, L), mask (B, L) -> token embeddings (B, L, D) for cross-attention, pooled (B, D).

    DEVIATION: CLIP's text tower is causal and pools the end-of-text token; with word-level ids
    and no special end token we attend bidirectionally and pool by the masked mean.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"expected cfg.vocab_size >= 2 (set it to len(tokenizer)), got {cfg.vocab_size}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)  # learned positions (CLIP)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)   # CLIP's text_projection into the joint space
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 2 or ids.shape[1] > self.cfg.max_len or mask.shape != ids.shape:
            raise ValueError(f"expected ids and mask of shape (B, L<={self.cfg.max_len}), got ids "
                             f"{tuple(ids.shape)}, mask {tuple(mask.shape)}")
        if not mask.any(dim=1).all():
            raise ValueError("every row of mask needs at least one True token (an all-False row "
                             "would softmax over nothing); use null_embedding for the empty prompt")
        ids, mask = ids.to(self.pos_emb.device), mask.to(self.pos_emb.device).bool()   # the tokenizer's are on the CPU
        L = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb[:L]                             # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)                                               # (B, L, D)
        m = mask[..., None].to(x.dtype)                                      # (B, L, 1)
        tokens = self.ln_f(x) * m                                            # (B, L, D), <pad> rows zeroed
        pooled = self.proj(tokens.sum(1) / m.sum(1))                         # (B, D) masked mean
        return tokens, pooled

    def null_ids(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The internal empty prompt: all <pad> ids; mask True at position 0 only, because a row
        with no visible key would make every softmax 0/0 = NaN. So the null embedding is the
        encoding of a single <pad> token: a fixed vector the DiT learns to read as "no caption"
        (cfg_dropout in flow.py replaces captions by it during training)."""
        ids = torch.full((batch, self.cfg.max_len), 0, dtype=torch.long, device=self.pos_emb.device)  # (B, L)
        mask = torch.zeros(batch, self.cfg.max_len, dtype=torch.bool, device=self.pos_emb.device)     # (B, L)
        mask[:, 0] = True
        return ids, mask

    def null_embedding(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D), pooled (B, D), mask (B, L)) of the empty prompt, for guidance."""
        ids, mask = self.null_ids(batch)
        tokens, pooled = self(ids, mask)
        return tokens, pooled, mask


def encode_text(encoder: TextEncoder, tokenizer: Tokenizer, prompts: list[str]):
    """prompts -> (tokens (B, L, D), pooled (B, D), mask (B, L)) with the frozen encoder."""
    ids, mask = tokenizer.encode(prompts)
    with torch.no_grad():
        tokens, pooled = encoder(ids, mask)
    return tokens, pooled, mask.to(tokens.device)


# ----------------------------------------------------------------------------- CLIP-style pretraining
class VideoTower(nn.Module):
    """ASSUMPTION: the "image tower" of our CLIP is a tiny 3D conv net on pixels, so that it can
    see colour, shape and motion direction. Pixels (B, 3, F, H, W) in [-1, 1] -> pooled (B, D).
    The frame difference x_f - x_{f-1} is fed as 3 extra channels: a moving object's leading edge
    and trailing edge have opposite signs there, which makes direction a local pattern that
    survives the global mean pool."""

    def __init__(self, dim: int, width: int = 16):
        super().__init__()
        c = width
        self.net = nn.Sequential(
            nn.Conv3d(6, c, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(4, c), nn.SiLU(),
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.SiLU(),
            nn.Conv3d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.SiLU(),
        )
        self.proj = nn.Linear(2 * c, dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        diff = torch.cat([torch.zeros_like(video[:, :, :1]), video.diff(dim=2)], dim=2)  # (B, 3, F, H, W)
        h = self.net(torch.cat([video, diff], dim=1))                        # (B, 2c, F/4, H/8, W/8)
        return self.proj(h.mean(dim=(2, 3, 4)))                              # (B, D)


def data_batch_fn(preset: str, batch_size: int, frames: int | None = None):
    """batch_fn(seed, split) -> (video, captions, paraphrases, swaps) drawn from data.py's toy
    world: paraphrases[i] is another caption of clip i, swaps[i] a caption of clip i with one
    attribute word changed. `frames` overrides the clip length (fewer frames = faster pretraining).
    Under torchrun the video holds this process's clips only (dist.rows), the captions all of them."""
    import data  # lazy: data.py is a sibling concept and may be absent in isolated tests
    dcfg = data.get_config(preset)
    if frames is not None:
        dcfg = dataclasses.replace(dcfg, frames=frames)

    def batch_fn(seed, split="train"):
        video, captions, gt = data.make_batch(dcfg, batch_size, seed, split=split, rows=dist.rows(batch_size))
        rng = np.random.RandomState(seed + 1)                # the second captions' own stream
        paraphrases = [data.recaption(g["objects"], rng) for g in gt]
        swaps = [data.swap_one_word(g["objects"], rng) for g in gt]
        return video, captions, paraphrases, swaps
    return batch_fn


def fit_text_encoder(encoder: TextEncoder, tokenizer: Tokenizer, batch_fn, steps: int, lr: float,
                     seed: int, progress: bool = True, eval_batches: int = 4,
                     eval_split: str | None = None) -> dict:
    """CLIP pretraining, plus the two word-keeping terms of the module docstring.

    batch_fn(seed, split) -> (video (B, 3, F, H, W), captions, paraphrases, swaps): B clips, a
    caption each, a second caption of the same clip, and a caption with one attribute word swapped.
    Loss per update = video-text InfoNCE (the swaps are extra negatives of each video)
                    + caption-caption InfoNCE (the paraphrase is the positive; every other caption
                      and paraphrase in the batch, and the swaps, are negatives).
    Training uses batch seeds seed*10^6 + step; evaluation uses seeds never seen in training
    (seed*10^6 + 900000 + i) and reports top-1 video->text retrieval among the B captions of a batch
    (chance = 1/B; two clips with the same attributes in one batch cap it below 1): `heldout_*` on
    unseen batches of the train split, `eval_split_*` on split `eval_split` if given (data.py's
    "eval" holds combinations never seen in training). The encoder is frozen at the end.
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = encoder.pos_emb.device
    tower = VideoTower(encoder.cfg.dim, encoder.cfg.video_width).to(device)
    torch.random.set_rng_state(gen_state)
    # CLIP: logit scale = log(1 / 0.07), learned, clipped at 100
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    params = list(encoder.parameters()) + list(tower.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    encoder.train().requires_grad_(True)
    # Under torchrun each process embeds its own clips and every caption, and the clips' embeddings are
    # gathered (_clip_logits): every process computes the whole batch's loss; DDP averages the gradients.
    loss_fn = dist.data_parallel(lambda *batch: _losses(encoder, tower, tokenizer, *batch, logit_scale),
                                 encoder, tower, logit_scale)
    run = {}
    bar = tqdm(range(steps), desc="text: CLIP pretraining", disable=not (progress and dist.is_main()))
    for step in bar:
        video, captions, paraphrases, swaps = batch_fn(seed * 1_000_000 + step, "train")[:4]
        losses = loss_fn(video.to(device), captions, paraphrases, swaps)
        opt.zero_grad(set_to_none=True)
        (losses["video_text"] + losses["caption_caption"]).backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
        for k, v in losses.items():   # running means for the progress bar and the metrics
            v = v.item() if torch.is_tensor(v) else float(v)
            run[k] = v if k not in run else 0.9 * run[k] + 0.1 * v
        bar.set_postfix(v2t=f"{run['video_text']:.3f}", c2c=f"{run['caption_caption']:.3f}",
                        top1=f"{run['top1']:.2f}")
    encoder.eval().requires_grad_(False)                                     # frozen from now on (as CLIP)
    tower.eval()
    metrics = {"steps": steps, "train_loss": run.get("video_text"), "train_caption_loss": run.get("caption_caption"),
               "train_top1": run.get("top1"), "temperature": float(1 / logit_scale.detach().exp())}
    for name, split in (("heldout", "train"), ("eval_split", eval_split)):
        if split is None:
            continue
        v2t, t2v = [], []
        with torch.no_grad():
            for i in range(eval_batches):
                video, captions = batch_fn(seed * 1_000_000 + 900_000 + i, split)[:2]
                _, acc_v2t, acc_t2v = _clip_logits(encoder, tower, tokenizer, video.to(device), captions, logit_scale)
                v2t.append(acc_v2t)
                t2v.append(acc_t2v)
        metrics[f"{name}_top1_v2t"] = sum(v2t) / max(len(v2t), 1)
        metrics[f"{name}_top1_t2v"] = sum(t2v) / max(len(t2v), 1)
        metrics["chance"] = 1.0 / len(captions)
    return metrics


def _embed(encoder, tokenizer, captions):
    ids, mask = tokenizer.encode(list(captions))                             # (B, L), (B, L)
    return F.normalize(encoder(ids, mask)[1], dim=-1)                        # (B, D) unit vectors


def _clip_logits(encoder, tower, tokenizer, video, captions, logit_scale, extra_texts=()):
    """(B, B + E) video x text logits; the E extra texts are negatives only."""
    text = _embed(encoder, tokenizer, list(captions) + list(extra_texts))   # (B + E, D)
    vid = dist.gather_rows(F.normalize(tower(video), dim=-1))                # (B, D) every process's clips
    logits = logit_scale.exp() * vid @ text.T                                # (B, B + E)
    B = len(captions)
    labels = torch.arange(B, device=logits.device)
    acc_v2t = (logits.argmax(1) == labels).float().mean().item()
    acc_t2v = (logits[:, :B].argmax(0) == labels).float().mean().item()
    return logits, acc_v2t, acc_t2v


def _losses(encoder, tower, tokenizer, video, captions, paraphrases, swaps, logit_scale):
    B = len(captions)
    labels = torch.arange(B, device=logit_scale.device)
    # video-text, symmetric InfoNCE: each clip picks its caption (against every caption and every
    # one-word swap), each caption picks its clip
    logits, acc_v2t, _ = _clip_logits(encoder, tower, tokenizer, video, captions, logit_scale, swaps)
    video_text = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :B].T, labels)) / 2
    # caption-caption: caption i picks its paraphrase among all paraphrases and swaps, and back
    z = _embed(encoder, tokenizer, list(captions) + list(paraphrases) + list(swaps))  # (3B, D)
    cap, para, swap = z[:B], z[B:2 * B], z[2 * B:]
    s = logit_scale.exp()
    c2p = s * cap @ torch.cat([para, swap]).T                                # (B, 2B)
    p2c = s * para @ torch.cat([cap, swap]).T                                # (B, 2B)
    caption_caption = (F.cross_entropy(c2p, labels) + F.cross_entropy(p2c, labels)) / 2
    return {"video_text": video_text, "caption_caption": caption_caption, "top1": acc_v2t}


# ----------------------------------------------------------------------------- does it keep every word?
def _all_captions(combos):
    """Every paraphrase data.py can write of each single-object combination: (captions, labels)
    with labels (N, 3) long = (colour, shape, motion) indices."""
    import data
    caps, labels = [], []
    for c, s, m in combos:
        for t in data.TEMPLATES:
            for cw in data.COLOR_WORDS[c]:
                for sw in data.SHAPE_WORDS[s]:
                    for mw in data.MOTION_PHRASES[m]:
                        caps.append(data._article(t.format(c=cw, s=sw, m=mw)))
                        labels.append((list(data.COLORS).index(c), data.SHAPES.index(s), data.MOTIONS.index(m)))
    return caps, torch.tensor(labels)


def _features(encoder, tokenizer, captions, batch=512):
    return torch.cat([encode_text(encoder, tokenizer, captions[i:i + batch])[1]
                      for i in range(0, len(captions), batch)])              # (N, D) pooled


def probe(encoder: TextEncoder, tokenizer: Tokenizer, train_captions: int = 4000, seed: int = 0) -> dict:
    """Does the frozen encoder keep every attribute of a caption? Two measurements:

    linear probe: a logistic-regression classifier per attribute (colour 7-way, shape 4-way, motion
    6-way) is fitted on pooled features of `train_captions` random paraphrases of the TRAINING
    combinations, then scored on every paraphrase of every HELD-OUT combination (21 x 108 captions
    the encoder never saw, in words or in combination). Features are standardised on the train set.
    one-word pairs: for each training combination's canonical prompt and each other value of one
    attribute, the pooled cosine between the two prompts; reported as the largest cosine per
    attribute (the closest pair), next to the smallest cosine between two paraphrases of the same
    combination (how close "the same" is)."""
    import data
    g = torch.Generator().manual_seed(seed)
    caps, y = _all_captions(data.TRAIN_COMBOS)
    pick = torch.randperm(len(caps), generator=g)[:train_captions]
    x_tr, y_tr = _features(encoder, tokenizer, [caps[i] for i in pick]), y[pick]
    test_caps, y_te = _all_captions(data.HELD_OUT)
    x_te = _features(encoder, tokenizer, test_caps)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    out = {"probe_train_captions": len(pick), "probe_test_captions": len(test_caps)}
    for j, (name, n) in enumerate((("colour", len(data.COLORS)), ("shape", len(data.SHAPES)),
                                   ("motion", len(data.MOTIONS)))):
        w = torch.zeros(x_tr.shape[1], n, requires_grad=True)
        b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x_tr @ w + b, y_tr[:, j]) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            out[f"probe_{name}"] = ((x_te @ w + b).argmax(1) == y_te[:, j]).float().mean().item()
    # one-word pairs, on the canonical phrasing
    z = lambda ps: F.normalize(encode_text(encoder, tokenizer, ps)[1], dim=-1)  # noqa: E731
    for j, (name, values) in enumerate((("colour", list(data.COLORS)), ("shape", data.SHAPES),
                                        ("motion", data.MOTIONS))):
        worst = -1.0
        for combo in data.TRAIN_COMBOS:
            others = [combo[:j] + (v,) + combo[j + 1:] for v in values if v != combo[j]]
            sims = z([data.canonical_prompt(*combo)]) @ z([data.canonical_prompt(*o) for o in others]).T
            worst = max(worst, sims.max().item())
        out[f"one_word_max_cos_{name}"] = worst
    same = []
    for combo in data.TRAIN_COMBOS[::7]:
        zc = z(_all_captions([combo])[0])                                    # (108, D)
        same.append((zc @ zc.T).min().item())
    out["paraphrase_min_cos"] = min(same)
    return out


# ----------------------------------------------------------------------------- building and checkpoints
# A word list for when data.py is not there (isolated tests, this file's demo).
FALLBACK_WORDS = ("a an the red crimson green emerald blue azure yellow golden square block "
                  "moves goes slides drifts to left right up down leftward rightward upward downward").split()


def default_words() -> list[str]:
    """Every word a caption can contain: data.vocabulary(), or FALLBACK_WORDS without data.py."""
    try:
        import data
        return sorted(set(data.vocabulary()))
    except ImportError:
        warnings.warn("data.py not importable; text.py uses its FALLBACK_WORDS vocabulary")
        return list(FALLBACK_WORDS)


def build_text(preset: str = "tiny", words: list[str] | None = None, seed: int = 0):
    """-> (encoder, tokenizer, cfg) with cfg.vocab_size = len(tokenizer), weights from `seed`."""
    cfg = get_config(preset)
    tokenizer = Tokenizer(default_words() if words is None else words, cfg.max_len)
    cfg.vocab_size = len(tokenizer)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    encoder = TextEncoder(cfg)
    torch.random.set_rng_state(gen_state)
    return encoder, tokenizer, cfg


def _atomic_write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_text(path: str, encoder: TextEncoder, tokenizer: Tokenizer, cfg: TextConfig, metrics: dict) -> None:
    """Weights + config + vocab in `path`; vocab.json (for the app) and <stem>.json (config and
    metrics, for people) next to it. All writes atomic."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"kind": "s2dit-text", "config": dataclasses.asdict(cfg), "vocab": tokenizer.itos,
            "state_dict": encoder.state_dict(), "metrics": metrics}
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)
    tokenizer.save_vocab(os.path.join(os.path.dirname(os.path.abspath(path)), "vocab.json"))
    _atomic_write_text(os.path.splitext(path)[0] + ".json",
                       json.dumps({"config": dataclasses.asdict(cfg), "metrics": metrics}, indent=1))


def load_text(path: str) -> tuple[TextEncoder, Tokenizer]:
    """-> (frozen encoder in eval mode, tokenizer); a missing or bad file names itself."""
    hint = "re-run the `text` stage of train.py"
    if not os.path.exists(path):
        raise FileNotFoundError(f"text encoder checkpoint {path} not found; {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("kind") != "s2dit-text":
            raise ValueError("not a text encoder checkpoint")
        known = {f.name for f in dataclasses.fields(TextConfig)}   # checkpoints may carry retired fields
        cfg = TextConfig(**{k: v for k, v in blob["config"].items() if k in known})
        tokenizer = Tokenizer(blob["vocab"], cfg.max_len)
        encoder = TextEncoder(cfg)
        encoder.load_state_dict(blob["state_dict"])
    except Exception as e:  # unpickling, missing keys, shape mismatch: all mean "rebuild it"
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        raise ValueError(f"text encoder checkpoint {path} is corrupt or incompatible ({why}); {hint}") from e
    if len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"text encoder checkpoint {path}: vocab has {len(tokenizer)} words but the "
                         f"embedding has {cfg.vocab_size} rows; {hint}")
    return encoder.eval().requires_grad_(False), tokenizer


# ----------------------------------------------------------------------------- fallback toy world
COLOURS = {"red": ((1, -1, -1), ("red", "crimson")), "green": ((-1, 1, -1), ("green", "emerald")),
           "blue": ((-1, -1, 1), ("blue", "azure")), "yellow": ((1, 1, -1), ("yellow", "golden"))}
DIRECTIONS = {"left": ((0, -1), ("left", "to the left", "leftward")), "right": ((0, 1), ("right", "to the right", "rightward")),
              "up": ((-1, 0), ("up", "upward")), "down": ((1, 0), ("down", "downward"))}


def colour_batch_fn(batch_size: int = 16, frames: int = 5, size: int = 16):
    """A minimal stand-in for data.py (tests, demo): a coloured square moving on black, captioned
    with random synonyms. batch_fn(seed, split) -> (video (B, 3, F, size, size), captions,
    paraphrases, swaps), the last two as in data_batch_fn."""
    def batch_fn(seed: int, split: str = "train"):
        g = torch.Generator().manual_seed(seed)
        video = -torch.ones(batch_size, 3, frames, size, size)
        pick = lambda ws: ws[int(torch.randint(len(ws), (1,), generator=g))]  # noqa: E731
        say = lambda colour, direction: (f"{pick(('a', 'the'))} {pick(COLOURS[colour][1])} "  # noqa: E731
                                         f"{pick(('square', 'block'))} {pick(('moves', 'goes', 'slides', 'drifts'))} "
                                         f"{pick(DIRECTIONS[direction][1])}")
        captions, paraphrases, swaps = [], [], []
        for b in range(batch_size):
            colour = list(COLOURS)[int(torch.randint(4, (1,), generator=g))]
            direction = list(DIRECTIONS)[int(torch.randint(4, (1,), generator=g))]
            rgb = COLOURS[colour][0]
            (dy, dx) = DIRECTIONS[direction][0]
            y, x = (int(v) for v in torch.randint(size // 2 - 2, size // 2 + 1, (2,), generator=g))
            for f in range(frames):
                yy, xx = y + dy * f - 2, x + dx * f - 2
                video[b, :, f, max(yy, 0):max(yy + 4, 0), max(xx, 0):max(xx + 4, 0)] = torch.tensor(rgb, dtype=torch.float)[:, None, None]
            captions.append(say(colour, direction))
            paraphrases.append(say(colour, direction))
            if int(torch.randint(2, (1,), generator=g)):                       # swap the colour or the direction
                swaps.append(say(pick([c for c in COLOURS if c != colour]), direction))
            else:
                swaps.append(say(colour, pick([d for d in DIRECTIONS if d != direction])))
        return video, captions, paraphrases, swaps
    return batch_fn


def _demo() -> None:
    try:
        import data  # noqa: F401
        words, batch_fn, preset_note = default_words(), data_batch_fn("tiny", 16, frames=9), "data.py toy world"
    except ImportError:
        words, batch_fn, preset_note = list(FALLBACK_WORDS), colour_batch_fn(16), "fallback colour world"
    encoder, tokenizer, cfg = build_text("tiny", words, seed=0)
    prompts = ["A red circle moves left.", "a CRIMSON ball slides to the left!", "a zebra dances"]
    ids, mask = tokenizer.encode(prompts)
    print(f"vocab {len(tokenizer)} words; ids {tuple(ids.shape)}, mask {tuple(mask.shape)}")
    for p, row, m in zip(prompts, ids, mask):
        print(f"  {p!r:40} -> {[tokenizer.itos[i] for i in row[m].tolist()]}")
    metrics = fit_text_encoder(encoder, tokenizer, batch_fn, steps=10, lr=cfg.fit_lr, seed=0, eval_batches=2)
    tokens, pooled, mask = encode_text(encoder, tokenizer, prompts)
    null_tokens, null_pooled, null_mask = encoder.null_embedding(2)
    print(f"trained 10 steps on the {preset_note}: held-out top-1 video->text "
          f"{metrics['heldout_top1_v2t']:.2f} (chance {metrics['chance']:.2f})")
    print(f"tokens {tuple(tokens.shape)}, pooled {tuple(pooled.shape)}, null tokens "
          f"{tuple(null_tokens.shape)}, null pooled {tuple(null_pooled.shape)}")
    assert tokens.shape == (3, cfg.max_len, cfg.dim) and pooled.shape == (3, cfg.dim)
    assert torch.isfinite(null_pooled).all()


if __name__ == "__main__":
    _demo()
