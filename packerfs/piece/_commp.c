/*
 * packerfs.piece._commp: the piece commitment (commP) hot loop.
 *
 * Given raw payload bytes, fr32-expand them (127 -> 128 bytes) and reduce the
 * expanded data with the sha256-trunc254 binary tree. The Python side
 * (packerfs/piece/__init__.py) streams a payload through here in aligned chunks of
 * 127 * 2^k raw bytes and folds the chunk roots itself.
 *
 * Every tree node hashes exactly 64 bytes, so SHA-256 runs two compressions per
 * node: one over left||right and one over the constant padding block. The padding
 * block's message schedule (W[i] + K[i]) is computed once at import.
 *
 * Three back ends compute the same bytes; only speed differs:
 *   - avx512: sixteen nodes at once, one per 32-bit lane of a zmm register
 *     (messages transposed in, digests transposed out). Fastest where AVX-512
 *     runs at full width: ~1.7x SHA-NI on Sapphire Rapids.
 *   - shani: x86 SHA extensions, two sibling nodes per call so the two
 *     dependency chains overlap in the pipeline.
 *   - portable: plain C, for every other CPU.
 * At import each available back end is timed on 64 KiB and the fastest becomes
 * "auto". PACKERFS_COMMP_IMPL=<name> forces one (if available).
 *
 * The heavy functions release the GIL and split the work over worker threads.
 *
 * Python API (all raise ValueError on bad arguments):
 *   subtree_roots(data, k) -> bytes   len(data) must be a positive multiple of
 *                                     127 << k; returns the 32-byte root of each
 *                                     127 << k slice, concatenated.
 *   root(data, k) -> bytes            len(data) <= 127 << k; 32-byte root of the
 *                                     subtree of padded size 128 << k over data
 *                                     followed by zeros.
 *   node(left_right) -> bytes         one node over 64 bytes.
 *   set_impl(name) / impl()           "auto", "avx512", "shani" or "portable".
 *   available_impls() -> list[str]
 *   set_threads(n) / threads()        worker threads for subtree_roots (0 = default).
 *   _set_avx512_tail(name)            test hook: back end for the narrow levels
 *                                     the avx512 back end hands off.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if (defined(__x86_64__) || defined(__i386__)) && !defined(COMMP_NO_X86) /* -DCOMMP_NO_X86: portable only */
#include <cpuid.h>
#include <immintrin.h>
#define COMMP_X86 1
#endif

#define RAW_GROUP 127   /* raw bytes per fr32 group */
#define PAD_GROUP 128   /* padded bytes per fr32 group */
#define MAX_K 40        /* 127 << 40 raw bytes: far beyond any sector size */
#define BLK_K 7         /* leaf block: 2^7 groups = 16 KiB padded, hashed in L1 */
#define MAX_THREADS 64

typedef void (*level_fn)(uint8_t *out, const uint8_t *in, size_t npairs);

/* ------------------------------------------------------------------------- */
/* SHA-256 constants                                                          */

