// kvserve's CPU kernels: paged attention that reads each K/V row once, small-M linear layers,
// and a whole decoder forward for small token counts (decode steps) in one call.
//
// Built by kernels/cpu.py with the system C++ compiler (-O3 -march=native) into a cache
// directory and called through ctypes with raw pointers; no torch headers, so the build
// takes seconds. Threads come from the small pool below, not OpenMP (it says why).
//
// Element type T is float (fp32 models) or bf16 (stored as uint16_t). Arithmetic is fp32;
// with AVX-512 BF16 the bf16 dot products use vdpbf16ps (bf16 x bf16 -> fp32 accumulate,
// as torch's bf16 GEMMs do).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#include <algorithm>
#include <atomic>
#include <climits>
#include <mutex>
#include <thread>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float h2f(uint16_t h) {  // IEEE half -> float
    const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023;
    uint32_t u;
    if (e == 31) u = sign | 0x7f800000u | (mant << 13);
    else if (e != 0) u = sign | ((e + 112) << 23) | (mant << 13);
    else if (mant == 0) u = sign;
    else {  // subnormal
        float f = std::ldexp((float)mant, -24);
        std::memcpy(&u, &f, 4);
        u |= sign;
    }
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
template <typename T> static inline float rounded(float v) {  // v stored as T, read back
    const T t = st<T>(v);
    return ld<T>(&t, 0);
}

// ------------------------------------------------------------------------------ KV formats
//
// The KV cache holds the model's type T, or quantized codes (kernels/kvquant.py says what a
// stored value is): int8 with a fp16 scale per token per KV head (a [blocks, block_size, Hkv]
// array beside the codes), or fp8 e4m3 / e5m2 with a float32 scale per KV head.
enum KvFormat { KV_PLAIN = 0, KV_INT8 = 1, KV_E4M3 = 2, KV_E5M2 = 3 };
struct E4M3 { uint8_t b; };
struct E5M2 { uint8_t b; };

static inline uint16_t f2h(float f) {  // float -> IEEE half, round to nearest even
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const float a = std::fabs(f);
    if (!(a == a)) return (uint16_t)(sign | 0x7e00u);
    if (a >= 65520.f) return (uint16_t)(sign | 0x7c00u);  // rounds to inf
    if (a < 6.103515625e-05f)  // subnormal: quantum 2^-24
        return (uint16_t)(sign | (uint32_t)std::nearbyint(std::ldexp(a, 24)));
    int e;
    std::frexp(a, &e);
    uint32_t q = (uint32_t)std::nearbyint(std::ldexp(a, 11 - e));  // [1024, 2048]
    if (q == 2048) { q = 1024; ++e; }
    return (uint16_t)(sign | ((uint32_t)(e - 1 + 15) << 10) | (q - 1024));
#endif
}

// float -> fp8 with M mantissa bits and exponent bias B, round to nearest even, saturating
// at the largest finite value maxv (as torch's .to(float8_*) after a clamp). On the bits:
// normals round float32's mantissa to M bits (the carry may bump the exponent, which is
// right) and rebias the exponent; subnormals count quanta of 2^(1 - B - M) (2^M quanta is
// the smallest normal, whose code is 2^M too).
static inline uint8_t fp8_encode(float x, int M, int B, float maxv) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    float a = std::fabs(x);
    a = a < maxv ? a : maxv;  // NaN (never stored by the engine) saturates too
    if (a < std::ldexp(1.f, 1 - B)) {
        const float v = a * std::ldexp(1.f, B - 1 + M);  // exact: a power of two
        return sign | (uint8_t)std::nearbyint(v);
    }
    std::memcpy(&u, &a, 4);
    const int shift = 23 - M;
    const uint32_t r = (u + (1u << (shift - 1)) - 1 + ((u >> shift) & 1)) >> shift;
    return sign | (uint8_t)(r - ((uint32_t)(127 - B) << M));
}

// Kv<K>: how attention reads cache element type K. value(p, i) (and kv_load16) give a code as
// a float divided by `unit`; the row's scale times unit multiplies it. An e4m3 byte shifted
// into a half's bits is its value times 2^-8 (exponent bias 15 against 7; subnormals line up
// too), so unit = 256; an e5m2 byte is a half's top byte.
template <typename K> struct Kv {  // the model's own type: no scale
    static constexpr bool quant = false;
    static inline float value(const K* p, int64_t i) { return ld<K>(p, i); }
};
template <> struct Kv<int8_t> {
    static constexpr bool quant = true;
    static constexpr float unit = 1.f;
    static inline float value(const int8_t* p, int64_t i) { return (float)p[i]; }
};
template <> struct Kv<E4M3> {
    static constexpr bool quant = true;
    static constexpr float unit = 256.f;
    static inline float value(const E4M3* p, int64_t i) {
        return h2f((uint16_t)(((p[i].b & 0x7f) << 7) | ((p[i].b & 0x80) << 8)));
    }
};
template <> struct Kv<E5M2> {
    static constexpr bool quant = true;
    static constexpr float unit = 1.f;
    static inline float value(const E5M2* p, int64_t i) { return h2f((uint16_t)(p[i].b << 8)); }
};

// The scale (times unit) of the cache row idx = slot * Hkv + h: 1 for the model's type.
template <typename K> static inline float kv_scale(const void* scales, int64_t idx, int64_t h) {
    if constexpr (!Kv<K>::quant) return 1.f;
    else if constexpr (std::is_same<K, int8_t>::value) {
#if defined(__F16C__)
        return _cvtsh_ss(((const uint16_t*)scales)[idx]);
#else
        return h2f(((const uint16_t*)scales)[idx]);
#endif
    }
    else return ((const float*)scales)[h] * Kv<K>::unit;
}
template <typename K> static inline float kv_ld(const K* p, int64_t i, float scale) {
    if constexpr (Kv<K>::quant) return Kv<K>::value(p, i) * scale;
    else return Kv<K>::value(p, i);
}

// One token's K or V row of one head (D values, x already rounded to the model's type) into
// the cache at element offset `at` (slot * Hkv + head) * D; int8 writes its scale at
// scales[slot * Hkv + head], fp8 divides by the head's scale.
static void store_kv_row(int fmt, void* cache, void* scales, int64_t head, int64_t at,
                         const float* x, int64_t D) {
    if (fmt == KV_INT8) {
        float amax = 0.f;
        for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
        const uint16_t s16 = f2h(amax / 127.f);
        const float sc = h2f(s16);
        int8_t* q = (int8_t*)cache + at;
        for (int64_t i = 0; i < D; ++i)
            q[i] = sc > 0.f ? (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / sc)))
                            : (int8_t)0;
        ((uint16_t*)scales)[at / D] = s16;
        return;
    }
    const float head_scale = ((const float*)scales)[head];
    uint8_t* q = (uint8_t*)cache + at;
    for (int64_t i = 0; i < D; ++i)
        q[i] = fmt == KV_E4M3 ? fp8_encode(x[i] / head_scale, 3, 7, 448.f)
                              : fp8_encode(x[i] / head_scale, 2, 15, 57344.f);
}

// ------------------------------------------------------------------------------ thread pool
//
// Work is split into chunks that threads claim with one compare-and-swap; the caller waits
// for the chunks to be done, not for the threads to arrive. A worker that the OS has
// descheduled (the HTTP thread or another process holds its core) therefore delays nothing:
// the caller and any other worker take its share. With OpenMP-style barriers every op would
// wait for that thread's next time slice (a step went from ~30 ms to ~1.4 s here with one
// core busy). Idle workers spin for a short while, then sleep on a futex.

typedef void (*ChunkFn)(void* ctx, int64_t chunk);

struct Pool {
    int nthreads = 1;                        // including the caller
    std::vector<std::thread> workers;
    std::atomic<uint64_t> state{0};          // generation << 32 | next chunk to claim
    std::atomic<int64_t> done{0};
    std::atomic<uint32_t> epoch{0};          // futex word: bumped when a job is published
    std::atomic<int> sleepers{0};
    std::atomic<bool> stop{false};
    // The job: written while the state is CLOSED, read by workers after they see it open.
    std::atomic<ChunkFn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> nchunks{0};
    static constexpr uint64_t CLOSED = 0xffffffffu;

    static long futex(std::atomic<uint32_t>* addr, int op, uint32_t val) {
        return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, nullptr,
                       nullptr, 0);
    }

    // Claims and runs chunks of the job whose state was `seen`; returns when none are left.
    void work(uint64_t seen) {
        const uint32_t gen = (uint32_t)(seen >> 32);
        ChunkFn f = fn.load(std::memory_order_relaxed);
        void* c = ctx.load(std::memory_order_relaxed);
        const int64_t n = nchunks.load(std::memory_order_relaxed);
        // A claim succeeds only while the state still has this generation, so fields read
        // above belong to it: publishing another job first closes the state (new generation).
        uint64_t v = state.load(std::memory_order_acquire);
        while ((uint32_t)(v >> 32) == gen && (int64_t)(v & 0xffffffffu) < n) {
            if (state.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
                f(c, (int64_t)(v & 0xffffffffu));
                done.fetch_add(1, std::memory_order_release);
                v = state.load(std::memory_order_acquire);
            }
        }
    }

    void worker_loop() {
        uint32_t last_gen = 0;
        while (!stop.load(std::memory_order_acquire)) {
            uint64_t v = state.load(std::memory_order_acquire);
            int spins = 0;
            auto idle = [&](uint64_t x) {
                return (uint32_t)(x >> 32) == last_gen || (x & 0xffffffffu) == CLOSED;
            };
            while (idle(v) && !stop.load(std::memory_order_relaxed)) {
                if (++spins < 20000) {
#if defined(__x86_64__)
                    _mm_pause();
#endif
                } else {
                    const uint32_t e = epoch.load(std::memory_order_acquire);
                    sleepers.fetch_add(1, std::memory_order_acq_rel);
                    v = state.load(std::memory_order_acquire);
                    if (idle(v) && !stop.load())
                        futex(&epoch, FUTEX_WAIT_PRIVATE, e);
                    sleepers.fetch_sub(1, std::memory_order_acq_rel);
                    spins = 0;
                }
                v = state.load(std::memory_order_acquire);
            }
            if (stop.load()) break;
            last_gen = (uint32_t)(v >> 32);
            // Job fields are read inside work() and validated by the claiming CAS.
            work(v);
        }
    }

    void start(int n) {
        shutdown();
        stop = false;
        nthreads = std::max(1, n);
        for (int i = 1; i < nthreads; ++i) workers.emplace_back([this] { worker_loop(); });
    }

    void shutdown() {
        stop = true;
        epoch.fetch_add(1);
        futex(&epoch, FUTEX_WAKE_PRIVATE, INT32_MAX);
        for (auto& t : workers) t.join();
        workers.clear();
    }

    // Runs fn(ctx, i) for i in [0, n) on the caller and the workers; returns when all are done.
    void run(ChunkFn f, void* c, int64_t n) {
        if (n <= 0) return;
        if (nthreads == 1 || n == 1) {
            for (int64_t i = 0; i < n; ++i) f(c, i);
            return;
        }
        uint64_t gen = state.load(std::memory_order_relaxed) >> 32;
        state.store(((gen + 1) << 32) | CLOSED, std::memory_order_release);
        fn.store(f, std::memory_order_relaxed);
        ctx.store(c, std::memory_order_relaxed);
        nchunks.store(n, std::memory_order_relaxed);
        done.store(0, std::memory_order_relaxed);
        gen += 2;
        state.store(gen << 32, std::memory_order_release);
        if (sleepers.load(std::memory_order_acquire) > 0) {
            epoch.fetch_add(1, std::memory_order_acq_rel);
            futex(&epoch, FUTEX_WAKE_PRIVATE, INT32_MAX);
        }
        work(gen << 32);
        while (done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__)
            _mm_pause();
#endif
        }
    }

    ~Pool() { shutdown(); }
};

