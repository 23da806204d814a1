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
//
// A low-precision cache (--kv-cache-dtype int8|fp8_e4m3, model/kv_quant.py) is read in place
// too: its pool is bytes, (num_blocks, block_size, num_kv_heads, head_dim + 2), each row
// head_dim int8 or float8_e4m3fn values and then its bfloat16 scale. A row is widened to float
// as it is read (int8 by a plain conversion, e4m3 by bit shifts: portable C++, no
// intrinsics, vectorized by the compiler), and the scale multiplies the row's dot
// product (K) or its probability (V) once, not every value. The format is an argument, chosen
// at run time; the float path compiles to exactly the code it had before.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  std::vector<float> q, scores, acc, row, row_scale;
};

// How a token's K (or V) rows for every kv head are read from the pool. `Elem` is what the
// pool holds, `stride` its elements per token; `load` returns the token's rows as float
// (kv_heads * head_dim) and, when `scaled`, one scale per kv head.
template <typename T>
struct PlainRows {
  using Elem = T;
  static constexpr bool scaled = false;
  int64_t kv_heads, head_dim;
  int64_t stride() const { return kv_heads * head_dim; }
  const float* load(const T* src, float* row, float*) const {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      load_row(src, row, kv_heads * head_dim);
      return row;
    }
  }
};

inline float bf16_bits_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities (0x7f/0xff are
// NaN, which the writer never makes). A normal value is a float32 with the exponent rebased by
// 120 and the mantissa moved up 20 bits; a subnormal one (exponent 0) is m * 2^-9. Integer
// shifts and a select, so the compiler vectorizes the loop (a table lookup it would not).
inline float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80) << 24;
  const uint32_t em = b & 0x7f;
  const uint32_t normal_bits = sign | ((em + (120u << 3)) << 20);
  float normal;
  std::memcpy(&normal, &normal_bits, 4);
  const float sub = static_cast<float>(b & 7) * (1.f / 512.f);
  return (em >> 3) ? normal : (b & 0x80 ? -sub : sub);
}

template <bool Fp8>
struct PackedRows {
  using Elem = uint8_t;
  static constexpr bool scaled = true;
  int64_t kv_heads, head_dim;
  int64_t stride() const { return kv_heads * (head_dim + 2); }
  const float* load(const uint8_t* src, float* row, float* row_scale) const {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const uint8_t* in = src + h * (head_dim + 2);
      float* r = row + h * head_dim;
      if constexpr (Fp8) {
        for (int64_t d = 0; d < head_dim; ++d) r[d] = e4m3_to_float(in[d]);
      } else {
        const int8_t* v = reinterpret_cast<const int8_t*>(in);
        for (int64_t d = 0; d < head_dim; ++d) r[d] = static_cast<float>(v[d]);
      }
      row_scale[h] = bf16_bits_to_float(in + head_dim);
    }
    return row;
  }
};

