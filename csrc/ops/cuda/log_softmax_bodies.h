// Host+device bodies of the log_softmax CUDA kernels (log_softmax_kernel.cu)
// and the host rule that picks a kernel and its launch shape. The kernels'
// CPU emulation (csrc/ops/cpu/cuda_emulation/log_softmax.cpp) runs the same
// functions, so the test suite executes them on every CI machine; see
// launch.h for the contract.
//
// The tensor is viewed as (outer, dim_size, inner). Five kernels:
//   warp_rows           inner == 1, dim_size <= kMaxWarpRow: a power-of-two
//                       group of lanes per row, several rows per warp,
//                       combined by warp shuffles;
//   block_row_shared    inner == 1, longer rows that fit in shared memory:
//                       one block per row, the row read from global memory
//                       once into shared memory, reduced, written from there;
//   block_row_streamed  inner == 1, longer rows: one block per row, read
//                       twice (reduce, then write);
//   columns             inner > 1 with enough columns (outer x inner) to fill
//                       the GPU: one thread walks a column along dim;
//   columns_split_dim   inner > 1 with too few columns: a block's threads are
//                       columns x slices of dim, the slices' partials combined
//                       through shared memory in a fixed tree order (no
//                       atomics: deterministic), as ATen's "spatial" softmax.
// The block_row kernels use 16-byte loads and stores when every tensor is
// 16-byte aligned and rows are a whole number of 16-byte packs, so that each
// row starts aligned; scalar accesses (still coalesced) otherwise.
#pragma once

#include "ops/cuda/launch.h"
#include "ops/log_softmax.h"

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

