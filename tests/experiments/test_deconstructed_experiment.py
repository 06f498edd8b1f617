"""Smoke test of experiments/deconstructed (tiny configuration; the real run is the README's)."""

from __future__ import annotations

import pytest
import torch
from experiments.deconstructed.run import CharLM, LMConfig, format_report, load_text, ngram_bpc, run_experiment

TEXT = "the dress fits well and the fabric is soft.\nlove the color, runs small.\n" * 60


def test_tiny_run_on_a_small_text_gives_every_column():
    cfg = LMConfig(seeds=(0,), variants=("standard", "mlp", "fixed_seq_qk"), dim=16, depth=2, heads=2, context=16,
                   steps=3, batch=4, eval_batches=2, min_count=1)
    res = run_experiment(cfg, text=TEXT, log=lambda s: None)
    bpc = res["bpc"]
    assert bpc["standard"]["hybrid"] == [] and len(bpc["mlp"]["hybrid"]) == len(bpc["mlp"]["skip"]) == 1
    assert all(0 < v < 10 for r in bpc.values() for xs in r.values() for v in xs)
    report = format_report(res, cfg, "cmd", 60.0)
    assert "| MLP (no mixing) |" in report and "bigram" in report


def test_ngram_references_and_fixed_stream():
    train, val, vocab = load_text(len(TEXT), 1, TEXT)
    uni, bi = ngram_bpc(train, val, len(vocab))
    assert bi < uni < torch.log2(torch.tensor(float(len(vocab)))).item() + 1e-9
    cfg = LMConfig(dim=16, depth=2, heads=2, context=16)
    model = CharLM(len(vocab), cfg, "fixed_seq_qk", "uniform", train[:16].clone(), 0)
    ids = train[:32].view(2, 16)
    out = model(ids)
    ids2 = ids.clone()
    ids2[:, 10:] = ids2[:, 10:].flip(1)
    torch.testing.assert_close(model(ids2)[:, :10], out[:, :10])  # causal through the fixed stream too


@pytest.mark.registry("womens_clothing")
def test_real_review_text_loads():
    train, val, vocab = load_text(200_000)
    assert len(train) == 180_000 and len(val) == 20_000 and 40 < len(vocab) < 200
    assert 0 < (train == 0).float().mean() < 0.01  # rare characters map to the unknown symbol, and they are rare