// One sequence, all heads. Pass 0 scores every token against every query head (K read once);
// then a softmax per head; pass 1 sums V weighted by those probabilities (V read once).
template <typename T, typename Rows>
void decode_seq(const T* q, const typename Rows::Elem* k_cache,
                const typename Rows::Elem* v_cache, const int64_t* table, int64_t ctx,
                int64_t block_size, const Rows& rows, int64_t group, float scale, T* out,
                Scratch& s) {
  using Elem = typename Rows::Elem;
  const int64_t kv_heads = rows.kv_heads, head_dim = rows.head_dim;
  const int64_t heads = kv_heads * group, stride = rows.stride();
  const int64_t row_bytes = stride * sizeof(Elem);
  s.q.resize(heads * head_dim);
  s.scores.resize(heads * ctx);
  s.acc.assign(heads * head_dim, 0.f);
  s.row.resize(kv_heads * head_dim);
  s.row_scale.assign(kv_heads, 1.f);
  load_row(q, s.q.data(), heads * head_dim);
  for (auto& x : s.q) x *= scale;
  const int64_t nblocks = (ctx + block_size - 1) / block_size;
  for (int pass = 0; pass < 2; ++pass) {
    const Elem* cache = pass == 0 ? k_cache : v_cache;
    for (int64_t b = 0; b < nblocks; ++b) {
      const Elem* base = cache + table[b] * block_size * stride;
      const Elem* next = b + 1 < nblocks ? cache + table[b + 1] * block_size * stride : nullptr;
      const int64_t t0 = b * block_size, n = std::min(block_size, ctx - t0);
      for (int64_t i = 0; i < n; ++i) {
        if (next) prefetch_bytes(next + i * stride, row_bytes);
        const float* r = rows.load(base + i * stride, s.row.data(), s.row_scale.data());
        const int64_t t = t0 + i;
        if (pass == 0) {
          for (int64_t h = 0; h < heads; ++h) {
            const float* kr = r + (h / group) * head_dim;
            const float* qh = s.q.data() + h * head_dim;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kr[d];
            if constexpr (Rows::scaled) dot *= s.row_scale[h / group];
            s.scores[h * ctx + t] = dot;
          }
        } else {
          for (int64_t h = 0; h < heads; ++h) {
            const float* vr = r + (h / group) * head_dim;
            float p = s.scores[h * ctx + t];
            if constexpr (Rows::scaled) p *= s.row_scale[h / group];
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

template <typename T, typename Rows>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
         torch::Tensor& out) {
  using Elem = typename Rows::Elem;
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const Rows rows{kv_heads, head_dim};
  const T* qp = q.data_ptr<T>();
  const Elem* kp = k_cache.data_ptr<Elem>();
  const Elem* vp = v_cache.data_ptr<Elem>();
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
        decode_seq<T, Rows>(qp + i * num_heads * head_dim, kp, vp, tables + i * max_blocks,
                            lens[i], block_size, rows, group, static_cast<float>(scale),
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
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() &&
              v_cache.scalar_type() == q.scalar_type(), "the cache must be q's dtype");
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat32) {
    run<float, PlainRows<float>>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16, PlainRows<at::BFloat16>>(q, k_cache, v_cache, block_tables, context_lens,
                                               scale, out);
  } else if (q.scalar_type() == torch::kFloat16) {
    run<at::Half, PlainRows<at::Half>>(q, k_cache, v_cache, block_tables, context_lens, scale,
                                       out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: unsupported dtype");
  }
  return out;
}

template <typename Rows>
void run_packed(const torch::Tensor& q, const torch::Tensor& k_cache,
                const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                const torch::Tensor& context_lens, double scale, torch::Tensor& out) {
  if (q.scalar_type() == torch::kFloat32) {
    run<float, Rows>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16, Rows>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == torch::kFloat16) {
    run<at::Half, Rows>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention_packed: unsupported dtype");
  }
}

// format: 0 int8 values, 1 float8_e4m3fn values; each row followed by its bfloat16 scale.
torch::Tensor paged_decode_attention_packed(torch::Tensor q, torch::Tensor k_cache,
                                            torch::Tensor v_cache, torch::Tensor block_tables,
                                            torch::Tensor context_lens, double scale,
                                            int64_t format) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention_packed: inputs must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_decode_attention_packed: bad ranks");
  TORCH_CHECK(k_cache.scalar_type() == torch::kUInt8 && v_cache.scalar_type() == torch::kUInt8,
              "a packed cache is uint8");
  TORCH_CHECK(k_cache.size(3) == q.size(2) + 2 && v_cache.sizes() == k_cache.sizes(),
              "packed rows must be head_dim + 2 bytes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 &&
              context_lens.scalar_type() == torch::kInt64, "tables and lengths must be int64");
  auto out = torch::empty_like(q);
  if (format == 0) {
    run_packed<PackedRows<false>>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (format == 1) {
    run_packed<PackedRows<true>>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention_packed: unknown format ", format);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Tensors only, so the GIL is released (block_linear.cpp says why).
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over a block pool (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_packed", &paged_decode_attention_packed,
        "Paged decode attention over an int8/fp8 block pool with per-row scales (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
