"""Tests for text.py: tokenizer, encoder, null embedding, CLIP-style pretraining, checkpoints.

Runs without data.py (it uses text.py's fallback colour world); one test checks data.py's
vocabulary when data.py is importable.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import text  # noqa: E402

WORDS = text.FALLBACK_WORDS


def _build(seed=0):
    return text.build_text("tiny", WORDS, seed=seed)


def test_tokenizer_lowercase_punctuation_unk_padding():
    tok = text.Tokenizer(WORDS, max_len=8)
    assert tok.itos[:2] == ["<pad>", "<unk>"] and tok.pad_id == 0 and tok.unk_id == 1
    ids, mask = tok.encode(["A RED square, moves left!", "a zebra"])
    assert ids.shape == (2, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert [tok.itos[i] for i in ids[0, :5]] == ["a", "red", "square", "moves", "left"]
    assert mask[0].tolist() == [True] * 5 + [False] * 3
    assert ids[0, 5:].eq(0).all()                                       # padded with <pad> = 0
    assert ids[1, 1] == tok.unk_id and mask[1].sum() == 2
    long_ids, long_mask = tok.encode(["red " * 20])                    # truncated to max_len
    assert long_mask.all() and long_ids.shape == (1, 8)


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "?!"])
def test_empty_prompt_is_clear_error(bad):
    tok = text.Tokenizer(WORDS, 8)
    with pytest.raises(ValueError, match="empty prompt"):
        tok.encode(["a red square", bad])
    with pytest.raises(TypeError, match="list of prompts"):
        tok.encode("a red square")


def test_vocab_json_round_trip(tmp_path):
    tok = text.Tokenizer(WORDS, 12)
    path = str(tmp_path / "vocab.json")
    tok.save_vocab(path)
    back = text.Tokenizer.from_json(path)
    assert back.itos == tok.itos and back.max_len == 12
    prompts = ["the azure block drifts to the right", "a yellow square goes up"]
    assert all(torch.equal(a, b) for a, b in zip(back.encode(prompts), tok.encode(prompts)))
    assert not os.path.exists(path + ".tmp")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        text.Tokenizer.from_json(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        text.Tokenizer.from_json(str(tmp_path / "bad.json"))


def test_encoder_shapes_padding_invariance_and_seed():
    encoder, tok, cfg = _build()
    encoder.eval()
    ids, mask = tok.encode(["a red square moves left", "the blue block goes up"])
    tokens, pooled = encoder(ids, mask)
    assert tokens.shape == (2, cfg.max_len, cfg.dim) and pooled.shape == (2, cfg.dim)
    assert tokens[~mask].abs().max() == 0                               # <pad> rows are zero
    # a <pad> key is invisible: changing the ids under the padding changes nothing
    ids2 = ids.clone()
    ids2[~mask] = 5
    tokens2, pooled2 = encoder(ids2, mask)
    torch.testing.assert_close(pooled2, pooled)
    torch.testing.assert_close(tokens2[mask], tokens[mask])
    # same seed, same weights; other seed, other weights
    same, _, _ = _build(seed=0)
    other, _, _ = _build(seed=1)
    torch.testing.assert_close(same.eval()(ids, mask)[1], pooled)
    assert not torch.allclose(other.eval()(ids, mask)[1], pooled)


def test_encoder_bad_input():
    encoder, tok, cfg = _build()
    ids, mask = tok.encode(["a red square"])
    with pytest.raises(ValueError, match="expected ids and mask"):
        encoder(ids[0], mask[0])
    with pytest.raises(ValueError, match="at least one True"):
        encoder(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vocab_size"):
        text.TextEncoder(text.get_config("tiny"))                      # vocab_size not set
    with pytest.raises(ValueError, match="tiny"):
        text.get_config("huge")


def test_null_embedding_is_finite_constant_and_differs_from_prompts():
    encoder, tok, cfg = _build()
    encoder.eval()
    tokens, pooled, mask = encoder.null_embedding(3)
    assert tokens.shape == (3, cfg.max_len, cfg.dim) and pooled.shape == (3, cfg.dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    assert mask[:, 0].all() and mask[:, 1:].sum() == 0
    assert torch.equal(pooled[0], pooled[2])                            # the same for every sample
    _, p_red, _ = text.encode_text(encoder, tok, ["a red square moves left"])
    assert not torch.allclose(p_red[0], pooled[0])


def _fit(steps=300, seed=0):
    encoder, tok, cfg = _build(seed)
    batch_fn = text.colour_batch_fn(batch_size=16, frames=5, size=16)
    torch.manual_seed(123)                                              # fit must not depend on this
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to a busy machine
    try:
        metrics = text.fit_text_encoder(encoder, tok, batch_fn, steps=steps, lr=1e-3, seed=seed,
                                        progress=False, eval_batches=4, eval_split="train")
    finally:
        torch.set_num_threads(threads)
    return encoder, tok, metrics


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def test_fit_learns_retrieval_and_freezes(fitted):
    encoder, tok, metrics = fitted
    # 16 clips over 16 (colour, direction) combos: chance 1/16; duplicates in a batch cap a
    # perfect model near 0.64 (expected share of distinct combos among 16 draws)
    assert metrics["chance"] == pytest.approx(1 / 16)
    assert metrics["heldout_top1_v2t"] > 0.45, metrics
    assert metrics["heldout_top1_t2v"] > 0.45, metrics
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_paraphrases_map_close_together(fitted):
    """What CLIP gives the DiT: synonyms of the same attributes land together, and a different
    colour or direction lands elsewhere."""
    encoder, tok, _ = fitted
    prompts = ["a red square moves left",           # anchor
               "the crimson block slides leftward",  # paraphrase: same colour, same direction
               "a blue square moves left",          # other colour
               "a red square moves up"]             # other direction
    z = F.normalize(text.encode_text(encoder, tok, prompts)[1], dim=-1)
    sim = z @ z.T
    assert sim[0, 1] > sim[0, 2] + 0.1, sim
    assert sim[0, 1] > sim[0, 3] + 0.1, sim


def test_fit_is_seeded():
    _, _, m1 = _fit(steps=3, seed=5)
    _, _, m2 = _fit(steps=3, seed=5)
    assert m1 == m2


def test_save_load_round_trip_and_errors(tmp_path, fitted):
    encoder, tok, metrics = fitted
    path = str(tmp_path / "text.pt")
    text.save_text(path, encoder, tok, encoder.cfg, metrics)
    assert os.path.exists(tmp_path / "vocab.json") and os.path.exists(tmp_path / "text.json")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert json.loads((tmp_path / "text.json").read_text())["metrics"] == metrics
    assert text.Tokenizer.from_json(str(tmp_path / "vocab.json")).itos == tok.itos
    enc2, tok2 = text.load_text(path)
    prompts = ["a golden square goes down", "a green block moves right"]
    torch.testing.assert_close(text.encode_text(enc2, tok2, prompts)[1],
                               text.encode_text(encoder, tok, prompts)[1])
    assert not any(p.requires_grad for p in enc2.parameters())
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*`text` stage of train\.py"):
        text.load_text(str(tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pt.*`text` stage of train\.py"):
        text.load_text(str(tmp_path / "corrupt.pt"))
    torch.save({"kind": "s2dit-text", "config": {"dim": 32}}, str(tmp_path / "partial.pt"))
    with pytest.raises(ValueError, match=r"partial\.pt"):
        text.load_text(str(tmp_path / "partial.pt"))


def test_data_vocabulary_covers_its_captions():
    data = pytest.importorskip("data")
    if not hasattr(data, "vocabulary"):
        pytest.skip("data.vocabulary not written yet")
    tok = text.Tokenizer(data.vocabulary(), 16)
    cfg = data.get_config("tiny")
    for split in ("train", "eval"):
        _, captions, _ = data.make_batch(cfg, 8, seed=0, split=split)
        ids, mask = tok.encode(captions)
        assert not (ids[mask] == tok.unk_id).any(), captions


def test_toy_world_text_encoder_keeps_every_word():
    """A DiT can only follow words its frozen text features keep. After the text stage's pretraining
    (600 updates on the toy world, exactly train.py's `text` stage of the small preset), a
    linear probe on the pooled features recovers colour, shape and motion from every paraphrase of
    the 21 HELD-OUT combinations (captions the encoder never saw), and prompts that differ in one
    word are far apart: every such pair of canonical prompts below cosine 0.9 (with video-text
    contrast alone the motion words sat at 0.999, i.e. merged)."""
    import data
    encoder, tok, cfg = text.build_text("small", words=data.vocabulary(), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text.fit_text_encoder(encoder, tok, text.data_batch_fn("tiny", 32, frames=9), 600, cfg.fit_lr, 0,
                              progress=False, eval_batches=1)
    finally:
        torch.set_num_threads(threads)
    p = text.probe(encoder, tok)
    assert p["probe_test_captions"] == 21 * 108
    for k in ("colour", "shape", "motion"):
        assert p[f"probe_{k}"] >= 0.99, p
        assert p[f"one_word_max_cos_{k}"] < 0.9, p
