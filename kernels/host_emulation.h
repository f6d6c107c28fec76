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
//     against the allocations of the emulated driver, alignment against the ISA's rules;
//   - the functions of ptx_sm90.h (Hopper): mbarrier phases and transaction bytes, TMA copies that
//     land only when their phase completes, wgmma computed when its group is waited for, named
//     barriers; their checks are listed in docs/attention-hopper.md.
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
#include <tuple>
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

// One issued wgmma.mma_async, computed when its group is waited for (so a kernel that overwrites
// the operands' shared memory before the wait gets visibly wrong results). PTX ISA 9.7.15.5:
// accessing the accumulators or the register-A fragments of a wgmma.mma_async before the
// wgmma.wait_group that covers it is undefined. So while an op is pending its accumulators hold
// a NaN pattern (their value at issue is kept aside: an early read gives NaN, an early write is
// reported at the wait), and its A registers are compared at the wait with what was issued (a
// change is reported: the hardware may read them at any time until then).
struct WgmmaOp {
    float* d = nullptr;
    int n = 0;  // N of m64nNk16: the thread holds N/2 accumulators
    int scale_d = 0;
    bool a_regs = false;
    uint64_t da = 0, db = 0;
    int trans_b = 0;
    uint32_t a[32][4];  // register A: the whole warp's fragments
    uint32_t lo[2] = {0, 0}, hi[2] = {0, 0};  // shared bytes read through da, db
    const uint32_t* a_reg = nullptr;          // this thread's A registers, as passed
    // The accumulators' value at issue, when no earlier pending op of the thread writes them
    // (else `chained`: the op starts from that op's result).
    std::vector<float> d_init;
    bool chained = false;
};
// The pattern pending accumulators hold (a quiet NaN no arithmetic produces by itself).
constexpr uint32_t WGMMA_PENDING_BITS = 0x7fc0dea1u;

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    unsigned linear = 0;
    bool done = false;
    int waiting = 0;  // 0 running, 1 block barrier, 2 warp barrier, 3 mbarrier phase, 4 named barrier, 5 yielded
    unsigned collectives = 0;
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
    uint32_t wait_bar = 0, wait_parity = 0;  // waiting == 3
    int wait_named = -1;                     // waiting == 4
    bool wg_fenced = false;                  // a wgmma.fence since the last wgmma wait
    std::vector<WgmmaOp> wg_open;
    std::vector<std::vector<WgmmaOp>> wg_groups;
};

// An mbarrier's state (PTX ISA 9.7.13.15.1): the current phase, arrivals still expected in it,
// and the transaction bytes still expected (expect_tx adds, complete_tx subtracts).
struct Mbar {
    uint32_t expected = 0, pending = 0, phase = 0;
    int64_t tx = 0;
};
// A TMA copy in flight: the box's bytes as they will land (swizzle applied), at dst.
struct TmaCopy {
    uint32_t bar;
    unsigned char* dst;
    std::vector<unsigned char> bytes;
};
struct NamedBar {
    unsigned arrived = 0, want = 0;
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
    std::map<uint32_t, Mbar> mbars;  // by shared address
    std::vector<TmaCopy> tma;        // issued, not landed
    NamedBar named[16];
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

// ---- ptx_sm90.h (Hopper: mbarrier, TMA, wgmma, named barriers, setmaxnreg) ----------------------
// Shared addresses: the dynamic window starts at FKEMU_SMEM_BASE, deliberately not 1024-byte
// aligned (as on a GPU, where nothing promises it), so a kernel must align its swizzled tiles.
#define FKEMU_SMEM_BASE 0x480u
inline uint32_t smem_addr(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < fkemu::g_block->smem || c > fkemu::g_block->smem + fkemu::g_block->smem_bytes)
        fkemu::fail("smem_addr: pointer outside dynamic shared memory");
    return FKEMU_SMEM_BASE + (uint32_t)(c - fkemu::g_block->smem);
}

