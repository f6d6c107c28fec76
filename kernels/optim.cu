// The loss and the optimizer, f32 tensors with f64 sums. CPU twins:
//   fk_mse_partial     ops::loss::mse_forward + mse_backward in one pass
//   fk_adamw           ops::optim::AdamW::step (f64 arithmetic, as the CPU does it)
//   fk_sumsq_partial   ops::optim::clip_grad_norm's norm
// Tested in tests/gpu_step_ops.rs.
//
// Determinism: whole-tensor sums (the loss, the gradient norm) go through f64 partials per block
// and fk_sum_f64, which adds them in a fixed order. AdamW runs in f64 with fk::rn_* so it
// matches the CPU bit for bit wherever the hardware's f64 is IEEE (it is).
#include "common.cuh"

static_assert(sizeof(FkMseParams) == FK_SIZEOF_FkMseParams, "abi.h: FkMseParams size");
static_assert(sizeof(FkSumF64Params) == FK_SIZEOF_FkSumF64Params, "abi.h: FkSumF64Params size");
static_assert(sizeof(FkAdamTensor) == FK_SIZEOF_FkAdamTensor, "abi.h: FkAdamTensor size");
static_assert(sizeof(FkAdamParams) == FK_SIZEOF_FkAdamParams, "abi.h: FkAdamParams size");
static_assert(sizeof(FkSumSqTensor) == FK_SIZEOF_FkSumSqTensor, "abi.h: FkSumSqTensor size");
static_assert(sizeof(FkSumSqParams) == FK_SIZEOF_FkSumSqParams, "abi.h: FkSumSqParams size");

namespace fk_optim {

constexpr int THREADS = FK_STEP_THREADS;
static_assert((THREADS & (THREADS - 1)) == 0, "power-of-two block");
static_assert(FK_SMEM_STEP >= THREADS * 8, "one double per thread for the f64 reductions");
static_assert(FK_STEP_BLOCK_ELEMS % THREADS == 0, "whole elements per thread");

// Tree sum of one double per thread; the total is returned to thread 0 (others get garbage).
__device__ __forceinline__ double block_sum_f64(double v, double* smem) {
    smem[threadIdx.x] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
        __syncthreads();
    }
    const double total = smem[0];
    __syncthreads();
    return total;
}

// The tensor of a multi-tensor launch that owns block `bid`: the last whose block_begin ≤ bid.
template <class T>
__device__ __forceinline__ int owner(const T* tensors, int count, int64_t bid) {
    int i = 0;
    while (i + 1 < count && tensors[i + 1].block_begin <= bid) ++i;
    return i;
}

}  // namespace fk_optim

// ---- MSE loss ---------------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_mse_partial(FK_GRID_PARAMS FkMseParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const float* pred = static_cast<const float*>(p.pred);
    const float* target = static_cast<const float*>(p.target);
    const float* w = static_cast<const float*>(p.weight);
    float* grad = static_cast<float*>(p.grad);
    double acc = 0.0;
    fk::grid_stride<FK_STEP_THREADS>(p.n, [&](int64_t i) {
        const float wv = w ? w[i / p.per] : 1.0f;
        const double d = (double)pred[i] - (double)target[i];
        acc += (double)wv * (d * d);
        // As mse_backward: ((2·w)·(p − t)) / n, each step rounded to f32.
        grad[i] = fk::rn_fmul(2.0f * wv, pred[i] - target[i]) / p.n_f32;
    });
    const double total = fk_optim::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.partial)[blockIdx.x] = total;
}

// One block: strided per-thread sums, then the tree; the same order on every run.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_sum_f64(FK_GRID_PARAMS FkSumF64Params p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const double* part = static_cast<const double*>(p.partial);
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < p.n; i += FK_STEP_THREADS) acc += part[i];
    const double total = fk_optim::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.out)[0] = total;
}

// ---- AdamW and the gradient norm --------------------------------------------------------------

// AdamW::step per element, in f64 with every operation rounded as the CPU rounds it:
//   m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²  (stored as f32; the update uses the f64 values)
//   p ← p·(1 − lr·wd);  p ← p − lr·(m/bc1)/(√(v/bc2) + eps)
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_adamw(FK_GRID_PARAMS FkAdamParams p) {
    const int64_t bid = blockIdx.x;
    const FkAdamTensor& t = p.tensor[fk_optim::owner(p.tensor, p.num_tensors, bid)];
    const int64_t base = (bid - t.block_begin) * FK_STEP_BLOCK_ELEMS;
    const int64_t end = base + FK_STEP_BLOCK_ELEMS < t.numel ? base + FK_STEP_BLOCK_ELEMS : t.numel;
    float* param = static_cast<float*>(t.param);
    const float* grad = static_cast<const float*>(t.grad);
    float* m = static_cast<float*>(t.m);
    float* v = static_cast<float*>(t.v);
    const double one_b1 = 1.0 - p.beta1, one_b2 = 1.0 - p.beta2;
    for (int64_t i = base + threadIdx.x; i < end; i += FK_STEP_THREADS) {
        const double g = (double)fk::rn_fmul(grad[i], p.grad_scale);
        const double mj = fk::rn_dadd(fk::rn_dmul(p.beta1, (double)m[i]), fk::rn_dmul(one_b1, g));
        const double vj = fk::rn_dadd(fk::rn_dmul(p.beta2, (double)v[i]), fk::rn_dmul(fk::rn_dmul(one_b2, g), g));
        m[i] = (float)mj;
        v[i] = (float)vj;
        double pj = fk::rn_dmul((double)param[i], p.decay);
        pj = pj - fk::rn_ddiv(fk::rn_dmul(p.lr, fk::rn_ddiv(mj, p.bc1)), fk::rn_dadd(fk::rn_dsqrt(fk::rn_ddiv(vj, p.bc2)), p.eps));
        param[i] = (float)pj;
    }
}

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_sumsq_partial(FK_GRID_PARAMS FkSumSqParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const int64_t bid = blockIdx.x;
    const FkSumSqTensor& t = p.tensor[fk_optim::owner(p.tensor, p.num_tensors, bid)];
    const int64_t base = (bid - t.block_begin) * FK_STEP_BLOCK_ELEMS;
    const int64_t end = base + FK_STEP_BLOCK_ELEMS < t.numel ? base + FK_STEP_BLOCK_ELEMS : t.numel;
    const float* x = static_cast<const float*>(t.data);
    double acc = 0.0;
    for (int64_t i = base + threadIdx.x; i < end; i += FK_STEP_THREADS) {
        const double d = (double)x[i];
        acc += d * d;
    }
    const double total = fk_optim::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.partial)[p.partial_offset + bid] = total;
}
