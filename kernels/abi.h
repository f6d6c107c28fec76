// flux-kernels: the ABI shared by every .cu file and the Rust host.
//
// Entry points are extern "C" so the host finds them by name in the embedded fatbins. Element
// counts are int64 so a 4608-token × 21504-wide activation (99 M elements) and larger never
// overflow an index.
//
// build.rs reads this file and generates the Rust side (src/kernels/abi.rs includes it): every
// integer #define becomes a constant, every typedef struct a #[repr(C)] struct, every FK_KERNEL
// declaration a kernel-name constant. It parses a restricted subset of C, so keep to it:
//   - `#define NAME <integer>` (other #defines are skipped),
//   - `typedef struct { <type> <name>; ... } Name;` with types int32_t, int64_t, uint32_t,
//     uint64_t, float, `const void*`, `void*`, `const float*` or an earlier struct, and arrays
//     `<type> <name>[<integer or #define>];`,
//   - `FK_KERNEL void name(FK_GRID_PARAMS StructName p);`.
// Pointers are device addresses (u64 on the Rust side). Structs carry explicit padding fields so
// the layout has no implicit holes; each struct's size is stated as FK_SIZEOF_<Name>, checked by
// static_assert in lora_gemm.cu and by const asserts in the generated Rust.
#pragma once
#include <stdint.h>

#define FK_KERNEL extern "C" __global__
// Large parameter structs are read in place from the constant bank (indexing one with a run-time
// index would otherwise copy the whole struct to local memory in every thread).
#define FK_GRID_PARAMS const __grid_constant__

// Threads per block of the pointwise kernels; the host launches ceil(n / FK_POINTWISE_THREADS).
#define FK_POINTWISE_THREADS 256

// ---------------------------------------------------------------------------------------------
// LoRA GEMM (kernels/lora_gemm.cu). One launch runs up to FK_MAX_PROBLEMS independent GEMMs
// (blockIdx.z picks one); each is a sum of segments that share the output:
//   out[i, n] = alpha · Σ_seg A_seg[i, :]·B_seg[:, n]  (+ bias[n])  (+ beta · out[i, n])
// The segments are the K-concatenation: the forward is [X | s·S]·[W | B]ᵀ, the input gradient
// [dY | s·G]·[W ; A]. Operands are bf16, accumulation f32.
// ---------------------------------------------------------------------------------------------
#define FK_MAX_SEGMENTS 16
#define FK_MAX_PROBLEMS 16

// LoRA dropout masks (the hash of src/ops/lora.rs Dropout::factor, so CPU and GPU drop the same
// elements). The masked matrix is always the layer input X [tokens, d_in], element (t, c) at flat
// index t·mask_ld + c; the mode says where X appears in the segment.
#define FK_MASK_NONE 0
// A is X (row = token, column = feature): the forward's S = X̃·Aᵀ.
#define FK_MASK_A 1
// B is X stored [token][feature] (k = token, n = feature): dA = Gᵀ·X̃.
#define FK_MASK_B 2
// The segment's contribution to the output (row = token, column = feature) is masked: the
// dropout term's part of dX.
#define FK_MASK_OUT 3

// One K-segment. A is [m, k] of the problem, B is [k, n] restricted to columns [n_begin, n_end):
// outside that range B reads as zero (a LoRA term on a slice of the output), never from memory.
// Storage order is fixed per kernel (see lora_gemm.cu): A row-major [m][k] ("N") or [k][m] ("T");
// B [n][k] ("T", nn.Linear weights) or [k][n] ("N").
typedef struct {
    const void* a;          // bf16
    const void* b;          // bf16, element for output column n at index n - n_begin
    int64_t lda;            // elements between consecutive stored rows of A
    int64_t ldb;            // elements between consecutive stored rows of B
    int64_t k;              // reduction length of this segment
    int64_t n_begin;        // output columns this segment's B covers
    int64_t n_end;
    uint64_t mask_seed;     // Dropout::seed
    int64_t mask_ld;        // row stride of X for the mask index (d_in)
    float mask_p;           // Dropout::p
    float mask_keep_scale;  // 1/(1 - p), computed by the host in f32 exactly as the CPU does
    int32_t mask_mode;      // FK_MASK_*
    int32_t b_code;         // FK_CODE_*: how B's elements are stored
    const void* b_scale;    // 8-bit B only: f32 per stored row of B; element = scale[row]·decode(byte)
} FkSegment;
#define FK_SIZEOF_FkSegment 96

// Storage of a segment's B operand. The 8-bit codes are the frozen base weight W [d_out, d_in]
// of an 8-bit checkpoint (src/quant): dequantised while the tile is loaded into shared memory,
// scale per W row (= output channel) in both products that read W (X·Wᵀ and dY·W), so no bf16
// copy of the weight ever exists.
#define FK_CODE_BF16 0
#define FK_CODE_I8 1
#define FK_CODE_E4M3 2

typedef struct {
    int64_t m;              // output rows
    int64_t n;              // output columns
    void* out;              // bf16 or f32, [m][ldc]
    int64_t ldc;
    const float* bias;      // [n] or null
    float alpha;            // scales the accumulated sum (not the bias)
    float beta;             // adds beta·C: C = c_in when set, else out (gradient accumulation)
    int32_t out_f32;        // 1: f32 output, 0: bf16
    int32_t seg_begin;      // segments [seg_begin, seg_end) of FkGemmParams.segment
    int32_t seg_end;
    int32_t pad0;
    const void* c_in;       // f32 [m][ldc] or null: cuBLAS's base product, so Y is rounded once
    const float* col_scale; // [n] or null: DoRA's g; out = col_scale ⊙ (alpha·Σ + beta·c_in) + bias
} FkGemmProblem;
#define FK_SIZEOF_FkGemmProblem 80

