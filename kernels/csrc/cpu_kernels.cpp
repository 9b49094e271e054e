// kvserve's CPU kernels: paged attention that reads each K/V row once, small-M linear layers,
// and a whole decoder forward for small token counts (decode steps) in one call.
//
// Built by kernels/cpu.py with the system C++ compiler (-O3 -march=native -fopenmp) into a
// cache directory and called through ctypes with raw pointers; no torch headers, so the
// build takes seconds. OpenMP resolves to the libgomp that torch has already loaded (same
// soname), so the kernels and torch share one thread pool.
//
// Element type T is float (fp32 models) or bf16 (stored as uint16_t). Arithmetic is fp32;
// with AVX-512 BF16 the bf16 dot products use vdpbf16ps (bf16 x bf16 -> fp32 accumulate,
// as torch's bf16 GEMMs do).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

template <typename T> static inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<bf16>(const bf16* p, int64_t i) { return bf2f(p[i]); }
template <typename T> static inline T st(float v);
template <> inline float st<float>(float v) { return v; }
template <> inline bf16 st<bf16>(float v) { return f2bf(v); }

// ------------------------------------------------------------------------------ linear

// y[m, n] (=|+=) sum_k x[m, k] * w[n, k] (+ bias[n]) for rows n in [n0, n1).
// x is T [M, K] contiguous, w is T [N, K] (nn.Linear's layout), y is fp32 [M, ldy] or T.
enum OutMode { OUT_F32 = 0, OUT_ADD_F32 = 1, OUT_T = 2 };

static const int MT = 8;  // x rows per pass over a weight row (register accumulators)

template <typename T>
static inline void dot_rows(const T* x, int64_t K, const T* wrow, int mcount, float* out);

template <>
inline void dot_rows<float>(const float* x, int64_t K, const float* wrow, int mcount, float* out) {
#if defined(__AVX512F__)
    __m512 acc[MT];
    for (int m = 0; m < mcount; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w = _mm512_loadu_ps(wrow + k);
        for (int m = 0; m < mcount; ++m)
            acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w, acc[m]);
    }
    if (k < K) {
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        __m512 w = _mm512_maskz_loadu_ps(mask, wrow + k);
        for (int m = 0; m < mcount; ++m)
            acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k), w, acc[m]);
    }
    for (int m = 0; m < mcount; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int m = 0; m < mcount; ++m) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * wrow[k];
        out[m] = s;
    }
#endif
}

template <>
inline void dot_rows<bf16>(const bf16* x, int64_t K, const bf16* wrow, int mcount, float* out) {
#if defined(__AVX512BF16__)
    __m512 acc[MT];
    for (int m = 0; m < mcount; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh w = (__m512bh)_mm512_loadu_si512(wrow + k);
        for (int m = 0; m < mcount; ++m)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), w);
    }
    if (k < K) {
        __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, wrow + k);
        for (int m = 0; m < mcount; ++m)
            acc[m] = _mm512_dpbf16_ps(
                acc[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k), w);
    }
    for (int m = 0; m < mcount; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int m = 0; m < mcount; ++m) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += bf2f(x[m * K + k]) * bf2f(wrow[k]);
        out[m] = s;
    }
#endif
}

// The row loop of a linear layer; call inside a parallel region (it is an `omp for`).
template <typename T>
static void linear_rows(const T* x, const T* w, const T* bias, void* y, int64_t M, int64_t N,
                        int64_t K, int64_t ldy, int mode) {
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T* wrow = w + n * K;
        const float b = bias ? ld<T>(bias, n) : 0.f;
        float out[MT];
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mc = (int)std::min<int64_t>(MT, M - m0);
            dot_rows<T>(x + m0 * K, K, wrow, mc, out);
            for (int m = 0; m < mc; ++m) {
                const float v = out[m] + b;
                const int64_t at = (m0 + m) * ldy + n;
                if (mode == OUT_F32) ((float*)y)[at] = v;
                else if (mode == OUT_ADD_F32) ((float*)y)[at] += v;
                else ((T*)y)[at] = st<T>(v);
            }
        }
    }
}

// ------------------------------------------------------------------------------ attention

struct AttnArgs {
    const float* q;           // [T, Hq, D] fp32 (already scaled by nothing; scale below)
    int64_t q_stride;         // elements between tokens in q
    const void* k_cache;      // [NB, B, Hkv, D] T
    const void* v_cache;
    const int32_t* block_tables;  // [S, max_blocks]
    int64_t max_blocks;
    const int32_t* cu_q;      // [S + 1]
    const int32_t* seq_lens;  // [S]
    int64_t num_seqs, num_tokens;
    int64_t hq, hkv, d, block_size;
    float scale;
    int64_t window;           // 0 = none
    void* out;                // [T, Hq, D] T
    int64_t out_stride;
};

