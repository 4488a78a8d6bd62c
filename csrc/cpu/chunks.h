// How the CPU kernels of the multi-tensor ops cut a whole list of tensors into
// work items: fixed-size chunks of every tensor in list order, so one huge
// tensor and many tiny ones spread over the threads alike (the CPU
// counterpart of the CUDA harness's chunks, cuda/multi_tensor_apply.cuh).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace swa_fast {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel work item (and per partial sum)
// Calls under this many chunks stay on the calling thread: waking a thread
// costs more than reading ~100k values.
constexpr int64_t kChunksPerTask = 4;

struct Chunk {
  int64_t tensor;  // index in the list
  int64_t begin;   // first element
  int64_t end;     // one past the last element
};

// Every tensor's chunks, in list order. With `first_chunk`, first_chunk[i] ..
// first_chunk[i + 1] are tensor i's chunks (an empty tensor has none).
inline std::vector<Chunk> split_into_chunks(at::TensorList tensors, std::vector<int64_t>* first_chunk = nullptr) {
  std::vector<Chunk> chunks;
  if (first_chunk != nullptr) {
    first_chunk->assign(tensors.size() + 1, 0);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t numel = tensors[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kChunk)});
    }
    if (first_chunk != nullptr) {
      (*first_chunk)[i + 1] = static_cast<int64_t>(chunks.size());
    }
  }
  return chunks;
}

}  // namespace cpu
}  // namespace swa_fast
