// y = x W^T for a weight kept in 4- to 8-bit blocks of 32 along the input dimension: the
// codes and scale factors of llama.cpp's GGUF types, rearranged into tiles of 16 output
// columns, with d, m and the sub-block scales in float16 / 6-8-bit integers as the file has
// them. The weight is dequantized inside the kernel, a strip of 32 output columns at a time, to
// exactly the float32 values gguf-py's dequantization gives; products and sums are float32.
// Decode on a CPU is bound by how fast the weights stream from memory, and these blocks are
// 4-7x smaller than float32.
//
// Packed layout (built in model/block_linear.py and model/gguf_blocks.py), per tile of 16
// output columns and 32 inputs; "nib" is 16 row pairs of 16 bytes, byte c of pair p holding
// column c's low 4 bits of input 2p (low nibble) and 2p+1 (high nibble); a "plane" is 32
// uint16, bit c of entry r one more bit of column c's code at input r:
//   Q4_1: d[16] f16, m[16] f16, nib                        w = d*q + m      -> 320 bytes
//   Q8_0: d[16] f16, then 32 rows of 16 int8               w = d*q          -> 544 bytes
//   Q5_1: d[16] f16, m[16] f16, nib, plane (bit 4)         w = d*q + m      -> 384 bytes
//   Q4_K: d[16] f16, dmin[16] f16, sc[16] u8, mn[16] u8, nib
//                                                          w = (d*sc)*q - dmin*mn -> 352 bytes
//   Q5_K: Q4_K's fields, then a plane (bit 4)              as Q4_K          -> 416 bytes
//   Q6_K: d[16] f16, sc[2][16] i8 (inputs 0-15, 16-31), nib, plane (bit 4), plane (bit 5)
//                                                          w = (d*sc)*(q-32) -> 448 bytes
// Tiles are ordered [column tile][input block]. N is padded to 16 with zero tiles. Q4_0 and
// Q5_0 travel as Q4_1/Q5_1 with m = -8d / -16d (exact: a power-of-two multiple of d).
//
// Exactness: gguf-py rounds d*q and then d*q + m (K types: d*sc, dmin*mn, then D*q - M).
// Every product here has at most 24 significant bits (float16 d: 11, sc: <= 7, q: <= 6), so
// each is exact in float32 and one fused multiply-add rounds the same way as the two steps;
// the AVX-512 path uses it. The portable path spells out the multiply and the add, and the
// file is built with -ffp-contract=off so that the compiler does not fuse anything on its own.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kBlock = 32;      // inputs per quantization block
constexpr int kTile = 16;       // output columns per tile
constexpr int kStrip = 32;      // output columns per kernel pass (two tiles)
constexpr int kRows = 12;       // rows of x per register block
constexpr int64_t kRowBlock = 96;  // rows per outer block, so x stays in L2 across strips
// Inputs per inner block: the dequantized 192 x 32 strip (24 KiB) stays in L1 while every
// chunk of rows passes over it; partial sums go through y between inner blocks.
constexpr int64_t kInner = 192;

enum Format : int64_t { kQ4_1 = 0, kQ8_0 = 1, kQ5_1 = 2, kQ4_K = 3, kQ5_K = 4, kQ6_K = 5 };
constexpr int64_t kFormats = 6;
constexpr int64_t kTileBytes[kFormats] = {320, 544, 384, 352, 416, 448};

inline int64_t tile_bytes(int64_t fmt) { return kTileBytes[fmt]; }

