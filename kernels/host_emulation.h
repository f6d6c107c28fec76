// A CPU stand-in for a CUDA GPU, to check the kernels' index arithmetic, bounds, barriers and
// fragment layouts on a machine without one. It is a test tool, never a backend: slow (one
// fiber per CUDA thread) and only as faithful as its reading of the PTX ISA.
//
// Part 1 (FK_HOST_EMULATION): the CUDA builtins the kernels use (threadIdx, __syncthreads, …)
// and the functions of ptx_sm80.h, implemented from the ISA text:
//   - each CUDA thread is a fiber (ucontext); one warp at a time runs as far as it can before
//     the next (random order), so a missing __syncthreads shows up as a read of shared memory
//     that another warp has not filled yet or has already refilled;
//   - cp.async copies are deferred until the cp.async.wait_group that covers them, so a read
//     before the wait sees stale shared memory;
//   - ldmatrix and mma.sync are warp collectives: every lane deposits its operands, then each
//     computes its own result from the deposited ones with the documented lane mapping;
//   - shared-memory addresses are checked against the launch's dynamic size, cp.async sources
//     against the allocations of the emulated driver, alignment against the ISA's rules.
// Part 2 (FKEMU_DRIVER): a libcuda.so exporting the slice of the driver API that cudarc uses,
// so the unmodified Rust host and tests run their kernels here (tools/gpu-check.sh --emulate
// builds it and runs the GPU tests with LD_LIBRARY_PATH pointing at it).
#ifndef FK_HOST_EMULATION_PART1
#define FK_HOST_EMULATION_PART1

#include <stdint.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
    uint32_t x, y;
};

namespace fkemu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "fkemu: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
};

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    unsigned linear = 0;
    bool done = false;
    int waiting = 0;  // 0 running, 1 block barrier, 2 warp barrier
    unsigned collectives = 0;
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};

// What a warp's lanes deposit for one collective (double-buffered by the collective's parity:
// a lane can only be one collective ahead of the slowest lane of its warp).
struct Deposit {
    const unsigned char* addr[32];
    uint32_t a[32][4];
    uint32_t b[32][2];
    float f[32];
};

struct Block {
    dim3 block_idx, block_dim, grid_dim;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::vector<Fiber>* fibers = nullptr;
    Fiber* current = nullptr;
    ucontext_t scheduler;
    std::vector<Deposit> deposits;  // 2 per warp
    const std::function<void()>* body = nullptr;
};

inline thread_local Block* g_block = nullptr;

inline Fiber& me() { return *g_block->current; }

inline void yield_waiting(int kind) {
    Fiber& f = me();
    f.waiting = kind;
    swapcontext(&f.ctx, &g_block->scheduler);
}

inline void syncthreads() { yield_waiting(1); }

inline void check_smem(const void* p, size_t bytes, const char* what) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < g_block->smem || c + bytes > g_block->smem + g_block->smem_bytes) fail(what);
}

// Allocations of the emulated device (part 2 fills it), to check cp.async sources.
struct Allocations {
    std::mutex lock;
    std::map<uintptr_t, size_t> live;
    // Bytes live now and at most so far: the default memory pool's USED_MEM_CURRENT / _HIGH.
    size_t used = 0, high = 0;
};
inline Allocations& allocations() {
    static Allocations a;
    return a;
}
inline void check_global(const void* p, size_t bytes, const char* what) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    Allocations& al = allocations();
    std::lock_guard<std::mutex> g(al.lock);
    auto it = al.live.upper_bound(a);
    if (it == al.live.begin()) fail(what);
    --it;
    if (a + bytes > it->first + it->second) fail(what);
}

// One round of a warp collective: deposit, wait for the warp, return the deposit slot.
inline Deposit& warp_exchange(const std::function<void(Deposit&, unsigned)>& put) {
    Fiber& f = me();
    const unsigned warp = f.linear / 32, lane = f.linear % 32;
    Deposit& d = g_block->deposits[warp * 2 + (f.collectives++ & 1)];
    put(d, lane);
    yield_waiting(2);
    return d;
}

}  // namespace fkemu

