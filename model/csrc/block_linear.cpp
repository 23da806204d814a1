// y = x W^T for a weight kept in 4- to 8-bit blocks of 32 along the input dimension: the
// codes and scale factors of llama.cpp's GGUF types, rearranged into tiles of 16 output
// columns, with d, m and the sub-block scales in float16 / 6-8-bit integers as the file has
// them. Decode on a CPU is bound by how fast the weights stream from memory, and these blocks
// are 4-7x smaller than float32.
//
// Packed layout (built in model/block_linear.py), per tile of 16 output columns and 32
// inputs. Codes go in groups of 4 inputs, so that 64 bytes hold one group for all 16 columns
// with byte 4c+k = column c's code at input 4g+k: the operand order of a VNNI dot product (4
// adjacent bytes per 32-bit lane), and one shift and mask away from 16 float32 lanes.
//   nib:   4 chunks of 64 bytes; byte 4c+k of chunk h holds column c's low 4 bits of input
//          8h+k (low nibble) and of input 8h+4+k (high nibble);
//   plane: 8 little-endian uint64 masks; bit 4c+k of mask g is one more bit of column c's
//          code at input 4g+k;
//   codes: Q8_0's 8 groups of 64 int8, byte 4c+k of group g = column c at input 4g+k.
//   Q4_1: d[16] f16, m[16] f16, nib                        w = d*q + m      -> 320 bytes
//   Q8_0: d[16] f16, codes                                 w = d*q          -> 544 bytes
//   Q5_1: d[16] f16, m[16] f16, nib, plane (bit 4)         w = d*q + m      -> 384 bytes
//   Q4_K: d[16] f16, dmin[16] f16, sc[16] u8, mn[16] u8, nib
//                                                          w = (d*sc)*q - dmin*mn -> 352 bytes
//   Q5_K: Q4_K's fields, then a plane (bit 4)              as Q4_K          -> 416 bytes
//   Q6_K: d[16] f16, sc[2][16] i8 (inputs 0-15, 16-31), nib, plane (bit 4), plane (bit 5)
//                                                          w = (d*sc)*(q-32) -> 448 bytes
// Tiles are ordered [column tile][input block]. N is padded to 16 with zero tiles. Q4_0 and
// Q5_0 travel as Q4_1/Q5_1 with m = -8d / -16d (exact: a power-of-two multiple of d).
//
// Two ways to multiply:
// - block_linear, float32: the weight is dequantized inside the kernel, a strip of 32 output
//   columns at a time, to exactly the float32 values gguf-py gives; products and sums are
//   float32. This is the path the exactness tests hold to Hugging Face's outputs.
// - block_linear_int8, as llama.cpp multiplies: each row of x is quantized to int8 per block
//   of 32 inputs (scale amax/127, round to nearest even), each block's integer dot products
//   come from VNNI (vpdpbusd: unsigned weight codes x signed activations, 4 pairs per 32-bit
//   lane) and are scaled once per block: y += (s_w * s_x) * dot + o_w * (s_x * sum(q_x)).
//   Q8_0's signed codes are offset by 128 to be unsigned and the offset taken back out with
//   the same sum; Q6_K's two half-block scales take one dot each. It reads the same tiles and
//   does a fraction of the float path's work per weight; rounding the activations costs some
//   accuracy (docs/benchmarks.md measures it). Without AVX-512 VNNI an AVX2 kernel
//   (vpmaddubsw + vpmaddwd), and without AVX2 a portable loop, compute the same numbers bit
//   for bit: the dots are integers, then the same float operations in the same order, per
//   column.
//
// Exactness of the float path: gguf-py rounds d*q and then d*q + m (K types: d*sc, dmin*mn,
// then D*q - M). Every product here has at most 24 significant bits (float16 d: 11, sc: <= 7,
// q: <= 6), so each is exact in float32 and one fused multiply-add rounds the same way as the
// two steps; the AVX-512 path uses it. The portable path spells out the multiply and the add,
// and the file is built with -ffp-contract=off so that the compiler does not fuse anything on
// its own.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// The vector paths need AVX-512 F and BW (byte masks); the int8 one also VNNI.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPLITSERVE_AVX512 1
#include <immintrin.h>
#endif
#if defined(SPLITSERVE_AVX512) && defined(__AVX512VNNI__)
#define SPLITSERVE_VNNI 1
#endif
// AMX (Sapphire Rapids and later): the int8 path's larger batches go through tile dot products;
// the kernel still asks Linux for the tile state at run time (amx_permitted) and falls back to
// VNNI if refused.
#if defined(SPLITSERVE_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define SPLITSERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <atomic>
#endif
#if !defined(SPLITSERVE_VNNI) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPLITSERVE_AVX2 1
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

// Where a tile's parts start.
struct Fields {
  const uint16_t* d;     // d[16] float16, then m or dmin for the formats that have one
  const uint8_t* codes;  // nib, or Q8_0's int8 codes
  const uint8_t* plane4 = nullptr;
  const uint8_t* plane5 = nullptr;
};

inline Fields fields_of(const uint8_t* tile, int64_t fmt) {
  Fields f{reinterpret_cast<const uint16_t*>(tile), tile + 64};
  if (fmt == kQ8_0) f.codes = tile + 32;
  if (fmt == kQ4_K || fmt == kQ5_K) f.codes = tile + 96;
  if (fmt == kQ5_1 || fmt == kQ6_K) f.plane4 = tile + 320;
  if (fmt == kQ5_K) f.plane4 = tile + 352;
  if (fmt == kQ6_K) f.plane5 = tile + 384;
  return f;
}