typedef struct {
    int32_t num_problems;
    int32_t pad0;
    int64_t pad1;
    FkGemmProblem problem[FK_MAX_PROBLEMS];
    FkSegment segment[FK_MAX_SEGMENTS];
} FkGemmParams;
#define FK_SIZEOF_FkGemmParams 2832

// Tile shapes of the two configurations (the host sizes grids from these) and the dynamic shared
// memory each entry point needs (lora_gemm.cu static_asserts them against its tile layout; the
// kernel traps if launched with less).
#define FK_GEMM_LARGE_BM 128
#define FK_GEMM_LARGE_BN 128
#define FK_GEMM_LARGE_THREADS 256
#define FK_GEMM_SMALL_BM 64
#define FK_GEMM_SMALL_BN 64
#define FK_GEMM_SMALL_THREADS 128
#define FK_SMEM_GEMM_NT_LARGE 81920
#define FK_SMEM_GEMM_NN_LARGE 75776
#define FK_SMEM_GEMM_NT_SMALL 40960
#define FK_SMEM_GEMM_NN_SMALL 38912
#define FK_SMEM_GEMM_TN_SMALL 36864

// Entry points. Letters name the storage of A then B as in BLAS: N = A [m][k] / B [k][n],
// T = A [k][m] / B [n][k]. "large" is the 128×128 tile for the compute-bound base GEMMs,
// "small" the 64×64 tile for the thin LoRA GEMMs; grid = (n tiles, m tiles, problems).
FK_KERNEL void fk_gemm_nt_large(FK_GRID_PARAMS FkGemmParams p);      // forward Y
FK_KERNEL void fk_gemm_nt_small(FK_GRID_PARAMS FkGemmParams p);      // S = X̃·Aᵀ
FK_KERNEL void fk_gemm_nn_large(FK_GRID_PARAMS FkGemmParams p);      // dX, no dropout
FK_KERNEL void fk_gemm_nn_large_mask(FK_GRID_PARAMS FkGemmParams p); // dX, FK_MASK_OUT segments
FK_KERNEL void fk_gemm_nn_small(FK_GRID_PARAMS FkGemmParams p);      // G = dY[:, rows]·B
FK_KERNEL void fk_gemm_tn_small(FK_GRID_PARAMS FkGemmParams p);      // dA = Gᵀ·X̃, dB = dYᵀ·S

// ---------------------------------------------------------------------------------------------
// out = alpha·x + beta·y on a [rows, cols] bf16 window of three row-major matrices (out may
// alias y). Only the PEFT-style unfused baseline uses it: its scale and add are separate kernels.
// ---------------------------------------------------------------------------------------------
typedef struct {
    void* out;
    const void* x;
    const void* y;
    int64_t rows;
    int64_t cols;
    int64_t ld_out;
    int64_t ld_x;
    int64_t ld_y;
    float alpha;
    float beta;
} FkAxpbyParams;
#define FK_SIZEOF_FkAxpbyParams 72

FK_KERNEL void fk_axpby_bf16(FK_GRID_PARAMS FkAxpbyParams p);

// An 8-bit base weight dequantised to bf16, out[r][c] = bf16(scale[r] · decode(codes[r][c])) —
// the value lora_gemm.cu's tile loader makes — for the Hopper GEMM, which reads bf16 through TMA
// (src/kernels/lora.rs runs it before each 8-bit linear on compute capability 9.0).
typedef struct {
    void* out;            // bf16 [rows][cols]
    const void* codes;    // u8 [rows][cols]
    const float* scales;  // f32 [rows]
    int64_t rows;
    int64_t cols;
    int32_t code;         // FK_CODE_I8 or FK_CODE_E4M3
    int32_t pad0;
} FkDequant8Params;
#define FK_SIZEOF_FkDequant8Params 48

FK_KERNEL void fk_dequant8_bf16(FK_GRID_PARAMS FkDequant8Params p);

// ---------------------------------------------------------------------------------------------
// DoRA (kernels/lora_gemm.cu; CPU twin src/adapters/dora.rs). The norm of each output row of
// W + s·B·A is never formed: ‖W_j‖² (once per frozen linear) + 2s·B_j·(A·W_jᵀ) (a thin GEMM
// that reads W once) + s²·B_j·(A·Aᵀ)·B_jᵀ, and the rescale g = m / ‖·‖ is the column scale
// of the fused GEMM's epilogue (FkGemmProblem.col_scale).
// ---------------------------------------------------------------------------------------------

// out[r] = Σ_c W[r, c]² (f64 sums) for r < rows; one warp per row, FK_POINTWISE_THREADS a block.
typedef struct {
    void* out;            // f32 [rows]
    const void* w;        // bf16 [rows][cols], or 8-bit codes [rows][cols] with `scales`
    const float* scales;  // 8-bit only: f32 per row (element = scale · decode(code))
    int64_t rows;
    int64_t cols;
    int32_t code;         // FK_CODE_*
    int32_t pad0;
} FkRowSumSqParams;
#define FK_SIZEOF_FkRowSumSqParams 48

