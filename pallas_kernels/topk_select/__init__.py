from pallas_kernels.topk_select.reference import topk_select_reference
from pallas_kernels.topk_select.triton_kernel import topk_select

__all__ = ["topk_select", "topk_select_reference"]
