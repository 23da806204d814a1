// Paged decode attention for CPU: one query token per sequence, K/V read straight from the
// block pool through each sequence's block table. No gather copy, no padding to the longest
// sequence.
//
// Each task is one sequence with all its heads. A token's K (or V) row for every kv head is
// contiguous in the pool, and a block's rows are one run of memory, so reads stream within a
// block; while one block is worked on, the next block of the table is prefetched one row per
// token (blocks sit anywhere in the pool, where the hardware prefetcher can't guess them).
// Sequences are cut into one run per thread with about equal total context.
//
// Layouts (all contiguous):
//   q            (num_seqs, num_heads, head_dim)
//   k/v cache    (num_blocks, block_size, num_kv_heads, head_dim)
//   block_tables (num_seqs, max_blocks) int64
//   context_lens (num_seqs,) int64, tokens to attend to (including the current one)
//   out          (num_seqs, num_heads, head_dim)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
// bf16 -> f32 is a 16-bit shift, written so the compiler vectorizes it (the generic conversion
// through c10::BFloat16 does not).
template <>
inline void load_row<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(raw[i]) << 16;
}

inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(c + off, 0, 1);
}

struct Scratch {
  std::vector<float> q, scores, acc, row;
};

// One sequence, all heads. Pass 0 scores every token against every query head (K read once);
// then a softmax per head; pass 1 sums V weighted by those probabilities (V read once).
template <typename T>
void decode_seq(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                int64_t ctx, int64_t block_size, int64_t kv_heads, int64_t head_dim,
                int64_t group, float scale, T* out, Scratch& s) {
  const int64_t heads = kv_heads * group, stride = kv_heads * head_dim;
  const int64_t row_bytes = stride * sizeof(T);
  s.q.resize(heads * head_dim);
  s.scores.resize(heads * ctx);
  s.acc.assign(heads * head_dim, 0.f);
  s.row.resize(stride);
  load_row(q, s.q.data(), heads * head_dim);
  for (auto& x : s.q) x *= scale;
  const int64_t nblocks = (ctx + block_size - 1) / block_size;
  for (int pass = 0; pass < 2; ++pass) {
    const T* cache = pass == 0 ? k_cache : v_cache;
    for (int64_t b = 0; b < nblocks; ++b) {
      const T* base = cache + table[b] * block_size * stride;
      const T* next = b + 1 < nblocks ? cache + table[b + 1] * block_size * stride : nullptr;
      const int64_t t0 = b * block_size, n = std::min(block_size, ctx - t0);
      for (int64_t i = 0; i < n; ++i) {
        if (next) prefetch_bytes(next + i * stride, row_bytes);
        const T* src = base + i * stride;
        const float* r;
        if constexpr (std::is_same_v<T, float>) {
          r = src;
        } else {
          load_row(src, s.row.data(), stride);
          r = s.row.data();
        }
        const int64_t t = t0 + i;
        if (pass == 0) {
          for (int64_t h = 0; h < heads; ++h) {
            const float* kr = r + (h / group) * head_dim;
            const float* qh = s.q.data() + h * head_dim;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kr[d];
            s.scores[h * ctx + t] = dot;
          }
        } else {
          for (int64_t h = 0; h < heads; ++h) {
            const float* vr = r + (h / group) * head_dim;
            const float p = s.scores[h * ctx + t];
            float* a = s.acc.data() + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vr[d];
          }
        }
      }
    }
    if (pass == 0) {
      for (int64_t h = 0; h < heads; ++h) {
        float* sg = s.scores.data() + h * ctx;
        const float mx = *std::max_element(sg, sg + ctx);
        float sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; ++t) sg[t] *= inv;
      }
    }
  }
  for (int64_t i = 0; i < heads * head_dim; ++i) out[i] = static_cast<T>(s.acc[i]);
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
         torch::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  // Cut the sequences into one contiguous run per thread with about equal total context.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_seqs));
  int64_t total = 0;
  for (int64_t i = 0; i < num_seqs; ++i) total += lens[i];
  std::vector<int64_t> bounds(parts + 1, num_seqs);
  bounds[0] = 0;
  int64_t acc = 0, p = 1;
  for (int64_t i = 0; i < num_seqs && p < parts; ++i) {
    acc += lens[i];
    if (acc * parts >= total * p) bounds[p++] = i + 1;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t part = begin; part < end; ++part)
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i)
        decode_seq<T>(qp + i * num_heads * head_dim, kp, vp, tables + i * max_blocks, lens[i],
                      block_size, kv_heads, head_dim, group, static_cast<float>(scale),
                      op + i * num_heads * head_dim, s);
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention: inputs must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_decode_attention: bad ranks");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 &&
              context_lens.scalar_type() == torch::kInt64, "tables and lengths must be int64");
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat32) {
    run<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == torch::kFloat16) {
    run<at::Half>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: unsupported dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Tensors only, so the GIL is released (block_linear.cpp says why).
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over a block pool (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