namespace fkemu {

inline unsigned char* smem_at(uint32_t a, size_t bytes, const char* what) {
    if (a < FKEMU_SMEM_BASE || a - FKEMU_SMEM_BASE + bytes > g_block->smem_bytes) fail(what);
    return g_block->smem + (a - FKEMU_SMEM_BASE);
}

inline Mbar& mbar_at(uint32_t a, const char* what) {
    if (a % 8) fail("mbarrier: address not 8-byte aligned");
    auto it = g_block->mbars.find(a);
    if (it == g_block->mbars.end()) fail(what);
    return it->second;
}

// With every arrival of the current phase in, the TMA copies on the barrier land (not before:
// a reader that skipped the wait sees what was there) and, with no transaction bytes left
// outstanding, the phase completes.
inline void mbar_settle(uint32_t a, Mbar& m) {
    if (m.pending != 0) return;
    std::vector<TmaCopy>& q = g_block->tma;
    for (size_t i = 0; i < q.size();) {
        if (q[i].bar == a) {
            std::memcpy(q[i].dst, q[i].bytes.data(), q[i].bytes.size());
            m.tx -= (int64_t)q[i].bytes.size();
            q.erase(q.begin() + i);
        } else {
            ++i;
        }
    }
    if (m.tx < 0) fail("mbarrier: TMA copies completed more bytes than expect_tx announced");
    if (m.tx == 0) {
        ++m.phase;
        m.pending = m.expected;
    }
}

// try_wait.parity: true once the phase of that parity has completed.
inline bool mbar_poll(uint32_t a, uint32_t parity) {
    Mbar& m = mbar_at(a, "mbarrier.try_wait on a barrier that was never initialised");
    if ((m.phase & 1) != parity) return true;
    mbar_settle(a, m);
    return (m.phase & 1) != parity;
}

inline bool ready(Fiber& f) {
    if (f.done) return false;
    if (f.waiting == 0) return true;
    if (f.waiting == 3 && mbar_poll(f.wait_bar, f.wait_parity)) {
        f.waiting = 0;
        return true;
    }
    return false;
}

// Element (mn, k) of a wgmma operand described by `desc` (PTX ISA 9.7.15.5.1: start address,
// leading and stride byte offsets, swizzle mode in bits 62–63), as a shared address. K-major:
// rows along M/N of 16 B (no swizzle: 8×8 core matrices, LBO between core matrices along K, SBO
// along M/N) or of W = 32/64/128 B (swizzled: 8-row atoms, SBO between atoms along M/N). MN-major
// (swizzled only): W-byte rows along M/N, one per k, 8 rows an atom; LBO between atoms along M/N,
// SBO between atoms along K. The swizzle XORs address bits [4, 4+log2(W/16)) with bits [7, …),
// the same function of the address TMA applies when it writes with that swizzle.
inline uint32_t desc_addr(uint64_t desc, int mn, int k, bool k_major) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4,
                   sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    const uint32_t base_off = (uint32_t)(desc >> 49) & 7, mode = (uint32_t)(desc >> 62);
    if (base_off) fail("wgmma descriptor: base offset is not emulated (align the tile to its swizzle atom)");
    const uint32_t w = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
    uint32_t a;
    if (k_major) {
        a = w == 0 ? start + (mn % 8) * 16 + (mn / 8) * sbo + (k / 8) * lbo + (k % 8) * 2
                   : start + (mn % 8) * w + (mn / 8) * sbo + k * 2;
    } else {
        if (w == 0) fail("wgmma descriptor: MN-major without swizzle is not emulated");
        const uint32_t e = w / 2;  // bf16 elements per row
        a = start + (mn % e) * 2 + (mn / e) * lbo + (k % 8) * w + (k / 8) * sbo;
    }
    if (w) {
        // The atom's rows are located through address bits 7..: the descriptor's start must sit
        // in the first row of an atom (anything else needs the base-offset field).
        if ((start / w) % 8 != 0 || (start % w) + 32 > w) fail("wgmma descriptor: start not in the first row of a swizzle atom");
        const uint32_t bits = w == 128 ? 7 : w == 64 ? 3 : 1;
        a ^= ((a >> 7) & bits) << 4;
    }
    return a;
}

inline float smem_bf16(uint32_t a) {
    const unsigned char* p = smem_at(a, 2, "wgmma: operand outside dynamic shared memory");
    for (const TmaCopy& c : g_block->tma)
        if (p >= c.dst && p < c.dst + c.bytes.size())
            fail("wgmma reads shared memory that a TMA copy has not completed (wait on its mbarrier first)");
    uint16_t v;
    std::memcpy(&v, p, 2);
    return bf16_to_f32(v);
}

