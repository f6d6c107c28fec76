// Flash attention, forward and backward, in the FlashAttention-2 arrangement (arXiv 2307.08691):
// a block owns 64 rows, each of its 4 warps 16 of them, and streams the other operand through
// shared memory in 64-row tiles (cp.async, double-buffered); scores live only in registers.
// CPU twins: src/ops/attention.rs (attention_forward / attention_backward and their masked form).
//
//   forward   S = Q·Kᵀ (scaled, log2 units), online softmax (running max m, sum l), O += P·V;
//             O /= l; LSE = ln2·(m + log2 l)
//   backward  delta = rowsum(dO ∘ O)                                   (fk_attn_bwd_prep)
//             per key tile, looping over query tiles:                   (fk_attn_bwd_dkdv)
//               Sᵀ = K·Qᵀ, Pᵀ = exp(Sᵀ − LSE), dV += Pᵀ·dO, dPᵀ = V·dOᵀ,
//               dSᵀ = Pᵀ ∘ (dPᵀ − delta), dK += dSᵀ·Q
//             per query tile, looping over key tiles:                   (fk_attn_bwd_dq)
//               S, P as above, dP = dO·Vᵀ, dS = P ∘ (dP − delta), dQ += dS·K
// Splitting dQ into its own pass recomputes S and dP once more (14 instead of 10 units of
// 2·l²·d FLOPs) but needs no atomics, so the gradients are bitwise reproducible.
//
// Fragment bookkeeping (PTX ISA mma.m16n8k16): the f32 accumulator of two adjacent n8 tiles is,
// element for element, the A fragment of the next product (the FA2 register trick), so P and dS
// go from one mma to the next without touching shared memory. Every warp computes its rows in
// the transposed frame where that makes the reused operand an A fragment (dK/dV kernel: rows are
// keys).
//
// Also here, the attention's layout work (fk_model_qk_*, fk_model_merge_heads*): the prologue
// between the qkv linear and the flash kernels (QK-RMSNorm per head, RoPE, token-major f32 to
// head-major bf16; CPU twin model::attention::attention_block) with its backward, and the merge
// of the heads back to token-major rows for the output projection.
#include "common.cuh"

static_assert(sizeof(FkAttnParams) == FK_SIZEOF_FkAttnParams, "abi.h: FkAttnParams size");
static_assert(sizeof(FkSoftmaxParams) == FK_SIZEOF_FkSoftmaxParams, "abi.h: FkSoftmaxParams size");
static_assert(sizeof(FkModelQkParams) == FK_SIZEOF_FkModelQkParams, "abi.h: FkModelQkParams size");
static_assert(sizeof(FkModelHeadsParams) == FK_SIZEOF_FkModelHeadsParams, "abi.h: FkModelHeadsParams size");

// A named namespace: the CPU emulation compiles every .cu into one translation unit.
namespace fk_attn {

constexpr int THREADS = FK_ATTN_THREADS;
constexpr int BLK = FK_ATTN_BLOCK;  // rows per block and rows per streamed tile
constexpr int PAD = FK_ATTN_PAD;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
static_assert(THREADS == 128 && BLK == 64, "4 warps × 16 rows");

using fk::neg_inf;
using fk::pack_bf16;
using fk::pos_inf;
using fk::quad_max;
using fk::quad_sum;

// Rows [r0, r0 + ROWS) of a row-major [l][D] bf16 matrix into shared [ROWS][D + PAD]; rows past
// the end read as zero, so ragged tiles need no special case in the products.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t r0, int64_t l) {
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        uint16_t* dst = s + r * (D + PAD) + c;
        if (r0 + r < l) {
            cp_async_16(dst, g + (r0 + r) * D + c);
        } else {
            uint32_t* z = reinterpret_cast<uint32_t*>(dst);
            z[0] = z[1] = z[2] = z[3] = 0;
        }
    }
}