static const uint32_t K256[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t IV256[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* W[i] + K[i] of the second block of every node hash: 0x80, zeros, bit length 512. */
static uint32_t PAD_WK[64] __attribute__((aligned(16)));

/* Roots of all-zero subtrees by height (height h covers 32 << h padded bytes). */
static uint8_t ZERO_ROOT[MAX_K + 3][32];

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define BSIG0(x) (ROTR(x, 2) ^ ROTR(x, 13) ^ ROTR(x, 22))
#define BSIG1(x) (ROTR(x, 6) ^ ROTR(x, 11) ^ ROTR(x, 25))
#define SSIG0(x) (ROTR(x, 7) ^ ROTR(x, 18) ^ ((x) >> 3))
#define SSIG1(x) (ROTR(x, 17) ^ ROTR(x, 19) ^ ((x) >> 10))

static void schedule(uint32_t w[64]) {
    for (int i = 16; i < 64; i++)
        w[i] = SSIG1(w[i - 2]) + w[i - 7] + SSIG0(w[i - 15]) + w[i - 16];
}

/* ------------------------------------------------------------------------- */
/* Portable back end                                                          */

/* 64 rounds over a precomputed W+K array, with the feed-forward addition. */
static void rounds_portable(uint32_t st[8], const uint32_t wk[64]) {
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    uint32_t e = st[4], f = st[5], g = st[6], h = st[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + BSIG1(e) + ((e & f) ^ (~e & g)) + wk[i];
        uint32_t t2 = BSIG0(a) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

/* out = sha256-trunc254(in[0..64)); out may alias in. */
static void node_portable(uint8_t *out, const uint8_t *in) {
    uint32_t w[64], st[8];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)in[4 * i] << 24 | (uint32_t)in[4 * i + 1] << 16 |
               (uint32_t)in[4 * i + 2] << 8 | (uint32_t)in[4 * i + 3];
    schedule(w);
    for (int i = 0; i < 64; i++) w[i] += K256[i];
    memcpy(st, IV256, sizeof st);
    rounds_portable(st, w);
    rounds_portable(st, PAD_WK);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(st[i] >> 24);
        out[4 * i + 1] = (uint8_t)(st[i] >> 16);
        out[4 * i + 2] = (uint8_t)(st[i] >> 8);
        out[4 * i + 3] = (uint8_t)st[i];
    }
    out[31] &= 0x3f;
}

static void level_portable(uint8_t *out, const uint8_t *in, size_t npairs) {
    for (size_t i = 0; i < npairs; i++) node_portable(out + 32 * i, in + 64 * i);
}

/* ------------------------------------------------------------------------- */
/* SHA-NI back end                                                            */

#ifdef COMMP_X86
#define SHANI __attribute__((target("sha,sse4.1")))

/* The state lives in two registers as the SHA instructions want it:
 * "ABEF" (lane 3 = a, lane 2 = b, lane 1 = e, lane 0 = f) and "CDGH". */
static const uint32_t IV_ABEF[4] __attribute__((aligned(16))) = {0x9b05688c, 0x510e527f, 0xbb67ae85, 0x6a09e667};
static const uint32_t IV_CDGH[4] __attribute__((aligned(16))) = {0x5be0cd19, 0x1f83d9ab, 0xa54ff53a, 0x3c6ef372};
static const uint8_t BSWAP32[16] __attribute__((aligned(16))) = {3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12};
static const uint8_t TRUNC_MASK[16] __attribute__((aligned(16))) = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f};

#define LD(p) _mm_load_si128((const __m128i *)(p))
#define LDU(p) _mm_loadu_si128((const __m128i *)(p))
#define KV(i) LD(&K256[4 * (i)])
#define PV(i) LD(&PAD_WK[4 * (i)])

/* Four rounds with a W+K vector. */
#define RND4(s0, s1, wk)                                  \
    do {                                                  \
        __m128i t_ = (wk);                                \
        s1 = _mm_sha256rnds2_epu32(s1, s0, t_);           \
        t_ = _mm_shuffle_epi32(t_, 0x0E);                 \
        s0 = _mm_sha256rnds2_epu32(s0, s1, t_);           \
    } while (0)

/* a <- next four schedule words, from the previous sixteen in a, b, c, d. */
#define SCHED(a, b, c, d) \
    a = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(a, b), _mm_alignr_epi8(d, c, 4)), d)

/* ABEF/CDGH state -> 32 digest bytes, truncated to 254 bits. */
#define STORE_DIGEST(out, s0, s1)                                            \
    do {                                                                     \
        __m128i ba_ = _mm_shuffle_epi32(s0, 0x1B);     /* F E B A */         \
        __m128i dc_ = _mm_shuffle_epi32(s1, 0xB1);     /* D C H G */         \
        __m128i lo_ = _mm_blend_epi16(ba_, dc_, 0xF0); /* D C B A */         \
        __m128i hi_ = _mm_alignr_epi8(dc_, ba_, 8);    /* H G F E */         \
        lo_ = _mm_shuffle_epi8(lo_, bswap);                                  \
        hi_ = _mm_and_si128(_mm_shuffle_epi8(hi_, bswap), LD(TRUNC_MASK));   \
        _mm_storeu_si128((__m128i *)(out), lo_);                             \
        _mm_storeu_si128((__m128i *)((out) + 16), hi_);                      \
    } while (0)

