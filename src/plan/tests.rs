use super::*;

fn settings(base: Base, side: usize, rank: usize, targets: &str, checkpointing: bool) -> Settings {
    Settings {
        base,
        width: side,
        height: side,
        batch: 1,
        text_tokens: 512,
        checkpointing,
        modulation_on_host: false,
        lora: LoraConfig { rank, targets: targets.split(',').map(String::from).collect(), ..LoraConfig::default() },
        hopper: false,
        blocks_to_swap: 0,
        offload_checkpoints: false,
    }
}

fn row(p: &Plan, prefix: &str) -> usize {
    p.components.iter().filter(|c| c.name.starts_with(prefix)).map(|c| c.bytes).sum()
}

/// Sum of bytes of tensors listed as (shape, bytes per element).
fn listed(tensors: &[(&[usize], usize)]) -> usize {
    tensors.iter().map(|(s, e)| s.iter().product::<usize>() * e).sum()
}

/// The tiny model's saved activations, tensor by tensor as the block code produces them.
#[test]
fn tiny_activations_counted_tensor_by_tensor() {
    let cfg = FluxConfig::tiny(); // hidden 64 = 4 heads × 16, MLP 256, 2 double + 2 single blocks
    let mut s = settings(Base::Bf16, 64, 4, "img_attn.qkv", false);
    s.width = 128; // 8 × 4 image tokens
    s.text_tokens = 8;
    let p = plan(&cfg, &s).unwrap();
    assert_eq!(p.tokens, Tokens { img: 32, txt: 8 });
    let stream = |n: usize| {
        listed(&[
            (&[6, 64], 4),  // modulation vectors
            (&[n, 64], 2),  // LN1 normalised rows (the qkv input is rebuilt from them)
            (&[n, 192], 2), // qkv output (QK prologue input)
            (&[n, 64], 2),  // proj output (its input is re-merged from O)
            (&[n, 64], 2),  // LN2 normalised rows
            (&[n, 256], 2), // MLP pre-activation (GELU's output is rebuilt from it)
            (&[n, 64], 2),  // MLP output
            (&[n], 4),      // LN1 1/std
            (&[n], 4),      // LN2 1/std
        ])
    };
    // O and the log-sum-exp; Q, K, V and the 1/rms rows are rebuilt from qkv.
    let attention = |l: usize| listed(&[(&[l, 64], 2), (&[4, l], 4)]);
    let double = stream(32) + stream(8) + attention(40);
    let single = listed(&[
        (&[3, 64], 4),   // modulation vectors
        (&[40, 64], 2),  // pre-norm normalised rows
        (&[40, 448], 2), // linear1 output (linear2's input is rebuilt from it and O)
        (&[40, 64], 2),  // linear2 output
        (&[40], 4),      // pre-norm 1/std
    ]) + attention(40);
    // The LoRA terms' x·Aᵀ is recomputed in the backward: nothing saved for it.
    assert_eq!(row(&p, "activations"), 2 * double + 2 * single);
    // The adapted qkv's scratch: f32 base product [32, 192] and S', G' [32, 8] bf16.
    assert_eq!(row(&p, "GEMM scratch"), listed(&[(&[32, 192], 4), (&[2, 32, 8], 2)]));

    s.checkpointing = true;
    let p = plan(&cfg, &s).unwrap();
    let inputs = 4 * listed(&[(&[40, 64], 4)]);
    assert_eq!(row(&p, "activations"), inputs + double.max(single));
    // Offloaded: two blocks' inputs on the device, all four in pinned host memory (outside the
    // GPU total).
    let off = plan(&cfg, &Settings { offload_checkpoints: true, ..s.clone() }).unwrap();
    assert_eq!(row(&off, "activations"), inputs / 2 + double.max(single));
    assert_eq!(row(&off, "offloaded checkpoints"), inputs);
    assert_eq!(p.gpu_total() - off.gpu_total(), inputs / 2);
    assert_eq!(row(&p, "offloaded checkpoints"), 0);
    s.batch = 3;
    assert_eq!(row(&plan(&cfg, &s).unwrap(), "activations"), 3 * row(&p, "activations"));
    // Rank 4 on 2 × qkv [192, 64]: 4 · (64 + 192) each; f32 factors, their bf16 copies,
    // gradients, two moments.
    assert_eq!(p.trainable, 2 * 4 * (64 + 192));
    assert_eq!(row(&p, "LoRA") + row(&p, "AdamW"), 18 * p.trainable);
}

