// The fused LoRA GEMMs: one multi-segment bf16 GEMM (f32 accumulation, tensor cores through
// mma.sync.m16n8k16, sm_80 and newer) that computes
//     out[i, n] = alpha · Σ_seg A_seg[i, :]·B_seg[:, n] (+ bias[n]) (+ beta · out[i, n])
// for up to FK_MAX_PROBLEMS problems per launch (kernels/abi.h has the parameter structs).
// CPU twins: src/ops/lora.rs (lora_linear_forward, lora_linear_backward). Also here: the
// scale-and-add kernel of the unfused baselines the benchmarks compare against.
//
// How the LoRA linear maps onto it (src/kernels/lora.rs issues these launches):
//   forward   S = X̃·Aᵀ (small NT, one problem per adapter, dropout on X, alpha = scale)
//             Y = [X | s·S₁ | s·S₂ …]·[W | B₁ | B₂ …]ᵀ + b (large NT, one pass over Y: the
//             adapters are extra K-segments of the base GEMM, each limited to its output rows)
//   backward  s·G = s·dY[:, rows]·B (small NN, one problem per adapter)
//             dX = [dY | s·G₁ | …]·[W ; A₁ ; …] (large NN; adapters with dropout are masked
//             segments, kept in their own accumulator until their mask is applied)
//             dA += (s·G)ᵀ·X̃ and dB += dY[:, rows]ᵀ·(s·S) (small TN, one problem per gradient;
//             each output tile belongs to one block that loops over all tokens: deterministic,
//             no atomics)
//
// Why mma.sync through inline PTX rather than nvcuda::wmma: the PTX ISA documents exactly which
// fragment element each lane holds, which the epilogue needs (bias, bounds, the per-element
// dropout mask of the dX segments) and which kernels/host_emulation.h reproduces to run these
// kernels on a CPU; wmma fragments are opaque. wgmma/TMA (sm_90a) is the next step, not here.
#include "common.cuh"  // abi.h, and the CPU stand-ins of the builtins under the emulation

static_assert(sizeof(FkSegment) == FK_SIZEOF_FkSegment, "abi.h: FkSegment size");
static_assert(sizeof(FkGemmProblem) == FK_SIZEOF_FkGemmProblem, "abi.h: FkGemmProblem size");
static_assert(sizeof(FkGemmParams) == FK_SIZEOF_FkGemmParams, "abi.h: FkGemmParams size");