/* One node: out (32 bytes) = sha256-trunc254(in[0..64)). out may alias in. */
SHANI static void node_shani(uint8_t *out, const uint8_t *in) {
    const __m128i bswap = LD(BSWAP32);
    __m128i m0 = _mm_shuffle_epi8(LDU(in), bswap);
    __m128i m1 = _mm_shuffle_epi8(LDU(in + 16), bswap);
    __m128i m2 = _mm_shuffle_epi8(LDU(in + 32), bswap);
    __m128i m3 = _mm_shuffle_epi8(LDU(in + 48), bswap);
    __m128i s0 = LD(IV_ABEF), s1 = LD(IV_CDGH);

    RND4(s0, s1, _mm_add_epi32(m0, KV(0)));
    RND4(s0, s1, _mm_add_epi32(m1, KV(1)));
    RND4(s0, s1, _mm_add_epi32(m2, KV(2)));
    RND4(s0, s1, _mm_add_epi32(m3, KV(3)));
    for (int q = 4; q < 16; q += 4) {
        SCHED(m0, m1, m2, m3); RND4(s0, s1, _mm_add_epi32(m0, KV(q)));
        SCHED(m1, m2, m3, m0); RND4(s0, s1, _mm_add_epi32(m1, KV(q + 1)));
        SCHED(m2, m3, m0, m1); RND4(s0, s1, _mm_add_epi32(m2, KV(q + 2)));
        SCHED(m3, m0, m1, m2); RND4(s0, s1, _mm_add_epi32(m3, KV(q + 3)));
    }
    s0 = _mm_add_epi32(s0, LD(IV_ABEF));
    s1 = _mm_add_epi32(s1, LD(IV_CDGH));

    __m128i h0 = s0, h1 = s1;
    for (int q = 0; q < 16; q++) RND4(s0, s1, PV(q));
    s0 = _mm_add_epi32(s0, h0);
    s1 = _mm_add_epi32(s1, h1);
    STORE_DIGEST(out, s0, s1);
}

/* Two independent nodes at once: out[0..64) = node(in[0..64)), node(in[64..128)).
 * Interleaving the two dependency chains keeps the SHA unit busy; the rounds
 * instruction has several cycles of latency but can issue more often. */
SHANI static void node2_shani(uint8_t *out, const uint8_t *in) {
    const __m128i bswap = LD(BSWAP32);
    __m128i a0 = _mm_shuffle_epi8(LDU(in), bswap);
    __m128i a1 = _mm_shuffle_epi8(LDU(in + 16), bswap);
    __m128i a2 = _mm_shuffle_epi8(LDU(in + 32), bswap);
    __m128i a3 = _mm_shuffle_epi8(LDU(in + 48), bswap);
    __m128i b0 = _mm_shuffle_epi8(LDU(in + 64), bswap);
    __m128i b1 = _mm_shuffle_epi8(LDU(in + 80), bswap);
    __m128i b2 = _mm_shuffle_epi8(LDU(in + 96), bswap);
    __m128i b3 = _mm_shuffle_epi8(LDU(in + 112), bswap);
    __m128i as0 = LD(IV_ABEF), as1 = LD(IV_CDGH);
    __m128i bs0 = as0, bs1 = as1;

#define BOTH(i, am, bm)                                   \
    RND4(as0, as1, _mm_add_epi32(am, KV(i)));             \
    RND4(bs0, bs1, _mm_add_epi32(bm, KV(i)))

    BOTH(0, a0, b0);
    BOTH(1, a1, b1);
    BOTH(2, a2, b2);
    BOTH(3, a3, b3);
    for (int q = 4; q < 16; q += 4) {
        SCHED(a0, a1, a2, a3); SCHED(b0, b1, b2, b3); BOTH(q, a0, b0);
        SCHED(a1, a2, a3, a0); SCHED(b1, b2, b3, b0); BOTH(q + 1, a1, b1);
        SCHED(a2, a3, a0, a1); SCHED(b2, b3, b0, b1); BOTH(q + 2, a2, b2);
        SCHED(a3, a0, a1, a2); SCHED(b3, b0, b1, b2); BOTH(q + 3, a3, b3);
    }
#undef BOTH
    as0 = _mm_add_epi32(as0, LD(IV_ABEF));
    as1 = _mm_add_epi32(as1, LD(IV_CDGH));
    bs0 = _mm_add_epi32(bs0, LD(IV_ABEF));
    bs1 = _mm_add_epi32(bs1, LD(IV_CDGH));

    __m128i ah0 = as0, ah1 = as1, bh0 = bs0, bh1 = bs1;
    for (int q = 0; q < 16; q++) {
        __m128i wk = PV(q);
        RND4(as0, as1, wk);
        RND4(bs0, bs1, wk);
    }
    as0 = _mm_add_epi32(as0, ah0);
    as1 = _mm_add_epi32(as1, ah1);
    bs0 = _mm_add_epi32(bs0, bh0);
    bs1 = _mm_add_epi32(bs1, bh1);
    STORE_DIGEST(out, as0, as1);
    STORE_DIGEST(out + 32, bs0, bs1);
}

/* In place is fine: pair i is read before output i is written, and output i
 * (bytes 32i..32i+64 for the two-at-once case) never reaches a later pair. */
SHANI static void level_shani(uint8_t *out, const uint8_t *in, size_t npairs) {
    size_t i = 0;
    for (; i + 2 <= npairs; i += 2) node2_shani(out + 32 * i, in + 64 * i);
    if (i < npairs) node_shani(out + 32 * i, in + 64 * i);
}

