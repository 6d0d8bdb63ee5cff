"""FlashFuseMoE: a fused, dropless Mixture-of-Experts layer on Triton kernels."""

from flashfusemoe.config import MoEOptions
from flashfusemoe.core import CapacityOverflowError
from flashfusemoe.experts import moe_experts
from flashfusemoe.functional import aux_losses, calibrate_max_tokens, fused_moe, moe, update_expert_bias
from flashfusemoe.layer import MoELayer

__all__ = [
    "CapacityOverflowError",
    "MoELayer",
    "MoEOptions",
    "aux_losses",
    "calibrate_max_tokens",
    "fused_moe",
    "moe",
    "moe_experts",
    "update_expert_bias",
]
__version__ = "0.1.0"
