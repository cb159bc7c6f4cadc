"""Grouped and depthwise conv2d backward for CUDA in Triton: the input gradient and the
weight gradient, for the shapes, dtypes and layouts of the forward kernels
(:mod:`.grouped_conv`).

* ``_input_grad_gemm``: dx = dy convolved back through the weights, as an implicit GEMM per
  group. Program (m, n, g) computes BLOCK_M input pixels x BLOCK_N input channels of group g,
  reducing over the kernel taps and the group's output channels: for tap (kh, kw) the output
  pixel that input pixel (ih, iw) fed is ((ih + pad - kh * dil) / stride, ...), when that
  divides evenly and lies inside the output. Used when a group has >= 4 input and output
  channels.
* ``_input_grad_direct``: the same sum for depthwise and near-depthwise convs, a fused
  multiply-add per tap over BLOCK_P pixels x BLOCK_C channels.
* ``_weight_grad_gemm``: dw[co, ci, kh, kw] = sum over pixels of dy[p, co] * x[p shifted by
  the tap, ci]: per (tile of co x ci, group and tap, slice of the pixels) a GEMM whose
  reduction runs over N x OH x OW. The pixels are split into SPLIT slices, each written to a
  float32 buffer of its own and summed afterwards: enough programs to fill the GPU, and the
  same sum in the same order for one configuration (no atomics): the same inputs give the
  same gradient bit for bit. Across processes the autotuner may pick another configuration
  by timing, so runs agree to floating-point tolerance, not bit for bit.
* ``_weight_grad_direct``: the same for depthwise convs, a multiply-add per pixel block
  summed over the block.

Every product accumulates in float32; gradients come back in the input's dtype.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..errors import DeeprootsError
from . import _common as C
from ._common import _pixel, tuned

__all__ = ["conv2d_input_grad", "conv2d_weight_grad", "weight_grad_splits"]

INPUT_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
INPUT_DIRECT_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 256, "BLOCK_C": 16}, num_warps=8),
]
WEIGHT_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
WEIGHT_DIRECT_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 128}, num_warps=4),
]
# configurations that spill registers on sm_90 in fp32 (not in bf16 or fp16), dropped there
INPUT_DIRECT_PRUNE = C.drop_configs([(lambda args, dtype: dtype == torch.float32,
                                      [(128, 32, 4, 3)])], tensor="dy_ptr")
# one block shape each under the interpreter, at most these and shrunk to the problem
# (_common.interpret_blocks): correctness, not speed
INTERPRET_INPUT_GEMM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
INTERPRET_INPUT_DIRECT = {"BLOCK_P": 128, "BLOCK_C": 128}
INTERPRET_WEIGHT_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}
INTERPRET_WEIGHT_DIRECT = {"BLOCK_P": 128, "BLOCK_C": 128}
PIXEL_STEP = 128  # a slice of the weight gradient's pixels is a multiple of every BLOCK_K
TARGET_PROGRAMS = 1024  # about 8 programs per SM of an H100: enough to hide memory latency
# what changes the best block shape (see grouped_conv.KEY): the layout is the output
# gradient's channel stride
KEY = ["CIN_G", "COUT_G", "KH", "KW", "M_BUCKET", "H", "W", "STRIDE_H", "STRIDE_W", "PAD_H",
       "PAD_W", "DIL_H", "DIL_W", "sdc"]
WEIGHT_KEY = ["CIN_G", "COUT_G", "KH", "KW", "M_BUCKET", "SPLIT", "H", "W", "STRIDE_H",
              "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "sxc"]


@triton.jit
def _fed(ih, iw, kh, kw, mask, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """The output pixel (oh, ow) that input pixel (ih, iw) fed through tap (kh, kw), and
    whether it did (the stride divides, and it lies inside the output)."""
    th = ih + PAD_H - kh * DIL_H
    tw = iw + PAD_W - kw * DIL_W
    oh = th // STRIDE_H
    ow = tw // STRIDE_W
    fed = mask & (th >= 0) & (tw >= 0) & (th % STRIDE_H == 0) & (tw % STRIDE_W == 0) & \
        (oh < OH) & (ow < OW)
    return oh, ow, fed


@tuned(INPUT_GEMM_CONFIGS, key=KEY)
@triton.jit
def _input_grad_gemm(dy_ptr, w_ptr, dx_ptr,
                     H, W, OH, OW, M,
                     sdn, sdh, sdw, sdc, swo, swc, swh, sww, sxn, sxh, sxw, sxc,
                     CIN_G: tl.constexpr, COUT_G: tl.constexpr,
                     STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                     KH: tl.constexpr, KW: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels, over N x H x W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within the group
    mask_m = offs_m < M
    mask_n = offs_n < CIN_G
    n, ih, iw = _pixel(offs_m, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.cdiv(COUT_G, BLOCK_K)
    for step in range(0, KH * KW * k_steps):  # one flat loop, as in the forward's GEMM
        tap = step // k_steps
        kh = tap // KW
        kw = tap % KW
        oh, ow, fed = _fed(ih, iw, kh, kw, mask_m, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                           DIL_H, DIL_W)
        offs_k = (step % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)  # output channels
        mask_k = offs_k < COUT_G
        a = tl.load((dy_ptr + n * sdn + oh * sdh + ow * sdw + g * COUT_G * sdc)[:, None]
                    + offs_k[None, :] * sdc, mask=fed[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + (g * COUT_G + offs_k)[:, None] * swo
                    + offs_n[None, :] * swc + kh * swh + kw * sww,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter has no bf16 matrix multiply
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    dx = dx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (g * CIN_G + offs_n)[None, :] * sxc
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@tuned(INPUT_DIRECT_CONFIGS, key=KEY + ["C_IN"], prune=INPUT_DIRECT_PRUNE)
@triton.jit
def _input_grad_direct(dy_ptr, w_ptr, dx_ptr,
                       H, W, OH, OW, M, C_IN,
                       sdn, sdh, sdw, sdc, swo, swc, swh, sww, sxn, sxh, sxw, sxc,
                       CIN_G: tl.constexpr, COUT_G: tl.constexpr,
                       STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                       KH: tl.constexpr, KW: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # input pixels
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # input channels
    mask_p = offs_p < M
    mask_c = offs_c < C_IN
    n, ih, iw = _pixel(offs_p, H, W)
    group = offs_c // CIN_G
    ci = offs_c % CIN_G
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for j in range(0, COUT_G):
        co = group * COUT_G + j
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                oh, ow, fed = _fed(ih, iw, kh, kw, mask_p, OH, OW, STRIDE_H, STRIDE_W, PAD_H,
                                   PAD_W, DIL_H, DIL_W)
                dyv = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None]
                              + co[None, :] * sdc,
                              mask=fed[:, None] & mask_c[None, :], other=0.0)
                wv = tl.load(w_ptr + co * swo + ci * swc + kh * swh + kw * sww,
                             mask=mask_c, other=0.0)
                acc += dyv.to(tl.float32) * wv.to(tl.float32)[None, :]
    dx = dx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@tuned(WEIGHT_GEMM_CONFIGS, key=WEIGHT_KEY)
@triton.jit
def _weight_grad_gemm(x_ptr, dy_ptr, part_ptr,
                      H, W, OH, OW, M, PIXELS_PER_SPLIT, C_OUT,
                      sxn, sxh, sxw, sxc, sdn, sdh, sdw, sdc,
                      CIN_G: tl.constexpr, COUT_G: tl.constexpr,
                      STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                      SPLIT, KH: tl.constexpr, KW: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)  # a tile of output channels x input channels
    tap_g = tl.program_id(1)  # group x kernel tap
    split = tl.program_id(2)  # a slice of the pixels
    tiles_n = tl.cdiv(CIN_G, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    g = tap_g // (KH * KW)
    tap = tap_g % (KH * KW)
    kh = tap // KW
    kw = tap % KW
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_co = offs_co < COUT_G
    mask_ci = offs_ci < CIN_G
    start = split * PIXELS_PER_SPLIT
    end = tl.minimum(M, start + PIXELS_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)  # output pixels, over N x OH x OW
        mask_p = offs_p < end
        n, oh, ow = _pixel(offs_p, OH, OW)
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        inside = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dy_t = tl.load(dy_ptr + (g * COUT_G + offs_co)[:, None] * sdc
                       + (n * sdn + oh * sdh + ow * sdw)[None, :],
                       mask=mask_co[:, None] & mask_p[None, :], other=0.0)
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None]
                     + (g * CIN_G + offs_ci)[None, :] * sxc,
                     mask=inside[:, None] & mask_ci[None, :], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            xv = xv.to(tl.float32)
        acc += tl.dot(dy_t, xv, input_precision=PRECISION)
    # part: float32 [SPLIT, C_OUT, CIN_G, KH, KW], contiguous
    idx = ((g * COUT_G + offs_co)[:, None] * CIN_G + offs_ci[None, :]) * (KH * KW) + tap
    tl.store(part_ptr + split * (C_OUT * CIN_G * KH * KW) + idx, acc,
             mask=mask_co[:, None] & mask_ci[None, :])


@tuned(WEIGHT_DIRECT_CONFIGS, key=WEIGHT_KEY + ["C_OUT"])
@triton.jit
def _weight_grad_direct(x_ptr, dy_ptr, part_ptr,
                        H, W, OH, OW, M, PIXELS_PER_SPLIT, C_OUT,
                        sxn, sxh, sxw, sxc, sdn, sdh, sdw, sdc,
                        CIN_G: tl.constexpr, COUT_G: tl.constexpr,
                        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, M_BUCKET,
                        SPLIT, KH: tl.constexpr, KW: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)  # a block of output channels
    tap_ci = tl.program_id(1)  # kernel tap x input channel within the group
    split = tl.program_id(2)
    ci = tap_ci % CIN_G
    tap = tap_ci // CIN_G
    kh = tap // KW
    kw = tap % KW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels
    mask_c = offs_c < C_OUT
    in_ch = (offs_c // COUT_G) * CIN_G + ci
    start = split * PIXELS_PER_SPLIT
    end = tl.minimum(M, start + PIXELS_PER_SPLIT)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        n, oh, ow = _pixel(offs_p, OH, OW)
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        inside = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dyv = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                      mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + in_ch[None, :] * sxc,
                     mask=inside[:, None] & mask_c[None, :], other=0.0)
        acc += dyv.to(tl.float32) * xv.to(tl.float32)
    total = tl.sum(acc, axis=0)
    idx = (offs_c * CIN_G + ci) * (KH * KW) + tap
    tl.store(part_ptr + split * (C_OUT * CIN_G * KH * KW) + idx, total, mask=mask_c)


def weight_grad_splits(pixels: int, programs: int) -> int:
    """How many slices of ``pixels`` (N x OH x OW) the weight gradient sums separately, given
    ``programs`` per slice: enough slices to reach :data:`TARGET_PROGRAMS`, each at least
    :data:`PIXEL_STEP` pixels."""
    if C.INTERPRET:  # two slices: the interpreter checks the split-and-sum, not the speed
        return min(2, triton.cdiv(pixels, PIXEL_STEP))
    want = triton.cdiv(TARGET_PROGRAMS, max(1, programs))
    return max(1, min(want, triton.cdiv(pixels, 4 * PIXEL_STEP)))


def _check_grad(grad: torch.Tensor, other: torch.Tensor, channels: int, groups: int) -> None:
    """A one-line ValueError unless ``grad`` is a 4-d output gradient the kernels take."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 4 or grad.dtype != other.dtype \
            or grad.device != other.device:
        raise DeeprootsError(f"the Triton conv backward takes a 4-d output gradient of the "
                             f"forward's dtype and device ({other.dtype}, {other.device}); got "
                             f"{tuple(getattr(grad, 'shape', ()))} {getattr(grad, 'dtype', grad)}")
    if groups < 1 or channels % groups:
        raise DeeprootsError(f"groups {groups} must divide the {channels} input channels")