namespace {

// K depth of one pipeline stage: two m16n8k16 steps. A LoRA segment of rank ≤ 32 is one stage.
constexpr int BK = 32;
// bf16 elements of padding after each shared-memory row. Rows then start 16 bytes apart modulo
// 128, so the eight row addresses of one ldmatrix land in eight different bank groups.
constexpr int PAD = 8;

// Tile traits. BM×BN is the block's output tile, WM×WN one warp's; STAGES the cp.async depth.
// A_T: A stored [k][m] (else [m][k]); B_T: B stored [n][k] (else [k][n]). OUT_MASK: some
// segments carry FK_MASK_OUT and need a second accumulator.
template <int BM_, int BN_, int WM_, int WN_, int STAGES_, bool A_T_, bool B_T_, bool OUT_MASK_>
struct Cfg {
    static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr bool A_T = A_T_, B_T = B_T_, OUT_MASK = OUT_MASK_;
    static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int MI = WM / 16, NI = WN / 8;  // m16 and n8 fragments per warp
    // Shared-memory tiles as stored: [rows][cols + PAD].
    static constexpr int A_ROWS = A_T ? BK : BM, A_COLS = A_T ? BM : BK;
    static constexpr int B_ROWS = B_T ? BN : BK, B_COLS = B_T ? BK : BN;
    static constexpr int A_STAGE = A_ROWS * (A_COLS + PAD);
    static constexpr int B_STAGE = B_ROWS * (B_COLS + PAD);
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
    static_assert(BM % WM == 0 && BN % WN == 0, "warps tile the block");
    static_assert(WM % 16 == 0 && WN % 16 == 0, "m16 fragments; n8 fragments are loaded in pairs");
    static_assert((A_ROWS * A_COLS / 8) % THREADS == 0, "A tile: whole 16-byte chunks per thread");
    static_assert((B_ROWS * B_COLS / 8) % THREADS == 0, "B tile: whole 16-byte chunks per thread");
    static_assert(STAGES >= 2, "pipeline");
};

// Where a stored operand's tile comes from. Stored element (r, c) lives at
// base[(r - r_off)·ld + (c - c_off)] and exists for r in [r_lo, r_hi), c in [c_lo, c_hi); every
// other element of a tile reads as zero (ragged edges, a LoRA B outside its output rows).
struct TileSrc {
    const uint16_t* base;
    int64_t ld, r_off, c_off, r_lo, r_hi, c_lo, c_hi;
    // 8-bit storage (FK_CODE_I8 / FK_CODE_E4M3): bytes at base8 with the same indexing, each
    // element scale[r - r_off]·decode(byte), rounded to bf16 in shared memory.
    int code;
    const uint8_t* base8;
    const float* scale;
    // Dropout on this operand (it is X itself): index (r - r_off)·mask_ld + (c - c_off).
    bool masked;
    uint64_t seed;
    int64_t mask_ld;
    float p, keep;
};

// fp8 e4m3 (e4m3fn: no infinities, 0x7f/0xff NaN) to f32, exactly.
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 0) {
        v = (float)m * 0.001953125f;  // subnormal: m·2^-9
    } else if (e == 15 && m == 7) {
        v = __uint_as_float(0x7fc00000u);
    } else {
        v = __uint_as_float((uint32_t)(e + 120) << 23 | (uint32_t)m << 20);  // (1 + m/8)·2^(e-7)
    }
    return (b & 0x80) ? -v : v;
}

__device__ __forceinline__ float decode8(int code, uint8_t b) {
    return code == FK_CODE_I8 ? (float)(int8_t)b : e4m3_to_f32(b);
}

// The 8-bit path of load_tile: eight elements of row gr from column gc, dequantised to bf16.
__device__ __forceinline__ void load_chunk8(uint16_t* dst, const TileSrc& src, int64_t gr, int64_t gc, bool row_ok) {
    union {
        uint4 v;
        uint16_t h[8];
    } u;
    const float sc = row_ok ? src.scale[gr - src.r_off] : 0.0f;
    const uint8_t* row = src.base8 + (gr - src.r_off) * src.ld - src.c_off;
    if (row_ok && gc >= src.c_lo && gc + 8 <= src.c_hi && (reinterpret_cast<uintptr_t>(row + gc) & 7) == 0) {
        union {
            uint2 v;
            uint8_t b[8];
        } q;
        q.v = *reinterpret_cast<const uint2*>(row + gc);
#pragma unroll
        for (int e = 0; e < 8; ++e) u.h[e] = f32_to_bf16(sc * decode8(src.code, q.b[e]));
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int64_t cc = gc + e;
            const bool ok = row_ok && cc >= src.c_lo && cc < src.c_hi;
            u.h[e] = ok ? f32_to_bf16(sc * decode8(src.code, row[cc])) : (uint16_t)0;
        }
    }
    *reinterpret_cast<uint4*>(dst) = u.v;
}