// Per row i < rows of a DoRA term: n² = w_sumsq[i] + 2s·Σ_q B[i,q]·wa[q, i]
// + s²·Σ_q B[i,q]·(Σ_p aa[q, p]·B[i,p]) (inner sums f32, the rest f64), norm[i] = √max(n², 0),
// g[i] = magnitude[i] / norm[i].
// One warp per row, FK_POINTWISE_THREADS a block.
typedef struct {
    void* g;                // f32 [rows]
    void* norm;             // f32 [rows]
    const float* w_sumsq;   // f32 [rows]: ‖W_j‖² of the term's rows
    const float* wa;        // f32 [rank][ld_wa]: A·W[rows]ᵀ
    const float* aa;        // f32 [rank][rank]: A·Aᵀ
    const void* b;          // bf16 [rows][rank]
    const float* magnitude; // f32 [rows]
    int64_t rows;
    int64_t rank;
    int64_t ld_wa;
    float scale;            // s
    int32_t pad0;
} FkDoraNormParams;
#define FK_SIZEOF_FkDoraNormParams 88

// The backward's column work on a DoRA term's cols output columns (the norm a constant, as PEFT):
// dm[j] += Σ_i dY[i, j]·Ypre[i, j] / norm[j] (f64 sums in a fixed order) and
// dy_scaled[i, j] = bf16(g[j]·dY[i, j]). Blocks of FK_POINTWISE_THREADS: 32 columns × 8 row
// strides, FK_SMEM_DORA_BWD bytes of dynamic shared memory; grid = ceil(cols / 32).
typedef struct {
    void* dy_scaled;      // bf16 [m][ld_dy], at the term's first column
    void* dm;             // f32 [cols], accumulated
    const void* dy;       // bf16 [m][ld_dy], at the term's first column
    const void* ypre;     // bf16 [m][ld_ypre]: X·Wᵀ + s·S·Bᵀ on the term's columns
    const float* g;       // f32 [cols]
    const float* norm;    // f32 [cols]
    int64_t m;
    int64_t cols;
    int64_t ld_dy;
    int64_t ld_ypre;
} FkDoraBwdParams;
#define FK_SIZEOF_FkDoraBwdParams 80
#define FK_SMEM_DORA_BWD 2048

FK_KERNEL void fk_row_sumsq(FK_GRID_PARAMS FkRowSumSqParams p);
FK_KERNEL void fk_dora_norm(FK_GRID_PARAMS FkDoraNormParams p);
FK_KERNEL void fk_dora_bwd(FK_GRID_PARAMS FkDoraBwdParams p);

// ---------------------------------------------------------------------------------------------
// Flash attention (kernels/attention.cu), FlashAttention-2 structure: softmax(scale·Q·Kᵀ)·V
// over one sequence of l tokens per (batch, head), the scores never stored. Head dims 16, 32,
// 64 and 128. All tensors are head-major [b, h, l, d], bf16, f32 accumulation; the log-sum-exp
// per query row is saved for the backward, which recomputes P from it. An optional key-padding
// mask (T5 padding) removes keys per batch element. The backward is deterministic: dK, dV in one
// kernel over key tiles, dQ in another over query tiles, no atomics.
// ---------------------------------------------------------------------------------------------
typedef struct {
    const void* q;        // bf16 [b, h, l, d]
    const void* k;        // bf16 [b, h, l, d]
    const void* v;        // bf16 [b, h, l, d]
    void* o;              // bf16 [b, h, l, d] (forward output, backward input)
    void* lse;            // f32 [b, h, l]: natural-log log-sum-exp; +inf for a row with no key
    const void* kv_mask;  // uint8 [b, l]: nonzero = the key takes part; null = every key
    const void* dout;     // bf16 [b, h, l, d] (backward)
    void* dq;             // bf16 [b, h, l, d] (backward outputs)
    void* dk;
    void* dv;
    void* delta;          // f32 [b, h, l] backward scratch: rowsum(dO ∘ O)
    int64_t b;
    int64_t h;
    int64_t l;
    int64_t d;
    float scale;          // softmax scale, 1/√d for FLUX
    int32_t pad0;
} FkAttnParams;
#define FK_SIZEOF_FkAttnParams 128

// Tiles: 4 warps per block, each warp owning 16 rows; the host sizes grids (ceil(l / 64), b·h)
// and dynamic shared memory (bf16 rows padded by FK_ATTN_PAD elements) from these.
#define FK_ATTN_THREADS 128
#define FK_ATTN_BLOCK 64
#define FK_ATTN_PAD 8

// The forward's blocks own FK_ATTN_FWD_ROWS query rows (2 row groups of 16 per warp); the
// variant fk_attn_fwd_r64 owns 64 (one per warp), kept for the side-by-side benchmark.
#define FK_ATTN_FWD_ROWS 128

FK_KERNEL void fk_attn_fwd(FK_GRID_PARAMS FkAttnParams p);       // O, LSE
FK_KERNEL void fk_attn_fwd_r64(FK_GRID_PARAMS FkAttnParams p);   // the same, 64-row blocks
FK_KERNEL void fk_attn_bwd_prep(FK_GRID_PARAMS FkAttnParams p);  // delta = rowsum(dO ∘ O)
FK_KERNEL void fk_attn_bwd_dkdv(FK_GRID_PARAMS FkAttnParams p);  // dK, dV (grid over key tiles)
FK_KERNEL void fk_attn_bwd_dq(FK_GRID_PARAMS FkAttnParams p);    // dQ (grid over query tiles)

