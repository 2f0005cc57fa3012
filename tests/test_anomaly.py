"""Anomaly detection: the one-class protocol, AUROC/AUPR, Deep SVDD, reconstruction maps, and a digits run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.ndimage import gaussian_filter
from sklearn.metrics import average_precision_score, roc_auc_score

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError, DataError
from prism.framework.one_class import OneClassSource
from prism.plugins.models.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig
from prism.plugins.objectives.deep_svdd import DeepSVDD, DeepSVDDConfig
from prism.plugins.tasks.anomaly import Anomaly, AnomalyConfig, auroc, average_precision, knn_scores


class _ListSource:
    """A labelled in-memory dataset (what a dataset plugin returns): three classes, two splits."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.labels = {"train": rng.integers(0, 3, 40), "test": rng.integers(0, 3, 25)}
        self.data = {s: [{"image": np.full((4, 4, 1), i, np.uint8), "label": np.int32(y)} for i, y in enumerate(ys)]
                     for s, ys in self.labels.items()}
        self.info = DataInfo(num_classes=3, image_shape=(4, 4, 1), splits={"train": 40, "test": 25},
                             class_names=("cat", "dog", "bird"))

    def split(self, name):
        return self.data[name]


@pytest.mark.parametrize("normal", [1, "1", "dog"])
def test_one_class_split_semantics(normal):
    base = _ListSource()
    source = OneClassSource(base, normal, train_split="train")
    train, test = source.split("train"), source.split("test")
    kept = np.flatnonzero(base.labels["train"] == 1)
    assert len(train) == len(kept) and source.info.splits["train"] == len(kept)
    assert [int(train[i]["image"][0, 0, 0]) for i in range(len(train))] == kept.tolist()  # the class-1 examples
    assert all(int(train[i]["label"]) == 0 for i in range(len(train)))
    labels = np.array([int(test[i]["label"]) for i in range(len(test))])
    assert len(test) == 25 and labels.tolist() == (base.labels["test"] != 1).astype(int).tolist()
    assert source.info.num_classes == 3 and source.info.class_names == base.info.class_names  # models fit as before
    assert source.normal_name == "dog"
    stacked = train.stacked(threads=1)
    assert stacked["image"].shape == (len(kept), 4, 4, 1) and not stacked["label"].any()


@pytest.mark.parametrize("value, message", [
    ("3", "dataset.one_class=3: class index out of range; the dataset has 3 classes (0-2: cat, dog, bird)"),
    ("dgo", "dataset.one_class='dgo': no class of that name. Did you mean: dog? Classes: cat, dog, bird."),
])
def test_one_class_bad_input(value, message):
    with pytest.raises(ConfigError) as info:
        OneClassSource(_ListSource(), value, train_split="train")
    assert str(info.value) == message


def test_auroc_aupr_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    for scores in (rng.normal(size=500) + labels, np.round(rng.normal(size=500) + labels, 1)):  # with ties
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    with pytest.raises(DataError, match="need normal and anomalous examples; the split has 0 normal and 5 anomalous"):
        auroc(np.ones(5), np.arange(5.0))


def test_knn_scores_match_numpy():
    rng = np.random.default_rng(2)
    ref, query = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
    dist = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1))
    np.testing.assert_allclose(knn_scores(ref, query, k=3, distance="euclidean"),
                               np.sort(dist, axis=1)[:, :3].mean(1), rtol=1e-4)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = 1 - unit(query) @ unit(ref).T
    np.testing.assert_allclose(knn_scores(ref, query, k=2), np.sort(cosine, axis=1)[:, :2].mean(1), atol=1e-5)


@pytest.fixture(scope="module")
def autoencoder():
    model = ConvAutoencoder(ConvAutoencoderConfig(widths=[4, 8], latent_dim=6, kernel=3), (8, 8, 1),
                            rngs=nnx.Rngs(0))
    model.eval()  # running statistics: features are a function of the weights only
    return model