#[test]
fn flux1_dev_weights_by_dtype() {
    let cfg = FluxConfig::flux1_dev();
    let weights = |base| {
        let p = plan(&cfg, &settings(base, 1024, 16, "attn-mlp", true)).unwrap();
        row(&p, "base weights")
    };
    assert_eq!(weights(Base::Bf16), 2 * 11_901_408_320);
    let (mut q_numel, mut q_rows) = (0, 0);
    for (name, shape) in cfg.tensors() {
        let block = name.starts_with("double_blocks.") || name.starts_with("single_blocks.");
        if block && name.ends_with(".weight") && shape.len() == 2 {
            q_numel += shape[0] * shape[1];
            q_rows += shape[0];
        }
    }
    assert_eq!(weights(Base::Int8), 2 * 11_901_408_320 - q_numel + 4 * q_rows);
    assert_eq!(weights(Base::Fp8), 2 * 11_901_408_320 - q_numel);
    let ratio = weights(Base::Int8) as f64 / weights(Base::Bf16) as f64;
    assert!(ratio > 0.5 && ratio < 0.51, "int8 / bf16 = {ratio}");

    let mut s = settings(Base::Bf16, 1024, 16, "attn-mlp", true);
    let on_gpu = plan(&cfg, &s).unwrap().gpu_total();
    s.modulation_on_host = true;
    let p = plan(&cfg, &s).unwrap();
    // info: "modulation (acts once per sample): 3,247,448,064" parameters.
    assert_eq!(on_gpu - p.gpu_total(), 2 * 3_247_448_064);
    // README: rank 16 attn-mlp trains 44,826,624 parameters.
    assert_eq!(p.trainable, 44_826_624);
}

#[test]
fn flux1_dev_totals_are_in_a_sane_range_and_suggestions_fit() {
    let cfg = FluxConfig::flux1_dev();
    let gb = |s: &Settings| gib(plan(&cfg, s).unwrap().gpu_total());
    // The goal configuration: 1024², batch 1, rank 32, int8 base.
    let goal = settings(Base::Int8, 1024, 32, "attn-mlp", true);
    let g = gb(&goal);
    assert!((12.0..20.0).contains(&g), "int8 1024² rank 32 checkpointed: {g:.2} GiB");
    let full = settings(Base::Bf16, 1024, 32, "attn-mlp", false);
    let f = gb(&full);
    assert!(f > 24.0 + 10.0, "bf16 without checkpointing holds every block's activations: {f:.2} GiB");
    assert!(gb(&settings(Base::Bf16, 512, 32, "attn-mlp", false)) < f);
    let fits = suggest::fitting(&cfg, &full, 24 << 30).unwrap();
    assert!(!fits.is_empty());
    for (what, total) in &fits {
        assert!(*total <= 24 << 30, "{what}");
    }
    assert!(fits.iter().any(|(w, _)| w.contains("checkpointing")), "{fits:?}");
    assert!(fits.iter().any(|(w, _)| w.contains("--blocks-to-swap")), "{fits:?}");
    // An 8 GiB card: int8 at 1024² rank 16 checkpointed fits only with block swap among the
    // single changes, and that suggestion fits.
    let small = settings(Base::Int8, 1024, 16, "attn-mlp", true);
    let fits = suggest::fitting(&cfg, &small, 8 << 30).unwrap();
    let swap = fits.iter().find(|(w, _)| w.contains("--blocks-to-swap")).expect("a block-swap suggestion");
    assert!(swap.1 <= 8 << 30, "{swap:?}");
    assert!(plan(&cfg, &Settings { width: 1000, ..goal.clone() }).is_err());
}

