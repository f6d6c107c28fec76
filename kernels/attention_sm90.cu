// Flash attention for Hopper (sm_90a) in the FlashAttention-3 arrangement (arXiv 2407.08608):
// warp specialisation, TMA, wgmma. The forward computes the function of fk_attn_fwd in
// attention.cu (online softmax in base 2, key-padding mask, O and the natural-log LSE; CPU twin
// src/ops/attention.rs attention_forward_masked); the backward (namespace bwd, below) that of
// fk_attn_bwd_dkdv / fk_attn_bwd_dq.
//
// A block owns BM = 128 query rows of one (batch, head) and has three warpgroups:
//   producer (warpgroup 0, one thread issues): Q once, then K and V tiles of BN = 128 keys into a
//     ring of STAGES slots, each copy a TMA box of 64 columns (128 bytes, the 128-byte swizzle's
//     span) completing on the slot's k_full / v_full mbarrier; it refills a slot's K (V) when the
//     256 consumer threads have arrived on its k_empty (v_empty) barrier. setmaxnreg gives its
//     registers away.
//   consumers (warpgroups 1 and 2, 64 query rows each): S = Q·Kᵀ as D/16 wgmma m64n128k16 with
//     both operands in shared memory (K-major), the online softmax on the accumulators in
//     registers, then O += P·V as BN/16 wgmma m64nDk16 with P from registers (the accumulator
//     layout of S is the A-fragment layout of the next product, as in the sm_80 kernel) and V
//     read N-major from shared memory. K's slot is waited for before S, V's only before P·V, so
//     the V copy overlaps the first product and the softmax.
// Two schedules (fwd<D, PIPE> below): fk_attn_fwd_sm90 overlaps the softmax with the tensor
// cores inside each warpgroup and ping-pongs the two warpgroups' products (FA3 §3.1–3.2);
// fk_attn_fwd_sm90_serial runs each tile's steps one after another (the first version).
//
// Shared memory, every tile 1024-byte aligned (the 128-byte swizzle repeats every 8 rows of 128
// bytes, and TMA and wgmma locate rows through the address bits): Q [D/64][BM][64], K and V
// [STAGES][D/64][BN][64], then the mbarriers.
#include "common.cuh"
#ifndef FK_HOST_EMULATION
#include "ptx_sm90.h"
#endif

static_assert(sizeof(FkAttn90Params) == FK_SIZEOF_FkAttn90Params, "abi.h: FkAttn90Params size");
static_assert(sizeof(FkTensorMap) == FK_SIZEOF_FkTensorMap, "abi.h: FkTensorMap size");
static_assert(sizeof(FkAttn90BwdParams) == FK_SIZEOF_FkAttn90BwdParams, "abi.h: FkAttn90BwdParams size");

namespace fk_attn90 {

constexpr int THREADS = FK_ATTN90_THREADS;
constexpr int BM = FK_ATTN90_BLOCK_M;
constexpr int BN = FK_ATTN90_BLOCK_N;
constexpr int STAGES = FK_ATTN90_STAGES;
constexpr int BOX = 64;  // bf16 columns per TMA box row: 128 bytes
constexpr int CONSUMERS = 2 * 128;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
static_assert(THREADS == 3 * 128 && BM == 2 * 64, "a producer and two consumer warpgroups of 64 rows");

template <int D>
struct Layout {
    static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2, BOX_ROWS_BYTES = BN * BOX * 2;
    static constexpr int Q = 0, K = Q + Q_BYTES, V = K + STAGES * KV_BYTES, BARS = V + STAGES * KV_BYTES;
    static constexpr int TOTAL = BARS + 1024 + 1024;  // barriers, alignment slack
};
static_assert(Layout<64>::TOTAL == FK_ATTN90_SMEM_D64, "abi.h: FK_ATTN90_SMEM_D64");
static_assert(Layout<128>::TOTAL == FK_ATTN90_SMEM_D128, "abi.h: FK_ATTN90_SMEM_D128");

using fk::neg_inf;
using fk::pack_bf16;
using fk::pos_inf;
using fk::quad_max;
using fk::quad_sum;

using fk::desc_k_major;
using fk::desc_mn_major;

// The shared memory of one block and the consumers' view of it.
template <int D>
struct Tiles {
    static constexpr int BOXES = D / BOX;
    uint16_t* qs;  // [BOXES][BM][64]
    uint16_t* ks;  // [STAGES][BOXES][BN][64]
    uint16_t* vs;
    uint64_t *q_full, *k_full, *v_full, *k_empty, *v_empty;