namespace ptfast::cuda::log_softmax {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr int kWarpRowThreads = 256;
constexpr int kColumnThreads = 256;
// Rows up to this length take a group of at most 32 lanes: at most 32
// elements a lane, where a block per row would leave most threads idle.
constexpr int64_t kMaxWarpRow = 1024;
// block_row kernels: about this many elements a thread, 128 to 1024 threads.
constexpr int64_t kElementsPerRowThread = 16;
// columns_split_dim: each thread walks at least this many elements of dim, so
// that the shared-memory tree costs little next to the walk.
constexpr int64_t kMinSliceLength = 16;
// Resident threads a multiprocessor holds on sm_80 and sm_90.
constexpr int64_t kThreadsPerMultiprocessor = 2048;
// Static shared memory beside a block_row kernel's dynamic row copy: the 32
// warps' partials (at most 32 x 16 bytes), rounded up.
constexpr int64_t kStaticSharedBytes = 1024;

// What the rule needs to know of the device.
struct Device {
  int64_t multiprocessors;
  int64_t max_shared_bytes;  // dynamic shared memory a block may opt in to
};

// An H100/H200 (sm_90: 132 multiprocessors, 227 KB a block): the device the
// emulation and the kernel-name operator plan for. The CUDA code asks the
// device it runs on.
constexpr Device kH100{132, 232448};

// The kernels plan_launch picks from.
enum class Kernel {
  kNone,  // an empty tensor: nothing to launch
  kWarpRows,
  kBlockRowShared,
  kBlockRowStreamed,
  kColumns,
  kColumnsSplitDim,
};

struct LaunchPlan {
  Kernel kernel = Kernel::kNone;
  int64_t blocks = 0;
  int threads = 0;
  int row_lanes = 1;      // warp_rows: lanes per row, a power of two <= 32
  int block_columns = 1;  // columns_split_dim: columns per block
  int dim_slices = 1;  // columns_split_dim: threads per column, a power of two
  int64_t shared_bytes = 0;  // block_row_shared: the dynamic row copy
};

inline int64_t next_power_of_two(int64_t n) {
  int64_t p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

// Blocks of `threads` for `items`, `per_block` per block: no more than the
// device holds at once, so that the grid-stride loops of the kernels take
// the rest (blocks stay resident instead of being relaunched).
inline int64_t resident_blocks_for(
    int64_t items, int64_t per_block, int threads, const Device& device) {
  return std::min(
      blocks_for(items, per_block),
      device.multiprocessors *
          std::max<int64_t>(1, kThreadsPerMultiprocessor / threads));
}

// What every kernel of a (forward or backward) call launches with, from the
// layout, the element size in bytes and the device. The backward keeps only
// grad_output in shared memory (output is read once anyway), so one rule
// serves both.
inline LaunchPlan plan_launch(
    const ops::LogSoftmaxLayout& l, int64_t element_size,
    const Device& device) {
  LaunchPlan plan;
  if (l.outer * l.dim_size * l.inner == 0) {
    return plan;
  }
  if (l.inner == 1 && l.dim_size <= kMaxWarpRow) {
    plan.kernel = Kernel::kWarpRows;
    plan.row_lanes = static_cast<int>(
        std::min<int64_t>(next_power_of_two(l.dim_size), kWarp));
    plan.threads = kWarpRowThreads;
    plan.blocks = resident_blocks_for(
        l.outer, kWarpRowThreads / plan.row_lanes, plan.threads, device);
    return plan;
  }
  if (l.inner == 1) {
    plan.threads = static_cast<int>(std::clamp<int64_t>(
        next_power_of_two(
            (l.dim_size + kElementsPerRowThread - 1) / kElementsPerRowThread),
        128, kMaxThreads));
    plan.blocks = resident_blocks_for(l.outer, 1, plan.threads, device);
    const int64_t row_bytes = l.dim_size * element_size;
    if (row_bytes + kStaticSharedBytes <= device.max_shared_bytes) {
      plan.kernel = Kernel::kBlockRowShared;
      plan.shared_bytes = row_bytes;
    } else {
      plan.kernel = Kernel::kBlockRowStreamed;
    }
    return plan;
  }
  // Up to a warp of neighbouring columns a block, so that a warp's loads of
  // one slice of dim coalesce; then slices of dim while the launch has fewer
  // threads than the device holds and each slice stays long enough.
  const int columns =
      static_cast<int>(std::min<int64_t>(next_power_of_two(l.inner), kWarp));
  const int64_t tiles = l.outer * ((l.inner + columns - 1) / columns);
  int slices = 1;
  while (columns * slices * 2 <= kMaxThreads &&
         slices * 2 * kMinSliceLength <= l.dim_size &&
         tiles * columns * slices <
             device.multiprocessors * kThreadsPerMultiprocessor) {
    slices *= 2;
  }
  if (slices == 1) {
    plan.kernel = Kernel::kColumns;
    plan.threads = kColumnThreads;
    plan.blocks = resident_blocks_for(
        l.outer * l.inner, kColumnThreads, plan.threads, device);
    return plan;
  }
  plan.kernel = Kernel::kColumnsSplitDim;
  plan.block_columns = columns;
  plan.dim_slices = slices;
  plan.threads = columns * slices;
  plan.blocks = resident_blocks_for(tiles, 1, plan.threads, device);
  return plan;
}

// The name tests use to check that every kernel is covered.
inline std::string kernel_name(const LaunchPlan& plan) {
  switch (plan.kernel) {
    case Kernel::kNone:
      return "none";
    case Kernel::kWarpRows:
      return "warp_rows/" + std::to_string(plan.row_lanes);
    case Kernel::kBlockRowShared:
      return "block_row_shared";
    case Kernel::kBlockRowStreamed:
      return "block_row_streamed";
    case Kernel::kColumns:
      return "columns";
    case Kernel::kColumnsSplitDim:
      return "columns_split_dim";
  }
  return "";
}

// block_row kernels: 16-byte accesses when every pointer is 16-byte aligned
// and a row is a whole number of 16-byte packs (every row then starts aligned).
inline bool use_vector_access(
    std::initializer_list<const void*> pointers, int64_t dim_size,
    int64_t element_size) {
  if (dim_size * element_size % 16 != 0) {
    return false;
  }
  return std::all_of(pointers.begin(), pointers.end(), [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
  });
}

// Calls fn(std::bool_constant<vector>{}, std::bool_constant<shared>{}): the
// template arguments of a block_row kernel, from use_vector_access and the
// plan.
template <typename Fn>
void with_block_row_flags(bool vector, const LaunchPlan& plan, const Fn& fn) {
  const bool shared = plan.kernel == Kernel::kBlockRowShared;
  if (vector && shared) {
    fn(std::true_type{}, std::true_type{});
  } else if (vector) {
    fn(std::true_type{}, std::false_type{});
  } else if (shared) {
    fn(std::false_type{}, std::true_type{});
  } else {
    fn(std::false_type{}, std::false_type{});
  }
}

// Calls fn(index_type{}) with int32_t where every index into the tensor, and
// an in-row index plus a block's threads, fits in 32 bits; int64_t otherwise.
// (Grid-stride counters over rows, columns and tiles are always 64-bit.)
template <typename Fn>
void with_index_type(int64_t numel, const Fn& fn) {
  if (numel <= std::numeric_limits<int32_t>::max() - kMaxThreads) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

// max of the values seen, and the sum of exp(value - max) over them.
template <typename acc_t>
struct MaxSum {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
C10_HOST_DEVICE MaxSum<acc_t> empty_max_sum() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// One exp per element. The special values end as in native log_softmax
// (x - max - log(sum over exp(x - max))): a NaN or +inf anywhere makes the
// sum NaN (native's exp(inf - inf)); -inf adds nothing, and a row of -inf
// only keeps max = -inf, so its outputs are -inf - -inf = NaN as native's.
template <typename acc_t>
C10_HOST_DEVICE MaxSum<acc_t> add(MaxSum<acc_t> s, acc_t x) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (x > s.max) {
    const acc_t self =
        x == kInf ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1);
    return {x, s.sum * std::exp(s.max - x) + self};
  }
  if (x != -kInf) {  // a NaN x passes, and makes the sum NaN
    s.sum += std::exp(x - s.max);
  }
  return s;
}

// Commutative to the bit (a tie takes a's sum first, but a + b == b + a), so
// both lanes of a shuffle pair hold the same state.
template <typename acc_t>
C10_HOST_DEVICE MaxSum<acc_t> merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const MaxSum<acc_t> high = a.max >= b.max ? a : b;
  const MaxSum<acc_t> low = a.max >= b.max ? b : a;
  // A part of -infs only has sum 0 (or NaN: kept): scaled by 0, not by
  // exp(-inf - -inf) = NaN.
  const acc_t scale = low.max == -std::numeric_limits<acc_t>::infinity()
                          ? acc_t(0)
                          : std::exp(low.max - high.max);
  return {high.max, high.sum + low.sum * scale};
}

struct MergeMaxSum {
  template <typename acc_t>
  C10_HOST_DEVICE MaxSum<acc_t> operator()(
      MaxSum<acc_t> a, MaxSum<acc_t> b) const {
    return merge(a, b);
  }
};

struct Add {
  template <typename acc_t>
  C10_HOST_DEVICE acc_t operator()(acc_t a, acc_t b) const {
    return a + b;
  }
};

// A block's reduction after each warp's butterfly: every thread folds the
// warps' partials in warp order, so all get the same value.
template <typename T, typename Combine>
C10_HOST_DEVICE T
fold_partials(const T* partials, int count, const Combine& combine) {
  T value = partials[0];
  for (int i = 1; i < count; ++i) {
    value = combine(value, partials[i]);
  }
  return value;
}

template <typename acc_t>
struct ForwardOutput {
  acc_t max;
  acc_t log_sum;

