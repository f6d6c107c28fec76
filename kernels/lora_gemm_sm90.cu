// The LoRA linear's large GEMM for Hopper (sm_90a): TMA, wgmma, warp specialisation, persistent
// blocks. Same function as one problem of lora_gemm.cu's fk_gemm_nt_large / fk_gemm_nn_large
// without 8-bit codes (the host dequantises them first) and with at most one dropout-masked
// segment (dX's dropout term, taken first):
//     out[i, n] = alpha · Σ_seg A_seg[i, :]·B_seg[:, n] (+ bias[n]) (+ beta · c_in[i, n])
// where the segments are the K-concatenation of the LoRA linear (src/kernels/lora.rs builds them):
//   NT (forward):  Y  = [X | S'₁ | S'₂ …]·[W | B₁ | B₂ …]ᵀ, B_i only on its term's output rows;
//   NN (backward): dX = [dY | G'₁ | …]·[W ; A₁ ; …].
// CPU twin: src/ops/lora.rs (lora_linear_forward / lora_linear_backward), as for lora_gemm.cu.
//
// A block has three warpgroups and walks the output tiles b, b + gridDim.x, … (persistent: the
// grid is one block per SM, so the prologue and the barrier set-up are paid once per SM, and the
// producer loads the next tile's first stages while the consumers write the last one out):
//   producer (warpgroup 0, one thread issues): for every tile, every segment that touches the
//     tile's columns, every BK = 64 deep k-tile: waits for the ring slot to be empty, then loads
//     A [BM rows][64] and B (K-major [BN rows][64] for NT; N-major BN/64 boxes of [64 k][64 n]
//     for NN) with TMA onto the slot's `full` mbarrier. setmaxnreg gives its registers away.
//   consumers (warpgroups 1 and 2, rows 64·cw.. of the tile): per k-tile 4 wgmma m64nBNk16 with
//     both operands in shared memory; one group stays in flight (wait_group 1), and the slot of
//     the k-tile before is handed back to the producer once its group has completed. At the end
//     of a tile: wait for everything, hand back the last slot, then the epilogue from the
//     accumulators (fk::store_gemm_pair: alpha, bias, beta·c_in, bf16 or f32, bounds).
// Both sides walk the same (tile, segment, k-tile) sequence, so a slot's index and phase follow
// from one running counter.
//
// Shared memory, every tile 1024-byte aligned (the 128-byte swizzle's atom): per stage A
// [BM][64] then B ([BN][64], or [BN/64][64][64] N-major), then the 2·STAGES mbarriers.
#include "common.cuh"
#ifndef FK_HOST_EMULATION
#include "ptx_sm90.h"
#endif

static_assert(sizeof(FkGemm90Params) == FK_SIZEOF_FkGemm90Params, "abi.h: FkGemm90Params size");
static_assert(sizeof(FkGemm90Segment) == FK_SIZEOF_FkGemm90Segment, "abi.h: FkGemm90Segment size");