    // S = Q·Kᵀ (64 × BN for consumer warpgroup cw) from slot s: D/16 wgmma, K-major operands.
    __device__ __forceinline__ void issue_qk(float (&sc)[BN / 2], int cw, int s) const {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint16_t* qa = qs + (kk / 4) * BM * BOX + cw * 64 * BOX + (kk % 4) * 16;
            const uint16_t* kb = ks + (s * BOXES + kk / 4) * BN * BOX + (kk % 4) * 16;
            Wgmma<BN>::ss(sc, desc_k_major(qa), desc_k_major(kb), kk > 0, 0);
        }
    }
    // O += P·V from slot s: BN/16 wgmma, P from registers, V N-major (d contiguous per box).
    __device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[BN / 16][4], int s) const {
#pragma unroll
        for (int kj = 0; kj < BN / 16; ++kj) {
            const uint16_t* vb = vs + (s * BOXES) * BN * BOX + kj * 16 * BOX;
            Wgmma<D>::rs(o, pa[kj], desc_mn_major(vb, Layout<D>::BOX_ROWS_BYTES), 1, 1);
        }
    }
};

// The online softmax of one score tile, in base 2 (attention.cu's fk_attn_fwd, term for term):
// scales and masks sc (a masked or missing key scores −∞), updates the running max and sum, and
// leaves P = 2^(s − max) in sc; returns through corr the factor O must be rescaled by.
// Accumulator element i is row g (+8 for i%4 ≥ 2), key n0 + 8·(i/4) + 2t + (i&1).
struct RowState {
    float m[2], l[2];
};
__device__ __forceinline__ void softmax_tile(float (&sc)[BN / 2], RowState& st, float (&corr)[2], int64_t n0,
                                             int64_t l, const unsigned char* mask, float sl2, int t) {
    const bool per_key = mask != nullptr || n0 + BN > l;
    float mx[2] = {st.m[0], st.m[1]};
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
        const int64_t key = n0 + 8 * (i / 4) + 2 * t + (i & 1);
        float v = sc[i] * sl2;
        if (per_key && !(key < l && (mask == nullptr || mask[key] != 0))) v = neg_inf();
        sc[i] = v;
        mx[(i % 4) / 2] = fmaxf(mx[(i % 4) / 2], v);
    }
    float base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = quad_max(mx[h]);
        // A row that has seen no key yet keeps a zero base, so exp2(−∞ − base) = 0, not NaN.
        base[h] = mx[h] == neg_inf() ? 0.0f : mx[h];
        corr[h] = fast_exp2(st.m[h] - base[h]);
        st.m[h] = mx[h];
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
        sc[i] = fast_exp2(sc[i] - base[(i % 4) / 2]);
        rs[(i % 4) / 2] += sc[i];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l[h] = st.l[h] * corr[h] + rs[h];
}

// P (bf16) as the A fragments of K k-steps: chunks 2kj and 2kj + 1 of the accumulator (the
// forward's P, K = BN/16; the backward's Pᵀ and dSᵀ, K = 4).
template <int K>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[K][4], const float (&sc)[8 * K]) {
#pragma unroll
    for (int kj = 0; kj < K; ++kj) {
        pa[kj][0] = pack_bf16(sc[8 * kj + 0], sc[8 * kj + 1]);
        pa[kj][1] = pack_bf16(sc[8 * kj + 2], sc[8 * kj + 3]);
        pa[kj][2] = pack_bf16(sc[8 * kj + 4], sc[8 * kj + 5]);
        pa[kj][3] = pack_bf16(sc[8 * kj + 6], sc[8 * kj + 7]);
    }
}

template <int N>
__device__ __forceinline__ void rescale(float (&o)[N], const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] *= corr[(i % 4) / 2];
}