// The Hopper forward (kernels/attention_sm90.cu, sm_90a only; FlashAttention-3 structure): a
// producer warp streams Q once and K/V tiles through a shared-memory ring with TMA
// (cp.async.bulk.tensor), two consumer warpgroups compute S = Q·Kᵀ and O += P·V with wgmma. Q,
// K and V reach it through TMA descriptors (CUtensorMap, made on the host by
// cuTensorMapEncodeTiled over the [b·h, l, d] bf16 tensors with 64-element × FK_ATTN90_BLOCK_N-row
// boxes and 128-byte swizzle), passed by value in the parameter struct; the rest of the problem
// is the FkAttnParams above. Head dims 64 and 128; the host runs the sm_80 kernels for others.
// The TMA hardware reads a descriptor only at a 128-byte aligned address (CUDA 13 declares
// CUtensorMap alignas(128)): FK_ALIGN128 gives the device-side struct that alignment.
#define FK_ALIGN128 __align__(128)
typedef struct FK_ALIGN128 {
    uint64_t opaque[16];
} FkTensorMap;
#define FK_SIZEOF_FkTensorMap 128

typedef struct {
    FkTensorMap tq;  // [b·h][l][d] → boxes of FK_ATTN90_BLOCK_M rows
    FkTensorMap tk;  // boxes of FK_ATTN90_BLOCK_N rows
    FkTensorMap tv;
    FkAttnParams a;
} FkAttn90Params;
#define FK_SIZEOF_FkAttn90Params 512

// 3 warpgroups: a producer and two consumers of 64 query rows each; K/V tiles of BLOCK_N keys
// in FK_ATTN90_STAGES ring slots. The host sizes dynamic shared memory as FK_ATTN90_SMEM_D64 or
// FK_ATTN90_SMEM_D128 (tiles 1024-byte aligned for the 128-byte swizzle: +1024 slack, + barriers).
#define FK_ATTN90_THREADS 384
#define FK_ATTN90_BLOCK_M 128
#define FK_ATTN90_BLOCK_N 128
#define FK_ATTN90_STAGES 2
#define FK_ATTN90_SMEM_D64 83968
#define FK_ATTN90_SMEM_D128 165888

FK_KERNEL void fk_attn_fwd_sm90(FK_GRID_PARAMS FkAttn90Params p);         // O, LSE (sm_90a), pipelined
FK_KERNEL void fk_attn_fwd_sm90_serial(FK_GRID_PARAMS FkAttn90Params p);  // the same, one step at a time

// The Hopper backward (attention_sm90.cu), deterministic like fk_attn_bwd_*: fk_attn_bwd_prep's
// delta, then one kernel per key block for dK and dV and one per query block for dQ, no atomics.
// Each block holds FK_ATTN90_BWD_BLOCK rows of a "fixed" pair of tensors (x1, x2: K and V for
// dK/dV, Q and dO for dQ; boxes of 64 columns × FK_ATTN90_BWD_BLOCK rows) and streams tiles of
// FK_ATTN90_BWD_TILE rows of the other pair (y1, y2: Q and dO, or K and V; boxes of 64 ×
// FK_ATTN90_BWD_TILE) through FK_ATTN90_STAGES ring slots (with the tile rows' LSE and delta
// for dK/dV). Dynamic shared memory:
// FK_ATTN90_BWD_SMEM_D64 / _D128.
typedef struct {
    FkTensorMap x1;
    FkTensorMap x2;
    FkTensorMap y1;
    FkTensorMap y2;
    FkAttnParams a;
} FkAttn90BwdParams;
#define FK_SIZEOF_FkAttn90BwdParams 640
#define FK_ATTN90_BWD_BLOCK 128
#define FK_ATTN90_BWD_TILE 64
#define FK_ATTN90_BWD_SMEM_D64 68608
#define FK_ATTN90_BWD_SMEM_D128 134144

FK_KERNEL void fk_attn_bwd_dkdv_sm90(FK_GRID_PARAMS FkAttn90BwdParams p);  // dK, dV (sm_90a), overlapped
FK_KERNEL void fk_attn_bwd_dq_sm90(FK_GRID_PARAMS FkAttn90BwdParams p);    // dQ (sm_90a), overlapped
// The same two, each tile's products one after another (the same bits; the side-by-side benchmark).
FK_KERNEL void fk_attn_bwd_dkdv_sm90_serial(FK_GRID_PARAMS FkAttn90BwdParams p);
FK_KERNEL void fk_attn_bwd_dq_sm90_serial(FK_GRID_PARAMS FkAttn90BwdParams p);