// Per column c: w = s[h][c] * code + o[c] for inputs in half h (0: 0-15, 1: 16-31), with
// Q6_K's codes centred (code - 32) and Q8_0's signed. Every product is exact (see the top).
void scales_of(const uint8_t* tile, int64_t fmt, float s[2][16], float o[16]) {
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(tile);
  for (int c = 0; c < 16; ++c) {
    const float d = half_to_float(dh[c]);
    s[0][c] = s[1][c] = d;
    o[c] = 0.0f;
    if (fmt == kQ4_1 || fmt == kQ5_1) {
      o[c] = half_to_float(dh[16 + c]);
    } else if (fmt == kQ4_K || fmt == kQ5_K) {
      s[0][c] = s[1][c] = d * static_cast<float>(tile[64 + c]);
      o[c] = -(half_to_float(dh[16 + c]) * static_cast<float>(tile[80 + c]));
    } else if (fmt == kQ6_K) {
      const int8_t* sc = reinterpret_cast<const int8_t*>(tile + 32);
      s[0][c] = d * static_cast<float>(sc[c]);
      s[1][c] = d * static_cast<float>(sc[16 + c]);
    }
  }
}

// Column c's code at input r: Q8_0's signed value; the others' unsigned code (Q6_K: 0..63).
inline int code_at(const Fields& f, int64_t fmt, int c, int r) {
  const int j = 4 * c + r % 4;  // byte within a 64-byte group
  if (fmt == kQ8_0) return static_cast<int8_t>(f.codes[64 * (r / 4) + j]);
  const uint8_t b = f.codes[64 * (r / 8) + j];
  int q = r % 8 < 4 ? (b & 0x0f) : (b >> 4);
  if (f.plane4 && ((f.plane4[8 * (r / 4) + j / 8] >> (j % 8)) & 1)) q += 16;
  if (f.plane5 && ((f.plane5[8 * (r / 4) + j / 8] >> (j % 8)) & 1)) q += 32;
  return q;
}

#if defined(SPLITSERVE_AVX512)
inline __mmask64 load_mask(const uint8_t* p) {
  uint64_t m;
  std::memcpy(&m, p, 8);
  return static_cast<__mmask64>(m);
}

// Group g's codes for all 16 columns, byte 4c+k = input 4g+k: Q8_0's signed bytes; the
// others' unsigned codes with their high bits added (Q6_K: 0..63).
inline __m512i group_codes(const Fields& f, int64_t fmt, int g) {
  if (fmt == kQ8_0) return _mm512_loadu_si512(f.codes + 64 * g);
  __m512i v = _mm512_loadu_si512(f.codes + 64 * (g >> 1));
  if (g & 1) v = _mm512_srli_epi16(v, 4);
  v = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
  if (f.plane4) v = _mm512_mask_add_epi8(v, load_mask(f.plane4 + 8 * g), v, _mm512_set1_epi8(16));
  if (f.plane5) v = _mm512_mask_add_epi8(v, load_mask(f.plane5 + 8 * g), v, _mm512_set1_epi8(32));
  return v;
}

inline __m512 half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 bytes16_ps(const uint8_t* p, bool is_signed) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}

// The 16 columns' s (per half) and o as vectors; the same values scales_of gives.
inline void scale_vectors(const uint8_t* tile, int64_t fmt, __m512& s0, __m512& s1, __m512& o) {
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(tile);
  const __m512 d = half16(dh);
  s0 = s1 = d;
  o = _mm512_setzero_ps();
  if (fmt == kQ4_1 || fmt == kQ5_1) {
    o = half16(dh + 16);
  } else if (fmt == kQ4_K || fmt == kQ5_K) {
    s0 = s1 = _mm512_mul_ps(d, bytes16_ps(tile + 64, false));
    o = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(half16(dh + 16), bytes16_ps(tile + 80, false)));
  } else if (fmt == kQ6_K) {
    s0 = _mm512_mul_ps(d, bytes16_ps(tile + 32, true));
    s1 = _mm512_mul_ps(d, bytes16_ps(tile + 48, true));
  }
}
#endif

// Dequantize one tile (16 columns x 32 inputs) into out[32][ld], columns col0..col0+15.
void dequant_tile(const uint8_t* tile, int64_t fmt, float* out, int64_t ld) {
  const Fields f = fields_of(tile, fmt);
#if defined(SPLITSERVE_AVX512)
  __m512 s0, s1, o;
  scale_vectors(tile, fmt, s0, s1, o);
  const __m512i byte = _mm512_set1_epi32(0xff), thirty_two = _mm512_set1_epi32(32);
  for (int g = 0; g < 8; ++g) {
    const __m512i v = group_codes(f, fmt, g);
    const __m512 s = g < 4 ? s0 : s1;
    for (int k = 0; k < 4; ++k) {
      __m512i q;
      if (fmt == kQ8_0) {
        q = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * k), 24);
      } else {
        q = _mm512_and_si512(_mm512_srli_epi32(v, 8 * k), byte);
        if (fmt == kQ6_K) q = _mm512_sub_epi32(q, thirty_two);
      }
      _mm512_storeu_ps(out + (4 * g + k) * ld, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(q), o));
    }
  }
#else
  float s[2][16], o[16];
  scales_of(tile, fmt, s, o);
  for (int r = 0; r < 32; ++r)
    for (int c = 0; c < 16; ++c) {
      const int q = code_at(f, fmt, c, r) - (fmt == kQ6_K ? 32 : 0);
      out[r * ld + c] = s[r / 16][c] * static_cast<float>(q) + o[c];
    }
#endif
}

// out[r][0:ncols] = sum_k x[r][k] * w[k][0:32] for R rows; w is the dequantized strip [K][32].
template <int R>
void strip_kernel(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                  int64_t ncols, bool accumulate) {
#if defined(SPLITSERVE_AVX512)
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

// --- int8 activations (block_linear_int8) ---

constexpr int kInt8Rows = 8;  // rows of x per pass over a tile column (accumulators in zmm)

// One row of x (K floats) -> q (K int8), the scale of each block of 32 (amax / 127) and the
// sums of q over each half block.
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* sums) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
#if defined(SPLITSERVE_AVX512)
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));  // nearest, ties to even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16), _mm512_cvtepi32_epi8(q1));
    sums[2 * b] = _mm512_reduce_add_epi32(q0);
    sums[2 * b + 1] = _mm512_reduce_add_epi32(q1);