/* ------------------------------------------------------------------------- */
/* AVX-512 back end: sixteen nodes at once, one per 32-bit lane               */

#define AVX512 __attribute__((target("avx512f,avx512bw")))

#define ZROR(x, n) _mm512_ror_epi32(x, n)
#define XOR3(a, b, c) _mm512_ternarylogic_epi32(a, b, c, 0x96)
#define CH(e, f, g) _mm512_ternarylogic_epi32(e, f, g, 0xCA)
#define MAJ(a, b, c) _mm512_ternarylogic_epi32(a, b, c, 0xE8)
#define ZS0(x) XOR3(ZROR(x, 7), ZROR(x, 18), _mm512_srli_epi32(x, 3))
#define ZS1(x) XOR3(ZROR(x, 17), ZROR(x, 19), _mm512_srli_epi32(x, 10))
#define ZB0(x) XOR3(ZROR(x, 2), ZROR(x, 13), ZROR(x, 22))
#define ZB1(x) XOR3(ZROR(x, 6), ZROR(x, 11), ZROR(x, 25))

/* One round; wk = W[t] + K[t] for all lanes. Rotates the roles of a..h by
 * renaming instead of moving: the caller passes them in rotated order. */
#define ZRND(a, b, c, d, e, f, g, h, wk)                                                 \
    do {                                                                                 \
        __m512i t1_ = _mm512_add_epi32(_mm512_add_epi32(h, ZB1(e)), _mm512_add_epi32(CH(e, f, g), wk)); \
        d = _mm512_add_epi32(d, t1_);                                                    \
        h = _mm512_add_epi32(t1_, _mm512_add_epi32(ZB0(a), MAJ(a, b, c)));              \
    } while (0)

#define ZRND8(wk0, wk1, wk2, wk3, wk4, wk5, wk6, wk7)   \
    ZRND(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], wk0); \
    ZRND(s[7], s[0], s[1], s[2], s[3], s[4], s[5], s[6], wk1); \
    ZRND(s[6], s[7], s[0], s[1], s[2], s[3], s[4], s[5], wk2); \
    ZRND(s[5], s[6], s[7], s[0], s[1], s[2], s[3], s[4], wk3); \
    ZRND(s[4], s[5], s[6], s[7], s[0], s[1], s[2], s[3], wk4); \
    ZRND(s[3], s[4], s[5], s[6], s[7], s[0], s[1], s[2], wk5); \
    ZRND(s[2], s[3], s[4], s[5], s[6], s[7], s[0], s[1], wk6); \
    ZRND(s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[0], wk7)

/* out[0..512) = node(in[64 i .. 64 i + 64)) for i = 0..15. out may alias in. */
AVX512 static void node16_avx512(uint8_t *out, const uint8_t *in) {
    const __m512i bswap = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)BSWAP32));
    __m512i r[16], w[16], s[8];
    for (int i = 0; i < 16; i++) r[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(in + 64 * i), bswap);
    /* 16x16 transpose: w[t] lane i = word t of message i. */
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i x = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88), y = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xDD);
        __m512i x2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88), y2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xDD);
        w[c] = _mm512_shuffle_i32x4(x, x2, 0x88);
        w[8 + c] = _mm512_shuffle_i32x4(x, x2, 0xDD);
        w[4 + c] = _mm512_shuffle_i32x4(y, y2, 0x88);
        w[12 + c] = _mm512_shuffle_i32x4(y, y2, 0xDD);
    }

    for (int i = 0; i < 8; i++) s[i] = _mm512_set1_epi32((int)IV256[i]);
#define WK(t) _mm512_add_epi32(w[(t) & 15], _mm512_set1_epi32((int)K256[t]))
#define WNEXT(t) (w[(t) & 15] = _mm512_add_epi32(_mm512_add_epi32(ZS1(w[((t) - 2) & 15]), w[((t) - 7) & 15]), \
                                                  _mm512_add_epi32(ZS0(w[((t) - 15) & 15]), w[(t) & 15])), WK(t))
    ZRND8(WK(0), WK(1), WK(2), WK(3), WK(4), WK(5), WK(6), WK(7));
    ZRND8(WK(8), WK(9), WK(10), WK(11), WK(12), WK(13), WK(14), WK(15));
    _Pragma("GCC unroll 8") for (int t = 16; t < 64; t += 8) {
        ZRND8(WNEXT(t), WNEXT(t + 1), WNEXT(t + 2), WNEXT(t + 3), WNEXT(t + 4), WNEXT(t + 5), WNEXT(t + 6), WNEXT(t + 7));
    }