// Copies a ROWS×COLS tile with origin (r0, c0) into shared memory [ROWS][COLS + PAD]. Whole,
// aligned, unmasked 16-byte chunks go by cp.async; edge chunks, unaligned ones (a row stride
// that is not a multiple of 8, e.g. rank 4) and dropout-masked ones go through registers.
template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile(uint16_t* s, const TileSrc& src, int64_t r0, int64_t c0, int tid) {
    constexpr int CPR = COLS / 8;  // 16-byte chunks per row
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int chunk = tid + i * THREADS;
        const int r = chunk / CPR, c = (chunk % CPR) * 8;
        uint16_t* dst = s + r * (COLS + PAD) + c;
        const int64_t gr = r0 + r, gc = c0 + c;
        const bool row_ok = gr >= src.r_lo && gr < src.r_hi;
        if (src.code != FK_CODE_BF16) {
            load_chunk8(dst, src, gr, gc, row_ok);
            continue;
        }
        const bool full = row_ok && gc >= src.c_lo && gc + 8 <= src.c_hi;
        const uint16_t* gp = full ? src.base + (gr - src.r_off) * src.ld + (gc - src.c_off) : nullptr;
        const bool aligned = full && (reinterpret_cast<uintptr_t>(gp) & 15) == 0;
        if (aligned && !src.masked) {
            cp_async_16(dst, gp);
            continue;
        }
        union {
            uint4 v;
            uint16_t h[8];
        } u;
        if (aligned) {
            u.v = *reinterpret_cast<const uint4*>(gp);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int64_t cc = gc + e;
                const bool ok = row_ok && cc >= src.c_lo && cc < src.c_hi;
                u.h[e] = ok ? src.base[(gr - src.r_off) * src.ld + (cc - src.c_off)] : (uint16_t)0;
            }
        }
        if (src.masked && row_ok) {
            const int64_t idx0 = (gr - src.r_off) * src.mask_ld + (gc - src.c_off);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float f = fk::dropout_factor(src.seed, (uint64_t)(idx0 + e), src.p, src.keep);
                u.h[e] = f32_to_bf16(bf16_to_f32(u.h[e]) * f);
            }
        }
        *reinterpret_cast<uint4*>(dst) = u.v;
    }
}

// Does segment `sg` contribute to output columns [n0, n0 + BN) of a problem with n columns?
__device__ __forceinline__ bool seg_active(const FkSegment& sg, int64_t n0, int64_t bn, int64_t n) {
    const int64_t lo = sg.n_begin > n0 ? sg.n_begin : n0;
    int64_t hi = sg.n_end < n ? sg.n_end : n;
    hi = hi < n0 + bn ? hi : n0 + bn;
    return sg.k > 0 && lo < hi;
}

template <class C>
__device__ __forceinline__ int next_active(const FkGemmParams& p, const FkGemmProblem& pr, int s, int64_t n0) {
    for (++s; s < pr.seg_end; ++s)
        if (seg_active(p.segment[s], n0, C::BN, pr.n)) break;
    return s;
}

// The A and B tile sources of segment s for this problem.
template <class C>
__device__ __forceinline__ void segment_sources(const FkSegment& sg, const FkGemmProblem& pr, TileSrc& a, TileSrc& b) {
    const int64_t n_hi = sg.n_end < pr.n ? sg.n_end : pr.n;
    const int64_t n_lo = sg.n_begin > 0 ? sg.n_begin : 0;
    a.base = static_cast<const uint16_t*>(sg.a);
    a.ld = sg.lda;
    a.r_off = 0;
    a.c_off = 0;
    if (!C::A_T) {  // [m][k]
        a.r_lo = 0, a.r_hi = pr.m, a.c_lo = 0, a.c_hi = sg.k;
    } else {  // [k][m]
        a.r_lo = 0, a.r_hi = sg.k, a.c_lo = 0, a.c_hi = pr.m;
    }
    b.base = static_cast<const uint16_t*>(sg.b);
    b.ld = sg.ldb;
    if (C::B_T) {  // [n][k]: the slice offset is on the row
        b.r_off = sg.n_begin, b.c_off = 0;
        b.r_lo = n_lo, b.r_hi = n_hi, b.c_lo = 0, b.c_hi = sg.k;
    } else {  // [k][n]: on the column
        b.r_off = 0, b.c_off = sg.n_begin;
        b.r_lo = 0, b.r_hi = sg.k, b.c_lo = n_lo, b.c_hi = n_hi;
    }
    a.code = FK_CODE_BF16;
    a.base8 = nullptr;
    a.scale = nullptr;
    b.code = sg.b_code;
    b.base8 = static_cast<const uint8_t*>(sg.b);
    b.scale = static_cast<const float*>(sg.b_scale);
    a.masked = sg.mask_mode == FK_MASK_A;
    b.masked = sg.mask_mode == FK_MASK_B;
    a.seed = b.seed = sg.mask_seed;
    a.mask_ld = b.mask_ld = sg.mask_ld;
    a.p = b.p = sg.mask_p;
    a.keep = b.keep = sg.mask_keep_scale;
}