#else
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    sums[2 * b] = sums[2 * b + 1] = 0;
    for (int i = 0; i < kBlock; ++i) {
      const float v = std::nearbyint(xb[i] * inv);  // the default mode: nearest, ties to even
      const int qi = std::fabs(v) <= 127.0f ? static_cast<int>(v) : 0;  // NaN -> 0, as cvtps
      q[b * kBlock + i] = static_cast<int8_t>(qi);
      sums[2 * b + i / 16] += qi;
    }
#endif
    d[b] = amax / 127.0f;
  }
}

// y[r][0:ncols] for R rows of quantized x against one tile column (nblk tiles).
struct Int8Args {
  const uint8_t* tiles;
  int64_t nblk, tbytes, K;
  const int8_t* xq;
  const float* xd;
  const int32_t* xs;
  float* y;
  int64_t ldy, ncols;
};

#if defined(SPLITSERVE_VNNI)
// One block's integer dots of one row added into that row's 16 accumulators: the float
// operations every vector path shares, in one order, so VNNI and AMX give the same numbers bit
// for bit. `dot`: the block's signed dots (Q6_K: its first 16 inputs', `hi` the other 16's);
// da_sum = da * float(sum of the row's block codes), which Q6_K and Q8_0 do not use.
template <int FMT>
inline __m512 add_block(__m512 acc, __m512i dot, __m512i hi, __m512 s0, __m512 s1, __m512 o,
                        float da, float da_sum, int32_t sum_lo, int32_t sum_hi) {
  const __m512 vda = _mm512_set1_ps(da);
  if (FMT == kQ6_K) {  // codes are q + 32, one scale per half block
    dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(32 * sum_lo));
    hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(32 * sum_hi));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s0, vda), acc);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s1, vda), acc);
  }
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s0, vda), acc);
  return FMT == kQ8_0 ? acc : _mm512_fmadd_ps(o, _mm512_set1_ps(da_sum), acc);
}

template <int FMT, int R>
void int8_tile(const Int8Args& a) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < a.nblk; ++b) {
    const uint8_t* tile = a.tiles + b * a.tbytes;
    if (b + 2 < a.nblk) __builtin_prefetch(tile + 2 * a.tbytes, 0, 0);
    const Fields f = fields_of(tile, FMT);
    __m512i w[8];
    for (int g = 0; g < 8; ++g) {
      w[g] = group_codes(f, FMT, g);
      if (FMT == kQ8_0) w[g] = _mm512_xor_si512(w[g], flip);  // q + 128: unsigned for vpdpbusd
    }
    __m512 s0, s1, o;
    scale_vectors(tile, FMT, s0, s1, o);
    for (int r = 0; r < R; ++r) {
      const int8_t* qb = a.xq + r * a.K + b * kBlock;
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      for (int g = 0; g < 4; ++g) {
        int32_t x0, x1;
        std::memcpy(&x0, qb + 4 * g, 4);
        std::memcpy(&x1, qb + 16 + 4 * g, 4);
        lo = _mm512_dpbusd_epi32(lo, w[g], _mm512_set1_epi32(x0));
        hi = _mm512_dpbusd_epi32(hi, w[g + 4], _mm512_set1_epi32(x1));
      }
      const int64_t i = r * a.nblk + b;
      const float da = a.xd[i];
      const int32_t sum_lo = a.xs[2 * i], sum_hi = a.xs[2 * i + 1];
      const float da_sum = da * static_cast<float>(sum_lo + sum_hi);
      if (FMT == kQ6_K) {
        acc[r] = add_block<FMT>(acc[r], lo, hi, s0, s1, o, da, da_sum, sum_lo, sum_hi);
        continue;
      }
      __m512i dot = _mm512_add_epi32(lo, hi);
      if (FMT == kQ8_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * (sum_lo + sum_hi)));
      acc[r] = add_block<FMT>(acc[r], dot, hi, s0, s1, o, da, da_sum, sum_lo, sum_hi);
    }
  }
  const __mmask16 m = a.ncols >= 16 ? 0xffff : static_cast<__mmask16>((1u << a.ncols) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(a.y + r * a.ldy, m, acc[r]);
}

#if defined(SPLITSERVE_AMX)
// AMX: one tile instruction multiplies 16 rows of x by a block's 16 columns x 32 inputs
// (TDPBSUD: signed activations x unsigned codes; TDPBSSD for Q8_0's signed codes), which gives
// the integer each row's VNNI dots sum to, with no +128 offset. A tile's codes are already in
// the B-operand layout (byte 4c+k of group g = column c, input 4g+k), so unpacking them is the
// VNNI path's group_codes stored to memory. The dots come out of the tile one block at a time,
// since every block has its own scales, and then go through the VNNI path's float operations
// in its order: the two paths give the same numbers bit for bit.
constexpr int64_t kAmxMinRows = 8;  // below it VNNI (bench linear: at par at 6-8 rows)
std::atomic<bool> g_amx_enabled{true};

// Linux hands a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); a tile instruction before that dies with SIGILL.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 and 6, 7 the dots (16 rows x 16 int32; two sets, so that one block's tile work
// runs while the previous block's dots are scaled); 2 x, 16 rows x 32 int8; 3 the codes, 8
// groups of 64; 4 and 5 the same for half a block (Q6_K's two scales: 16 inputs, 4 groups).
void amx_configure() {
  TileConfig c;
  const int rows[8] = {16, 16, 16, 8, 16, 4, 16, 16}, bytes[8] = {64, 64, 32, 64, 16, 64, 64, 64};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows[t]);
    c.colsb[t] = static_cast<uint16_t>(bytes[t]);
  }
  _tile_loadconfig(&c);
}

