"""The one-class protocol of anomaly detection over any classification dataset: ``dataset.one_class=K``.

The split the run trains on (``dataset.train_split``) keeps only the examples of class ``K`` (the "normal"
class), labelled 0; every other split keeps all its examples, labelled 1 ("anomaly") where the class is not
``K`` and 0 where it is (Ruff et al. 2018, Golan & El-Yaniv 2018: one task per class of CIFAR-10 or
Fashion-MNIST). ``K`` is a class index or a class name of the dataset (``dataset.one_class=sandal``).

The wrapped source keeps the dataset's metadata (``num_classes``, ``class_names``, ...; only the training split's
size changes), so a model built for the dataset, and its checkpoints, fit unchanged: ``prism eval checkpoint=RUN
task=anomaly dataset.one_class=K`` evaluates any run of that dataset. It reads each split's labels once:
from the split's stacked arrays when it offers them (:class:`~prism.framework.api.StackableSplit`, which the
device path uses anyway), else example by example; the kept examples are then served from those arrays.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from prism.framework.api import DataInfo, DataSource, StackableSplit
from prism.framework.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NORMAL, ANOMALY = 0, 1


def resolve_class(value: str | int, class_names: Sequence[str], num_classes: int) -> int:
    """The class index ``value`` names (an index, or one of ``class_names``), or a one-line ConfigError."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < num_classes:
            return index
        raise ConfigError(f"dataset.one_class={text}: class index out of range; the dataset has {num_classes} "
                          f"classes (0-{num_classes - 1}" + (f": {', '.join(class_names)})" if class_names else ")"))
    if text in class_names:
        return list(class_names).index(text)
    close = difflib.get_close_matches(text, list(class_names), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    names = f" Classes: {', '.join(class_names)}." if class_names else " The dataset names no classes: give an index."
    raise ConfigError(f"dataset.one_class={text!r}: no class of that name.{hint}{names}")


class _Subset(Sequence):
    """Examples ``indices`` of stacked arrays (or of a split), with ``label`` replaced by ``labels``."""

    def __init__(self, split: Sequence, arrays: Mapping[str, np.ndarray] | None, indices: np.ndarray,
                 labels: np.ndarray) -> None:
        self.split, self.arrays, self.indices, self.labels = split, arrays, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        source = int(self.indices[index])
        if self.arrays is not None:
            example = {k: v[source] for k, v in self.arrays.items()}
        else:
            example = {k: np.asarray(v) for k, v in self.split[source].items()}
        example["label"] = np.asarray(self.labels[index], np.int32)
        return example

    def stacked(self, *, threads: int = 2) -> dict[str, np.ndarray]:
        arrays = self.arrays if self.arrays is not None else _stack(self.split, threads)
        out = {k: v[self.indices] for k, v in arrays.items()}
        out["label"] = self.labels.astype(np.int32)
        return out


def _stack(split: Sequence, threads: int) -> dict[str, np.ndarray]:
    if isinstance(split, StackableSplit):
        return split.stacked(threads=threads)
    examples = [split[i] for i in range(len(split))]
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]} if examples else {}


class OneClassSource:
    """``source`` under the one-class protocol for class ``normal`` (see the module docstring)."""

    def __init__(self, source: DataSource, normal: str | int, *, train_split: str, threads: int = 2) -> None:
        base = source.info
        self.source, self.train_split, self.threads = source, train_split, threads
        self.normal = resolve_class(normal, base.class_names, base.num_classes)
        name = base.class_names[self.normal] if base.class_names else str(self.normal)
        self._splits: dict[str, _Subset] = {}
        train = self.split(train_split)
        if not len(train):
            raise DataError(f"dataset.one_class={normal}: the training split {train_split!r} has no example of "
                            f"class {self.normal} ({name})")
        self.normal_name = name
        self.info: DataInfo = replace(base, splits={**base.splits, train_split: len(train)})

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]:
        if name not in self._splits:
            split = self.source.split(name)
            if len(split) and "label" not in split[0]:
                raise ConfigError(f"dataset.one_class needs labelled examples; split {name!r} gives "
                                  f"{', '.join(sorted(split[0]))} (no 'label')")
            arrays = _stack(split, self.threads) if isinstance(split, StackableSplit) else None
            if arrays is not None and "label" in arrays:
                labels = np.asarray(arrays["label"]).reshape(-1)
            else:
                labels = np.asarray([int(np.asarray(split[i]["label"])) for i in range(len(split))])
            if name == self.train_split:
                indices = np.flatnonzero(labels == self.normal)
                binary = np.full(len(indices), NORMAL, np.int32)
                log.info("one-class protocol: training on class %d (%d of %d examples of split %r)", self.normal,
                         len(indices), len(labels), name)
            else:
                indices = np.arange(len(labels))
                binary = np.where(labels == self.normal, NORMAL, ANOMALY).astype(np.int32)
            self._splits[name] = _Subset(split, arrays, indices, binary)
        return self._splits[name]


def apply_one_class(source: DataSource, section: Mapping, *, threads: int = 2) -> DataSource:
    """``source`` under ``dataset.one_class`` when the ``dataset`` config ``section`` sets it (else as it is)."""
    value = section.get("one_class", "")
    if value is None or str(value).strip() == "":
        return source
    return OneClassSource(source, value, train_split=section.train_split, threads=threads)


__all__ = ["ANOMALY", "NORMAL", "OneClassSource", "apply_one_class", "resolve_class"]