  C10_HOST_DEVICE explicit ForwardOutput(MaxSum<acc_t> s)
      : max(s.max), log_sum(std::log(s.sum)) {}

  template <typename scalar_t>
  C10_HOST_DEVICE scalar_t operator()(scalar_t x) const {
    return static_cast<scalar_t>(static_cast<acc_t>(x) - max - log_sum);
  }
};

template <typename acc_t>
struct BackwardGradInput {
  acc_t grad_sum;

  template <typename scalar_t>
  C10_HOST_DEVICE scalar_t
  operator()(scalar_t grad_output, scalar_t output) const {
    return static_cast<scalar_t>(
        static_cast<acc_t>(grad_output) -
        std::exp(static_cast<acc_t>(output)) * grad_sum);
  }
};

// A thread's share of a row: elements first, first + stride, ... of a row
// of `length` (lane and group width, or thread and block size); with
// kVector, 16-byte packs of elements in that pattern instead (length a
// multiple of the pack, row aligned).
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// fn(value) for each element of the share; with kCopy, each is also stored
// to copy[i] (the row's shared-memory copy), in the same pattern.
template <
    bool kVector, bool kCopy, typename index_t, typename scalar_t, typename Fn>
C10_HOST_DEVICE void read_share(
    const scalar_t* row, scalar_t* copy, index_t length, int first, int stride,
    Fn& fn) {
  if constexpr (kVector) {
    using P = Pack<scalar_t>;
    const index_t packs = length / P::kSize;
    for (index_t p = first; p < packs; p += stride) {
      const P pack = reinterpret_cast<const P*>(row)[p];
      if constexpr (kCopy) {
        reinterpret_cast<P*>(copy)[p] = pack;
      }
      for (int k = 0; k < P::kSize; ++k) {
        fn(pack.v[k]);
      }
    }
  } else {
    for (index_t i = first; i < length; i += stride) {
      const scalar_t value = row[i];
      if constexpr (kCopy) {
        copy[i] = value;
      }
      fn(value);
    }
  }
}

template <typename acc_t>
struct AddToMaxSum {
  MaxSum<acc_t> state = empty_max_sum<acc_t>();
  template <typename scalar_t>
  C10_HOST_DEVICE void operator()(scalar_t x) {
    state = add(state, static_cast<acc_t>(x));
  }
};

template <typename acc_t>
struct AddToSum {
  acc_t sum = acc_t(0);
  template <typename scalar_t>
  C10_HOST_DEVICE void operator()(scalar_t x) {
    sum += static_cast<acc_t>(x);
  }
};

// The share's (max, sum), copying it to `copy` with kCopy.
template <bool kVector, bool kCopy, typename index_t, typename scalar_t>
C10_HOST_DEVICE MaxSum<at::opmath_type<scalar_t>> share_max_sum(
    const scalar_t* row, index_t length, int first, int stride,
    scalar_t* copy = nullptr) {
  AddToMaxSum<at::opmath_type<scalar_t>> fn;
  read_share<kVector, kCopy>(row, copy, length, first, stride, fn);
  return fn.state;
}

template <bool kVector, bool kCopy, typename index_t, typename scalar_t>
C10_HOST_DEVICE at::opmath_type<scalar_t> share_sum(
    const scalar_t* row, index_t length, int first, int stride,
    scalar_t* copy = nullptr) {
  AddToSum<at::opmath_type<scalar_t>> fn;
  read_share<kVector, kCopy>(row, copy, length, first, stride, fn);
  return fn.sum;
}

// out[i] = fn(in[i]) over the share.
template <bool kVector, typename index_t, typename scalar_t, typename Fn>
C10_HOST_DEVICE void write_share(
    const scalar_t* in, scalar_t* out, index_t length, int first, int stride,
    const Fn& fn) {
  if constexpr (kVector) {
    using P = Pack<scalar_t>;
    const index_t packs = length / P::kSize;
    for (index_t p = first; p < packs; p += stride) {
      const P a = reinterpret_cast<const P*>(in)[p];
      P result;
      for (int k = 0; k < P::kSize; ++k) {
        result.v[k] = fn(a.v[k]);
      }
      reinterpret_cast<P*>(out)[p] = result;
    }
  } else {
    for (index_t i = first; i < length; i += stride) {
      out[i] = fn(in[i]);
    }
  }
}

// out[i] = fn(a[i], b[i]) over the share.
template <bool kVector, typename index_t, typename scalar_t, typename Fn>
C10_HOST_DEVICE void write_share(
    const scalar_t* a, const scalar_t* b, scalar_t* out, index_t length,
    int first, int stride, const Fn& fn) {
  if constexpr (kVector) {
    using P = Pack<scalar_t>;
    const index_t packs = length / P::kSize;
    for (index_t p = first; p < packs; p += stride) {
      const P pa = reinterpret_cast<const P*>(a)[p];
      const P pb = reinterpret_cast<const P*>(b)[p];
      P result;
      for (int k = 0; k < P::kSize; ++k) {
        result.v[k] = fn(pa.v[k], pb.v[k]);
      }
      reinterpret_cast<P*>(out)[p] = result;
    }
  } else {
    for (index_t i = first; i < length; i += stride) {
      out[i] = fn(a[i], b[i]);
    }
  }
}

// A block takes kWarpRowThreads / lanes consecutive rows an iteration; a
// thread's row is first_row + thread / lanes, past the end for some threads
// of the last iteration (they still join the shuffles).
C10_HOST_DEVICE inline int64_t warp_rows_first(ThreadIndex t, int lanes) {
  return t.block * (t.threads / lanes);
}

C10_HOST_DEVICE inline int64_t warp_rows_stride(ThreadIndex t, int lanes) {
  return t.blocks * (t.threads / lanes);
}

// Element (o, 0, i) of the (outer, dim_size, inner) view, where column =
// o * inner + i.
C10_HOST_DEVICE inline int64_t column_start(
    const ops::LogSoftmaxLayout& l, int64_t column) {
  return (column / l.inner) * l.dim_size * l.inner + column % l.inner;
}

template <typename index_t, typename scalar_t>
C10_HOST_DEVICE MaxSum<at::opmath_type<scalar_t>> column_max_sum(
    const scalar_t* column, index_t dim_size, index_t inner, index_t first,
    index_t stride) {
  MaxSum<at::opmath_type<scalar_t>> s =
      empty_max_sum<at::opmath_type<scalar_t>>();
  for (index_t d = first; d < dim_size; d += stride) {
    s = add(s, static_cast<at::opmath_type<scalar_t>>(column[d * inner]));
  }
  return s;
}

template <typename index_t, typename scalar_t>
C10_HOST_DEVICE at::opmath_type<scalar_t> column_sum(
    const scalar_t* column, index_t dim_size, index_t inner, index_t first,
    index_t stride) {
  at::opmath_type<scalar_t> sum = 0;
  for (index_t d = first; d < dim_size; d += stride) {
    sum += static_cast<at::opmath_type<scalar_t>>(column[d * inner]);
  }
  return sum;
}

template <typename index_t, typename scalar_t, typename Fn>
C10_HOST_DEVICE void write_column(
    const scalar_t* in, scalar_t* out, index_t dim_size, index_t inner,
    index_t first, index_t stride, const Fn& fn) {
  for (index_t d = first; d < dim_size; d += stride) {
    out[d * inner] = fn(in[d * inner]);
  }
}

template <typename index_t, typename scalar_t, typename Fn>
C10_HOST_DEVICE void write_column(
    const scalar_t* a, const scalar_t* b, scalar_t* out, index_t dim_size,
    index_t inner, index_t first, index_t stride, const Fn& fn) {
  for (index_t d = first; d < dim_size; d += stride) {
    out[d * inner] = fn(a[d * inner], b[d * inner]);
  }
}

// columns_split_dim: a block of block_columns x dim_slices threads (the
// thread's column varying fastest, so a warp reads neighbouring columns)
// takes a tile of block_columns neighbouring columns of one outer index.
struct SplitColumn {
  int64_t start;  // of the column in the tensor; meaningless when !valid
  bool valid;     // the tile's last columns may lie past inner
  int slice;  // the thread's slice of dim: d = slice, slice + dim_slices, ...
};

C10_HOST_DEVICE inline int64_t split_tiles(
    const ops::LogSoftmaxLayout& l, int block_columns) {
  return l.outer * ((l.inner + block_columns - 1) / block_columns);
}

C10_HOST_DEVICE inline SplitColumn split_column(
    const ops::LogSoftmaxLayout& l, int block_columns, int64_t tile,
    int thread) {
  const int64_t tiles_per_outer = (l.inner + block_columns - 1) / block_columns;
  const int64_t inner_index =
      (tile % tiles_per_outer) * block_columns + thread % block_columns;
  return {
      (tile / tiles_per_outer) * l.dim_size * l.inner + inner_index,
      inner_index < l.inner, thread / block_columns};
}

// One step of the tree over slices, run after a barrier by every thread:
// the first `half` slices take in the next `half` (shared holds one partial
// a thread, in thread order). After the last step, slice 0 holds the column's.
template <typename T, typename Combine>
C10_HOST_DEVICE void combine_slices_step(
    T* shared, int thread, int block_columns, int half,
    const Combine& combine) {
  if (thread / block_columns < half) {
    shared[thread] =
        combine(shared[thread], shared[thread + half * block_columns]);
  }
}

}  // namespace ptfast::cuda::log_softmax
