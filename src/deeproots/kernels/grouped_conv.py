"""Grouped and depthwise conv2d forward for CUDA in Triton, channels-last.

Two kernels, chosen by the shape:

* ``_conv_gemm``: an implicit GEMM per filter group. Program (m, n, g) computes a tile of
  BLOCK_M output pixels x BLOCK_N output channels of group g, looping over the kernel
  window and the group's input channels in BLOCK_K steps; the input tile is gathered from
  the NHWC tensor (contiguous along channels), the weights from [Cout, Cin/g, KH, KW];
  products accumulate in fp32 on the tensor cores (``tl.dot``). Used when a group has at
  least 4 input channels.
* ``_conv_depthwise``: one or a few input channels per group (depthwise and near-depthwise
  convs), where a matrix multiply would waste its tile: BLOCK_P pixels x BLOCK_C channels,
  a fused multiply-add per kernel tap, loads contiguous along channels.

Both add the bias and write the output in the input's dtype (bf16, fp16 or fp32; fp32 runs
as TF32 on tensor cores, as cuDNN does by default for convolutions).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = ["grouped_conv2d", "GroupedConv2dFunction", "check_conv", "DTYPES", "INTERPRET"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels run on the CPU

# block shapes per kernel, listed as data; on a GPU the autotuner measures them per shape.
# 128-row tiles take 8 warps: with 4, the gathered input tile's addresses spilled registers
# on sm_90 (benchmarks/kernel_resources.py; tests/test_kernels.py checks none spills)
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
DEPTHWISE_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 256, "BLOCK_C": 16}, num_warps=8),
]
# the interpreter runs one small configuration: correctness, not speed
INTERPRET_GEMM = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128}
INTERPRET_DEPTHWISE = {"BLOCK_P": 32, "BLOCK_C": 128}


def _tuned(configs, key):
    return (lambda fn: fn) if INTERPRET else triton.autotune(configs=configs, key=key)


@triton.jit
def _pixel(offs, H, W):
    """Flat pixel indices over N x H x W -> (image, row, column)."""
    return offs // (H * W), (offs % (H * W)) // W, offs % W


@triton.jit
def _gemm_tile(x_ptr, w_ptr, n, oh, ow, mask_m, out_ch, mask_n, g, H, W,
               sxn, sxh, sxw, sxc, swo, swc, swh, sww,
               CIN_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
               KH: tl.constexpr, KW: tl.constexpr, UPCAST: tl.constexpr,
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
        acc += tl.dot(a, b)
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


@_tuned(GEMM_CONFIGS, key=["CIN_G", "COUT_G", "KH", "KW", "M_BUCKET"])
@triton.jit
def _conv_gemm(x_ptr, w_ptr, b_ptr, y_ptr,
               H, W, OH, OW, M,
               sxn, sxh, sxw, sxc, swo, swc, swh, sww, syn, syh, syw, syc,
               CIN_G: tl.constexpr, COUT_G: tl.constexpr,
               STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
               KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
               UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels, over N x OH x OW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    mask_m = offs_m < M
    mask_n = offs_n < COUT_G
    n, oh, ow = _pixel(offs_m, OH, OW)
    out_ch = g * COUT_G + offs_n
    acc = _gemm_tile(x_ptr, w_ptr, n, oh, ow, mask_m, out_ch, mask_n, g, H, W,
                     sxn, sxh, sxw, sxc, swo, swc, swh, sww,
                     CIN_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                     KH, KW, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_ch, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + n[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw + out_ch[None, :] * syc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_tuned(DEPTHWISE_CONFIGS, key=["CIN_G", "COUT_G", "KH", "KW", "C_OUT", "M_BUCKET"])
@triton.jit
def _conv_depthwise(x_ptr, w_ptr, b_ptr, y_ptr,
                    H, W, OH, OW, M, C_OUT,
                    sxn, sxh, sxw, sxc, swo, swc, swh, sww, syn, syh, syw, syc,
                    CIN_G: tl.constexpr, COUT_G: tl.constexpr,
                    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels
    mask_p = offs_p < M
    mask_c = offs_c < C_OUT
    n, oh, ow = _pixel(offs_p, OH, OW)
    acc = _direct_tile(x_ptr, w_ptr, n, oh, ow, mask_p, offs_c, mask_c, H, W,
                       sxn, sxh, sxw, sxc, swo, swc, swh, sww,
                       CIN_G, COUT_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                       KH, KW, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


Pair = Union[int, Tuple[int, int]]


def _pair(name: str, value: Pair, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be a whole number >= {minimum} or a pair of them; got "
                         f"{value!r}")
    return pair


def check_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               groups: int) -> None:
    """A one-line ValueError unless the Triton kernels take these tensors: CUDA (or the CPU
    under TRITON_INTERPRET=1), bf16, fp16 or fp32 alike, 4-d, channels that ``groups``
    divide."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"grouped_conv2d takes a 4-d input (N, C, H, W) and a 4-d weight; got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(weight.shape)}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton conv runs on CUDA GPUs; got an input on {x.device} "
                         f"(set TRITON_INTERPRET=1 to run it, slowly, on the CPU)")
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (
            bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"the Triton conv takes bfloat16, float16 or float32, the same for "
                         f"input, weight and bias; got {x.dtype}, {weight.dtype}"
                         f"{', ' + str(bias.dtype) if bias is not None else ''}")
    c, cout = x.shape[1], weight.shape[0]
    if groups < 1 or c % groups or cout % groups or weight.shape[1] * groups != c:
        raise ValueError(f"groups {groups} must divide the {c} input and {cout} output "
                         f"channels, with weight of shape (Cout, C / groups, KH, KW); got "
                         f"weight {tuple(weight.shape)}")


