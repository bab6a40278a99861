from pallas_kernels.topk_select.reference import topk_select_reference
from pallas_kernels.topk_select.triton_kernel import topk_select
from pallas_kernels.topk_select.tpu_kernel import topk_select_tpu

__all__ = ["topk_select", "topk_select_tpu", "topk_select_reference"]
