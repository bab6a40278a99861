from pallas_kernels.unified_attention.reference import unified_attention_reference
from pallas_kernels.unified_attention.tpu_kernel import unified_attention_tpu
from pallas_kernels.unified_attention.triton_kernel import unified_attention

__all__ = ["unified_attention", "unified_attention_tpu", "unified_attention_reference"]
