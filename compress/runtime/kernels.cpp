// Inference kernels of compressed linear layers: y = x @ W^T computed from the packed codes, never from the
// dense weight. Registered as PyTorch operators `compress::grid_linear`, `compress::codebook_linear` and
// `compress::half_linear` (and their `_group` forms), with `compress::rms_norm` for the norms between them;
// compress/runtime/kernels.py holds the pure-PyTorch reference of each, which the tests compare them against.
//
// One driver serves every format. A format only says how to decode one row of its weight into float32
// (`decode_row`). For a few tokens (decode) each thread decodes a row into a buffer that stays in L1 and takes
// its dot product with every token; the row is gone before the next one. For many tokens (prefill) rows are
// decoded a tile at a time and the tile goes through the BLAS matmul; the tile is the only dense piece.
//
// Packing (docs/FORMAT.md): codes are taken eight at a time along a row; eight b-bit codes form one 8b-bit
// little-endian word written as b bytes, code i in bits [b*i, b*i + b).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kDecodeTokens = 8;  // up to this many tokens: row-by-row dot products; beyond: tiles + matmul
constexpr int64_t kTileBytes = 1 << 23;  // a tile of decoded rows, 8 MiB of float32 (reused, never more)

// The little-endian integer in bytes [p, p + Bytes).
template <int Bytes>
inline uint64_t load_le(const uint8_t* p) {
  if constexpr (Bytes == 1 || Bytes == 2 || Bytes == 4 || Bytes == 8) {
    uint64_t value = 0;
    std::memcpy(&value, p, Bytes);  // one load (little-endian host: x86-64, aarch64)
    return value;
  } else {
    constexpr int Low = Bytes > 4 ? 4 : 2;
    return load_le<Low>(p) | (load_le<Bytes - Low>(p + Low) << (8 * Low));
  }
}

// Unpack `count` codes of `Bits` bits from a packed row into `out` (which has room for a multiple of 8).
template <int Bits>
inline void unpack_row(const uint8_t* packed, int64_t count, int32_t* out) {
  constexpr uint64_t mask = (uint64_t{1} << Bits) - 1;
  const int64_t words = (count + 7) / 8;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t word = load_le<Bits>(packed + w * Bits);
    int32_t* dst = out + 8 * w;
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<int32_t>((word >> (Bits * i)) & mask);
  }
}

// Calls `body(std::integral_constant<int, b>{})` for the runtime width `bits` in 1..8.
template <typename Body>
inline auto with_bits(int64_t bits, const Body& body) {
  switch (bits) {
    case 1: return body(std::integral_constant<int, 1>{});
    case 2: return body(std::integral_constant<int, 2>{});
    case 3: return body(std::integral_constant<int, 3>{});
    case 4: return body(std::integral_constant<int, 4>{});
    case 5: return body(std::integral_constant<int, 5>{});
    case 6: return body(std::integral_constant<int, 6>{});
    case 7: return body(std::integral_constant<int, 7>{});
    default: return body(std::integral_constant<int, 8>{});
  }
}

// Calls `body(std::integral_constant<int, t>{})` for the runtime token count `tokens` in 1..kDecodeTokens.
template <typename Body>
inline void with_tokens(int64_t tokens, const Body& body) {
  switch (tokens) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    case 5: body(std::integral_constant<int, 5>{}); break;
    case 6: body(std::integral_constant<int, 6>{}); break;
    case 7: body(std::integral_constant<int, 7>{}); break;
    default: body(std::integral_constant<int, 8>{});
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
#else
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
#endif
}

// y[T, out] = x[T, in] @ W^T where row r of W is produced by decode(r, float* row, int32_t* scratch).
template <typename Decode>
at::Tensor run_linear(const at::Tensor& x, int64_t out_features, int64_t in_features, const Decode& decode) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [tokens, ", in_features, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
  const int64_t tokens = x.size(0);
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return y;
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t padded = (in_features + 15) / 16 * 16;
  if (tokens <= kDecodeTokens) {
    at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(padded);
      std::vector<int32_t> scratch(padded + 8);
      for (int64_t r = begin; r < end; ++r) {
        decode(r, row.data(), scratch.data());
        for (int64_t t = 0; t < tokens; ++t) ys[t * out_features + r] = dot(row.data(), xs + t * in_features, in_features);
      }
    });
    return y;
  }
  const int64_t tile_rows = std::max<int64_t>(16, kTileBytes / (4 * in_features));
  // one buffer per calling thread, kept between calls: a fresh allocation of this size costs page faults
  thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), std::min(tile_rows, out_features) * in_features));
  float* tiles = buffer.data();
  const at::Tensor tile = at::from_blob(tiles, {std::min(tile_rows, out_features), in_features}, x.options());
  for (int64_t start = 0; start < out_features; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, out_features - start);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> scratch(padded + 8);
      for (int64_t r = begin; r < end; ++r) decode(start + r, tiles + r * in_features, scratch.data());
    });
    at::Tensor part = tile.narrow(0, 0, rows);
    at::Tensor target = y.narrow(1, start, rows);
    at::mm_out(target, x, part.t());
  }
  return y;
}

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
// The byte permute that puts packed word w (of `Bits` bytes: 8 codes) in lane w of `Lane` bytes, zero-extended,
// and the mask of the bytes it keeps; used with `_mm512_maskz_permutexvar_epi8`.
template <int Bits, int Lane>
inline std::pair<__m512i, __mmask64> word_spread() {
  alignas(64) int8_t spread[64];
  __mmask64 keep = 0;
  for (int w = 0; w < 64 / Lane; ++w)
    for (int k = 0; k < Lane; ++k) {
      spread[Lane * w + k] = static_cast<int8_t>(k < Bits ? w * Bits + k : 0);
      if (k < Bits) keep |= __mmask64{1} << (Lane * w + k);
    }
  return {_mm512_load_si512(spread), keep};
}

// Decode (a few tokens) for grids of at most 4 bits, no row written out. A chunk is 16 packed words (128 codes):
// a byte permute puts one word in each 32-bit lane, and phase i takes code i of every word at once, so lane w
// of phase i holds code 8w + i of the chunk. The input is permuted the same way once per call; level lookups,
// group factors and products stay in registers.
constexpr int64_t kChunk = 128;

struct ChunkGroups {
  std::vector<int64_t> first;          // first group of each chunk
  std::vector<int32_t> count;          // groups the chunk touches (at most 16)
  std::vector<int32_t> lane;           // [chunk][16]: the lane's group, relative to `first`
};

ChunkGroups chunk_groups(int64_t in_features, int64_t group_size, int64_t chunks) {
  ChunkGroups out{std::vector<int64_t>(chunks), std::vector<int32_t>(chunks), std::vector<int32_t>(chunks * 16)};
  const int64_t groups = in_features / group_size;
  for (int64_t c = 0; c < chunks; ++c) {
    out.first[c] = c * kChunk / group_size;
    int32_t last = 0;
    for (int w = 0; w < 16; ++w) {
      const int64_t g = std::min<int64_t>((c * kChunk + 8 * w) / group_size, groups - 1) - out.first[c];
      out.lane[c * 16 + w] = static_cast<int32_t>(g);
      last = std::max<int32_t>(last, static_cast<int32_t>(g));
    }
    out.count[c] = last + 1;
  }
  return out;
}

std::vector<float> permuted_input(const float* x, int64_t tokens, int64_t in_features, int64_t chunks) {
  std::vector<float> out(tokens * chunks * kChunk, 0.f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < in_features; ++i) {
      const int64_t c = i / kChunk, within = i % kChunk;
      out[(t * chunks + c) * kChunk + (within % 8) * 16 + within / 8] = x[t * in_features + i];
    }
  return out;
}