// Loads k-tile [k0, k0 + BK) of segment s into pipeline stage `stage`.
template <class C>
__device__ __forceinline__ void load_stage(uint16_t* smem, int stage, const FkGemmParams& p, const FkGemmProblem& pr,
                                           int s, int64_t k0, int64_t m0, int64_t n0, int tid) {
    TileSrc a, b;
    segment_sources<C>(p.segment[s], pr, a, b);
    uint16_t* as = smem + stage * (C::A_STAGE + C::B_STAGE);
    uint16_t* bs = as + C::A_STAGE;
    if (!C::A_T)
        load_tile<C::A_ROWS, C::A_COLS, C::THREADS>(as, a, m0, k0, tid);
    else
        load_tile<C::A_ROWS, C::A_COLS, C::THREADS>(as, a, k0, m0, tid);
    if (C::B_T)
        load_tile<C::B_ROWS, C::B_COLS, C::THREADS>(bs, b, n0, k0, tid);
    else
        load_tile<C::B_ROWS, C::B_COLS, C::THREADS>(bs, b, k0, n0, tid);
}

// acc += this warp's WM×WN share of one BK-deep stage.
template <class C>
__device__ __forceinline__ void mma_stage(const uint16_t* as, const uint16_t* bs, float (&acc)[C::MI][C::NI][4], int wm0,
                                          int wn0, int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        uint32_t af[C::MI][4], bf[C::NI][2];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi) {
            // Matrices 0..3 of the x4 load are A rows 0-7/8-15 × k 0-7, then × k 8-15: a[0..3].
            if constexpr (!C::A_T) {
                const int row = wm0 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int col = kk + (lane >> 4) * 8;
                ldmatrix_x4(af[mi], as + row * (C::A_COLS + PAD) + col);
            } else {  // stored [k][m]: the transposing load gives the same fragment
                const int row = kk + (lane & 7) + (lane >> 4) * 8;
                const int col = wm0 + mi * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4_trans(af[mi], as + row * (C::A_COLS + PAD) + col);
            }
        }
#pragma unroll
        for (int ni = 0; ni < C::NI; ni += 2) {
            // Matrices 0..3: n 0-7 × k 0-7, n 0-7 × k 8-15, n 8-15 × k 0-7, n 8-15 × k 8-15.
            uint32_t r[4];
            if constexpr (C::B_T) {
                const int row = wn0 + ni * 8 + (lane & 7) + (lane >> 4) * 8;
                const int col = kk + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(r, bs + row * (C::B_COLS + PAD) + col);
            } else {  // stored [k][n]
                const int row = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int col = wn0 + ni * 8 + (lane >> 4) * 8;
                ldmatrix_x4_trans(r, bs + row * (C::B_COLS + PAD) + col);
            }
            bf[ni][0] = r[0];
            bf[ni][1] = r[1];
            bf[ni + 1][0] = r[2];
            bf[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < C::NI; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
}

// acc += mask ⊙ tmp for a FK_MASK_OUT segment (the mask of X at the output element), tmp = 0.
template <class C>
__device__ __forceinline__ void fold_masked(float (&acc)[C::MI][C::NI][4], float (&tmp)[C::MI][C::NI][4],
                                            const FkSegment& sg, int64_t row0, int64_t col0, int lane) {
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t row = row0 + mi * 16 + (lane >> 2) + (e >> 1) * 8;
                const int64_t col = col0 + ni * 8 + (lane & 3) * 2 + (e & 1);
                const float f =
                    fk::dropout_factor(sg.mask_seed, (uint64_t)(row * sg.mask_ld + col), sg.mask_p, sg.mask_keep_scale);
                acc[mi][ni][e] += f * tmp[mi][ni][e];
                tmp[mi][ni][e] = 0.0f;
            }
}

