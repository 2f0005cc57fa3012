"""A ``lax.conv_general_dilated`` drop-in whose weight gradient is a patches + matmul on CPU.

XLA's CPU backend computes the forward convolution and its input gradient at about matmul speed, but
the weight gradient (a convolution whose "kernel" is the whole output image) runs an order of
magnitude slower: it made a CIFAR ResNet-18 train step several times slower than PyTorch on CPU.
:func:`conv_general_dilated` keeps XLA's forward pass and input gradient and computes the weight
gradient as ``patches(x)^T @ dy`` (image patches, im2col, times the output gradient): per chunk of
images, one matmul per kernel tap.

Memory: the patches of a conv input are ``kh * kw`` times its size; they are taken for ``chunk`` images
at a time inside a loop (at most :data:`CHUNK_BYTES` of patches per chunk, and at least one image), so
the extra memory is bounded by ``max(CHUNK_BYTES, one image's patches)`` whatever the batch size. Small
chunks also keep the windows in cache, which is most of the speed.

Which path runs is chosen when a function is traced, from the ``PRISM_CONV`` environment variable:
``auto`` (default: this path on the CPU backend for convs of at least :data:`MIN_FLOPS`, plain
``lax.conv_general_dilated`` elsewhere),
``xla`` (always ``lax.conv_general_dilated``) or ``matmul`` (this path on every backend). Layouts
other than NHWC/HWIO/NHWC, input (transposed-conv) dilation and batch groups always use
``lax.conv_general_dilated``; so do grouped convs (depthwise) under ``auto``: there the matmul path
(one batched matmul per tap) measured only 0.7-0.9x of XLA's time, not enough to make it the default.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from prism.framework.errors import ConfigError

#: Environment variable choosing the convolution path: ``auto``, ``xla`` or ``matmul``.
ENV = "PRISM_CONV"
MODES = ("auto", "xla", "matmul")
#: Bytes of image patches built per chunk in the weight gradient (at least one image's).
CHUNK_BYTES = 8 * 2**20
#: ``auto`` takes the matmul path for convs of at least this many forward FLOPs. Below it the weight
#: gradient is cheap either way and XLA's own compiles faster (the matmul path compiled a small ResNet's
#: train step ~1.5x slower), which is what CI's tiny models need; every conv of a CIFAR ResNet-18 at
#: batch >= 32 is above it.
MIN_FLOPS = 1e8

_NHWC = ("NHWC", "HWIO", "NHWC")
_forced: list[str] = []


def _check(value: str, where: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(MODES)}")
    return value


def mode() -> str:
    """The path in force: the innermost :func:`forced` mode, else ``PRISM_CONV`` (``auto`` when unset)."""
    if _forced:
        return _forced[-1]
    return _check(os.environ.get(ENV, "auto"), ENV)


@contextlib.contextmanager
def forced(value: str) -> Iterator[None]:
    """Use ``value`` (``auto``, ``xla`` or ``matmul``) for the functions traced inside the block.

    The choice is made at trace time: a function jitted and traced before keeps the path it was traced with."""
    _forced.append(_check(value, "conv mode"))
    try:
        yield
    finally:
        _forced.pop()


def _use_matmul(groups: int, flops: float) -> bool:
    m = mode()
    if m == "xla":
        return False
    if m == "matmul":
        return True
    return jax.default_backend() == "cpu" and groups == 1 and flops >= MIN_FLOPS


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, **kwargs) -> jax.Array:
    """Same signature and result as :func:`jax.lax.conv_general_dilated` (flax's ``nnx.Conv`` takes it as
    its ``conv_general_dilated`` argument); 2-D NHWC/HWIO convs get the matmul weight gradient when
    :func:`mode` asks for it (see the module docstring)."""
    lax_conv = partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                       lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                       feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                       precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    supported = (lhs.ndim == 4 and rhs.ndim == 4 and batch_group_count == 1 and preferred_element_type is None
                 and all(v is None for v in kwargs.values())
                 and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
                 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                 == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not supported or mode() == "xla":
        return lax_conv(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    dilation = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    out_hw = [(size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in zip(lhs.shape[1:3], pads, dilated, strides,
                                                                            strict=True)]
    flops = 2.0 * lhs.shape[0] * math.prod(out_hw) * math.prod(rhs.shape)
    if not _use_matmul(int(feature_group_count), flops):
        return lax_conv(lhs, rhs)
    return _conv(lhs, rhs, strides, pads, dilation, int(feature_group_count), precision)


def _xla(x, w, strides, pads, dilation, groups, precision):
    return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=_NHWC,
                                    feature_group_count=groups, precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, w, strides, pads, dilation, groups, precision):
    return _xla(x, w, strides, pads, dilation, groups, precision)


def _conv_fwd(x, w, strides, pads, dilation, groups, precision):
    return _xla(x, w, strides, pads, dilation, groups, precision), (x, w)


def _conv_bwd(strides, pads, dilation, groups, precision, res, g):
    x, w = res
    _, input_vjp = jax.vjp(lambda a: _xla(a, w, strides, pads, dilation, groups, precision), x)
    (dx,) = input_vjp(g)
    dw = weight_grad(x, g, w.shape, strides, pads, dilation, groups, precision).astype(w.dtype)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def tap_slices(x: jax.Array, kernel: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
               pads: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> list[jax.Array]:
    """The ``KH * KW`` strided windows of padded NHWC ``x`` that kernel taps meet, each ``(N, OH, OW, C)``,
    in HWIO kernel order: stacked on a new axis 3 they are the image patches (im2col) of ``x``."""
    kh, kw = kernel
    (oh, ow), (sh, sw), (dh, dw) = out_hw, strides, dilation
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    return [lax.slice(xp, (0, i * dh, j * dw, 0), (xp.shape[0], i * dh + (oh - 1) * sh + 1,
                                                   j * dw + (ow - 1) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def weight_grad(x: jax.Array, g: jax.Array, w_shape: tuple[int, ...], strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...], dilation: tuple[int, int], groups: int = 1,
                precision=None) -> jax.Array:
    """Gradient of a NHWC/HWIO conv w.r.t. its kernel, given input ``x`` and output gradient ``g``:
    ``patches(x)^T @ g`` summed over (n, oh, ow), over chunks of images (float32 accumulation).

    Each kernel tap is one matmul of its input window with ``g`` (the same products as one im2col matmul,
    without building the patch matrix, which XLA's CPU backend is slow to compile and to fill)."""
    kh, kw, cg, o = w_shape
    n, oh, ow = g.shape[:3]
    og = o // groups
    acc_dtype = jnp.promote_types(g.dtype, jnp.float32)

    def chunk_grad(xc: jax.Array, gc: jax.Array) -> jax.Array:  # -> (taps, groups, cg, og)
        windows = tap_slices(xc, (kh, kw), (oh, ow), strides, pads, dilation)
        if groups == 1:  # (n, oh, ow, cg) . (n, oh, ow, o) -> (cg, o)
            return jnp.stack([lax.dot_general(t, gc, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision,
                                              preferred_element_type=acc_dtype) for t in windows])[:, None]
        # (n, oh, ow, groups, cg) . (n, oh, ow, groups, og) -> (groups, cg, og)
        gc = gc.reshape(*gc.shape[:3], groups, og)
        dims = (((0, 1, 2), (0, 1, 2)), ((3,), (3,)))
        return jnp.stack([lax.dot_general(t.reshape(*t.shape[:3], groups, cg), gc, dims, precision=precision,
                                          preferred_element_type=acc_dtype) for t in windows])

    per_image = oh * ow * kh * kw * x.shape[3] * x.dtype.itemsize
    chunk = max(1, min(n, CHUNK_BYTES // per_image))
    if chunk >= n:
        dw = chunk_grad(x, g)
    else:
        # Images k, k + steps, k + 2 * steps, ... form chunk k: a batch sharded over devices stays
        # sharded along the chunk's own batch axis. Zero images added to fill the last chunk add nothing.
        steps = math.ceil(n / chunk)
        extra = steps * chunk - n
        if extra:
            x = jnp.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0)))
            g = jnp.pad(g, ((0, extra), (0, 0), (0, 0), (0, 0)))
        xs = x.reshape(chunk, steps, *x.shape[1:])
        gs = g.reshape(chunk, steps, *g.shape[1:])

        def body(k, acc):
            xc = lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
            gc = lax.dynamic_index_in_dim(gs, k, axis=1, keepdims=False)
            return acc + chunk_grad(xc, gc)

        dw = lax.fori_loop(0, steps, body, jnp.zeros((kh * kw, groups, cg, og), acc_dtype))
    # (taps, groups, cg, og) -> HWIO (kh, kw, cg, groups * og)
    return dw.transpose(0, 2, 1, 3).reshape(kh, kw, cg, o)