// Rows `r .. r + Rows` (several rows share the input's loads and give the core independent chains).
template <int Bits, int Tokens, int Rows>
inline void grid_gemv_block(int64_t r, const uint8_t* codes, int64_t row_bytes, const uint8_t* zs, const float* fs,
                            const float* ts, int64_t table_stride, int64_t groups, int64_t words, const float* xp,
                            int64_t chunks, const ChunkGroups& layout, float* ys, int64_t out_features,
                            __m512i spread_index, __mmask64 keep) {
  constexpr int qmax = (1 << Bits) - 1;
  constexpr int Partials = Tokens * Rows == 1 ? 4 : (Tokens * Rows <= 4 ? 2 : 1);
  const __m512i mask = _mm512_set1_epi32(qmax);  // the codes' mask, and qmax, the levels' offset
  __m512 low[Rows], high[Rows], acc[Rows][Tokens];
  for (int k = 0; k < Rows; ++k) {
    low[k] = _mm512_loadu_ps(ts + (r + k) * table_stride);
    high[k] = _mm512_loadu_ps(ts + (r + k) * table_stride + 16);
    for (int t = 0; t < Tokens; ++t) acc[k][t] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t chunk_words = std::min<int64_t>(16, words - 16 * c);
    const __mmask64 present = chunk_words == 16 ? ~__mmask64{0} : ((__mmask64{1} << (chunk_words * Bits)) - 1);
    const __mmask16 valid = static_cast<__mmask16>((1u << layout.count[c]) - 1);
    const __m512i lane_group = _mm512_loadu_si512(layout.lane.data() + 16 * c);
    __m512i lanes[Rows], offset[Rows];
    __m512 factor[Rows];
    for (int k = 0; k < Rows; ++k) {
      const uint8_t* packed = codes + (r + k) * row_bytes + 16 * c * Bits;
      _mm_prefetch(reinterpret_cast<const char*>(packed + 4 * Rows * row_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(fs + (r + k + 4 * Rows) * groups + layout.first[c]), _MM_HINT_T0);
      lanes[k] = _mm512_maskz_permutexvar_epi8(keep, spread_index, _mm512_maskz_loadu_epi8(present, packed));
      const int64_t at = (r + k) * groups + layout.first[c];
      const __m512i chunk_zeros = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, zs + at));
      offset[k] = _mm512_sub_epi32(mask, _mm512_permutexvar_epi32(lane_group, chunk_zeros));
      factor[k] = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(valid, fs + at));
    }
    __m512 part[Rows][Tokens][Partials];
    for (int k = 0; k < Rows; ++k)
      for (int t = 0; t < Tokens; ++t)
        for (int q = 0; q < Partials; ++q) part[k][t][q] = _mm512_setzero_ps();
    // 2 to 4 bits: each word's codes are put once into two registers of fields (4 bits: even and odd codes in bytes;
    // 2 bits: in nibbles; 3 bits: codes 0-3 and 4-7 in bytes, by a multishift), the offset added to every field (no
    // carry: the index fits), and phase i shifts its field down. A permute reads only an index's low five bits (four
    // for the 16-entry table of 2 and 3 bits), so what lies above the field does not matter.
    constexpr int field = Bits == 2 ? 4 : 8;
    constexpr bool fields = Bits >= 2;  // 1 bit: each phase shifts and masks its code
    __m512i spread[Rows][2];
    if constexpr (fields) {
      const __m512i keep_codes = _mm512_set1_epi32(Bits == 4 ? 0x0F0F0F0F : Bits == 3 ? 0x07070707 : 0x33333333);
      const __m512i every_field = _mm512_set1_epi32(Bits == 2 ? 0x11111111 : 0x01010101);
      for (int k = 0; k < Rows; ++k) {
        const __m512i added = _mm512_mullo_epi32(offset[k], every_field);
        __m512i first, second;
        if constexpr (Bits == 3) {  // per 64-bit lane (two words): bytes 0-3 and 4-7 take codes of words 1 and 2
          first = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x29262320090603LL << 8), lanes[k]);
          second = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x35322F2C15120F0CLL), lanes[k]);
        } else {
          first = lanes[k];
          second = _mm512_srli_epi32(lanes[k], Bits);
        }
        spread[k][0] = _mm512_add_epi32(_mm512_and_si512(first, keep_codes), added);
        spread[k][1] = _mm512_add_epi32(_mm512_and_si512(second, keep_codes), added);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m512 inputs[Tokens];
      for (int t = 0; t < Tokens; ++t) inputs[t] = _mm512_loadu_ps(xp + (t * chunks + c) * kChunk + 16 * i);
      for (int k = 0; k < Rows; ++k) {
        // phase i: code i of each word; for 3 bits, codes 0-3 in the first register, 4-7 in the second
        __m512 values;
        if constexpr (fields) {
          const int which = Bits == 3 ? i / 4 : i % 2, place = Bits == 3 ? i % 4 : i / 2;
          const __m512i index = place == 0 ? spread[k][which] : _mm512_srli_epi32(spread[k][which], field * place);
          values = Bits == 4 ? _mm512_permutex2var_ps(low[k], index, high[k]) : _mm512_permutexvar_ps(index, low[k]);
        } else {
          const __m512i index =
              _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(lanes[k], Bits * i), mask), offset[k]);
          values = _mm512_permutex2var_ps(low[k], index, high[k]);
        }
        for (int t = 0; t < Tokens; ++t)
          part[k][t][i % Partials] = _mm512_fmadd_ps(values, inputs[t], part[k][t][i % Partials]);
      }
    }
    for (int k = 0; k < Rows; ++k)
      for (int t = 0; t < Tokens; ++t) {
        __m512 sum = part[k][t][0];
        for (int q = 1; q < Partials; ++q) sum = _mm512_add_ps(sum, part[k][t][q]);
        acc[k][t] = _mm512_fmadd_ps(sum, factor[k], acc[k][t]);
      }
  }
  for (int k = 0; k < Rows; ++k)
    for (int t = 0; t < Tokens; ++t) ys[t * out_features + r + k] = _mm512_reduce_add_ps(acc[k][t]);
}

template <int Bits, int Tokens>
void grid_gemv_rows(int64_t begin, int64_t end, const uint8_t* codes, int64_t row_bytes, const uint8_t* zs,
                    const float* fs, const float* ts, int64_t table_stride, int64_t groups, int64_t in_features,
                    const float* xp, int64_t chunks, const ChunkGroups& layout, float* ys, int64_t out_features) {
  constexpr int Rows = Tokens <= 2 ? 2 : 1;
  const int64_t words = (in_features + 7) / 8;
  const auto [spread_index, keep] = word_spread<Bits, 4>();
  int64_t r = begin;
  for (; r + Rows <= end; r += Rows)
    grid_gemv_block<Bits, Tokens, Rows>(r, codes, row_bytes, zs, fs, ts, table_stride, groups, words, xp, chunks,
                                        layout, ys, out_features, spread_index, keep);
  for (; r < end; ++r)
    grid_gemv_block<Bits, Tokens, 1>(r, codes, row_bytes, zs, fs, ts, table_stride, groups, words, xp, chunks, layout,
                                     ys, out_features, spread_index, keep);
}

// One layer of a grid decode: where its codes, zero points, factors and levels are, and where its output goes.
struct GridSegment {
  const uint8_t* codes;
  int64_t row_bytes;
  const uint8_t* zs;
  const float* fs;
  const float* ts;
  int64_t table_stride;
  float* ys;
  int64_t out_features;
};

// Every segment's rows for the same input in one parallel loop: the input is permuted once, and the threads meet
// once for all of them (layers that read the same input, e.g. an attention's q, k and v projections). Returns false
// where the shape does not suit this path (too many tokens, groups not a multiple of 8 inputs).
template <int Bits>
bool grid_gemv(const at::Tensor& x, const std::vector<GridSegment>& segments, int64_t groups, int64_t group_size) {
  const int64_t tokens = x.size(0), in_features = x.size(1);
  if (tokens < 1 || tokens > kDecodeTokens || group_size % 8 != 0) return false;
  const int64_t chunks = (in_features + kChunk - 1) / kChunk;
  const ChunkGroups layout = chunk_groups(in_features, group_size, chunks);
  const std::vector<float> xp = permuted_input(x.data_ptr<float>(), tokens, in_features, chunks);
  std::vector<int64_t> starts(segments.size() + 1, 0);
  for (size_t s = 0; s < segments.size(); ++s) starts[s + 1] = starts[s] + segments[s].out_features;
  auto rows = [&](auto count) {
    constexpr int Tokens = decltype(count)::value;
    at::parallel_for(0, starts.back(), 16, [&](int64_t begin, int64_t end) {
      for (size_t s = 0; s < segments.size(); ++s) {
        const int64_t low = std::max(begin, starts[s]) - starts[s], high = std::min(end, starts[s + 1]) - starts[s];
        if (low >= high) continue;
        const GridSegment& g = segments[s];
        grid_gemv_rows<Bits, Tokens>(low, high, g.codes, g.row_bytes, g.zs, g.fs, g.ts, g.table_stride, groups,
                                     in_features, xp.data(), chunks, layout, g.ys, g.out_features);
      }
    });
  };
  with_tokens(tokens, rows);
  return true;
}
#endif