#define threadIdx (fkemu::me().tid)
#define blockIdx (fkemu::g_block->block_idx)
#define blockDim (fkemu::g_block->block_dim)
#define gridDim (fkemu::g_block->grid_dim)
#define FK_DYNAMIC_SMEM(name) unsigned char* name = fkemu::g_block->smem

inline void __syncthreads() { fkemu::syncthreads(); }
[[noreturn]] inline void __trap() { fkemu::fail("__trap() in a kernel"); }
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// ---- ptx_sm80.h ------------------------------------------------------------------------------

inline float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
// Round to nearest even, NaN stays NaN (cvt.rn.bf16.f32).
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

inline void cp_async_16(void* smem, const void* gmem) {
    if (reinterpret_cast<uintptr_t>(smem) % 16 || reinterpret_cast<uintptr_t>(gmem) % 16)
        fkemu::fail("cp.async: address not 16-byte aligned");
    fkemu::check_smem(smem, 16, "cp.async: destination outside dynamic shared memory");
    fkemu::check_global(gmem, 16, "cp.async: source outside every device allocation");
    fkemu::me().open.push_back({smem, gmem, 16});
}
inline void cp_async_commit() {
    fkemu::Fiber& f = fkemu::me();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
template <int N>
inline void cp_async_wait() {
    fkemu::Fiber& f = fkemu::me();
    while (f.groups.size() > (size_t)N) {
        for (const fkemu::Copy& c : f.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
        f.groups.erase(f.groups.begin());
    }
}

// ldmatrix .m8n8.x4.b16: lane l supplies the row address of row l%8 of matrix l/8; lane l gets,
// in r[j], elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix j — or, with .trans, elements
// (2(l%4), l/4) and (2(l%4)+1, l/4). The lower column (row) goes in the lower half.
inline void fkemu_ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) % 16) fkemu::fail("ldmatrix: row address not 16-byte aligned");
    fkemu::check_smem(row, 16, "ldmatrix: row outside dynamic shared memory");
    fkemu::Deposit& d =
        fkemu::warp_exchange([&](fkemu::Deposit& d, unsigned lane) { d.addr[lane] = static_cast<const unsigned char*>(row); });
    const unsigned lane = fkemu::me().linear % 32;
    for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (!trans) {
            const unsigned char* base = d.addr[8 * j + lane / 4];
            std::memcpy(&lo, base + 2 * (2 * (lane % 4)), 2);
            std::memcpy(&hi, base + 2 * (2 * (lane % 4) + 1), 2);
        } else {
            std::memcpy(&lo, d.addr[8 * j + 2 * (lane % 4)] + 2 * (lane / 4), 2);
            std::memcpy(&hi, d.addr[8 * j + 2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
        }
        r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { fkemu_ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { fkemu_ldmatrix(r, row, true); }

// mma.m16n8k16.row.col.f32.bf16.bf16.f32, fragments per PTX ISA 9.7.14.5.8 (g = lane>>2,
// t = lane%4): A element i of 8 (register i/2, half i%2) is row g (+8 when i%4 >= 2), column
// 2t + (i&1) (+8 when i >= 4); B element i of 4 is row 2t + (i&1) (+8 when i >= 2), column g;
// C element i is row g (+8 when i >= 2), column 2t + (i&1).
inline float fkemu_a(const fkemu::Deposit& d, int row, int col) {
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    return bf16_to_f32((uint16_t)(d.a[lane][reg] >> (16 * (col & 1))));
}
inline float fkemu_b(const fkemu::Deposit& d, int row, int col) {
    const int lane = col * 4 + (row % 8) / 2;
    const int reg = row >= 8 ? 1 : 0;
    return bf16_to_f32((uint16_t)(d.b[lane][reg] >> (16 * (row & 1))));
}
inline void mma_bf16_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    fkemu::Deposit& d = fkemu::warp_exchange([&](fkemu::Deposit& d, unsigned lane) {
        for (int i = 0; i < 4; ++i) d.a[lane][i] = a[i];
        d.b[lane][0] = b0;
        d.b[lane][1] = b1;
    });
    const int lane = fkemu::me().linear % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = acc[i];
        for (int k = 0; k < 16; ++k) s += fkemu_a(d, row, k) * fkemu_b(d, k, col);
        acc[i] = s;
    }
}

inline uint32_t dynamic_smem_bytes() { return (uint32_t)fkemu::g_block->smem_bytes; }

inline float shfl_xor_f32(float v, int mask) {
    fkemu::Deposit& d = fkemu::warp_exchange([&](fkemu::Deposit& d, unsigned lane) { d.f[lane] = v; });
    return d.f[(fkemu::me().linear % 32) ^ (unsigned)mask];
}
// ex2.approx.ftz: flush-to-zero results below the normal range, as the hardware does.
inline float fast_exp2(float x) {
    const float y = std::exp2(x);
    return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}

// ---- cuda_bf16.h (the parts the kernels use) ----------------------------------------------------
struct __nv_bfloat16 {
    uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 b) { return bf16_to_f32(b.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {f32_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f32_to_bf16(f)}; }
using std::tanh;
inline float tanhf(float x) { return std::tanh(x); }

namespace fkemu {

// Runs one block: every thread a fiber on a 64 KB stack, scheduled round by round.
inline void fiber_entry();

inline void run_block(Block& b, std::vector<Fiber>& fibers, std::vector<std::vector<char>>& stacks, uint64_t& rng) {
    const unsigned n = b.block_dim.x * b.block_dim.y * b.block_dim.z;
    b.fibers = &fibers;
    b.deposits.assign(2 * ((n + 31) / 32), Deposit{});
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f = Fiber{};
        f.linear = i;
        f.tid = {i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y)};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = stacks[i].size();
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    // Warps run greedily: one warp (picked at random) goes as far as it can, through its own
    // collectives, until it reaches __syncthreads or ends; then the next. Warps therefore drift
    // as far apart as the barriers allow, so a missing __syncthreads shows up as one warp
    // reading shared memory another has not filled yet (or has already overwritten).
    const unsigned warps = (n + 31) / 32;
    auto next_rand = [&rng](unsigned bound) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        return (unsigned)((rng >> 33) % bound);
    };
    std::vector<unsigned> lanes;
    for (;;) {
        std::vector<unsigned> runnable;
        for (unsigned w = 0; w < warps; ++w)
            for (unsigned i = w * 32; i < std::min(n, w * 32 + 32); ++i)
                if (!fibers[i].done && !fibers[i].waiting) {
                    runnable.push_back(w);
                    break;
                }
        if (!runnable.empty()) {
            const unsigned w = runnable[next_rand((unsigned)runnable.size())];
            const unsigned lo = w * 32, hi = std::min(n, w * 32 + 32);
            for (;;) {
                lanes.clear();
                for (unsigned i = lo; i < hi; ++i)
                    if (!fibers[i].done && !fibers[i].waiting) lanes.push_back(i);
                if (lanes.empty()) break;
                for (unsigned i = (unsigned)lanes.size(); i > 1; --i) std::swap(lanes[i - 1], lanes[next_rand(i)]);
                for (unsigned i : lanes) {
                    b.current = &fibers[i];
                    swapcontext(&b.scheduler, &fibers[i].ctx);
                }
                b.current = nullptr;
                // The warp's collective completes when every live lane has reached it.
                unsigned live = 0, at = 0;
                for (unsigned i = lo; i < hi; ++i)
                    if (!fibers[i].done) ++live, at += fibers[i].waiting == 2;
                if (live && at == live)
                    for (unsigned i = lo; i < hi; ++i) fibers[i].waiting = 0;
                else if (at)
                    fail("lanes of one warp wait at different points (divergent collective?)");
            }
            continue;
        }
        unsigned live = 0, at_block = 0;
        for (unsigned i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            ++live;
            at_block += fibers[i].waiting == 1;
        }
        if (live == 0) break;
        if (at_block != live) fail("deadlock: threads wait at different barriers (divergent __syncthreads?)");
        for (unsigned i = 0; i < n; ++i) fibers[i].waiting = 0;
    }
    for (unsigned i = 0; i < n; ++i)
        if (!fibers[i].groups.empty() || !fibers[i].open.empty()) {
            // Copies never waited for: apply them so the result matches hardware, but say so.
            fail("a thread exited with cp.async copies it never waited for");
        }
}

inline void fiber_entry() {
    Block& b = *g_block;
    (*b.body)();
    b.current->done = true;
    // uc_link returns to the scheduler.
}

// Runs a whole grid, blocks in a shuffled order.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
    const unsigned n = block.x * block.y * block.z;
    std::vector<Fiber> fibers(n);
    std::vector<std::vector<char>> stacks(n, std::vector<char>(64 * 1024));
    std::vector<unsigned char> smem(smem_bytes + 16);
    static std::atomic<uint64_t> seed{0x853c49e6748fea9bull};
    uint64_t rng = seed.fetch_add(0x9e3779b97f4a7c15ull);
    const unsigned total = grid.x * grid.y * grid.z;
    std::vector<unsigned> blocks(total);
    for (unsigned i = 0; i < total; ++i) blocks[i] = i;
    for (unsigned i = total; i > 1; --i) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(blocks[i - 1], blocks[(rng >> 33) % i]);
    }
    Block b;
    b.grid_dim = grid;
    b.block_dim = block;
    b.body = &body;
    // Shared memory starts with leftovers of earlier blocks on a GPU: use a pattern, not zeros.
    b.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 15) & ~uintptr_t(15));
    b.smem_bytes = smem_bytes;
    Block* saved = g_block;
    g_block = &b;
    for (unsigned id : blocks) {
        std::memset(b.smem, 0xA5, smem_bytes);
        b.block_idx = {id % grid.x, (id / grid.x) % grid.y, id / (grid.x * grid.y)};
        run_block(b, fibers, stacks, rng);
    }
    g_block = saved;
}

}  // namespace fkemu
#endif  // FK_HOST_EMULATION_PART1