template <class C>
__device__ __forceinline__ void gemm_block(const FkGemmParams& p) {
    FK_DYNAMIC_SMEM(smem_raw);
    uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
    // A launch with the wrong block size or too little shared memory would silently compute
    // garbage; stop it loudly instead.
    if (blockDim.x != C::THREADS || dynamic_smem_bytes() < (uint32_t)C::SMEM_BYTES) __trap();
    if ((int)blockIdx.z >= p.num_problems) return;
    const FkGemmProblem& pr = p.problem[blockIdx.z];
    const int64_t m0 = (int64_t)blockIdx.y * C::BM, n0 = (int64_t)blockIdx.x * C::BN;
    if (m0 >= pr.m || n0 >= pr.n) return;  // the grid covers the largest problem of the launch

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp / C::WARPS_N) * C::WM, wn0 = (warp % C::WARPS_N) * C::WN;

    // The K schedule: the BK-tiles of every segment that touches this block's columns, in order.
    int first = next_active<C>(p, pr, pr.seg_begin - 1, n0);
    int tiles = 0;
    for (int s = first; s < pr.seg_end; s = next_active<C>(p, pr, s, n0))
        tiles += (int)((p.segment[s].k + BK - 1) / BK);

    float acc[C::MI][C::NI][4];
    float tmp[C::OUT_MASK ? C::MI : 1][C::OUT_MASK ? C::NI : 1][4];
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
    if constexpr (C::OUT_MASK) {
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) tmp[mi][ni][e] = 0.0f;
    }
    (void)tmp;

    // Load cursor (segment, k offset) runs STAGES - 1 tiles ahead of the compute cursor.
    int ls = first;
    int64_t lk = 0;
    auto advance = [&](int& s, int64_t& k) {
        k += BK;
        if (k >= p.segment[s].k) {
            s = next_active<C>(p, pr, s, n0);
            k = 0;
        }
    };
