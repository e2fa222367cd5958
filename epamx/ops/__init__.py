"""Fused operators. Each public op calls torch.ops.epamx.<op> and has a plain-PyTorch `<op>_reference`."""
from epamx.ops.attention_reweight import attention_reweight, attention_reweight_reference
from epamx.ops.channel_pool import channel_pool, channel_pool_reference
from epamx.ops.temporal_shift import temporal_shift, temporal_shift_, temporal_shift_reference, temporal_unshift_

__all__ = [
    "attention_reweight",
    "attention_reweight_reference",
    "channel_pool",
    "channel_pool_reference",
    "temporal_shift",
    "temporal_shift_",
    "temporal_shift_reference",
    "temporal_unshift_",
]