def _conv_args(stride, padding, dilation) -> Tuple[int, ...]:
    return (*stride, *padding, *dilation)


def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                      stride: Tuple[int, int], padding: Tuple[int, int],
                      dilation: Tuple[int, int], groups: int) -> torch.Tensor:
    """d(loss)/d(input) of ``F.conv2d(input, weight, ...)`` given ``grad``, d(loss)/d(output):
    a channels-last tensor of ``input_shape`` in ``grad``'s dtype. Runs on ``grad``'s own
    GPU; a batch too large for 32-bit offsets runs in slices."""
    n, c, h, w = input_shape
    _check_grad(grad, weight, c, groups)
    C.check_addressable("output gradient", grad)
    dx = torch.empty((n, c, h, w), device=grad.device, dtype=grad.dtype,
                     memory_format=torch.channels_last)
    with C.on_device(grad):
        for start, stop in C.batch_chunks(n, (grad, dx)):
            _input_grad(grad[start:stop], weight, dx[start:stop], stride, padding, dilation,
                        groups)
    return dx


def _input_grad(grad, weight, dx, stride, padding, dilation, groups) -> None:
    n, c, h, w = dx.shape
    cout, cin_g, kh, kw = weight.shape
    oh, ow = grad.shape[2], grad.shape[3]
    m = n * h * w
    cout_g = cout // groups
    args = (grad, weight, dx, h, w, oh, ow, m)
    strides = (*C.nhwc(grad), *weight.stride(), *C.nhwc(dx))
    conv = (cin_g, cout_g, *_conv_args(stride, padding, dilation), triton.next_power_of_2(m))
    if cin_g >= 4 and cout_g >= 4:
        extra = C.interpret_blocks(INTERPRET_INPUT_GEMM, BLOCK_M=m, BLOCK_N=cin_g,
                                   BLOCK_K=cout_g) if C.INTERPRET else {}

        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cin_g, meta["BLOCK_N"]), groups

        _input_grad_gemm[grid](*args, *strides, *conv, KH=kh, KW=kw,
                               UPCAST=C.INTERPRET and grad.dtype == torch.bfloat16,
                               PRECISION=C.input_precision(grad.dtype), **extra)
    else:
        extra = C.interpret_blocks(INTERPRET_INPUT_DIRECT, BLOCK_P=m, BLOCK_C=c) \
            if C.INTERPRET else {}

        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"])

        _input_grad_direct[grid](*args, c, *strides, *conv, KH=kh, KW=kw, **extra)


