"""A root module in one Triton kernel, for inference on CUDA: a grouped conv, its bias and
ReLU, then the 1x1 conv that mixes the groups (its bias, and optionally a residual add and a
ReLU after it), with the grouped conv's output kept on chip.

Unfused, the grouped conv writes its output to memory and the 1x1 conv reads it back: on a
GPU these layers are memory-bound (``deeproots roofline``), so that round trip is a large
part of a root block's time. Here program (m, n) computes BLOCK_M output pixels x BLOCK_N
output channels of the 1x1 conv. It walks the intermediate channels STEP at a time: each
step computes the grouped conv for those channels and the program's pixels in registers
(fp32), adds the bias, applies ReLU, rounds to the output dtype (as the unfused layer would
store it) and multiplies into the 1x1 conv's accumulator on the tensor cores (``tl.dot``).

Two ways to compute a step of the grouped conv, chosen by the group width:

* GEMM (>= ``GEMM_MIN_CHANNELS`` input and output channels per group): one group per step,
  an implicit GEMM over the kernel taps and the group's input channels;
* direct (depthwise and narrow groups): BLOCK_J intermediate channels per step, spanning
  several groups, a fused multiply-add per input channel and tap.

When the 1x1 conv has more output channels than one BLOCK_N tile, each tile recomputes the
grouped conv for its pixels: extra multiply-adds traded for bytes not moved (the autotuner
picks the tile). Inference only: there is no backward pass (the module that uses it runs
the parts separately when a gradient is wanted).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import DeeprootsError
from . import _common as C
from ._common import Pair, _direct_tile, _gemm_tile, _pixel, _relu, output_size

__all__ = ["fused_root_conv", "check_root", "GEMM_MIN_CHANNELS", "MAX_GROUP_CHANNELS"]

GEMM_MIN_CHANNELS = 8  # per group, in and out: narrower groups use the direct way
MAX_GROUP_CHANNELS = 256  # output channels per group the GEMM way holds on chip
DIRECT_STEP = 32  # intermediate channels per step the direct way

# block shapes as data, per way of computing the grouped conv. Pruned by what sm_90 compiles
# them to (benchmarks/kernel_resources.py, triton 3.9 and 3.6): BLOCK_M 32 gets no wgmma;
# 128 x 128 x 8 warps and 64 x 128 x 4 warps spilled at NiN's 5x5 block; the direct way's
# unrolled taps, pipelined 3 deep, asked for up to 232 KB of shared memory (more than a
# block may have), so it pipelines 1 or 2 deep
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
DIRECT_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
]
# which configurations a launch may try, measured by compiling each for sm_90 (python
# benchmarks/kernel_resources.py, --dtype float32 too): in fp32 the first three direct ones
# spill (216-448 bytes) and so do three GEMM ones on an ungrouped 256-channel group
# (ResNet-50's layer3 block; one asks for 321 KB of shared memory, the limit is 227); the
# last two of each list are there for fp32, and spilled nowhere
_FP32 = lambda args, dtype: dtype == torch.float32  # noqa: E731
_HALF = lambda args, dtype: dtype != torch.float32  # noqa: E731
_WIDE = lambda args, dtype: dtype == torch.float32 and args["COUT_G"] > 128  # noqa: E731
GEMM_PRUNE = C.drop_configs([
    (_HALF, [(64, 64, 32, 8, 3)]),
    (_WIDE, [(64, 256, 32, 8, 3), (128, 64, 16, 8, 4), (64, 64, 32, 4, 3)])])
DIRECT_PRUNE = C.drop_configs([
    (_HALF, [(64, 128, 16, 8, 1), (64, 64, 16, 8, 2)]),
    (_FP32, [(64, 128, 16, 4, 1), (64, 256, 16, 8, 1), (128, 128, 16, 8, 2)])])
# the interpreter's block shape, at most this and shrunk to the problem: correctness, not speed
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}
# what changes the best block shape: the block's shapes, the pixels (bucketed), the spatial
# size, stride, padding, dilation, the input's layout (channel stride), and whether a
# residual is added and a ReLU follows
KEY = ["CIN_G", "COUT_G", "C2", "C3", "KH", "KW", "M_BUCKET", "H", "W", "STRIDE_H",
       "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "sxc", "HAS_RES", "RELU_OUT"]


@triton.jit
def _root_block(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, r_ptr, y_ptr,
                H, W, OH, OW, M,
                sxn, sxh, sxw, sxc, s1o, s1c, s1h, s1w, s2o, s2c,
                srn, srh, srw, src, syn, syh, syw, syc,
                CIN_G: tl.constexpr, COUT_G: tl.constexpr, C2: tl.constexpr,
                C3: tl.constexpr, STEP: tl.constexpr,
                STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                KH: tl.constexpr, KW: tl.constexpr, DIRECT: tl.constexpr,
                HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr,
                RELU_OUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_J: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels, over N x OH x OW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels of the 1x1 conv
    mask_m = offs_m < M
    mask_n = offs_n < C3
    n, oh, ow = _pixel(offs_m, OH, OW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, C2, STEP):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # intermediate channels of this step
        mask_j = (tl.arange(0, BLOCK_J) < STEP) & (offs_j < C2)
        if DIRECT:
            h = _direct_tile(x_ptr, w1_ptr, n, oh, ow, mask_m, offs_j, mask_j, H, W,
                             sxn, sxh, sxw, sxc, s1o, s1c, s1h, s1w,
                             CIN_G, COUT_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                             KH, KW, BLOCK_M, BLOCK_J)
        else:  # one group per step
            h = _gemm_tile(x_ptr, w1_ptr, n, oh, ow, mask_m, offs_j, mask_j, j0 // COUT_G,
                           H, W, sxn, sxh, sxw, sxc, s1o, s1c, s1h, s1w,
                           CIN_G, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                           KH, KW, UPCAST, PRECISION, BLOCK_M, BLOCK_J, BLOCK_K)
        if HAS_B1:
            h += tl.load(b1_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
        # ReLU (NaN kept, as torch.relu does), rounded to the dtype the unfused layer stores
        hr = _relu(h).to(y_ptr.dtype.element_ty)
        w2 = tl.load(w2_ptr + offs_n[None, :] * s2o + offs_j[:, None] * s2c,
                     mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            hr = hr.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc += tl.dot(hr, w2, input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + (n * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src,
                       mask=mask, other=0.0).to(tl.float32)
    if RELU_OUT:
        acc = _relu(acc)
    y = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


_root_block_gemm = C.tuned(GEMM_CONFIGS, KEY, GEMM_PRUNE)(_root_block)
_root_block_direct = C.tuned(DIRECT_CONFIGS, KEY, DIRECT_PRUNE)(_root_block)


def _direct(cin_g: int, cout_g: int) -> bool:
    return cin_g < GEMM_MIN_CHANNELS or cout_g < GEMM_MIN_CHANNELS


def check_root(weight: torch.Tensor, pointwise: torch.Tensor, groups: int) -> Optional[str]:
    """Why the fused kernel cannot run a grouped conv of ``weight`` ([C2, C1/groups, KH, KW])
    followed by a 1x1 conv of ``pointwise`` ([C3, C2, 1, 1]), or None."""
    if pointwise.dim() != 4 or tuple(pointwise.shape[2:]) != (1, 1):
        return f"the second conv must be 1x1; got weight {tuple(pointwise.shape)}"
    if pointwise.shape[1] != weight.shape[0]:
        return (f"the 1x1 conv takes {pointwise.shape[1]} channels but the grouped conv gives "
                f"{weight.shape[0]}")
    cout_g = weight.shape[0] // groups
    if not _direct(weight.shape[1], cout_g) and cout_g > MAX_GROUP_CHANNELS:
        return f"{cout_g} output channels per group (the kernel holds at most " \
               f"{MAX_GROUP_CHANNELS})"
    return None


def fused_root_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pointwise: torch.Tensor, pointwise_bias: Optional[torch.Tensor],
                    stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1, groups: int = 1,
                    residual: Optional[torch.Tensor] = None,
                    relu_out: bool = False) -> torch.Tensor:
    """``act(conv1x1(relu(conv2d(x, weight, bias, ..., groups)), pointwise, pointwise_bias)
    [+ residual])``, ``act`` ReLU if ``relu_out`` else identity, in one Triton kernel with
    zero padding; the output is channels-last, in ``x``'s dtype. Forward only."""
    C.check_conv(x, weight, bias, groups)
    reason = check_root(weight, pointwise, groups)
    if reason:
        raise DeeprootsError(f"the fused root kernel cannot run this block: {reason}")
    for name, t in (("pointwise", pointwise), ("pointwise_bias", pointwise_bias),
                    ("residual", residual)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise DeeprootsError(f"{name} must be {x.dtype} on {x.device} like the input; got "
                                 f"{t.dtype} on {t.device}")
    sh, sw = C.pair("stride", stride, 1)
    ph, pw = C.pair("padding", padding, 0)
    dh, dw = C.pair("dilation", dilation, 1)
    n, _, h, w = x.shape
    c2, cin_g, kh, kw = weight.shape
    c3 = pointwise.shape[0]
    oh, ow = output_size(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    if residual is not None and tuple(residual.shape) != (n, c3, oh, ow):
        raise DeeprootsError(f"residual must have the output's shape {(n, c3, oh, ow)}; got "
                             f"{tuple(residual.shape)}")
    y = torch.empty((n, c3, oh, ow), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    with C.on_device(x):
        for start, stop in C.batch_chunks(n, (x, y, residual)):
            _launch(x[start:stop], weight, bias, pointwise, pointwise_bias,
                    residual[start:stop] if residual is not None else None, y[start:stop],
                    (sh, sw), (ph, pw), (dh, dw), groups, relu_out)
    return y


def _launch(x, weight, bias, pointwise, pointwise_bias, residual, y, stride, padding,
            dilation, groups, relu_out) -> None:
    n, _, h, w = x.shape
    c2, cin_g, kh, kw = weight.shape
    c3, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    m = n * oh * ow
    cout_g = c2 // groups
    direct = _direct(cin_g, cout_g)
    step = DIRECT_STEP if direct else cout_g
    block_j = step if direct else max(16, triton.next_power_of_2(cout_g))
    res = residual if residual is not None else y
    extra = C.interpret_blocks(INTERPRET_CONFIG, BLOCK_M=m, BLOCK_N=c3, BLOCK_K=cin_g) \
        if C.INTERPRET else {}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c3, meta["BLOCK_N"]))

    kernel = _root_block_direct if direct else _root_block_gemm
    kernel[grid](
        x, weight, bias if bias is not None else weight, pointwise,
        pointwise_bias if pointwise_bias is not None else pointwise, res, y,
        h, w, oh, ow, m, *C.nhwc(x), *weight.stride(), pointwise.stride(0),
        pointwise.stride(1), *C.nhwc(res), *C.nhwc(y), cin_g, cout_g, c2, c3, step, *stride,
        *padding, *dilation, triton.next_power_of_2(m), KH=kh, KW=kw, DIRECT=direct,
        HAS_B1=bias is not None, HAS_B2=pointwise_bias is not None,
        HAS_RES=residual is not None, RELU_OUT=relu_out,
        UPCAST=C.INTERPRET and x.dtype == torch.bfloat16,
        PRECISION=C.input_precision(x.dtype), BLOCK_J=block_j, **extra)