#if defined(__AVX512F__)
// Decode (a few tokens) for 8-bit grids with integer levels (`uniform`): one code per byte, in order, so 16 codes
// are widened, made q - z and converted at a time and multiplied with every token's input; no row is written out.
// `Rows` rows at a time share the input's loads and give the core independent chains of products (one row alone
// waits on its own additions).
template <int Tokens, int Rows>
inline void grid8_block(int64_t r, const uint8_t* codes, int64_t row_bytes, const uint8_t* zs, const float* fs,
                        int64_t groups, int64_t group_size, const float* xs, int64_t in_features, float* ys,
                        int64_t out_features) {
  __m512 acc[Rows][Tokens];
  for (int k = 0; k < Rows; ++k)
    for (int t = 0; t < Tokens; ++t) acc[k][t] = _mm512_setzero_ps();
  for (int k = 0; k < Rows; ++k)
    _mm_prefetch(reinterpret_cast<const char*>(codes + (r + k + 2 * Rows) * row_bytes), _MM_HINT_T0);
  for (int64_t g = 0; g < groups; ++g) {
    __m512i zero[Rows];
    __m512 part[Rows][Tokens];
    for (int k = 0; k < Rows; ++k) {
      zero[k] = _mm512_set1_epi32(zs[(r + k) * groups + g]);
      for (int t = 0; t < Tokens; ++t) part[k][t] = _mm512_setzero_ps();
    }
    for (int64_t i = g * group_size; i < (g + 1) * group_size; i += 16) {
      __m512 inputs[Tokens];
      for (int t = 0; t < Tokens; ++t) inputs[t] = _mm512_loadu_ps(xs + t * in_features + i);
      for (int k = 0; k < Rows; ++k) {
        const uint8_t* packed = codes + (r + k) * row_bytes + i;
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
        const __m512 value = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, zero[k]));
        for (int t = 0; t < Tokens; ++t) part[k][t] = _mm512_fmadd_ps(value, inputs[t], part[k][t]);
      }
    }
    for (int k = 0; k < Rows; ++k) {
      const __m512 factor = _mm512_set1_ps(fs[(r + k) * groups + g]);
      for (int t = 0; t < Tokens; ++t) acc[k][t] = _mm512_fmadd_ps(part[k][t], factor, acc[k][t]);
    }
  }
  for (int k = 0; k < Rows; ++k)
    for (int t = 0; t < Tokens; ++t) ys[t * out_features + r + k] = _mm512_reduce_add_ps(acc[k][t]);
}

template <int Tokens>
void grid8_gemv(const at::Tensor& x, const at::Tensor& y, const uint8_t* codes, int64_t row_bytes, const uint8_t* zs,
                const float* fs, int64_t groups, int64_t group_size) {
  constexpr int Rows = Tokens <= 2 ? 4 : (Tokens <= 4 ? 2 : 1);
  const int64_t in_features = x.size(1), out_features = y.size(1);
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    for (; r + Rows <= end; r += Rows)
      grid8_block<Tokens, Rows>(r, codes, row_bytes, zs, fs, groups, group_size, xs, in_features, ys, out_features);
    for (; r < end; ++r)
      grid8_block<Tokens, 1>(r, codes, row_bytes, zs, fs, groups, group_size, xs, in_features, ys, out_features);
  });
}
#endif

// Grid formats (`uniform`, `power`): w = factor[r, g] * table[tr, q - z[r, g] + qmax], where tr is 0 or r.
void check_grid(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& zeros, const at::Tensor& factors,
                const at::Tensor& table, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "qweight must be contiguous uint8");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous(), "zeros must be contiguous uint8");
  TORCH_CHECK(factors.scalar_type() == at::kFloat && factors.is_contiguous(), "factors must be float32");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.dim() == 2, "table: float32 2-D");
  const int64_t out_features = qweight.size(0);
  const int64_t in_features = x.size(1);
  const int64_t qmax = (int64_t{1} << bits) - 1;
  TORCH_CHECK(group_size > 0 && in_features % group_size == 0, "group_size must divide in_features");
  const int64_t groups = in_features / group_size;
  TORCH_CHECK(qweight.size(1) == (in_features + 7) / 8 * bits, "qweight row length does not match in_features");
  TORCH_CHECK(zeros.numel() == out_features * groups && factors.numel() == out_features * groups, "zeros/factors");
  TORCH_CHECK(table.size(1) >= 2 * qmax + 1 && (table.size(0) == 1 || table.size(0) == out_features), "table");
}

at::Tensor grid_linear_2d(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& zeros,
                          const at::Tensor& factors, const at::Tensor& table, int64_t bits, int64_t group_size) {
  check_grid(x, qweight, zeros, factors, table, bits, group_size);
  const int64_t out_features = qweight.size(0);
  const int64_t in_features = x.size(1);
  const int64_t qmax = (int64_t{1} << bits) - 1;
  const int64_t groups = in_features / group_size;
  const uint8_t* codes = qweight.data_ptr<uint8_t>();
  const uint8_t* zs = zeros.data_ptr<uint8_t>();
  const float* fs = factors.data_ptr<float>();
  const float* ts = table.data_ptr<float>();
  const int64_t row_bytes = qweight.size(1);
  const int64_t table_stride = table.size(0) == 1 ? 0 : table.size(1);
  const int64_t table_width = table.size(1);
  const bool aligned = group_size % 16 == 0;
  // `uniform`'s levels are the integers q - z themselves: 8-bit rows are then decoded without a table lookup (the
  // check reads the table only for 8-bit grids, the only ones that use it)
  bool integer_levels = bits == 8 && table_stride == 0;
  for (int64_t k = 0; integer_levels && k <= 2 * qmax; ++k) integer_levels = ts[k] == static_cast<float>(k - qmax);
  return with_bits(bits, [&](auto width) {
    constexpr int Bits = decltype(width)::value;
#if defined(__AVX512F__)
    if constexpr (Bits == 8) {
      if (integer_levels && aligned && x.size(0) >= 1 && x.size(0) <= kDecodeTokens) {
        TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [tokens, ", in_features, "]");
        TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
        at::Tensor y = at::empty({x.size(0), out_features}, x.options());
        with_tokens(x.size(0), [&](auto count) {
          grid8_gemv<decltype(count)::value>(x, y, codes, row_bytes, zs, fs, groups, group_size);
        });
        return y;
      }
    }
#endif
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
    if constexpr (Bits <= 4) {
      TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [tokens, ", in_features, "]");
      TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
      at::Tensor y = at::empty({x.size(0), out_features}, x.options());
      const GridSegment segment{codes, row_bytes, zs, fs, ts, table_stride, y.data_ptr<float>(), out_features};
      if (table_width >= 32 && grid_gemv<Bits>(x, {segment}, groups, group_size)) return y;
    }
#endif
    return run_linear(x, out_features, in_features, [=](int64_t r, float* row, int32_t* scratch) {
      const uint8_t* packed = codes + r * row_bytes;
      const float* levels = ts + r * table_stride;
#if defined(__AVX512F__)
      if constexpr (Bits <= 4) {
        if (aligned) {  // 16 codes at a time: two words, each word's 8 codes shifted out of one 32-bit lane
          float padded_table[32] = {0};
          std::memcpy(padded_table, levels, sizeof(float) * (2 * qmax + 1));
          const __m512 low = _mm512_loadu_ps(padded_table), high = _mm512_loadu_ps(padded_table + 16);
          const __m512i shifts = _mm512_set_epi32(7 * Bits, 6 * Bits, 5 * Bits, 4 * Bits, 3 * Bits, 2 * Bits, Bits, 0,
                                                  7 * Bits, 6 * Bits, 5 * Bits, 4 * Bits, 3 * Bits, 2 * Bits, Bits, 0);
          const __m512i mask = _mm512_set1_epi32(static_cast<int>(qmax));
          for (int64_t g = 0; g < groups; ++g) {
            const __m512i offset = _mm512_set1_epi32(static_cast<int>(qmax - zs[r * groups + g]));
            const __m512 factor = _mm512_set1_ps(fs[r * groups + g]);
            for (int64_t i = g * group_size; i < (g + 1) * group_size; i += 16) {
              const uint64_t both = load_le<2 * Bits>(packed + (i / 8) * Bits);
              const auto first = static_cast<int>(both & ((uint64_t{1} << (8 * Bits)) - 1));
              const auto second = static_cast<int>(both >> (8 * Bits));
              const __m512i words = _mm512_inserti32x8(_mm512_set1_epi32(first), _mm256_set1_epi32(second), 1);
              const __m512i index = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), mask), offset);
              _mm512_storeu_ps(row + i, _mm512_mul_ps(_mm512_permutex2var_ps(low, index, high), factor));
            }
          }
          return;
        }
      }
      if constexpr (Bits == 8) {
        if (aligned) {  // one code per byte, in order: 16 codes widened at a time
          for (int64_t g = 0; g < groups; ++g) {
            const int zero = zs[r * groups + g];
            const __m512i offset = _mm512_set1_epi32(static_cast<int>(qmax) - zero);
            const __m512i negative_zero = _mm512_set1_epi32(-zero);
            const __m512 factor = _mm512_set1_ps(fs[r * groups + g]);
            for (int64_t i = g * group_size; i < (g + 1) * group_size; i += 16) {
              const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i)));
              const __m512 value = integer_levels
                                       ? _mm512_cvtepi32_ps(_mm512_add_epi32(q, negative_zero))
                                       : _mm512_i32gather_ps(_mm512_add_epi32(q, offset), levels, 4);
              _mm512_storeu_ps(row + i, _mm512_mul_ps(value, factor));
            }
          }
          return;
        }
      }