// One block's integer dots for 16 rows of x into out[0:256] (Q6_K: its second half's into
// out[256:512]), through dot tiles C0 and C1. The tile intrinsics take the tile's number as
// text (it goes into the instruction), hence a macro rather than a template parameter.
#define SPLITSERVE_AMX_DOTS(C0, C1)          \
  if (FMT == kQ6_K) {                        \
    _tile_loadd(4, xb, a.K);                 \
    _tile_loadd(5, codes, 64);               \
    _tile_zero(C0);                          \
    _tile_dpbsud(C0, 4, 5);                  \
    _tile_loadd(4, xb + 16, a.K);            \
    _tile_loadd(5, codes + 256, 64);         \
    _tile_zero(C1);                          \
    _tile_dpbsud(C1, 4, 5);                  \
    _tile_stored(C1, out + 256, 64);         \
  } else {                                   \
    _tile_loadd(2, xb, a.K);                 \
    _tile_loadd(3, codes, 64);               \
    _tile_zero(C0);                          \
    if (FMT == kQ8_0)                        \
      _tile_dpbssd(C0, 2, 3);                \
    else                                     \
      _tile_dpbsud(C0, 2, 3);                \
  }                                          \
  _tile_stored(C0, out, 64);

// One block's dots, its codes already unpacked at `codes`; `second`: the other pair of tiles.
template <int FMT>
inline void amx_block_dots(const Int8Args& a, const uint8_t* codes, const int8_t* xb,
                           int32_t* out, bool second) {
  if (second) {
    SPLITSERVE_AMX_DOTS(6, 7)
  } else {
    SPLITSERVE_AMX_DOTS(0, 1)
  }
}
#undef SPLITSERVE_AMX_DOTS

// Like int8_tile, for all M rows of x (xq padded with zero rows to a multiple of 16). xo[i]:
// da * sum(q) of row-block i, worked out once per call rather than per tile column and row
// (measured: a model pass at 128 rows 1.30x VNNI's speed when computed here, 1.75-1.92x
// with it). `work`: room
// for the tile column's unpacked codes and scale vectors (amx_work_bytes). The codes are
// unpacked for all blocks first: a tile load right after the vector stores that wrote its
// bytes waits for them to leave the store buffer, which stalled every block when the two
// alternated.
inline int64_t amx_work_bytes(int64_t nblk) { return nblk * (8 * 64 + 3 * 64); }

template <int FMT>
void amx_tile_column(const Int8Args& a, int64_t M, const float* xo, uint8_t* work) {
  uint8_t* codes = work;
  __m512* scales = reinterpret_cast<__m512*>(work + a.nblk * 8 * 64);  // s0, s1, o per block
  for (int64_t b = 0; b < a.nblk; ++b) {
    const uint8_t* tile = a.tiles + b * a.tbytes;
    if (b + 2 < a.nblk) __builtin_prefetch(tile + 2 * a.tbytes, 0, 0);
    const Fields f = fields_of(tile, FMT);
    for (int g = 0; g < 8; ++g) _mm512_store_si512(codes + b * 512 + 64 * g, group_codes(f, FMT, g));
    scale_vectors(tile, FMT, scales[3 * b], scales[3 * b + 1], scales[3 * b + 2]);
  }
  alignas(64) int32_t dots[2][2 * 16 * 16];
  for (int64_t r0 = 0; r0 < M; r0 += 16) {
    const int R = static_cast<int>(std::min<int64_t>(16, M - r0));
    const int8_t* xr = a.xq + r0 * a.K;
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    amx_block_dots<FMT>(a, codes, xr, dots[0], false);
    for (int64_t b = 0; b < a.nblk; ++b) {
      if (b + 1 < a.nblk) {  // the next block's tile work first: it overlaps the scaling below
        const int64_t nb = b + 1;
        amx_block_dots<FMT>(a, codes + nb * 512, xr + nb * kBlock, dots[nb & 1], nb & 1);
      }
      const int32_t* d = dots[b & 1];
      const __m512 s0 = scales[3 * b], s1 = scales[3 * b + 1], o = scales[3 * b + 2];
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * a.nblk + b;
        const __m512i dot = _mm512_load_si512(d + 16 * r);
        const __m512i hi = FMT == kQ6_K ? _mm512_load_si512(d + 256 + 16 * r) : dot;
        acc[r] = add_block<FMT>(acc[r], dot, hi, s0, s1, o, a.xd[i], xo[i], a.xs[2 * i],
                                a.xs[2 * i + 1]);
      }
    }
    const __mmask16 m = a.ncols >= 16 ? 0xffff : static_cast<__mmask16>((1u << a.ncols) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(a.y + (r0 + r) * a.ldy, m, acc[r]);
  }
}

void amx_dispatch(int64_t fmt, const Int8Args& a, int64_t M, const float* xo, uint8_t* work) {
  switch (fmt) {
    case kQ4_1: return amx_tile_column<kQ4_1>(a, M, xo, work);
    case kQ8_0: return amx_tile_column<kQ8_0>(a, M, xo, work);
    case kQ5_1: return amx_tile_column<kQ5_1>(a, M, xo, work);
    case kQ4_K: return amx_tile_column<kQ4_K>(a, M, xo, work);
    case kQ5_K: return amx_tile_column<kQ5_K>(a, M, xo, work);
    default: return amx_tile_column<kQ6_K>(a, M, xo, work);
  }
}
#endif  // SPLITSERVE_AMX
#elif defined(SPLITSERVE_AVX2)
// AVX2 without AVX-512 (a Xeon of that generation): the same integers from vpmaddubsw +
// vpmaddwd, eight columns per 256-bit half. vpmaddubsw saturates a pair's sum at 16 bits:
// codes <= 63 times |x| <= 127 stay below it, and Q8_0 takes llama.cpp's way round, |w| times
// x with w's sign, instead of the +128 offset the VNNI path uses (255 * 127 * 2 would not).
// The float operations per column are the VNNI path's, in its order.

