"""The pieces of an X-ShiftNet block that dominate a CPU training step, forward + backward, in channels_last_3d
memory (the format EPAM-Net trains in on a CPU), float32 (on CUDA the batch norm also in contiguous memory):

- batch norm with batch statistics and what follows it: ReLU (after a block's first convolution), or the
  squeeze-and-excitation gate and Swish (after its depthwise convolution); epamx.ops.batch_norm_act against
  F.batch_norm, the gate and the activation as eager ops. A copy of the bytes the fused op must move (forward: read
  x twice, write the output; backward: read the gradient and x twice each, write dx) is the bandwidth yardstick.
- the (1, 3, 3) depthwise convolution: a Conv3d as written (oneDNN's 3D path) against the same weights as a Conv2d
  over the N*T frames (what ConvBNAct(frame_wise=True) runs, no copy in this memory format).

Shapes: EPAM-Net's first RGB and pose stages at 4 clips (224x224 RGB, 56x56 heatmaps), its last stages, and the
embedded training config's small ones (16 clips, 64x64 RGB, 16x16 heatmaps).

And one piece of inference (optimize_for_inference's copy on a CPU), forward only, at one clip: squeeze-and-excitation
then Swish, epamx.ops.channel_sums and gate_silu_ against ATen's passes, float32 and bfloat16."""
import copy

import pytest
import torch

from epamx.models.xshiftnet import SqueezeExcite, _frame_wise_conv
from epamx.ops import batch_norm_act, batch_norm_act_reference

CL = torch.channels_last_3d
BN_SHAPES = {"rgb-stage1": (4, 54, 16, 56, 56), "pose-stage2": (4, 108, 48, 14, 14), "rgb-stage4": (4, 432, 16, 7, 7)}
CONV_SHAPES = {"rgb-stage1": ((4, 54, 16, 56, 56), 1), "rgb-stage2-stride2": ((4, 108, 16, 56, 56), 2),
               "pose-stage2": ((4, 108, 48, 14, 14), 1), "rgb-stage4": ((4, 432, 16, 7, 7), 1),
               "pose-stage3": ((4, 216, 48, 7, 7), 1), "embedded-rgb-stage4": ((16, 432, 4, 2, 2), 1),
               "embedded-pose-stage2": ((16, 108, 12, 4, 4), 1)}


def _cpu_only(device):
    if device.type != "cpu":
        pytest.skip("the fused batch norm and the frame-wise convolution are the CPU training path")


@pytest.mark.parametrize("layout", ["channels_last_3d", "contiguous"])
@pytest.mark.parametrize("branch", ["relu", "se-silu"])
@pytest.mark.parametrize("case", list(BN_SHAPES))
def test_batch_norm_act(compare, device, case, branch, layout):
    # CUDA: both layouts, whose per-(n, c) reductions split the rows differently (batch_norm_act_cuda.cu).
    if device.type == "cpu" and layout != "channels_last_3d":
        pytest.skip("the CPU rows are the CPU training layout, channels_last_3d")
    memory_format = CL if layout == "channels_last_3d" else torch.contiguous_format
    shape = BN_SHAPES[case]
    torch.manual_seed(0)
    x = torch.randn(shape).to(device).contiguous(memory_format=memory_format).requires_grad_()
    weight = (torch.rand(shape[1]) + 0.5).to(device).requires_grad_()
    bias = torch.randn(shape[1]).to(device).requires_grad_()
    se = SqueezeExcite(shape[1], 1 / 16).to(device) if branch == "se-silu" else None  # X-ShiftNet's SE
    gate, params = (se.gate, tuple(se.parameters())) if se is not None else (None, ())
    act = "silu" if se is not None else "relu"
    grad = torch.randn(shape).to(device).contiguous(memory_format=memory_format)

    def run(fn):
        def step():
            x.grad = weight.grad = bias.grad = None
            fn(x, weight, bias, None, None, 0.1, 1e-5, act, gate, params).backward(grad)
        return step

    copy_src = torch.empty(8 * x.numel() // 2, dtype=torch.float32, device=device)
    copy_dst = torch.empty_like(copy_src)
    nbytes = 8 * x.numel() * 4
    compare("batch norm + activation fwd+bwd", f"{case} {shape} {branch} float32 {layout}",
            {"reference": run(batch_norm_act_reference), "fused": run(batch_norm_act),
             "copy": lambda: copy_dst.copy_(copy_src)}, device=device, bytes_moved=nbytes)


@pytest.mark.parametrize("case", list(CONV_SHAPES))
def test_depthwise_convolution(compare, device, case):
    _cpu_only(device)
    shape, stride = CONV_SHAPES[case]
    c = shape[1]
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
    conv = torch.nn.Conv3d(c, c, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), groups=c,
                           bias=False).to(memory_format=CL)

    def conv3d():
        return conv(x)

    def frame_wise():
        return _frame_wise_conv(conv, x)

    grad = torch.randn_like(conv3d().detach())
    torch.testing.assert_close(frame_wise(), conv3d())

    def run(fn):
        def step():
            x.grad = conv.weight.grad = None
            fn().backward(grad)
        return step

    compare("depthwise (1, 3, 3) convolution fwd+bwd", f"{case} {shape} stride {stride} float32 channels_last_3d",
            {"conv3d": run(conv3d), "frame_wise": run(frame_wise)}, device=device, baseline="conv3d")


# EPAM-Net's squeeze-and-excitation inputs in inference, one clip: the depthwise outputs of the SE blocks.
SE_SHAPES = {"rgb-stage1": (1, 54, 16, 56, 56), "pose-stage1": (1, 54, 48, 28, 28),
             "rgb-stage2": (1, 108, 16, 28, 28),
             "pose-stage2": (1, 108, 48, 14, 14), "rgb-stage4": (1, 432, 16, 7, 7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(SE_SHAPES))
def test_squeeze_excite_silu_inference(compare, device, case, dtype):
    """Inference (optimize_for_inference's copy on a CPU): squeeze-and-excitation then Swish, in place on a fresh
    copy of the depthwise output each call. `aten`: channel sums, the MLP, ``mul_`` and ``silu_`` (what the copy
    ran before, SqueezeExcite.forward_ + F.silu); `fused`: epamx.ops.channel_sums and gate_silu_
    (SqueezeExcite.forward_silu_); `copy`: the copy alone, in every row's time."""
    _cpu_only(device)
    shape = SE_SHAPES[case]
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype=dtype, memory_format=CL)
    # `fused` with a float32 MLP, as the bfloat16 inference copy runs it; `aten` in x's dtype, as it ran before.
    se = SqueezeExcite(shape[1], 1 / 16).requires_grad_(False)
    se_aten = copy.deepcopy(se).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(se.forward_silu_(x.clone()).float(),
                                   torch.nn.functional.silu(se_aten.forward_(x.clone())).float(),
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-5)

    def run(fn):
        def step():
            with torch.inference_mode():
                fn(x.clone())
        return step

    name = str(dtype).replace("torch.", "")
    compare("squeeze-excite + Swish, inference", f"{case} {shape} {name} channels_last_3d",
            {"aten": run(lambda y: torch.nn.functional.silu(se_aten.forward_(y), inplace=True)),
             "fused": run(se.forward_silu_), "copy": run(lambda y: y)},
            device=device, baseline="aten")