#pragma unroll
    for (int st = 0; st < C::STAGES - 1; ++st) {
        if (st < tiles) {
            load_stage<C>(smem, st, p, pr, ls, lk, m0, n0, tid);
            advance(ls, lk);
        }
        cp_async_commit();  // possibly empty: keeps one group per tile for the wait count
    }

    int cs = first;
    int64_t ck = 0;
    for (int kt = 0; kt < tiles; ++kt) {
        // Tile kt has landed once at most STAGES - 2 newer groups are pending; the barrier also
        // tells every warp that stage (kt - 1) % STAGES, refilled next, is no longer read.
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();
        const int next = kt + C::STAGES - 1;
        if (next < tiles) {
            load_stage<C>(smem, next % C::STAGES, p, pr, ls, lk, m0, n0, tid);
            advance(ls, lk);
        }
        cp_async_commit();

        const uint16_t* as = smem + (kt % C::STAGES) * (C::A_STAGE + C::B_STAGE);
        const uint16_t* bs = as + C::A_STAGE;
        if constexpr (C::OUT_MASK) {
            const FkSegment& sg = p.segment[cs];
            if (sg.mask_mode == FK_MASK_OUT) {
                mma_stage<C>(as, bs, tmp, wm0, wn0, lane);
                if (ck + BK >= sg.k) fold_masked<C>(acc, tmp, sg, m0 + wm0, n0 + wn0, lane);
            } else {
                mma_stage<C>(as, bs, acc, wm0, wn0, lane);
            }
            advance(cs, ck);
        } else {
            mma_stage<C>(as, bs, acc, wm0, wn0, lane);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = m0 + wm0 + mi * 16 + (lane >> 2) + h * 8;
                const int64_t col = n0 + wn0 + ni * 8 + (lane & 3) * 2;
                fk::store_gemm_pair(pr, row, col, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
            }
}

// The configurations. Large: 8 warps of 64×32 on a 128×128 tile, 4 stages (80 KB of shared
// memory: fits sm_86/89's 99 KB per block, two blocks per SM on sm_80/90). Small: 4 warps of
// 32×32 on 64×64 for the thin LoRA GEMMs (N or M is the rank), where more blocks matter more
// than reuse.
using NtLarge = Cfg<128, 128, 64, 32, 4, false, true, false>;
using NnLarge = Cfg<128, 128, 64, 32, 4, false, false, false>;
using NnLargeMask = Cfg<128, 128, 64, 32, 4, false, false, true>;
using NtSmall = Cfg<64, 64, 32, 32, 4, false, true, false>;
using NnSmall = Cfg<64, 64, 32, 32, 4, false, false, false>;
using TnSmall = Cfg<64, 64, 32, 32, 4, true, false, false>;

static_assert(NtLarge::SMEM_BYTES == FK_SMEM_GEMM_NT_LARGE, "abi.h: FK_SMEM_GEMM_NT_LARGE");
static_assert(NnLarge::SMEM_BYTES == FK_SMEM_GEMM_NN_LARGE, "abi.h: FK_SMEM_GEMM_NN_LARGE");
static_assert(NnLargeMask::SMEM_BYTES == FK_SMEM_GEMM_NN_LARGE, "abi.h: FK_SMEM_GEMM_NN_LARGE");
static_assert(NtSmall::SMEM_BYTES == FK_SMEM_GEMM_NT_SMALL, "abi.h: FK_SMEM_GEMM_NT_SMALL");
static_assert(NnSmall::SMEM_BYTES == FK_SMEM_GEMM_NN_SMALL, "abi.h: FK_SMEM_GEMM_NN_SMALL");
static_assert(TnSmall::SMEM_BYTES == FK_SMEM_GEMM_TN_SMALL, "abi.h: FK_SMEM_GEMM_TN_SMALL");
static_assert(NtLarge::BM == FK_GEMM_LARGE_BM && NtLarge::BN == FK_GEMM_LARGE_BN, "abi.h: large tile");
static_assert(NtLarge::THREADS == FK_GEMM_LARGE_THREADS && NtSmall::THREADS == FK_GEMM_SMALL_THREADS, "abi.h");
static_assert(NtSmall::BM == FK_GEMM_SMALL_BM && NtSmall::BN == FK_GEMM_SMALL_BN, "abi.h: small tile");

}  // namespace

FK_KERNEL void __launch_bounds__(FK_GEMM_LARGE_THREADS) fk_gemm_nt_large(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<NtLarge>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM_LARGE_THREADS) fk_gemm_nn_large(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<NnLarge>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM_LARGE_THREADS) fk_gemm_nn_large_mask(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<NnLargeMask>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM_SMALL_THREADS) fk_gemm_nt_small(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<NtSmall>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM_SMALL_THREADS) fk_gemm_nn_small(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<NnSmall>(p);
}
FK_KERNEL void __launch_bounds__(FK_GEMM_SMALL_THREADS) fk_gemm_tn_small(FK_GRID_PARAMS FkGemmParams p) {
    gemm_block<TnSmall>(p);
}

// ---- the unfused baselines' scale-and-add ------------------------------------------------------

// out = alpha·x + beta·y on a [rows, cols] window (out may alias y): the separate scale and add
// kernels of the PEFT-style unfused LoRA baseline (src/kernels/lora.rs). Grid-stride, one
// element per thread per step; it is a baseline, not a kernel to tune.
FK_KERNEL void fk_axpby_bf16(FK_GRID_PARAMS FkAxpbyParams p) {
    const int64_t total = p.rows * p.cols;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
    const uint16_t* y = static_cast<const uint16_t*>(p.y);
    uint16_t* out = static_cast<uint16_t*>(p.out);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float xv = bf16_to_f32(x[r * p.ld_x + c]);
        const float yv = y ? bf16_to_f32(y[r * p.ld_y + c]) : 0.0f;
        out[r * p.ld_out + c] = f32_to_bf16(p.alpha * xv + p.beta * yv);
    }
}

