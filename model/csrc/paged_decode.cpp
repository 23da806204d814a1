// Paged decode attention for CPU: one query token per sequence, K/V read straight from the
// block pool through each sequence's block table. No gather copy, no padding to the longest
// sequence.
//
// A run of one sequence's tokens is worked on with all its heads. A token's K (or V) row for
// every kv head is contiguous in the pool, and a block's rows are one run of memory, so reads
// stream within a block; the next block's rows are prefetched a tile ahead (blocks sit anywhere
// in the pool, where the hardware prefetcher can't guess them). Tokens go 8 at a time: eight
// dot products in flight per head (a single dot product is a chain of dependent adds, and
// scoring one token at a time left the kernel waiting on that chain), and each head's output
// accumulator stays in registers across the tile while V rows are added in.
// With at least as many sequences as threads, sequences are cut into one run per thread with
// about equal total context. With fewer (one stream, a small batch) each sequence is cut into
// runs of whole blocks, one per thread, each run keeps its own max and sum of exp(score - max),
// and the runs are merged afterwards (flash-decoding), so a single stream uses every thread.
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
// at run time; the float path compiles to code without any of it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// Eight floats as one value: GCC/clang vector extensions, one ymm register on AVX2/AVX-512
// machines, two xmm on anything older, so the code is the same on every CI CPU.
typedef float v8f __attribute__((vector_size(32)));
constexpr int64_t kTile = 8;  // tokens scored together: eight independent FMA chains

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// a[0 : 8 * Chunks] += sum over the tile's rows of p[i] * rows[i][off : off + 8 * Chunks], with
// one accumulator per chunk of 8 held in a register across the tile: Chunks independent FMA
// chains rather than one chain through every row.
template <int Chunks>
inline void add_weighted(float* a, const float* const* rows, int64_t off, const float* p,
                         int64_t m) {
  v8f sum[Chunks];
  for (int c = 0; c < Chunks; ++c) sum[c] = load8(a + 8 * c);
  for (int64_t i = 0; i < m; ++i) {
    const v8f w = {p[i], p[i], p[i], p[i], p[i], p[i], p[i], p[i]};
    const float* row = rows[i] + off;
    for (int c = 0; c < Chunks; ++c) sum[c] += w * load8(row + 8 * c);
  }
  for (int c = 0; c < Chunks; ++c) store8(a + 8 * c, sum[c]);
}

struct Scratch {
  std::vector<float> scores, tile, tile_scale;
};

// How a token's K (or V) rows for every kv head are read from the pool. `Elem` is what the
// pool holds, `stride` its elements per token; `load` returns the token's rows as float
// (kv_heads * head_dim), written to `row` unless they can be read in place, and, when
// `scaled`, one scale per kv head.
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

// What one run of a sequence's tokens leaves behind: per query head the running max of its
// scores, the sum of exp(score - max), and the V rows summed with those weights (not yet
// divided by the sum). Runs of the same sequence merge exactly (flash-decoding).
struct Partial {
  std::vector<float> max, sum, acc;
};