// Bytes j of the 32-byte result are 0xff where bit j of m is set.
inline __m256i mask_bytes(uint32_t m) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bits = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(m)), spread);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bits), bits);
}

// Group g's codes as two halves: c[0] columns 0-7 (bytes 0-31), c[1] columns 8-15.
inline void group_codes2(const Fields& f, int64_t fmt, int g, __m256i c[2]) {
  if (fmt == kQ8_0) {
    for (int h = 0; h < 2; ++h)
      c[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f.codes + 64 * g + 32 * h));
    return;
  }
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int h = 0; h < 2; ++h) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f.codes + 64 * (g >> 1) + 32 * h));
    if (g & 1) v = _mm256_srli_epi16(v, 4);
    v = _mm256_and_si256(v, low);
    const uint8_t* planes[2] = {f.plane4, f.plane5};
    for (int b = 0; b < 2; ++b) {
      if (!planes[b]) continue;
      uint32_t m;
      std::memcpy(&m, planes[b] + 8 * g + 4 * h, 4);
      v = _mm256_add_epi8(v, _mm256_and_si256(mask_bytes(m), _mm256_set1_epi8(b ? 32 : 16)));
    }
    c[h] = v;
  }
}

inline __m256 half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 bytes8_ps(const uint8_t* p, bool is_signed) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

template <int FMT, int R>
void int8_tile(const Int8Args& a) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nblk; ++b) {
    const uint8_t* tile = a.tiles + b * a.tbytes;
    const Fields f = fields_of(tile, FMT);
    __m256i w[8][2];
    for (int g = 0; g < 8; ++g) group_codes2(f, FMT, g, w[g]);
    const uint16_t* dh = reinterpret_cast<const uint16_t*>(tile);
    __m256 s0[2], s1[2], o[2];
    for (int h = 0; h < 2; ++h) {  // the values scales_of gives, eight columns at a time
      const __m256 d = half8(dh + 8 * h);
      s0[h] = s1[h] = d;
      o[h] = _mm256_setzero_ps();
      if (FMT == kQ4_1 || FMT == kQ5_1) o[h] = half8(dh + 16 + 8 * h);
      if (FMT == kQ4_K || FMT == kQ5_K) {
        s0[h] = s1[h] = _mm256_mul_ps(d, bytes8_ps(tile + 64 + 8 * h, false));
        o[h] = _mm256_sub_ps(_mm256_setzero_ps(),
                             _mm256_mul_ps(half8(dh + 16 + 8 * h), bytes8_ps(tile + 80 + 8 * h, false)));
      }
      if (FMT == kQ6_K) {
        s0[h] = _mm256_mul_ps(d, bytes8_ps(tile + 32 + 8 * h, true));
        s1[h] = _mm256_mul_ps(d, bytes8_ps(tile + 48 + 8 * h, true));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* qb = a.xq + r * a.K + b * kBlock;
      const int64_t i = r * a.nblk + b;
      const float da = a.xd[i];
      const int32_t sum_lo = a.xs[2 * i], sum_hi = a.xs[2 * i + 1];
      const __m256 vda = _mm256_set1_ps(da);
      for (int h = 0; h < 2; ++h) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
          int32_t x;
          std::memcpy(&x, qb + 4 * g, 4);
          const __m256i xv = _mm256_set1_epi32(x);
          __m256i pairs;
          if (FMT == kQ8_0)
            pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w[g][h]), _mm256_sign_epi8(xv, w[g][h]));
          else
            pairs = _mm256_maddubs_epi16(w[g][h], xv);
          const __m256i quads = _mm256_madd_epi16(pairs, ones);
          if (g < 4) lo = _mm256_add_epi32(lo, quads);
          else hi = _mm256_add_epi32(hi, quads);
        }
        if (FMT == kQ6_K) {
          lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(32 * sum_lo));
          hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(32 * sum_hi));
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(s0[h], vda), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(s1[h], vda), acc[r][h]);
          continue;
        }
        const __m256i dot = _mm256_add_epi32(lo, hi);  // Q8_0: signed products, no offset
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s0[h], vda), acc[r][h]);
        if (FMT != kQ8_0)
          acc[r][h] = _mm256_fmadd_ps(o[h], _mm256_set1_ps(da * static_cast<float>(sum_lo + sum_hi)),
                                      acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[16];
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    for (int64_t c = 0; c < a.ncols; ++c) a.y[r * a.ldy + c] = out[c];
  }
}
#else
// The same numbers without SIMD: integer dots, then the float operations of the vector paths
// in the same order, one column at a time.
template <int FMT, int R>
void int8_tile(const Int8Args& a) {
  for (int r = 0; r < R; ++r) {
    float acc[16] = {};
    for (int64_t b = 0; b < a.nblk; ++b) {
      const uint8_t* tile = a.tiles + b * a.tbytes;
      const Fields f = fields_of(tile, FMT);
      float s[2][16], o[16];
      scales_of(tile, FMT, s, o);
      const int8_t* qb = a.xq + r * a.K + b * kBlock;
      const int64_t i = r * a.nblk + b;
      const float da = a.xd[i];
      const int32_t sum_lo = a.xs[2 * i], sum_hi = a.xs[2 * i + 1];
      for (int c = 0; c < 16; ++c) {
        int32_t lo = 0, hi = 0;
        for (int k = 0; k < 16; ++k) {
          lo += code_at(f, FMT, c, k) * qb[k];
          hi += code_at(f, FMT, c, k + 16) * qb[k + 16];
        }
        if (FMT == kQ6_K) {
          lo -= 32 * sum_lo;
          hi -= 32 * sum_hi;
          acc[c] = std::fma(static_cast<float>(lo), s[0][c] * da, acc[c]);
          acc[c] = std::fma(static_cast<float>(hi), s[1][c] * da, acc[c]);
          continue;
        }
        acc[c] = std::fma(static_cast<float>(lo + hi), s[0][c] * da, acc[c]);
        if (FMT != kQ8_0)
          acc[c] = std::fma(o[c], da * static_cast<float>(sum_lo + sum_hi), acc[c]);
      }
    }
    for (int64_t c = 0; c < a.ncols; ++c) a.y[r * a.ldy + c] = acc[c];
  }
}
#endif