static std::mutex pool_mutex;
static Pool* the_pool = nullptr;

// The process-wide pool with n threads (rebuilt when n changes). One caller at a time: the
// engine steps from one thread; kvs_* entry points hold pool_mutex while they run.
static Pool& pool(int n) {
    if (the_pool == nullptr) the_pool = new Pool();
    if (the_pool->nthreads != n || (n > 1 && the_pool->workers.empty())) the_pool->start(n);
    return *the_pool;
}

// Runs body(i) for i in [0, n) in parallel.
template <typename F>
static void parallel_for(Pool& p, int64_t n, F&& body) {
    struct Ctx { F* f; };
    Ctx c{&body};
    p.run([](void* ctx, int64_t i) { (*static_cast<Ctx*>(ctx)->f)(i); }, &c, n);
}

// ------------------------------------------------------------------------------ linear

// y[m, n] (=|+=) sum_k x[m, k] * w[n, k] (+ bias[n]) for rows n in [n0, n1).
// x is T [M, K] contiguous, w is T [N, K] (nn.Linear's layout), y is fp32 [M, ldy] or T.
#if defined(__AVX512F__)
// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error ~2e-7, fp32's rounding), times 2^n. Lanes below -87 give 0 (e^-87 ~ 1e-38).
static inline __m512 exp16(__m512 x) {
    const __m512 big = _mm512_set1_ps(88.f);
    x = _mm512_min_ps(x, big);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2 = hi + lo
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

template <typename T> static inline __m512 load16(const T* p, __mmask16 m);
template <> inline __m512 load16<float>(const float* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
template <> inline __m512 load16<bf16>(const bf16* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// 16 (or mask) cache elements as fp32 codes (Kv<K>::value for 16 lanes).
template <typename K> static inline __m512 kv_load16(const K* p, __mmask16 m) { return load16<K>(p, m); }
template <> inline __m512 kv_load16<int8_t>(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
template <> inline __m512 kv_load16<E4M3>(const E4M3* p, __mmask16 m) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                      _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(h);  // times 2^-8: Kv<E4M3>::unit puts it back through the scale
}
template <> inline __m512 kv_load16<E5M2>(const E5M2* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p)), 8));
}
// A cache row's 16 values: codes times the row's scale when quantized.
template <typename K> static inline __m512 kv_row16(const K* p, __mmask16 m, float scale) {
    if constexpr (Kv<K>::quant) return _mm512_mul_ps(kv_load16<K>(p, m), _mm512_set1_ps(scale));
    else return kv_load16<K>(p, m);
}

// Stores 16 (or mask) fp32 values as T.
template <typename T> static inline void store16(T* p, __m512 v, __mmask16 m);
template <> inline void store16<float>(float* p, __m512 v, __mmask16 m) {
    _mm512_mask_storeu_ps(p, m, v);
}
template <> inline void store16<bf16>(bf16* p, __m512 v, __mmask16 m) {
#if defined(__AVX512BF16__)
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
#else
    alignas(64) float f[16];
    _mm512_store_ps(f, v);
    for (int i = 0; i < 16; ++i)
        if (m >> i & 1) p[i] = f2bf(f[i]);
#endif
}
#endif

enum OutMode { OUT_F32 = 0, OUT_ADD_F32 = 1, OUT_T = 2 };

static const int MT = 8;      // x rows per micro-kernel call
static const int NRMAX = 3;   // weight rows per micro-kernel call: NR x MT fp32 accumulators
static const int PF_ROWS = 4; // software prefetch distance, in weight rows

// Micro<T, NR, MC>::run: out[r][m] = dot(w row r, x row m) for r < NR, m < MC, over K.
// With several x rows, NR = 3 weight rows share each x load (fewer loads per vdpbf16ps);
// with one x row a single weight stream reads fastest here (bench/step.py).
template <typename T, int NR, int MC> struct Micro {
    static inline void run(const T* x, int64_t K, const T* w, float out[NRMAX][MT]) {
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MC; ++m) {
                float s = 0.f;
                for (int64_t k = 0; k < K; ++k) s += ld<T>(x, m * K + k) * ld<T>(w, r * K + k);
                out[r][m] = s;
            }
    }
};

#if defined(__AVX512F__)
template <int NR, int MC> struct Micro<float, NR, MC> {
    static inline void run(const float* x, int64_t K, const float* w, float out[NRMAX][MT]) {
        __m512 acc[NR][MC];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv[NR];
            for (int r = 0; r < NR; ++r) {
                if (NR > 1) _mm_prefetch((const char*)(w + (r + PF_ROWS * NR) * K + k), _MM_HINT_T0);
                wv[r] = _mm512_loadu_ps(w + r * K + k);
            }
            for (int m = 0; m < MC; ++m) {
                const __m512 xv = _mm512_loadu_ps(x + m * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
            }
        }
        if (k < K) {
            const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
            __m512 wv[NR];
            for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * K + k);
            for (int m = 0; m < MC; ++m) {
                const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MC; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
    }
};
#endif

#if defined(__AVX512BF16__)
template <int NR, int MC> struct Micro<bf16, NR, MC> {
    static inline void run(const bf16* x, int64_t K, const bf16* w, float out[NRMAX][MT]) {
        __m512 acc[NR][MC];
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512bh wv[NR];
            for (int r = 0; r < NR; ++r) {
                if (NR > 1) _mm_prefetch((const char*)(w + (r + PF_ROWS * NR) * K + k), _MM_HINT_T0);
                wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
            }
            for (int m = 0; m < MC; ++m) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
            }
        }
        if (k < K) {
            const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
            __m512bh wv[NR];
            for (int r = 0; r < NR; ++r)
                wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
            for (int m = 0; m < MC; ++m) {
                const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
                for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < MC; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
    }
};
#endif

template <typename T, int NR, int MC>
static inline void micro_run(const T* x, int64_t K, const T* w, float out[NRMAX][MT]) {
    Micro<T, NR, MC>::run(x, K, w, out);
}

template <typename T, int NR>
static inline void micro_dispatch(const T* x, int64_t K, const T* w, int mc,
                                  float out[NRMAX][MT]) {
    switch (mc) {
        case 1: micro_run<T, NR, 1>(x, K, w, out); break;
        case 2: micro_run<T, NR, 2>(x, K, w, out); break;
        case 3: micro_run<T, NR, 3>(x, K, w, out); break;
        case 4: micro_run<T, NR, 4>(x, K, w, out); break;
        case 5: micro_run<T, NR, 5>(x, K, w, out); break;
        case 6: micro_run<T, NR, 6>(x, K, w, out); break;
        case 7: micro_run<T, NR, 7>(x, K, w, out); break;
        default: micro_run<T, NR, 8>(x, K, w, out); break;
    }
}

template <typename T, int NR>
static inline void gemm_tile(const T* x, const T* w, int64_t M, int64_t K, int64_t n, int64_t n0,
                             float* out, int64_t ldo) {
    float acc[NRMAX][MT];
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mc = (int)std::min<int64_t>(MT, M - m0);
        micro_dispatch<T, NR>(x + m0 * K, K, w + n * K, mc, acc);
        for (int r = 0; r < NR; ++r)
            for (int m = 0; m < mc; ++m) out[(m0 + m) * ldo + (n - n0) + r] = acc[r][m];
    }
}

// ------------------------------------------------------------------------------ W8A8
//
// int8 weights x int8 activations, each with one fp32 scale per group of 32 along K (llama.cpp's
// Q8_0 x Q8_0, with fp32 scales), multiplied with AVX-512 VNNI's vpdpbusd (u8 x s8 -> s32, 64
// products per instruction: twice vdpbf16ps's work per instruction, from half its bytes).
//
// Weight layout ("q8 tiles", written by kernels/cpu.py's pack_q8): rows in tiles of 16; a tile
// stores, per group g of 32 and step s < 8, one 64-byte vector whose 32-bit lane l holds codes
// k = g * 32 + s * 4 .. + 3 of row 16 * tile + l, as code + 128 (vpdpbusd's unsigned side):
// [N / 16, K / 32, 8, 16, 4] u8; scales [N / 16, K / 32, 16] fp32. Each lane accumulates one
// output row, so results need no horizontal sums. Activations are quantized per row at each
// layer: s8 codes [M, K], a scale per group, and -128 * sum(codes) of the group, which starts
// the group's accumulator and cancels the +128.

static const int QT = 16;  // weight rows per tile (lanes)

struct XQ {  // M rows of activations quantized for one GEMM
    std::vector<int8_t> q;
    std::vector<float> s;        // scale per group
    std::vector<int32_t> corr;   // -128 * sum of the group's codes (int8 weights)
    std::vector<float> sum;      // scale * sum of the group's codes (int4 weights' minimum)
    int64_t K = 0;
};

// Rows [m0, m1) of x into xq (sized by the caller).
template <typename T>
static void quantize_rows_q8(const T* x, int64_t m0, int64_t m1, int64_t K, XQ& xq) {
    const int64_t G = K / 32;
    for (int64_t m = m0; m < m1; ++m)
        for (int64_t g = 0; g < G; ++g) {
            const int64_t at = m * K + g * 32;
#if defined(__AVX512F__)
            __m512 v0, v1;
            if constexpr (std::is_same<T, float>::value) {
                v0 = _mm512_loadu_ps(x + at);
                v1 = _mm512_loadu_ps(x + at + 16);
            } else {
                v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + at))), 16));
                v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + at + 16))), 16));
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0),
                                                                  _mm512_abs_ps(v1)));
            const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round half even
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm_storeu_si128((__m128i*)(xq.q.data() + at), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i*)(xq.q.data() + at + 16), _mm512_cvtepi32_epi8(q1));
            const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
            float amax = 0.f;
            for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(ld<T>(x, at + i)));
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int i = 0; i < 32; ++i) {
                const int32_t q = (int32_t)std::nearbyint(ld<T>(x, at + i) * inv);
                xq.q[at + i] = (int8_t)q;
                sum += q;
            }