// Reads tokens [t_begin, t_end) of one sequence, kTile at a time: the tile's rows are found
// through the block table (converted to float first for a packed pool), scored against every
// query head with eight dot products in flight (one FMA chain per token, so the adds don't wait
// on each other), then, after a softmax over the run, summed into each head's accumulator,
// which stays in registers across the tile. `q` is already scaled, float, (heads, head_dim).
template <typename Rows>
void attend_run(const float* q, const typename Rows::Elem* k_cache,
                const typename Rows::Elem* v_cache, const int64_t* table, int64_t t_begin,
                int64_t t_end, int64_t block_size, const Rows& rows, int64_t group,
                Partial& out, Scratch& s) {
  using Elem = typename Rows::Elem;
  const int64_t kv_heads = rows.kv_heads, head_dim = rows.head_dim;
  const int64_t heads = kv_heads * group, stride = rows.stride(), width = kv_heads * head_dim;
  const int64_t n = t_end - t_begin, vec_dim = head_dim - head_dim % 8;
  const int64_t row_bytes = stride * sizeof(Elem);
  s.scores.resize(heads * n);
  s.tile.resize(kTile * width);
  s.tile_scale.assign(kTile * kv_heads, 1.f);
  out.max.assign(heads, std::numeric_limits<float>::lowest());
  out.sum.assign(heads, 0.f);
  out.acc.assign(heads * head_dim, 0.f);
  const float* r[kTile];
  auto gather = [&](const Elem* cache, int64_t t0, int64_t m) {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = t0 + i, within = t % block_size;
      const Elem* src = cache + (table[t / block_size] * block_size + within) * stride;
      // The next block sits anywhere in the pool: fetch its row for this slot ahead of time.
      if (within + kTile >= block_size && t + kTile < t_end) {
        const int64_t ahead = t + kTile;
        prefetch_bytes(cache + (table[ahead / block_size] * block_size + ahead % block_size) *
                                   stride, row_bytes);
      }
      r[i] = rows.load(src, s.tile.data() + i * width, s.tile_scale.data() + i * kv_heads);
    }
  };
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int64_t m = std::min(kTile, t_end - t0);
    gather(k_cache, t0, m);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t off = (h / group) * head_dim;
      const float* qh = q + h * head_dim;
      float dots[kTile];
      if (m == kTile) {
        v8f acc[kTile] = {};
        for (int64_t d = 0; d < vec_dim; d += 8) {
          const v8f qv = load8(qh + d);
          for (int64_t i = 0; i < kTile; ++i) acc[i] += qv * load8(r[i] + off + d);
        }
        for (int64_t i = 0; i < kTile; ++i) dots[i] = hsum8(acc[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) {
          v8f acc = {};
          for (int64_t d = 0; d < vec_dim; d += 8) acc += load8(qh + d) * load8(r[i] + off + d);
          dots[i] = hsum8(acc);
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        float dot = dots[i];
        for (int64_t d = vec_dim; d < head_dim; ++d) dot += qh[d] * r[i][off + d];
        if constexpr (Rows::scaled) dot *= s.tile_scale[i * kv_heads + h / group];
        s.scores[h * n + (t0 - t_begin) + i] = dot;
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sg = s.scores.data() + h * n;
    const float mx = *std::max_element(sg, sg + n);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - mx);
      sum += sg[t];
    }
    out.max[h] = mx;
    out.sum[h] = sum;
  }
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int64_t m = std::min(kTile, t_end - t0);
    gather(v_cache, t0, m);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t off = (h / group) * head_dim;
      float* a = out.acc.data() + h * head_dim;
      float p[kTile];
      for (int64_t i = 0; i < m; ++i) {
        p[i] = s.scores[h * n + (t0 - t_begin) + i];
        if constexpr (Rows::scaled) p[i] *= s.tile_scale[i * kv_heads + h / group];
      }
      int64_t d = 0;
      for (; d + 64 <= vec_dim; d += 64) add_weighted<8>(a + d, r, off + d, p, m);
      for (; d + 32 <= vec_dim; d += 32) add_weighted<4>(a + d, r, off + d, p, m);
      for (; d < vec_dim; d += 8) add_weighted<1>(a + d, r, off + d, p, m);
      for (int64_t d = vec_dim; d < head_dim; ++d)
        for (int64_t i = 0; i < m; ++i) a[d] += p[i] * r[i][off + d];
    }
  }
}

// A sequence's runs, in order, into its output: rescale each to the largest max and divide by
// the total weight.
template <typename T>
void merge(const Partial* parts, int64_t count, int64_t heads, int64_t head_dim, T* out,
           std::vector<float>& tmp) {
  tmp.resize(head_dim);
  for (int64_t h = 0; h < heads; ++h) {
    float mx = std::numeric_limits<float>::lowest();
    for (int64_t c = 0; c < count; ++c) mx = std::max(mx, parts[c].max[h]);
    float total = 0.f;
    std::fill(tmp.begin(), tmp.end(), 0.f);
    for (int64_t c = 0; c < count; ++c) {
      const float w = std::exp(parts[c].max[h] - mx);
      total += w * parts[c].sum[h];
      const float* a = parts[c].acc.data() + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) tmp[d] += w * a[d];
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < head_dim; ++d) out[h * head_dim + d] = static_cast<T>(tmp[d] * inv);
  }
}

// Below this many tokens a sequence is not cut across threads: a parallel region costs more
// than the second thread saves.
constexpr int64_t kMinRun = 128;

