from pallas_kernels.sparse_attention.reference import sparse_decode_attention_reference

__all__ = ["sparse_decode_attention_reference"]