// ---------------------------------------------------------------------------------------------
// The LoRA GEMM on Hopper (kernels/lora_gemm_sm90.cu, sm_90a): the large launch of the LoRA
// linear, out = alpha · Σ_seg A_seg·B_seg (+ bias) (+ beta · c_in), with the semantics of one
// FkGemmProblem of fk_gemm_nt_large / fk_gemm_nn_large without masks or 8-bit codes (the host
// keeps those on the sm_80 kernels). Every operand reaches the kernel through a TMA descriptor:
// A of segment s is ta[s] over [m][k_s] (64-element × FK_GEMM90_BM-row boxes); B is tb[s], over
// [n_end − n_begin][k_s] in the NT kernels (64 × BN-row boxes) or [k_s][n_end − n_begin] in the
// NN kernels (64 × 64 boxes). All boxes 128-byte swizzled; out-of-range elements read as zero.
// Persistent: the host launches min(tiles, SMs) blocks, block b takes tiles b, b + grid, ….
// ---------------------------------------------------------------------------------------------
#define FK_GEMM90_MAX_SEGMENTS 9
#define FK_GEMM90_THREADS 384
#define FK_GEMM90_BM 128
#define FK_GEMM90_BK 64

// mask = 1 (the NN kernels' first segment only): the segment's product is multiplied element by
// element by the dropout factor of X at the output element, as FK_MASK_OUT in the sm_80 kernel
// (the dropout term of dX): the consumers finish that segment, scale the accumulators, then add
// the other segments.
typedef struct {
    int64_t k;        // reduction length of this segment
    int64_t n_begin;  // output columns its B covers (tile columns outside read zero)
    int64_t n_end;
    uint64_t mask_seed;     // Dropout::seed
    int64_t mask_ld;        // row stride of X for the mask index (d_in)
    float mask_p;           // Dropout::p
    float mask_keep_scale;  // 1/(1 − p) as the host computes it
    int32_t mask;           // 1: masked (see above)
    int32_t pad0;
} FkGemm90Segment;
#define FK_SIZEOF_FkGemm90Segment 56

typedef struct FK_ALIGN128 {
    FkTensorMap ta[FK_GEMM90_MAX_SEGMENTS];
    FkTensorMap tb[FK_GEMM90_MAX_SEGMENTS];
    FkGemmProblem pr;  // m, n, out, ldc, bias, alpha, beta, out_f32, c_in (segments unused)
    FkGemm90Segment seg[FK_GEMM90_MAX_SEGMENTS];
    int32_t num_segments;
    int32_t pad0;
    int64_t pad1[6];
} FkGemm90Params;
#define FK_SIZEOF_FkGemm90Params 2944

// Tiles of FK_GEMM90_BM × BN (BN = 256 or 128), a producer and two consumer warpgroups of 64
// rows each, FK_GEMM90_STAGES_BN* ring slots of BK-deep A and B tiles. Dynamic shared memory
// FK_GEMM90_SMEM_BN256 / _BN128 (tiles, barriers, 1024-byte alignment slack).
#define FK_GEMM90_STAGES_BN256 4
#define FK_GEMM90_STAGES_BN128 6
#define FK_GEMM90_SMEM_BN256 198656
#define FK_GEMM90_SMEM_BN128 198656

FK_KERNEL void fk_gemm90_nt_bn256(FK_GRID_PARAMS FkGemm90Params p);  // Y = [X | S']·[W | B]ᵀ
FK_KERNEL void fk_gemm90_nt_bn128(FK_GRID_PARAMS FkGemm90Params p);
FK_KERNEL void fk_gemm90_nn_bn256(FK_GRID_PARAMS FkGemm90Params p);  // dX = [dY | G']·[W ; A]
FK_KERNEL void fk_gemm90_nn_bn128(FK_GRID_PARAMS FkGemm90Params p);

// The materialised-softmax baseline's middle step: P = softmax(S) row by row, S f32 [rows, l]
// (already scaled), P bf16; masked keys get weight 0. One block of FK_ATTN_THREADS per row, with
// FK_SMEM_SOFTMAX bytes of dynamic shared memory.
typedef struct {
    void* p;
    const void* s;
    const void* kv_mask;     // uint8 [b, l] or null
    int64_t rows;
    int64_t l;
    int64_t rows_per_batch;  // h·l: the mask row of score row r is r / rows_per_batch
} FkSoftmaxParams;
#define FK_SIZEOF_FkSoftmaxParams 48

#define FK_SMEM_SOFTMAX 16

FK_KERNEL void fk_softmax_rows(FK_GRID_PARAMS FkSoftmaxParams p);

// ---------------------------------------------------------------------------------------------
// The training step's normalisation and modulation (kernels/norm.cu), SiLU (kernels/activation.cu),
// loss and optimizer (kernels/optim.cu) kernels, f32 in and out. CPU twins:
// src/model/double_block.rs ln_modulate / ln_modulate_backward, src/ops/modulation.rs (gated
// residual), src/ops/activation.rs, src/ops/loss.rs and src/ops/optim.rs (AdamW, clip_grad_norm). Every reduction is deterministic (no float
// atomics): per-block partials in a scratch buffer, then a second kernel that adds them in a
// fixed order. Tensors [b, l, c] are row-major; per-sample vectors (shift, scale, gate) [b, c].
// ---------------------------------------------------------------------------------------------
#define FK_STEP_THREADS 256
// Tokens per partial sum of the per-sample column reductions (dshift, dscale, dgate).
#define FK_STEP_CHUNK_TOKENS 64
// Elements per block of the multi-tensor kernels (AdamW, sum of squares).
#define FK_STEP_BLOCK_ELEMS 4096
// Blocks of the MSE partial pass (at most; grid-stride beyond).
#define FK_STEP_MAX_PARTIALS 1024
// Dynamic shared memory of every step kernel: FK_STEP_THREADS doubles for the reductions.
#define FK_SMEM_STEP 2048