// ---- 8-bit weights to bf16 for the Hopper GEMM ------------------------------------------------

static_assert(sizeof(FkDequant8Params) == FK_SIZEOF_FkDequant8Params, "abi.h: FkDequant8Params size");

// Four consecutive codes per thread per step (bandwidth-bound: 1 byte in, 2 out per element;
// about 0.1 ms for the largest FLUX linear, 3072 × 21504, at 3.35 TB/s, derived).
FK_KERNEL void __launch_bounds__(FK_POINTWISE_THREADS) fk_dequant8_bf16(FK_GRID_PARAMS FkDequant8Params p) {
    const uint8_t* codes = static_cast<const uint8_t*>(p.codes);
    uint16_t* out = static_cast<uint16_t*>(p.out);
    const int64_t quads = (p.rows * p.cols + 3) / 4, n = p.rows * p.cols;
    fk::grid_stride<FK_POINTWISE_THREADS>(quads, [&](int64_t q) {
        const int64_t i0 = 4 * q;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int64_t i = i0 + e;
            if (i < n) out[i] = f32_to_bf16(p.scales[i / p.cols] * decode8(p.code, codes[i]));
        }
    });
}

// ---- DoRA: row norms without W + s·B·A, and the backward's column work ------------------------

static_assert(sizeof(FkRowSumSqParams) == FK_SIZEOF_FkRowSumSqParams, "abi.h: FkRowSumSqParams size");
static_assert(sizeof(FkDoraNormParams) == FK_SIZEOF_FkDoraNormParams, "abi.h: FkDoraNormParams size");
static_assert(sizeof(FkDoraBwdParams) == FK_SIZEOF_FkDoraBwdParams, "abi.h: FkDoraBwdParams size");
static_assert(FK_SMEM_DORA_BWD == (FK_POINTWISE_THREADS / 32) * 32 * 8, "abi.h: FK_SMEM_DORA_BWD");

// ‖W_r‖² per row, one warp per row: the lanes stride the row (coalesced), f64 sums of the f32
// element values (the 8-bit ones as scale · decode, unrounded: the CPU's dequantised weight),
// then the warp's butterfly. Run once per frozen linear (the engine keeps the result).
FK_KERNEL void __launch_bounds__(FK_POINTWISE_THREADS) fk_row_sumsq(FK_GRID_PARAMS FkRowSumSqParams p) {
    fk::warp_stride<FK_POINTWISE_THREADS>(p.rows, [&](int64_t r, int lane) {
        double acc = 0.0;
        if (p.code == FK_CODE_BF16) {
            const uint16_t* w = static_cast<const uint16_t*>(p.w) + r * p.cols;
            for (int64_t c = lane; c < p.cols; c += 32) {
                const double v = bf16_to_f32(w[c]);
                acc = fk::rn_dadd(acc, fk::rn_dmul(v, v));
            }
        } else {
            const uint8_t* w = static_cast<const uint8_t*>(p.w) + r * p.cols;
            const float sc = p.scales[r];
            for (int64_t c = lane; c < p.cols; c += 32) {
                const double v = sc * decode8(p.code, w[c]);
                acc = fk::rn_dadd(acc, fk::rn_dmul(v, v));
            }
        }
        acc = fk::warp_sum_f64(acc);
        if (lane == 0) static_cast<float*>(p.out)[r] = (float)acc;
    });
}