#endif
            xq.s[m * G + g] = amax / 127.f;
            xq.corr[m * G + g] = -128 * sum;
            xq.sum[m * G + g] = amax / 127.f * (float)sum;
        }
}

// out[m][t * 16 + l] = dot(w row 16 t + l, x row m) for t < NT tiles, m < MC rows.
#if defined(__AVX512F__)
// An NT x MC tile of 16-lane fp32 accumulators (tiles of 16 weight rows x x rows): zeroed, and
// stored as out[m][t * 16 .. + 16].
template <int NT, int MC> static inline void tile_zero(__m512 acc[NT][MC]) {
    for (int t = 0; t < NT; ++t)
        for (int m = 0; m < MC; ++m) acc[t][m] = _mm512_setzero_ps();
}
template <int NT, int MC>
static inline void tile_store(__m512 acc[NT][MC], float* out, int64_t ldo) {
    for (int t = 0; t < NT; ++t)
        for (int m = 0; m < MC; ++m) _mm512_storeu_ps(out + m * ldo + t * QT, acc[t][m]);
}
#endif

// x rows [m0, m0 + MC); w, ws: the first tile's codes and scales.
template <int NT, int MC> struct MicroQ8 {
    static inline void run(const XQ& x, int64_t m0, const uint8_t* w, const void* wsv,
                           float* out, int64_t ldo) {
        const int64_t K = x.K, G = K / 32, tile = K * QT;  // bytes per tile of codes
        const int8_t* xq = x.q.data() + m0 * K;
        const float* xs = x.s.data() + m0 * G;
        const int32_t* xc = x.corr.data() + m0 * G;
        const float* ws = (const float*)wsv;
#if defined(__AVX512VNNI__)
        __m512 facc[NT][MC];
        tile_zero<NT, MC>(facc);
        for (int64_t g = 0; g < G; ++g) {
            __m512i acc[NT][MC];
            for (int m = 0; m < MC; ++m) {
                const __m512i c = _mm512_set1_epi32(xc[m * G + g]);
                for (int t = 0; t < NT; ++t) acc[t][m] = c;
            }
            const uint8_t* wg = w + g * 32 * QT;
            #pragma GCC unroll 8
            for (int s = 0; s < 8; ++s) {
                __m512i wv[NT];
                for (int t = 0; t < NT; ++t) {
                    _mm_prefetch((const char*)(wg + t * tile + s * 64 + 8 * 32 * QT), _MM_HINT_T0);
                    wv[t] = _mm512_loadu_si512(wg + t * tile + s * 64);
                }
                for (int m = 0; m < MC; ++m) {
                    int32_t x4;
                    std::memcpy(&x4, xq + m * K + g * 32 + s * 4, 4);
                    const __m512i xb = _mm512_set1_epi32(x4);
                    for (int t = 0; t < NT; ++t) acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], wv[t], xb);
                }
            }
            __m512 wsv[NT];
            for (int t = 0; t < NT; ++t) wsv[t] = _mm512_loadu_ps(ws + t * G * QT + g * QT);
            for (int m = 0; m < MC; ++m) {
                const __m512 xsb = _mm512_set1_ps(xs[m * G + g]);
                for (int t = 0; t < NT; ++t)
                    facc[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][m]),
                                                 _mm512_mul_ps(wsv[t], xsb), facc[t][m]);
            }
        }
        tile_store<NT, MC>(facc, out, ldo);
#else
        for (int t = 0; t < NT; ++t)
            for (int m = 0; m < MC; ++m)
                for (int l = 0; l < QT; ++l) {
                    float tot = 0.f;
                    for (int64_t g = 0; g < G; ++g) {
                        int32_t acc = xc[m * G + g];
                        for (int s = 0; s < 8; ++s)
                            for (int j = 0; j < 4; ++j)
                                acc += (int32_t)w[t * tile + (g * 8 + s) * 64 + l * 4 + j]
                                     * (int32_t)xq[m * K + g * 32 + s * 4 + j];
                        tot += (float)acc * (ws[t * G * QT + g * QT + l] * xs[m * G + g]);
                    }
                    out[m * ldo + t * QT + l] = tot;
                }
#endif
    }
};

static const int MQ = 4;  // x rows per packed-weight micro-kernel call

// NT tiles of packed weights (codes w, scales ws of the first) against every x row; out
// points at the first tile's column.
template <template <int, int> class Mk, int NT>
static inline void gemm_tile_packed(const XQ& x, const uint8_t* w, const void* ws, int64_t M,
                                    float* out, int64_t ldo) {
    for (int64_t m0 = 0; m0 < M; m0 += MQ) {
        float* o = out + m0 * ldo;
        switch ((int)std::min<int64_t>(MQ, M - m0)) {
            case 1: Mk<NT, 1>::run(x, m0, w, ws, o, ldo); break;
            case 2: Mk<NT, 2>::run(x, m0, w, ws, o, ldo); break;
            case 3: Mk<NT, 3>::run(x, m0, w, ws, o, ldo); break;
            default: Mk<NT, 4>::run(x, m0, w, ws, o, ldo); break;
        }
    }
}

// ------------------------------------------------------------------------------ W4A8
//
// 4-bit weights with a scale d and a minimum m per group of 32 (w = d * q + m, q in 0..15:
// llama.cpp's Q4_1; Q4_0 and Q4_K blocks are the same grid per 32) x int8 activations. Layout
// ("q4 tiles", kernels/cpu.py's pack_q4): per tile of 16 rows and group, 4 vectors of 64 bytes;
// byte j of lane l in vector s holds codes k = g * 32 + s * 4 + j (low nibble) and k + 16 (high
// nibble) of row 16 t + l: [N / 16, K / 32, 4, 16, 4] u8. d and m are fp16 (as in the file):
// [N / 16, K / 32, 2, 16]. Codes are unsigned, so vpdpbusd takes them as they are; the minimum
// adds m * sum(x) of the group. Half the bytes of int8 again, for steps bound by weight reads.

template <int NT, int MC> struct MicroQ4 {
    static inline void run(const XQ& x, int64_t m0, const uint8_t* w, const void* wpv,
                           float* out, int64_t ldo) {
        const int64_t K = x.K, G = K / 32, tile = K * QT / 2;  // bytes per tile of codes
        const int8_t* xq = x.q.data() + m0 * K;
        const float* xs = x.s.data() + m0 * G;
        const float* xsum = x.sum.data() + m0 * G;
        const uint16_t* wp = (const uint16_t*)wpv;
#if defined(__AVX512VNNI__)
        const __m512i low = _mm512_set1_epi8(0x0f);
        __m512 facc[NT][MC];
        tile_zero<NT, MC>(facc);
        for (int64_t g = 0; g < G; ++g) {
            __m512i acc[NT][MC];
            for (int t = 0; t < NT; ++t)
                for (int m = 0; m < MC; ++m) acc[t][m] = _mm512_setzero_si512();
            const uint8_t* wg = w + g * 16 * QT;
            #pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                __m512i lo[NT], hi[NT];
                for (int t = 0; t < NT; ++t) {
                    _mm_prefetch((const char*)(wg + t * tile + s * 64 + 8 * 16 * QT), _MM_HINT_T0);
                    const __m512i v = _mm512_loadu_si512(wg + t * tile + s * 64);
                    lo[t] = _mm512_and_si512(v, low);
                    hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                for (int m = 0; m < MC; ++m) {
                    int32_t a4, b4;
                    std::memcpy(&a4, xq + m * K + g * 32 + s * 4, 4);
                    std::memcpy(&b4, xq + m * K + g * 32 + 16 + s * 4, 4);
                    const __m512i xa = _mm512_set1_epi32(a4), xb = _mm512_set1_epi32(b4);
                    for (int t = 0; t < NT; ++t) {
                        acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], lo[t], xa);
                        acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], hi[t], xb);
                    }
                }
            }
            __m512 dv[NT], mv[NT];
            for (int t = 0; t < NT; ++t) {
                const uint16_t* pp = wp + (t * G + g) * 2 * QT;
                dv[t] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)pp));
                mv[t] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(pp + QT)));
            }
            for (int m = 0; m < MC; ++m) {
                const __m512 xsb = _mm512_set1_ps(xs[m * G + g]);
                const __m512 xmb = _mm512_set1_ps(xsum[m * G + g]);
                for (int t = 0; t < NT; ++t)
                    facc[t][m] = _mm512_fmadd_ps(mv[t], xmb, _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(acc[t][m]), _mm512_mul_ps(dv[t], xsb), facc[t][m]));
            }
        }
        tile_store<NT, MC>(facc, out, ldo);
#else
        for (int t = 0; t < NT; ++t)
            for (int m = 0; m < MC; ++m)
                for (int l = 0; l < QT; ++l) {
                    float tot = 0.f;
                    for (int64_t g = 0; g < G; ++g) {
                        int32_t acc = 0;
                        for (int s = 0; s < 4; ++s)
                            for (int j = 0; j < 4; ++j) {
                                const int b = w[t * tile + (g * 4 + s) * 64 + l * 4 + j];
                                acc += (b & 15) * (int32_t)xq[m * K + g * 32 + s * 4 + j]
                                     + (b >> 4) * (int32_t)xq[m * K + g * 32 + 16 + s * 4 + j];
                            }
                        const uint16_t* pp = wp + (t * G + g) * 2 * QT;
                        tot += (float)acc * (h2f(pp[l]) * xs[m * G + g])
                             + h2f(pp[QT + l]) * xsum[m * G + g];
                    }
                    out[m * ldo + t * QT + l] = tot;
                }
#endif
    }
};

// ------------------------------------------------------------------------------ packed fp32
//
// float32 weights in tiles of 16 rows, K-major inside a tile ([N / 16, K, 16], kernels/cpu.py's
// pack_f32): each x element is broadcast against 16 rows' weights, so every FMA is useful and
// outputs need no horizontal sums (the [N, K] kernel above spends a fifth of its work there).
template <int NT, int MC> struct MicroF32T {
    static inline void run(const float* x, int64_t K, const float* w, float* out, int64_t ldo) {
        const int64_t tile = K * QT;
#if defined(__AVX512F__)
        __m512 acc[NT][MC];
        tile_zero<NT, MC>(acc);
        #pragma GCC unroll 4
        for (int64_t k = 0; k < K; ++k) {
            __m512 wv[NT];
            for (int t = 0; t < NT; ++t) {
                _mm_prefetch((const char*)(w + t * tile + (k + 16) * QT), _MM_HINT_T0);
                wv[t] = _mm512_loadu_ps(w + t * tile + k * QT);
            }
            for (int m = 0; m < MC; ++m) {
                const __m512 xb = _mm512_set1_ps(x[m * K + k]);
                for (int t = 0; t < NT; ++t) acc[t][m] = _mm512_fmadd_ps(xb, wv[t], acc[t][m]);
            }
        }
        tile_store<NT, MC>(acc, out, ldo);
#else
        for (int t = 0; t < NT; ++t)
            for (int m = 0; m < MC; ++m)
                for (int l = 0; l < QT; ++l) {
                    float s = 0.f;
                    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[t * tile + k * QT + l];
                    out[m * ldo + t * QT + l] = s;
                }
#endif
    }
};