// LayerNorm (no affine) + modulation: n = (x − mean)·rstd, out = (1 + scale)⊙n + shift.
// Backward: dn = (1 + scale)⊙dout, dx = rstd·(dn − mean(dn) − n·mean(dn⊙n)) per row;
// dshift = Σ_l dout, dscale = Σ_l n⊙dout as partials [2][b][chunks][c] then fk_col_sum.
typedef struct {
    const void* x;        // f32 [b, l, c]
    const void* shift;    // f32 [b, c]
    const void* scale;    // f32 [b, c]
    void* out;            // f32 [b, l, c]
    void* normed;         // f32 [b, l, c]: n, saved for the backward (forward output, backward input)
    void* mean;           // f32 [b·l] or null
    void* rstd;           // f32 [b·l] (forward output, backward input)
    const void* dout;     // f32 [b, l, c] (backward)
    void* dx;             // f32 [b, l, c] (backward)
    void* partial;        // f32 [2, b, chunks, c] backward scratch
    int64_t b;
    int64_t l;
    int64_t c;
    int64_t chunk;        // tokens per partial (FK_STEP_CHUNK_TOKENS); chunks = ceil(l / chunk)
    float eps;            // 1e-6 in FLUX
    int32_t normed_bf16;  // 1 = normed is bf16 (written rounded; out is then computed from the
                          // rounded n, so `modulate_only` reproduces it bit for bit)
    int32_t out_bf16;     // 1 = out is bf16
    int32_t modulate_only;  // forward: 1 = skip the statistics, out from the saved normed (bf16)
} FkLnModParams;
#define FK_SIZEOF_FkLnModParams 128

// Gated residual out = x + gate⊙y (out may alias x). Backward: dx = dout (written when dx is
// not null), dy = gate⊙dout, dgate = Σ_l y⊙dout as partials [1][b][chunks][c] then fk_col_sum.
typedef struct {
    const void* x;        // f32 [b, l, c]
    const void* y;        // f32 [b, l, c]
    const void* gate;     // f32 [b, c]
    void* out;            // f32 [b, l, c]
    const void* dout;     // f32 [b, l, c]
    void* dx;             // f32 [b, l, c] or null
    void* dy;             // f32 [b, l, c]
    void* partial;        // f32 [1, b, chunks, c]
    int64_t b;
    int64_t l;
    int64_t c;
    int64_t chunk;
    int32_t y_bf16;       // 1 = y is bf16 (a linear's rounded output)
    int32_t dy_bf16;      // 1 = dy is written bf16 (the next GEMM's dY)
} FkGatedParams;
#define FK_SIZEOF_FkGatedParams 104

// out_s[bi, j] = Σ_k partial[s, bi, k, j] in ascending k, for s < gridDim.z (at most 2).
typedef struct {
    const void* partial;  // f32 [sets, b, chunks, c]
    void* out0;           // f32 [b, c]
    void* out1;           // f32 [b, c] (set 1) or null
    int64_t b;
    int64_t chunks;
    int64_t c;
} FkColSumParams;
#define FK_SIZEOF_FkColSumParams 48

// Pointwise activations and their backwards: out = f(x), or out = dout⊙f'(x).
typedef struct {
    const void* x;        // f32 [n]
    const void* dout;     // f32 [n] (backward)
    void* out;            // f32 [n]
    int64_t n;
} FkPointwiseParams;
#define FK_SIZEOF_FkPointwiseParams 32

// MSE loss and gradient in one pass: partial[block] = Σ w·(pred − target)² in f64 and
// grad = 2·w·(pred − target)/n (f32, as ops::loss::mse_backward); fk_sum_f64 adds the partials.
typedef struct {
    const void* pred;     // f32 [n]
    const void* target;   // f32 [n]
    const void* weight;   // f32 [n / per] per-sample weights, or null (all 1)
    void* grad;           // f32 [n]
    void* partial;        // f64 [gridDim.x]
    int64_t n;
    int64_t per;          // elements per weight
    float n_f32;          // n rounded to f32, the CPU's divisor
    int32_t pad0;
} FkMseParams;
#define FK_SIZEOF_FkMseParams 64

// out[0] = Σ_i partial[i] (f64) by one block, in a fixed order.
typedef struct {
    const void* partial;  // f64 [n]
    void* out;            // f64 [1]
    int64_t n;
    int64_t pad0;
} FkSumF64Params;
#define FK_SIZEOF_FkSumF64Params 32

// Multi-tensor AdamW (train::optim::AdamW::step, in f64 like it): up to FK_ADAM_MAX_TENSORS
// tensors per launch, each cut into blocks of FK_STEP_BLOCK_ELEMS; block_begin is the first
// block of the tensor in this launch. The host splits longer lists over several launches.
// (32 at most: the generated Rust structs derive Default, which arrays longer than 32 lack.)
#define FK_ADAM_MAX_TENSORS 32
typedef struct {
    void* param;          // f32 [numel]
    const void* grad;     // f32 [numel]
    void* m;              // f32 [numel]
    void* v;              // f32 [numel]
    int64_t numel;
    int64_t block_begin;
} FkAdamTensor;
#define FK_SIZEOF_FkAdamTensor 48