#undef WK
#undef WNEXT
    __m512i h[8];
    for (int i = 0; i < 8; i++) h[i] = s[i] = _mm512_add_epi32(s[i], _mm512_set1_epi32((int)IV256[i]));
#define PK(t) _mm512_set1_epi32((int)PAD_WK[t])
    _Pragma("GCC unroll 8") for (int t = 0; t < 64; t += 8) {
        ZRND8(PK(t), PK(t + 1), PK(t + 2), PK(t + 3), PK(t + 4), PK(t + 5), PK(t + 6), PK(t + 7));
    }
#undef PK
    for (int i = 0; i < 8; i++) s[i] = _mm512_add_epi32(s[i], h[i]);
    s[7] = _mm512_and_si512(s[7], _mm512_set1_epi32((int)0xFFFFFF3Fu)); /* truncate to 254 bits */
    for (int i = 0; i < 8; i++) s[i] = _mm512_shuffle_epi8(s[i], bswap);

    /* 8x16 transpose back: node 4L + c is (b[c] lane L) || (b[4 + c] lane L). */
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(s[2 * i], s[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(s[2 * i], s[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        /* lo = (b[c].L0, b[4+c].L0, b[c].L1, b[4+c].L1) = nodes c and 4 + c, each 32 bytes */
        __m512i lo = _mm512_permutex2var_epi64(b[c], _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), b[4 + c]);
        __m512i hi = _mm512_permutex2var_epi64(b[c], _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), b[4 + c]);
        _mm256_storeu_si256((__m256i *)(out + 32 * c), _mm512_castsi512_si256(lo));
        _mm256_storeu_si256((__m256i *)(out + 32 * (4 + c)), _mm512_extracti64x4_epi64(lo, 1));
        _mm256_storeu_si256((__m256i *)(out + 32 * (8 + c)), _mm512_castsi512_si256(hi));
        _mm256_storeu_si256((__m256i *)(out + 32 * (12 + c)), _mm512_extracti64x4_epi64(hi, 1));
    }
}

/* Levels narrower than 16 pairs (the top of each leaf block) go to the best
 * two-operand back end: SHA-NI if present, else portable. */
static level_fn g_avx512_tail = level_portable;

AVX512 static void level_avx512(uint8_t *out, const uint8_t *in, size_t npairs) {
    size_t i = 0;
    for (; i + 16 <= npairs; i += 16) node16_avx512(out + 32 * i, in + 64 * i);
    if (i < npairs) g_avx512_tail(out + 32 * i, in + 64 * i, npairs - i);
}

static int cpu_has_shani(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & bit_SSSE3) || !(c & bit_SSE4_1)) return 0;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 29)) != 0; /* CPUID.(EAX=7,ECX=0):EBX.SHA[bit 29] */
}

/* libgcc's check also confirms the OS saves the AVX-512 state (XCR0). */
static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#endif /* COMMP_X86 */

/* ------------------------------------------------------------------------- */
/* fr32 expansion and subtree roots                                           */

static inline uint64_t ld64le(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
#endif
}

static inline void st64le(uint8_t *p, uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, 8);
#else
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
#endif
}

/* 127 raw bytes -> 128 padded bytes: the 1016 input bits, read little-endian, are
 * cut into four 254-bit quanta starting at bits 0, 254, 508 and 762 (bytes 0,
 * 31 + 6 bits, 63 + 4 bits, 95 + 2 bits); each quantum fills 32 bytes whose top
 * two bits are zero. No read goes past in[126]. */
static inline void fr32_expand(uint8_t *out, const uint8_t *in) {
    for (int j = 0; j < 4; j++) st64le(out + 8 * j, ld64le(in + 8 * j));
    out[31] &= 0x3f;
    for (int j = 0; j < 4; j++)
        st64le(out + 32 + 8 * j, ld64le(in + 31 + 8 * j) >> 6 | ld64le(in + 39 + 8 * j) << 58);
    out[63] &= 0x3f;
    for (int j = 0; j < 4; j++)
        st64le(out + 64 + 8 * j, ld64le(in + 63 + 8 * j) >> 4 | ld64le(in + 71 + 8 * j) << 60);
    out[95] &= 0x3f;
    for (int j = 0; j < 3; j++)
        st64le(out + 96 + 8 * j, ld64le(in + 95 + 8 * j) >> 2 | ld64le(in + 103 + 8 * j) << 62);
    st64le(out + 120, ld64le(in + 119) >> 2); /* top two bits come out zero */
}

