// Schema of torch.ops.swa_fast.distance, in its own fragment of the swa_fast
// library (the averaging ops' schemas are in swa_fast.cpp). The kernels
// register next to their code: csrc/cpu/distance_cpu.cpp, csrc/cuda/distance_cuda.cu.

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(swa_fast, m) {
  // L2 norms of a[i] - b[i] (of a[i] when b is None) for every i, and of the
  // whole list, in one pass over the data. Accumulated in float32, or float64
  // when any input is float64; both results have that dtype and a[0]'s device.
  // The reduction order is fixed (per-chunk partial sums, reduced per tensor
  // in chunk order, then over tensors), so the same inputs give the same bits
  // on every call, whatever the thread count. No host sync.
  m.def("distance(Tensor[] a, Tensor[]? b=None) -> (Tensor per_tensor, Tensor total)");
}