#endif
      unpack_row<Bits>(packed, in_features, scratch);
      for (int64_t g = 0; g < groups; ++g) {
        const float factor = fs[r * groups + g];
        const float* shifted = levels + qmax - zs[r * groups + g];
        for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) row[i] = factor * shifted[scratch[i]];
      }
    });
  });
}

// Several grid layers of one width and group size applied to the same input: at decode, for grids of at most 4
// bits, one parallel loop over all their rows; otherwise each layer as grid_linear_2d computes it.
std::vector<at::Tensor> grid_linear_group_2d(const at::Tensor& x, at::TensorList qweights, at::TensorList zeros,
                                             at::TensorList factors, at::TensorList tables, int64_t bits,
                                             int64_t group_size) {
  const size_t count = qweights.size();
  TORCH_CHECK(count > 0 && zeros.size() == count && factors.size() == count && tables.size() == count,
              "qweights, zeros, factors and tables must be lists of the same length");
  std::vector<at::Tensor> outputs;
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
  const int64_t tokens = x.size(0), in_features = x.size(1);
  bool fast = bits <= 4 && tokens >= 1 && tokens <= kDecodeTokens && group_size > 0 && group_size % 8 == 0;
  std::vector<GridSegment> segments;
  for (size_t s = 0; fast && s < count; ++s) {
    check_grid(x, qweights[s], zeros[s], factors[s], tables[s], bits, group_size);
    fast = tables[s].size(1) >= 32;
    const int64_t out_features = qweights[s].size(0);
    outputs.push_back(at::empty({tokens, out_features}, x.options()));
    segments.push_back({qweights[s].data_ptr<uint8_t>(), qweights[s].size(1), zeros[s].data_ptr<uint8_t>(),
                        factors[s].data_ptr<float>(), tables[s].data_ptr<float>(),
                        tables[s].size(0) == 1 ? 0 : tables[s].size(1), outputs.back().data_ptr<float>(),
                        out_features});
  }
  if (fast && with_bits(bits, [&](auto width) {
        constexpr int Bits = decltype(width)::value;
        if constexpr (Bits <= 4) return grid_gemv<Bits>(x, segments, in_features / group_size, group_size);
        return false;
      }))
    return outputs;
  outputs.clear();
#endif
  for (size_t s = 0; s < count; ++s)
    outputs.push_back(grid_linear_2d(x, qweights[s], zeros[s], factors[s], tables[s], bits, group_size));
  return outputs;
}

// `codebook`: row r (stored order) is scale[r] * codebooks[r / rows_per_group, codes[r, v]] for each vector v.
template <int Dim>
inline void gather_vectors(const int32_t* codes, const float* book, int64_t vectors, int64_t dim, float* row) {
  const int64_t d = Dim > 0 ? Dim : dim;
  for (int64_t v = 0; v < vectors; ++v) std::memcpy(row + v * d, book + codes[v] * d, sizeof(float) * d);
}

// Where a decode kernel puts stored row r's coded sum for token t: times the row's scale, plus the kept columns'
// products (`kept` inputs per token gathered beforehand, `weights` their float32 weights per stored row), written to
// the row's original place. Applied as each row is finished, so decode needs no other pass over the output.
struct RowOut {
  const float* scales = nullptr;     // [out] or null
  const int64_t* rows = nullptr;     // permutation: stored row -> original row, or null
  const float* kept_x = nullptr;     // [tokens, kept]
  const float* weights = nullptr;    // [out, kept]
  int64_t kept = 0;
  float* ys = nullptr;               // [tokens, out]
  int64_t out_features = 0;

  inline void put(int64_t t, int64_t r, float sum) const {
    float value = scales == nullptr ? sum : sum * scales[r];
    const float* w = weights + r * kept;  // a few columns: a plain loop (dot's vector set-up costs more)
    for (int64_t j = 0; j < kept; ++j) value += w[j] * kept_x[t * kept + j];
    ys[t * out_features + (rows == nullptr ? r : rows[r])] = value;
  }
};

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
// Decode (a few tokens) for other codebooks of at least 16 entries: for each token and group, a table of the dot
// products of every input vector with every entry (`tables[t][v][e]`), then each row is the sum over its vectors
// of the table value its code picks, 16 codes per gather (the LUT-GEMV of AQLM's CPU kernels). A thread builds the
// tables of the groups its rows fall in, as it reaches them.
template <int Bits, int Dim>
void build_tables(const float* xs, int64_t tokens, int64_t in_features, int64_t vectors, int64_t dim,
                  const float* book, float* tables) {
  constexpr int64_t entries = int64_t{1} << Bits;
  const int64_t d = Dim > 0 ? Dim : dim;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t v = 0; v < vectors; ++v) {
      const float* input = xs + t * in_features + v * d;
      float* table = tables + (t * vectors + v) * entries;
#pragma GCC unroll 16
      for (int64_t e = 0; e < entries; e += 16) {
        __m512 sum = _mm512_mul_ps(_mm512_set1_ps(input[0]), _mm512_loadu_ps(book + e));
        for (int64_t j = 1; j < d; ++j)
          sum = _mm512_fmadd_ps(_mm512_set1_ps(input[j]), _mm512_loadu_ps(book + j * entries + e), sum);
        _mm512_storeu_ps(table + e, sum);
      }
    }
}

// The codes of vectors 8c .. 8c + 7 of two rows (one packed word each) as 16 indices: lanes 0-7 the first row's,
// lanes 8-15 the second's. A multishift takes code i of each word into byte i, whatever the width.
template <int Bits>
inline __m512i word_pair_codes(const uint8_t* first, const uint8_t* second) {
  const __m128i words = _mm_set_epi64x(static_cast<int64_t>(load_le<Bits>(second)),
                                       static_cast<int64_t>(load_le<Bits>(first)));
  const __m128i fields = _mm_set1_epi64x(static_cast<int64_t>(
      (uint64_t{7 * Bits} << 56) | (uint64_t{6 * Bits} << 48) | (uint64_t{5 * Bits} << 40) |
      (uint64_t{4 * Bits} << 32) | (uint64_t{3 * Bits} << 24) | (uint64_t{2 * Bits} << 16) | (uint64_t{Bits} << 8)));
  const __m128i codes = _mm_and_si128(_mm_multishift_epi64_epi8(fields, words), _mm_set1_epi8((1 << Bits) - 1));
  return _mm512_cvtepu8_epi32(codes);
}

// Rows `begin .. end` of one group for a few tokens. The tables of the group (`tables[t][v][e]`, built once) are
// read eight vectors at a time, so the slice being read (8 entries' rows of 2**Bits floats per token) stays in L1
// while every row pair of the range takes its gather from it; each pair's partial sums wait in `partial`.
template <int Bits, int Tokens>
void codebook_lut_group(int64_t begin, int64_t end, const uint8_t* packed, int64_t row_bytes, int64_t vectors,
                        const float* tables, const RowOut& out, std::vector<float>& partial) {
  constexpr int64_t entries = int64_t{1} << Bits;
  const int64_t pairs = (end - begin + 1) / 2;
  partial.assign(static_cast<size_t>(Tokens * pairs * 16), 0.f);
  alignas(64) int32_t lane_rows[16];
  for (int l = 0; l < 16; ++l) lane_rows[l] = static_cast<int32_t>((l % 8) * entries);
  const __m512i lane_offset = _mm512_load_si512(lane_rows);
  const bool odd = (end - begin) % 2 == 1;
  for (int64_t c = 0; 8 * c < vectors; ++c) {
    const int64_t present = std::min<int64_t>(8, vectors - 8 * c);
    const __mmask16 full = static_cast<__mmask16>(((1u << present) - 1) | (((1u << present) - 1) << 8));
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t r = begin + 2 * p;
      const bool single = odd && p == pairs - 1;
      const uint8_t* first = packed + r * row_bytes + c * Bits;
      const __m512i index = _mm512_add_epi32(word_pair_codes<Bits>(first, single ? first : first + row_bytes),
                                             lane_offset);
      const __mmask16 valid = single ? static_cast<__mmask16>(full & 0xFF) : full;
      for (int t = 0; t < Tokens; ++t) {
        float* sums = partial.data() + (t * pairs + p) * 16;
        const float* slice = tables + (t * vectors + 8 * c) * entries;
        _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums),
                                             _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, index, slice, 4)));
      }
    }
  }
  for (int t = 0; t < Tokens; ++t)
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512 sums = _mm512_loadu_ps(partial.data() + (t * pairs + p) * 16);
      const int64_t r = begin + 2 * p;
      out.put(t, r, _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0x00FF, sums)));
      if (r + 1 < end) out.put(t, r + 1, _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0xFF00, sums)));
    }
}