/* Root of 2^k groups (k <= BLK_K), using buf (128 << BLK_K bytes) as scratch. */
static void block_root(const uint8_t *data, unsigned k, uint8_t *buf, level_fn lv, uint8_t *out) {
    size_t groups = (size_t)1 << k;
    for (size_t g = 0; g < groups; g++) fr32_expand(buf + PAD_GROUP * g, data + RAW_GROUP * g);
    for (size_t n = groups * 4; n > 1; n /= 2) lv(buf, buf, n / 2);
    memcpy(out, buf, 32);
}

/* Root (height k + 2) of exactly 127 << k raw bytes. */
static void root_full(const uint8_t *data, unsigned k, level_fn lv, uint8_t *out) {
    uint8_t buf[PAD_GROUP << BLK_K] __attribute__((aligned(64)));
    if (k <= BLK_K) {
        block_root(data, k, buf, lv, out);
        return;
    }
    /* Blocks left to right; pend[j] holds a left sibling waiting at block level j,
     * with room for its right sibling so the pair hashes in place. */
    uint8_t pend[MAX_K + 1][64] __attribute__((aligned(16)));
    uint8_t r[32];
    size_t nblocks = (size_t)1 << (k - BLK_K);
    for (size_t b = 0; b < nblocks; b++) {
        block_root(data + b * ((size_t)RAW_GROUP << BLK_K), BLK_K, buf, lv, r);
        unsigned j = 0;
        while ((b >> j) & 1) {
            memcpy(pend[j] + 32, r, 32);
            lv(r, pend[j], 1);
            j++;
        }
        memcpy(pend[j], r, 32);
    }
    memcpy(out, pend[k - BLK_K], 32);
}

/* Root (height k + 2) of len <= 127 << k raw bytes followed by zeros. */
static void root_partial(const uint8_t *data, size_t len, unsigned k, level_fn lv, uint8_t *out) {
    size_t full = (size_t)RAW_GROUP << k;
    if (len == 0) {
        memcpy(out, ZERO_ROOT[k + 2], 32);
    } else if (len == full) {
        root_full(data, k, lv, out);
    } else if (k == 0) {
        uint8_t group[RAW_GROUP] = {0};
        uint8_t buf[PAD_GROUP] __attribute__((aligned(64)));
        memcpy(group, data, len);
        block_root(group, 0, buf, lv, out);
    } else {
        uint8_t pair[64] __attribute__((aligned(16)));
        size_t half = full / 2;
        if (len <= half) {
            root_partial(data, len, k - 1, lv, pair);
            memcpy(pair + 32, ZERO_ROOT[k + 1], 32);
        } else {
            root_full(data, k - 1, lv, pair);
            root_partial(data + half, len - half, k - 1, lv, pair + 32);
        }
        lv(out, pair, 1);
    }
}

/* ------------------------------------------------------------------------- */
/* Implementation selection and threads                                       */

typedef struct {
    const char *name;
    level_fn fn;
    int available;
} impl_t;

enum { IMPL_PORTABLE, IMPL_SHANI, IMPL_AVX512, N_IMPLS };
static impl_t g_impls[N_IMPLS] = {
    {"portable", level_portable, 1},
#ifdef COMMP_X86
    {"shani", level_shani, 0},
    {"avx512", level_avx512, 0},
#else
    {"shani", NULL, 0},
    {"avx512", NULL, 0},
#endif
};
static int g_impl = IMPL_PORTABLE; /* index into g_impls */
static int g_auto_impl = IMPL_PORTABLE;
static int g_threads = 1;

static level_fn current_level_fn(void) { return g_impls[g_impl].fn; }

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The fastest available back end on this machine, timed on 1024 pairs (~64 KiB,
 * a few hundred microseconds in all). Only speed depends on the choice. */
static int calibrate(void) {
    static uint8_t in[64 * 1024], out[32 * 1024];
    for (size_t i = 0; i < sizeof in; i++) in[i] = (uint8_t)(i * 131 + 7);
    int best = IMPL_PORTABLE;
    double best_t = 1e30;
    for (int m = 0; m < N_IMPLS; m++) {
        if (!g_impls[m].available) continue;
        double t_min = 1e30;
        for (int rep = 0; rep < 5; rep++) {
            double t0 = now_seconds();
            g_impls[m].fn(out, in, sizeof in / 64);
            double t = now_seconds() - t0;
            if (t < t_min) t_min = t;
        }
        if (t_min < best_t) {
            best_t = t_min;
            best = m;
        }
    }
    return best;
}