template <typename T, typename Rows>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
         torch::Tensor& out) {
  using Elem = typename Rows::Elem;
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const Rows rows{kv_heads, head_dim};
  const Elem* kp = k_cache.data_ptr<Elem>();
  const Elem* vp = v_cache.data_ptr<Elem>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t width = num_heads * head_dim;
  // q in float, scaled once.
  std::vector<float> qf(num_seqs * width);
  load_row(q.data_ptr<T>(), qf.data(), num_seqs * width);
  const float fscale = static_cast<float>(scale);
  for (auto& x : qf) x *= fscale;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (num_seqs < threads) {
    // Fewer sequences than threads (one stream, a small batch): each sequence is cut into
    // runs of whole blocks, one per thread, and the runs merged.
    std::vector<int64_t> seq_of, begin_of, end_of, first(num_seqs + 1, 0);
    const int64_t per_seq = threads / num_seqs;
    for (int64_t i = 0; i < num_seqs; ++i) {
      const int64_t ctx = lens[i];
      const int64_t cuts = std::max<int64_t>(1, std::min<int64_t>(per_seq, ctx / kMinRun));
      const int64_t blocks = (ctx + block_size - 1) / block_size;
      first[i] = static_cast<int64_t>(seq_of.size());
      for (int64_t c = 0; c < cuts; ++c) {
        const int64_t b0 = blocks * c / cuts, b1 = blocks * (c + 1) / cuts;
        if (b0 == b1) continue;
        seq_of.push_back(i);
        begin_of.push_back(b0 * block_size);
        end_of.push_back(std::min(ctx, b1 * block_size));
      }
    }
    first[num_seqs] = static_cast<int64_t>(seq_of.size());
    const int64_t items = first[num_seqs];
    std::vector<Partial> partials(items);
    auto work = [&](int64_t b, int64_t e) {
      Scratch s;
      for (int64_t k = b; k < e; ++k) {
        const int64_t i = seq_of[k];
        attend_run<Rows>(qf.data() + i * width, kp, vp, tables + i * max_blocks, begin_of[k],
                         end_of[k], block_size, rows, group, partials[k], s);
      }
    };
    if (items > 1) {
      at::parallel_for(0, items, 1, work);
    } else {
      work(0, items);
    }
    std::vector<float> tmp;
    for (int64_t i = 0; i < num_seqs; ++i)
      merge<T>(partials.data() + first[i], first[i + 1] - first[i], num_heads, head_dim,
               op + i * width, tmp);
    return;
  }
  // Cut the sequences into one contiguous run per thread with about equal total context.
  const int64_t parts = std::min<int64_t>(threads, num_seqs);
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
    Partial one;
    std::vector<float> tmp;
    for (int64_t part = begin; part < end; ++part)
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i) {
        attend_run<Rows>(qf.data() + i * width, kp, vp, tables + i * max_blocks, 0, lens[i],
                         block_size, rows, group, one, s);
        merge<T>(&one, 1, num_heads, head_dim, op + i * width, tmp);
      }
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

// The step's slots, one int64 per sequence, each checked against the pool (blocks x
// block_size) before a writer touches anything.
static const int64_t* checked_slots(const char* what, const torch::Tensor& slot_mapping, int64_t n,
                             const torch::Tensor& cache) {
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == n && slot_mapping.is_contiguous(),
              what, ": one int64 slot per sequence");
  const int64_t slots = cache.size(0) * cache.size(1);
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < slots, what, ": slot ", slot[i],
                " is outside the pool's ", slots);
  return slot;
}

// A decode step's K/V rows (num_seqs, kv_heads, head_dim; a token's rows may sit inside a
// wider fused-QKV row) written to their slots of the pool, then attended over: what the two
// index_copy_ dispatches, the attention call and the copy of its output into place did, in one
// call. Every slot is checked against the pool before anything is written.
torch::Tensor paged_decode_attention_writing(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                             torch::Tensor k_cache, torch::Tensor v_cache,
                                             torch::Tensor slot_mapping,
                                             torch::Tensor block_tables,
                                             torch::Tensor context_lens, double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && k.dim() == 3 && v.dim() == 3,
              "paged_decode_attention_writing: bad ranks");
  const int64_t n = q.size(0), kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(k.size(0) == n && v.size(0) == n && k.size(1) == kv_heads &&
                  v.size(1) == kv_heads && k.size(2) == head_dim && v.size(2) == head_dim,
              "paged_decode_attention_writing: k/v must be (num_seqs, kv_heads, head_dim)");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == head_dim && v.stride(2) == 1 &&
                  v.stride(1) == head_dim,
              "paged_decode_attention_writing: a token's k/v rows must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() &&
                  v.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention_writing: k/v must be the cache's dtype");
  const int64_t width = kv_heads * head_dim;
  const int64_t* slot = checked_slots("paged_decode_attention_writing", slot_mapping, n, k_cache);
  const int64_t bytes = width * k_cache.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t k_step = k.stride(0) * k.element_size(), v_step = v.stride(0) * v.element_size();
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + slot[i] * bytes, kp + i * k_step, bytes);
    std::memcpy(vc + slot[i] * bytes, vp + i * v_step, bytes);
  }
  return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale);
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