namespace fk_gemm90 {

constexpr int THREADS = FK_GEMM90_THREADS;
constexpr int BM = FK_GEMM90_BM;
constexpr int BK = FK_GEMM90_BK;
constexpr int BOX = 64;  // bf16 columns per TMA box row: 128 bytes, the swizzle's span
constexpr int CONSUMERS = 2 * 128;
static_assert(THREADS == 3 * 128 && BM == 2 * 64 && BK == BOX, "a producer and two consumer warpgroups of 64 rows");

using fk::desc_k_major;
using fk::desc_mn_major;

// Tile traits: BN output columns per tile, STAGES ring slots, B stored N-major (the NN kernels).
template <int BN_, int STAGES_, bool B_NMAJOR_>
struct Cfg {
    static constexpr int BN = BN_, STAGES = STAGES_;
    static constexpr bool B_NMAJOR = B_NMAJOR_;
    static constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int BARS = STAGES * STAGE_BYTES;
    static constexpr int TOTAL = BARS + 1024 + 1024;  // barriers, alignment slack
    static_assert(BN % BOX == 0 && BN <= 256, "BN: whole 64-column boxes, one TMA box (≤ 256 rows) when K-major");
};
using Nt256 = Cfg<256, FK_GEMM90_STAGES_BN256, false>;
using Nt128 = Cfg<128, FK_GEMM90_STAGES_BN128, false>;
using Nn256 = Cfg<256, FK_GEMM90_STAGES_BN256, true>;
using Nn128 = Cfg<128, FK_GEMM90_STAGES_BN128, true>;
static_assert(Nt256::TOTAL == FK_GEMM90_SMEM_BN256 && Nn256::TOTAL == FK_GEMM90_SMEM_BN256, "abi.h: FK_GEMM90_SMEM_BN256");
static_assert(Nt128::TOTAL == FK_GEMM90_SMEM_BN128 && Nn128::TOTAL == FK_GEMM90_SMEM_BN128, "abi.h: FK_GEMM90_SMEM_BN128");

// Does segment s feed output columns [n0, n0 + BN)? (A LoRA B on a slice of the outputs does not
// feed the tiles outside it: no copy, no product.)
__device__ __forceinline__ bool touches(const FkGemm90Segment& s, int64_t n0, int bn) {
    return s.k > 0 && s.n_begin < n0 + bn && n0 < s.n_end;
}

template <class C>
__device__ void gemm(const FkGemm90Params& P) {
    constexpr int BN = C::BN, STAGES = C::STAGES;
    const FkGemmProblem& pr = P.pr;
    FK_DYNAMIC_SMEM(smem_raw);
    unsigned char* smem = fk::smem_1024(smem_raw, (uint32_t)C::TOTAL);
    auto a_tile = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * C::STAGE_BYTES); };
    auto b_tile = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * C::STAGE_BYTES + C::A_BYTES); };
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::BARS);
    uint64_t* empty = full + STAGES;

    const int tid = threadIdx.x, wg = tid / 128;
    const int64_t tiles_m = (pr.m + BM - 1) / BM, tiles_n = (pr.n + BN - 1) / BN, tiles = tiles_m * tiles_n;
    const int nseg = P.num_segments;
    // Tiles in column-major order (m fastest): the blocks running at once share W's column
    // tiles, and walk K roughly together, so the X and W k-slices they read are in L2 together.
    auto tile_origin = [&](int64_t t, int64_t& m0, int64_t& n0) {
        m0 = (t % tiles_m) * BM;
        n0 = (t / tiles_m) * BN;
    };

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, CONSUMERS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid != 0) return;
        int64_t it = 0;  // k-tiles issued so far: slot it % STAGES, round it / STAGES
        for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
            int64_t m0, n0;
            tile_origin(t, m0, n0);
            for (int sg = 0; sg < nseg; ++sg) {
                const FkGemm90Segment& seg = P.seg[sg];
                if (!touches(seg, n0, BN)) continue;
                const int nb = (int)(n0 - seg.n_begin);  // may be negative: those rows read as zero
                for (int64_t k0 = 0; k0 < seg.k; k0 += BK, ++it) {
                    const int s = (int)(it % STAGES);
                    mbar_wait(empty + s, (uint32_t)(((it / STAGES) & 1) ^ 1));
                    mbar_arrive_expect_tx(full + s, C::STAGE_BYTES);
                    tma_load_3d(a_tile(s), &P.ta[sg], full + s, (int)k0, (int)m0, 0);
                    if constexpr (C::B_NMAJOR) {
#pragma unroll
                        for (int c = 0; c < BN / BOX; ++c)
                            tma_load_3d(b_tile(s) + c * BK * BOX, &P.tb[sg], full + s, nb + c * BOX, (int)k0, 0);
                    } else {
                        tma_load_3d(b_tile(s), &P.tb[sg], full + s, (int)k0, nb, 0);
                    }
                }
            }
        }
        return;
    }

    // Consumers: BN/2 accumulators per thread (128 at BN = 256) and little else.
    setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
    int64_t it = 0;
    float acc[BN / 2];
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        int64_t m0, n0;
        tile_origin(t, m0, n0);
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
        int prev = -1;  // the slot whose products may still be in flight
        for (int sg = 0; sg < nseg; ++sg) {
            const FkGemm90Segment& seg = P.seg[sg];
            if (!touches(seg, n0, BN)) continue;
#pragma unroll 1
            for (int64_t k0 = 0; k0 < seg.k; k0 += BK, ++it) {
                const int s = (int)(it % STAGES);
                mbar_wait(full + s, (uint32_t)((it / STAGES) & 1));
                const uint16_t* a = a_tile(s) + cw * 64 * BOX;
                const uint16_t* b = b_tile(s);
                wgmma_fence_operand(acc);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    // K-major operands step 16 elements (32 bytes) along the row; an N-major B
                    // steps 16 rows of its boxes.
                    const uint64_t db = C::B_NMAJOR ? desc_mn_major(b + kk * 16 * BOX, BK * BOX * 2)
                                                    : desc_k_major(b + kk * 16);
                    Wgmma<BN>::ss(acc, desc_k_major(a + kk * 16), db, 1, C::B_NMAJOR ? 1 : 0);
                }
                wgmma_commit();
                wgmma_wait<1>();  // the group before this one has read its slot
                wgmma_fence_operand(acc);
                if (prev >= 0) mbar_arrive(empty + prev);
                prev = s;
            }
            if (seg.mask) {
                // The dropout term of dX (first segment, so the accumulators hold its product
                // alone): every element times the mask of X at it, fk::dropout_factor as the
                // sm_80 kernel's FK_MASK_OUT and ops::lora's Dropout::factor.
                wgmma_wait<0>();
                wgmma_fence_operand(acc);
                if (prev >= 0) mbar_arrive(empty + prev);
                prev = -1;
                const int64_t r0 = m0 + cw * 64 + warp * 16 + g;
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) {
                    const int64_t row = r0 + ((i % 4) >= 2 ? 8 : 0), col = n0 + 8 * (i / 4) + 2 * t4 + (i & 1);
                    acc[i] *= fk::dropout_factor(seg.mask_seed, (uint64_t)(row * seg.mask_ld + col), seg.mask_p,
                                                 seg.mask_keep_scale);
                }
            }
        }
        wgmma_wait<0>();
        wgmma_fence_operand(acc);
        if (prev >= 0) mbar_arrive(empty + prev);

        // Accumulator element i: row 16·warp + g (+8 for i%4 ≥ 2), column 8·(i/4) + 2·t4 + (i&1).
        const int64_t r0 = m0 + cw * 64 + warp * 16 + g;
#pragma unroll
        for (int i = 0; i < BN / 2; i += 2) {
            const int64_t row = r0 + ((i % 4) >= 2 ? 8 : 0), col = n0 + 8 * (i / 4) + 2 * t4;
            fk::store_gemm_pair(pr, row, col, acc[i], acc[i + 1]);
        }
    }
}

}  // namespace fk_gemm90

FK_KERNEL void __launch_bounds__(FK_GEMM90_THREADS, 1) fk_gemm90_nt_bn256(FK_GRID_PARAMS FkGemm90Params p) {
    fk_gemm90::gemm<fk_gemm90::Nt256>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM90_THREADS, 1) fk_gemm90_nt_bn128(FK_GRID_PARAMS FkGemm90Params p) {
    fk_gemm90::gemm<fk_gemm90::Nt128>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM90_THREADS, 1) fk_gemm90_nn_bn256(FK_GRID_PARAMS FkGemm90Params p) {
    fk_gemm90::gemm<fk_gemm90::Nn256>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM90_THREADS, 1) fk_gemm90_nn_bn128(FK_GRID_PARAMS FkGemm90Params p) {
    fk_gemm90::gemm<fk_gemm90::Nn128>(p);
}
