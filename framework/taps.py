"""Named intermediate activations: what a model marks in its forward pass so that explainers can read them and
differentiate the output with respect to them (Grad-CAM on a layer, attention rollout).

A model calls :func:`tap` on a value it wants to expose (``x = tap("stage4", x)``) and lists the names it taps
(:class:`prism.framework.api.TappedModel`). Outside a :class:`Capture`, ``tap`` returns its argument untouched:
it runs while the program is traced, so the compiled training and evaluation programs are the very ones without
it. Inside ``with Capture(names, perturb) as seen:`` the tapped values of ``names`` are kept in ``seen.values``
(tracers of the program being traced) and ``perturb[name]`` (zeros of the value's shape) is added to them, so
the gradient with respect to the perturbation is the gradient with respect to the activation
(:func:`activation_and_gradient`). Each name is expected once per forward pass (the last call wins).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from prism.framework.errors import ConfigError

_active: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("prism_tap_capture", default=None)


class Capture:
    """Collects the tapped values of ``names`` (and adds ``perturb[name]`` to them) while it is entered."""

    def __init__(self, names: Iterable[str], perturb: Mapping[str, jax.Array] | None = None) -> None:
        self.names = frozenset(names)
        self.perturb = dict(perturb or {})
        self.values: dict[str, jax.Array] = {}
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Capture:
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)

    def record(self, name: str, value: jax.Array) -> jax.Array:
        self.values[name] = value
        delta = self.perturb.get(name)
        return value if delta is None else value + delta.astype(value.dtype)


def wanted(name: str) -> bool:
    """Whether a :class:`Capture` collects ``name`` now (a model may then compute what it otherwise skips, the
    attention weights a fused kernel never materializes)."""
    capture = _active.get()
    return capture is not None and name in capture.names


def tap(name: str, value: jax.Array) -> jax.Array:
    """Mark ``value`` as the activation ``name``: returned as it is unless a :class:`Capture` collects it."""
    capture = _active.get()
    if capture is None or name not in capture.names:
        return value
    return capture.record(name, value)


def tap_grid_tokens(name: str, tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Tap the patch tokens of ``tokens`` (batch, extra + height * width, dim), row-major after ``extra`` leading
    tokens (a class token), as a map (batch, height, width, dim); returns the tokens with the tapped map put back."""
    if not wanted(name):
        return tokens
    b, n, d = tokens.shape
    extra = n - height * width
    grid = tap(name, tokens[:, extra:].reshape(b, height, width, d))
    return jnp.concatenate([tokens[:, :extra], grid.reshape(b, height * width, d).astype(tokens.dtype)], axis=1)


def captured(forward: Callable[[], jax.Array], names: Iterable[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(forward(), {name: tapped value})`` for the ``names`` that ``forward`` taps."""
    with Capture(names) as seen:
        out = forward()
    return out, dict(seen.values)


def activation_and_gradient(score: Callable[[], jax.Array], name: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(scores, activation, d sum(scores) / d activation)`` of the tap ``name``; ``score()`` gives one scalar per
    example (batch,), each depending only on its own example (a model in evaluation mode), so the gradient of the
    sum is each example's own."""

    def run(delta: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        with Capture([name], None if delta is None else {name: delta}) as seen:
            scores = score()
        if name not in seen.values:
            raise ConfigError(f"layer {name!r} was not tapped in the model's forward pass (it declares it in "
                              f"tap_layers but never calls tap({name!r}, ...))")
        return scores.sum(), (seen.values[name], scores)

    shape = jax.eval_shape(lambda: run(None)[1][0])
    grad, (activation, scores) = jax.grad(run, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    return scores, activation, grad


def choose_layer(model, layer: str | None, *, key: str = "layer") -> str:
    """The tap ``layer`` of ``model`` (None or '': its default, the last of ``tap_layers``); an unknown one is a
    ConfigError naming the valid layers and the closest ones."""
    import difflib

    layers = tuple(getattr(model, "tap_layers", ()) or ())
    if not layers:
        raise ConfigError(f"model {type(model).__name__} taps no layers (it has no tap_layers)")
    if not layer:
        return layers[-1]
    if layer in layers:
        return layer
    close = difflib.get_close_matches(layer, layers, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown {key} {layer!r} of model {type(model).__name__}.{hint} Layers: {', '.join(layers)}")