inline float half_to_float(uint16_t h) {
  // IEEE half -> float, exact (subnormals included).
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Dequantize one tile (16 columns x 32 inputs) into out[32][ld], columns col0..col0+15.
void dequant_tile(const uint8_t* tile, int64_t fmt, float* out, int64_t ld) {
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(tile);
#if defined(__AVX512F__)
  auto half16 = [](const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  auto bytes16 = [](const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  const __m512 d = half16(dh);
  if (fmt == kQ8_0) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(tile + 32);
    for (int r = 0; r < 32; ++r) {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * r)));
      _mm512_storeu_ps(out + r * ld, _mm512_mul_ps(d, _mm512_cvtepi32_ps(v)));
    }
    return;
  }
  // Every other format: 4-bit codes in `nib`, up to two planes of higher bits, and per
  // column (and, for Q6_K, per half block) a scale and an offset: w = s*q + o.
  const uint8_t* nib;
  const uint16_t *plane4 = nullptr, *plane5 = nullptr;
  __m512 s0, s1, o0, o1;
  if (fmt == kQ4_1 || fmt == kQ5_1) {
    s0 = s1 = d;
    o0 = o1 = half16(dh + 16);
    nib = tile + 64;
    if (fmt == kQ5_1) plane4 = reinterpret_cast<const uint16_t*>(tile + 320);
  } else if (fmt == kQ4_K || fmt == kQ5_K) {
    const __m512 sc = _mm512_cvtepi32_ps(bytes16(tile + 64));
    const __m512 mn = _mm512_cvtepi32_ps(bytes16(tile + 80));
    s0 = s1 = _mm512_mul_ps(d, sc);
    o0 = o1 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(half16(dh + 16), mn));
    nib = tile + 96;
    if (fmt == kQ5_K) plane4 = reinterpret_cast<const uint16_t*>(tile + 352);
  } else {  // kQ6_K
    const int8_t* sc = reinterpret_cast<const int8_t*>(tile + 32);
    s0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)))));
    s1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16)))));
    o0 = o1 = _mm512_setzero_ps();
    nib = tile + 64;
    plane4 = reinterpret_cast<const uint16_t*>(tile + 320);
    plane5 = reinterpret_cast<const uint16_t*>(tile + 384);
  }
  const __m512i low = _mm512_set1_epi32(0x0f), sixteen = _mm512_set1_epi32(16);
  const __m512i thirty_two = _mm512_set1_epi32(32);
  for (int p = 0; p < 16; ++p) {
    const __m512i v = bytes16(nib + 16 * p);
    __m512i q[2] = {_mm512_and_si512(v, low), _mm512_srli_epi32(v, 4)};
    for (int j = 0; j < 2; ++j) {
      const int r = 2 * p + j;
      if (plane4) q[j] = _mm512_mask_add_epi32(q[j], static_cast<__mmask16>(plane4[r]), q[j], sixteen);
      if (plane5) {
        q[j] = _mm512_mask_add_epi32(q[j], static_cast<__mmask16>(plane5[r]), q[j], thirty_two);
        q[j] = _mm512_sub_epi32(q[j], thirty_two);  // Q6_K codes are centred on 32
      }
      const __m512 s = r < 16 ? s0 : s1, o = r < 16 ? o0 : o1;
      _mm512_storeu_ps(out + r * ld, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(q[j]), o));
    }
  }
#else
  float d[16];
  for (int c = 0; c < 16; ++c) d[c] = half_to_float(dh[c]);
  if (fmt == kQ8_0) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(tile + 32);
    for (int r = 0; r < 32; ++r)
      for (int c = 0; c < 16; ++c) out[r * ld + c] = d[c] * static_cast<float>(qs[16 * r + c]);
    return;
  }
  float s[2][16], o[2][16];
  const uint8_t* nib;
  const uint16_t *plane4 = nullptr, *plane5 = nullptr;
  for (int c = 0; c < 16; ++c) {
    if (fmt == kQ4_1 || fmt == kQ5_1) {
      s[0][c] = s[1][c] = d[c];
      o[0][c] = o[1][c] = half_to_float(dh[16 + c]);
    } else if (fmt == kQ4_K || fmt == kQ5_K) {
      s[0][c] = s[1][c] = d[c] * static_cast<float>(tile[64 + c]);
      o[0][c] = o[1][c] = -(half_to_float(dh[16 + c]) * static_cast<float>(tile[80 + c]));
    } else {
      const int8_t* sc = reinterpret_cast<const int8_t*>(tile + 32);
      s[0][c] = d[c] * static_cast<float>(sc[c]);
      s[1][c] = d[c] * static_cast<float>(sc[16 + c]);
      o[0][c] = o[1][c] = 0.0f;
    }
  }
  if (fmt == kQ4_1 || fmt == kQ5_1) {
    nib = tile + 64;
    if (fmt == kQ5_1) plane4 = reinterpret_cast<const uint16_t*>(tile + 320);
  } else if (fmt == kQ4_K || fmt == kQ5_K) {
    nib = tile + 96;
    if (fmt == kQ5_K) plane4 = reinterpret_cast<const uint16_t*>(tile + 352);
  } else {
    nib = tile + 64;
    plane4 = reinterpret_cast<const uint16_t*>(tile + 320);
    plane5 = reinterpret_cast<const uint16_t*>(tile + 384);
  }
  for (int r = 0; r < 32; ++r) {
    const int h = r < 16 ? 0 : 1;
    for (int c = 0; c < 16; ++c) {
      const uint8_t b = nib[16 * (r / 2) + c];
      int q = (r % 2 == 0) ? (b & 0x0f) : (b >> 4);
      if (plane4 && ((plane4[r] >> c) & 1)) q += 16;
      if (plane5) q += ((plane5[r] >> c) & 1) ? 0 : -32;
      out[r * ld + c] = s[h][c] * static_cast<float>(q) + o[h][c];
    }
  }
