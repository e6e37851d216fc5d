// filter.cpp -- the CPU head's gradient filter (docs/design.md, "Gradient filtering") for prefopt._C: which
// blocks of a gradient tile hold an entry that is not negligible, and zeroing blocks in place.
// Mirrors prefopt/cpu/rowops_torch.py `kept_blocks` / `zero_blocks` (the torch twins, used by the torch backend
// and on CUDA tensors); tests/test_filtering.py (test_kept_blocks_cpp_matches_torch) checks the two against each
// other, and prefopt/cpu/chunked.py calls them once per backward tile.
//
// Why C++: in torch the test is |D| <= threshold over the whole tile (a float and a bool copy of it) and two
// strided reductions; at the CPU head's 512 x 16384 tiles and H=256 that took as long as the tile's two gradient
// GEMMs (70 ms against 66 ms measured), so filtering could not pay. Here it is one read of the tile that stops
// looking at a block as soon as it holds one kept entry, and at a row block once all its blocks are kept.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace prefopt {
namespace cpu {

namespace {

// Blocks of columns one task scans (with every row of its row block): 16 x 128 columns = 8 KiB of fp32 per row,
// enough work per task and enough tasks to spread a one-row-block tile over the threads.
constexpr int64_t kColBlocksPerTask = 16;

void check_tile(const at::Tensor& grad, int64_t block_rows, int64_t block_cols, const char* op) {
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 2, "prefopt._C.", op, ": grad must be a 2-D CPU tensor");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, "prefopt._C.", op,
              ": grad must be float32 or float64 (the head's accumulator tile), got ", grad.scalar_type());
  TORCH_CHECK(grad.stride(1) == 1, "prefopt._C.", op, ": grad must have unit stride along its columns");
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "prefopt._C.", op, ": block sizes must be positive");
}

// Whether a run of entries holds one that is not negligible: !(|x| <= t), NaN included. Compiled for AVX-512, AVX2 and
// the baseline ISA and picked at load time (GCC/Clang function multiversioning on x86-64): the test is a compare
// and an OR per entry, so it runs at the tile's read bandwidth only when vectorised wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PREFOPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PREFOPT_CLONES
#endif

PREFOPT_CLONES bool any_kept(const float* x, int64_t len, float t) {
  int32_t hit = 0;  // an integer of the entries' width: the OR vectorises lane for lane
  for (int64_t e = 0; e < len; ++e) hit |= !(std::abs(x[e]) <= t);
  return hit != 0;
}

PREFOPT_CLONES bool any_kept(const double* x, int64_t len, double t) {
  int64_t hit = 0;
  for (int64_t e = 0; e < len; ++e) hit |= !(std::abs(x[e]) <= t);
  return hit != 0;
}

template <typename T>
void scan(T* g, int64_t stride, const T* thr, int64_t n, int64_t V, int64_t br, int64_t bc, bool* kept,
          int64_t cb, int64_t task0, int64_t task1, int64_t tasks_per_row_block, bool zero_skipped) {
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t i = task / tasks_per_row_block;
    const int64_t j0 = (task % tasks_per_row_block) * kColBlocksPerTask;
    const int64_t j1 = std::min(cb, j0 + kColBlocksPerTask);
    bool* k = kept + i * cb;
    int64_t open = j1 - j0;  // blocks of this task not yet known to be kept
    const int64_t r1 = std::min(n, (i + 1) * br);
    for (int64_t r = i * br; r < r1 && open > 0; ++r) {
      const T t = thr[r];
      const T* row = g + r * stride;
      for (int64_t j = j0; j < j1; ++j) {
        if (k[j]) continue;
        if (any_kept(row + j * bc, std::min(bc, V - j * bc), t)) {
          k[j] = true;
          --open;
        }
      }
    }
    // the task's skipped blocks were read just now (16 x 128 columns x 64 rows: 512 KiB of fp32, in L2): zeroing
    // them here writes cached lines instead of fetching the tile once more
    for (int64_t j = j0; zero_skipped && open > 0 && j < j1; ++j) {
      if (k[j]) continue;
      int64_t j_end = j;  // a run of skipped blocks is one fill per row
      while (j_end + 1 < j1 && !k[j_end + 1]) ++j_end;
      const int64_t c0 = j * bc, c1 = std::min(V, (j_end + 1) * bc);
      for (int64_t r = i * br; r < r1; ++r) std::memset(g + r * stride + c0, 0, sizeof(T) * (c1 - c0));
      j = j_end;
    }
  }
}

}  // namespace