template <int FMT>
void int8_rows(const Int8Args& a, int64_t rows) {
  switch (rows) {
    case 1: return int8_tile<FMT, 1>(a);
    case 2: return int8_tile<FMT, 2>(a);
    case 3: return int8_tile<FMT, 3>(a);
    case 4: return int8_tile<FMT, 4>(a);
    case 5: return int8_tile<FMT, 5>(a);
    case 6: return int8_tile<FMT, 6>(a);
    case 7: return int8_tile<FMT, 7>(a);
    default: return int8_tile<FMT, 8>(a);
  }
}

void int8_dispatch(int64_t fmt, const Int8Args& a, int64_t rows) {
  switch (fmt) {
    case kQ4_1: return int8_rows<kQ4_1>(a, rows);
    case kQ8_0: return int8_rows<kQ8_0>(a, rows);
    case kQ5_1: return int8_rows<kQ5_1>(a, rows);
    case kQ4_K: return int8_rows<kQ4_K>(a, rows);
    case kQ5_K: return int8_rows<kQ5_K>(a, rows);
    default: return int8_rows<kQ6_K>(a, rows);
  }
}

}  // namespace

// The (M, N) output for x (M, K) against a packed (N, K) weight, after checking both.
torch::Tensor output_for(const char* what, const torch::Tensor& x, const torch::Tensor& packed,
                         int64_t fmt, int64_t n) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), what,
              ": x must be a contiguous 2-d float32 tensor");
  check_packed(packed, fmt, n, x.size(1));
  return torch::empty({x.size(0), n}, x.options());
}

// x: (M, K) float32 contiguous -> (M, N) float32.
torch::Tensor block_linear(torch::Tensor x, torch::Tensor packed, int64_t fmt, int64_t n) {
  auto y = output_for("block_linear", x, packed, fmt, n);
  const int64_t M = x.size(0), K = x.size(1);
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

// x: (M, K) float32 contiguous -> (M, N) float32, with x rounded to int8 per block of 32
// (see the top of the file).
torch::Tensor block_linear_int8(torch::Tensor x, torch::Tensor packed, int64_t fmt, int64_t n) {
  auto y = output_for("block_linear_int8", x, packed, fmt, n);
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return y;
  const int64_t nblk = K / kBlock, tbytes = tile_bytes(fmt), ntiles = (n + kTile - 1) / kTile;
#if defined(SPLITSERVE_AMX)
  const bool amx = M >= kAmxMinRows && g_amx_enabled.load(std::memory_order_relaxed) &&
                   amx_permitted();
  std::vector<int8_t> xq((amx ? (M + 15) / 16 * 16 : M) * K);  // AMX reads whole 16-row tiles
#else
  std::vector<int8_t> xq(M * K);
#endif
  std::vector<float> xd(M * nblk);
  std::vector<int32_t> xs(2 * M * nblk);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_row(xp + r * K, K, xq.data() + r * K, xd.data() + r * nblk, xs.data() + 2 * r * nblk);
  });
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
#if defined(SPLITSERVE_AMX)
  if (amx) {
    std::vector<float> xo(M * nblk);  // da * sum(q) per row-block, as int8_tile computes it
    for (int64_t i = 0; i < M * nblk; ++i)
      xo[i] = xd[i] * static_cast<float>(xs[2 * i] + xs[2 * i + 1]);
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      amx_configure();  // tile state is per thread
      std::vector<uint8_t> buf(amx_work_bytes(nblk) + 64);
      uint8_t* work = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
      for (int64_t t = begin; t < end; ++t) {
        const Int8Args a{wp + t * nblk * tbytes, nblk, tbytes, K, xq.data(), xd.data(), xs.data(),
                         yp + t * kTile, n, std::min<int64_t>(kTile, n - t * kTile)};
        amx_dispatch(fmt, a, M, xo.data(), work);
      }
      _tile_release();
    });
    return y;
  }
#endif
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r0 = 0; r0 < M; r0 += kInt8Rows) {
        const Int8Args a{wp + t * nblk * tbytes, nblk, tbytes, K, xq.data() + r0 * K,
                         xd.data() + r0 * nblk, xs.data() + 2 * r0 * nblk, yp + r0 * n + t * kTile,
                         n, std::min<int64_t>(kTile, n - t * kTile)};
        int8_dispatch(fmt, a, std::min<int64_t>(kInt8Rows, M - r0));
      }
    }
  });
  return y;
}

// x's int8 rounding as block_linear_int8 does it: (q (M, K) int8, scales (M, K/32) float32,
// sums of q per half block (M, K/16) int32), for tests.
std::vector<torch::Tensor> quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) % kBlock == 0,
              "quantize_activations: x must be contiguous 2-d float32, K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, torch::dtype(torch::kInt8));
  auto d = torch::empty({M, K / kBlock}, torch::dtype(torch::kFloat32));
  auto s = torch::empty({M, K / 16}, torch::dtype(torch::kInt32));
  for (int64_t r = 0; r < M; ++r)
    quantize_row(x.data_ptr<float>() + r * K, K, q.data_ptr<int8_t>() + r * K,
                 d.data_ptr<float>() + r * (K / kBlock), s.data_ptr<int32_t>() + r * (K / 16));
  return {q, d, s};
}

// --- the small ops around the int8 matmuls (LlamaModel's fused decoder loop) ---
// Three calls instead of the 8-20 torch dispatches each replaces on a decode step's few rows.
// Float32 math in a fixed order; not bit-equal to torch's kernels, so only the int8 path uses
// them (the float path keeps torch's, which the exactness tests hold to the reference).