def test_deep_svdd_loss_matches_numpy(autoencoder):
    rng = np.random.default_rng(3)
    first, second = (jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32) for _ in range(2))
    objective = DeepSVDD(DeepSVDDConfig(eps=0.1))
    z1, z2 = (np.asarray(autoencoder.features(x), np.float64) for x in (first, second))
    c = z1.mean(0)
    c = np.where(np.abs(c) < 0.1, np.where(c < 0, -0.1, 0.1), c)
    loss, _ = objective(autoencoder, {"image": first}, jax.random.key(0), step=jnp.int32(0))
    assert float(loss) == pytest.approx(((z1 - c) ** 2).sum(1).mean(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(autoencoder.center[...]), c, rtol=1e-5)
    loss, _ = objective(autoencoder, {"image": second}, jax.random.key(0), step=jnp.int32(1))  # c stays fixed
    assert float(loss) == pytest.approx(((z2 - c) ** 2).sum(1).mean(), rel=1e-5)
    task = Anomaly(AnomalyConfig(scorer="svdd"), DataInfo(num_classes=2, image_shape=(8, 8, 1)))
    out = task.eval_outputs(autoencoder, {"image": second, "label": jnp.zeros(16, jnp.int32)})
    np.testing.assert_allclose(np.asarray(out["score"]), ((z2 - c) ** 2).sum(1), rtol=1e-5)


def test_reconstruction_map_and_pixel_auroc_match_numpy(autoencoder):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
    masks = (rng.random((6, 8, 8)) < 0.2).astype(np.int32)
    recon = np.asarray(autoencoder.reconstruct(jnp.asarray(images)), np.float64)
    expected = ((recon - images) ** 2).mean(-1)
    info = DataInfo(num_classes=2, image_shape=(8, 8, 1))
    for reduce in ("mean", "max"):
        task = Anomaly(AnomalyConfig(scorer="reconstruction", map_score=reduce), info)
        out = jax.tree.map(np.asarray, task.eval_outputs(autoencoder, {"image": jnp.asarray(images),
                                                                     "mask": jnp.asarray(masks)}))
        np.testing.assert_allclose(out["map"], expected, rtol=1e-5)
        np.testing.assert_allclose(out["score"], getattr(expected.reshape(6, -1), reduce)(1), rtol=1e-5)
        assert out["label"].tolist() == masks.reshape(6, -1).any(1).astype(int).tolist()
    metrics = task.summarize({**out, "label": np.array([0, 1, 0, 1, 1, 0])})
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks.reshape(-1), expected.reshape(-1)), abs=1e-9)


def test_task_refuses_multiclass_labels():
    task = Anomaly(AnomalyConfig(scorer="svdd"), DataInfo(num_classes=10, image_shape=(8, 8, 1)))
    with pytest.raises(ConfigError, match="needs binary labels .* set dataset.one_class=K"):
        task.summarize({"label": np.arange(10), "score": np.arange(10.0)})


def test_digits_one_class_knn_on_blurred_pixels_end_to_end(tmp_path):
    """prism train ... task=anomaly on digits (normal class 3), the splits held on the devices (the stacked
    one-class subsets): AUROC in result.json equals a NumPy/SciPy/sklearn kNN on Gaussian-blurred pixels of the
    same split, and the score histogram is written."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer
    from prism.plugins.datasets.digits import split_digits

    run_dir = tmp_path / "knn"
    result = Trainer(compose(["dataset.one_class=3", "logging.progress=false", "train.batch_size=32", "model=pixels",
                              "model.blur_sigma=1.0", "task=anomaly", "task.distance=euclidean", "task.k=2",
                              "train.steps=1", "train.eval_batch_size=360", "checkpoint.best_metric=eval/auroc",
                              "checkpoint.enabled=false", "logging.render=4", "logging.plots=false",
                              "logging.tensorboard=false", "loader.placement=device"]), run_dir).fit()
    assert result["status"] == "completed"
    splits = split_digits(0.2, 0)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    blur = lambda x: gaussian_filter(x[..., 0].astype(np.float64) / 255, (0, 1.0, 1.0)).reshape(len(x), -1)  # noqa: E731
    ref, query = blur(x_train[y_train == 3]), blur(x_test)
    dist = np.sort(np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1)), axis=1)[:, :2].mean(1)
    assert result["metrics"]["eval/auroc"] == pytest.approx(roc_auc_score(y_test != 3, dist), abs=1e-4)
    assert result["metrics"]["eval/anomaly_fraction"] == pytest.approx(np.mean(y_test != 3))
    assert (run_dir / "predictions" / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_autoencoder_end_to_end(train_run, tmp_path):
    """The reconstruction scorer through a real training run: few steps, AUROC/AUPR reported, maps drawn."""
    run_dir = tmp_path / "ae"
    _, result = train_run(["dataset.one_class=0", "model=conv_autoencoder", "model.widths=[4,8]", "model.kernel=3",
                           "model.latent_dim=8", "objective=reconstruction", "task=anomaly",
                           "task.scorer=reconstruction", "train.steps=6", "train.eval_every=6",
                           "train.eval_batch_size=360", "checkpoint.best_metric=eval/auroc",
                           "checkpoint.enabled=false", "logging.render=3", "logging.plots=false",
                           "logging.tensorboard=false"], run_dir)
    assert result["status"] == "completed"
    metrics = result["metrics"]
    assert 0 <= metrics["eval/auroc"] <= 1 and 0 <= metrics["eval/aupr"] <= 1
    assert {p.name for p in (run_dir / "predictions").iterdir()} == {"score_histogram.png", "anomaly_maps.png"}