at::Tensor kept_blocks(const at::Tensor& grad_in, const at::Tensor& threshold_in, int64_t block_rows,
                       int64_t block_cols, bool zero_skipped) {
  check_tile(grad_in, block_rows, block_cols, "kept_blocks");
  const int64_t n = grad_in.size(0), V = grad_in.size(1);
  TORCH_CHECK(threshold_in.device().is_cpu() && threshold_in.dim() == 1 && threshold_in.size(0) == n,
              "prefopt._C.kept_blocks: threshold must be a CPU tensor of shape [", n, "]");
  const at::Tensor thr = threshold_in.to(grad_in.scalar_type()).contiguous();
  const int64_t rb = (n + block_rows - 1) / block_rows, cb = (V + block_cols - 1) / block_cols;
  at::Tensor kept = at::zeros({rb, cb}, grad_in.options().dtype(at::kBool));
  if (n == 0 || V == 0) return kept;
  const int64_t per_row_block = (cb + kColBlocksPerTask - 1) / kColBlocksPerTask;
  bool* k = kept.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(grad_in.scalar_type(), "prefopt_kept_blocks", [&] {
    scalar_t* g = grad_in.data_ptr<scalar_t>();  // written only with zero_skipped
    const scalar_t* t = thr.const_data_ptr<scalar_t>();
    // at least ~512K entries per thread (a fraction of a millisecond), so a small tile is scanned inline
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 19) / (block_rows * block_cols * kColBlocksPerTask));
    at::parallel_for(0, rb * per_row_block, grain, [&](int64_t t0, int64_t t1) {
      scan<scalar_t>(g, grad_in.stride(0), t, n, V, block_rows, block_cols, k, cb, t0, t1, per_row_block,
                     zero_skipped);
    });
  });
  return kept;
}

void zero_blocks(const at::Tensor& grad, const at::Tensor& mask_in, int64_t block_rows, int64_t block_cols) {
  check_tile(grad, block_rows, block_cols, "zero_blocks");
  const int64_t n = grad.size(0), V = grad.size(1);
  const int64_t rb = (n + block_rows - 1) / block_rows, cb = (V + block_cols - 1) / block_cols;
  TORCH_CHECK(mask_in.device().is_cpu() && mask_in.scalar_type() == at::kBool && mask_in.dim() == 2 &&
              mask_in.size(0) == rb && mask_in.size(1) == cb,
              "prefopt._C.zero_blocks: mask must be a bool CPU tensor of shape [", rb, ", ", cb, "]");
  if (n == 0 || V == 0) return;
  const at::Tensor mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "prefopt_zero_blocks", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t stride = grad.stride(0);
    at::parallel_for(0, n, block_rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const bool* row_mask = m + (r / block_rows) * cb;
        for (int64_t j = 0; j < cb; ++j) {
          if (!row_mask[j]) continue;
          int64_t j1 = j;  // a run of masked blocks is one fill
          while (j1 + 1 < cb && row_mask[j1 + 1]) ++j1;
          const int64_t c0 = j * block_cols, c1 = std::min(V, (j1 + 1) * block_cols);
          std::memset(g + r * stride + c0, 0, sizeof(scalar_t) * (c1 - c0));
          j = j1;
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace prefopt