template <int Bits, int Tokens>
void codebook_lut_rows(int64_t begin, int64_t end, const float* xs, int64_t in_features, const uint8_t* packed,
                       int64_t row_bytes, const float* transposed, int64_t dim, int64_t rows_per_group,
                       const RowOut& out) {
  constexpr int64_t entries = int64_t{1} << Bits;
  const int64_t vectors = in_features / dim;
  thread_local std::vector<float> tables;  // kept between calls: a fresh table of this size costs page faults
  thread_local std::vector<float> partial;
  if (tables.size() < static_cast<size_t>(Tokens * vectors * entries)) tables.resize(Tokens * vectors * entries);
  for (int64_t start = begin; start < end;) {
    const int64_t group = start / rows_per_group;
    const int64_t stop = std::min(end, (group + 1) * rows_per_group);
    const float* book = transposed + group * dim * entries;  // [dim][entries]
    switch (dim) {
      case 2: build_tables<Bits, 2>(xs, Tokens, in_features, vectors, dim, book, tables.data()); break;
      case 4: build_tables<Bits, 4>(xs, Tokens, in_features, vectors, dim, book, tables.data()); break;
      case 8: build_tables<Bits, 8>(xs, Tokens, in_features, vectors, dim, book, tables.data()); break;
      default: build_tables<Bits, 0>(xs, Tokens, in_features, vectors, dim, book, tables.data());
    }
    codebook_lut_group<Bits, Tokens>(start, stop, packed, row_bytes, vectors, tables.data(), out, partial);
    start = stop;
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
// Decode (a few tokens) for codebooks of at most 64 entries of 2-vectors (`jlcm` 3-bit's 6-bit codes): a group's
// codebook lives in eight registers (each component's 64 values in four), so a code's two values come from register
// permutes, not from loads or gathers. A chunk is 64 codes (eight packed words): a byte permute puts each word in a
// 64-bit lane and a multishift each code in a byte; phase p takes byte 4k + p of every 32-bit lane k, which is code
// 4k + p of the chunk. The permutes read only an index's low five bits and the blend tests its sixth, so the bytes
// above need no masking. The input's two components are permuted once per call to match.
constexpr int64_t kPairChunk = 64;

// `[tokens][chunk][component][phase][lane]`: component j of vector 4 * lane + phase of the chunk, 0 past the end.
std::vector<float> pair_input(const float* xs, int64_t tokens, int64_t in_features, int64_t chunks) {
  std::vector<float> out(tokens * chunks * 2 * kPairChunk, 0.f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t v = 0; v < in_features / 2; ++v) {
      const int64_t c = v / kPairChunk, within = v % kPairChunk;
      float* base = out.data() + (t * chunks + c) * 2 * kPairChunk + (within % 4) * 16 + within / 4;
      base[0] = xs[t * in_features + 2 * v];
      base[kPairChunk] = xs[t * in_features + 2 * v + 1];
    }
  return out;
}

template <int Bits, int Tokens, int Rows>
inline void codebook2_block(int64_t r, const uint8_t* packed, int64_t row_bytes, int64_t words, int64_t chunks,
                            const float* xp, const __m512* table, __m512i spread, __mmask64 keep, const RowOut& out) {
  constexpr int Partials = Tokens * Rows <= 2 ? 2 : 1;
  const __m512i fields = _mm512_set1_epi64(static_cast<int64_t>(
      (uint64_t{7 * Bits} << 56) | (uint64_t{6 * Bits} << 48) | (uint64_t{5 * Bits} << 40) |
      (uint64_t{4 * Bits} << 32) | (uint64_t{3 * Bits} << 24) | (uint64_t{2 * Bits} << 16) | (uint64_t{Bits} << 8)));
  const __m512i code_mask = _mm512_set1_epi8(static_cast<char>((1 << Bits) - 1));
  const __m512i sixth = _mm512_set1_epi32(32);
  __m512 acc[Rows][Tokens][2 * Partials];
  for (int k = 0; k < Rows; ++k)
    for (int t = 0; t < Tokens; ++t)
      for (int q = 0; q < 2 * Partials; ++q) acc[k][t][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t chunk_words = std::min<int64_t>(8, words - 8 * c);
    const __mmask64 present = chunk_words == 8 ? ~__mmask64{0} : ((__mmask64{1} << (chunk_words * Bits)) - 1);
    __m512i codes[Rows];
    for (int k = 0; k < Rows; ++k) {
      const uint8_t* row = packed + (r + k) * row_bytes + 8 * c * Bits;
      _mm_prefetch(reinterpret_cast<const char*>(row + 4 * Rows * row_bytes), _MM_HINT_T0);
      const __m512i spread_words = _mm512_maskz_permutexvar_epi8(keep, spread, _mm512_maskz_loadu_epi8(present, row));
      codes[k] = _mm512_and_si512(_mm512_multishift_epi64_epi8(fields, spread_words), code_mask);
    }
#pragma GCC unroll 4
    for (int phase = 0; phase < 4; ++phase) {
      __m512 first[Tokens], second[Tokens];
      for (int t = 0; t < Tokens; ++t) {
        const float* x = xp + (t * chunks + c) * 2 * kPairChunk + 16 * phase;
        first[t] = _mm512_loadu_ps(x);
        second[t] = _mm512_loadu_ps(x + kPairChunk);
      }
      for (int k = 0; k < Rows; ++k) {
        const __m512i index = phase == 0 ? codes[k] : _mm512_srli_epi32(codes[k], 8 * phase);
        const __mmask16 high = _mm512_test_epi32_mask(index, sixth);
        const __m512 w0 = _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(table[0], index, table[1]),
                                               _mm512_permutex2var_ps(table[2], index, table[3]));
        const __m512 w1 = _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(table[4], index, table[5]),
                                               _mm512_permutex2var_ps(table[6], index, table[7]));
        const int q = Partials == 2 ? 2 * (phase % 2) : 0;
        for (int t = 0; t < Tokens; ++t) {
          acc[k][t][q] = _mm512_fmadd_ps(w0, first[t], acc[k][t][q]);
          acc[k][t][q + 1] = _mm512_fmadd_ps(w1, second[t], acc[k][t][q + 1]);
        }
      }
    }
  }
  for (int k = 0; k < Rows; ++k)
    for (int t = 0; t < Tokens; ++t) {
      __m512 sum = _mm512_add_ps(acc[k][t][0], acc[k][t][1]);
      for (int q = 2; q < 2 * Partials; ++q) sum = _mm512_add_ps(sum, acc[k][t][q]);
      out.put(t, r + k, _mm512_reduce_add_ps(sum));
    }
}

template <int Bits, int Tokens>
void codebook2_rows(int64_t begin, int64_t end, const float* xp, int64_t in_features, const uint8_t* packed,
                    int64_t row_bytes, const float* books, int64_t rows_per_group, const RowOut& out) {
  constexpr int64_t entries = int64_t{1} << Bits;
  constexpr int Rows = Tokens <= 2 ? 2 : 1;
  const int64_t vectors = in_features / 2, words = (vectors + 7) / 8;
  const int64_t chunks = (vectors + kPairChunk - 1) / kPairChunk;
  const auto [spread, keep] = word_spread<Bits, 8>();
  for (int64_t start = begin; start < end;) {
    const int64_t group = start / rows_per_group;
    const int64_t stop = std::min(end, (group + 1) * rows_per_group);
    alignas(64) float components[2][64] = {};  // the group's codebook, component by component, 0 past its entries
    const float* book = books + group * entries * 2;
    for (int64_t e = 0; e < entries; ++e) {
      components[0][e] = book[2 * e];
      components[1][e] = book[2 * e + 1];
    }
    __m512 table[8];
    for (int j = 0; j < 8; ++j) table[j] = _mm512_load_ps(components[j / 4] + 16 * (j % 4));
    int64_t r = start;
    for (; r + Rows <= stop; r += Rows)
      codebook2_block<Bits, Tokens, Rows>(r, packed, row_bytes, words, chunks, xp, table, spread, keep, out);
    for (; r < stop; ++r) codebook2_block<Bits, Tokens, 1>(r, packed, row_bytes, words, chunks, xp, table, spread, keep, out);
    start = stop;
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// Decode (a few tokens) for 7- and 8-bit codes of 2-vectors (`jlcm` 3-bit's o_proj, k_proj and v_proj), straight
// from the codebook: a group's 128 or 256 entries (1-2 KiB) stay in L1, and eight codes become 16 weights by eight
// 8-byte loads, multiplied with the input as read (its order is the weights' order).
template <int Bits>
inline __m512 eight_pairs(const float* book, uint64_t word) {
  constexpr uint64_t mask = (uint64_t{1} << Bits) - 1;
  auto pair = [&](int j) { return reinterpret_cast<const double*>(book + 2 * ((word >> (Bits * j)) & mask)); };
  const __m128d q0 = _mm_loadh_pd(_mm_load_sd(pair(0)), pair(1));
  const __m128d q1 = _mm_loadh_pd(_mm_load_sd(pair(2)), pair(3));
  const __m128d q2 = _mm_loadh_pd(_mm_load_sd(pair(4)), pair(5));
  const __m128d q3 = _mm_loadh_pd(_mm_load_sd(pair(6)), pair(7));
  __m512d w = _mm512_insertf64x2(_mm512_castpd128_pd512(q0), q1, 1);
  w = _mm512_insertf64x2(w, q2, 2);
  return _mm512_castpd_ps(_mm512_insertf64x2(w, q3, 3));
}

template <int Bits, int Tokens>
void codebook2_direct_rows(int64_t begin, int64_t end, const float* xs, int64_t in_features, const uint8_t* packed,
                           int64_t row_bytes, const float* books, int64_t rows_per_group, const RowOut& out) {
  constexpr int64_t entries = int64_t{1} << Bits;
  constexpr uint64_t mask = entries - 1;
  const int64_t vectors = in_features / 2;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* codes = packed + r * row_bytes;
    const float* book = books + (r / rows_per_group) * entries * 2;
    _mm_prefetch(reinterpret_cast<const char*>(codes + 2 * row_bytes), _MM_HINT_T0);
    __m512 low[Tokens], high[Tokens];
    for (int t = 0; t < Tokens; ++t) low[t] = high[t] = _mm512_setzero_ps();
    int64_t v = 0;
    for (; v + 16 <= vectors; v += 16) {
      const __m512 first = eight_pairs<Bits>(book, load_le<Bits>(codes + (v / 8) * Bits));
      const __m512 second = eight_pairs<Bits>(book, load_le<Bits>(codes + (v / 8 + 1) * Bits));
      for (int t = 0; t < Tokens; ++t) {
        const float* input = xs + t * in_features + 2 * v;
        low[t] = _mm512_fmadd_ps(first, _mm512_loadu_ps(input), low[t]);
        high[t] = _mm512_fmadd_ps(second, _mm512_loadu_ps(input + 16), high[t]);
      }
    }
    for (; v + 8 <= vectors; v += 8) {
      const __m512 first = eight_pairs<Bits>(book, load_le<Bits>(codes + (v / 8) * Bits));
      for (int t = 0; t < Tokens; ++t)
        low[t] = _mm512_fmadd_ps(first, _mm512_loadu_ps(xs + t * in_features + 2 * v), low[t]);
    }
    const uint64_t rest = v < vectors ? load_le<Bits>(codes + (v / 8) * Bits) : 0;  // the last, partial word
    for (int t = 0; t < Tokens; ++t) {
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(low[t], high[t]));
      for (int64_t u = v; u < vectors; ++u) {
        const float* entry = book + 2 * ((rest >> (Bits * (u - v))) & mask);
        sum += entry[0] * xs[t * in_features + 2 * u] + entry[1] * xs[t * in_features + 2 * u + 1];
      }
      out.put(t, r, sum);
    }
  }
}
#endif

