from pallas_kernels.paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.paged_attention.triton_kernel import ragged_paged_attention

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]
