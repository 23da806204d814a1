// Paged decode attention for CPU: one query token per sequence, K/V read straight from the
// block pool through each sequence's block table. No gather copy, no padding to the longest
// sequence: each (sequence, kv head) task streams its own blocks once, for all the query heads
// that share that kv head (GQA).
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
#include <cstring>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// One head's row of K or V as float32. bf16 -> f32 is a 16-bit shift, written so the compiler
// vectorizes it (the generic conversion through c10::BFloat16 does not).
template <typename T>
inline const float* load_row(const T* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(src[i]);
  return buf;
}

template <>
inline const float* load_row<float>(const float* src, float*, int64_t) { return src; }

template <>
inline const float* load_row<at::BFloat16>(const at::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(buf);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(raw[i]) << 16;
  return buf;
}

template <typename T>
void decode_task(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                 int64_t ctx, int64_t block_size, int64_t kv_heads, int64_t head_dim,
                 int64_t group, int64_t kv_head, float scale, T* out,
                 std::vector<float>& scores, std::vector<float>& qf, std::vector<float>& acc,
                 std::vector<float>& row) {
  scores.assign(group * ctx, 0.f);
  row.resize(head_dim);
  qf.resize(group * head_dim);
  acc.assign(group * head_dim, 0.f);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      qf[g * head_dim + d] = to_float(q[(kv_head * group + g) * head_dim + d]) * scale;
  const int64_t token_stride = kv_heads * head_dim;
  // Pass 1: scores for every token, all query heads of the group at once (K read once).
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = table[t / block_size] * block_size + t % block_size;
    const float* k = load_row(k_cache + slot * token_stride + kv_head * head_dim, row.data(),
                              head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * head_dim;
      float s = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) s += qg[d] * k[d];
      scores[g * ctx + t] = s;
    }
  }
  // Softmax per query head.
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores.data() + g * ctx;
    const float mx = *std::max_element(sg, sg + ctx);
    float sum = 0.f;
    for (int64_t t = 0; t < ctx; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < ctx; ++t) sg[t] *= inv;
  }
  // Pass 2: weighted sum of V (V read once).
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = table[t / block_size] * block_size + t % block_size;
    const float* v = load_row(v_cache + slot * token_stride + kv_head * head_dim, row.data(),
                              head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * ctx + t];
      float* a = acc.data() + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[(kv_head * group + g) * head_dim + d] = static_cast<T>(acc[g * head_dim + d]);
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
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf, acc, row;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kv_heads, h = task % kv_heads;
      decode_task<T>(qp + s * num_heads * head_dim, kp, vp, tables + s * max_blocks, lens[s],
                     block_size, kv_heads, head_dim, group, h, static_cast<float>(scale),
                     op + s * num_heads * head_dim, scores, qf, acc, row);
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
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over a block pool (CPU)");
}