typedef struct {
    const uint8_t *data;
    size_t item_raw;
    unsigned item_k;
    size_t start, end;
    uint8_t *out;
    level_fn lv;
} job_t;

static void *job_run(void *arg) {
    job_t *j = (job_t *)arg;
    for (size_t i = j->start; i < j->end; i++) root_full(j->data + i * j->item_raw, j->item_k, j->lv, j->out + 32 * i);
    return NULL;
}

/* Roots of n units of 127 << k bytes each. Each unit is cut into 2^s items so the
 * items divide evenly over the threads; each thread takes a contiguous run of
 * items, then the item roots of each unit are folded. Runs without the GIL. */
static int roots_parallel(const uint8_t *data, size_t n, unsigned k, uint8_t *out, level_fn lv) {
    size_t unit_raw = (size_t)RAW_GROUP << k;
    size_t total = n * unit_raw;
    size_t nthreads = (size_t)g_threads;
    size_t by_size = total / (256 * 1024); /* no point in threads for tiny inputs */
    if (nthreads > by_size) nthreads = by_size;
    if (nthreads < 1) nthreads = 1;

    unsigned s = 0;
    if (nthreads > 1) {
        while (s < k && !((n << s) % nthreads == 0 && (n << s) >= 2 * nthreads) && (n << s) < 16 * nthreads) s++;
    }
    size_t items = n << s;
    uint8_t *item_out = out;
    if (s) {
        item_out = (uint8_t *)malloc(items * 32);
        if (!item_out) return -1;
    }

    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (size_t t = 0; t < nthreads; t++) {
        jobs[t].data = data;
        jobs[t].item_raw = unit_raw >> s;
        jobs[t].item_k = k - s;
        jobs[t].start = items * t / nthreads;
        jobs[t].end = items * (t + 1) / nthreads;
        jobs[t].out = item_out;
        jobs[t].lv = lv;
    }
    /* Thread 0's share runs on the calling thread; a worker that cannot be
     * started has its share done inline too. */
    for (size_t t = 1; t < nthreads; t++) started[t] = pthread_create(&tids[t], NULL, job_run, &jobs[t]) == 0;
    job_run(&jobs[0]);
    for (size_t t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            job_run(&jobs[t]);
    }

    if (s) {
        size_t per = (size_t)1 << s;
        for (size_t u = 0; u < n; u++) {
            uint8_t *p = item_out + u * per * 32;
            for (size_t m = per; m > 1; m /= 2) lv(p, p, m / 2);
            memcpy(out + 32 * u, p, 32);
        }
        free(item_out);
    }
    return 0;
}

static int default_threads(void) {
    long n = 0;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 0) n = 1;
    if (n > 16) n = 16;
    return (int)n;
}

/* ------------------------------------------------------------------------- */
/* Python bindings                                                            */

static PyObject *py_subtree_roots(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    int k;
    if (!PyArg_ParseTuple(args, "y*i:subtree_roots", &view, &k)) return NULL;
    if (k < 0 || k > MAX_K) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "subtree_roots: k must be 0..%d, got %d", MAX_K, k);
    }
    size_t unit = (size_t)RAW_GROUP << k;
    size_t len = (size_t)view.len;
    if (len == 0 || len % unit) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "subtree_roots: length %zd is not a positive multiple of 127 << %d",
                            view.len, k);
    }
    size_t n = len / unit;
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 32));
    if (!result) {
        PyBuffer_Release(&view);
        return NULL;
    }
    level_fn lv = current_level_fn();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = roots_parallel((const uint8_t *)view.buf, n, (unsigned)k, (uint8_t *)PyBytes_AS_STRING(result), lv);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    return result;
}

static PyObject *py_root(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    int k;
    if (!PyArg_ParseTuple(args, "y*i:root", &view, &k)) return NULL;
    if (k < 0 || k > MAX_K) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "root: k must be 0..%d, got %d", MAX_K, k);
    }
    if ((size_t)view.len > ((size_t)RAW_GROUP << k)) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "root: length %zd exceeds 127 << %d", view.len, k);
    }
    uint8_t out[32];
    level_fn lv = current_level_fn();
    Py_BEGIN_ALLOW_THREADS
    root_partial((const uint8_t *)view.buf, (size_t)view.len, (unsigned)k, lv, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *py_node(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*:node", &view)) return NULL;
    if (view.len != 64) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "node: need 64 bytes, got %zd", view.len);
    }
    uint8_t out[32];
    current_level_fn()(out, (const uint8_t *)view.buf, 1);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *py_set_impl(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_impl", &name)) return NULL;
    if (!strcmp(name, "auto")) {
        g_impl = g_auto_impl;
        Py_RETURN_NONE;
    }
    for (int m = 0; m < N_IMPLS; m++) {
        if (strcmp(name, g_impls[m].name)) continue;
        if (!g_impls[m].available)
            return PyErr_Format(PyExc_ValueError, "set_impl: %s is not available on this CPU", name);
        g_impl = m;
        Py_RETURN_NONE;
    }
    return PyErr_Format(PyExc_ValueError, "set_impl: unknown implementation %R (auto, avx512, shani, portable)",
                        PyTuple_GET_ITEM(args, 0));
}

