"""What every Triton kernel file shares, in one place: the interpreter switch, the tile
helpers (Triton jit functions), and the launchers' checks and helpers (device, dtype and
shape checks, 32-bit addressing, the GPU a launch runs on, TF32).

Each kernel file (:mod:`.grouped_conv`, :mod:`.grouped_conv_grad`, :mod:`.fused_root`)
holds its kernels, its launcher and its ``autograd.Function``, and reads the switches here
at call time (``_common.INTERPRET``), so that changing them here (tests, and
:func:`deeproots.kernels.resources.recorded`) reaches every kernel.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from ..errors import DeeprootsError

__all__ = ["INTERPRET", "DTYPES", "ADDRESSABLE", "tuned", "drop_configs", "config_id",
           "interpret_blocks", "pair",
           "nhwc", "output_size", "check_conv", "check_addressable", "batch_chunks",
           "on_device", "input_precision", "Pair"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels run on the CPU
# DEEPROOTS_AUTOTUNE=first: each launch compiles only the first configuration it may try (a
# correctness run on a GPU, where every configuration would cost a compile; speed runs tune)
AUTOTUNE_FIRST = os.environ.get("DEEPROOTS_AUTOTUNE") == "first"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the kernels compute element offsets in 32 bits: a launch addresses at most this many
# elements of any tensor (launchers split the batch to stay below it)
ADDRESSABLE = 2**31 - 1

Pair = Union[int, Tuple[int, int]]


def tuned(configs, key, prune=None):
    """``triton.autotune`` over ``configs`` keyed by ``key``, ``prune(configs, named_args)``
    choosing the ones a launch may try (:func:`drop_configs`); under the interpreter none
    (one block shape, given by the launcher: correctness, not speed)."""
    if INTERPRET:
        return lambda fn: fn
    if AUTOTUNE_FIRST:
        inner = prune
        prune = lambda cs, nargs, **kw: (inner(cs, nargs, **kw) if inner else cs)[:1]  # noqa: E731
    by = {"early_config_prune": prune} if prune is not None else None
    return triton.autotune(configs=configs, key=key, prune_configs_by=by)


def config_id(config: "triton.Config") -> tuple:
    """A configuration as (block sizes..., num_warps, num_stages): how the prune rules
    name one."""
    return (*config.kwargs.values(), config.num_warps, config.num_stages)


def drop_configs(rules, tensor: str = "x_ptr"):
    """A prune function for :func:`tuned`: ``rules`` are ``(applies(named_args, dtype),
    [config_id, ...])`` pairs, each dropping those configurations from the launches it
    applies to; kept, the rest. The rules are data, measured by compiling every
    configuration for sm_90 (``python benchmarks/kernel_resources.py --dtype float32``):
    a configuration that spills registers, or asks for more shared memory than a block may
    have, is dropped where it does."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = getattr(args.get(tensor), "dtype", None)
        dropped = {cid for applies, ids in rules if applies(args, dtype) for cid in ids}
        kept = [c for c in configs if config_id(c) not in dropped]
        return kept or list(configs)
    return prune


def interpret_blocks(maximum: Dict[str, int], **dims: int) -> Dict[str, int]:
    """The block shape the interpreter runs: each block no larger than ``maximum`` and no
    larger than the next power of two of its dimension (at least 16, as ``tl.dot`` needs),
    so that a small problem is a few small tiles: the interpreter's cost is per operation
    and per element."""
    return {name: max(16, min(size, triton.next_power_of_2(max(1, dims.get(name, size)))))
            for name, size in maximum.items()}


def pair(name: str, value: Pair, minimum: int) -> Tuple[int, int]:
    """``value`` as (height, width); a one-line error unless whole numbers >= ``minimum``."""
    both = (value, value) if isinstance(value, int) else tuple(value)
    if len(both) != 2 or not all(isinstance(v, int) and v >= minimum for v in both):
        raise DeeprootsError(f"{name} must be a whole number >= {minimum} or a pair of them; "
                             f"got {value!r}")
    return both


def nhwc(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """The strides of a 4-d tensor in (N, H, W, C) order, whatever its memory format."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def output_size(h: int, w: int, kh: int, kw: int, stride: Tuple[int, int],
                padding: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """The output's height and width of a conv; a one-line error when there is none."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise DeeprootsError(f"a {kh}x{kw} kernel (dilation {dh},{dw}, padding {ph},{pw}) "
                             f"leaves no output on a {h}x{w} input")
    return oh, ow