// ================================================================================================
// Part 2: the emulated driver (libcuda.so). The including file defines FKEMU_KERNELS(X) as
// X(name) for every kernel compiled into it.
#if defined(FKEMU_DRIVER) && !defined(FK_HOST_EMULATION_PART2)
#define FK_HOST_EMULATION_PART2
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fkemu {

// A kernel whose parameters are unpacked from cuLaunchKernel's kernelParams by type.
struct Entry {
    std::function<void(void**)> call;
};
template <class... Args, size_t... I>
void call_unpacked(void (*f)(Args...), void** kp, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(kp[I])...);
}
template <class... Args>
Entry make_entry(void (*f)(Args...)) {
    return Entry{[f](void** kp) { call_unpacked(f, kp, std::index_sequence_for<Args...>{}); }};
}

struct Function {
    std::string name;
    Entry entry;
    int max_dynamic_smem = 48 * 1024;
};

inline std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r = [] {
        std::map<std::string, Entry> m;
#define FKEMU_REGISTER(name) m[#name] = make_entry(&name);
        FKEMU_KERNELS(FKEMU_REGISTER)
#undef FKEMU_REGISTER
        return m;
    }();
    return r;
}

}  // namespace fkemu

extern "C" {
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum {
    FK_SUCCESS = 0,
    FK_INVALID_VALUE = 1,
    FK_OUT_OF_MEMORY = 2,
    FK_NOT_FOUND = 500,
};
static int fkemu_ctx_token;

CUresult cuInit(unsigned) { return FK_SUCCESS; }
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return FK_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return FK_INVALID_VALUE;
    *d = 0;
    return FK_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "fkemu CPU emulation of an sm_80 GPU");
    return FK_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = size_t(8) << 30;
    return FK_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
    switch (attrib) {
        case 75: *v = 8; break;   // compute capability major
        case 76: *v = 0; break;   // minor
        case 16: *v = 8; break;   // multiprocessors
        case 1: *v = 1024; break; // max threads per block
        case 115: *v = 0; break;  // memory pools: plain cuMemAlloc
        default: *v = 0;
    }
    return FK_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &fkemu_ctx_token;
    return FK_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return FK_SUCCESS; }