typedef struct {
    int32_t num_tensors;
    float grad_scale;     // gradients are multiplied by it in f32 first (clipping; 1 = off)
    double beta1;
    double beta2;
    double eps;
    double lr;
    double decay;         // 1 − lr·weight_decay, computed by the host in f64
    double bc1;           // 1 − beta1^t
    double bc2;           // 1 − beta2^t
    FkAdamTensor tensor[FK_ADAM_MAX_TENSORS];
} FkAdamParams;
#define FK_SIZEOF_FkAdamParams 1600

// Sum of squares of many tensors (the global gradient norm), stage 1: partial[partial_offset +
// block] = Σ x² (f64) over the block's FK_STEP_BLOCK_ELEMS elements; fk_sum_f64 finishes.
typedef struct {
    const void* data;     // f32 [numel]
    int64_t numel;
    int64_t block_begin;
    int64_t pad0;
} FkSumSqTensor;
#define FK_SIZEOF_FkSumSqTensor 32

typedef struct {
    int32_t num_tensors;
    int32_t pad0;
    void* partial;        // f64 [all blocks of all launches]
    int64_t partial_offset;
    int64_t pad1;
    FkSumSqTensor tensor[FK_ADAM_MAX_TENSORS];
} FkSumSqParams;
#define FK_SIZEOF_FkSumSqParams 1056

FK_KERNEL void fk_ln_mod_fwd(FK_GRID_PARAMS FkLnModParams p);          // grid (b·l): out, n, mean, rstd
FK_KERNEL void fk_ln_mod_bwd_dx(FK_GRID_PARAMS FkLnModParams p);       // grid (b·l): dx
FK_KERNEL void fk_ln_mod_bwd_partial(FK_GRID_PARAMS FkLnModParams p);  // grid (c tiles, chunks, b)
FK_KERNEL void fk_col_sum(FK_GRID_PARAMS FkColSumParams p);            // grid (c tiles, b, sets)
FK_KERNEL void fk_gated_fwd(FK_GRID_PARAMS FkGatedParams p);           // grid-stride over b·l·c
FK_KERNEL void fk_gated_bwd(FK_GRID_PARAMS FkGatedParams p);           // grid (c tiles, chunks, b)
FK_KERNEL void fk_silu_fwd(FK_GRID_PARAMS FkPointwiseParams p);
FK_KERNEL void fk_silu_bwd(FK_GRID_PARAMS FkPointwiseParams p);
FK_KERNEL void fk_mse_partial(FK_GRID_PARAMS FkMseParams p);
FK_KERNEL void fk_sum_f64(FK_GRID_PARAMS FkSumF64Params p);            // one block
FK_KERNEL void fk_adamw(FK_GRID_PARAMS FkAdamParams p);
FK_KERNEL void fk_sumsq_partial(FK_GRID_PARAMS FkSumSqParams p);

// ---------------------------------------------------------------------------------------------
// The whole-model step's layout moves and remaining pointwise kernels: copies and casts
// (kernels/copy.cu), the attention prologue and head merge (kernels/attention.cu), GELU-tanh
// (kernels/activation.cu), the timestep embedding (kernels/embedding.cu) and random fill
// (kernels/random.cu). CPU twins: src/model/attention.rs (QK-RMSNorm per head + RoPE and their
// backward), src/ops/attention.rs (split_heads / merge_heads), src/ops/activation.rs (GELU-tanh),
// src/ops/embedding.rs (timestep embedding), src/model/random.rs (RandomParam::generate).
// Activations are token-major [rows, ld] with an explicit row stride ld (elements), so a column
// block of a wider matrix is addressed by offsetting the pointer; attention tensors are
// head-major [b, h, l, d] bf16 of the joint sequence (l tokens), of which one launch writes the
// ls tokens t0..t0+ls (the double block's txt at t0 = 0, img at t0 = l_txt). Deterministic: every
// output element is written by one thread, reductions run in a fixed order, no atomics.
// ---------------------------------------------------------------------------------------------
#define FK_MODEL_THREADS 256

// dst[r, c] = src[r, c] (or dst += src with accumulate, f32 dst only) on a [rows, cols] window;
// either side bf16 (rounded to nearest even on the way in) or f32. Casts are rows = 1.
typedef struct {
    const void* src;      // f32 or bf16 [rows, ld_src]
    void* dst;            // f32 or bf16 [rows, ld_dst]
    int64_t rows;
    int64_t cols;
    int64_t ld_src;
    int64_t ld_dst;
    int32_t src_bf16;     // 1: src is bf16, 0: f32
    int32_t dst_bf16;     // 1: dst is bf16, 0: f32
    int32_t accumulate;   // 1: dst += src (f32 dst)
    int32_t pad0;
} FkModelCopyParams;
#define FK_SIZEOF_FkModelCopyParams 64