def output_size(h: int, w: int, kh: int, kw: int, stride: Tuple[int, int],
                padding: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """The output's height and width of a conv; a one-line ValueError when there is none."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} kernel (dilation {dh},{dw}, padding {ph},{pw}) leaves no "
                         f"output on a {h}x{w} input")
    return oh, ow


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1,
                   groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with zero padding, forward, in Triton; the output is channels-last."""
    check_conv(x, weight, bias, groups)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    oh, ow = output_size(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    y = torch.empty((n, cout, oh, ow), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    m = n * oh * ow
    cout_g = cout // groups
    args = (x, weight, bias if bias is not None else weight, y, h, w, oh, ow, m)
    nhwc = lambda t: (t.stride(0), t.stride(2), t.stride(3), t.stride(1))  # noqa: E731
    strides = (*nhwc(x), *weight.stride(), *nhwc(y))
    conv = (cin_g, cout_g, sh, sw, ph, pw, dh, dw, triton.next_power_of_2(m))
    if cin_g >= 4:
        extra = dict(INTERPRET_GEMM) if INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout_g, meta["BLOCK_N"]),
                    groups)

        _conv_gemm[grid](*args, *strides, *conv, KH=kh, KW=kw, HAS_BIAS=bias is not None,
                         UPCAST=INTERPRET and x.dtype == torch.bfloat16, **extra)
    else:
        extra = dict(INTERPRET_DEPTHWISE) if INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_C"]))

        _conv_depthwise[grid](*args, cout, *strides, *conv, KH=kh, KW=kw,
                              HAS_BIAS=bias is not None, **extra)
    return y


class GroupedConv2dFunction(torch.autograd.Function):
    """The Triton conv with its Triton backward (:mod:`.grouped_conv_grad`): input gradient,
    weight gradient, and the bias gradient as a sum over the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (_pair("stride", stride, 1), _pair("padding", padding, 0),
                    _pair("dilation", dilation, 1), groups)
        return grouped_conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from .grouped_conv_grad import conv2d_input_grad, conv2d_weight_grad

        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = conv2d_input_grad(grad, weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = conv2d_weight_grad(x, grad, weight.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
        return gx, gw, gb, None, None, None, None