static const int64_t CHUNK = 256;  // keys per work item: long sequences split across threads
static const int MAXG = 16;        // query heads per KV head handled together

// Work item = (token, kv head, key chunk). Each computes, for its G query heads, the running
// max, the sum of exp and the weighted V sum over its keys; a second pass merges chunks.
struct Item { int32_t tok, seq, chunk; int32_t lo, hi; };

template <typename T>
static void attn_item(const AttnArgs& a, const Item& it, int64_t h, float* part) {
    // part: G x (2 + D) floats: m, l, acc[D]
    const int64_t G = a.hq / a.hkv, D = a.d;
    const T* kc = (const T*)a.k_cache;
    const T* vc = (const T*)a.v_cache;
    const int32_t* table = a.block_tables + (int64_t)it.seq * a.max_blocks;
    float qv[MAXG][256];
    for (int64_t g = 0; g < G; ++g) {
        const float* qp = a.q + it.tok * a.q_stride + (h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) qv[g][i] = qp[i] * a.scale;
    }
    float m[MAXG], l[MAXG];
    for (int64_t g = 0; g < G; ++g) {
        m[g] = -INFINITY; l[g] = 0.f;
        std::memset(part + g * (2 + D) + 2, 0, sizeof(float) * D);
    }
    float kf[256];
    for (int64_t j = it.lo; j < it.hi; ++j) {
        const int64_t slot = (int64_t)table[j / a.block_size] * a.block_size + j % a.block_size;
        const T* kr = kc + (slot * a.hkv + h) * D;
        const T* vr = vc + (slot * a.hkv + h) * D;
        for (int64_t i = 0; i < D; ++i) kf[i] = ld<T>(kr, i);
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            const float* qg = qv[g];
            #pragma omp simd reduction(+:s)
            for (int64_t i = 0; i < D; ++i) s += qg[i] * kf[i];
            float* acc = part + g * (2 + D) + 2;
            if (s > m[g]) {
                const float c = std::exp(m[g] - s);
                l[g] *= c;
                for (int64_t i = 0; i < D; ++i) acc[i] *= c;
                m[g] = s;
            }
            const float p = std::exp(s - m[g]);
            l[g] += p;
            for (int64_t i = 0; i < D; ++i) acc[i] += p * ld<T>(vr, i);
        }
    }
    for (int64_t g = 0; g < G; ++g) { part[g * (2 + D)] = m[g]; part[g * (2 + D) + 1] = l[g]; }
}

// Builds the work list: for every query token its visible key range [lo, hi), in chunks.
static void attn_items(const AttnArgs& a, std::vector<Item>& items, std::vector<int32_t>& first) {
    items.clear();
    first.assign(a.num_tokens + 1, 0);
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        const int32_t q0 = a.cu_q[s], q1 = a.cu_q[s + 1], L = a.seq_lens[s];
        for (int32_t t = q0; t < q1; ++t) {
            const int64_t p = L - (q1 - q0) + (t - q0);     // position of this query
            int64_t lo = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
            const int64_t hi = p + 1;
            first[t] = (int32_t)items.size();
            for (int64_t c = lo; c < hi; c += CHUNK)
                items.push_back({t, (int32_t)s, (int32_t)((c - lo) / CHUNK), (int32_t)c,
                                 (int32_t)std::min(hi, c + CHUNK)});
        }
    }
    first[a.num_tokens] = (int32_t)items.size();
}

// Call inside a parallel region; items/first/part are shared.
template <typename T>
static void attention_body(const AttnArgs& a, const std::vector<Item>& items,
                           const std::vector<int32_t>& first, float* part) {
    const int64_t G = a.hq / a.hkv, D = a.d, per = G * (2 + D);
    const int64_t n = (int64_t)items.size() * a.hkv;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n; ++w) {
        const int64_t i = w / a.hkv, h = w % a.hkv;
        attn_item<T>(a, items[i], h, part + (i * a.hkv + h) * per);
    }
    #pragma omp for schedule(static)
    for (int64_t w = 0; w < a.num_tokens * a.hkv; ++w) {
        const int64_t t = w / a.hkv, h = w % a.hkv;
        T* out = (T*)a.out;
        for (int64_t g = 0; g < G; ++g) {
            float M = -INFINITY;
            for (int32_t i = first[t]; i < first[t + 1]; ++i)
                M = std::max(M, part[(i * a.hkv + h) * per + g * (2 + D)]);
            float L = 0.f, acc[256];
            for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
            for (int32_t i = first[t]; i < first[t + 1]; ++i) {
                const float* pp = part + (i * a.hkv + h) * per + g * (2 + D);
                if (pp[1] == 0.f) continue;
                const float c = std::exp(pp[0] - M);
                L += pp[1] * c;
                for (int64_t d = 0; d < D; ++d) acc[d] += pp[2 + d] * c;
            }
            T* o = out + t * a.out_stride + (h * G + g) * D;
            const float inv = L > 0.f ? 1.f / L : 0.f;
            for (int64_t d = 0; d < D; ++d) o[d] = st<T>(acc[d] * inv);
        }
    }
}