// y = x / sqrt(mean(x^2) + eps) * w, per row of x (T, D).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm: x (T, D) and w (D,) contiguous float32");
  const int64_t T = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = xp + t * D;
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
      for (int64_t i = 0; i < D; ++i) yp[t * D + i] = xr[i] * inv * wp[i];
    }
  });
  return y;
}

// x += d in place (the residual add), then rms_norm(x, w): the add and the norm that always
// follows it in a decoder layer, in one pass over each row. The same float32 add as x.add_(d).
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor d, torch::Tensor w, double eps) {
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.is_contiguous() && d.sizes() == x.sizes(),
              "add_rms_norm_: d must be contiguous float32 of x's shape");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "add_rms_norm_: x (T, D) contiguous float32");
  const int64_t T = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * D; i < end * D; ++i) xp[i] += dp[i];
  });
  return rms_norm(x, w, eps);
}

// Rotary embedding, rotate-half layout, in place on the first `rotated` heads of each row of
// qkv (T, heads * hd): the q and k heads of a fused projection. cos/sin: (T, hd).
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t rotated, int64_t hd) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.dim() == 2 && qkv.is_contiguous() &&
                  hd % 2 == 0 && rotated * hd <= qkv.size(1),
              "rope_: qkv must be contiguous (T, >= rotated * hd) float32");
  const int64_t T = qkv.size(0), W = qkv.size(1), h = hd / 2;
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * hd &&
                  sin.numel() == T * hd,
              "rope_: cos and sin must be contiguous (T, hd) float32");
  float* p = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float *c = cp + t * hd, *s = sp + t * hd;
    for (int64_t head = 0; head < rotated; ++head) {
      float* v = p + t * W + head * hd;
      for (int64_t i = 0; i < h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a * c[i] - b * s[i];
        v[i + h] = b * c[i + h] + a * s[i + h];
      }
    }
  }
}