// A fragment (16×16) of a row-major shared tile: rows r0.., columns c0...
__device__ __forceinline__ void ld_a(uint32_t (&a)[4], const uint16_t* s, int ld, int r0, int c0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(a, s + (r0 + lane % 16) * ld + c0 + (lane / 16) * 8);
}
// B fragments of two n8 tiles (n0.. and n0+8..) × k16 from a tile stored [n][k]:
// b[0], b[1] for the first, b[2], b[3] for the second.
__device__ __forceinline__ void ld_b_nk(uint32_t (&b)[4], const uint16_t* s, int ld, int n0, int k0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(b, s + (n0 + lane % 8 + (lane / 16) * 8) * ld + k0 + ((lane / 8) % 2) * 8);
}
// The same from a tile stored [k][n] (transposing load).
__device__ __forceinline__ void ld_b_kn(uint32_t (&b)[4], const uint16_t* s, int ld, int k0, int n0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4_trans(b, s + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * ld + n0 + (lane / 16) * 8);
}
// Accumulator tiles c0 (columns 0–7) and c1 (8–15) as the A fragment of a k16 step.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// acc[N/8][4] += A(16 rows at r0 of sa, D wide)·B(N rows at 0 of sb, stored [n][k])ᵀ.
template <int D, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const uint16_t* sa, int r0, const uint16_t* sb) {
    constexpr int LD = D + PAD;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ld_a(a, sa, LD, r0, kk * 16);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t b[4];
            ld_b_nk(b, sb, LD, np * 16, kk * 16);
            mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
            mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// acc[D/8][4] += P(16 × K, accumulator tiles)·B(K rows of sb, stored [k][n], D wide).
template <int D, int K>
__device__ __forceinline__ void mma_pb(float (&acc)[D / 8][4], const float (&p)[K / 8][4], const uint16_t* sb) {
    constexpr int LD = D + PAD;
#pragma unroll
    for (int kj = 0; kj < K / 16; ++kj) {
        uint32_t a[4];
        acc_to_a(a, p[2 * kj], p[2 * kj + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ld_b_kn(b, sb, LD, kj * 16, dp * 16);
            mma_bf16_16816(acc[2 * dp], a, b[0], b[1]);
            mma_bf16_16816(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}


__device__ __forceinline__ bool key_kept(const FkAttnParams& p, const unsigned char* mask, int64_t n) {
    return n < p.l && (mask == nullptr || mask[n] != 0);
}

// One (batch, head)'s [l][d] slices of Q, K, V and dO, and its batch element's key-mask row.
struct Head {
    const uint16_t *q, *k, *v, *dout;
    const unsigned char* mask;
};
__device__ __forceinline__ Head head_of(const FkAttnParams& p, int64_t bh, int d) {
    const int64_t off = bh * p.l * d;
    return Head{static_cast<const uint16_t*>(p.q) + off, static_cast<const uint16_t*>(p.k) + off,
                static_cast<const uint16_t*>(p.v) + off,
                p.dout ? static_cast<const uint16_t*>(p.dout) + off : nullptr,
                p.kv_mask ? static_cast<const unsigned char*>(p.kv_mask) + (bh / p.h) * p.l : nullptr};
}

// Bit 2·nt + e: this lane's key column nt·8 + 2t + e of the N keys from n0 takes part. One word
// instead of N/4 predicates (registers are scarce at MI = 2), and the per-key test only where a
// tile is masked or ragged: testing every element cost 31 % of the forward on an H200 (run 3).
template <int N>
__device__ __forceinline__ uint32_t key_bits(const FkAttnParams& p, const unsigned char* mask, int64_t n0, int t) {
    static_assert(N / 4 <= 32, "one bit per key column of the lane");
    uint32_t kept = 0xffffffffu;
    if (mask != nullptr || n0 + N > p.l) {
#pragma unroll
        for (int c = 0; c < N / 4; ++c)
            if (!key_kept(p, mask, n0 + (c / 2) * 8 + 2 * t + (c & 1))) kept &= ~(1u << c);
    }
    return kept;
}

// Starts loading K/V tile j + 1 into the other buffer, then waits for tile j (double buffering;
// the previous iteration's closing barrier freed the other buffer).
template <int D>
__device__ __forceinline__ void next_kv_tile(uint16_t* ks, uint16_t* vs, const uint16_t* k, const uint16_t* v, int j,
                                             int tiles, int64_t l) {
    constexpr int LD = D + PAD;
    const int other = (j & 1) ^ 1;
    if (j + 1 < tiles) {
        load_tile<BLK, D>(ks + other * BLK * LD, k, (int64_t)(j + 1) * BLK, l);
        load_tile<BLK, D>(vs + other * BLK * LD, v, (int64_t)(j + 1) * BLK, l);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
}

// Stores a warp's 16 × D accumulator (times row_scale[half]) as bf16 rows r0.. of a [l][D] matrix.
template <int D>
__device__ __forceinline__ void store_rows(uint16_t* out, int64_t l, int64_t r0, const float (&acc)[D / 8][4],
                                           const float (&row_scale)[2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t row = r0 + g + 8 * half;
        if (row >= l) continue;
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + row * D + 2 * t);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            dst[dt * 4] = pack_bf16(acc[dt][2 * half] * row_scale[half], acc[dt][2 * half + 1] * row_scale[half]);
    }
}

// MI: m16 row groups per warp, so a block owns 64·MI query rows. MI = 2 (FlashAttention-2's
// 128 × 64 tile for head dim 128) reuses every K and V fragment read from shared memory for two
// row groups, halving the shared-memory traffic per mma, and halves the K/V tiles each block
// streams from L2; it holds twice the accumulators, so Q is read from shared memory per step
// rather than kept in registers.
template <int D, int MI>
__host__ __device__ constexpr int fwd_smem() {
    return (MI * BLK + 4 * BLK) * (D + PAD) * 2;  // Q, K ×2, V ×2
}
template <int D>
__host__ __device__ constexpr int dkdv_smem() {
    return 6 * BLK * (D + PAD) * 2 + 4 * BLK * 4;  // K, V, Q ×2, dO ×2; LSE, delta ×2
}
template <int D>
__host__ __device__ constexpr int dq_smem() {
    return 6 * BLK * (D + PAD) * 2;  // Q, dO, K ×2, V ×2
}

template <int D, int MI>
__device__ void attn_fwd(const FkAttnParams& p) {
    constexpr int LD = D + PAD, BM = MI * BLK, BN = MI == 1 ? BLK : BLK / 2;
    FK_DYNAMIC_SMEM(smem);
    if (dynamic_smem_bytes() < (uint32_t)fwd_smem<D, MI>()) __trap();
    uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
    uint16_t* ks = qs + BM * LD;       // [2][BLK][LD]
    uint16_t* vs = ks + 2 * BLK * LD;  // [2][BLK][LD]

    const int64_t l = p.l, bh = blockIdx.y, m0 = (int64_t)blockIdx.x * BM;
    const Head hd = head_of(p, bh, D);
    const uint16_t *q = hd.q, *k = hd.k, *v = hd.v;
    const unsigned char* mask = hd.mask;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
    const int wrow = warp * 16 * MI;  // this warp's first row within the block
    const float sl2 = p.scale * LOG2E;
    const int tiles = (int)((l + BLK - 1) / BLK);

    load_tile<BM, D>(qs, q, m0, l);
    load_tile<BLK, D>(ks, k, 0, l);
    load_tile<BLK, D>(vs, v, 0, l);
    cp_async_commit();

    float o[MI][D / 8][4];
    float m_run[MI][2], l_run[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        zero(o[mi]);
        m_run[mi][0] = m_run[mi][1] = neg_inf();
        l_run[mi][0] = l_run[mi][1] = 0.0f;
    }

    for (int j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        next_kv_tile<D>(ks, vs, k, v, j, tiles, l);
        // Keys are consumed BN at a time within each loaded tile (an online-softmax step each):
        // at MI = 2, 32-key steps keep the score registers to 32 and the kernel out of local memory.
#pragma unroll 1
        for (int sub = 0; sub < BLK / BN; ++sub) {
            const uint16_t* kb = ks + buf * BLK * LD + sub * BN * LD;
            const uint16_t* vb = vs + buf * BLK * LD + sub * BN * LD;

            float s[MI][BN / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) zero(s[mi]);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t a[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) ld_a(a[mi], qs, LD, wrow + mi * 16, kk * 16);
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    uint32_t b[4];
                    ld_b_nk(b, kb, LD, np * 16, kk * 16);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma_bf16_16816(s[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16_16816(s[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }

            // Online softmax in base 2: a masked or missing key scores −∞.
            const int64_t n0 = (int64_t)j * BLK + sub * BN;
            const uint32_t kept = key_bits<BN>(p, mask, n0, t);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                float mx[2] = {m_run[mi][0], m_run[mi][1]};
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[mi][nt][e] = (kept >> (2 * nt + (e & 1))) & 1u ? s[mi][nt][e] * sl2 : neg_inf();
                        mx[e / 2] = fmaxf(mx[e / 2], s[mi][nt][e]);
                    }
                float base[2], corr[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    mx[h] = quad_max(mx[h]);
                    // A row that has seen no key yet keeps a zero base, so exp2(−∞ − base) = 0, not NaN.
                    base[h] = mx[h] == neg_inf() ? 0.0f : mx[h];
                    corr[h] = fast_exp2(m_run[mi][h] - base[h]);
                    m_run[mi][h] = mx[h];
                }
                float rs[2] = {0.0f, 0.0f};
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[mi][nt][e] = fast_exp2(s[mi][nt][e] - base[e / 2]);
                        rs[e / 2] += s[mi][nt][e];
                    }
#pragma unroll
                for (int h = 0; h < 2; ++h) l_run[mi][h] = l_run[mi][h] * corr[h] + rs[h];
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[mi][dt][e] *= corr[e / 2];
            }

            // O += P·V, each V fragment used by every row group.
#pragma unroll
            for (int kj = 0; kj < BN / 16; ++kj) {
                uint32_t a[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) acc_to_a(a[mi], s[mi][2 * kj], s[mi][2 * kj + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b[4];
                    ld_b_kn(b, vb, LD, kj * 16, dp * 16);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma_bf16_16816(o[mi][2 * dp], a[mi], b[0], b[1]);
                        mma_bf16_16816(o[mi][2 * dp + 1], a[mi], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
    }
    cp_async_wait<0>();  // the last (empty) group: nothing may be left in flight at exit

#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l_run[mi][h] = quad_sum(l_run[mi][h]);
            inv[h] = l_run[mi][h] > 0.0f ? 1.0f / l_run[mi][h] : 0.0f;
        }
        const int64_t r0 = m0 + wrow + mi * 16;
        store_rows<D>(static_cast<uint16_t*>(p.o) + bh * l * D, l, r0, o[mi], inv);
        if (t == 0) {
            float* lse = static_cast<float*>(p.lse) + bh * l;
            const int g = lane / 4;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = r0 + g + 8 * h;
                if (row < l)
                    lse[row] = l_run[mi][h] > 0.0f ? (m_run[mi][h] + log2f(l_run[mi][h])) * LN2 : pos_inf();
            }
        }
    }
}

// Loads LSE (in log2 units, +∞ past the end) and delta for query rows [r0, r0 + BLK).
__device__ __forceinline__ void load_row_stats(float* lse2, float* dl, const FkAttnParams& p, int64_t bh,
                                               int64_t r0) {
    const float* lse = static_cast<const float*>(p.lse) + bh * p.l;
    const float* delta = static_cast<const float*>(p.delta) + bh * p.l;
    for (int i = threadIdx.x; i < BLK; i += THREADS) {
        const int64_t r = r0 + i;
        lse2[i] = r < p.l ? lse[r] * LOG2E : pos_inf();
        dl[i] = r < p.l ? delta[r] : 0.0f;
    }
}

template <int D>
__device__ void attn_bwd_dkdv(const FkAttnParams& p) {
    constexpr int LD = D + PAD;
    FK_DYNAMIC_SMEM(smem);
    if (dynamic_smem_bytes() < (uint32_t)dkdv_smem<D>()) __trap();
    uint16_t* ks = reinterpret_cast<uint16_t*>(smem);
    uint16_t* vs = ks + BLK * LD;
    uint16_t* qs = vs + BLK * LD;        // [2][BLK][LD]
    uint16_t* dos = qs + 2 * BLK * LD;   // [2][BLK][LD]
    float* lse2_s = reinterpret_cast<float*>(dos + 2 * BLK * LD);  // [2][BLK]
    float* dl_s = lse2_s + 2 * BLK;                                // [2][BLK]

    const int64_t l = p.l, bh = blockIdx.y, n0 = (int64_t)blockIdx.x * BLK;
    const Head hd = head_of(p, bh, D);
    const uint16_t *q = hd.q, *k = hd.k, *v = hd.v;
    const unsigned char* mask = hd.mask;
    const uint16_t* dout = hd.dout;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = p.scale * LOG2E;
    const int tiles = (int)((l + BLK - 1) / BLK);
    // This lane's two key rows: a masked or missing key has P = 0 against every query.
    const bool kept[2] = {key_kept(p, mask, n0 + warp * 16 + g), key_kept(p, mask, n0 + warp * 16 + g + 8)};

    load_tile<BLK, D>(ks, k, n0, l);
    load_tile<BLK, D>(vs, v, n0, l);
    load_tile<BLK, D>(qs, q, 0, l);
    load_tile<BLK, D>(dos, dout, 0, l);
    load_row_stats(lse2_s, dl_s, p, bh, 0);
    cp_async_commit();

    float dk[D / 8][4], dv[D / 8][4];
    zero(dk);
    zero(dv);
    for (int i = 0; i < tiles; ++i) {
        const int buf = i & 1;
        if (i + 1 < tiles) {
            const int64_t r1 = (int64_t)(i + 1) * BLK;
            load_tile<BLK, D>(qs + (buf ^ 1) * BLK * LD, q, r1, l);
            load_tile<BLK, D>(dos + (buf ^ 1) * BLK * LD, dout, r1, l);
            load_row_stats(lse2_s + (buf ^ 1) * BLK, dl_s + (buf ^ 1) * BLK, p, bh, r1);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const uint16_t* qb = qs + buf * BLK * LD;
        const uint16_t* dob = dos + buf * BLK * LD;
        const float* lse2 = lse2_s + buf * BLK;
        const float* dl = dl_s + buf * BLK;

        // Queries in steps of BQ = 32 within the loaded tile: the Pᵀ and dPᵀ registers halve
        // (dK and dV already hold 128), which keeps the kernel out of local memory.
        constexpr int BQ = BLK / 2;
#pragma unroll 1
        for (int sub = 0; sub < BLK / BQ; ++sub) {
            const uint16_t* qsub = qb + sub * BQ * LD;
            const uint16_t* dosub = dob + sub * BQ * LD;
            const float* lse2s = lse2 + sub * BQ;
            const float* dls = dl + sub * BQ;
            // Pᵀ (rows: this warp's keys; columns: the step's queries).
            float pt[BQ / 8][4];
            zero(pt);
            mma_abt<D, BQ>(pt, ks, warp * 16, qsub);
#pragma unroll
            for (int qt = 0; qt < BQ / 8; ++qt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = qt * 8 + 2 * t + (e & 1);
                    pt[qt][e] = kept[e / 2] ? fast_exp2(pt[qt][e] * sl2 - lse2s[c]) : 0.0f;
                }
            mma_pb<D, BQ>(dv, pt, dosub);  // dV += Pᵀ·dO

            float dpt[BQ / 8][4];  // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − delta)
            zero(dpt);
            mma_abt<D, BQ>(dpt, vs, warp * 16, dosub);
#pragma unroll
            for (int qt = 0; qt < BQ / 8; ++qt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = qt * 8 + 2 * t + (e & 1);
                    dpt[qt][e] = pt[qt][e] * (dpt[qt][e] - dls[c]);
                }
            mma_pb<D, BQ>(dk, dpt, qsub);  // dK += dSᵀ·Q
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    const float ks_scale[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
    const int64_t r0 = n0 + warp * 16;
    store_rows<D>(static_cast<uint16_t*>(p.dk) + bh * l * D, l, r0, dk, ks_scale);
    store_rows<D>(static_cast<uint16_t*>(p.dv) + bh * l * D, l, r0, dv, one);
}

template <int D>
__device__ void attn_bwd_dq(const FkAttnParams& p) {
    constexpr int LD = D + PAD;
    FK_DYNAMIC_SMEM(smem);
    if (dynamic_smem_bytes() < (uint32_t)dq_smem<D>()) __trap();
    uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
    uint16_t* dos = qs + BLK * LD;
    uint16_t* ks = dos + BLK * LD;      // [2][BLK][LD]
    uint16_t* vs = ks + 2 * BLK * LD;   // [2][BLK][LD]

    const int64_t l = p.l, bh = blockIdx.y, m0 = (int64_t)blockIdx.x * BLK;
    const Head hd = head_of(p, bh, D);
    const uint16_t *q = hd.q, *k = hd.k, *v = hd.v;
    const unsigned char* mask = hd.mask;
    const uint16_t* dout = hd.dout;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = p.scale * LOG2E;
    const int tiles = (int)((l + BLK - 1) / BLK);
    const int64_t r0 = m0 + warp * 16;
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + g + 8 * h;
        lse2[h] = r < l ? static_cast<const float*>(p.lse)[bh * l + r] * LOG2E : pos_inf();
        dl[h] = r < l ? static_cast<const float*>(p.delta)[bh * l + r] : 0.0f;
    }

    load_tile<BLK, D>(qs, q, m0, l);
    load_tile<BLK, D>(dos, dout, m0, l);
    load_tile<BLK, D>(ks, k, 0, l);
    load_tile<BLK, D>(vs, v, 0, l);
    cp_async_commit();

    float dq[D / 8][4];
    zero(dq);
    for (int j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        next_kv_tile<D>(ks, vs, k, v, j, tiles, l);
        const uint16_t* kb = ks + buf * BLK * LD;
        const uint16_t* vb = vs + buf * BLK * LD;
        const int64_t n0 = (int64_t)j * BLK;

        float s[BLK / 8][4];
        zero(s);
        mma_abt<D, BLK>(s, qs, warp * 16, kb);
        const uint32_t kept = key_bits<BLK>(p, mask, n0, t);
#pragma unroll
        for (int nt = 0; nt < BLK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[nt][e] = (kept >> (2 * nt + (e & 1))) & 1u ? fast_exp2(s[nt][e] * sl2 - lse2[e / 2]) : 0.0f;
        float dp[BLK / 8][4];  // dP = dO·Vᵀ, then dS = P ∘ (dP − delta)
        zero(dp);
        mma_abt<D, BLK>(dp, dos, warp * 16, vb);
#pragma unroll
        for (int nt = 0; nt < BLK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - dl[e / 2]);
        mma_pb<D, BLK>(dq, dp, kb);  // dQ += dS·K
        __syncthreads();
    }
    cp_async_wait<0>();
    const float scale[2] = {p.scale, p.scale};
    store_rows<D>(static_cast<uint16_t*>(p.dq) + bh * l * D, l, r0, dq, scale);
}

}  // namespace fk_attn

using namespace fk_attn;

// One entry point per kernel, dispatching on the head dim: the host sizes shared memory for the
// dim it launches, and the register allocation is that of the largest (128), which is the one
// that matters for speed.
#define FK_ATTN_DISPATCH(fn)               \
    switch (p.d) {                         \
        case 16: fn<16>(p); break;         \
        case 32: fn<32>(p); break;         \
        case 64: fn<64>(p); break;         \
        case 128: fn<128>(p); break;       \
        default: __trap();                 \
    }

template <int D>
__device__ __forceinline__ void attn_fwd_main(const FkAttnParams& p) {
    attn_fwd<D, FK_ATTN_FWD_ROWS / BLK>(p);
}
template <int D>
__device__ __forceinline__ void attn_fwd_r64(const FkAttnParams& p) {
    attn_fwd<D, 1>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_attn_fwd(FK_GRID_PARAMS FkAttnParams p) {
    FK_ATTN_DISPATCH(attn_fwd_main)
}
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_attn_fwd_r64(FK_GRID_PARAMS FkAttnParams p) {
    FK_ATTN_DISPATCH(attn_fwd_r64)
}
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_attn_bwd_dkdv(FK_GRID_PARAMS FkAttnParams p) {
    FK_ATTN_DISPATCH(attn_bwd_dkdv)
}
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_attn_bwd_dq(FK_GRID_PARAMS FkAttnParams p) {
    FK_ATTN_DISPATCH(attn_bwd_dq)
}

// delta[row] = Σ_d dO[row, d]·O[row, d] over the bf16 values the other kernels read; one warp
// per row of the flattened [b·h·l] rows.
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_attn_bwd_prep(FK_GRID_PARAMS FkAttnParams p) {
    const int64_t rows = p.b * p.h * p.l;
    const int64_t row = (int64_t)blockIdx.x * (FK_ATTN_THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
    const uint16_t* o = static_cast<const uint16_t*>(p.o) + row * p.d;
    const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + row * p.d;
    float acc = 0.0f;
    for (int64_t i = lane; i < p.d; i += 32) acc += bf16_to_f32(o[i]) * bf16_to_f32(dout[i]);
#pragma unroll
    for (int m = 16; m >= 1; m /= 2) acc += shfl_xor_f32(acc, m);
    if (lane == 0) static_cast<float*>(p.delta)[row] = acc;
}

// The baseline's softmax over one materialised score row (f32 in, bf16 out).
FK_KERNEL void __launch_bounds__(FK_ATTN_THREADS) fk_softmax_rows(FK_GRID_PARAMS FkSoftmaxParams p) {
    FK_DYNAMIC_SMEM(smem);  // FK_ATTN_THREADS / 32 floats: one partial per warp
    float* red = reinterpret_cast<float*>(smem);
    const int64_t row = blockIdx.x;
    const float* s = static_cast<const float*>(p.s) + row * p.l;
    uint16_t* out = static_cast<uint16_t*>(p.p) + row * p.l;
    const unsigned char* mask =
        p.kv_mask ? static_cast<const unsigned char*>(p.kv_mask) + (row / p.rows_per_batch) * p.l : nullptr;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    auto block_reduce = [&](float v, bool is_max) {
        for (int m = 16; m >= 1; m /= 2) {
            const float o = shfl_xor_f32(v, m);
            v = is_max ? fmaxf(v, o) : v + o;
        }
        if (lane == 0) red[warp] = v;
        __syncthreads();
        float r = red[0];
        for (int w = 1; w < FK_ATTN_THREADS / 32; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
        __syncthreads();
        return r;
    };
    float mx = neg_inf();
    for (int64_t i = threadIdx.x; i < p.l; i += FK_ATTN_THREADS)
        if (!mask || mask[i]) mx = fmaxf(mx, s[i]);
    mx = block_reduce(mx, true);
    const float base = mx == neg_inf() ? 0.0f : mx;
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < p.l; i += FK_ATTN_THREADS)
        if (!mask || mask[i]) sum += fast_exp2((s[i] - base) * LOG2E);
    sum = block_reduce(sum, false);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t i = threadIdx.x; i < p.l; i += FK_ATTN_THREADS)
        out[i] = f32_to_bf16((!mask || mask[i]) ? fast_exp2((s[i] - base) * LOG2E) * inv : 0.0f);
}

// ---- the attention prologue: QK-RMSNorm per head, RoPE --------------------------------------

// One warp per (sample, token, head), head fastest so neighbouring warps read neighbouring
// columns of one qkv row. For q and k: pass 1 sums x² in f64 over the head (rmsnorm_forward's
// ms), pass 2 computes y = (x·rstd)·w per element and rotates the pairs (y₂ᵢ, y₂ᵢ₊₁) by the
// token's angle (rope_forward: c·y₀ − s·y₁, s·y₀ + c·y₁), stored bf16. v is a bf16 copy.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_qk_fwd(FK_GRID_PARAMS FkModelQkParams p) {
    const int64_t h = p.h, d = p.d, hd = h * d, half = d / 2;
    fk::warp_stride<FK_MODEL_THREADS>(p.b * p.ls * h, [&](int64_t item, int lane) {
        const int64_t hi = item % h, r = item / h, bi = r / p.ls, t = p.t0 + r % p.ls;
        const bool q16 = p.qkv_bf16 != 0;
        const int64_t row = r * p.ld;  // element offset of this token's qkv row
        const int64_t head_row = (bi * h + hi) * p.l + t;  // row of [b, h, l] / [b, h, l, d]
        const float* cs = static_cast<const float*>(p.cos) + (bi * p.l + t) * half;
        const float* sn = static_cast<const float*>(p.sin) + (bi * p.l + t) * half;
        for (int which = 0; which < 2; ++which) {
            const int64_t x0 = row + which * hd + hi * d;
            auto x = [&](int64_t j) { return fk::load(p.qkv, x0 + j, q16); };
            const float* w = static_cast<const float*>(which == 0 ? p.q_scale : p.k_scale);
            double ss = 0.0;
            for (int64_t j = lane; j < d; j += 32) ss = fk::rn_dadd(ss, fk::rn_dmul((double)x(j), (double)x(j)));
            ss = fk::warp_sum_f64(ss);
            const double ms = fk::rn_ddiv(ss, (double)d);
            const float rs = (float)fk::rn_ddiv(1.0, fk::rn_dsqrt(fk::rn_dadd(ms, (double)p.eps)));
            uint16_t* out = static_cast<uint16_t*>(which == 0 ? p.q : p.k) + head_row * d;
            for (int64_t i = lane; i < half; i += 32) {
                const float y0 = fk::rn_fmul(fk::rn_fmul(x(2 * i), rs), w[2 * i]);
                const float y1 = fk::rn_fmul(fk::rn_fmul(x(2 * i + 1), rs), w[2 * i + 1]);
                const float c = cs[i], s = sn[i];
                out[2 * i] = f32_to_bf16(fk::rn_fsub(fk::rn_fmul(c, y0), fk::rn_fmul(s, y1)));
                out[2 * i + 1] = f32_to_bf16(fk::rn_fadd(fk::rn_fmul(s, y0), fk::rn_fmul(c, y1)));
            }
            if (lane == 0) static_cast<float*>(which == 0 ? p.rstd_q : p.rstd_k)[head_row] = rs;
        }
        const int64_t xv = row + 2 * hd + hi * d;
        uint16_t* v = static_cast<uint16_t*>(p.v) + head_row * d;
        for (int64_t j = lane; j < d; j += 32)
            v[j] = q16 ? static_cast<const uint16_t*>(p.qkv)[xv + j] : f32_to_bf16(fk::load(p.qkv, xv + j, false));
    });
}

// One warp per (sample, token, head). For q and k: g = rope_backward(dq) (the rotation by −θ:
// c·g₀ − s'·g₁, s'·g₀ + c·g₁ with s' = −sin), x̂ = x·rstd, gw = g·w; pass 1 sums gw·x̂ in f64
// (m = Σ/d), pass 2 writes dx = rstd·(gw − x̂·m) (rmsnorm_backward, f64 like it). dv is copied.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_qk_bwd(FK_GRID_PARAMS FkModelQkParams p) {
    const int64_t h = p.h, d = p.d, hd = h * d, half = d / 2;
    fk::warp_stride<FK_MODEL_THREADS>(p.b * p.ls * h, [&](int64_t item, int lane) {
        const int64_t hi = item % h, r = item / h, bi = r / p.ls, t = p.t0 + r % p.ls;
        const bool q16 = p.qkv_bf16 != 0, d16 = p.dqkv_bf16 != 0;
        const int64_t row = r * p.ld;  // element offset of this token's qkv and dqkv rows
        const int64_t head_row = (bi * h + hi) * p.l + t;
        const float* cs = static_cast<const float*>(p.cos) + (bi * p.l + t) * half;
        const float* sn = static_cast<const float*>(p.sin) + (bi * p.l + t) * half;
        for (int which = 0; which < 2; ++which) {
            const int64_t x0 = row + which * hd + hi * d;
            auto x = [&](int64_t j) { return fk::load(p.qkv, x0 + j, q16); };
            const float* w = static_cast<const float*>(which == 0 ? p.q_scale : p.k_scale);
            const uint16_t* dy = static_cast<const uint16_t*>(which == 0 ? p.dq : p.dk) + head_row * d;
            const float rs = static_cast<const float*>(which == 0 ? p.rstd_q : p.rstd_k)[head_row];
            // gw·x̂ of pair i, element e (0 or 1), from the rotated gradient.
            auto pair = [&](int64_t i, float& gw0, float& gw1, float& xh0, float& xh1) {
                const float c = cs[i], s = -sn[i];
                const float d0 = bf16_to_f32(dy[2 * i]), d1 = bf16_to_f32(dy[2 * i + 1]);
                const float g0 = fk::rn_fsub(fk::rn_fmul(c, d0), fk::rn_fmul(s, d1));
                const float g1 = fk::rn_fadd(fk::rn_fmul(s, d0), fk::rn_fmul(c, d1));
                gw0 = fk::rn_fmul(g0, w[2 * i]);
                gw1 = fk::rn_fmul(g1, w[2 * i + 1]);
                xh0 = fk::rn_fmul(x(2 * i), rs);
                xh1 = fk::rn_fmul(x(2 * i + 1), rs);
            };
            double acc = 0.0;
            for (int64_t i = lane; i < half; i += 32) {
                float gw0, gw1, xh0, xh1;
                pair(i, gw0, gw1, xh0, xh1);
                acc = fk::rn_dadd(acc, fk::rn_dmul((double)gw0, (double)xh0));
                acc = fk::rn_dadd(acc, fk::rn_dmul((double)gw1, (double)xh1));
            }
            const double m = fk::rn_ddiv(fk::warp_sum_f64(acc), (double)d);
            const int64_t dx = row + which * hd + hi * d;
            for (int64_t i = lane; i < half; i += 32) {
                float gw0, gw1, xh0, xh1;
                pair(i, gw0, gw1, xh0, xh1);
                const double e0 = fk::rn_dmul((double)rs, fk::rn_dsub((double)gw0, fk::rn_dmul((double)xh0, m)));
                const double e1 = fk::rn_dmul((double)rs, fk::rn_dsub((double)gw1, fk::rn_dmul((double)xh1, m)));
                fk::store(p.dqkv, dx + 2 * i, (float)e0, d16);
                fk::store(p.dqkv, dx + 2 * i + 1, (float)e1, d16);
            }
        }
        const uint16_t* dv = static_cast<const uint16_t*>(p.dv) + head_row * d;
        const int64_t dxv = row + 2 * hd + hi * d;
        for (int64_t j = lane; j < d; j += 32) {
            if (d16) static_cast<uint16_t*>(p.dqkv)[dxv + j] = dv[j];
            else static_cast<float*>(p.dqkv)[dxv + j] = bf16_to_f32(dv[j]);
        }
    });
}

// ---- merge heads ------------------------------------------------------------------------------

// tokens[r, c] ← heads[bi, c / d, t0 + t, c % d], r = bi·ls + t, c < h·d (bf16 bits copied).
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_merge_heads(FK_GRID_PARAMS FkModelHeadsParams p) {
    const int64_t hd = p.h * p.d;
    const uint16_t* heads = static_cast<const uint16_t*>(p.heads);
    uint16_t* tokens = static_cast<uint16_t*>(p.tokens);
    fk::grid_stride<FK_MODEL_THREADS>(p.b * p.ls * hd, [&](int64_t i) {
        const int64_t r = i / hd, c = i % hd, bi = r / p.ls, t = p.t0 + r % p.ls;
        tokens[r * p.ld + c] = heads[((bi * p.h + c / p.d) * p.l + t) * p.d + c % p.d];
    });
}

// heads[bi, hi, t0 + t, di] ← bf16(tokens[bi·ls + t, hi·d + di]), tokens f32; head-major order
// so the bf16 writes are contiguous.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_merge_heads_bwd(FK_GRID_PARAMS FkModelHeadsParams p) {
    const float* tokens = static_cast<const float*>(p.tokens);
    uint16_t* heads = static_cast<uint16_t*>(p.heads);
    fk::grid_stride<FK_MODEL_THREADS>(p.b * p.h * p.ls * p.d, [&](int64_t i) {
        const int64_t di = i % p.d, t = (i / p.d) % p.ls, bh = i / (p.d * p.ls);
        const int64_t bi = bh / p.h, hi = bh % p.h;
        heads[(bh * p.l + p.t0 + t) * p.d + di] = f32_to_bf16(tokens[(bi * p.ls + t) * p.ld + hi * p.d + di]);
    });
}