CUresult cuCtxSetCurrent(void*) { return FK_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &fkemu_ctx_token;
    return FK_SUCCESS;
}
CUresult cuCtxSynchronize() { return FK_SUCCESS; }
CUresult cuStreamSynchronize(void*) { return FK_SUCCESS; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return FK_SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    // Exactly `bytes` long, so an AddressSanitizer build catches a kernel reading past the end.
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0) return FK_OUT_OF_MEMORY;
    // Fresh device memory is not zero on a GPU either.
    std::memset(m, 0xCD, bytes);
    fkemu::Allocations& al = fkemu::allocations();
    std::lock_guard<std::mutex> g(al.lock);
    al.live[reinterpret_cast<uintptr_t>(m)] = bytes;
    al.used += bytes;
    al.high = std::max(al.high, al.used);
    *p = reinterpret_cast<CUdeviceptr>(m);
    return FK_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    fkemu::Allocations& al = fkemu::allocations();
    {
        std::lock_guard<std::mutex> g(al.lock);
        auto it = al.live.find(p);
        if (it == al.live.end()) return FK_INVALID_VALUE;
        al.used -= it->second;
        al.live.erase(it);
    }
    std::free(reinterpret_cast<void*>(p));
    return FK_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void*) {
    fkemu::check_global(reinterpret_cast<void*>(d), n, "cuMemcpyHtoD: destination outside an allocation");
    std::memcpy(reinterpret_cast<void*>(d), h, n);
    return FK_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void*) {
    fkemu::check_global(reinterpret_cast<void*>(d), n, "cuMemcpyDtoH: source outside an allocation");
    std::memcpy(h, reinterpret_cast<void*>(d), n);
    return FK_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) {
    std::memmove(reinterpret_cast<void*>(d), reinterpret_cast<void*>(s), n);
    return FK_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) {
    std::memset(reinterpret_cast<void*>(d), v, n);
    return FK_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    // An 8 GiB device of which the live allocations are in use.
    fkemu::Allocations& al = fkemu::allocations();
    std::lock_guard<std::mutex> g(al.lock);
    *total = size_t(8) << 30;
    *free_bytes = *total - std::min(*total, al.used);
    return FK_SUCCESS;
}
// The default memory pool: every allocation above comes from it. Attributes 7 and 8 are
// CU_MEMPOOL_ATTR_USED_MEM_CURRENT and CU_MEMPOOL_ATTR_USED_MEM_HIGH.
CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = reinterpret_cast<void*>(uintptr_t(1));
    return FK_SUCCESS;
}
CUresult cuMemPoolGetAttribute(void*, int attr, void* value) {
    fkemu::Allocations& al = fkemu::allocations();
    std::lock_guard<std::mutex> g(al.lock);
    if (attr == 7) *static_cast<uint64_t*>(value) = al.used;
    else if (attr == 8) *static_cast<uint64_t*>(value) = al.high;
    else return FK_INVALID_VALUE;
    return FK_SUCCESS;
}