#if defined(__AVX512F__)
// Decode (a few tokens) for 8-bit codes of 4-vectors, straight from the codebook: a group's 256 entries (4 KiB)
// stay in L1, so four codes become 16 weights by four 16-byte loads, multiplied with the input as they are read.
// Eight codes are read as one word; the byte offset of entry c is c * 16, taken from the word by a shift and a
// mask. Two accumulators per token, held in registers (a loop-carried index into them would put them in memory).
inline __m512 four_entries(const char* book, uint32_t codes) {
  __m512 w = _mm512_castps128_ps512(_mm_loadu_ps(reinterpret_cast<const float*>(book + ((codes << 4) & 0xFF0))));
  w = _mm512_insertf32x4(w, _mm_loadu_ps(reinterpret_cast<const float*>(book + ((codes >> 4) & 0xFF0))), 1);
  w = _mm512_insertf32x4(w, _mm_loadu_ps(reinterpret_cast<const float*>(book + ((codes >> 12) & 0xFF0))), 2);
  return _mm512_insertf32x4(w, _mm_loadu_ps(reinterpret_cast<const float*>(book + ((codes >> 20) & 0xFF0))), 3);
}

template <int Tokens>
void codebook4_rows(int64_t begin, int64_t end, const float* xs, int64_t in_features, const uint8_t* packed,
                    int64_t row_bytes, const float* books, int64_t rows_per_group, const RowOut& out) {
  const int64_t vectors = in_features / 4;
  {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* codes = packed + r * row_bytes;
      const float* book = books + (r / rows_per_group) * 256 * 4;
      const char* entries = reinterpret_cast<const char*>(book);
      _mm_prefetch(reinterpret_cast<const char*>(codes + 2 * row_bytes), _MM_HINT_T0);
      __m512 low[Tokens], high[Tokens];
      for (int t = 0; t < Tokens; ++t) low[t] = high[t] = _mm512_setzero_ps();
      int64_t v = 0;
      for (; v + 8 <= vectors; v += 8) {
        const uint64_t word = load_le<8>(codes + v);
        const __m512 first = four_entries(entries, static_cast<uint32_t>(word));
        const __m512 second = four_entries(entries, static_cast<uint32_t>(word >> 32));
        for (int t = 0; t < Tokens; ++t) {
          const float* input = xs + t * in_features + 4 * v;
          low[t] = _mm512_fmadd_ps(first, _mm512_loadu_ps(input), low[t]);
          high[t] = _mm512_fmadd_ps(second, _mm512_loadu_ps(input + 16), high[t]);
        }
      }
      for (int t = 0; t < Tokens; ++t) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(low[t], high[t]));
        for (int64_t u = v; u < vectors; ++u)
          for (int k = 0; k < 4; ++k) sum += book[4 * codes[u] + k] * xs[t * in_features + 4 * u + k];
        out.put(t, r, sum);
      }
    }
  }
}
#endif

void check_codebook(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                    const c10::optional<at::Tensor>& scales, int64_t code_bits, int64_t rows_per_group) {
  TORCH_CHECK(code_bits >= 1 && code_bits <= 8, "code_bits must be in 1..8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat && codebooks.is_contiguous() && codebooks.dim() == 3,
              "codebooks must be contiguous float32 [groups, entries, dim]");
  const int64_t out_features = codes.size(0), in_features = x.size(1), dim = codebooks.size(2);
  TORCH_CHECK(codebooks.size(1) == (int64_t{1} << code_bits), "codebooks must have 2**code_bits entries");
  TORCH_CHECK(in_features % dim == 0, "vector_dim must divide in_features");
  TORCH_CHECK(codes.size(1) == (in_features / dim + 7) / 8 * code_bits, "codes row length does not match in_features");
  TORCH_CHECK(rows_per_group > 0 && codebooks.size(0) * rows_per_group == out_features, "rows_per_group");
  if (scales.has_value())
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == out_features,
                "scales must be float32 [out_features]");
}

// One codebook layer of a decode: its input (kept columns zeroed), codes, codebooks (`[groups, entries, dim]`) and
// how its rows are finished.
struct CodebookSegment {
  const float* xs = nullptr;
  const uint8_t* packed = nullptr;
  int64_t row_bytes = 0;
  at::Tensor books;
  int64_t rows_per_group = 0;
  RowOut out;
};

// Decode (1 to kDecodeTokens tokens) of layers of one code width and vector size on the same input, in one parallel
// loop over all their rows, where a kernel above serves the width and vector size. False where none does (the
// caller takes the row-decoding driver).
bool codebook_decode(int64_t tokens, int64_t in_features, int64_t code_bits, int64_t dim,
                     std::vector<CodebookSegment>& segments) {
  if (tokens < 1 || tokens > kDecodeTokens) return false;
  std::vector<int64_t> starts(segments.size() + 1, 0);
  for (size_t s = 0; s < segments.size(); ++s) starts[s + 1] = starts[s] + segments[s].out.out_features;
  // calls rows(segment, begin, end) for the rows of each segment in one loop over all of them
  auto each = [&](const auto& rows) {
    at::parallel_for(0, starts.back(), 16, [&](int64_t begin, int64_t end) {
      for (size_t s = 0; s < segments.size(); ++s) {
        const int64_t low = std::max(begin, starts[s]) - starts[s], high = std::min(end, starts[s + 1]) - starts[s];
        if (low < high) rows(segments[s], low, high);
      }
    });
  };
  return with_bits(code_bits, [&](auto width) {
    constexpr int Bits = decltype(width)::value;
#if defined(__AVX512F__)
    if constexpr (Bits == 8) {
      if (dim == 4) {
        with_tokens(tokens, [&](auto count) {
          each([&](const CodebookSegment& g, int64_t begin, int64_t end) {
            codebook4_rows<decltype(count)::value>(begin, end, g.xs, in_features, g.packed, g.row_bytes,
                                                   g.books.data_ptr<float>(), g.rows_per_group, g.out);
          });
        });
        return true;
      }
    }
#endif
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
    if constexpr (Bits <= 6) {
      if (dim == 2) {
        std::vector<std::vector<float>> inputs;  // each layer's input (its kept columns zeroed) permuted to match
        const int64_t chunks = (in_features / 2 + kPairChunk - 1) / kPairChunk;
        for (const CodebookSegment& g : segments) inputs.push_back(pair_input(g.xs, tokens, in_features, chunks));
        with_tokens(tokens, [&](auto count) {
          each([&](const CodebookSegment& g, int64_t begin, int64_t end) {
            const float* xp = inputs[&g - segments.data()].data();
            codebook2_rows<Bits, decltype(count)::value>(begin, end, xp, in_features, g.packed, g.row_bytes,
                                                         g.books.data_ptr<float>(), g.rows_per_group, g.out);
          });
        });
        return true;
      }
    }
#if defined(__AVX512DQ__)
    if constexpr (Bits >= 7) {
      if (dim == 2) {
        with_tokens(tokens, [&](auto count) {
          each([&](const CodebookSegment& g, int64_t begin, int64_t end) {
            codebook2_direct_rows<Bits, decltype(count)::value>(begin, end, g.xs, in_features, g.packed, g.row_bytes,
                                                                g.books.data_ptr<float>(), g.rows_per_group, g.out);
          });
        });
        return true;
      }
    }
#endif
    if constexpr (Bits >= 4) {  // a table row of at least 16 entries
      for (CodebookSegment& g : segments) g.books = g.books.transpose(1, 2).contiguous();  // [groups, dim, entries]
      with_tokens(tokens, [&](auto count) {
        each([&](const CodebookSegment& g, int64_t begin, int64_t end) {
          codebook_lut_rows<Bits, decltype(count)::value>(begin, end, g.xs, in_features, g.packed, g.row_bytes,
                                                          g.books.data_ptr<float>(), dim, g.rows_per_group, g.out);
        });
      });
      return true;
    }
#endif
    return false;
  });
}