static PyObject *py_impl(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(g_impls[g_impl].name);
}

static PyObject *py_available_impls(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int m = 0; m < N_IMPLS; m++) {
        if (!g_impls[m].available) continue;
        PyObject *name = PyUnicode_FromString(g_impls[m].name);
        if (!name || PyList_Append(list, name)) {
            Py_XDECREF(name);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(name);
    }
    return list;
}

static PyObject *py_set_avx512_tail(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:_set_avx512_tail", &name)) return NULL;
    for (int m = IMPL_PORTABLE; m <= IMPL_SHANI; m++) {
        if (!strcmp(name, g_impls[m].name) && g_impls[m].available) {
#ifdef COMMP_X86
            g_avx512_tail = g_impls[m].fn;
#endif
            Py_RETURN_NONE;
        }
    }
    return PyErr_Format(PyExc_ValueError, "_set_avx512_tail: %s is not an available two-operand back end", name);
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    (void)self;
    int n;
    if (!PyArg_ParseTuple(args, "i:set_threads", &n)) return NULL;
    if (n == 0) n = default_threads();
    if (n < 1 || n > MAX_THREADS)
        return PyErr_Format(PyExc_ValueError, "set_threads: need 1..%d (0 = default), got %d", MAX_THREADS, n);
    g_threads = n;
    Py_RETURN_NONE;
}

static PyObject *py_threads(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(g_threads);
}

static PyMethodDef methods[] = {
    {"subtree_roots", py_subtree_roots, METH_VARARGS,
     "subtree_roots(data, k) -> bytes: 32-byte root of each consecutive 127 << k byte slice."},
    {"root", py_root, METH_VARARGS,
     "root(data, k) -> bytes: root of the 128 << k padded subtree over data (<= 127 << k bytes) plus zeros."},
    {"node", py_node, METH_VARARGS, "node(left_right) -> bytes: sha256-trunc254 of 64 bytes."},
    {"set_impl", py_set_impl, METH_VARARGS,
     "set_impl(name): 'auto' (fastest, measured at import), 'avx512', 'shani' or 'portable'."},
    {"impl", py_impl, METH_NOARGS, "impl() -> str: the SHA-256 back end in use."},
    {"available_impls", py_available_impls, METH_NOARGS, "available_impls() -> list[str]: back ends this CPU runs."},
    {"_set_avx512_tail", py_set_avx512_tail, METH_VARARGS, "test hook: 'shani' or 'portable'."},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): worker threads (0 = one per CPU, max 16)."},
    {"threads", py_threads, METH_NOARGS, "threads() -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_commp", "fr32 + sha256-trunc254 tree kernel for piece commitments.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__commp(void) {
    uint32_t w[64] = {0};
    w[0] = 0x80000000u;
    w[15] = 512;
    schedule(w);
    for (int i = 0; i < 64; i++) PAD_WK[i] = w[i] + K256[i];

    memset(ZERO_ROOT[0], 0, 32);
    for (int h = 1; h < MAX_K + 3; h++) {
        uint8_t pair[64];
        memcpy(pair, ZERO_ROOT[h - 1], 32);
        memcpy(pair + 32, ZERO_ROOT[h - 1], 32);
        node_portable(ZERO_ROOT[h], pair);
    }

#ifdef COMMP_X86
    g_impls[IMPL_SHANI].available = cpu_has_shani();
    g_impls[IMPL_AVX512].available = cpu_has_avx512();
    if (g_impls[IMPL_SHANI].available) g_avx512_tail = level_shani;
#endif
    g_auto_impl = calibrate();
    g_impl = g_auto_impl;
    const char *env = getenv("PACKERFS_COMMP_IMPL"); /* force a back end, e.g. for debugging */
    if (env && *env && strcmp(env, "auto")) {
        for (int m = 0; m < N_IMPLS; m++)
            if (!strcmp(env, g_impls[m].name) && g_impls[m].available) g_impl = m;
    }
    g_threads = default_threads();
    return PyModule_Create(&module);
}
