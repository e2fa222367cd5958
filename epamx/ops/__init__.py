"""Fused operators. Each public op calls torch.ops.epamx.<op> and has a plain-PyTorch `<op>_reference`."""
from epamx.ops.temporal_shift import temporal_shift, temporal_shift_, temporal_shift_reference

__all__ = ["temporal_shift", "temporal_shift_", "temporal_shift_reference"]