static const int MF = 6;  // x rows per packed-fp32 micro-kernel call

template <int NT>
static inline void gemm_tile_f32t(const float* x, const float* w, int64_t M, int64_t K,
                                  float* out, int64_t ldo) {
    for (int64_t m0 = 0; m0 < M; m0 += MF) {
        const float* xm = x + m0 * K;
        float* o = out + m0 * ldo;
        switch ((int)std::min<int64_t>(MF, M - m0)) {
            case 1: MicroF32T<NT, 1>::run(xm, K, w, o, ldo); break;
            case 2: MicroF32T<NT, 2>::run(xm, K, w, o, ldo); break;
            case 3: MicroF32T<NT, 3>::run(xm, K, w, o, ldo); break;
            case 4: MicroF32T<NT, 4>::run(xm, K, w, o, ldo); break;
            case 5: MicroF32T<NT, 5>::run(xm, K, w, o, ldo); break;
            default: MicroF32T<NT, 6>::run(xm, K, w, o, ldo); break;
        }
    }
}

// A weight matrix [N, K]: elements of the model's type (bits 0), or u8 codes in the q8 tile
// layout with fp32 scales [N / 16, K / 32, 16] (bits 8), or in the q4 tile layout with fp16
// scales and minimums [N / 16, K / 32, 2, 16] (bits 4), or fp32 in tiles [N / 16, K, 16]
// (bits 32, float32 models).
enum WFormat { W_PLAIN = 0, W_Q4 = 4, W_Q8 = 8, W_F32T = 32 };
struct WRef {
    const void* w;
    const void* scale;
    int64_t bits;
};

// out[m * ldo + (n - n0)] = dot(x row m, w row n) for n in [n0, n1), every m < M; xq holds x
// quantized where w is int8.
template <typename T>
static void gemm_block(const T* x, const XQ* xq, WRef w, int64_t M, int64_t K, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
    int64_t n = n0;
    if (w.bits == W_F32T) {  // n0, n1 multiples of 16
        if constexpr (std::is_same<T, float>::value) {
            const float* wt = (const float*)w.w;
            for (; n + 2 * QT <= n1; n += 2 * QT)
                gemm_tile_f32t<2>(x, wt + n * K, M, K, out + (n - n0), ldo);
            for (; n < n1; n += QT) gemm_tile_f32t<1>(x, wt + n * K, M, K, out + (n - n0), ldo);
        }
        return;
    }
    if (w.bits != W_PLAIN) {  // n0, n1 multiples of 16
        const XQ& x8 = *xq;
        const int64_t G = K / 32;
        const uint8_t* codes = (const uint8_t*)w.w;
        for (; n < n1;) {
            const int nt = n + 2 * QT <= n1 ? 2 : 1;
            float* o = out + (n - n0);
            if (w.bits == W_Q8) {
                const uint8_t* c = codes + n * K;
                const float* sc = (const float*)w.scale + n * G;
                if (nt == 2) gemm_tile_packed<MicroQ8, 2>(x8, c, sc, M, o, ldo);
                else gemm_tile_packed<MicroQ8, 1>(x8, c, sc, M, o, ldo);
            } else {
                const uint8_t* c = codes + n * K / 2;
                const uint16_t* sc = (const uint16_t*)w.scale + n * G * 2;
                if (nt == 2) gemm_tile_packed<MicroQ4, 2>(x8, c, sc, M, o, ldo);
                else gemm_tile_packed<MicroQ4, 1>(x8, c, sc, M, o, ldo);
            }
            n += nt * QT;
        }
        return;
    }
    const T* wt = (const T*)w.w;
    if (M >= 4)
        for (; n + 3 <= n1; n += 3) gemm_tile<T, 3>(x, wt, M, K, n, n0, out, ldo);
    for (; n < n1; ++n) gemm_tile<T, 1>(x, wt, M, K, n, n0, out, ldo);
}

static const int64_t ROWS = 24;     // weight rows per chunk of work
static const int64_t ROWS_Q8 = 32;  // ... for weights in tiles of 16 rows (two tiles)

// x quantized for an int8 weight (once per GEMM; rows split across the pool when there are
// many); nullptr otherwise.
template <typename T>
static const XQ* prepare_x(Pool& p, const T* x, WRef w, int64_t M, int64_t K) {
    if (w.bits != W_Q8 && w.bits != W_Q4) return nullptr;
    static thread_local XQ buf;
    XQ& xq = buf;  // the caller's: a lambda naming the thread_local would get each worker's own
    xq.K = K;
    xq.q.resize(M * K);
    xq.s.resize(M * K / 32);
    xq.corr.resize(M * K / 32);
    xq.sum.resize(M * K / 32);
    const int64_t rows = std::max<int64_t>(1, 4096 / K);  // rows per chunk
    if (M <= rows) quantize_rows_q8<T>(x, 0, M, K, xq);
    else parallel_for(p, (M + rows - 1) / rows, [&](int64_t c) {
        quantize_rows_q8<T>(x, c * rows, std::min(M, (c + 1) * rows), K, xq);
    });
    return &xq;
}

// y[m, n] (=|+=) x[m] . w[n] (+ bias[n]): x T [M, K], w [N, K] (nn.Linear's layout),
// y fp32 or T with row stride ldy.
template <typename T>
static void linear(Pool& p, const T* x, WRef w, const T* bias, void* y, int64_t M,
                   int64_t N, int64_t K, int64_t ldy, int mode) {
    const XQ* xq = prepare_x<T>(p, x, w, M, K);
    const int64_t R = w.bits != W_PLAIN ? ROWS_Q8 : ROWS;
    parallel_for(p, (N + R - 1) / R, [&](int64_t c) {
        const int64_t n0 = c * R, n1 = std::min(N, n0 + R);
        std::vector<float> tmp;
        float local[MT * ROWS_Q8];
        float* out = local;
        if (M > MT) { tmp.resize(M * R); out = tmp.data(); }
        gemm_block<T>(x, xq, w, M, K, n0, n1, out, R);
        for (int64_t m = 0; m < M; ++m) {
            const float* o = out + m * R;
#if defined(__AVX512F__)
            for (int64_t n = n0; n < n1; n += 16) {
                const __mmask16 mk = (__mmask16)(n1 - n >= 16 ? 0xffff : (1u << (n1 - n)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(mk, o + (n - n0));
                if (bias) v = _mm512_add_ps(v, load16<T>(bias + n, mk));
                const int64_t at = m * ldy + n;
                if (mode == OUT_F32) _mm512_mask_storeu_ps((float*)y + at, mk, v);
                else if (mode == OUT_ADD_F32)
                    _mm512_mask_storeu_ps((float*)y + at, mk,
                                          _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, (float*)y + at)));
                else store16<T>((T*)y + at, v, mk);
            }
#else
            for (int64_t n = n0; n < n1; ++n) {
                const float v = o[n - n0] + (bias ? ld<T>(bias, n) : 0.f);
                const int64_t at = m * ldy + n;
                if (mode == OUT_F32) ((float*)y)[at] = v;
                else if (mode == OUT_ADD_F32) ((float*)y)[at] += v;
                else ((T*)y)[at] = st<T>(v);
            }
#endif
        }
    });
}