def check_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               groups: int) -> None:
    """A one-line error unless the Triton kernels take these tensors: CUDA (or the CPU
    under TRITON_INTERPRET=1), bf16, fp16 or fp32 alike, 4-d, channels that ``groups``
    divide, and one image of at most :data:`ADDRESSABLE` elements."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or weight.dim() != 4:
        raise DeeprootsError(f"grouped_conv2d takes a 4-d input (N, C, H, W) and a 4-d "
                             f"weight; got {tuple(getattr(x, 'shape', ()))} and "
                             f"{tuple(weight.shape)}")
    if x.device.type != "cuda" and not INTERPRET:
        raise DeeprootsError(f"the Triton conv runs on CUDA GPUs; got an input on {x.device} "
                             f"(set TRITON_INTERPRET=1 to run it, slowly, on the CPU)")
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (
            bias is not None and bias.dtype != x.dtype):
        raise DeeprootsError(f"the Triton conv takes bfloat16, float16 or float32, the same "
                             f"for input, weight and bias; got {x.dtype}, {weight.dtype}"
                             f"{', ' + str(bias.dtype) if bias is not None else ''}")
    c, cout = x.shape[1], weight.shape[0]
    if groups < 1 or c % groups or cout % groups or weight.shape[1] * groups != c:
        raise DeeprootsError(f"groups {groups} must divide the {c} input and {cout} output "
                             f"channels, with weight of shape (Cout, C / groups, KH, KW); "
                             f"got weight {tuple(weight.shape)}")
    check_addressable("input", x)


def check_addressable(name: str, t: torch.Tensor) -> None:
    """A one-line error if one image of ``t`` spans more elements than the kernels' 32-bit
    offsets address (a batch of many images is split by the launchers instead)."""
    one = _span(t[:1]) if t.dim() and t.shape[0] else 0
    if one > ADDRESSABLE:
        raise DeeprootsError(f"one image of the {name} spans {one:,} elements (shape "
                             f"{tuple(t.shape)}); the Triton kernels address at most "
                             f"{ADDRESSABLE:,} (32-bit offsets): use the native conv "
                             f"(--grouped-conv native) for images this large")


def _span(t: torch.Tensor) -> int:
    """How many elements ``t``'s offsets reach: 1 + the largest offset of any element."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def batch_chunks(n: int, tensors: Sequence[Optional[torch.Tensor]]) -> List[Tuple[int, int]]:
    """``(start, stop)`` slices of the batch (dimension 0 of every tensor in ``tensors``)
    such that no slice of any of them spans more than :data:`ADDRESSABLE` elements: each
    launch then computes its offsets in 32 bits. One slice for all but huge batches."""
    images = n
    for t in tensors:
        if t is None or t.shape[0] < 2 or _span(t) <= ADDRESSABLE:
            continue
        check_addressable("tensor", t)
        images = min(images, 1 + (ADDRESSABLE - _span(t[:1])) // t.stride(0))
    return [(i, min(n, i + images)) for i in range(0, n, max(1, images))]


def on_device(t: torch.Tensor):
    """The context a launch runs in: the tensor's own GPU (and that GPU's current stream),
    not the process's current device; nothing on the CPU (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def input_precision(dtype: torch.dtype) -> str:
    """How ``tl.dot`` multiplies ``dtype`` tiles: fp32 as TF32 on tensor cores only when the
    user allows TF32 for convolutions (``torch.backends.cudnn.allow_tf32``, True by default,
    as cuDNN's convs then use it too), else full fp32 (``"ieee"``); bf16 and fp16 as they
    are."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


# ---------------------------------------------------------------------------------------------
# Tile helpers, shared by the kernels


@triton.jit
def _pixel(offs, H, W):
    """Flat pixel indices over N x H x W -> (image, row, column)."""
    return offs // (H * W), (offs % (H * W)) // W, offs % W


@triton.jit
def _relu(h):
    """ReLU that keeps NaN, as ``torch.relu`` does (``tl.maximum`` would make it 0 and hide a
    diverging model from the non-finite-loss check)."""
    return tl.where(h < 0, 0.0, h)


@triton.jit
def _gemm_tile(x_ptr, w_ptr, n, oh, ow, mask_m, out_ch, mask_n, g, H, W,
               sxn, sxh, sxw, sxc, swo, swc, swh, sww,
               CIN_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
               KH: tl.constexpr, KW: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The conv of group ``g`` for BLOCK_M output pixels (image n, row oh, column ow) x
    BLOCK_N output channels ``out_ch``: an implicit GEMM over the kernel taps and the group's
    input channels, in fp32, no bias."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one loop over (tap, channel block), not the taps unrolled: unrolled, a 5x5 kernel
    # spilled registers on sm_90 (benchmarks/kernel_resources.py), and one flat loop is
    # what the software pipeliner overlaps
    k_steps = tl.cdiv(CIN_G, BLOCK_K)
    for step in range(0, KH * KW * k_steps):
        tap = step // k_steps
        kh = tap // KW
        kw = tap % KW
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_k = (step % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CIN_G
        a = tl.load((x_ptr + n * sxn + ih * sxh + iw * sxw + g * CIN_G * sxc)[:, None]
                    + offs_k[None, :] * sxc, mask=inside[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + out_ch[None, :] * swo + offs_k[:, None] * swc
                    + kh * swh + kw * sww,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter has no bf16 matrix multiply
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _direct_tile(x_ptr, w_ptr, n, oh, ow, mask_p, out_ch, mask_c, H, W,
                 sxn, sxh, sxw, sxc, swo, swc, swh, sww,
                 CIN_G, COUT_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                 KH: tl.constexpr, KW: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv for BLOCK_P output pixels x BLOCK_C output channels ``out_ch`` (of any
    groups): a fused multiply-add per input channel of the group and kernel tap, in fp32,
    no bias. For depthwise and narrow groups, where a matrix multiply would waste its tile."""
    group = out_ch // COUT_G
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for ci in range(0, CIN_G):
        in_ch = group * CIN_G + ci
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * STRIDE_H - PAD_H + kh * DIL_H
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                inside = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None]
                             + in_ch[None, :] * sxc,
                             mask=inside[:, None] & mask_c[None, :], other=0.0)
                wv = tl.load(w_ptr + out_ch * swo + ci * swc + kh * swh + kw * sww,
                             mask=mask_c, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc
