"""Face verification: the ``identity_folder`` dataset and its LFW pairs, the ``arcface``/``cosface`` losses, the
``verification`` task's metrics (against scikit-learn and a NumPy 10-fold protocol written here), bad input, and
a short ``prism train`` on the ORL faces (``../shared/data/orl_faces``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, read_result
from PIL import Image

from prism.framework.errors import DataError
from prism.framework.plugins import load_plugins

load_plugins()

from prism.plugins.datasets.identity_folder import (  # noqa: E402
    IdentityFolderConfig,
    Pair,
    build_identity_folder,
    generate_pairs,
    read_pairs,
    write_pairs,
)
from prism.plugins.tasks.verification import roc, verification_metrics  # noqa: E402

ORL = SHARED_DATA / "orl_faces"


def make_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (10, 8)) -> Path:
    """``root/<identity>/<n>.pgm`` grey images, ``counts[identity]`` of each (distinct pixels per image)."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / name / f"{n}.pgm")
    return root


def build(path: Path, tmp_path: Path, **options):
    return build_identity_folder(IdentityFolderConfig(path=str(path), channels=1, data_dir=str(tmp_path / "tfds"),
                                                      **options))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("faces") / "people", {f"p{i}": 4 for i in range(1, 7)})


def identities(split) -> set[int]:
    return {int(split[i]["identity"]) for i in range(len(split))}


# -- dataset ---------------------------------------------------------------------------------------------
def test_open_set_splits_by_identity_and_closed_set_by_image(folder, tmp_path):
    source = build(folder, tmp_path, held_out=2, pair_folds=2, pairs_per_fold=3, split_seed=3)
    train, test = source.split("train"), source.split("test")
    assert len(identities(test)) == 2 and len(identities(train)) == 4
    assert not identities(train) & identities(test)  # no identity on both sides
    assert (len(train), len(test)) == (16, 8) and source.info.num_classes == 4
    assert sorted(int(train[i]["label"]) for i in range(len(train))) == sorted(list(range(4)) * 4)
    assert "label" not in test[0]  # held-out identities are no training class
    pairs = source.split("pairs")
    assert len(pairs) == 12 and set(pairs[0]) == {"image", "image2", "same", "fold"}
    assert [int(pairs[i]["same"]) for i in range(6)] == [1, 1, 1, 0, 0, 0]  # per fold: same first (LFW order)
    assert {p.name1 for p in source.pairs} | {p.name2 for p in source.pairs} == {
        source.identities[i] for i in identities(test)}  # generated over the held-out identities only
    assert read_pairs(source.pairs_file) == [Pair(p.name1, p.number1, p.name2, p.number2, p.fold, 2 + i)
                                             for i, p in enumerate(source.pairs)]  # written in LFW format

    closed = build(folder, tmp_path, closed_set=True, test_fraction=0.5, eval_split="test")
    c_train, c_test = closed.split("train"), closed.split("test")
    assert identities(c_train) == identities(c_test) == set(range(6)) and closed.info.num_classes == 6
    assert len(c_train) == len(c_test) == 12 and "label" in c_test[0]


def test_a_pairs_file_names_the_held_out_identities(folder, tmp_path):
    (tmp_path / "pairs.txt").write_text("1\t2\np2\t1\t4\np5\t2\t3\np2\t1\tp5\t1\np5\t4\tp2\t2\n")
    source = build(folder, tmp_path, pairs=str(tmp_path / "pairs.txt"), held_out=1)  # held_out: the file decides
    assert {source.identities[i] for i in identities(source.split("test"))} == {"p2", "p5"}
    assert source.info.class_names == ("p1", "p3", "p4", "p6") and len(source.split("pairs")) == 4
    pair = source.split("pairs")[2]  # p2 image 1 vs p5 image 1, as the file's line 4 says
    assert int(pair["same"]) == 0 and int(pair["fold"]) == 0
    np.testing.assert_array_equal(pair["image"][..., 0], np.asarray(Image.open(folder / "p2" / "1.pgm")))
    np.testing.assert_array_equal(pair["image2"][..., 0], np.asarray(Image.open(folder / "p5" / "1.pgm")))


