from pallas_kernels.sparse_attention.reference import sparse_decode_attention_reference
from pallas_kernels.sparse_attention.triton_kernel import sparse_decode_attention

__all__ = ["sparse_decode_attention", "sparse_decode_attention_reference"]