// One K or V row (head_dim floats) packed as model/kv_quant.py's KVQuant.quantize packs it,
// byte for byte: scale = bfloat16(max|x| / qmax) (round to nearest even, max|x| at least
// 1e-30), values x / scale clamped to +-qmax, then rounded half to even to int8 or converted to
// float8_e4m3fn, then the scale's two bytes. This file is otherwise built with -ffast-math,
// which would turn the divisions into multiplications by a reciprocal and drop the NaN
// checks; the pool's bytes must not depend on which path wrote them.
#pragma GCC push_options
#pragma GCC optimize("no-fast-math")
namespace {
void pack_row(const float* x, int64_t head_dim, bool fp8, uint8_t* out) {
  const float qmax = fp8 ? 448.0f : 127.0f;
  float amax = 0.0f;
  bool nan = false;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float a = std::fabs(x[d]);
    nan |= std::isnan(a);
    amax = a > amax ? a : amax;
  }
  if (nan) amax = std::numeric_limits<float>::quiet_NaN();
  else if (amax < 1e-30f) amax = 1e-30f;
  const c10::BFloat16 scale(amax / qmax);
  const float s = static_cast<float>(scale);
  for (int64_t d = 0; d < head_dim; ++d) {
    float v = x[d] / s;
    if (!std::isnan(v)) v = std::min(std::max(v, -qmax), qmax);
    if (fp8) {
      out[d] = c10::Float8_e4m3fn(v).x;
    } else {
      const float r = std::nearbyint(v);  // the default mode: half to even, as torch.round
      out[d] = static_cast<uint8_t>(static_cast<int8_t>(std::isnan(r) ? 0 : static_cast<int>(r)));
    }
  }
  std::memcpy(out + head_dim, &scale.x, 2);
}
}  // namespace
#pragma GCC pop_options

// A decode step's K/V rows (num_seqs, kv_heads, head_dim float32; a token's rows may sit inside
// a wider fused-QKV row) packed into their slots of an int8/fp8 pool, then
// paged_decode_attention_packed: what KVQuant.quantize, the write and the attention call did
// in a dozen torch dispatches a layer, in one call. Every slot is checked first.
torch::Tensor paged_decode_attention_packed_writing(torch::Tensor q, torch::Tensor k,
                                                    torch::Tensor v, torch::Tensor k_cache,
                                                    torch::Tensor v_cache,
                                                    torch::Tensor slot_mapping,
                                                    torch::Tensor block_tables,
                                                    torch::Tensor context_lens, double scale,
                                                    int64_t format) {
  TORCH_CHECK(format == 0 || format == 1,
              "paged_decode_attention_packed_writing: unknown format ", format);
  TORCH_CHECK(k_cache.dim() == 4 && k.dim() == 3 && v.dim() == 3 &&
                  k_cache.scalar_type() == torch::kUInt8 && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention_packed_writing: the pools must be packed uint8 rows");
  const int64_t n = q.size(0), kv_heads = k_cache.size(2), head_dim = k_cache.size(3) - 2;
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
                  k.size(0) == n && v.size(0) == n && k.size(1) == kv_heads &&
                  v.size(1) == kv_heads && k.size(2) == head_dim && v.size(2) == head_dim &&
                  k.stride(2) == 1 && k.stride(1) == head_dim && v.stride(2) == 1 &&
                  v.stride(1) == head_dim,
              "paged_decode_attention_packed_writing: k/v must be float32 (num_seqs, kv_heads, "
              "head_dim) with each token's rows contiguous");
  const int64_t row = head_dim + 2;
  const int64_t* slot =
      checked_slots("paged_decode_attention_packed_writing", slot_mapping, n, k_cache);
  uint8_t* kc = k_cache.data_ptr<uint8_t>();
  uint8_t* vc = v_cache.data_ptr<uint8_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < kv_heads; ++h) {
      pack_row(kp + i * k.stride(0) + h * head_dim, head_dim, format == 1,
               kc + (slot[i] * kv_heads + h) * row);
      pack_row(vp + i * v.stride(0) + h * head_dim, head_dim, format == 1,
               vc + (slot[i] * kv_heads + h) * row);
    }
  return paged_decode_attention_packed(q, k_cache, v_cache, block_tables, context_lens, scale,
                                       format);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Tensors only, so the GIL is released (block_linear.cpp says why).
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over a block pool (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_writing", &paged_decode_attention_writing,
        "Write a decode step's K/V rows into the pool, then paged decode attention (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_packed", &paged_decode_attention_packed,
        "Paged decode attention over an int8/fp8 block pool with per-row scales (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_packed_writing", &paged_decode_attention_packed_writing,
        "Pack a decode step's K/V rows into an int8/fp8 pool, then attend over it (CPU)",
        py::call_guard<py::gil_scoped_release>());
  // For block_linear.cpp's DecoderStack, which calls the writing kernel from C++: both modules
  // link the same libtorch, so a torch::Tensor passes between them as it is.
  m.def("writing_capsule", [] {
    return py::capsule(reinterpret_cast<void*>(&paged_decode_attention_writing),
                       "splitserve.paged_decode_attention_writing");
  });
  m.def("packed_writing_capsule", [] {
    return py::capsule(reinterpret_cast<void*>(&paged_decode_attention_packed_writing),
                       "splitserve.paged_decode_attention_packed_writing");
  });
}