def test_generated_pairs_are_balanced_distinct_and_seeded():
    images = {f"id{i}": list(range(1, 6)) for i in range(5)}
    pairs = generate_pairs(images, folds=10, per_fold=4, seed=1)
    assert len(pairs) == 80 and sum(p.same for p in pairs) == 40
    assert all(sum(p.same for p in pairs if p.fold == f) == 4 for f in range(10))
    keys = [frozenset([(p.name1, p.number1), (p.name2, p.number2)]) for p in pairs]
    assert len(set(keys)) == 80 and all(len(k) == 2 for k in keys)  # no pair twice, no image with itself
    assert pairs == generate_pairs(images, folds=10, per_fold=4, seed=1) != generate_pairs(images, folds=10,
                                                                                            per_fold=4, seed=2)


def test_pairs_file_round_trip_in_lfw_format(tmp_path):
    text = ("2\t2\nAbel\t1\t3\nBo\t2\t4\nAbel\t1\tBo\t2\nCy\t1\tAbel\t2\n"
            "Cy\t1\t2\nBo\t1\t3\nBo\t1\tCy\t2\nAbel\t3\tCy\t1\n")
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    pairs = read_pairs(path)
    assert [(p.name1, p.number1, p.name2, p.number2, p.fold, p.same) for p in pairs[:4]] == [
        ("Abel", 1, "Abel", 3, 0, True), ("Bo", 2, "Bo", 4, 0, True), ("Abel", 1, "Bo", 2, 0, False),
        ("Cy", 1, "Abel", 2, 0, False)]
    assert [p.fold for p in pairs] == [0] * 4 + [1] * 4 and [p.line for p in pairs] == list(range(2, 10))
    assert write_pairs(tmp_path / "again.txt", pairs).read_text() == text  # byte for byte
    single = tmp_path / "dev.txt"  # pairsDevTrain.txt's one-number header: one set
    single.write_text("1\nAbel\t1\t2\nAbel\t1\tBo\t1\n")
    assert [(p.fold, p.same) for p in read_pairs(single)] == [(0, True), (0, False)]


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("1\t1\np1\t1\t9\np1\t1\tp2\t1\n", "pairs.txt line 2: image 9 of 'p1' does not exist: {root}/p1 has 4 image(s)"),
    ("1\t1\np1\t1\t2\np1\t1\tnobody\t1\n", "pairs.txt line 3: no identity folder 'nobody' in {root}"),
    ("1\t1\np1\t1\tp2\t2\np1\t1\t2\n", "pairs.txt line 2: expected 'name n1 n2' (a same-identity pair) at this "
                                       "position of set 1, got 'p1 1 p2 2'"),
    ("1\t1\np1\tone\t2\np1\t1\tp2\t1\n", "pairs.txt line 2: an image number must be a positive whole number, "
                                         "got 'one'"),
    ("2\t1\np1\t1\t2\np1\t1\tp2\t1\n", "announces 2 set(s) of 1 same + 1 different pairs (4 lines), the file has 2"),
    ("ten\np1\t1\t2\n", "pairs.txt line 1: expected the header 'SETS PAIRS_PER_SET'"),
])
def test_bad_pairs_files_are_one_line_errors_naming_file_and_line(folder, tmp_path, text, message):
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(DataError) as info:
        build(folder, tmp_path, pairs=str(tmp_path / "pairs.txt"))
    assert message.format(root=folder) in str(info.value) and "\n" not in str(info.value)
    assert str(tmp_path / "pairs.txt") in str(info.value)


def test_an_identity_with_one_image_cannot_give_same_pairs(tmp_path):
    root = make_folder(tmp_path / "people", {"a": 1, "b": 3, "c": 3, "d": 3})
    with pytest.raises(DataError) as info:  # split_seed 0 holds out a and c
        build(root, tmp_path, held_out=2, split_seed=0, pair_folds=1, pairs_per_fold=1).split("pairs")
    message = str(info.value)
    assert f"identity {root / 'a'} has 1 image in split 'test': no same-identity pair" in message
    assert "\n" not in message and "dataset.min_images=2" in message