#endif
}

// out[r][0:ncols] = sum_k x[r][k] * w[k][0:32] for R rows; w is the dequantized strip [K][32].
template <int R>
void strip_kernel(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                  int64_t ncols, bool accumulate) {
#if defined(__AVX512F__)
  const __mmask16 m0 = ncols >= 16 ? 0xffff : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? 0xffff
                       : ncols <= 16 ? 0
                                     : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = accumulate ? _mm512_maskz_loadu_ps(m0, y + r * ldy) : _mm512_setzero_ps();
    acc1[r] = accumulate ? _mm512_maskz_loadu_ps(m1, y + r * ldy + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_load_ps(w + k * kStrip);
    const __m512 w1 = _mm512_load_ps(w + k * kStrip + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * ldx + k]);
      acc0[r] = _mm512_fmadd_ps(b, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(b, w1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, acc0[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, acc1[r]);
  }
#else
  float acc[R][kStrip] = {};
  if (accumulate)
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < ncols; ++c) acc[r][c] = y[r * ldy + c];
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float b = x[r * ldx + k];
      for (int c = 0; c < kStrip; ++c) acc[r][c] = std::fma(b, w[k * kStrip + c], acc[r][c]);
    }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = acc[r][c];
#endif
}

using StripFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                        bool);
const StripFn kStripFns[kRows + 1] = {
    nullptr,          strip_kernel<1>,  strip_kernel<2>, strip_kernel<3>, strip_kernel<4>,
    strip_kernel<5>,  strip_kernel<6>,  strip_kernel<7>, strip_kernel<8>, strip_kernel<9>,
    strip_kernel<10>, strip_kernel<11>, strip_kernel<12>};

void check_packed(const torch::Tensor& packed, int64_t fmt, int64_t n, int64_t k) {
  TORCH_CHECK(fmt >= 0 && fmt < kFormats, "block_linear: unknown format ", fmt);
  TORCH_CHECK(n > 0 && k > 0 && k % kBlock == 0, "block_linear: K must be a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 1,
              "block_linear: packed weight must be a contiguous uint8 vector");
  const int64_t tiles = (n + kTile - 1) / kTile * (k / kBlock);
  TORCH_CHECK(packed.numel() == tiles * tile_bytes(fmt), "block_linear: packed size ",
              packed.numel(), " does not match N=", n, " K=", k);
}

}  // namespace