// silu(gate) * up for gu (T, 2I) = [gate | up] -> (T, I).
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.scalar_type() == torch::kFloat32 && gu.dim() == 2 && gu.is_contiguous() &&
                  gu.size(1) % 2 == 0,
              "silu_mul: gu must be contiguous (T, 2I) float32");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto y = torch::empty({T, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      const float a = g[t * 2 * I + i];
      yp[t * I + i] = a / (1.0f + std::exp(-a)) * g[t * 2 * I + I + i];
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

bool has_vnni() {
#if defined(SPLITSERVE_VNNI)
  return true;
#else
  return false;
#endif
}

// Which int8 kernel this build runs: "avx512-vnni", "avx2" or "portable".
std::string int8_path() {
#if defined(SPLITSERVE_VNNI)
  return "avx512-vnni";
#elif defined(SPLITSERVE_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// Whether block_linear_int8 multiplies batches of >= amx_min_rows() rows with AMX tiles: built
// with AMX, granted the tile state by Linux, and not switched off by set_amx.
bool amx_active() {
#if defined(SPLITSERVE_AMX)
  return g_amx_enabled.load() && amx_permitted();
#else
  return false;
#endif
}

// Switches the AMX path on or off (tests and `bench linear` compare it with VNNI); returns
// whether it is active after the call.
bool set_amx(bool on) {
#if defined(SPLITSERVE_AMX)
  g_amx_enabled.store(on);
#else
  (void)on;
#endif
  return amx_active();
}

int64_t amx_min_rows() {
#if defined(SPLITSERVE_AMX)
  return kAmxMinRows;
#else
  return 0;
#endif
}

bool has_avx512() {
#if defined(SPLITSERVE_AVX512)
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

// --- a decode step's whole decoder stack in one call (model/fused_decode.py) ---
// The same kernel calls as the Python loop there, in the same order with the same arguments,
// so the results are bit-for-bit the loop's; what goes is the interpreter between them (nine
// calls a layer). Attention comes from the other extension (paged_decode.cpp, built with other
// flags) through a function pointer it hands over in a capsule: write this step's K/V into the
// pool (packed into int8/fp8 rows for such a pool), then attend.
using AttendWriting = torch::Tensor (*)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                        torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                        double);
using AttendPackedWriting = torch::Tensor (*)(torch::Tensor, torch::Tensor, torch::Tensor,
                                              torch::Tensor, torch::Tensor, torch::Tensor,
                                              torch::Tensor, torch::Tensor, double, int64_t);
constexpr const char* kAttendCapsule = "splitserve.paged_decode_attention_writing";
constexpr const char* kAttendPackedCapsule = "splitserve.paged_decode_attention_packed_writing";

class DecoderStack {
 public:
  // Per layer: ln1, ln2 (D,) float32; four packed weights (qkv, o, gate_up, down) with their
  // formats and output rows; int8 selects block_linear_int8 over block_linear.
  DecoderStack(std::vector<torch::Tensor> ln1, std::vector<torch::Tensor> ln2,
               std::vector<torch::Tensor> packed, std::vector<int64_t> fmts,
               std::vector<int64_t> rows, bool int8, int64_t num_q, int64_t num_kv,
               int64_t head_dim, double eps, double scale, py::capsule attend,
               int64_t kv_format)
      : ln1_(std::move(ln1)), ln2_(std::move(ln2)), packed_(std::move(packed)),
        fmts_(std::move(fmts)), rows_(std::move(rows)), int8_(int8), num_q_(num_q),
        num_kv_(num_kv), head_dim_(head_dim), eps_(eps), scale_(scale), kv_format_(kv_format) {
    const size_t n = ln1_.size();
    TORCH_CHECK(n > 0 && ln2_.size() == n && packed_.size() == 4 * n && fmts_.size() == 4 * n &&
                    rows_.size() == 4 * n,
                "DecoderStack: 2 norms and 4 packed weights (with formats and rows) per layer");
    // kv_format: -1 a float pool, else the packed pool's format (0 int8, 1 fp8_e4m3)
    const char* want = kv_format < 0 ? kAttendCapsule : kAttendPackedCapsule;
    TORCH_CHECK(kv_format >= -1 && kv_format <= 1, "DecoderStack: unknown KV format ", kv_format);
    TORCH_CHECK(std::string(attend.name()) == want, "DecoderStack: the attention capsule is not ",
                want);
    if (kv_format < 0)
      attend_ = reinterpret_cast<AttendWriting>(attend.get_pointer());
    else
      attend_packed_ = reinterpret_cast<AttendPackedWriting>(attend.get_pointer());
    TORCH_CHECK(rows_[0] == (num_q + 2 * num_kv) * head_dim,
                "DecoderStack: the fused QKV rows do not match the heads");
  }

  // x (T, D) float32, updated in place and returned; cos/sin (T, head_dim); kv_cache the pool
  // (layers, 2, blocks, block_size, kv_heads, head_dim); the rest as paged_decode_attention_writing.
  torch::Tensor run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor kv_cache,
                    torch::Tensor slot_mapping, torch::Tensor block_tables,
                    torch::Tensor context_lens) {
    const int64_t layers = static_cast<int64_t>(ln1_.size());
    TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(0) == layers && kv_cache.size(1) == 2,
                "DecoderStack.run: the pool must be (", layers, ", 2, blocks, block_size, heads, hd)");
    if (!pool_.defined() || !pool_.is_same(kv_cache)) {  // views made once per pool
      pool_ = kv_cache;
      caches_.clear();
      for (int64_t i = 0; i < layers; ++i) {
        auto layer = kv_cache.select(0, i);
        caches_.emplace_back(layer.select(0, 0), layer.select(0, 1));
      }
    }
    const int64_t t = x.size(0), q_size = num_q_ * head_dim_, kv_size = num_kv_ * head_dim_;
    auto mm = [&](const torch::Tensor& in, size_t w) {
      return int8_ ? block_linear_int8(in, packed_[w], fmts_[w], rows_[w])
                   : block_linear(in, packed_[w], fmts_[w], rows_[w]);
    };
    auto h = rms_norm(x, ln1_[0], eps_);
    for (int64_t i = 0; i < layers; ++i) {
      const size_t w = 4 * static_cast<size_t>(i);
      auto qkv = mm(h, w);
      rope_(qkv, cos, sin, num_q_ + num_kv_, head_dim_);
      auto q = qkv.narrow(1, 0, q_size).view({t, num_q_, head_dim_});
      if (t > 1) q = q.contiguous();
      auto k = qkv.narrow(1, q_size, kv_size).view({t, num_kv_, head_dim_});
      auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, num_kv_, head_dim_});
      auto out = kv_format_ < 0
                     ? attend_(q, k, v, caches_[i].first, caches_[i].second, slot_mapping,
                               block_tables, context_lens, scale_)
                     : attend_packed_(q, k, v, caches_[i].first, caches_[i].second, slot_mapping,
                                      block_tables, context_lens, scale_, kv_format_);
      auto o = mm(out.reshape({t, q_size}), w + 1);
      h = add_rms_norm_(x, o, ln2_[i], eps_);
      auto down = mm(silu_mul(mm(h, w + 2)), w + 3);
      if (i + 1 < layers)
        h = add_rms_norm_(x, down, ln1_[i + 1], eps_);
      else
        x.add_(down);
    }
    return x;
  }

 private:
  std::vector<torch::Tensor> ln1_, ln2_, packed_;
  std::vector<int64_t> fmts_, rows_;
  bool int8_;
  int64_t num_q_, num_kv_, head_dim_;
  double eps_, scale_;
  int64_t kv_format_;
  AttendWriting attend_ = nullptr;
  AttendPackedWriting attend_packed_ = nullptr;
  torch::Tensor pool_;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> caches_;
};

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
  m.def("block_linear_int8", &block_linear_int8,
        "y = x W^T with W in GGUF-type tiles and x rounded to int8 per block (VNNI)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_activations", &quantize_activations, "x rounded as block_linear_int8 does");
  m.def("rms_norm", &rms_norm, "x / rms(x) * w per row", py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm_", &add_rms_norm_, "x += d in place, then rms_norm(x, w)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_", &rope_, "rotary embedding in place on the first heads of each row",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", py::call_guard<py::gil_scoped_release>());
  m.def("has_vnni", &has_vnni, "whether the int8 kernel was built with AVX-512 VNNI");
  m.def("int8_path", &int8_path, "the int8 kernel this build runs: avx512-vnni, avx2, portable");
  m.def("has_avx512", &has_avx512, "whether the kernel was built with AVX-512");
  m.def("amx_active", &amx_active, "whether int8 batches of amx_min_rows() rows or more use AMX");
  m.def("set_amx", &set_amx, "switch the AMX path on or off; returns amx_active()");
  m.def("amx_min_rows", &amx_min_rows, "rows from which the int8 path uses AMX (0: not built)");
  m.def("has_openmp", &has_openmp, "whether the kernel was built with OpenMP (threads)");
  // module_local: the portable build of this file (block_linear.py) defines the same class in
  // another module, and pybind's type registry is otherwise shared by every module
  py::class_<DecoderStack>(m, "DecoderStack", py::module_local(),
                           "a decode step's decoder layers in one call (model/fused_decode.py)")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<int64_t>, bool,
                    int64_t, int64_t, int64_t, double, double, py::capsule, int64_t>(),
           py::arg("ln1"), py::arg("ln2"), py::arg("packed"), py::arg("fmts"), py::arg("rows"),
           py::arg("int8"), py::arg("num_q"), py::arg("num_kv"), py::arg("head_dim"),
           py::arg("eps"), py::arg("scale"), py::arg("attend"), py::arg("kv_format") = -1)
      .def("run", &DecoderStack::run, py::call_guard<py::gil_scoped_release>());
}
