"""Every invalid call raises a clear error that names the offending argument."""

from __future__ import annotations

import pytest
import torch

import ptfast

X = torch.randn(2, 4, 10, 10)
W = torch.randn(6, 4, 3, 3)
B = torch.randn(6)


def call(input=X, weight=W, bias=B, **kwargs):
    return ptfast.conv2d_relu_max_pool2d(input, weight, bias, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(input=torch.randn(10, 10)), ValueError, "`input` must be 3-D"),
        (dict(input=torch.randn(1, 2, 4, 10, 10)), ValueError, "`input` must be 3-D"),
        (dict(weight=torch.randn(6, 4, 3)), RuntimeError, "`weight` must be 4-D"),
        (dict(weight=torch.randn(6, 3, 3, 3)), RuntimeError, "`input` has 4 channels"),
        (dict(groups=4, weight=torch.randn(6, 1, 3, 3)), RuntimeError, "multiple of groups=4"),
        (dict(groups=2, weight=torch.randn(6, 4, 3, 3)), RuntimeError, "`input` has 4 channels"),
        (dict(groups=0), RuntimeError, "`groups` must be positive"),
        (dict(bias=torch.randn(5)), RuntimeError, "`bias` must have shape"),
        (dict(bias=torch.randn(6, 1)), RuntimeError, "`bias` must have shape"),
        (dict(weight=W.double()), TypeError, "`weight` has dtype Double"),
        (dict(bias=B.double()), TypeError, "`bias` has dtype Double"),
        (dict(input=X.long(), weight=W.long(), bias=B.long()), TypeError, "`input` must be a floating-point"),
        (dict(weight=torch.randn(6, 4, 11, 3)), RuntimeError, "`weight` kernel 11x3.*larger than the padded `input`"),
        (dict(dilation=6), RuntimeError, "`weight` kernel 3x3 \\(dilation \\[6, 6\\]\\) is larger"),
        (dict(pool_kernel_size=9), RuntimeError, "`pool_kernel_size`.*larger than the conv output of 8x8"),
        (dict(stride=0), RuntimeError, "`stride` must be positive"),
        (dict(stride=(1, -1)), RuntimeError, "`stride` must be positive"),
        (dict(dilation=0), RuntimeError, "`dilation` must be positive"),
        (dict(padding=-1), RuntimeError, "`padding` must be non-negative"),
        (dict(pool_kernel_size=0), RuntimeError, "`pool_kernel_size` must be positive"),
        (dict(pool_stride=0), RuntimeError, "`pool_stride` must be positive"),
        (dict(pool_kernel_size=3, pool_padding=2), RuntimeError, "`pool_padding` must be between 0 and half"),
        (dict(pool_padding=-1), RuntimeError, "`pool_padding` must be between 0 and half"),
        (dict(stride=(1, 2, 3)), TypeError, "`stride` must be an int or a pair"),
        (dict(stride="1"), TypeError, "`stride` must be an int or a pair"),
        (dict(padding="full"), ValueError, "`padding` must be 'valid', 'same'"),
        (dict(padding="same", stride=2), ValueError, "`padding`='same' is not supported for strided"),
        (dict(pool_kernel_size=2.5), TypeError, "`pool_kernel_size` must be an int"),
        (dict(groups=1.0), TypeError, "`groups` must be an int"),
        (dict(ceil_mode=1), TypeError, "`ceil_mode` must be a bool"),
        (dict(input=[1.0]), TypeError, "`input` and `weight` must be tensors"),
    ],
)
def test_invalid_block_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsupported_cpu_dtype_is_named(dtype):
    expected = "must be float32, float64, bfloat16 or float16 on CPU, got Float8"
    with pytest.raises(TypeError, match="`input` " + expected):
        call(X.to(dtype), W.to(dtype), B.to(dtype))
    with pytest.raises(TypeError, match="`self` " + expected):
        ptfast.log_softmax(X.to(dtype), 1)


def test_mixed_half_dtypes_are_named():
    with pytest.raises(TypeError, match="`weight` has dtype BFloat16 but `input` has dtype Half"):
        call(X.half(), W.bfloat16(), B.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
def test_device_mismatch_is_named():
    with pytest.raises(RuntimeError, match="`weight` is on"):
        call(X.cuda(), W, B.cuda())


def test_raw_op_list_arguments_are_checked():
    with pytest.raises(RuntimeError, match="`padding` must have two entries"):
        torch.ops.ptfast.conv2d_relu_max_pool2d(X, W, B, [1, 1], [1], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)


def test_backward_op_checks_its_tensors():
    args = ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(X, W, B, *args)
    with pytest.raises(RuntimeError, match="`grad_output` must have shape"):
        torch.ops.ptfast._conv2d_relu_max_pool2d_backward(out[:1], X, W, codes, *args, [True, True, True])
    with pytest.raises(TypeError, match="`codes` must have dtype Byte"):
        torch.ops.ptfast._conv2d_relu_max_pool2d_backward(out, X, W, codes.int(), *args, [True, True, True])


@pytest.mark.parametrize(
    "input,dim,error,pattern",
    [
        (torch.randn(3, 4), 2, IndexError, "`dim` must be in \\[-2, 1\\]"),
        (torch.randn(3, 4), -3, IndexError, "`dim` must be in \\[-2, 1\\]"),
        (torch.tensor(1.0), 1, IndexError, "`dim` must be in \\[-1, 0\\]"),
        (torch.arange(4), 0, TypeError, "`self` must be a floating-point"),
        (torch.randn(3, 4), None, TypeError, "`dim` must be an int"),
        (torch.randn(3, 4), 1.0, TypeError, "`dim` must be an int"),
    ],
)
def test_invalid_log_softmax_arguments(input, dim, error, pattern):
    with pytest.raises(error, match=pattern):
        ptfast.log_softmax(input, dim)


def test_log_softmax_backward_checks_shapes():
    y = ptfast.log_softmax(torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError, match="`grad_output` must have the shape of `output`"):
        torch.ops.ptfast._log_softmax_backward(torch.randn(4, 3), y, 1)
    with pytest.raises(TypeError, match="`grad_output` has dtype Double"):
        torch.ops.ptfast._log_softmax_backward(torch.randn(3, 4, dtype=torch.float64), y, 1)