// Many tokens, or widths no decode kernel serves: rows in stored order decoded (times their scales) into the
// driver, which takes them through dot products or a tiled matmul.
at::Tensor codebook_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const c10::optional<at::Tensor>& scales, int64_t code_bits, int64_t rows_per_group) {
  const int64_t out_features = codes.size(0), in_features = x.size(1);
  const int64_t dim = codebooks.size(2), entries = codebooks.size(1), vectors = in_features / dim;
  const float* ss = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  const uint8_t* packed = codes.data_ptr<uint8_t>();
  const float* books = codebooks.data_ptr<float>();
  const int64_t row_bytes = codes.size(1);
  return with_bits(code_bits, [&](auto width) {
    constexpr int Bits = decltype(width)::value;
    return run_linear(x, out_features, in_features, [=](int64_t r, float* row, int32_t* scratch) {
      unpack_row<Bits>(packed + r * row_bytes, vectors, scratch);
      const float* book = books + (r / rows_per_group) * entries * dim;
      switch (dim) {
        case 1: gather_vectors<1>(scratch, book, vectors, dim, row); break;
        case 2: gather_vectors<2>(scratch, book, vectors, dim, row); break;
        case 4: gather_vectors<4>(scratch, book, vectors, dim, row); break;
        case 8: gather_vectors<8>(scratch, book, vectors, dim, row); break;
        default: gather_vectors<0>(scratch, book, vectors, dim, row);
      }
      if (ss != nullptr) {
        const float scale = ss[r];
        for (int64_t i = 0; i < in_features; ++i) row[i] *= scale;
      }
    });
  });
}

void check_codebook_rows(const at::Tensor& codes, const c10::optional<at::Tensor>& permutation,
                         const c10::optional<at::Tensor>& column_indices,
                         const c10::optional<at::Tensor>& column_weights) {
  const int64_t out_features = codes.size(0);
  TORCH_CHECK(column_indices.has_value() == column_weights.has_value(),
              "column_indices and column_weights go together");
  if (column_indices.has_value())
    TORCH_CHECK(column_indices->scalar_type() == at::kLong && column_indices->is_contiguous() &&
                    column_weights->scalar_type() == at::kFloat && column_weights->is_contiguous() &&
                    column_weights->dim() == 2 && column_weights->size(0) == out_features &&
                    column_weights->size(1) == column_indices->numel(),
                "column_indices must be int64 [k] and column_weights float32 [out_features, k]");
  if (permutation.has_value()) {
    TORCH_CHECK(permutation->scalar_type() == at::kLong && permutation->is_contiguous() &&
                    permutation->numel() == out_features,
                "permutation must be int64 [out_features]");
    const int64_t* rows = permutation->data_ptr<int64_t>();
    for (int64_t r = 0; r < out_features; ++r)
      TORCH_CHECK(rows[r] >= 0 && rows[r] < out_features, "permutation out of range");
  }
}

// A layer's part of a decode: its input without the kept columns (`zeroed`) and those columns (`kept_x`), which
// must live until the decode is done, and how each row is finished into `y`.
CodebookSegment codebook_segment(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                                 const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& permutation,
                                 const c10::optional<at::Tensor>& column_indices,
                                 const c10::optional<at::Tensor>& column_weights, int64_t rows_per_group,
                                 const at::Tensor& y, std::vector<float>& zeroed, std::vector<float>& kept_x) {
  const int64_t tokens = x.size(0), in_features = x.size(1);
  CodebookSegment segment;
  segment.xs = x.data_ptr<float>();
  if (column_indices.has_value()) {
    const int64_t k = column_indices->numel();
    const int64_t* columns = column_indices->data_ptr<int64_t>();
    zeroed.assign(segment.xs, segment.xs + tokens * in_features);
    kept_x.resize(static_cast<size_t>(tokens * k));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(columns[j] >= 0 && columns[j] < in_features, "column_indices out of range");
        kept_x[t * k + j] = segment.xs[t * in_features + columns[j]];
        zeroed[t * in_features + columns[j]] = 0.f;
      }
    segment.xs = zeroed.data();
    segment.out.kept_x = kept_x.data();
    segment.out.weights = column_weights->data_ptr<float>();
    segment.out.kept = k;
  }
  segment.packed = codes.data_ptr<uint8_t>();
  segment.row_bytes = codes.size(1);
  segment.books = codebooks;
  segment.rows_per_group = rows_per_group;
  segment.out.scales = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  segment.out.rows = permutation.has_value() ? permutation->data_ptr<int64_t>() : nullptr;
  segment.out.ys = y.data_ptr<float>();
  segment.out.out_features = codes.size(0);
  return segment;
}

// The whole layer: rows in stored order from the codes (with kept columns left out of the input), the kept columns'
// float16 weights added, then each stored row written to its original row. At decode all of it happens in the
// kernel's row loop (no other operator runs); otherwise the kept columns and the permutation are ATen operations.
at::Tensor codebook_linear_2d(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                           const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& permutation,
                           const c10::optional<at::Tensor>& column_indices,
                           const c10::optional<at::Tensor>& column_weights, int64_t code_bits, int64_t rows_per_group) {
  check_codebook(x, codes, codebooks, scales, code_bits, rows_per_group);
  check_codebook_rows(codes, permutation, column_indices, column_weights);
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = codes.size(0);
  if (tokens >= 1 && tokens <= kDecodeTokens) {
    thread_local std::vector<float> zeroed, kept_x;  // the input without its kept columns, and those columns
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    std::vector<CodebookSegment> segments{codebook_segment(x, codes, codebooks, scales, permutation, column_indices,
                                                           column_weights, rows_per_group, y, zeroed, kept_x)};
    if (codebook_decode(tokens, in_features, code_bits, codebooks.size(2), segments)) return y;
  }
  const bool kept = column_indices.has_value();
  at::Tensor y = codebook_rows(kept ? x.index_fill(1, *column_indices, 0.0) : x, codes, codebooks, scales, code_bits,
                               rows_per_group);
  if (kept) y.addmm_(x.index_select(1, *column_indices), column_weights->t());
  if (!permutation.has_value()) return y;
  return at::empty_like(y).index_copy_(1, *permutation, y);
}

