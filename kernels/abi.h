// flux-kernels: the ABI shared by every .cu file and the Rust host.
//
// Entry points are extern "C" so the host finds them by name in the embedded fatbins. Element
// counts are int64 so a 4608-token × 21504-wide activation (99 M elements) and larger never
// overflow an index.
#pragma once
#include <stdint.h>

#define FK_KERNEL extern "C" __global__

// Threads per block of the pointwise kernels; the host launches ceil(n / FK_POINTWISE_THREADS).
#define FK_POINTWISE_THREADS 256