// Keeps P's registers alive (and unchanged) until the wgmma that reads them has been waited for.
template <int N>
__device__ __forceinline__ void fence_frags(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

// PIPE = false: per tile, S, wait, softmax, P·V, wait (the first version, kept for the
// side-by-side benchmark and as the fallback). PIPE = true: FlashAttention-3's two overlaps —
// inside a warpgroup, S_j = Q·K_jᵀ and O += P_{j−1}·V_{j−1} are issued together and the softmax
// of S_j runs while P_{j−1}·V_{j−1} is still on the tensor cores (§3.2); across the two
// consumer warpgroups, named barriers 1 and 2 make them take turns issuing their products, so
// one's softmax falls in the other's GEMMs (ping-pong, §3.1).
template <int D, bool PIPE>
__device__ void fwd(const FkAttn90Params& P) {
    using L = Layout<D>;
    constexpr int BOXES = D / BOX;
    const FkAttnParams& p = P.a;
    FK_DYNAMIC_SMEM(smem_raw);
    unsigned char* smem = fk::smem_1024(smem_raw, (uint32_t)L::TOTAL);
    Tiles<D> tl;
    tl.qs = reinterpret_cast<uint16_t*>(smem + L::Q);
    tl.ks = reinterpret_cast<uint16_t*>(smem + L::K);
    tl.vs = reinterpret_cast<uint16_t*>(smem + L::V);
    tl.q_full = reinterpret_cast<uint64_t*>(smem + L::BARS);
    tl.k_full = tl.q_full + 1;
    tl.v_full = tl.k_full + STAGES;
    tl.k_empty = tl.v_full + STAGES;
    tl.v_empty = tl.k_empty + STAGES;

    const int tid = threadIdx.x, wg = tid / 128;
    const int64_t l = p.l, bh = blockIdx.y, m0 = (int64_t)blockIdx.x * BM;
    const int tiles = (int)((l + BN - 1) / BN);

    if (tid == 0) {
        mbar_init(tl.q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(tl.k_full + s, 1);
            mbar_init(tl.v_full + s, 1);
            mbar_init(tl.k_empty + s, CONSUMERS);
            mbar_init(tl.v_empty + s, CONSUMERS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: 24 registers are plenty for one thread's address arithmetic.
        setmaxnreg_dec<24>();
        if (tid == 0) {
            mbar_arrive_expect_tx(tl.q_full, L::Q_BYTES);
            for (int c = 0; c < BOXES; ++c)
                tma_load_3d(tl.qs + c * BM * BOX, &P.tq, tl.q_full, c * BOX, (int)m0, (int)bh);
            for (int j = 0; j < tiles; ++j) {
                const int s = j % STAGES;
                // The slot's previous round must be consumed (a fresh barrier passes parity 1).
                const uint32_t free_parity = ((j / STAGES) & 1) ^ 1;
                mbar_wait(tl.k_empty + s, free_parity);
                mbar_arrive_expect_tx(tl.k_full + s, L::KV_BYTES);
                for (int c = 0; c < BOXES; ++c)
                    tma_load_3d(tl.ks + (s * BOXES + c) * BN * BOX, &P.tk, tl.k_full + s, c * BOX, j * BN, (int)bh);
                mbar_wait(tl.v_empty + s, free_parity);
                mbar_arrive_expect_tx(tl.v_full + s, L::KV_BYTES);
                for (int c = 0; c < BOXES; ++c)
                    tma_load_3d(tl.vs + (s * BOXES + c) * BN * BOX, &P.tv, tl.v_full + s, c * BOX, j * BN, (int)bh);
            }
        }
        return;
    }

    // Consumers: S (BN/2), O (D/2) and P (BN/4) registers per thread, two S tiles' worth in flight
    // when pipelined.
    setmaxnreg_inc<240>();
    const int cw = wg - 1;  // rows 64·cw.. of the block
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const float sl2 = p.scale * LOG2E;
    const unsigned char* mask = p.kv_mask ? static_cast<const unsigned char*>(p.kv_mask) + (bh / p.h) * l : nullptr;
    auto phase = [](int j) { return (uint32_t)((j / STAGES) & 1); };

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    RowState st = {{neg_inf(), neg_inf()}, {0.0f, 0.0f}};
    float sc[BN / 2], corr[2];
    uint32_t pa[BN / 16][4];

    mbar_wait(tl.q_full, 0);
    if constexpr (!PIPE) {
#pragma unroll 1
        for (int j = 0; j < tiles; ++j) {
            const int s = j % STAGES;
            mbar_wait(tl.k_full + s, phase(j));
            wgmma_fence();
            tl.issue_qk(sc, cw, s);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_fence_operand(sc);
            mbar_arrive(tl.k_empty + s);
            softmax_tile(sc, st, corr, (int64_t)j * BN, l, mask, sl2, t);
            rescale(o, corr);
            pack_p(pa, sc);
            mbar_wait(tl.v_full + s, phase(j));
            wgmma_fence_operand(o);
            wgmma_fence();
            tl.issue_pv(o, pa, s);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_fence_operand(o);
            fence_frags(pa);
            mbar_arrive(tl.v_empty + s);
        }
    } else {
        // Ping-pong: warpgroup cw issues its products after named barrier 1 + cw opens; the other
        // warpgroup opens it once it has issued its own. Consumer 1 opens consumer 0's first turn.
        // Turns per warpgroup: tiles + 1 (S_0; S_j with P_{j−1}·V_{j−1}; the last P·V); consumer 1
        // skips its last opening so that every barrier ends with no arrivals pending.
        const int turns = tiles + 1;
        int turn = 0;
        auto my_turn = [&] { named_bar_sync(1 + cw, CONSUMERS); };
        auto their_turn = [&] {
            if (!(cw == 1 && turn == turns - 1)) named_bar_arrive(2 - cw, CONSUMERS);
            ++turn;
        };
        if (cw == 1) named_bar_arrive(1, CONSUMERS);

        mbar_wait(tl.k_full, 0);
        my_turn();
        wgmma_fence();
        tl.issue_qk(sc, cw, 0);
        wgmma_commit();
        their_turn();
        wgmma_wait<0>();
        wgmma_fence_operand(sc);
        mbar_arrive(tl.k_empty);
        softmax_tile(sc, st, corr, 0, l, mask, sl2, t);
        pack_p(pa, sc);  // O is still zero: no rescale
#pragma unroll 1
        for (int j = 1; j < tiles; ++j) {
            const int s = j % STAGES, sp = (j - 1) % STAGES;
            mbar_wait(tl.k_full + s, phase(j));
            mbar_wait(tl.v_full + sp, phase(j - 1));
            my_turn();
            wgmma_fence_operand(o);
            wgmma_fence();
            tl.issue_qk(sc, cw, s);
            wgmma_commit();
            tl.issue_pv(o, pa, sp);
            wgmma_commit();
            their_turn();
            wgmma_wait<1>();  // S_j is in; P_{j−1}·V_{j−1} may still run
            wgmma_fence_operand(sc);
            mbar_arrive(tl.k_empty + s);
            softmax_tile(sc, st, corr, (int64_t)j * BN, l, mask, sl2, t);
            wgmma_wait<0>();
            wgmma_fence_operand(o);
            fence_frags(pa);
            mbar_arrive(tl.v_empty + sp);
            rescale(o, corr);
            pack_p(pa, sc);
        }
        const int sl = (tiles - 1) % STAGES;
        mbar_wait(tl.v_full + sl, phase(tiles - 1));
        my_turn();
        wgmma_fence_operand(o);
        wgmma_fence();
        tl.issue_pv(o, pa, sl);
        wgmma_commit();
        their_turn();
        wgmma_wait<0>();
        wgmma_fence_operand(o);
        fence_frags(pa);
        mbar_arrive(tl.v_empty + sl);
    }

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        st.l[h] = quad_sum(st.l[h]);
        inv[h] = st.l[h] > 0.0f ? 1.0f / st.l[h] : 0.0f;
    }
    const int64_t r0 = m0 + cw * 64 + warp * 16;
    uint16_t* out = static_cast<uint16_t*>(p.o) + bh * l * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int64_t row = r0 + g + 8 * h;
        if (row >= l) continue;
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + row * D + 2 * t);
#pragma unroll
        for (int c = 0; c < D / 8; ++c) dst[c * 4] = pack_bf16(o[4 * c + 2 * h] * inv[h], o[4 * c + 2 * h + 1] * inv[h]);
    }
    if (t == 0) {
        float* lse = static_cast<float*>(p.lse) + bh * l;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t row = r0 + g + 8 * h;
            if (row < l) lse[row] = st.l[h] > 0.0f ? (st.m[h] + log2f(st.l[h])) * LN2 : pos_inf();
        }
    }
}

