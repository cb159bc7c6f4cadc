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
as TF32 on tensor cores as cuDNN's convolutions do, unless TF32 is turned off with
``torch.backends.cudnn.allow_tf32 = False``: then in full fp32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import Pair, _direct_tile, _gemm_tile, _pixel, output_size, tuned

check_conv = C.check_conv  # the launchers call C.check_conv: one switch for every kernel

__all__ = ["grouped_conv2d", "GroupedConv2dFunction", "check_conv", "output_size",
           "GEMM_CONFIGS", "DEPTHWISE_CONFIGS"]

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
FP32 = lambda args, dtype: dtype == torch.float32  # noqa: E731
# configurations that spill registers on sm_90 in fp32 (not in bf16 or fp16), dropped there
# (python benchmarks/kernel_resources.py --dtype float32: 3208 and 8 bytes of stack)
GEMM_PRUNE = C.drop_configs([(FP32, [(64, 32, 16, 2, 4)])])
DEPTHWISE_PRUNE = C.drop_configs([(FP32, [(32, 128, 4, 3)])])
# the interpreter runs one block shape, at most these and shrunk to the problem
# (_common.interpret_blocks): correctness, not speed
INTERPRET_GEMM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
INTERPRET_DEPTHWISE = {"BLOCK_P": 128, "BLOCK_C": 128}
# what changes the best block shape: the group's shape, the kernel, the pixels (bucketed),
# the spatial size, stride, padding, dilation and the input's layout (its channel stride)
KEY = ["CIN_G", "COUT_G", "KH", "KW", "M_BUCKET", "H", "W", "STRIDE_H", "STRIDE_W", "PAD_H",
       "PAD_W", "DIL_H", "DIL_W", "sxc"]


@tuned(GEMM_CONFIGS, key=KEY, prune=GEMM_PRUNE)
@triton.jit
def _conv_gemm(x_ptr, w_ptr, b_ptr, y_ptr,
               H, W, OH, OW, M,
               sxn, sxh, sxw, sxc, swo, swc, swh, sww, syn, syh, syw, syc,
               CIN_G: tl.constexpr, COUT_G: tl.constexpr,
               STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
               KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
                     KH, KW, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_ch, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + n[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw + out_ch[None, :] * syc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@tuned(DEPTHWISE_CONFIGS, key=KEY + ["C_OUT"], prune=DEPTHWISE_PRUNE)
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


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1,
                   groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with zero padding, forward, in Triton; the output is channels-last. Runs
    on ``x``'s own GPU; a batch too large for 32-bit offsets runs in slices."""
    C.check_conv(x, weight, bias, groups)
    sh, sw = C.pair("stride", stride, 1)
    ph, pw = C.pair("padding", padding, 0)
    dh, dw = C.pair("dilation", dilation, 1)
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    oh, ow = output_size(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    y = torch.empty((n, cout, oh, ow), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    with C.on_device(x):
        for start, stop in C.batch_chunks(n, (x, y)):
            _launch(x[start:stop], weight, bias, y[start:stop], (sh, sw), (ph, pw), (dh, dw),
                    groups)
    return y


def _launch(x, weight, bias, y, stride, padding, dilation, groups) -> None:
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    cout_g = cout // groups
    args = (x, weight, bias if bias is not None else weight, y, h, w, oh, ow, m)
    strides = (*C.nhwc(x), *weight.stride(), *C.nhwc(y))
    conv = (cin_g, cout_g, *stride, *padding, *dilation, triton.next_power_of_2(m))
    if cin_g >= 4:
        extra = C.interpret_blocks(INTERPRET_GEMM, BLOCK_M=m, BLOCK_N=cout_g,
                                   BLOCK_K=cin_g) if C.INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout_g, meta["BLOCK_N"]),
                    groups)

        _conv_gemm[grid](*args, *strides, *conv, KH=kh, KW=kw, HAS_BIAS=bias is not None,
                         UPCAST=C.INTERPRET and x.dtype == torch.bfloat16,
                         PRECISION=C.input_precision(x.dtype), **extra)
    else:
        extra = C.interpret_blocks(INTERPRET_DEPTHWISE, BLOCK_P=m, BLOCK_C=cout) \
            if C.INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_C"]))

        _conv_depthwise[grid](*args, cout, *strides, *conv, KH=kh, KW=kw,
                              HAS_BIAS=bias is not None, **extra)


class GroupedConv2dFunction(torch.autograd.Function):
    """The Triton conv with its Triton backward (:mod:`.grouped_conv_grad`): input gradient,
    weight gradient, and the bias gradient as a sum over the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (C.pair("stride", stride, 1), C.pair("padding", padding, 0),
                    C.pair("dilation", dilation, 1), groups)
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
