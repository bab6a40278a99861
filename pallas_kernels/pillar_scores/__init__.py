from pallas_kernels.pillar_scores.reference import pillar_scores_paged_reference
from pallas_kernels.pillar_scores.triton_kernel import pillar_scores_paged
from pallas_kernels.pillar_scores.tpu_kernel import pillar_scores_paged_tpu

__all__ = ["pillar_scores_paged", "pillar_scores_paged_tpu", "pillar_scores_paged_reference"]
