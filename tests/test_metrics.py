"""Registered classification metrics against plain NumPy."""

from __future__ import annotations

import numpy as np

from prism.framework.registry import METRICS


def test_classification_metrics_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(37, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 37)
    acc = np.asarray(METRICS.build("accuracy")(logits, labels))
    np.testing.assert_array_equal(acc, (logits.argmax(-1) == labels).astype(np.float32))
    top3 = np.asarray(METRICS.build("top_k_accuracy", METRICS.get("top_k_accuracy").config(k=3))(logits, labels))
    expected = [label in np.argsort(-row)[:3] for row, label in zip(logits, labels, strict=True)]
    np.testing.assert_array_equal(top3, np.asarray(expected, np.float32))
    ce = np.asarray(METRICS.build("cross_entropy")(logits, labels))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(ce, -log_probs[np.arange(37), labels], rtol=1e-5)
    assert set(METRICS.names()) >= {"accuracy", "top_k_accuracy", "cross_entropy"}