// g = m / ‖W_j + s·B_j·A‖ per row from its three parts, one warp per row: the lanes split the
// rank (cross term B_j·wa[:, j], and the quadratic form's rows B_jq·Σ_p aa[q, p]·B_jp). Each
// quadratic-form row (r products) is an f32 sum, everything else f64: the r² products per row
// stay at the f32 rate (f64 runs at 1/64 of it on sm_86/89), and the quadratic term is small
// against ‖W_j‖², so its f32 rounding is far below the bf16 factors' own. A zero norm gives
// g = m/0 as the CPU reference does (inf, or NaN for m = 0).
FK_KERNEL void __launch_bounds__(FK_POINTWISE_THREADS) fk_dora_norm(FK_GRID_PARAMS FkDoraNormParams p) {
    const uint16_t* b = static_cast<const uint16_t*>(p.b);
    fk::warp_stride<FK_POINTWISE_THREADS>(p.rows, [&](int64_t i, int lane) {
        const uint16_t* bi = b + i * p.rank;
        double cross = 0.0, quad = 0.0;
        for (int64_t q = lane; q < p.rank; q += 32) {
            const double bq = bf16_to_f32(bi[q]);
            cross = fk::rn_dadd(cross, fk::rn_dmul(bq, (double)p.wa[q * p.ld_wa + i]));
            const float* aq = p.aa + q * p.rank;
            float row = 0.0f;
            for (int64_t t = 0; t < p.rank; ++t) row += aq[t] * bf16_to_f32(bi[t]);
            quad = fk::rn_dadd(quad, fk::rn_dmul(bq, (double)row));
        }
        cross = fk::warp_sum_f64(cross);
        quad = fk::warp_sum_f64(quad);
        if (lane == 0) {
            const double s = p.scale;
            double n2 = fk::rn_dadd((double)p.w_sumsq[i], fk::rn_dmul(2.0 * s, cross));
            n2 = fk::rn_dadd(n2, fk::rn_dmul(fk::rn_dmul(s, s), quad));
            const float norm = (float)fk::rn_dsqrt(n2 > 0.0 ? n2 : 0.0);
            static_cast<float*>(p.norm)[i] = norm;
            static_cast<float*>(p.g)[i] = p.magnitude[i] / norm;
        }
    });
}

// The backward's column work of a DoRA term: lane = column (coalesced rows), warp w of 8 takes
// rows w, w + 8, …; the 8 partial dm sums meet in shared memory and warp 0 adds them in warp
// order (deterministic). Every thread reaches the barrier (columns past `cols` add nothing).
FK_KERNEL void __launch_bounds__(FK_POINTWISE_THREADS) fk_dora_bwd(FK_GRID_PARAMS FkDoraBwdParams p) {
    constexpr int WARPS = FK_POINTWISE_THREADS / 32;
    FK_DYNAMIC_SMEM(smem_raw);
    double* part = reinterpret_cast<double*>(smem_raw);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t j = (int64_t)blockIdx.x * 32 + lane;
    const uint16_t* dy = static_cast<const uint16_t*>(p.dy);
    const uint16_t* yp = static_cast<const uint16_t*>(p.ypre);
    uint16_t* dys = static_cast<uint16_t*>(p.dy_scaled);
    double acc = 0.0;
    if (j < p.cols) {
        const float g = p.g[j];
        // Row pointers stepped by WARPS rows (indexing i·ld each step spilled a register on
        // sm_80 under ptxas 13.0).
        const uint16_t* dyj = dy + j + warp * p.ld_dy;
        const uint16_t* ypj = yp + j + warp * p.ld_ypre;
        uint16_t* dysj = dys + j + warp * p.ld_dy;
        const int64_t sdy = WARPS * p.ld_dy, syp = WARPS * p.ld_ypre;
        for (int64_t i = warp; i < p.m; i += WARPS, dyj += sdy, ypj += syp, dysj += sdy) {
            const float d = bf16_to_f32(*dyj);
            acc = fk::rn_dadd(acc, fk::rn_dmul((double)d, (double)bf16_to_f32(*ypj)));
            *dysj = f32_to_bf16(g * d);
        }
    }
    part[warp * 32 + lane] = acc;
    __syncthreads();
    if (warp == 0 && j < p.cols) {
        double sum = 0.0;
        for (int w = 0; w < WARPS; ++w) sum = fk::rn_dadd(sum, part[w * 32 + lane]);
        float* dm = static_cast<float*>(p.dm);
        dm[j] += (float)(sum / (double)p.norm[j]);
    }
}