// The attention prologue of one token stream: qkv (f32 or bf16, token-major [b·ls, ld], q in columns
// [0, h·d), k in [h·d, 2h·d), v in [2h·d, 3h·d), head j at j·d) → per head RMSNorm of q and k
// (weight per head dim, rstd saved), RoPE on q and k (pairs (2i, 2i+1), tables [b, l, d/2] of
// the joint sequence), q, k, v bf16 [b, h, l, d] at tokens t0..t0+ls. The backward takes dq, dk,
// dv bf16 at those tokens and writes dqkv f32 columns [0, 3h·d) (overwrite); the norm weights are
// frozen (no weight gradient). One warp per (sample, token, head).
typedef struct {
    const void* qkv;      // f32 or bf16 (qkv_bf16) [b·ls, ld]
    const void* q_scale;  // f32 [d]: the query norm's weight
    const void* k_scale;  // f32 [d]
    const void* cos;      // f32 [b, l, d/2]
    const void* sin;      // f32 [b, l, d/2]
    void* q;              // bf16 [b, h, l, d] (forward output)
    void* k;
    void* v;
    void* rstd_q;         // f32 [b, h, l] (forward output, backward input)
    void* rstd_k;
    const void* dq;       // bf16 [b, h, l, d] (backward input)
    const void* dk;
    const void* dv;
    void* dqkv;           // f32 or bf16 (dqkv_bf16) [b·ls, ld] (backward output, columns [0, 3h·d))
    int64_t b;
    int64_t h;
    int64_t l;            // tokens of the joint sequence
    int64_t d;            // head dim, even
    int64_t ls;           // tokens of this stream per sample
    int64_t t0;           // first joint token of this stream
    int64_t ld;           // row stride of qkv and dqkv (≥ 3h·d)
    float eps;            // QK_NORM_EPS
    int32_t qkv_bf16;     // 1 = qkv is bf16
    int32_t dqkv_bf16;    // 1 = dqkv is written bf16 (the qkv linear's dY)
    int32_t pad0;
} FkModelQkParams;
#define FK_SIZEOF_FkModelQkParams 184

// merge_heads: tokens[r, hi·d + di] (bf16, columns [0, h·d) of [b·ls, ld]) ← heads[bi, hi,
// t0 + t, di] (bf16), r = bi·ls + t. Its backward moves an f32 token-major gradient the other way,
// rounding to bf16.
typedef struct {
    void* heads;          // bf16 [b, h, l, d]
    void* tokens;         // forward: bf16 [b·ls, ld]; backward: f32 [b·ls, ld]
    int64_t b;
    int64_t h;
    int64_t l;
    int64_t d;
    int64_t ls;
    int64_t t0;
    int64_t ld;
} FkModelHeadsParams;
#define FK_SIZEOF_FkModelHeadsParams 72

// GELU-tanh on a [rows, cols] window: out = gelu(x); backward dx = dy⊙gelu'(x). x f32 or bf16,
// out (dx) f32 or bf16, dy f32.
typedef struct {
    const void* x;        // f32 or bf16 [rows, ld_x]
    const void* dy;       // f32 [rows, ld_dy] (backward)
    void* out;            // forward: out, backward: dx; f32 or bf16 [rows, ld_out]
    int64_t rows;
    int64_t cols;
    int64_t ld_x;
    int64_t ld_dy;
    int64_t ld_out;
    int32_t out_bf16;     // 1 = out (dx) bf16
    int32_t x_bf16;       // 1 = x bf16
} FkModelGeluParams;
#define FK_SIZEOF_FkModelGeluParams 72

// Sinusoidal embedding out[bi, :] = [cos(t'·f_j), sin(t'·f_j)] (j < dim/2, odd dim: last 0),
// t' = time_factor·t[bi] and f_j = exp(neg_log_max_period·j/(dim/2)), all as the CPU rounds.
typedef struct {
    const void* t;        // f32 [b]
    void* out;            // f32 [b, dim]
    int64_t b;
    int64_t dim;
    float time_factor;    // 1000 in FLUX
    float neg_log_max_period;  // −(ln(max_period) rounded to f32), computed by the host
} FkModelTimestepParams;
#define FK_SIZEOF_FkModelTimestepParams 40

// RandomParam::generate on the device: dst[k] = value of element offset + k, k < n, f32 or bf16.
// Uniform: splitmix64 mix of (stream + index·0x9E3779B97F4A7C15), 24 bits → u ∈ [0, 1),
// bound·(2u − 1); constant: value.
typedef struct {
    void* dst;            // f32 or bf16 [n]
    uint64_t stream;      // RandomParam::stream
    int64_t offset;       // index of dst[0] in the tensor
    int64_t n;
    float bound;          // Init::Uniform(bound)
    float value;          // Init::Const(value)
    int32_t uniform;      // 1: uniform, 0: constant
    int32_t dst_bf16;
} FkModelRandomParams;
#define FK_SIZEOF_FkModelRandomParams 48

FK_KERNEL void fk_model_copy2d(FK_GRID_PARAMS FkModelCopyParams p);              // grid-stride
FK_KERNEL void fk_model_qk_fwd(FK_GRID_PARAMS FkModelQkParams p);                // warp per item
FK_KERNEL void fk_model_qk_bwd(FK_GRID_PARAMS FkModelQkParams p);                // warp per item
FK_KERNEL void fk_model_merge_heads(FK_GRID_PARAMS FkModelHeadsParams p);        // grid-stride
FK_KERNEL void fk_model_merge_heads_bwd(FK_GRID_PARAMS FkModelHeadsParams p);    // grid-stride
FK_KERNEL void fk_model_gelu_fwd(FK_GRID_PARAMS FkModelGeluParams p);            // grid-stride
FK_KERNEL void fk_model_gelu_bwd(FK_GRID_PARAMS FkModelGeluParams p);            // grid-stride
FK_KERNEL void fk_model_timestep_emb(FK_GRID_PARAMS FkModelTimestepParams p);    // grid-stride
FK_KERNEL void fk_model_random_fill(FK_GRID_PARAMS FkModelRandomParams p);       // grid-stride