def conv2d_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight_shape: Sequence[int],
                       stride: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int], groups: int) -> torch.Tensor:
    """d(loss)/d(weight) of ``F.conv2d(x, weight, ...)`` given ``grad``: a tensor of
    ``weight_shape`` in ``x``'s dtype, summed in float32. Runs on ``x``'s own GPU; a batch
    too large for 32-bit offsets is summed over slices, in a fixed order."""
    n, c = x.shape[:2]
    C.check_conv(x, torch.empty(weight_shape, device="meta", dtype=x.dtype), None, groups)
    _check_grad(grad, x, c, groups)
    C.check_addressable("output gradient", grad)
    total = None
    with C.on_device(x):
        for start, stop in C.batch_chunks(n, (x, grad)):
            part = _weight_grad(x[start:stop], grad[start:stop], weight_shape, stride, padding,
                                dilation, groups)
            total = part if total is None else total + part
    return total.to(x.dtype)


def _weight_grad(x, grad, weight_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """The weight gradient of one slice of the batch, in float32."""
    cout, cin_g, kh, kw = weight_shape
    n, c, h, w = x.shape
    oh, ow = grad.shape[2], grad.shape[3]
    m = n * oh * ow
    cout_g = cout // groups
    direct = cin_g < 4 or cout_g < 4
    if direct:
        blocks = C.interpret_blocks(INTERPRET_WEIGHT_DIRECT, BLOCK_C=cout) if C.INTERPRET \
            else {}
        programs = triton.cdiv(cout, blocks.get("BLOCK_C", 64)) * kh * kw * cin_g
    else:
        programs = groups * kh * kw * triton.cdiv(cout_g, 64) * triton.cdiv(cin_g, 64)
    split = weight_grad_splits(m, programs)
    per_split = triton.cdiv(triton.cdiv(m, split), PIXEL_STEP) * PIXEL_STEP
    split = triton.cdiv(m, per_split)
    part = torch.empty((split, cout, cin_g, kh, kw), device=x.device, dtype=torch.float32)
    args = (x, grad, part, h, w, oh, ow, m, per_split, cout)
    strides = (*C.nhwc(x), *C.nhwc(grad))
    conv = (cin_g, cout_g, *_conv_args(stride, padding, dilation), triton.next_power_of_2(m),
            split)
    if direct:
        extra = C.interpret_blocks(INTERPRET_WEIGHT_DIRECT, BLOCK_P=min(m, per_split),
                                   BLOCK_C=cout) if C.INTERPRET else {}

        def grid(meta):
            return triton.cdiv(cout, meta["BLOCK_C"]), kh * kw * cin_g, split

        _weight_grad_direct[grid](*args, *strides, *conv, KH=kh, KW=kw, **extra)
    else:
        extra = C.interpret_blocks(INTERPRET_WEIGHT_GEMM, BLOCK_M=cout_g, BLOCK_N=cin_g,
                                   BLOCK_K=min(m, per_split)) if C.INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(cout_g, meta["BLOCK_M"]) * triton.cdiv(cin_g, meta["BLOCK_N"]),
                    groups * kh * kw, split)

        _weight_grad_gemm[grid](*args, *strides, *conv, KH=kh, KW=kw,
                                UPCAST=C.INTERPRET and x.dtype == torch.bfloat16,
                                PRECISION=C.input_precision(x.dtype), **extra)
    return part[0] if split == 1 else part.sum(0)