inline void wgmma_run(const WgmmaOp& op) {
    const unsigned lane = me().linear % 32, warp = (me().linear % 128) / 32, g = lane / 4, t = lane % 4;
    if (op.a_regs && std::memcmp(op.a_reg, op.a[lane], sizeof op.a[lane]) != 0)
        fail("registers holding the A fragments of a pending wgmma.mma_async were modified before the "
             "wgmma.wait_group covering it");
    if (!op.chained)
        for (int i = 0; i < op.n / 2; ++i) {
            uint32_t bits;
            std::memcpy(&bits, &op.d[i], 4);
            if (bits != WGMMA_PENDING_BITS)
                fail("the accumulators of a pending wgmma.mma_async were written before the wgmma.wait_group "
                     "covering it");
        }
    float a_row[2][16];
    for (int h = 0; h < 2; ++h) {
        const int row = 16 * warp + g + 8 * h;
        for (int k = 0; k < 16; ++k) {
            if (op.a_regs) {
                const int r16 = row % 16;
                const uint32_t word = op.a[(r16 % 8) * 4 + (k % 8) / 2][(r16 >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
                a_row[h][k] = bf16_to_f32((uint16_t)(word >> (16 * (k & 1))));
            } else {
                a_row[h][k] = smem_bf16(desc_addr(op.da, row, k, true));
            }
        }
    }
    for (int i = 0; i < op.n / 2; ++i) {
        const int c = i / 4, e = i % 4, col = 8 * c + 2 * t + (e & 1);
        float s = op.scale_d ? (op.chained ? op.d[i] : op.d_init[i]) : 0.0f;
        for (int k = 0; k < 16; ++k) s += a_row[e >= 2][k] * smem_bf16(desc_addr(op.db, col, k, op.trans_b == 0));
        op.d[i] = s;
    }
}

// The shared bytes [lo, hi) an operand of rows 0..rows-1 × k 0..15 spans (cached per
// descriptor: the same few descriptors recur in every thread and tile).
inline void desc_range(uint64_t desc, int rows, bool k_major, uint32_t& lo, uint32_t& hi) {
    lo = hi = 0;
    if (desc == 0) return;
    static thread_local std::map<std::tuple<uint64_t, int, bool>, std::pair<uint32_t, uint32_t>> cache;
    auto key = std::make_tuple(desc, rows, k_major);
    auto it = cache.find(key);
    if (it == cache.end()) {
        uint32_t l = UINT32_MAX, h = 0;
        for (int mn = 0; mn < rows; ++mn)
            for (int k = 0; k < 16; ++k) {
                const uint32_t a = desc_addr(desc, mn, k, k_major);
                l = std::min(l, a);
                h = std::max(h, a + 2);
            }
        if (cache.size() > 4096) cache.clear();
        it = cache.emplace(key, std::make_pair(l, h)).first;
    }
    lo = it->second.first;
    hi = it->second.second;
}

// Every pending op of the thread, oldest first.
template <class F>
inline void wgmma_each_pending(Fiber& f, F fn) {
    for (auto& grp : f.wg_groups)
        for (WgmmaOp& op : grp) fn(op);
    for (WgmmaOp& op : f.wg_open) fn(op);
}
// Puts the accumulators of the thread's pending ops out of reach: the oldest op on each set of
// accumulators keeps their current value aside and fills them with the pending pattern; later
// ops on the same registers start from its result. Run after each issue and each wait.
inline void wgmma_hold(Fiber& f) {
    std::vector<const float*> held;
    wgmma_each_pending(f, [&](WgmmaOp& op) {
        const bool seen = std::find(held.begin(), held.end(), op.d) != held.end();
        if (seen) {
            op.chained = true;
            return;
        }
        held.push_back(op.d);
        if (!op.chained && !op.d_init.empty()) return;  // already held
        op.chained = false;
        op.d_init.assign(op.d, op.d + op.n / 2);
        for (int i = 0; i < op.n / 2; ++i) std::memcpy(&op.d[i], &WGMMA_PENDING_BITS, 4);
    });
}

inline void wgmma_issue(float* d, int n, const uint32_t* a, uint64_t da, uint64_t db, int scale_d, int trans_b) {
    Fiber& f = me();
    if (!f.wg_fenced) fail("wgmma.mma_async without a wgmma.fence since its registers were last touched");
    if (g_block->block_dim.x % 128) fail("wgmma: the block is not a whole number of warpgroups");
    WgmmaOp op;
    op.d = d;
    op.n = n;
    op.scale_d = scale_d;
    op.a_regs = a != nullptr;
    op.da = da;
    op.db = db;
    op.trans_b = trans_b;
    desc_range(da, 64, true, op.lo[0], op.hi[0]);
    desc_range(db, n, trans_b == 0, op.lo[1], op.hi[1]);
    // A warp collective (.sync.aligned): every lane takes part; register A travels with it.
    Deposit& dep = warp_exchange([&](Deposit& dp, unsigned lane) {
        for (int i = 0; i < 4; ++i) dp.a[lane][i] = a ? a[i] : 0;
    });
    std::memcpy(op.a, dep.a, sizeof op.a);
    op.a_reg = a;
    f.wg_open.push_back(std::move(op));
    wgmma_hold(f);
}

// The shared bytes a pending wgmma of any thread will still read overlap [lo, hi)?
inline bool wgmma_reads(const unsigned char* lo, const unsigned char* hi) {
    for (Fiber& f : *g_block->fibers) {
        auto hit = [&](const WgmmaOp& op) {
            for (int i = 0; i < 2; ++i) {
                if (op.hi[i] == 0) continue;
                const unsigned char* s = g_block->smem + (op.lo[i] - FKEMU_SMEM_BASE);
                const unsigned char* e = g_block->smem + (op.hi[i] - FKEMU_SMEM_BASE);
                if (s < hi && e > lo) return true;
            }
            return false;
        };
        for (const WgmmaOp& op : f.wg_open)
            if (hit(op)) return true;
        for (const auto& grp : f.wg_groups)
            for (const WgmmaOp& op : grp)
                if (hit(op)) return true;
    }
    return false;
}

// The emulated driver's CUtensorMap contents (cuTensorMapEncodeTiled fills them).
struct TensorMapEmu {
    uint32_t magic;
    uint8_t dtype, rank, swizzle, elem;
    uint64_t addr;
    uint32_t dims[5];
    uint32_t pad;
    uint64_t strides[4];  // bytes, of dims 1..rank-1
    uint16_t box[5];
};
static_assert(sizeof(TensorMapEmu) <= 128, "CUtensorMap is 128 bytes");
constexpr uint32_t TMAP_MAGIC = 0x544d4150u;

}  // namespace fkemu

inline void mbar_init(uint64_t* bar, uint32_t count) {
    if (count == 0) fkemu::fail("mbarrier.init: count 0");
    const uint32_t a = smem_addr(bar);
    fkemu::smem_at(a, 8, "mbarrier.init: outside dynamic shared memory");
    if (a % 8) fkemu::fail("mbarrier.init: address not 8-byte aligned");
    fkemu::Mbar m;
    m.expected = m.pending = count;
    fkemu::g_block->mbars[a] = m;
    std::memset(bar, 0, 8);
}
inline void mbar_init_fence() {}
inline void mbar_arrive_at(uint64_t* bar, uint32_t tx) {
    const uint32_t a = smem_addr(bar);
    fkemu::Mbar& m = fkemu::mbar_at(a, "mbarrier.arrive on a barrier that was never initialised");
    if (m.pending == 0) fkemu::fail("mbarrier.arrive: more arrivals than the barrier's count in one phase");
    m.tx += tx;
    --m.pending;
    fkemu::mbar_settle(a, m);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { mbar_arrive_at(bar, bytes); }
// A plain arrive hands a resource back (a ring slot to the producer): the arriving warp steps
// aside here, so the scheduler may run another warp (the producer overwriting the slot) before
// this one continues, and a hand-back that comes before the last read of the slot is caught.
inline void mbar_arrive(uint64_t* bar) {
    mbar_arrive_at(bar, 0);
    fkemu::yield_waiting(5);
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
    const uint32_t a = smem_addr(bar);
    if (fkemu::mbar_poll(a, parity & 1)) return;
    fkemu::Fiber& f = fkemu::me();
    f.wait_bar = a;
    f.wait_parity = parity & 1;
    fkemu::yield_waiting(3);
}

inline void tma_load_3d(void* dst, const void* map, uint64_t* bar, int c0, int c1, int c2) {
    const fkemu::TensorMapEmu& t = *static_cast<const fkemu::TensorMapEmu*>(map);
    if (t.magic != fkemu::TMAP_MAGIC) fkemu::fail("cp.async.bulk.tensor: not a tensor map made by cuTensorMapEncodeTiled");
    if (t.rank != 3) fkemu::fail("cp.async.bulk.tensor.3d: the tensor map's rank is not 3");
    const uint32_t w = t.swizzle == 3 ? 128 : t.swizzle == 2 ? 64 : t.swizzle == 1 ? 32 : 0;
    if (w && (uint32_t)t.box[0] * t.elem != w)
        fkemu::fail("cp.async.bulk.tensor: a swizzled box narrower than the swizzle span is not emulated");
    const uint32_t a = smem_addr(dst);
    if (a % (w ? 8 * w : 128)) fkemu::fail("cp.async.bulk.tensor: destination not aligned to the swizzle atom (128 B without swizzle)");
    fkemu::mbar_at(smem_addr(bar), "cp.async.bulk.tensor: completion mbarrier never initialised");
    const size_t row = (size_t)t.box[0] * t.elem, bytes = row * t.box[1] * t.box[2];
    unsigned char* d = fkemu::smem_at(a, bytes, "cp.async.bulk.tensor: destination outside dynamic shared memory");
    if (fkemu::wgmma_reads(d, d + bytes)) fkemu::fail("cp.async.bulk.tensor overwrites shared memory a pending wgmma still reads");
    for (const fkemu::TmaCopy& c : fkemu::g_block->tma)
        if (c.dst < d + bytes && d < c.dst + c.bytes.size()) fkemu::fail("cp.async.bulk.tensor: two copies in flight into the same bytes");
    fkemu::TmaCopy cp{smem_addr(bar), d, std::vector<unsigned char>(bytes, 0)};
    const int64_t c[3] = {c0, c1, c2};
    for (uint32_t i2 = 0; i2 < t.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < t.box[1]; ++i1)
            for (uint32_t i0 = 0; i0 < t.box[0]; ++i0) {
                const int64_t g[3] = {c[0] + i0, c[1] + i1, c[2] + i2};
                uint32_t off = (uint32_t)(((size_t)i2 * t.box[1] + i1) * row + (size_t)i0 * t.elem);
                if (w) {
                    const uint32_t sa = (a + off) ^ ((((a + off) >> 7) & (w == 128 ? 7u : w == 64 ? 3u : 1u)) << 4);
                    off = sa - a;
                }
                bool inside = true;
                for (int r = 0; r < 3; ++r) inside &= g[r] >= 0 && g[r] < (int64_t)t.dims[r];
                if (!inside) continue;  // out of bounds: zero fill
                const unsigned char* src = reinterpret_cast<const unsigned char*>(t.addr) + g[0] * t.elem + g[1] * t.strides[0] +
                                           g[2] * t.strides[1];
                fkemu::check_global(src, t.elem, "cp.async.bulk.tensor: source outside every device allocation");
                std::memcpy(cp.bytes.data() + off, src, t.elem);
            }
    fkemu::g_block->tma.push_back(std::move(cp));
}

inline void fence_proxy_async() {}

inline void named_bar_arrive_impl(int id, int threads, bool wait) {
    if (id <= 0 || id >= 16) fkemu::fail("bar.sync/arrive: barrier id outside 1..15 (0 is __syncthreads)");
    if (threads % 32 || threads <= 0 || (unsigned)threads > fkemu::g_block->block_dim.x)
        fkemu::fail("bar.sync/arrive: thread count not a positive multiple of 32 within the block");
    fkemu::NamedBar& nb = fkemu::g_block->named[id];
    if (nb.want && nb.want != (unsigned)threads) fkemu::fail("bar.sync/arrive: arrivals disagree on the thread count");
    nb.want = threads;
    if (++nb.arrived == (unsigned)threads) {
        for (fkemu::Fiber& f : *fkemu::g_block->fibers)
            if (f.waiting == 4 && f.wait_named == id) f.waiting = 0, f.wait_named = -1;
        nb.arrived = nb.want = 0;
        return;
    }
    if (wait) {
        fkemu::me().wait_named = id;
        fkemu::yield_waiting(4);
    }
}
inline void named_bar_sync(int id, int threads) { named_bar_arrive_impl(id, threads, true); }
inline void named_bar_arrive(int id, int threads) { named_bar_arrive_impl(id, threads, false); }

template <int N>
inline void setmaxnreg_inc() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
}
template <int N>
inline void setmaxnreg_dec() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
}