CUresult cuEventCreate(void** e, unsigned) {
    *e = new int(0);
    return FK_SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<int*>(e);
    return FK_SUCCESS;
}
CUresult cuEventRecord(void*, void*) { return FK_SUCCESS; }
CUresult cuEventSynchronize(void*) { return FK_SUCCESS; }
CUresult cuEventQuery(void*) { return FK_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return FK_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// Modules: the fatbin's bytes are ignored; functions are looked up in the compiled-in registry.
CUresult cuModuleLoadData(void** module, const void*) {
    *module = &fkemu::registry();
    return FK_SUCCESS;
}
CUresult cuModuleUnload(void*) { return FK_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = fkemu::registry().find(name);
    if (it == fkemu::registry().end()) return FK_NOT_FOUND;
    *f = new fkemu::Function{name, it->second};
    return FK_SUCCESS;
}
CUresult cuFuncSetAttribute(void* f, int attrib, int value) {
    if (attrib == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value > 163 * 1024) return FK_INVALID_VALUE;  // sm_80's limit per block
        static_cast<fkemu::Function*>(f)->max_dynamic_smem = value;
    }
    return FK_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return FK_SUCCESS;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void*, void** params, void** extra) {
    fkemu::Function* fn = static_cast<fkemu::Function*>(f);
    if (extra) return FK_INVALID_VALUE;
    if (bx * by * bz == 0 || bx * by * bz > 1024 || gx == 0 || gy == 0 || gz == 0) return FK_INVALID_VALUE;
    if (gy > 65535 || gz > 65535) return FK_INVALID_VALUE;
    if ((int)smem > fn->max_dynamic_smem) return FK_INVALID_VALUE;
    std::function<void()> body = [fn, params] { fn->entry.call(params); };
    fkemu::launch({gx, gy, gz}, {bx, by, bz}, smem, body);
    return FK_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == FK_SUCCESS ? "no error" : "fkemu: error";
    return FK_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) { return cuGetErrorString(e, s); }
}  // extern "C"
#endif  // FKEMU_DRIVER

