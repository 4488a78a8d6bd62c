// The CPU's Philox words, exposed for tests: tests/test_average_stochastic.py
// compares both paths of block_words (the AVX2 rounds and the portable loop)
// with an independent emulation, whichever of them the build runs.
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bindings.h"
#include "cpu/stochastic_block.h"

namespace swa_fast {

void bind_stochastic_block(pybind11::module_& m) {
  m.attr("has_simd_philox") = stochastic::cpu::kHasSimdPhilox;
  m.def(
      "stochastic_words",
      [](uint64_t seed, uint64_t counter, int64_t stream, int64_t first, int64_t count, bool simd) {
        TORCH_CHECK(first >= 0 && count >= 0, "stochastic_words: first and count must be >= 0");
        TORCH_CHECK(!simd || stochastic::cpu::kHasSimdPhilox, "stochastic_words: this build has no SIMD Philox");
        const stochastic::Key key{seed, counter};
        std::vector<uint32_t> words(static_cast<size_t>(count));
        // Blocks of kMaxBlock from `first`: the kernel's blocks start at
        // multiples of four, these wherever `first` does (the start inside a
        // group is tested too).
        for (int64_t done = 0; done < count;) {
          const int64_t n = std::min(stochastic::cpu::kMaxBlock, count - done);
          stochastic::cpu::block_words(key, stream, first + done, n, words.data() + done, simd);
          done += n;
        }
        return words;
      },
      pybind11::arg("seed"), pybind11::arg("counter"), pybind11::arg("stream"), pybind11::arg("first"),
      pybind11::arg("count"), pybind11::arg("simd"),
      "element_word(Key{seed, counter}, stream, first + e) for e < count, from the CPU kernel's block_words "
      "(simd: its AVX2 Philox, else its portable loop)");
}

}  // namespace swa_fast