// act[m, n] = silu(x[m] . w[n]) * (x[m] . w[I + n]) for the fused gate/up projection.
template <typename T>
static void gate_up_silu(Pool& p, const T* x, WRef w, T* act, int64_t M, int64_t I,
                         int64_t K) {
    const XQ* xq = prepare_x<T>(p, x, w, M, K);
    const int64_t R = w.bits != W_PLAIN ? ROWS_Q8 : ROWS;
    parallel_for(p, (I + R - 1) / R, [&](int64_t c) {
        const int64_t n0 = c * R, n1 = std::min(I, n0 + R);
        std::vector<float> g(M * R), u(M * R);
        gemm_block<T>(x, xq, w, M, K, n0, n1, g.data(), R);
        gemm_block<T>(x, xq, w, M, K, I + n0, I + n1, u.data(), R);
        for (int64_t m = 0; m < M; ++m) {
#if defined(__AVX512F__)
            for (int64_t n = n0; n < n1; n += 16) {
                const __mmask16 mk = (__mmask16)(n1 - n >= 16 ? 0xffff : (1u << (n1 - n)) - 1);
                const __m512 a = _mm512_maskz_loadu_ps(mk, g.data() + m * R + n - n0);
                const __m512 b = _mm512_maskz_loadu_ps(mk, u.data() + m * R + n - n0);
                const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(
                    _mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
                store16<T>(act + m * I + n, _mm512_mul_ps(_mm512_mul_ps(a, sig), b), mk);
            }
#else
            for (int64_t n = n0; n < n1; ++n) {
                const float a = g[m * R + n - n0], b = u[m * R + n - n0];
                act[m * I + n] = st<T>(a / (1.f + std::exp(-a)) * b);
            }
#endif
        }
    });
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
    int kvfmt = KV_PLAIN;     // KvFormat of the caches
    const void* k_scale = nullptr;  // int8: fp16 [NB, B, Hkv]; fp8: float32 [Hkv]
    const void* v_scale = nullptr;
};

static const int64_t CHUNK = 256;  // keys per work item: long sequences split across threads
static const int MAXG = 16;        // query heads per KV head handled together

// Position of query token t of a sequence of L tokens whose queries are [q0, q1).
static inline int64_t query_pos(int32_t L, int32_t q0, int32_t q1, int64_t t) {
    return L - (q1 - q0) + (t - q0);
}

// Work item = (tokens of one sequence, kv head, key chunk). For each of its rows (a token's G
// query heads) it computes the running max, the sum of exp and the weighted V sum over the
// row's keys in the chunk; a second pass merges chunks. A decode step's token is one item per
// chunk; the few tokens of a speculative verification share an item, so each K/V row is
// loaded and converted once for all of them, while every row's arithmetic stays exactly a
// decode's (same key blocks, same operation order): verifying a draft gives the numbers that
// decoding it would.
// Tokens [tok0, tok0 + ntok) of sequence seq against keys [lo, hi) (hi: the last token's end);
// its partial rows start at float offset part (head-major, then token). Tiles below use it too.
struct Item { int32_t seq, tok0, ntok, lo, hi; int64_t part; };
static const int MAXR = 48;  // rows (tokens x G) per item

static const int KB = 16;  // keys scored together (one vector of exps)

#if defined(__AVX512F__)
// acc[0, 16 NV) += sum over the block's keys of p[j] * v[j]: NV independent FMA chains.
template <int NV>
static inline void attn_pv(float* acc, const float* p, const float (*v)[256], int nk) {
    __m512 a[NV];
    for (int i = 0; i < NV; ++i) a[i] = _mm512_loadu_ps(acc + i * 16);
    for (int j = 0; j < nk; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(pj, _mm512_load_ps(v[j] + i * 16), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + i * 16, a[i]);
}
#endif

template <typename T, typename K>
static void attn_item(const AttnArgs& a, const Item& it, int64_t h, float* part) {
    // part: rows r = token * G + g of 2 + D floats: m, l, acc[D]
    const int64_t G = a.hq / a.hkv, D = a.d, R = it.ntok * G, ld = 2 + D;
    const K* kc = (const K*)a.k_cache;
    const K* vc = (const K*)a.v_cache;
    const int32_t* table = a.block_tables + (int64_t)it.seq * a.max_blocks;
    const int32_t q0 = a.cu_q[it.seq], q1 = a.cu_q[it.seq + 1], L = a.seq_lens[it.seq];
    alignas(64) float qv[MAXR][256];
    int64_t hi[MAXR];  // each row's end of keys: its token's position + 1, within the chunk
    for (int64_t r = 0; r < R; ++r) {
        const int64_t t = it.tok0 + r / G;
        const float* qp = a.q + t * a.q_stride + (h * G + r % G) * D;
        for (int64_t i = 0; i < D; ++i) qv[r][i] = qp[i] * a.scale;
        hi[r] = std::min<int64_t>(it.hi, query_pos(L, q0, q1, t) + 1);
    }
    float m[MAXR], l[MAXR];
    for (int64_t r = 0; r < R; ++r) {
        m[r] = -INFINITY; l[r] = 0.f;
        std::memset(part + r * ld + 2, 0, sizeof(float) * D);
    }
#if defined(__AVX512F__)
    // Blocks of KB keys: scores, one max and rescale per block, a vector of exps, then V.
    const int64_t nv = (D + 15) / 16;
    const __mmask16 tail = (__mmask16)(D % 16 ? (1u << (D % 16)) - 1 : 0xffff);
    alignas(64) float sc[MAXR][KB];
    int64_t rows[KB];  // element offsets of the block's K/V rows
    float vscale[KB];  // their V scales
    for (int64_t j0 = it.lo; j0 < it.hi; j0 += KB) {
        const int nk = (int)std::min<int64_t>(KB, it.hi - j0);
        int nkr[MAXR];  // keys of this block each row sees (<= 0: none, the block is past it)
        for (int64_t r = 0; r < R; ++r) nkr[r] = (int)std::min<int64_t>(KB, hi[r] - j0);
        for (int jj = 0; jj < nk; ++jj) {
            const int64_t j = j0 + jj;
            const int64_t slot = (int64_t)table[j / a.block_size] * a.block_size + j % a.block_size;
            rows[jj] = (slot * a.hkv + h) * D;
            vscale[jj] = kv_scale<K>(a.v_scale, slot * a.hkv + h, h);
            const float ks = kv_scale<K>(a.k_scale, slot * a.hkv + h, h);
            const K* kr = kc + rows[jj];
            __m512 kv[16];
            for (int64_t v = 0; v < nv; ++v)
                kv[v] = kv_row16<K>(kr + v * 16, v + 1 < nv ? 0xffff : tail, ks);
            for (int64_t r = 0; r < R; ++r) {
                if (jj >= nkr[r]) continue;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t v = 0; v < nv; ++v)
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(v + 1 < nv ? 0xffff : tail,
                                                                qv[r] + v * 16), kv[v], acc);
                sc[r][jj] = _mm512_reduce_add_ps(acc);
            }
        }
        alignas(64) float pr[MAXR][KB];
        for (int64_t r = 0; r < R; ++r) {
            if (nkr[r] <= 0) continue;
            const __mmask16 live = (__mmask16)(nkr[r] == 16 ? 0xffff : (1u << nkr[r]) - 1);
            const __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, sc[r]);
            const float bm = std::max(m[r], _mm512_reduce_max_ps(s));
            if (bm > m[r]) {
                const float c = std::exp(m[r] - bm);  // 0 on the first block
                l[r] *= c;
                float* acc = part + r * ld + 2;
                for (int64_t i = 0; i < D; ++i) acc[i] *= c;
                m[r] = bm;
            }
            const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, _mm512_set1_ps(bm))));
            l[r] += _mm512_reduce_add_ps(e);
            _mm512_store_ps(pr[r], e);
        }
        // V: the block's rows as fp32 once, then each row's accumulator stays in a register
        // across the block's keys (a load and a store per block, not per key).
        alignas(64) float vs[KB][256];
        for (int jj = 0; jj < nk; ++jj)
            for (int64_t v = 0; v < nv; ++v)
                _mm512_store_ps(vs[jj] + v * 16, kv_row16<K>(vc + rows[jj] + v * 16,
                                                             v + 1 < nv ? 0xffff : tail, vscale[jj]));
        for (int64_t r = 0; r < R; ++r) {
            const int nr = nkr[r];
            if (nr <= 0) continue;
            float* acc = part + r * ld + 2;
            if (nv == 4 && tail == 0xffff) attn_pv<4>(acc, pr[r], vs, nr);  // head_dim 64
            else if (nv == 8 && tail == 0xffff) attn_pv<8>(acc, pr[r], vs, nr);  // 128
            else
                for (int64_t v = 0; v < nv; ++v) {
                    const __mmask16 mk = v + 1 < nv ? 0xffff : tail;
                    __m512 x = _mm512_maskz_loadu_ps(mk, acc + v * 16);
                    for (int jj = 0; jj < nr; ++jj)
                        x = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][jj]),
                                            _mm512_load_ps(vs[jj] + v * 16), x);
                    _mm512_mask_storeu_ps(acc + v * 16, mk, x);
                }
        }
    }
#else
    float kf[256];
    for (int64_t j = it.lo; j < it.hi; ++j) {
        const int64_t slot = (int64_t)table[j / a.block_size] * a.block_size + j % a.block_size;
        const K* kr = kc + (slot * a.hkv + h) * D;
        const K* vr = vc + (slot * a.hkv + h) * D;
        const float ks = kv_scale<K>(a.k_scale, slot * a.hkv + h, h);
        const float vsc = kv_scale<K>(a.v_scale, slot * a.hkv + h, h);
        for (int64_t i = 0; i < D; ++i) kf[i] = kv_ld<K>(kr, i, ks);
        for (int64_t r = 0; r < R; ++r) {
            if (j >= hi[r]) continue;
            float s = 0.f;
            const float* qg = qv[r];
            for (int64_t i = 0; i < D; ++i) s += qg[i] * kf[i];
            float* acc = part + r * ld + 2;
            if (s > m[r]) {
                const float c = std::exp(m[r] - s);
                l[r] *= c;
                for (int64_t i = 0; i < D; ++i) acc[i] *= c;
                m[r] = s;
            }
            const float p = std::exp(s - m[r]);
            l[r] += p;
            for (int64_t i = 0; i < D; ++i) acc[i] += p * kv_ld<K>(vr, i, vsc);
        }
    }
#endif
    for (int64_t r = 0; r < R; ++r) { part[r * ld] = m[r]; part[r * ld + 1] = l[r]; }
}

// A sequence with many query tokens (a prefill chunk) is scored in tiles: up to TROWS rows
// (query tokens x the G heads sharing a KV head) against blocks of KB keys. The tile's
// queries are transposed once so that a key's scores for 16 rows are one vector (no
// horizontal sums), each key block is converted once for all rows, and the softmax runs
// down the lanes. Sequences with few query rows (decode) keep the items above.
static const int TROWS = 48;          // rows per tile: three vectors
// Up to this many query tokens a sequence is scored by items, each row as a decode is: a
// speculative verification (1 + at most 16 drafts) then gives each position the same
// numbers as decoding it alone (the tiles sum in another order, which int8 activation
// rounding can turn into logits ~0.5 apart, enough to flip a near tie).
static const int32_t PER_TOKEN_MAX_Q = 17;
static const int64_t TCHUNK = 512;    // keys per tile item when there are few tiles

struct Ref { int64_t off, hstride; };  // one key chunk's partial rows of a token: head h at
                                       // part + off + h * hstride, G rows of 2 + D floats

struct AttnPlan {
    std::vector<Item> items;      // sequences with few query tokens (decode, verification)
    std::vector<Item> tiles;      // tiled work
    std::vector<Ref> refs;        // per token, its chunks' partials
    std::vector<int32_t> rfirst;  // [T + 1] into refs
    int64_t part_size = 1;        // floats
};

// For every query token its visible key range [lo, hi), in chunks, and where each chunk's
// partial result lives.
static void attn_plan(const AttnArgs& a, int nthreads, AttnPlan& pl) {
    const int64_t G = a.hq / a.hkv, per = G * (2 + a.d);
    pl.items.clear(); pl.tiles.clear(); pl.refs.clear();
    pl.rfirst.assign(a.num_tokens + 1, 0);
#if defined(__AVX512F__)
    const int64_t ntok_tile = TROWS / G;
    auto tiled = [&](int64_t s) {
        const int32_t nq = a.cu_q[s + 1] - a.cu_q[s];
        return nq * G >= 16 && nq > PER_TOKEN_MAX_Q;
    };
    int64_t ntiles = 0;
    for (int64_t s = 0; s < a.num_seqs; ++s)
        if (tiled(s)) ntiles += (a.cu_q[s + 1] - a.cu_q[s] + ntok_tile - 1) / ntok_tile;
    // Enough tiles keep every thread busy; few (one short chunk) split their keys too.
    const int64_t tchunk = ntiles * a.hkv >= 4 * nthreads ? INT32_MAX : TCHUNK;
#else
    auto tiled = [&](int64_t) { return false; };
    const int64_t ntok_tile = 1, tchunk = 0;
#endif
    // per sequence: its tiles or items [first, end)
    std::vector<std::pair<int64_t, int64_t>> span(a.num_seqs, {0, 0});
    const int64_t ntok_item = std::max<int64_t>(1, MAXR / G);  // tokens per item
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        const int32_t q0 = a.cu_q[s], q1 = a.cu_q[s + 1], L = a.seq_lens[s];
        auto first_key = [&](int64_t t) {
            return a.window > 0 ? std::max<int64_t>(0, query_pos(L, q0, q1, t) - a.window + 1) : 0;
        };
        if (tiled(s)) {
            span[s].first = (int64_t)pl.tiles.size();
            for (int32_t t0 = q0; t0 < q1; t0 += (int32_t)ntok_tile) {
                const int32_t t1 = (int32_t)std::min<int64_t>(q1, t0 + ntok_tile);
                const int64_t p1 = query_pos(L, q0, q1, t1 - 1), lo = first_key(t0);
                for (int64_t c = lo; c <= p1; c += tchunk)
                    pl.tiles.push_back({(int32_t)s, t0, t1 - t0, (int32_t)c,
                                        (int32_t)std::min<int64_t>(p1 + 1, c + tchunk), 0});
            }
            span[s].second = (int64_t)pl.tiles.size();
            continue;
        }
        // Runs of tokens with the same first key (all of a run without a window) share items:
        // chunks of CHUNK keys from there, each with the run's tokens that reach it.
        span[s].first = (int64_t)pl.items.size();
        for (int32_t t0 = q0; t0 < q1;) {
            const int64_t lo = first_key(t0);
            int32_t t1 = t0 + 1;
            while (t1 < q1 && t1 - t0 < ntok_item && first_key(t1) == lo) ++t1;
            const int64_t p1 = query_pos(L, q0, q1, t1 - 1);
            int32_t tf = t0;
            for (int64_t c = lo; c <= p1; c += CHUNK) {
                while (query_pos(L, q0, q1, tf) < c) ++tf;
                pl.items.push_back({(int32_t)s, tf, t1 - tf, (int32_t)c,
                                    (int32_t)std::min<int64_t>(p1 + 1, c + CHUNK), 0});
            }
            t0 = t1;
        }
        span[s].second = (int64_t)pl.items.size();
    }
    int64_t off = 0;
    for (Item& it : pl.items) { it.part = off; off += a.hkv * it.ntok * per; }
    for (Item& ti : pl.tiles) { ti.part = off; off += a.hkv * ti.ntok * per; }
    pl.part_size = std::max<int64_t>(1, off);
    // refs, token by token: the items (or tiles) of its sequence that hold it, keys in order
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        const std::vector<Item>& work = tiled(s) ? pl.tiles : pl.items;
        for (int32_t t = a.cu_q[s]; t < a.cu_q[s + 1]; ++t) {
            pl.rfirst[t] = (int32_t)pl.refs.size();
            for (int64_t k = span[s].first; k < span[s].second; ++k) {
                const Item& w = work[k];
                if (t >= w.tok0 && t < w.tok0 + w.ntok)
                    pl.refs.push_back({w.part + (t - w.tok0) * per, w.ntok * per});
            }
        }
    }
    pl.rfirst[a.num_tokens] = (int32_t)pl.refs.size();
}

#if defined(__AVX512F__)
// scores[j][rows] = sum_d qt[d][rows] * k[j][d] for the block's KB keys, NR row vectors.
template <int NR>
static inline void tile_qk(const float (*qt)[TROWS], const float (*kb)[256], int64_t D,
                           float (*sc)[TROWS]) {
    for (int j0 = 0; j0 < KB; j0 += 4) {
        __m512 s[4][NR];
        for (int jj = 0; jj < 4; ++jj)
            for (int r = 0; r < NR; ++r) s[jj][r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
            __m512 q[NR];
            for (int r = 0; r < NR; ++r) q[r] = _mm512_load_ps(qt[d] + r * 16);
            for (int jj = 0; jj < 4; ++jj) {
                const __m512 k = _mm512_set1_ps(kb[j0 + jj][d]);
                for (int r = 0; r < NR; ++r) s[jj][r] = _mm512_fmadd_ps(q[r], k, s[jj][r]);
            }
        }
        for (int jj = 0; jj < 4; ++jj)
            for (int r = 0; r < NR; ++r) _mm512_store_ps(sc[j0 + jj] + r * 16, s[jj][r]);
    }
}

// acc[r] = acc[r] * c[r] + sum_j p[j][r] * v[j] for RR rows from r0; head_dim 16 NV.
template <int NV, int RR>
static inline void tile_pv(float* acc, int64_t ld, const float* c, const float (*pr)[TROWS],
                           int r0, const float (*vb)[256], int nk) {
    __m512 a[RR][NV];
    for (int rr = 0; rr < RR; ++rr) {
        const __m512 cr = _mm512_set1_ps(c[r0 + rr]);
        for (int i = 0; i < NV; ++i)
            a[rr][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + rr) * ld + i * 16), cr);
    }
    for (int j = 0; j < nk; ++j)
        for (int i = 0; i < NV; ++i) {
            const __m512 v = _mm512_load_ps(vb[j] + i * 16);
            for (int rr = 0; rr < RR; ++rr)
                a[rr][i] = _mm512_fmadd_ps(_mm512_set1_ps(pr[j][r0 + rr]), v, a[rr][i]);
        }
    for (int rr = 0; rr < RR; ++rr)
        for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + (r0 + rr) * ld + i * 16, a[rr][i]);
}

// One tile item for KV head h: its rows' m, l and unnormalized V sums over keys [lo, hi)
// into part (rows of 2 + D floats, token-major then head).
template <typename T, typename K>
static void attn_tile(const AttnArgs& a, const Item& it, int64_t h, float* part) {
    const int64_t G = a.hq / a.hkv, D = a.d, ld = 2 + D, R = it.ntok * G;
    const int NR = (int)((R + 15) / 16);
    const K* kc = (const K*)a.k_cache;
    const K* vc = (const K*)a.v_cache;
    const int32_t* table = a.block_tables + (int64_t)it.seq * a.max_blocks;
    const int32_t q0 = a.cu_q[it.seq], q1 = a.cu_q[it.seq + 1], L = a.seq_lens[it.seq];
    alignas(64) float qt[256][TROWS];
    alignas(64) int32_t pos[TROWS];
    for (int r = 0; r < TROWS; ++r) {
        const int64_t t = it.tok0 + r / G;
        pos[r] = r < R ? (int32_t)query_pos(L, q0, q1, t) : -1;  // -1: a padding row sees nothing
        if (r < R) {
            const float* qp = a.q + t * a.q_stride + (h * G + r % G) * D;
            for (int64_t d = 0; d < D; ++d) qt[d][r] = qp[d] * a.scale;
        } else {
            for (int64_t d = 0; d < D; ++d) qt[d][r] = 0.f;
        }
        if (r < R) std::memset(part + r * ld + 2, 0, sizeof(float) * D);
    }
    const int32_t pmin = pos[0], pmax = pos[R - 1];
    __m512 mv[3], lv[3], posv[3];
    for (int r = 0; r < 3; ++r) {
        mv[r] = _mm512_set1_ps(-INFINITY);
        lv[r] = _mm512_setzero_ps();
        posv[r] = _mm512_castsi512_ps(_mm512_load_si512(pos + r * 16));
    }
    const int64_t nv = (D + 15) / 16;
    const __mmask16 tail = (__mmask16)(D % 16 ? (1u << (D % 16)) - 1 : 0xffff);
    alignas(64) float kb[KB][256], vb[KB][256], sc[KB][TROWS], pr[KB][TROWS], cs[TROWS];
    std::memset(kb, 0, sizeof(kb));
    std::memset(vb, 0, sizeof(vb));
    for (int64_t j0 = it.lo; j0 < it.hi; j0 += KB) {
        const int nk = (int)std::min<int64_t>(KB, it.hi - j0);
        for (int jj = 0; jj < nk; ++jj) {
            const int64_t j = j0 + jj;
            const int64_t slot = (int64_t)table[j / a.block_size] * a.block_size + j % a.block_size;
            const int64_t row = (slot * a.hkv + h) * D;
            const float ks = kv_scale<K>(a.k_scale, slot * a.hkv + h, h);
            const float vsc = kv_scale<K>(a.v_scale, slot * a.hkv + h, h);
            for (int64_t v = 0; v < nv; ++v) {
                const __mmask16 mk = v + 1 < nv ? 0xffff : tail;
                _mm512_store_ps(kb[jj] + v * 16, kv_row16<K>(kc + row + v * 16, mk, ks));
                _mm512_store_ps(vb[jj] + v * 16, kv_row16<K>(vc + row + v * 16, mk, vsc));
            }
        }
        if (NR == 1) tile_qk<1>(qt, kb, D, sc);
        else if (NR == 2) tile_qk<2>(qt, kb, D, sc);
        else tile_qk<3>(qt, kb, D, sc);
        // Every row sees every key of the block unless it crosses a row's diagonal or
        // window edge, or is the range's last, partial block.
        const bool full = nk == KB && j0 + KB - 1 <= pmin &&
                          (a.window <= 0 || j0 >= (int64_t)pmax - a.window + 1);
        for (int r = 0; r < NR; ++r) {
            const __m512i pv = _mm512_castps_si512(posv[r]);
            __m512 s[KB];
            __m512 bm = mv[r];
            for (int jj = 0; jj < KB; ++jj) {
                s[jj] = _mm512_load_ps(sc[jj] + r * 16);
                if (!full) {
                    const __m512i j = _mm512_set1_epi32((int32_t)(j0 + jj));
                    __mmask16 vis = jj < nk ? _mm512_cmpge_epi32_mask(pv, j) : 0;
                    if (a.window > 0)
                        vis &= _mm512_cmplt_epi32_mask(
                            pv, _mm512_add_epi32(j, _mm512_set1_epi32((int32_t)a.window)));
                    s[jj] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis, s[jj]);
                }
                bm = _mm512_max_ps(bm, s[jj]);
            }
            // a row that has seen no key yet keeps m = -inf: subtract 0 instead (exps of
            // -inf are 0, never NaN)
            const __mmask16 none = _mm512_cmp_ps_mask(bm, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
            const __m512 ms = _mm512_mask_mov_ps(bm, none, _mm512_setzero_ps());
            const __m512 c = exp16(_mm512_sub_ps(mv[r], ms));
            __m512 l = _mm512_mul_ps(lv[r], c);
            for (int jj = 0; jj < KB; ++jj) {
                const __m512 e = exp16(_mm512_sub_ps(s[jj], ms));
                l = _mm512_add_ps(l, e);
                _mm512_store_ps(pr[jj] + r * 16, e);
            }
            lv[r] = l;
            mv[r] = bm;
            _mm512_store_ps(cs + r * 16, c);
        }
        float* acc = part + 2;
        int r = 0;
        if (nv == 4 && tail == 0xffff) {
            for (; r + 2 <= R; r += 2) tile_pv<4, 2>(acc, ld, cs, pr, r, vb, nk);
            for (; r < R; ++r) tile_pv<4, 1>(acc, ld, cs, pr, r, vb, nk);
        } else if (nv == 8 && tail == 0xffff) {
            for (; r < R; ++r) tile_pv<8, 1>(acc, ld, cs, pr, r, vb, nk);
        }
        for (; r < R; ++r)
            for (int64_t v = 0; v < nv; ++v) {
                const __mmask16 mk = v + 1 < nv ? 0xffff : tail;
                __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, acc + r * ld + v * 16),
                                         _mm512_set1_ps(cs[r]));
                for (int jj = 0; jj < nk; ++jj)
                    x = _mm512_fmadd_ps(_mm512_set1_ps(pr[jj][r]), _mm512_load_ps(vb[jj] + v * 16), x);
                _mm512_mask_storeu_ps(acc + r * ld + v * 16, mk, x);
            }
    }
    alignas(64) float mf[TROWS], lf[TROWS];
    for (int r = 0; r < 3; ++r) { _mm512_store_ps(mf + r * 16, mv[r]); _mm512_store_ps(lf + r * 16, lv[r]); }
    for (int64_t r = 0; r < R; ++r) { part[r * ld] = mf[r]; part[r * ld + 1] = lf[r]; }
}
#endif

template <typename T, typename K>
static void attention_body(Pool& p, const AttnArgs& a, const AttnPlan& pl, float* part) {
    const int64_t G = a.hq / a.hkv, D = a.d, per = G * (2 + D);
    const int64_t ni = (int64_t)pl.items.size();
    parallel_for(p, (ni + (int64_t)pl.tiles.size()) * a.hkv, [&](int64_t w) {
        const int64_t i = w / a.hkv, h = w % a.hkv;
        if (i < ni) {
            const Item& it = pl.items[i];
            attn_item<T, K>(a, it, h, part + it.part + h * it.ntok * per);
            return;
        }
#if defined(__AVX512F__)
        const Item& ti = pl.tiles[i - ni];
        attn_tile<T, K>(a, ti, h, part + ti.part + h * ti.ntok * per);
#endif
    });
    // Merge each token's key chunks (one chunk for all but long sequences).
    parallel_for(p, a.num_tokens * a.hkv, [&](int64_t w) {
        const int64_t t = w / a.hkv, h = w % a.hkv;
        T* out = (T*)a.out;
        for (int64_t g = 0; g < G; ++g) {
            float M = -INFINITY;
            for (int32_t i = pl.rfirst[t]; i < pl.rfirst[t + 1]; ++i) {
                const Ref& r = pl.refs[i];
                M = std::max(M, part[r.off + h * r.hstride + g * (2 + D)]);
            }
            float L = 0.f, acc[256];
            for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
            for (int32_t i = pl.rfirst[t]; i < pl.rfirst[t + 1]; ++i) {
                const Ref& r = pl.refs[i];
                const float* pp = part + r.off + h * r.hstride + g * (2 + D);
                if (pp[1] == 0.f) continue;
                const float c = std::exp(pp[0] - M);
                L += pp[1] * c;
                for (int64_t d = 0; d < D; ++d) acc[d] += pp[2 + d] * c;
            }
            T* o = out + t * a.out_stride + (h * G + g) * D;
            const float inv = L > 0.f ? 1.f / L : 0.f;
            for (int64_t d = 0; d < D; ++d) o[d] = st<T>(acc[d] * inv);
        }
    });
}

// attention_body for the caches' format.
template <typename T>
static void attention_run(Pool& p, const AttnArgs& a, const AttnPlan& pl, float* part) {
    switch (a.kvfmt) {
        case KV_INT8: attention_body<T, int8_t>(p, a, pl, part); break;
        case KV_E4M3: attention_body<T, E4M3>(p, a, pl, part); break;
        case KV_E5M2: attention_body<T, E5M2>(p, a, pl, part); break;
        default: attention_body<T, T>(p, a, pl, part);
    }
}

template <typename T>
static int attention(Pool& p, const AttnArgs& a) {
    if (a.d > 256 || a.hq / a.hkv > MAXG) return 1;
    AttnPlan pl;
    attn_plan(a, p.nthreads, pl);
    std::vector<float> part(pl.part_size);
    attention_run<T>(p, a, pl, part.data());
    return 0;
}

// ------------------------------------------------------------------------------ forward

// Pointers of one decoder layer, in this order (0 where absent).
// P_S*: the scales of int8 / int4 weights (WRef), else 0; P_F*: their WFormat (bits).
enum LayerPtr { P_LN1, P_WQKV, P_BQKV, P_QNORM, P_KNORM, P_WO, P_LN2, P_WGU, P_WDOWN,
                P_KCACHE, P_VCACHE, P_SQKV, P_SO, P_SGU, P_SDOWN, P_FQKV, P_FO, P_FGU, P_FDOWN,
                P_KSCALE, P_VSCALE,  // a quantized cache's scales (AttnArgs), else 0
                P_COUNT };
// Model dims, in this order.
enum Dim { D_LAYERS, D_HIDDEN, D_HQ, D_HKV, D_HEADDIM, D_INTER, D_BLOCK, D_MAXBLOCKS,
           D_ROPE_POS, D_KVFMT, D_COUNT };

template <typename T>
static void rmsnorm_rows(const float* x, const T* w, T* y, int64_t M, int64_t H, float eps) {
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
                   int64_t num_tokens, int64_t num_seqs, T* out, Pool& p) {
    const int64_t L = dims[D_LAYERS], H = dims[D_HIDDEN], HQ = dims[D_HQ], HKV = dims[D_HKV],
                  D = dims[D_HEADDIM], I = dims[D_INTER], B = dims[D_BLOCK];
    const int64_t M = num_tokens, QKV = (HQ + 2 * HKV) * D;
    if (D > 256 || HQ / HKV > MAXG) return 1;
    for (int64_t t = 0; t < M; ++t)
        if (positions[t] < 0 || positions[t] >= dims[D_ROPE_POS]) return 2;
    std::vector<float> resid(M * H), qkv(M * QKV);
    std::vector<T> h(M * std::max(H, HQ * D)), act(M * I);
    AttnArgs a{};
    a.q = qkv.data(); a.q_stride = QKV; a.block_tables = block_tables;
    a.max_blocks = dims[D_MAXBLOCKS]; a.cu_q = cu_q; a.seq_lens = seq_lens;
    a.num_seqs = num_seqs; a.num_tokens = M; a.hq = HQ; a.hkv = HKV; a.d = D; a.block_size = B;
    a.scale = 1.f / std::sqrt((float)D); a.out = h.data(); a.out_stride = HQ * D;
    a.kvfmt = (int)dims[D_KVFMT];
    // The key ranges depend on the window, which may differ per layer (Mistral/Qwen2 mixes).
    AttnPlan plan;
    std::vector<float> part;
    int64_t items_window = -1;
    for (int64_t i = 0; i < M * H; ++i) resid[i] = ld<T>(x_in, i);
    for (int64_t l = 0; l < L; ++l) {
        const int64_t* P = layer_ptrs[l];
        a.window = windows[l];
        if (a.window != items_window) {
            attn_plan(a, p.nthreads, plan);
            part.resize(plan.part_size);
            items_window = a.window;
        }
        a.k_cache = (const void*)P[P_KCACHE];
        a.v_cache = (const void*)P[P_VCACHE];
        a.k_scale = (const void*)P[P_KSCALE];
        a.v_scale = (const void*)P[P_VSCALE];
        T* kc = (T*)P[P_KCACHE];
        T* vc = (T*)P[P_VCACHE];
        // Small per-token work (norms, RoPE, the cache write) runs on the calling thread:
        // a few microseconds, less than handing it out would cost.
        rmsnorm_rows<T>(resid.data(), (const T*)P[P_LN1], h.data(), M, H, eps);
        linear<T>(p, h.data(), {(const void*)P[P_WQKV], (const void*)P[P_SQKV], P[P_FQKV]},
                  (const T*)P[P_BQKV], qkv.data(), M, QKV, H,
                  QKV, OUT_F32);
        for (int64_t t = 0; t < M; ++t) {  // q/k norm (Qwen3), RoPE, new K/V into the cache
            float* row = qkv.data() + t * QKV;
            const float* c = cos_t + positions[t] * D;
            const float* s = sin_t + positions[t] * D;
            for (int64_t hh = 0; hh < HQ + HKV; ++hh) {
                float* v = row + hh * D;
                if (P[P_QNORM]) head_norm<T>(v, (const T*)(hh < HQ ? P[P_QNORM] : P[P_KNORM]), D, eps);
                rope(v, c, s, D);
            }
            const int64_t slot = slots[t];
            if (a.kvfmt == KV_PLAIN) {
                for (int64_t i = 0; i < HKV * D; ++i) {
                    kc[slot * HKV * D + i] = st<T>(row[HQ * D + i]);
                    vc[slot * HKV * D + i] = st<T>(row[(HQ + HKV) * D + i]);
                }
                continue;
            }
            // quantized from the values T would have stored (kernels/kvquant.py)
            float x[256];
            for (int64_t hh = 0; hh < HKV; ++hh)
                for (int kv = 0; kv < 2; ++kv) {
                    const float* src = row + (HQ + kv * HKV + hh) * D;
                    for (int64_t i = 0; i < D; ++i) x[i] = rounded<T>(src[i]);
                    const int64_t sp = kv ? P_VSCALE : P_KSCALE;
                    store_kv_row(a.kvfmt, (void*)P[kv ? P_VCACHE : P_KCACHE], (void*)P[sp], hh,
                                 (slot * HKV + hh) * D, x, D);
                }
        }
        // The K/V just stored are read back through the cache, like every key.
        attention_run<T>(p, a, plan, part.data());
        linear<T>(p, h.data(), {(const void*)P[P_WO], (const void*)P[P_SO], P[P_FO]}, (const T*)nullptr,
                  resid.data(), M, H, HQ * D,
                  H, OUT_ADD_F32);
        rmsnorm_rows<T>(resid.data(), (const T*)P[P_LN2], h.data(), M, H, eps);
        gate_up_silu<T>(p, h.data(), {(const void*)P[P_WGU], (const void*)P[P_SGU], P[P_FGU]}, act.data(),
                        M, I, H);
        linear<T>(p, act.data(), {(const void*)P[P_WDOWN], (const void*)P[P_SDOWN], P[P_FDOWN]},
                  (const T*)nullptr, resid.data(), M, H, I,
                  H, OUT_ADD_F32);
    }
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

// dtype: 0 = float32, 1 = bfloat16 (x, bias, y when not out_fp32)
// bits 8 / 4: w is u8 codes in the q8 / q4 tile layout with w_scale as WRef says (N % 16 == 0,
// K % 32 == 0); bits 0: w has x's dtype.
int kvs_linear(int dtype, const void* x, const void* w, const void* w_scale, int64_t bits,
               const void* bias, void* y, int64_t M, int64_t N, int64_t K, int out_fp32,
               int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    const int mode = out_fp32 ? OUT_F32 : OUT_T;
    if ((bits == W_Q8 || bits == W_Q4) && (K % 32 || N % QT || !w_scale)) return 1;
    if (bits == W_F32T && (dtype != 0 || N % QT)) return 1;
    if (bits != W_PLAIN && bits != W_Q8 && bits != W_Q4 && bits != W_F32T) return 1;
    if (dtype == 0)
        linear<float>(p, (const float*)x, {w, w_scale, bits}, (const float*)bias, y, M, N, K, N,
                      mode);
    else
        linear<bf16>(p, (const bf16*)x, {w, w_scale, bits}, (const bf16*)bias, y, M, N, K, N,
                     mode);
    return 0;
}

// Per row of fp32 logits [rows, V]: lse = log sum exp, rank = 1 + #{j : x[j] > x[target]}
// (teacher-forced scoring: logprob = x[target] - lse, without a [rows, V] log-softmax).
int kvs_row_stats(const float* x, int64_t rows, int64_t V, const int64_t* target, float* lse,
                  int64_t* rank, int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    for (int64_t r = 0; r < rows; ++r)
        if (target[r] < 0 || target[r] >= V) return 1;
    parallel_for(p, rows, [&](int64_t r) {
        const float* row = x + r * V;
        const float t = row[target[r]];
        float mx = -INFINITY, sum = 0.f;
        int64_t above = 0, j = 0;
#if defined(__AVX512F__)
        __m512 vm = _mm512_set1_ps(-INFINITY);
        const __m512 vt = _mm512_set1_ps(t);
        for (; j + 16 <= V; j += 16) {
            const __m512 v = _mm512_loadu_ps(row + j);
            vm = _mm512_max_ps(vm, v);
            above += __builtin_popcount(_mm512_cmp_ps_mask(v, vt, _CMP_GT_OQ));
        }
        mx = _mm512_reduce_max_ps(vm);
#endif
        for (int64_t k = j; k < V; ++k) { mx = std::max(mx, row[k]); above += row[k] > t; }
        j = 0;
#if defined(__AVX512F__)
        __m512 vs = _mm512_setzero_ps();
        const __m512 vmx = _mm512_set1_ps(mx);
        for (; j + 16 <= V; j += 16)
            vs = _mm512_add_ps(vs, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vmx)));
        sum = _mm512_reduce_add_ps(vs);
#endif
        for (int64_t k = j; k < V; ++k) sum += std::exp(row[k] - mx);
        lse[r] = mx + std::log(sum);
        rank[r] = above + 1;
    });
    return 0;
}