template <typename T>
static int attention(const AttnArgs& a, int nthreads) {
    if (a.d > 256 || a.hq / a.hkv > MAXG) return 1;
    std::vector<Item> items;
    std::vector<int32_t> first;
    attn_items(a, items, first);
    const int64_t per = (a.hq / a.hkv) * (2 + a.d);
    std::vector<float> part(std::max<size_t>(1, items.size() * a.hkv * per));
    #pragma omp parallel num_threads(nthreads)
    attention_body<T>(a, items, first, part.data());
    return 0;
}

// ------------------------------------------------------------------------------ forward

// Pointers of one decoder layer, in this order (0 where absent).
enum LayerPtr { P_LN1, P_WQKV, P_BQKV, P_QNORM, P_KNORM, P_WO, P_LN2, P_WGU, P_WDOWN,
                P_KCACHE, P_VCACHE, P_COUNT };
// Model dims, in this order.
enum Dim { D_LAYERS, D_HIDDEN, D_HQ, D_HKV, D_HEADDIM, D_INTER, D_BLOCK, D_MAXBLOCKS,
           D_ROPE_POS, D_COUNT };

template <typename T>
static void rmsnorm_rows(const float* x, const T* w, T* y, int64_t M, int64_t H, float eps) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * H;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
        const float r = 1.f / std::sqrt(ss / H + eps);
        for (int64_t i = 0; i < H; ++i) y[m * H + i] = st<T>(ld<T>(w, i) * (xr[i] * r));
    }
}

template <typename T>
static void head_norm(float* v, const T* w, int64_t D, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += v[i] * v[i];
    const float r = 1.f / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) v[i] = ld<T>(w, i) * (v[i] * r);
}

static void rope(float* v, const float* cos, const float* sin, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float x1 = v[i], x2 = v[i + h];
        v[i] = x1 * cos[i] - x2 * sin[i];
        v[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
    }
}

template <typename T>
static int forward(const int64_t* dims, const int64_t* const* layer_ptrs, const int64_t* windows,
                   const T* final_norm, const float* cos_t, const float* sin_t, float eps,
                   const T* x_in, const int64_t* positions, const int64_t* slots,
                   const int32_t* block_tables, const int32_t* cu_q, const int32_t* seq_lens,
                   int64_t num_tokens, int64_t num_seqs, T* out, int nthreads) {
    const int64_t L = dims[D_LAYERS], H = dims[D_HIDDEN], HQ = dims[D_HQ], HKV = dims[D_HKV],
                  D = dims[D_HEADDIM], I = dims[D_INTER], B = dims[D_BLOCK];
    const int64_t M = num_tokens, QKV = (HQ + 2 * HKV) * D;
    if (D > 256 || HQ / HKV > MAXG) return 1;
    std::vector<float> resid(M * H), qkv(M * QKV), gu(M * 2 * I);
    std::vector<T> h(M * std::max(H, HQ * D)), act(M * I);
    AttnArgs a{};
    a.q = qkv.data(); a.q_stride = QKV; a.block_tables = block_tables;
    a.max_blocks = dims[D_MAXBLOCKS]; a.cu_q = cu_q; a.seq_lens = seq_lens;
    a.num_seqs = num_seqs; a.num_tokens = M; a.hq = HQ; a.hkv = HKV; a.d = D; a.block_size = B;
    a.scale = 1.f / std::sqrt((float)D); a.out = h.data(); a.out_stride = HQ * D;
    // The key ranges depend on the window, which may differ per layer (Mistral/Qwen2 mixes).
    std::vector<Item> items;
    std::vector<int32_t> first;
    std::vector<float> part;
    int64_t items_window = -1;
    for (int64_t i = 0; i < M * H; ++i) resid[i] = ld<T>(x_in, i);
    for (int64_t l = 0; l < L; ++l) {
        const int64_t* P = layer_ptrs[l];
        a.window = windows[l];
        if (a.window != items_window) {
            attn_items(a, items, first);
            part.resize(std::max<size_t>(1, items.size() * HKV * (HQ / HKV) * (2 + D)));
            items_window = a.window;
        }
        a.k_cache = (const void*)P[P_KCACHE];
        a.v_cache = (const void*)P[P_VCACHE];
        T* kc = (T*)P[P_KCACHE];
        T* vc = (T*)P[P_VCACHE];
        #pragma omp parallel num_threads(nthreads)
        {
            rmsnorm_rows<T>(resid.data(), (const T*)P[P_LN1], h.data(), M, H, eps);
            linear_rows<T>(h.data(), (const T*)P[P_WQKV], (const T*)P[P_BQKV], qkv.data(), M,
                           QKV, H, QKV, OUT_F32);
            // q/k norm (Qwen3), RoPE, and the new K/V into the cache.
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < M; ++t) {
                float* row = qkv.data() + t * QKV;
                const float* c = cos_t + positions[t] * D;
                const float* s = sin_t + positions[t] * D;
                for (int64_t hh = 0; hh < HQ + HKV; ++hh) {
                    float* v = row + hh * D;
                    if (P[P_QNORM]) head_norm<T>(v, (const T*)(hh < HQ ? P[P_QNORM] : P[P_KNORM]), D, eps);
                    rope(v, c, s, D);
                }
                const int64_t slot = slots[t];
                for (int64_t i = 0; i < HKV * D; ++i) {
                    kc[slot * HKV * D + i] = st<T>(row[HQ * D + i]);
                    vc[slot * HKV * D + i] = st<T>(row[(HQ + HKV) * D + i]);
                }
            }
            // The K/V just stored are read back through the cache (as T), like every key.
            attention_body<T>(a, items, first, part.data());
            linear_rows<T>(h.data(), (const T*)P[P_WO], nullptr, resid.data(), M, H, HQ * D, H,
                           OUT_ADD_F32);
            rmsnorm_rows<T>(resid.data(), (const T*)P[P_LN2], h.data(), M, H, eps);
            linear_rows<T>(h.data(), (const T*)P[P_WGU], nullptr, gu.data(), M, 2 * I, H, 2 * I,
                           OUT_F32);
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < M; ++t)
                for (int64_t i = 0; i < I; ++i) {
                    const float g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
                    act[t * I + i] = st<T>(g / (1.f + std::exp(-g)) * u);
                }
            linear_rows<T>(act.data(), (const T*)P[P_WDOWN], nullptr, resid.data(), M, H, I, H,
                           OUT_ADD_F32);
        }
    }
    #pragma omp parallel num_threads(nthreads)
    rmsnorm_rows<T>(resid.data(), final_norm, out, M, H, eps);
    return 0;
}