inline void wgmma_fence() { fkemu::me().wg_fenced = true; }
inline void wgmma_commit() {
    fkemu::Fiber& f = fkemu::me();
    f.wg_groups.push_back(std::move(f.wg_open));
    f.wg_open.clear();
}
template <int N>
inline void wgmma_wait() {
    fkemu::Fiber& f = fkemu::me();
    while (f.wg_groups.size() > (size_t)N) {
        for (const fkemu::WgmmaOp& op : f.wg_groups.front()) fkemu::wgmma_run(op);
        f.wg_groups.erase(f.wg_groups.begin());
    }
    fkemu::wgmma_hold(f);
    f.wg_fenced = false;
}
template <int N>
inline void wgmma_fence_operand(float (&)[N]) {}

template <int N>
struct Wgmma {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N a multiple of 8 up to 256");
    static void ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d, int trans_b) {
        fkemu::wgmma_issue(d, N, nullptr, da, db, scale_d, trans_b);
    }
    static void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d, int trans_b) {
        fkemu::wgmma_issue(d, N, a, 0, db, scale_d, trans_b);
    }
};

namespace fkemu {

// Runs one block: every thread a fiber on a 64 KB stack, scheduled round by round.
inline void fiber_entry();

inline void run_block(Block& b, std::vector<Fiber>& fibers, std::vector<std::vector<char>>& stacks, uint64_t& rng) {
    const unsigned n = b.block_dim.x * b.block_dim.y * b.block_dim.z;
    b.fibers = &fibers;
    b.deposits.assign(2 * ((n + 31) / 32), Deposit{});
    b.mbars.clear();
    b.tma.clear();
    for (NamedBar& nb : b.named) nb = NamedBar{};
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
                if (ready(fibers[i]) || fibers[i].waiting == 5) {
                    runnable.push_back(w);
                    break;
                }
        if (!runnable.empty()) {
            const unsigned w = runnable[next_rand((unsigned)runnable.size())];
            const unsigned lo = w * 32, hi = std::min(n, w * 32 + 32);
            for (unsigned i = lo; i < hi; ++i)
                if (fibers[i].waiting == 5) fibers[i].waiting = 0;
            for (;;) {
                lanes.clear();
                for (unsigned i = lo; i < hi; ++i)
                    if (ready(fibers[i])) lanes.push_back(i);
                if (lanes.empty()) break;
                for (unsigned i = (unsigned)lanes.size(); i > 1; --i) std::swap(lanes[i - 1], lanes[next_rand(i)]);
                for (unsigned i : lanes) {
                    b.current = &fibers[i];
                    swapcontext(&b.scheduler, &fibers[i].ctx);
                }
                b.current = nullptr;
                // The warp's collective completes when every live lane has reached it.
                unsigned live = 0, at = 0, at_block = 0;
                for (unsigned i = lo; i < hi; ++i)
                    if (!fibers[i].done) ++live, at += fibers[i].waiting == 2, at_block += fibers[i].waiting == 1;
                if (live && at == live)
                    for (unsigned i = lo; i < hi; ++i) fibers[i].waiting = 0;
                else if (at && at_block)
                    fail("lanes of one warp wait at different points (divergent collective?)");
                // Lanes still at an mbarrier or named barrier: the warp resumes when they are released.
            }
            continue;
        }
        unsigned live = 0, at[6] = {0, 0, 0, 0, 0, 0};
        for (unsigned i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            ++live;
            ++at[fibers[i].waiting];
        }
        if (live == 0) break;
        if (at[1] != live) {
            char msg[256];
            std::snprintf(msg, sizeof msg,
                          "deadlock: of %u live threads, %u wait at __syncthreads, %u in a warp collective, %u on an "
                          "mbarrier phase that never completes, %u at a named barrier",
                          live, at[1], at[2], at[3], at[4]);
            fail(msg);
        }
        for (unsigned i = 0; i < n; ++i) fibers[i].waiting = 0;
    }
    if (!b.tma.empty()) fail("the block ended with a TMA copy that never completed (nobody waited on its mbarrier)");
    // Conservative: the ISA does not say what a barrier with arrivals pending at exit does.
    for (const NamedBar& nb : b.named)
        if (nb.arrived) fail("the block ended with arrivals pending on a named barrier (unbalanced bar.arrive)");
    for (unsigned i = 0; i < n; ++i)
        if (!fibers[i].wg_open.empty() || !fibers[i].wg_groups.empty())
            fail("a thread exited with wgmma operations it never waited for");
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

// Streams and events. The NULL stream (and the legacy/per-thread handles 0x1, 0x2) and streams
// created blocking run every operation at once, as before. A stream created with
// CU_STREAM_NON_BLOCKING (flag 1: cudarc's new_stream) defers its copies from or to pinned host
// memory, its device-to-device copies and memsets until something waits for them (an event
// recorded after them and waited on or synchronised, a stream or context synchronisation, a
// free), so a kernel that reads a buffer before waiting for the copy that fills it reads stale
// data, as it could on a GPU. Kernels and pageable copies on such a stream first run what is
// pending there, then run at once (a pageable copy is synchronous on a GPU too).
// A deferred operation with the device and host byte ranges it touches ([lo, hi)), so that a
// free runs only the queued work on the freed memory (a free does not wait for a stream on a
// GPU with memory pools either).
struct Op {
    std::function<void()> run;
    uintptr_t dlo = 0, dhi = 0, hlo = 0, hhi = 0;
    bool touches(uintptr_t lo, uintptr_t hi) const { return (dlo < hi && lo < dhi) || (hlo < hi && lo < hhi); }
};
struct Stream {
    bool deferred = false;
    std::vector<Op> pending;
    size_t done = 0;  // operations of `pending` already run
};
struct Event {
    Stream* stream = nullptr;  // where it was last recorded (null: complete)
    size_t at = 0;             // operations of that stream it covers
};
struct Streams {
    std::recursive_mutex lock;
    std::map<void*, Stream*> live;
    std::map<void*, Event*> events;
    std::map<uintptr_t, size_t> pinned;  // cuMemHostAlloc'ed ranges
};
inline Streams& streams() {
    static Streams s;
    return s;
}
inline bool is_immediate_handle(void* s) {
    const uintptr_t h = reinterpret_cast<uintptr_t>(s);
    return h == 0 || h == 1 || h == 2;
}
// The deferred stream behind a handle, nullptr for an immediate one; false for a handle that
// is no live stream.
inline bool stream_of(void* h, Stream** out) {
    *out = nullptr;
    if (is_immediate_handle(h)) return true;
    Streams& ss = streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.live.find(h);
    if (it == ss.live.end()) return false;
    *out = it->second->deferred ? it->second : nullptr;
    return true;
}
inline void flush(Stream* s, size_t upto) {
    if (!s) return;
    std::lock_guard<std::recursive_mutex> g(streams().lock);
    while (s->done < upto && s->done < s->pending.size()) {
        std::function<void()> op = std::move(s->pending[s->done].run);
        ++s->done;
        op();
    }
}
inline void flush_all() {
    Streams& ss = streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    for (auto& kv : ss.live) flush(kv.second, kv.second->pending.size());
}
// Runs, on every stream, the queued work up to the last operation that touches [lo, hi).
inline void flush_touching(uintptr_t lo, uintptr_t hi) {
    Streams& ss = streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    for (auto& kv : ss.live) {
        Stream* s = kv.second;
        for (size_t i = s->pending.size(); i > s->done; --i)
            if (s->pending[i - 1].touches(lo, hi)) {
                flush(s, i);
                break;
            }
    }
}
inline bool is_pinned(const void* p, size_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    Streams& ss = streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.pinned.upper_bound(a);
    if (it == ss.pinned.begin()) return false;
    --it;
    return a + bytes <= it->first + it->second;
}
// Runs `op` on stream handle `h`: deferred when `deferrable` and the stream defers, else after
// what is pending there. An unknown handle is CUDA_ERROR_INVALID_HANDLE (400).
// `dev`, `host`: the device and host bytes it touches ({address, bytes}).
inline int on_stream(void* h, bool deferrable, std::function<void()> op, std::pair<const void*, size_t> dev = {},
                     std::pair<const void*, size_t> host = {}) {
    Stream* s;
    if (!stream_of(h, &s)) return 400;
    if (s && deferrable) {
        std::lock_guard<std::recursive_mutex> g(streams().lock);
        const uintptr_t d = reinterpret_cast<uintptr_t>(dev.first), hp = reinterpret_cast<uintptr_t>(host.first);
        s->pending.push_back(Op{std::move(op), d, d + dev.second, hp, hp + host.second});
        return 0;
    }
    flush(s, s ? s->pending.size() : 0);
    op();
    return 0;
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
    std::snprintf(name, len, "fkemu CPU emulation of an sm_90 GPU");
    return FK_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = size_t(8) << 30;
    return FK_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
    switch (attrib) {
        case 75: *v = 9; break;   // compute capability major (Hopper: the sm_80 kernels run too)
        case 76: *v = 0; break;   // minor
        case 16: *v = 8; break;   // multiprocessors
        case 97: *v = 232448; break;  // max shared memory per block, opt-in (sm_90: 227 KB)
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
CUresult cuCtxSynchronize() {
    fkemu::flush_all();
    return FK_SUCCESS;
}
enum { FK_INVALID_HANDLE = 400 };
CUresult cuStreamCreate(void** h, unsigned flags) {
    fkemu::Stream* s = new fkemu::Stream;
    s->deferred = (flags & 1) != 0;  // CU_STREAM_NON_BLOCKING
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    ss.live[s] = s;
    *h = s;
    return FK_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** h, unsigned flags, int) { return cuStreamCreate(h, flags); }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return FK_SUCCESS;
}
CUresult cuStreamDestroy_v2(void* h) {
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.live.find(h);
    if (it == ss.live.end()) return FK_INVALID_HANDLE;
    // Work already queued still runs (the driver's documented behaviour); events recorded on it
    // are complete once it has.
    fkemu::flush(it->second, it->second->pending.size());
    for (auto& kv : ss.events)
        if (kv.second->stream == it->second) kv.second->stream = nullptr;
    delete it->second;
    ss.live.erase(it);
    return FK_SUCCESS;
}
CUresult cuStreamSynchronize(void* h) {
    fkemu::Stream* s;
    if (!fkemu::stream_of(h, &s)) return FK_INVALID_HANDLE;
    fkemu::flush(s, s ? s->pending.size() : 0);
    return FK_SUCCESS;
}
static fkemu::Event* fkemu_event(void* e) {
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.events.find(e);
    return it == ss.events.end() ? nullptr : it->second;
}
// The waiting stream's later work runs after the event's: here, by running that work now.
CUresult cuStreamWaitEvent(void* h, void* e, unsigned) {
    fkemu::Stream* s;
    if (!fkemu::stream_of(h, &s)) return FK_INVALID_HANDLE;
    fkemu::Event* ev = fkemu_event(e);
    if (!ev) return FK_INVALID_HANDLE;
    fkemu::flush(ev->stream, ev->at);
    return FK_SUCCESS;
}

// A host function in stream order (the emulated NCCL enqueues its collectives so): deferred on a
// deferring stream until something waits for that stream's work, else run at once.
CUresult cuLaunchHostFunc(void* h, void (*fn)(void*), void* data) {
    if (!fn) return FK_INVALID_VALUE;
    return fkemu::on_stream(h, true, [fn, data] { fn(data); }) == 0 ? FK_SUCCESS : FK_INVALID_HANDLE;
}

// FKEMU_DRY=1: for a dry run of the host code (kernels skipped by src/kernels/trace.rs), device
// memory is never touched: allocations are not filled, memsets and copies do nothing, so a
// full-size FLUX.1-dev step (tens of GB allocated) walks here in untouched, lazily mapped pages.
static bool fkemu_dry() {
    static const bool dry = [] {
        const char* v = std::getenv("FKEMU_DRY");
        return v != nullptr && v[0] == '1';
    }();
    return dry;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    // Exactly `bytes` long, so an AddressSanitizer build catches a kernel reading past the end.
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0) return FK_OUT_OF_MEMORY;
    // Fresh device memory is not zero on a GPU either.
    if (!fkemu_dry()) std::memset(m, 0xCD, bytes);
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
    size_t bytes = 0;
    {
        std::lock_guard<std::mutex> g(al.lock);
        auto it = al.live.find(p);
        if (it == al.live.end()) return FK_INVALID_VALUE;
        bytes = it->second;
    }
    // Copies still queued from or into the buffer land first.
    fkemu::flush_touching(p, p + bytes);
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
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* st) {
    fkemu::check_global(reinterpret_cast<void*>(d), n, "cuMemcpyHtoD: destination outside an allocation");
    return fkemu::on_stream(
        st, fkemu::is_pinned(h, n), [=] { if (!fkemu_dry()) std::memcpy(reinterpret_cast<void*>(d), h, n); },
        {reinterpret_cast<void*>(d), n}, {h, n});
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* st) {
    fkemu::check_global(reinterpret_cast<void*>(d), n, "cuMemcpyDtoH: source outside an allocation");
    // A dry run reads zeros (defined values for the host, none of them meaningful).
    return fkemu::on_stream(
        st, fkemu::is_pinned(h, n),
        [=] {
            if (fkemu_dry()) std::memset(h, 0, n);
            else std::memcpy(h, reinterpret_cast<void*>(d), n);
        },
        {reinterpret_cast<void*>(d), n}, {h, n});
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    // The source range is recorded as the "host" one: either is checked against a free.
    return fkemu::on_stream(
        st, true, [=] { if (!fkemu_dry()) std::memmove(reinterpret_cast<void*>(d), reinterpret_cast<void*>(s), n); },
                            {reinterpret_cast<void*>(d), n}, {reinterpret_cast<void*>(s), n});
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* st) {
    return fkemu::on_stream(st, true, [=] { if (!fkemu_dry()) std::memset(reinterpret_cast<void*>(d), v, n); },
                            {reinterpret_cast<void*>(d), n});
}
// Page-locked host memory: plain host memory here, remembered so that copies from and to it
// can be asynchronous.
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    void* m = nullptr;
    if (posix_memalign(&m, 4096, bytes ? bytes : 1) != 0) return FK_OUT_OF_MEMORY;
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    ss.pinned[reinterpret_cast<uintptr_t>(m)] = bytes ? bytes : 1;
    *p = m;
    return FK_SUCCESS;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == ss.pinned.end()) return FK_INVALID_VALUE;
    // As on a GPU (cuMemFreeHost synchronises), queued copies from or to it complete first.
    fkemu::flush_touching(it->first, it->first + it->second);
    ss.pinned.erase(it);
    std::free(p);
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
    fkemu::Event* ev = new fkemu::Event;
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    ss.events[ev] = ev;
    *e = ev;
    return FK_SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    auto it = ss.events.find(e);
    if (it == ss.events.end()) return FK_INVALID_HANDLE;
    delete it->second;
    ss.events.erase(it);
    return FK_SUCCESS;
}
// The event covers the work queued on the stream so far (none pending on an immediate one).
CUresult cuEventRecord(void* e, void* h) {
    fkemu::Stream* s;
    if (!fkemu::stream_of(h, &s)) return FK_INVALID_HANDLE;
    fkemu::Streams& ss = fkemu::streams();
    std::lock_guard<std::recursive_mutex> g(ss.lock);
    fkemu::Event* ev = fkemu_event(e);
    if (!ev) return FK_INVALID_HANDLE;
    ev->stream = s;
    ev->at = s ? s->pending.size() : 0;
    return FK_SUCCESS;
}
CUresult cuEventSynchronize(void* e) {
    fkemu::Event* ev = fkemu_event(e);
    if (!ev) return FK_INVALID_HANDLE;
    fkemu::flush(ev->stream, ev->at);
    return FK_SUCCESS;
}
CUresult cuEventQuery(void* e) { return cuEventSynchronize(e); }
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
        if (value > 227 * 1024) return FK_INVALID_VALUE;  // sm_90's limit per block
        static_cast<fkemu::Function*>(f)->max_dynamic_smem = value;
    }
    return FK_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return FK_SUCCESS;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* stream, void** params, void** extra) {
    fkemu::Function* fn = static_cast<fkemu::Function*>(f);
    if (extra) return FK_INVALID_VALUE;
    if (bx * by * bz == 0 || bx * by * bz > 1024 || gx == 0 || gy == 0 || gz == 0) return FK_INVALID_VALUE;
    if (gy > 65535 || gz > 65535) return FK_INVALID_VALUE;
    if ((int)smem > fn->max_dynamic_smem) return FK_INVALID_VALUE;
    std::function<void()> body = [fn, params] { fn->entry.call(params); };
    // Kernels run at once, after what their stream has queued (the parameters are read now).
    return fkemu::on_stream(stream, false, [&] { fkemu::launch({gx, gy, gz}, {bx, by, bz}, smem, body); });
}
// A TMA descriptor, with the driver documentation's limits (cuTensorMapEncodeTiled): 16-byte
// aligned global address, strides multiples of 16 below 2^40, boxes of 1..256 elements per
// dimension with an inner extent a multiple of 16 bytes and, swizzled, at most the swizzle span.
// Only what the kernels use is accepted: no interleave, element strides 1, zero fill.
CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* addr, const uint64_t* dims,
                                const uint64_t* strides, const unsigned* box, const unsigned* estrides, int interleave,
                                int swizzle, int, int oob_fill) {
    static const int elem_of[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
    if (!map || reinterpret_cast<uintptr_t>(map) % 64 || rank < 1 || rank > 5 || dtype < 0 || dtype > 12)
        return FK_INVALID_VALUE;
    if (interleave != 0 || swizzle < 0 || swizzle > 3 || oob_fill != 0) return FK_INVALID_VALUE;
    if (reinterpret_cast<uintptr_t>(addr) % 16) return FK_INVALID_VALUE;
    fkemu::TensorMapEmu t{};
    t.magic = fkemu::TMAP_MAGIC;
    t.dtype = (uint8_t)dtype;
    t.rank = (uint8_t)rank;
    t.swizzle = (uint8_t)swizzle;
    t.elem = (uint8_t)elem_of[dtype];
    t.addr = reinterpret_cast<uint64_t>(addr);
    for (unsigned i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) - 1) return FK_INVALID_VALUE;
        if (box[i] == 0 || box[i] > 256 || estrides[i] != 1) return FK_INVALID_VALUE;
        t.dims[i] = (uint32_t)dims[i];
        t.box[i] = (uint16_t)box[i];
    }
    for (unsigned i = 0; i + 1 < rank; ++i) {
        if (strides[i] % 16 || strides[i] >= (uint64_t(1) << 40)) return FK_INVALID_VALUE;
        t.strides[i] = strides[i];
    }
    const uint64_t inner = (uint64_t)box[0] * t.elem, span = swizzle == 3 ? 128 : swizzle == 2 ? 64 : swizzle == 1 ? 32 : 0;
    if (inner % 16 || (span && inner > span)) return FK_INVALID_VALUE;
    std::memset(map, 0, 128);
    std::memcpy(map, &t, sizeof t);
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