// One entry point per schedule for both head dims: the host sizes shared memory for the dim it
// launches.
template <bool PIPE>
__device__ __forceinline__ void fwd_entry(const FkAttn90Params& p) {
    if (p.a.d == 128)
        fwd<128, PIPE>(p);
    else if (p.a.d == 64)
        fwd<64, PIPE>(p);
    else
        __trap();
}


// ---- backward ----------------------------------------------------------------------------------
//
// Deterministic, as attention.cu's: fk_attn_bwd_prep (sm_80 code, runs here too) writes delta =
// rowsum(dO ∘ O); then two kernels of one template, each block owning BWD_BLOCK = 128 rows of one
// (batch, head), 64 per consumer warpgroup, and streaming the other side in BWD_TILE = 64-row
// tiles. Both compute, per tile, two score-shaped products with both operands in shared memory
// (SS wgmma m64n64k16, K-major), the softmax recomputed from the saved LSE, and then products
// with the 64 × 64 result from registers (RS wgmma m64nDk16, the tile read N-major):
//   DKDV (block rows = keys, tile rows = queries; fixed x1 = K, x2 = V; streamed y1 = Q, y2 = dO):
//     Sᵀ = K·Qᵀ, Pᵀ = kept(key) ? exp2(Sᵀ·scale·log2e − LSE₂[query]) : 0, dPᵀ = V·dOᵀ,
//     dSᵀ = Pᵀ ∘ (dPᵀ − delta[query]);  dV += Pᵀ·dO, dK += dSᵀ·Q;  dK ·= scale at the end.
//   DQ (block rows = queries, tile rows = keys; fixed x1 = Q, x2 = dO; streamed y1 = K, y2 = V):
//     S = Q·Kᵀ, P = kept(key) ? exp2(S·scale·log2e − LSE₂[query]) : 0, dP = dO·Vᵀ,
//     dS = P ∘ (dP − delta[query]);  dQ += dS·K;  dQ ·= scale at the end.
// The same producer as the forward (x1, x2 once; y1, y2 per tile into a two-slot ring with full
// and empty mbarriers). Two schedules of the consumers (kernel<D, DKDV, PIPE>, below):
// fk_attn_bwd_*_sm90 overlap each tile's element-wise work with its products inside the
// warpgroup; fk_attn_bwd_*_sm90_serial run the steps one after another. No ping-pong between the
// two consumer warpgroups (they overlap each other only as the scheduler lets them).
namespace bwd {

constexpr int BLOCK = FK_ATTN90_BWD_BLOCK, TILE = FK_ATTN90_BWD_TILE;
static_assert(BLOCK == 2 * 64 && TILE == 64, "two consumer warpgroups of 64 rows, 64-row tiles");

// Per slot, besides the y tiles: the tile rows' LSE (log2 units) and delta, written by the
// producer warp (DKDV reads them per column; loading its 32 from global memory in each consumer
// thread made ptxas spill 40 bytes).
template <int D>
struct Layout {
    static constexpr int X_BYTES = BLOCK * D * 2, Y_BYTES = TILE * D * 2, STAT_BYTES = 2 * TILE * 4;
    static constexpr int X1 = 0, X2 = X_BYTES, Y1 = 2 * X_BYTES, Y2 = Y1 + STAGES * Y_BYTES;
    static constexpr int STATS = Y2 + STAGES * Y_BYTES;
    static constexpr int BARS = STATS + STAGES * STAT_BYTES;
    static constexpr int TOTAL = BARS + 1024 + 1024;
};
static_assert(Layout<64>::TOTAL == FK_ATTN90_BWD_SMEM_D64, "abi.h: FK_ATTN90_BWD_SMEM_D64");
static_assert(Layout<128>::TOTAL == FK_ATTN90_BWD_SMEM_D128, "abi.h: FK_ATTN90_BWD_SMEM_D128");

// acc[64 × 64] = x (this warpgroup's 64 rows of a fixed [BOXES][BLOCK][64] tile) · yᵀ (a streamed
// [BOXES][TILE][64] tile): D/16 SS wgmma, both K-major.
template <int D>
__device__ __forceinline__ void issue_xyt(float (&acc)[32], const uint16_t* x, const uint16_t* y, int cw) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint16_t* xa = x + (kk / 4) * BLOCK * BOX + cw * 64 * BOX + (kk % 4) * 16;
        const uint16_t* yb = y + (kk / 4) * TILE * BOX + (kk % 4) * 16;
        Wgmma<64>::ss(acc, desc_k_major(xa), desc_k_major(yb), kk > 0, 0);
    }
}
// out[64 × D] += a (64 × 64 from registers) · y (the streamed tile, read N-major): 4 RS wgmma.
template <int D>
__device__ __forceinline__ void issue_ay(float (&out)[D / 2], const uint32_t (&a)[4][4], const uint16_t* y) {
#pragma unroll
    for (int kj = 0; kj < TILE / 16; ++kj)
        Wgmma<D>::rs(out, a[kj], desc_mn_major(y + kj * 16 * BOX, TILE * BOX * 2), 1, 1);
}