# -- metrics against scikit-learn and a NumPy 10-fold protocol --------------------------------------------
def numpy_ten_fold(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """LFW's protocol, written plainly: per fold, the most accurate midpoint threshold on the other folds."""
    accuracies = []
    for k in sorted(set(fold.tolist())):
        train_s, train_y = scores[fold != k], same[fold != k].astype(bool)
        values = sorted(set(train_s.tolist()))
        middles = [(a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)]
        candidates = [values[0] - 1, *middles, values[-1] + 1]
        best, best_accuracy = None, -1.0
        for t in candidates:
            accuracy = np.mean((train_s > t) == train_y)
            if accuracy > best_accuracy:  # strictly better: ties keep the lowest threshold
                best, best_accuracy = t, accuracy
        test = fold == k
        accuracies.append(np.mean((scores[test] > best) == same[test].astype(bool)))
    return np.array(accuracies)


def test_verification_metrics_match_sklearn_and_a_numpy_ten_fold():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(30), np.zeros(30)], 10).astype(np.int32)
    fold = np.repeat(np.arange(10), 60)
    scores = np.round(rng.normal(same * 1.2, 1.0), 2)  # rounded: ties in the scores
    metrics = verification_metrics(scores, same, fold, far=0.01)
    far, tar, thresholds = roc(scores, same)
    s_far, s_tar, s_thresholds = roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, s_far)
    np.testing.assert_allclose(tar, s_tar)
    np.testing.assert_allclose(thresholds[1:], s_thresholds[1:])
    assert metrics["verification/auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    i = np.argmin(np.abs(s_far - (1 - s_tar)))
    assert metrics["verification/eer"] == pytest.approx((s_far[i] + 1 - s_tar[i]) / 2)
    assert metrics["verification/tar_at_far"] == pytest.approx(s_tar[s_far <= 0.01].max())
    reference = numpy_ten_fold(scores, same, fold)
    assert metrics["verification/accuracy"] == pytest.approx(reference.mean(), abs=1e-12)
    assert metrics["verification/accuracy_std"] == pytest.approx(reference.std(), abs=1e-12)
    assert 0.6 < metrics["verification/accuracy"] < 0.9  # the separation drawn above, not a degenerate answer


# -- the margin losses against NumPy ----------------------------------------------------------------------
def numpy_margin_loss(embeddings, centers, labels, scale, margin, kind):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = centers / np.linalg.norm(centers, axis=0, keepdims=True)
    cos = np.clip(e @ w, -1, 1)
    logits = scale * cos
    for i, y in enumerate(labels):
        if kind == "cosface":
            logits[i, y] = scale * (cos[i, y] - margin)
        else:
            theta = math.acos(cos[i, y])
            logits[i, y] = scale * (math.cos(theta + margin) if theta + margin <= math.pi
                                    else cos[i, y] - margin * math.sin(margin))
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


@pytest.mark.parametrize("kind, margin", [("arcface", 0.5), ("cosface", 0.35)])
def test_margin_losses_match_numpy(kind, margin):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from prism.framework.api import DataInfo
    from prism.framework.registry import OBJECTIVES

    class Backbone(nnx.Module):
        num_features = 6

        def features(self, x):
            return x

    rng = np.random.default_rng(1)
    entry = OBJECTIVES.get(kind)
    objective = entry.builder(entry.config(embedding_dim=5, scale=16.0, margin=margin), model=Backbone(),
                              data=DataInfo(num_classes=4, image_shape=(1, 1, 6)), rngs=nnx.Rngs(0))
    centers = np.asarray(objective.centers[...], np.float64)
    embeddings = rng.normal(size=(8, 5))
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    embeddings[0] = -centers[:, 0]  # theta = pi: ArcFace's fallback branch (theta + m > pi)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda e: objective.loss(e, jnp.asarray(labels))[0]))
    loss, grad = loss_and_grad(jnp.asarray(embeddings, jnp.float32))
    expected = numpy_margin_loss(embeddings, centers, labels, 16.0, margin, kind)
    assert float(loss) == pytest.approx(expected, rel=2e-5)
    assert np.isfinite(np.asarray(grad)).all()


# -- end to end on ORL -----------------------------------------------------------------------------------
@pytest.mark.skipif(not ORL.is_dir(), reason=f"the ORL faces are not at {ORL} (../shared/data)")
def test_prism_train_on_orl_ends_with_verification_metrics(train_run, tmp_path):
    trainer, result = train_run(["+experiment=face_verification_orl", f"dataset.path={ORL}",
                                 "dataset.image_size=[24,20]", "dataset.pairs_per_fold=6", "train.steps=4",
                                 "train.eval_every=4", "checkpoint.enabled=false", "logging.plots=false",
                                 "logging.tensorboard=false"])
    metrics = result["metrics"]
    assert result["status"] == "completed" and metrics["eval/verification/pairs"] == 120
    for name in ("accuracy", "auc", "tar_at_far", "eer"):
        assert 0 <= metrics[f"eval/verification/{name}"] <= 1, name
    assert metrics["eval/verification/auc"] > 0.5  # better than chance after 4 steps on faces
    assert read_result(tmp_path / "run")["metrics"] == metrics
    assert Image.open(tmp_path / "run" / "predictions" / "roc.png").size[0] > 100
    assert trainer.info.num_classes == 30