// Sampling weights, in place, per row of fp32 logits z [rows, C] (engine/sampler.py's
// _draw_filtered, which also says why): NaN -> -inf, -inf -> -FLT_MAX, +inf -> FLT_MAX (torch's
// nan_to_num as called there); d = z - max, raised to `cutoff`; w = e^d, 0 unless above
// e^cutoff * 1.0001; then 0 below min_p[r] (a fraction of the top weight, 1).
int kvs_sample_weights(float* z, int64_t rows, int64_t C, const float* min_p, float cutoff,
                       int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    const float floor_w = std::exp(cutoff) * 1.0001f;
    auto clean = [](float x) {
        return std::isnan(x) ? -INFINITY : x == INFINITY ? FLT_MAX : x == -INFINITY ? -FLT_MAX : x;
    };
    parallel_for(p, rows, [&](int64_t r) {
        float* row = z + r * C;
        const float mp = min_p[r];
        float mx = -INFINITY;
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 vinf = _mm512_set1_ps(INFINITY), vninf = _mm512_set1_ps(-INFINITY);
        const __m512 vmax = _mm512_set1_ps(FLT_MAX), vmin = _mm512_set1_ps(-FLT_MAX);
        auto clean16 = [&](__m512 v) {
            v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, vinf, _CMP_EQ_OQ), vmax);
            v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, vninf, _CMP_EQ_OQ), vmin);
            return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vninf);
        };
        __m512 vm = vninf;
        for (; j + 16 <= C; j += 16) vm = _mm512_max_ps(vm, clean16(_mm512_loadu_ps(row + j)));
        mx = _mm512_reduce_max_ps(vm);
#endif
        for (int64_t k = j; k < C; ++k) mx = std::max(mx, clean(row[k]));
        j = 0;
#if defined(__AVX512F__)
        const __m512 vmx = _mm512_set1_ps(mx), vcut = _mm512_set1_ps(cutoff);
        const __m512 vfloor = _mm512_set1_ps(floor_w), vmp = _mm512_set1_ps(mp);
        for (; j + 16 <= C; j += 16) {
            __m512 d = _mm512_sub_ps(clean16(_mm512_loadu_ps(row + j)), vmx);
            d = _mm512_mask_mov_ps(vcut, _mm512_cmp_ps_mask(d, vcut, _CMP_GT_OQ), d);
            const __m512 e = exp16(d);
            __mmask16 keep = _mm512_cmp_ps_mask(e, vfloor, _CMP_GT_OQ);
            if (mp > 0) keep &= _mm512_cmp_ps_mask(e, vmp, _CMP_GE_OQ);
            _mm512_storeu_ps(row + j, _mm512_maskz_mov_ps(keep, e));
        }
#endif
        for (int64_t k = j; k < C; ++k) {
            float d = clean(row[k]) - mx;
            d = d > cutoff ? d : cutoff;
            const float e = std::exp(d);
            row[k] = e > floor_w && !(e < mp) ? e : 0.f;
        }
    });
    return 0;
}

// Top-p: per row of weights w [rows, C], the total (float64) of the weights strictly above
// w[r, pos[r]] (the mass ahead of a draw).
int kvs_mass_above(const float* w, int64_t rows, int64_t C, const int64_t* pos, double* out,
                   int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    for (int64_t r = 0; r < rows; ++r)
        if (pos[r] < 0 || pos[r] >= C) return 1;
    parallel_for(p, rows, [&](int64_t r) {
        const float* row = w + r * C;
        const float t = row[pos[r]];
        double total = 0.0;
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 vt = _mm512_set1_ps(t);
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        for (; j + 16 <= C; j += 16) {
            const __m512 v = _mm512_loadu_ps(row + j);
            const __m512 x = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vt, _CMP_GT_OQ), v);
            a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
            a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(
                _mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
        }
        total = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#endif
        for (int64_t k = j; k < C; ++k)
            if (row[k] > t) total += row[k];
        out[r] = total;
    });
    return 0;
}

// Structured output: every token whose bit is 0 in its row's bitmask (xgrammar's layout:
// token t is bit t % 32 of int32 word t / 32) gets -inf, for the listed rows of x [*, V];
// allowed[i] gets the number of tokens row rows[i] keeps (0: the grammar is stuck).
int kvs_apply_bitmask(float* x, int64_t V, const int32_t* bitmask, int64_t words,
                      const int64_t* rows, int64_t nrows, int64_t* allowed, int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    parallel_for(p, nrows, [&](int64_t i) {
        const int64_t r = rows[i];
        float* row = x + r * V;
        const uint32_t* bm = reinterpret_cast<const uint32_t*>(bitmask + r * words);
        const int64_t full = std::min(words, V / 32);  // words whose 32 tokens all exist
        int64_t kept = 0;
        int64_t w = 0;
#if defined(__AVX512F__)
        const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
        for (; w < full; ++w) {  // masked stores: one per 16 tokens, whatever the bits
            const uint32_t off = ~bm[w];
            kept += 32 - __builtin_popcount(off);
            if (!off) continue;
            _mm512_mask_storeu_ps(row + w * 32, (__mmask16)(off & 0xFFFF), neg_inf);
            _mm512_mask_storeu_ps(row + w * 32 + 16, (__mmask16)(off >> 16), neg_inf);
        }
#endif
        for (; w < words && w * 32 < V; ++w) {
            uint32_t off = ~bm[w];  // the masked tokens of these 32
            const int64_t n = std::min<int64_t>(32, V - w * 32);
            if (n < 32) off &= (1u << n) - 1;  // bits past the vocabulary are not tokens
            kept += n - __builtin_popcount(off);
            while (off) {
                row[w * 32 + __builtin_ctz(off)] = -INFINITY;
                off &= off - 1;
            }
        }
        allowed[i] = kept;
    });
    return 0;
}

int kvs_has_vnni() {
#if defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

int kvs_paged_attention(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                        const void* v_cache, const int32_t* block_tables, int64_t max_blocks,
                        const int32_t* cu_q, const int32_t* seq_lens, int64_t num_seqs,
                        int64_t num_tokens, int64_t hq, int64_t hkv, int64_t d,
                        int64_t block_size, float scale, int64_t window, void* out,
                        int nthreads, int kvfmt, const void* k_scale, const void* v_scale) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    AttnArgs a{(const float*)q, q_stride, k_cache, v_cache, block_tables, max_blocks, cu_q,
               seq_lens, num_seqs, num_tokens, hq, hkv, d, block_size, scale, window, out,
               hq * d, kvfmt, k_scale, v_scale};
    return dtype == 0 ? attention<float>(p, a) : attention<bf16>(p, a);
}

// Rows x [n, D] of the model's dtype quantized as the cache stores them (kvfmt): codes [n, D]
// bytes; int8 writes a fp16 scale per row into scales [n], fp8 divides by head_scales [n].
int kvs_quantize_rows(int dtype, int kvfmt, const void* x, int64_t n, int64_t D, void* codes,
                      void* scales) {
    if (D > 256 || kvfmt == KV_PLAIN) return 1;
    float v[256];
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t i = 0; i < D; ++i)
            v[i] = dtype == 0 ? ((const float*)x)[r * D + i] : bf2f(((const bf16*)x)[r * D + i]);
        store_kv_row(kvfmt, codes, scales, r, r * D, v, D);
    }
    return 0;
}

int kvs_forward(int dtype, const int64_t* dims, const int64_t* layer_ptrs, const int64_t* windows,
                const void* final_norm, const float* cos_t, const float* sin_t, float eps,
                const void* x_in, const int64_t* positions, const int64_t* slots,
                const int32_t* block_tables, const int32_t* cu_q, const int32_t* seq_lens,
                int64_t num_tokens, int64_t num_seqs, void* out, int nthreads) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    Pool& p = pool(nthreads);
    std::vector<const int64_t*> lp(dims[D_LAYERS]);
    for (int64_t l = 0; l < dims[D_LAYERS]; ++l) lp[l] = layer_ptrs + l * P_COUNT;
    if (dtype == 0)
        return forward<float>(dims, lp.data(), windows, (const float*)final_norm, cos_t, sin_t,
                              eps, (const float*)x_in, positions, slots, block_tables, cu_q,
                              seq_lens, num_tokens, num_seqs, (float*)out, p);
    return forward<bf16>(dims, lp.data(), windows, (const bf16*)final_norm, cos_t, sin_t, eps,
                         (const bf16*)x_in, positions, slots, block_tables, cu_q, seq_lens,
                         num_tokens, num_seqs, (bf16*)out, p);
}

}  // extern "C"