// ------------------------------------------------------------------------------ C ABI

extern "C" {

int kvs_has_avx512_bf16() {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

// dtype: 0 = float32, 1 = bfloat16
int kvs_linear(int dtype, const void* x, const void* w, const void* bias, void* y, int64_t M,
               int64_t N, int64_t K, int out_fp32, int nthreads) {
    const int mode = out_fp32 ? OUT_F32 : OUT_T;
    #pragma omp parallel num_threads(nthreads)
    {
        if (dtype == 0) linear_rows<float>((const float*)x, (const float*)w, (const float*)bias,
                                           y, M, N, K, N, mode);
        else linear_rows<bf16>((const bf16*)x, (const bf16*)w, (const bf16*)bias, y, M, N, K,
                               N, mode);
    }
    return 0;
}

int kvs_paged_attention(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                        const void* v_cache, const int32_t* block_tables, int64_t max_blocks,
                        const int32_t* cu_q, const int32_t* seq_lens, int64_t num_seqs,
                        int64_t num_tokens, int64_t hq, int64_t hkv, int64_t d,
                        int64_t block_size, float scale, int64_t window, void* out,
                        int nthreads) {
    AttnArgs a{(const float*)q, q_stride, k_cache, v_cache, block_tables, max_blocks, cu_q,
               seq_lens, num_seqs, num_tokens, hq, hkv, d, block_size, scale, window, out,
               hq * d};
    return dtype == 0 ? attention<float>(a, nthreads) : attention<bf16>(a, nthreads);
}

int kvs_forward(int dtype, const int64_t* dims, const int64_t* layer_ptrs, const int64_t* windows,
                const void* final_norm, const float* cos_t, const float* sin_t, float eps,
                const void* x_in, const int64_t* positions, const int64_t* slots,
                const int32_t* block_tables, const int32_t* cu_q, const int32_t* seq_lens,
                int64_t num_tokens, int64_t num_seqs, void* out, int nthreads) {
    std::vector<const int64_t*> lp(dims[D_LAYERS]);
    for (int64_t l = 0; l < dims[D_LAYERS]; ++l) lp[l] = layer_ptrs + l * P_COUNT;
    if (dtype == 0)
        return forward<float>(dims, lp.data(), windows, (const float*)final_norm, cos_t, sin_t,
                              eps, (const float*)x_in, positions, slots, block_tables, cu_q,
                              seq_lens, num_tokens, num_seqs, (float*)out, nthreads);
    return forward<bf16>(dims, lp.data(), windows, (const bf16*)final_norm, cos_t, sin_t, eps,
                         (const bf16*)x_in, positions, slots, block_tables, cu_q, seq_lens,
                         num_tokens, num_seqs, (bf16*)out, nthreads);
}

}  // extern "C"
