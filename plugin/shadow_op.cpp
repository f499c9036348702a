// Sink shadows of a decode step, every layer in one pass (docs/architecture.md §4, option 4; see
// shadow_op.py for why this exists and how it is built and loaded).
//
// The cache is vLLM's CPU "vec" layout: per (block, KV head) a page of 2*B*D elements, keys as
// [D][B] (column-major: feature d of the token at offset t is at d*B + t), then values as [B][D].
// The same shadows go to every cache in `caches` (the layers of the step: same slots, each
// layer's own sink K/V). For shadow n, every layer and every KV head: read the key of sink slot
// src[n], rotate its first rotary_dim features by table row rot_row[n], write it to slot dst[n];
// copy the value the same way. Features pair up as halves (NeoX: d with d + rotary_dim/2) or,
// with adjacent_pairs, as neighbours (GPT-J: 2d with 2d+1); rotary_dim 0 is a plain copy (ALiBi
// models: nothing positional is stored in a key). Shadows of one request
// share their source and destination cache lines (the S sinks are adjacent slots, so are their
// shadows), so they stay in L1 across n.
// Threads: OpenMP, built against the libgomp.so.1 that torch has already loaded by then, so the
// loop runs on torch's own (core-bound) thread pool, not a second one.
// Arithmetic in float (bf16 is widened, then rounded to nearest even), built without FMA
// contraction: x1*cos - x2*sin and x2*cos + x1*sin, the formula of vLLM's rotary op.
#include <cstdint>
#include <cstring>

namespace {

inline float load(const float* p) { return *p; }
inline void store(float* p, float x) { *p = x; }

inline float load(const uint16_t* p) {
    uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

inline void store(uint16_t* p, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        *p = static_cast<uint16_t>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    *p = static_cast<uint16_t>(bits >> 16);
}

template <typename T>
void write_shadows(T* const* caches, int64_t layers, int64_t shadows, int64_t kv_heads,
                   int64_t head_dim, int64_t block_size, int64_t rotary_dim,
                   int64_t adjacent_pairs, const int64_t* src, const int64_t* dst,
                   const int64_t* rot_row, const float* cos_sin) {
    const int64_t B = block_size, D = head_dim, half = rotary_dim / 2;
    // Angle d of the table row rotates features a = d * step and b = a + partner.
    const int64_t step = adjacent_pairs ? 2 : 1, partner = adjacent_pairs ? 1 : half;
    const int64_t page = 2 * B * D;
    // Split over the cores: the work is cache misses (a sink key read and a shadow key written
    // touch D lines each), and each core keeps its own misses in flight. Contiguous ranges keep
    // a request's shadows (which share lines) on one thread; all layers in one loop give the
    // threads one large share each instead of a small one per layer.
#pragma omp parallel for schedule(static) if (layers * shadows >= 16)
    for (int64_t k = 0; k < layers * shadows; ++k) {
        T* cache = caches[k / shadows];
        const int64_t n = k % shadows;
        const int64_t sb = src[n] / B, so = src[n] % B;
        const int64_t db = dst[n] / B, dof = dst[n] % B;
        const float* cos = cos_sin + rot_row[n] * rotary_dim;
        const float* sin = cos + half;
        for (int64_t h = 0; h < kv_heads; ++h) {
            const T* sk = cache + (sb * kv_heads + h) * page + so;
            T* dk = cache + (db * kv_heads + h) * page + dof;
            for (int64_t d = 0; d < half; ++d) {
                const int64_t a = d * step, b = a + partner;
                const float x1 = load(sk + a * B), x2 = load(sk + b * B);
                store(dk + a * B, x1 * cos[d] - x2 * sin[d]);
                store(dk + b * B, x2 * cos[d] + x1 * sin[d]);
            }
            for (int64_t d = rotary_dim; d < D; ++d) dk[d * B] = sk[d * B];
            const T* sv = cache + (sb * kv_heads + h) * page + B * D + so * D;
            T* dv = cache + (db * kv_heads + h) * page + B * D + dof * D;
            std::memcpy(dv, sv, D * sizeof(T));
        }
    }
}

}  // namespace

extern "C" {

void streamsink_write_shadows_f32(float* const* caches, int64_t layers, int64_t shadows,
                                  int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                  int64_t rotary_dim, int64_t adjacent_pairs, const int64_t* src,
                                  const int64_t* dst, const int64_t* rot_row,
                                  const float* cos_sin) {
    write_shadows(caches, layers, shadows, kv_heads, head_dim, block_size, rotary_dim,
                  adjacent_pairs, src, dst, rot_row, cos_sin);
}

void streamsink_write_shadows_bf16(uint16_t* const* caches, int64_t layers, int64_t shadows,
                                   int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                   int64_t rotary_dim, int64_t adjacent_pairs,
                                   const int64_t* src, const int64_t* dst, const int64_t* rot_row,
                                   const float* cos_sin) {
    write_shadows(caches, layers, shadows, kv_heads, head_dim, block_size, rotary_dim,
                  adjacent_pairs, src, dst, rot_row, cos_sin);
}

}  // extern "C"
