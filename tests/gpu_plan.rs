//! src/plan's per-block saved sets against what the device-resident step allocates. Its own test
//! binary (its own process) because it reads the device memory pool's bytes in use, which every
//! test running alongside in the same process would move.
//!
//! From one block to the next of the same kind, the pool's bytes in use after the block grow by
//! exactly `double_block_saved` / `single_block_saved` (× batch), or by `block_input` when
//! checkpointing: the GEMM scratch and other caches reach their size in a kind's first block, so
//! the deltas from the second block on are the kept tensors alone. Exact under the CUDA emulation
//! (kernels/host_emulation.h counts bytes as asked); a real pool rounds each allocation up, so on
//! a GPU the figures are printed and only checked to be at least the plan's.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::AdapterSet;
use flux_kernels::engine::cuda::{BaseDtype, GpuFlux};
use flux_kernels::engine::{CudaBackend, Device};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::FluxInputs;
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::plan::activations::{block_input, double_block_saved, single_block_saved, Tokens};

#[test]
fn plan_counts_the_bytes_each_block_keeps() {
    let test = "plan_counts_the_bytes_each_block_keeps";
    let Some(device) = gpu_or_skip(test, Device::parse("cuda").map(|(d, _)| d)) else { return };
    let Device::Cuda(be) = &device else { unreachable!() };
    let emulated = CudaBackend::lock(be).unwrap().ctx.name().unwrap().contains("fkemu");
    let ckpt = Checkpoint::open(&fixture("tiny-diffusers"), Some(vec![4, 6, 6])).unwrap();
    let cfg = ckpt.cfg.clone();
    let w = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), &cfg).unwrap();
    let mut set = AdapterSet::new();
    set.add(&load_lora(&fixture("lora-peft.safetensors"), &cfg, UnknownKeys::Error).unwrap().terms, 1.0);
    let (d, ss, b) = (cfg.depth, cfg.depth_single, inp.b);
    assert!(d >= 2 && ss >= 2, "the fixture needs two blocks of each kind");
    let t = Tokens { img: inp.n_img, txt: inp.n_txt };
    for checkpointing in [false, true] {
        let mut m = GpuFlux::new(&cfg, &w, be, BaseDtype::Bf16).unwrap();
        m.checkpointing = checkpointing;
        m.block_memory = Some(Vec::new());
        let lora = m.adapters(&set, true).unwrap();
        let (_pred, _state) = m.forward_train(&inp, &lora).unwrap();
        let used = m.block_memory.take().unwrap();
        assert_eq!(used.len(), d + ss, "one reading per block");
        let got = (used[d - 1] - used[d - 2], used[d + ss - 1] - used[d + ss - 2]);
        let want = if checkpointing {
            (b * block_input(&cfg, t), b * block_input(&cfg, t))
        } else {
            (b * double_block_saved(&cfg, t), b * single_block_saved(&cfg, t))
        };
        println!(
            "checkpointing {checkpointing}: a double block keeps {} B (plan {}), a single block {} B (plan {})",
            got.0, want.0, got.1, want.1
        );
        if emulated {
            assert_eq!(got, want, "checkpointing {checkpointing}: (double, single) block bytes allocated vs src/plan");
        } else {
            assert!(
                got.0 >= want.0 && got.1 >= want.1,
                "checkpointing {checkpointing}: the pool kept less than planned"
            );
        }
    }
}