// x: (M, K) float32 contiguous -> (M, N) float32.
torch::Tensor block_linear(torch::Tensor x, torch::Tensor packed, int64_t fmt, int64_t n) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "block_linear: x must be a contiguous 2-d float32 tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(packed, fmt, n, K);
  auto y = torch::empty({M, n}, x.options());
  if (M == 0) return y;
  const int64_t nblk = K / kBlock, tbytes = tile_bytes(fmt);
  const int64_t strips = (n + kStrip - 1) / kStrip;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m0);
    at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
      // One inner block of dequantized weights per thread: 192 x 32 floats, 64-byte aligned.
      std::vector<float> buf(std::min(K, kInner) * kStrip + 16);
      float* w = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
      for (int64_t s = begin; s < end; ++s) {
        const int64_t col0 = s * kStrip, ncols = std::min<int64_t>(kStrip, n - col0);
        for (int64_t k0 = 0; k0 < K; k0 += kInner) {
          const int64_t kc = std::min(kInner, K - k0);
          // Ask for the next inner block's tiles now, so they arrive while this one computes.
          const int64_t ns = k0 + kInner < K ? s : s + 1, nk0 = k0 + kInner < K ? k0 + kInner : 0;
          if (ns < end) {
            const int64_t nkc = std::min(kInner, K - nk0);
            for (int64_t t = ns * 2; t < std::min(ns * 2 + 2, (n + kTile - 1) / kTile); ++t) {
              const char* p = reinterpret_cast<const char*>(wp + (t * nblk + nk0 / kBlock) * tbytes);
              for (int64_t off = 0; off < nkc / kBlock * tbytes; off += 64)
                __builtin_prefetch(p + off, 0, 2);
            }
          }
          for (int half = 0; half < 2; ++half) {
            const int64_t tile_col = s * 2 + half;
            if (tile_col * kTile >= n) {  // no second tile: its columns are never stored
              for (int64_t k = 0; k < kc; ++k) std::memset(w + k * kStrip + 16, 0, 16 * sizeof(float));
              continue;
            }
            const uint8_t* tiles = wp + (tile_col * nblk + k0 / kBlock) * tbytes;
            for (int64_t b = 0; b < kc / kBlock; ++b)
              dequant_tile(tiles + b * tbytes, fmt, w + b * kBlock * kStrip + half * kTile, kStrip);
          }
          // Rows in equal chunks (16 -> 8 + 8, not 12 + 4): a short chunk wastes the strip.
          const int64_t chunks = (rows + kRows - 1) / kRows, per = (rows + chunks - 1) / chunks;
          for (int64_t r0 = 0; r0 < rows; r0 += per) {
            const int64_t R = std::min<int64_t>(per, rows - r0);
            kStripFns[R](xp + (m0 + r0) * K + k0, K, w, kc, yp + (m0 + r0) * n + col0, n, ncols,
                         k0 > 0);
          }
        }
      }
    });
  }
  return y;
}

// The dense float32 weight (N, K), for tests and for checking a packing.
torch::Tensor block_dequantize(torch::Tensor packed, int64_t fmt, int64_t n, int64_t k) {
  check_packed(packed, fmt, n, k);
  const int64_t nblk = k / kBlock, tbytes = tile_bytes(fmt), ntiles = (n + kTile - 1) / kTile;
  std::vector<float> tmp(kBlock * kTile);
  auto out = torch::empty({n, k}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  for (int64_t t = 0; t < ntiles; ++t)
    for (int64_t b = 0; b < nblk; ++b) {
      dequant_tile(wp + (t * nblk + b) * tbytes, fmt, tmp.data(), kTile);
      for (int c = 0; c < kTile && t * kTile + c < n; ++c)
        for (int r = 0; r < kBlock; ++r) op[(t * kTile + c) * k + b * kBlock + r] = tmp[r * kTile + c];
    }
  return out;
}

// Rows `ids` of the dense float32 weight, (len(ids), K): an embedding lookup straight from the
// tiles. Each row comes out of the same dequantization as block_dequantize, so it is exact.
torch::Tensor block_rows(torch::Tensor packed, int64_t fmt, int64_t n, int64_t k, torch::Tensor ids) {
  check_packed(packed, fmt, n, k);
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "block_rows: ids must be 1-D int64");
  const auto idc = ids.contiguous();
  const int64_t m = idc.numel(), nblk = k / kBlock, tbytes = tile_bytes(fmt);
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "block_rows: id ", ip[i], " outside 0..", n - 1);
  auto out = torch::empty({m, k}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(kBlock * kTile);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = ip[i] / kTile, c = ip[i] % kTile;
      for (int64_t b = 0; b < nblk; ++b) {
        dequant_tile(wp + (t * nblk + b) * tbytes, fmt, tmp.data(), kTile);
        for (int r = 0; r < kBlock; ++r) op[i * k + b * kBlock + r] = tmp[r * kTile + c];
      }
    }
  });
  return out;
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// at::parallel_for splits the strips over torch's threads only when this file is built with
// OpenMP; without it the kernel would quietly run on one thread.
bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

// The kernels touch only tensors, so they let go of the GIL: a worker's gRPC threads (and a
// pipeline stage's event loop) then run while a step computes, instead of waiting for the
// interpreter's switch interval between two calls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_linear", &block_linear, "y = x W^T with W in GGUF-type tiles (float32 math)",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_dequantize", &block_dequantize, "the packed weight as dense float32 (N, K)",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_rows", &block_rows, "rows of the packed weight as dense float32 (a lookup)",
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &has_avx512, "whether the kernel was built with AVX-512");
  m.def("has_openmp", &has_openmp, "whether the kernel was built with OpenMP (threads)");
}
