"""OCR: CTC loss against a NumPy forward algorithm, CER against a plain Levenshtein, greedy and beam decoding,
the text datasets (determinism, held-out fonts, bad input), and a tiny CRNN + CTC run through training, offline
evaluation's metrics and ``prism predict``."""

from __future__ import annotations

import functools
import glob
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from prism.framework.errors import ConfigError, DataError
from prism.plugins.datasets.rendered_text import RenderedTextConfig, build_rendered_text
from prism.plugins.datasets.text_folder import TextFolderConfig, build_text_folder
from prism.plugins.objectives.ctc import ctc_losses
from prism.plugins.tasks.text_recognition import beam_decode, edit_distance, greedy_decode, text_metrics

HAVE_FONTS = bool(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
needs_fonts = pytest.mark.skipif(not HAVE_FONTS, reason="no TrueType fonts under /usr/share/fonts "
                                 "(apt-get install fonts-dejavu-core)")


# -- references written here ------------------------------------------------------------------------------
def ctc_forward_nll(log_probs: np.ndarray, label: list[int], blank: int = 0) -> float:
    """-log p(label | x) by the CTC forward (alpha) recursion over the blank-extended label, in probabilities."""
    probs = np.exp(np.asarray(log_probs, np.float64))
    ext = [blank]
    for c in label:
        ext += [c, blank]
    alpha = np.zeros((len(probs), len(ext)))
    alpha[0, 0] = probs[0, blank]
    if len(ext) > 1:
        alpha[0, 1] = probs[0, ext[1]]
    for t in range(1, len(probs)):
        for s in range(len(ext)):
            a = alpha[t - 1, s] + (alpha[t - 1, s - 1] if s > 0 else 0.0)
            if s > 1 and ext[s] != blank and ext[s] != ext[s - 2]:
                a += alpha[t - 1, s - 2]
            alpha[t, s] = a * probs[t, ext[s]]
    total = alpha[-1, -1] + (alpha[-1, -2] if len(ext) > 1 else 0.0)
    return -np.log(total)


def levenshtein(a: str, b: str) -> int:
    """The textbook recursion, memoized."""
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


# -- loss, metric and decoding --------------------------------------------------------------------------------
def test_ctc_loss_equals_the_numpy_forward_algorithm():
    rng = np.random.default_rng(0)
    labels = [[1, 2, 2], [3], [], [1, 1, 1], [2, 3, 1, 3]]  # repeats need a blank between them
    logits = rng.normal(size=(len(labels), 9, 4)) * 2
    text = np.zeros((len(labels), 4), np.int32)
    for i, label in enumerate(labels):
        text[i, :len(label)] = label
    lengths = np.array([len(x) for x in labels], np.int32)
    losses = np.asarray(jax.jit(ctc_losses)(jnp.asarray(logits, jnp.float32), jnp.asarray(text), jnp.asarray(lengths)))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    expected = [ctc_forward_nll(log_probs[i], label) for i, label in enumerate(labels)]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)


def test_cer_and_word_accuracy_equal_plain_levenshtein():
    rng = np.random.default_rng(1)
    alphabet = "abc"
    truth = ["".join(rng.choice(list(alphabet), rng.integers(1, 7))) for _ in range(40)]
    predicted = [t if rng.random() < 0.3 else "".join(rng.choice(list(alphabet), rng.integers(0, 8))) for t in truth]
    for p, t in zip(predicted, truth, strict=True):
        assert edit_distance(p, t) == levenshtein(p, t)
    metrics = text_metrics([list(p) for p in predicted], [list(t) for t in truth])
    cer = sum(levenshtein(p, t) for p, t in zip(predicted, truth, strict=True)) / sum(map(len, truth))
    assert metrics["cer"] == pytest.approx(cer) and metrics["char_accuracy"] == pytest.approx(1 - cer)
    assert metrics["word_accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    assert 0 < cer < 1


def _one_hot_logits(paths: list[list[int]], classes: int = 4) -> jnp.ndarray:
    return jnp.asarray(np.eye(classes)[np.array(paths)] * 10.0, jnp.float32)


def test_greedy_decoding_merges_repeats_then_drops_blanks():
    paths = [[1, 1, 0, 1, 2, 2, 0, 0],  # a a _ a b b _ _ -> a a b
             [0, 0, 3, 3, 3, 0, 3, 1],  # _ _ c c c _ c a -> c c a
             [0] * 8,                   # all blank -> empty
             [2, 1, 2, 1, 2, 1, 2, 1]]  # no repeats -> every column
    codes, lengths, _ = jax.jit(greedy_decode)(_one_hot_logits(paths))
    decoded = [list(np.asarray(c)[:n]) for c, n in zip(codes, lengths, strict=True)]
    assert decoded == [[1, 1, 2], [3, 3, 1], [], [2, 1, 2, 1, 2, 1, 2, 1]]
    assert (np.asarray(codes)[0, 3:] == 0).all()  # padded with 0 after the text


def test_beam_search_finds_the_likelier_text_that_greedy_misses():
    # each column: blank 0.4, a 0.35, b 0.25; greedy reads "" (p = 0.16), "a" has p = 0.35^2 + 2*0.4*0.35 = 0.4025
    log_probs = np.log(np.array([[0.4, 0.35, 0.25]] * 2))
    greedy = [c for c in np.argmax(log_probs, -1) if c]  # two blank columns: greedy reads nothing
    beam, beam_log_prob = beam_decode(log_probs, beam_width=4, prune=0.0)
    assert greedy == [] and beam == [1]
    assert -ctc_forward_nll(log_probs, beam) > -ctc_forward_nll(log_probs, greedy)
    assert beam_log_prob == pytest.approx(np.log(0.4025))
    logits = np.random.default_rng(2).normal(size=(5, 5, 3)) * 2  # wide beams keep every prefix: exact probability
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    codes, lengths, _ = jax.jit(greedy_decode)(jnp.asarray(log_probs, jnp.float32))
    for lp, c, n in zip(log_probs, np.asarray(codes), np.asarray(lengths), strict=True):
        best, value = beam_decode(lp, beam_width=1000, prune=0.0)
        assert value == pytest.approx(-ctc_forward_nll(lp, best), rel=1e-9)
        assert value >= -ctc_forward_nll(lp, list(c[:n])) - 1e-9


# -- datasets ---------------------------------------------------------------------------------------------------
SMALL_RENDER = dict(train_size=8, test_size=8, image_size=[16, 64], max_length=5)


@needs_fonts
def test_rendered_text_is_deterministic_and_tests_on_held_out_fonts():
    first = build_rendered_text(RenderedTextConfig(**SMALL_RENDER, cache=False))
    again = build_rendered_text(RenderedTextConfig(**SMALL_RENDER))
    other = build_rendered_text(RenderedTextConfig(**SMALL_RENDER, seed=1))
    assert not set(first.fonts["train"]) & set(first.fonts["test"]) and len(first.fonts["test"]) == 4
    assert first.split("test").fonts == first.fonts["test"] and first.split("train").fonts == first.fonts["train"]
    for name in ("train", "test"):
        for i in range(8):
            a, b = first.split(name)[i], again.split(name)[i]
            assert a["image"].shape == (16, 64, 1) and a["image"].dtype == np.uint8
            assert all(np.array_equal(a[k], b[k]) for k in a)
            n = int(a["text_length"])
            assert 3 <= n <= 5 and (a["text"][:n] >= 1).all() and (a["text"][:n] <= 36).all()
            assert (a["text"][n:] == 0).all()
    assert first.split("train").texts(range(8)) != other.split("train").texts(range(8))
    assert first.info.num_classes == 37 and first.info.class_names[:3] == ("<blank>", "0", "1")


def test_rendered_text_without_fonts_says_how_to_install_them(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install fonts-dejavu-core") as info:
        build_rendered_text(RenderedTextConfig(**SMALL_RENDER, fonts=str(tmp_path / "**" / "*.ttf")))
    assert "\n" not in str(info.value) and "dataset.fonts" in str(info.value)


def _text_folder(root: Path, lines: list[str], images: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(np.full((20, 50), 40 * i, np.uint8)).save(root / f"w{i}.png")
    (root / "labels.tsv").write_text("".join(f"{line}\n" for line in lines))
    return root


def test_text_folder_reads_images_and_labels(tmp_path):
    root = _text_folder(tmp_path / "words", ["# comment", *(f"w{i}.png\t{'ab1'[:i % 3 + 1]}" for i in range(6))])
    source = build_text_folder(TextFolderConfig(path=str(root), test_fraction=0.34, image_size=[8, 32]))
    train, test = source.split("train"), source.split("test")
    assert (len(train), len(test)) == (4, 2) and source.info.num_classes == 37
    example = train[0]
    assert example["image"].shape == (8, 32, 1) and example["text"].shape == (3,)  # longest label: 3 characters
    seen = {int(train[i]["image"][0, 0, 0]) // 40: list(train[i]["text"]) for i in range(4)}
    for i, codes in seen.items():  # image w{i} carries label 'ab1'[:i % 3 + 1]: a = 11, b = 12, 1 = 2
        assert codes == [11, 12, 2][:i % 3 + 1] + [0] * (2 - i % 3)


@pytest.mark.parametrize(("lines", "message"), [
    (["w0.png\tab", "w9.png\tcd"], r"labels.tsv:2: image 'w9.png' not found in "),
    (["w0.png\tab", "w1.png\taB!"], r"labels.tsv:2: text 'aB!' has character\(s\) '!B' not in dataset.alphabet"),
    (["w0.png ab"], r"labels.tsv:1: expected 'filename<TAB>text'"),
])
def test_text_folder_bad_labels_name_the_file_and_line(tmp_path, lines, message):
    root = _text_folder(tmp_path / "words", lines)
    with pytest.raises(DataError, match=message) as info:
        build_text_folder(TextFolderConfig(path=str(root)))
    assert "\n" not in str(info.value)


def test_an_empty_alphabet_is_a_config_error(tmp_path):
    root = _text_folder(tmp_path / "words", ["w0.png\tab", "w1.png\tcd"])
    for build, cfg in ((build_text_folder, TextFolderConfig(path=str(root), alphabet="")),
                       (build_rendered_text, RenderedTextConfig(alphabet=""))):
        with pytest.raises(ConfigError, match=r"^dataset.alphabet is empty") as info:
            build(cfg)
        assert "\n" not in str(info.value)


# -- a run: prism train, prism eval, prism predict --------------------------------------------------------
TINY_RUN = ["dataset=digits_text", "model=crnn", "model.widths=[16,32,32]", "model.horizontal_pools=2",
            "model.hidden=32", "model.dropout=0", "objective=ctc", "task=text_recognition", "train.steps=120",
            "train.batch_size=32", "train.eval_every=120", "optimizer.lr=1e-2", "checkpoint.async_save=false",
            "checkpoint.best_metric=eval/char_accuracy", "logging.progress=false", "logging.render=2"]


@pytest.fixture(scope="module")
def ocr_run(tmp_path_factory):
    """A tiny CRNN trained with CTC for 120 steps on the digits as one-character lines."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    run_dir = tmp_path_factory.mktemp("ocr") / "run"
    return run_dir, Trainer(compose(TINY_RUN), run_dir).fit()


def test_a_crnn_ctc_run_reports_text_metrics_and_predicts_text(ocr_run, tmp_path, capsys):
    from prism.framework.cli import main
    from prism.plugins.datasets.digits import split_digits

    run_dir, result = ocr_run
    written = json.loads((run_dir / "result.json").read_text())
    assert written["status"] == "completed" and written["metrics"] == pytest.approx(result["metrics"])
    metrics = result["metrics"]
    assert set(metrics) == {"eval/cer", "eval/char_accuracy", "eval/word_accuracy", "eval/loss"}
    assert metrics["eval/char_accuracy"] == pytest.approx(1 - metrics["eval/cer"])
    assert metrics["eval/char_accuracy"] > 0.7, metrics  # untrained: ~0 (blank-only output)
    assert len(list((run_dir / "predictions").glob("*.png"))) == 2

    images, labels = split_digits(0.2, 0)["test"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(8):
        Image.fromarray(images[i, ..., 0]).save(inputs / f"d{i}.png")
    out = tmp_path / "out"
    assert main(["predict", f"checkpoint={run_dir}", f"input={inputs}", f"out={out}", "step=latest"]) == 0
    capsys.readouterr()
    records = json.loads((out / "predictions.json").read_text())["images"]
    texts = [r["text"] for r in records]
    assert all(isinstance(t, str) and set(t) <= set("0123456789") for t in texts)
    assert sum(t == str(d) for t, d in zip(texts, labels[:8], strict=True)) >= 5, (texts, labels[:8])