template <int D, bool DKDV, bool PIPE>
__device__ void kernel(const FkAttn90BwdParams& P) {
    using L = Layout<D>;
    constexpr int BOXES = D / BOX;
    const FkAttnParams& p = P.a;
    FK_DYNAMIC_SMEM(smem_raw);
    unsigned char* smem = fk::smem_1024(smem_raw, (uint32_t)L::TOTAL);
    uint16_t* x1 = reinterpret_cast<uint16_t*>(smem + L::X1);
    uint16_t* x2 = reinterpret_cast<uint16_t*>(smem + L::X2);
    uint16_t* y1 = reinterpret_cast<uint16_t*>(smem + L::Y1);
    uint16_t* y2 = reinterpret_cast<uint16_t*>(smem + L::Y2);
    float* stats = reinterpret_cast<float*>(smem + L::STATS);  // [STAGES][2][TILE]
    uint64_t* x_full = reinterpret_cast<uint64_t*>(smem + L::BARS);
    uint64_t* full = x_full + 1;
    uint64_t* empty = full + STAGES;

    const int tid = threadIdx.x, wg = tid / 128;
    const int64_t l = p.l, bh = blockIdx.y, r0 = (int64_t)blockIdx.x * BLOCK;
    const int tiles = (int)((l + TILE - 1) / TILE);

    if (tid == 0) {
        mbar_init(x_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, CONSUMERS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // 32, not the forward's 24: the statistics loop spilled at 24 (28 bytes, ptxas -v);
        // 240 + 240 + 32 still fits the 64 K-register file across three warpgroups (512 × 128).
        setmaxnreg_dec<32>();
        if (tid >= 32) return;
        // Warp 0: lane 0 issues the copies; for DKDV all 32 lanes write the slot's statistics
        // first (named barrier 3 orders their stores before lane 0's arrive, which releases them
        // to the consumers' wait).
        const float* lse = static_cast<const float*>(p.lse) + bh * l;
        const float* delta = static_cast<const float*>(p.delta) + bh * l;
        if (tid == 0) {
            mbar_arrive_expect_tx(x_full, 2 * L::X_BYTES);
            for (int c = 0; c < BOXES; ++c) {
                tma_load_3d(x1 + c * BLOCK * BOX, &P.x1, x_full, c * BOX, (int)r0, (int)bh);
                tma_load_3d(x2 + c * BLOCK * BOX, &P.x2, x_full, c * BOX, (int)r0, (int)bh);
            }
        }
        for (int j = 0; j < tiles; ++j) {
            const int s = j % STAGES;
            mbar_wait(empty + s, ((j / STAGES) & 1) ^ 1);
            if constexpr (DKDV) {
                for (int i = tid; i < TILE; i += 32) {
                    const int64_t c = (int64_t)j * TILE + i;
                    stats[s * 2 * TILE + i] = c < l ? lse[c] * LOG2E : pos_inf();
                    stats[s * 2 * TILE + TILE + i] = c < l ? delta[c] : 0.0f;
                }
                named_bar_sync(3, 32);
            }
            if (tid == 0) {
                mbar_arrive_expect_tx(full + s, 2 * L::Y_BYTES);
                for (int c = 0; c < BOXES; ++c) {
                    tma_load_3d(y1 + (s * BOXES + c) * TILE * BOX, &P.y1, full + s, c * BOX, j * TILE, (int)bh);
                    tma_load_3d(y2 + (s * BOXES + c) * TILE * BOX, &P.y2, full + s, c * BOX, j * TILE, (int)bh);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const float sl2 = p.scale * LOG2E;
    const unsigned char* mask = p.kv_mask ? static_cast<const unsigned char*>(p.kv_mask) + (bh / p.h) * l : nullptr;
    const float* lse = static_cast<const float*>(p.lse) + bh * l;
    const float* delta = static_cast<const float*>(p.delta) + bh * l;
    auto kept = [&](int64_t key) { return key < l && (mask == nullptr || mask[key] != 0); };
    // This thread's two block rows (accumulator element i: row g + 8 for i%4 ≥ 2).
    const int64_t row[2] = {r0 + cw * 64 + warp * 16 + g, r0 + cw * 64 + warp * 16 + g + 8};
    // Per-row statistics, fixed for the block: DKDV's rows are keys (kept or not); DQ's rows are
    // queries (LSE in log2 units, +∞ past the end so that P = 0 there, and delta).
    bool row_kept[2];
    float row_lse2[2], row_delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_kept[h] = kept(row[h]);
        row_lse2[h] = row[h] < l ? lse[row[h]] * LOG2E : pos_inf();
        row_delta[h] = row[h] < l ? delta[row[h]] : 0.0f;
    }

    float o1[D / 2], o2[DKDV ? D / 2 : 1];  // dK and dV, or dQ
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o1[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < (DKDV ? D / 2 : 1); ++i) o2[i] = 0.0f;
    float sc[32], dp[32];
    uint32_t pa[4][4], da[4][4];
    auto tile_y1 = [&](int s) { return y1 + s * BOXES * TILE * BOX; };
    auto tile_y2 = [&](int s) { return y2 + s * BOXES * TILE * BOX; };
    // Element i of a 64 × 64 accumulator: block row row[(i%4)/2], tile column
    // c = j·TILE + 8·(i/4) + 2t + (i&1).
    // Pᵀ (P) from the scores in sc, in place.
    auto probs = [&](int j, int s) {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int h = (i % 4) / 2, ci = 8 * (i / 4) + 2 * t + (i & 1);
            if constexpr (DKDV)
                sc[i] = row_kept[h] ? fast_exp2(sc[i] * sl2 - stats[s * 2 * TILE + ci]) : 0.0f;
            else
                sc[i] = kept((int64_t)j * TILE + ci) ? fast_exp2(sc[i] * sl2 - row_lse2[h]) : 0.0f;
        }
    };
    // dSᵀ (dS) = P ∘ (dP − delta), in place in dp.
    auto dscores = [&](int s) {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int h = (i % 4) / 2, ci = 8 * (i / 4) + 2 * t + (i & 1);
            const float dl = DKDV ? stats[s * 2 * TILE + TILE + ci] : row_delta[h];
            dp[i] = sc[i] * (dp[i] - dl);
        }
    };

    mbar_wait(x_full, 0);
    // PIPE = false (the first version, kept for the side-by-side benchmark and as the fallback):
    // per tile, Sᵀ and dPᵀ in one group, wait, Pᵀ and dSᵀ, dV and dK in one group, wait.
    // PIPE = true (FA3 §3.2 inside the warpgroup): each product is its own commit group, and the
    // element-wise work on one product's result runs while the next product is on the tensor
    // cores:
    //   issue Sᵀ_j, then dPᵀ_j; wait 1 (Sᵀ_j): Pᵀ_j, its exponentials under dPᵀ_j;
    //   issue dV_j += Pᵀ_j·dO_j; wait 1 (dPᵀ_j): dSᵀ_j under dV_j; issue dK_j; wait 0.
    // (DQ: no dV, so dS follows a wait 0.) Pᵀ's fragments (pa) are the A operand of dV_j while
    // dSᵀ_j is computed: dSᵀ goes to its own fragments (da), and pa is not written again before
    // the wait 0. Both schedules do the same arithmetic in the same order (the same bits).
    // Every group is waited for inside its own iteration: issuing Sᵀ_{j+1} before the wait for
    // dK_j makes ptxas serialise the kernel's wgmma (C7511: Sᵀ's registers live across the back
    // edge on top of dK, dV), which tools/sass-check.sh refuses.
#pragma unroll 1
    for (int j = 0; j < tiles; ++j) {
        const int s = j % STAGES;
        mbar_wait(full + s, (j / STAGES) & 1);
        wgmma_fence();
        issue_xyt<D>(sc, x1, tile_y1(s), cw);  // Sᵀ = K·Qᵀ, or S = Q·Kᵀ
        if constexpr (PIPE) wgmma_commit();
        issue_xyt<D>(dp, x2, tile_y2(s), cw);  // dPᵀ = V·dOᵀ, or dP = dO·Vᵀ
        wgmma_commit();
        if constexpr (PIPE) {
            wgmma_wait<1>();  // Sᵀ in; dPᵀ may still run
            wgmma_fence_operand(sc);
            probs(j, s);
            pack_p(pa, sc);
            if constexpr (DKDV) {
                wgmma_fence_operand(o2);
                wgmma_fence();
                issue_ay<D>(o2, pa, tile_y2(s));  // dV += Pᵀ·dO
                wgmma_commit();
                wgmma_wait<1>();  // dPᵀ in; dV may still run
            } else {
                wgmma_wait<0>();
            }
            wgmma_fence_operand(dp);
            dscores(s);
            pack_p(da, dp);
            wgmma_fence_operand(o1);
            wgmma_fence();
        } else {
            wgmma_wait<0>();
            wgmma_fence_operand(sc);
            wgmma_fence_operand(dp);
            probs(j, s);
            dscores(s);
            pack_p(pa, sc);
            pack_p(da, dp);
            wgmma_fence_operand(o1);
            if constexpr (DKDV) wgmma_fence_operand(o2);
            wgmma_fence();
            if constexpr (DKDV) issue_ay<D>(o2, pa, tile_y2(s));  // dV += Pᵀ·dO
        }
        issue_ay<D>(o1, da, tile_y1(s));  // dK += dSᵀ·Q, or dQ += dS·K
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operand(o1);
        if constexpr (DKDV) wgmma_fence_operand(o2);
        fence_frags(pa);
        fence_frags(da);
        mbar_arrive(empty + s);
    }

    // dK (dQ) carries the softmax scale; rows past l are not written.
    auto store = [&](void* dst, const float (&o)[D / 2], float f) {
        uint16_t* out = static_cast<uint16_t*>(dst) + bh * l * D;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (row[h] >= l) continue;
            uint32_t* d32 = reinterpret_cast<uint32_t*>(out + row[h] * D + 2 * t);
#pragma unroll
            for (int c = 0; c < D / 8; ++c) d32[c * 4] = pack_bf16(o[4 * c + 2 * h] * f, o[4 * c + 2 * h + 1] * f);
        }
    };
    if constexpr (DKDV) {
        store(p.dk, o1, p.scale);
        store(p.dv, o2, 1.0f);
    } else {
        store(p.dq, o1, p.scale);
    }
}

template <bool DKDV, bool PIPE>
__device__ __forceinline__ void entry(const FkAttn90BwdParams& p) {
    if (p.a.d == 128)
        kernel<128, DKDV, PIPE>(p);
    else if (p.a.d == 64)
        kernel<64, DKDV, PIPE>(p);
    else
        __trap();
}

}  // namespace bwd

}  // namespace fk_attn90

FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_fwd_sm90(FK_GRID_PARAMS FkAttn90Params p) {
    fk_attn90::fwd_entry<true>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_fwd_sm90_serial(FK_GRID_PARAMS FkAttn90Params p) {
    fk_attn90::fwd_entry<false>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_bwd_dkdv_sm90(FK_GRID_PARAMS FkAttn90BwdParams p) {
    fk_attn90::bwd::entry<true, true>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_bwd_dkdv_sm90_serial(FK_GRID_PARAMS FkAttn90BwdParams p) {
    fk_attn90::bwd::entry<true, false>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_bwd_dq_sm90(FK_GRID_PARAMS FkAttn90BwdParams p) {
    fk_attn90::bwd::entry<false, true>(p);
}
FK_KERNEL void __launch_bounds__(FK_ATTN90_THREADS, 1) fk_attn_bwd_dq_sm90_serial(FK_GRID_PARAMS FkAttn90BwdParams p) {
    fk_attn90::bwd::entry<false, false>(p);
}