/// On an H100/H200 the sm_90a LoRA GEMM needs no f32 base-product scratch when every rank is a
/// multiple of 8 (a rank-4 adapter falls back to the cuBLAS-base path and keeps it), and an int8
/// base adds one linear's bf16 copy (FLUX.1-dev: single blocks' linear1, 3072 × 21504).
#[test]
fn the_hopper_gemm_changes_the_scratch_not_the_rest() {
    let cfg = FluxConfig::flux1_dev();
    let scratch = |base, rank, hopper| {
        let s = Settings { hopper, ..settings(base, 1024, rank, "attn-mlp", true) };
        let p = plan(&cfg, &s).unwrap();
        (row(&p, "GEMM scratch"), row(&p, "8-bit weight dequantised"), p.gpu_total())
    };
    let (other, _, total_other) = scratch(Base::Bf16, 32, false);
    let (hop, deq, total_hop) = scratch(Base::Bf16, 32, true);
    assert!(hop < other / 10, "rank 32 on Hopper keeps {hop} of {other} bytes of scratch");
    assert_eq!((deq, total_other - total_hop), (0, other - hop));
    assert_eq!(scratch(Base::Bf16, 4, true).0, scratch(Base::Bf16, 4, false).0, "rank 4 falls back");
    assert_eq!(scratch(Base::Int8, 32, true).1, 3072 * 21504 * 2);
    assert_eq!(scratch(Base::Int8, 32, false).1, 0);
}

/// Block swap moves whole blocks (the chain's last: single blocks first) from the device to
/// pinned host memory and adds two device slots per swapped kind; `--max-vram` takes the fewest
/// swapped blocks that fit; settings that cannot be met name the flag.
#[test]
fn block_swap_moves_blocks_to_the_host_and_max_vram_chooses_the_fewest() {
    let cfg = FluxConfig::flux1_dev();
    let s = settings(Base::Int8, 1024, 16, "attn-mlp", true);
    let block = |prefix: &str| -> usize {
        cfg.tensors().iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, sh)| s.base.weight_bytes(n, sh)).sum()
    };
    let (single, double) = (block("single_blocks.0."), block("double_blocks.0."));
    let with = |n: usize| plan(&cfg, &Settings { blocks_to_swap: n, ..s.clone() }).unwrap();
    let p0 = with(0);
    assert_eq!((row(&p0, "block swap"), p0.swap.pcie_per_step), (0, 0));
    // All 38 single blocks: 36 blocks' worth fewer bytes on the device, every one on the host.
    let p = with(38);
    assert_eq!((p.swap.double, p.swap.single), (0, 38));
    assert_eq!(row(&p, "block swap: device slots"), 2 * single);
    assert_eq!(row(&p, "block swap: swapped"), 38 * single);
    assert_eq!(p0.gpu_total() - p.gpu_total(), 36 * single);
    // Once warm, the two blocks of a kind still in their slots at each turn are not copied.
    assert_eq!(p.swap.pcie_per_step, 2 * 36 * single);
    // One double block more: its slot takes what it frees; from the third on each frees one.
    assert_eq!(with(39).gpu_total(), p.gpu_total());
    assert_eq!(with(40).gpu_total(), p.gpu_total());
    assert!(with(41).gpu_total() < p.gpu_total());
    assert_eq!(with(57).swap.pcie_per_step, 2 * (17 * double + 36 * single));

    // --max-vram: the smallest N whose total fits (N = 20 fits its own total, N = 19 does not).
    let limit = with(20).gpu_total();
    assert!(with(19).gpu_total() > limit);
    assert_eq!(swap::choose(&cfg, &s, limit).unwrap(), (20, limit));
    assert_eq!(swap::choose(&cfg, &s, p0.gpu_total()).unwrap().0, 0);
    // The targets, 1024² rank 16 int8 with checkpointing, on 12 GiB and 8 GiB cards.
    for gib_limit in [12usize, 8] {
        let (n, total) = swap::choose(&cfg, &s, gib_limit << 30).unwrap();
        println!("{gib_limit} GiB: {n} blocks swapped, {:.2} GiB predicted", gib(total));
        assert!(total <= gib_limit << 30);
    }

    let e = plan(&cfg, &Settings { blocks_to_swap: 58, ..s.clone() }).unwrap_err().to_string();
    assert!(e.contains("--blocks-to-swap 58: this model has 57 blocks (19 double + 38 single)"), "{e}");
    let e = swap::choose(&cfg, &s, 1 << 30).unwrap_err().to_string();
    assert!(e.contains("--max-vram 1.00 GiB: the step does not fit even with all 57 blocks swapped"), "{e}");
}