// Several codebook layers of one code width on the same input: at decode, one parallel loop over all their rows;
// otherwise each layer as codebook_linear_2d computes it.
std::vector<at::Tensor> codebook_linear_group_2d(const at::Tensor& x, at::TensorList codes, at::TensorList codebooks,
                                                 const c10::List<c10::optional<at::Tensor>>& scales,
                                                 const c10::List<c10::optional<at::Tensor>>& permutations,
                                                 const c10::List<c10::optional<at::Tensor>>& column_indices,
                                                 const c10::List<c10::optional<at::Tensor>>& column_weights,
                                                 int64_t code_bits, at::IntArrayRef rows_per_group) {
  const size_t count = codes.size();
  TORCH_CHECK(count > 0 && codebooks.size() == count && scales.size() == count && permutations.size() == count &&
                  column_indices.size() == count && column_weights.size() == count && rows_per_group.size() == count,
              "every list needs one entry per layer");
  const int64_t tokens = x.size(0), in_features = x.size(1);
  std::vector<at::Tensor> outputs;
  bool same_dim = true;
  for (size_t s = 0; s < count; ++s) same_dim = same_dim && codebooks[s].size(2) == codebooks[0].size(2);
  if (same_dim && tokens >= 1 && tokens <= kDecodeTokens) {
    std::vector<std::vector<float>> zeroed(count), kept_x(count);
    std::vector<CodebookSegment> segments;
    for (size_t s = 0; s < count; ++s) {
      check_codebook(x, codes[s], codebooks[s], scales.get(s), code_bits, rows_per_group[s]);
      check_codebook_rows(codes[s], permutations.get(s), column_indices.get(s), column_weights.get(s));
      outputs.push_back(at::empty({tokens, codes[s].size(0)}, x.options()));
      segments.push_back(codebook_segment(x, codes[s], codebooks[s], scales.get(s), permutations.get(s),
                                          column_indices.get(s), column_weights.get(s), rows_per_group[s],
                                          outputs.back(), zeroed[s], kept_x[s]));
    }
    if (codebook_decode(tokens, in_features, code_bits, codebooks[0].size(2), segments)) return outputs;
    outputs.clear();
  }
  for (size_t s = 0; s < count; ++s)
    outputs.push_back(codebook_linear_2d(x, codes[s], codebooks[s], scales.get(s), permutations.get(s),
                                         column_indices.get(s), column_weights.get(s), code_bits, rows_per_group[s]));
  return outputs;
}

#if defined(__AVX512F__)
// Decode (a few tokens) for a float16 weight: 16 values widened at a time and multiplied with every token's input as
// they are read, no row written out (widening a row into a buffer first took twice as long for the head).

template <int Tokens>
void half_gemv(const float* xs, const c10::Half* ws, int64_t in_features, int64_t out_features, float* ys) {
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const c10::Half* src = ws + r * in_features;
      __m512 even[Tokens], odd[Tokens];
      for (int t = 0; t < Tokens; ++t) even[t] = odd[t] = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 32 <= in_features; i += 32) {
        const __m512 first = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
        const __m512 second = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16)));
        for (int t = 0; t < Tokens; ++t) {
          even[t] = _mm512_fmadd_ps(first, _mm512_loadu_ps(xs + t * in_features + i), even[t]);
          odd[t] = _mm512_fmadd_ps(second, _mm512_loadu_ps(xs + t * in_features + i + 16), odd[t]);
        }
      }
      for (; i + 16 <= in_features; i += 16) {
        const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
        for (int t = 0; t < Tokens; ++t) even[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + t * in_features + i), even[t]);
      }
      for (int t = 0; t < Tokens; ++t) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));
        for (int64_t j = i; j < in_features; ++j) sum += static_cast<float>(src[j]) * xs[t * in_features + j];
        ys[t * out_features + r] = sum;
      }
    }
  });
}
#endif

// A float16 weight (the output head kept as stored): rows widened to float32 as they are read.
at::Tensor half_linear_2d(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kHalf && weight.is_contiguous() && weight.dim() == 2,
              "weight must be contiguous float16 [out, in]");
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  const c10::Half* ws = weight.data_ptr<c10::Half>();
#if defined(__AVX512F__)
  const int64_t tokens = x.size(0);
  if (tokens >= 1 && tokens <= kDecodeTokens) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [tokens, ", in_features, "]");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    with_tokens(tokens, [&](auto count) {
      half_gemv<decltype(count)::value>(x.data_ptr<float>(), ws, in_features, out_features, y.data_ptr<float>());
    });
    return y;
  }
#endif
  return run_linear(x, out_features, in_features, [=](int64_t r, float* row, int32_t*) {
    const c10::Half* src = ws + r * in_features;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= in_features; i += 16) {
      __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_ps(row + i, _mm512_cvtph_ps(half));
    }
#endif
    for (; i < in_features; ++i) row[i] = static_cast<float>(src[i]);
  });
}

// RMS normalization over the last dimension as Llama's RMSNorm computes it in float32, `weight * (x / sqrt(mean(x^2)
// + eps))`: one call where the module runs six operators per token, each costing more than the arithmetic.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "x and weight must be float32");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "weight must be [x.size(-1)]");
  const at::Tensor flat = x.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(flat);
  const int64_t width = w.size(0);
  const int64_t rows = width == 0 ? 0 : flat.numel() / width;
  const float* xs = flat.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = xs + r * width;
      float* out = ys + r * width;
      const float inverse = 1.f / std::sqrt(dot(in, in, width) / static_cast<float>(width) + epsilon);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[i] = ws[i] * (in[i] * inverse);
    }
  });
  return y;
}

// The operators as layers call them: `x [..., in]` float32, `y [..., out]`, the bias added here (one call per
// layer and token: each Python-side reshape or add costs as much as a small layer's product).
// `y [tokens, out]` with the bias added, shaped as `x` with `out` as its last size.
at::Tensor with_bias_as(at::Tensor y, const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

template <typename Linear>
at::Tensor any_shape(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const Linear& linear) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be float32 [..., in_features]");
  return with_bias_as(linear(x.reshape({-1, x.size(-1)}).contiguous()), bias, x);
}

at::Tensor grid_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& zeros,
                       const at::Tensor& factors, const at::Tensor& table, int64_t bits, int64_t group_size,
                       const c10::optional<at::Tensor>& bias) {
  return any_shape(x, bias, [&](const at::Tensor& flat) {
    return grid_linear_2d(flat, qweight, zeros, factors, table, bits, group_size);
  });
}

// The same for the group operators: one output per layer, each with its own bias (or None).
template <typename Linears>
std::vector<at::Tensor> any_shape_group(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& biases,
                                        size_t count, const Linears& linears) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be float32 [..., in_features]");
  TORCH_CHECK(biases.size() == count, "one bias (or None) per layer");
  std::vector<at::Tensor> outputs = linears(x.reshape({-1, x.size(-1)}).contiguous());
  for (size_t s = 0; s < outputs.size(); ++s) outputs[s] = with_bias_as(outputs[s], biases.get(s), x);
  return outputs;
}

std::vector<at::Tensor> grid_linear_group(const at::Tensor& x, at::TensorList qweights, at::TensorList zeros,
                                          at::TensorList factors, at::TensorList tables, int64_t bits,
                                          int64_t group_size, const c10::List<c10::optional<at::Tensor>>& biases) {
  return any_shape_group(x, biases, qweights.size(), [&](const at::Tensor& flat) {
    return grid_linear_group_2d(flat, qweights, zeros, factors, tables, bits, group_size);
  });
}

std::vector<at::Tensor> codebook_linear_group(const at::Tensor& x, at::TensorList codes, at::TensorList codebooks,
                                              const c10::List<c10::optional<at::Tensor>>& scales,
                                              const c10::List<c10::optional<at::Tensor>>& permutations,
                                              const c10::List<c10::optional<at::Tensor>>& column_indices,
                                              const c10::List<c10::optional<at::Tensor>>& column_weights,
                                              int64_t code_bits, at::IntArrayRef rows_per_group,
                                              const c10::List<c10::optional<at::Tensor>>& biases) {
  return any_shape_group(x, biases, codes.size(), [&](const at::Tensor& flat) {
    return codebook_linear_group_2d(flat, codes, codebooks, scales, permutations, column_indices, column_weights,
                                    code_bits, rows_per_group);
  });
}

at::Tensor codebook_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                           const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& permutation,
                           const c10::optional<at::Tensor>& column_indices,
                           const c10::optional<at::Tensor>& column_weights, int64_t code_bits, int64_t rows_per_group,
                           const c10::optional<at::Tensor>& bias) {
  return any_shape(x, bias, [&](const at::Tensor& flat) {
    return codebook_linear_2d(flat, codes, codebooks, scales, permutation, column_indices, column_weights, code_bits,
                              rows_per_group);
  });
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return any_shape(x, bias, [&](const at::Tensor& flat) { return half_linear_2d(flat, weight); });
}

}  // namespace

TORCH_LIBRARY(compress, m) {
  m.def("grid_linear(Tensor x, Tensor qweight, Tensor zeros, Tensor factors, Tensor table, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
  m.def("codebook_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? scales, Tensor? permutation, "
        "Tensor? column_indices, Tensor? column_weights, int code_bits, int rows_per_group, Tensor? bias) -> Tensor");
  m.def("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("grid_linear_group(Tensor x, Tensor[] qweights, Tensor[] zeros, Tensor[] factors, Tensor[] tables, int bits, "
        "int group_size, Tensor?[] biases) -> Tensor[]");
  m.def("codebook_linear_group(Tensor x, Tensor[] codes, Tensor[] codebooks, Tensor?[] scales, "
        "Tensor?[] permutations, Tensor?[] column_indices, Tensor?[] column_weights, int code_bits, "
        "int[] rows_per_group, Tensor?[] biases) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(compress, CPU, m) {
  m.impl("grid_linear", &grid_linear);
  m.impl("codebook_linear", &codebook_linear);
  m.impl("half_linear", &half_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("grid_linear_group", &grid_linear_group);
  m.impl("codebook_linear_group", &codebook_linear_group);
}
