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
// A thread's share of the chunks: waking a thread costs more than reading
// ~100k values, so fewer chunks than this stay with the calling thread.
constexpr int64_t kChunksPerTask = 4;
// Calls with fewer elements than this in all stay on the calling thread, however
// many (small) tensors, hence chunks, they have: a parallel region costs more
// than the work, and far more when another process holds a core.
constexpr int64_t kSerialElements = kChunksPerTask * kChunk;

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

// The grain to hand at::parallel_for over `chunks`: kChunksPerTask, or all of
// them (one task on the calling thread) when the call is small in elements.
inline int64_t parallel_grain(const std::vector<Chunk>& chunks) {
  int64_t elements = 0;
  for (const Chunk& c : chunks) {
    elements += c.end - c.begin;
  }
  return elements < kSerialElements ? std::max<int64_t>(1, static_cast<int64_t>(chunks.size())) : kChunksPerTask;
}

}  // namespace cpu
}  // namespace swa_fast