// ================================================================================================
// Part 3: an emulated libcublas.so with the calls the unfused baselines make, following the
// cuBLAS documentation's column-major definition of cublasGemmEx (bf16 A/B, bf16 or f32 C,
// f32 compute, host-side alpha/beta), so the baselines' row-major mapping is checked too.
#if defined(FKEMU_CUBLAS) && !defined(FK_HOST_EMULATION_PART3)
#define FK_HOST_EMULATION_PART3
extern "C" {
typedef int cublasStatus_t;
cublasStatus_t cublasCreate_v2(void** handle) {
    *handle = new int(0);
    return 0;
}
cublasStatus_t cublasDestroy_v2(void* handle) {
    delete static_cast<int*>(handle);
    return 0;
}
cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
// C(i, j) = alpha · Σ_p op(A)(i, p)·op(B)(p, j) + beta · C(i, j), all column-major.
cublasStatus_t cublasGemmEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* a,
                            int atype, int lda, const void* b, int btype, int ldb, const void* beta, void* c, int ctype,
                            int ldc, int compute, int) {
    const int BF16 = 14, F32 = 0, COMPUTE_32F = 68;
    if (atype != BF16 || btype != BF16 || (ctype != BF16 && ctype != F32) || compute != COMPUTE_32F) return 7;
    if (m < 0 || n < 0 || k < 0 || lda < (transa ? k : m) || ldb < (transb ? n : k) || ldc < m) return 7;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const uint16_t* A = static_cast<const uint16_t*>(a);
    const uint16_t* B = static_cast<const uint16_t*>(b);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float s = 0.0f;
            for (int p = 0; p < k; ++p) {
                const float x = bf16_to_f32(transa ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda]);
                const float y = bf16_to_f32(transb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb]);
                s += x * y;
            }
            const size_t at = i + (size_t)j * ldc;
            if (ctype == F32) {
                float* C = static_cast<float*>(c);
                C[at] = al * s + (be != 0.0f ? be * C[at] : 0.0f);
            } else {
                uint16_t* C = static_cast<uint16_t*>(c);
                C[at] = f32_to_bf16(al * s + (be != 0.0f ? be * bf16_to_f32(C[at]) : 0.0f));
            }
        }
    return 0;
}
// Batch i uses A + i·stride_a, B + i·stride_b, C + i·stride_c (element strides).
cublasStatus_t cublasGemmStridedBatchedEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha,
                                          const void* a, int atype, int lda, long long sa, const void* b, int btype,
                                          int ldb, long long sb, const void* beta, void* c, int ctype, int ldc,
                                          long long sc, int batch, int compute, int algo) {
    const int F32 = 0;
    const size_t c_elem = ctype == F32 ? 4 : 2;
    for (int i = 0; i < batch; ++i) {
        const cublasStatus_t st = cublasGemmEx(h, transa, transb, m, n, k, alpha, static_cast<const uint16_t*>(a) + i * sa,
                                               atype, lda, static_cast<const uint16_t*>(b) + i * sb, btype, ldb, beta,
                                               static_cast<unsigned char*>(c) + i * sc * c_elem, ctype, ldc, compute, algo);
        if (st != 0) return st;
    }
    return 0;
}
}  // extern "C"
#endif  // FKEMU_CUBLAS
