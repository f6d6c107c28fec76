//! `info --rank --targets` prints exactly what PEFT's print_trainable_parameters prints for the
//! same adapters on diffusers' FluxTransformer2DModel (tools/peft_counts.py recorded the lines).

mod common;
use common::*;
use flux_kernels::adapters::config::{resolve_targets, trainable_summary, LoraConfig};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::FluxConfig;

#[test]
fn trainable_line_matches_peft() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft-trainable.json")).unwrap()).unwrap();
    let tiny = Checkpoint::open(&fixture("tiny-diffusers"), None).unwrap().cfg;
    let cases = j["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let cfg = if c["model"] == "flux1-dev" { FluxConfig::flux1_dev() } else { tiny.clone() };
        let lc = LoraConfig {
            rank: c["r"].as_u64().unwrap() as usize,
            alpha: c["lora_alpha"].as_f64().unwrap() as f32,
            targets: c["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
            rank_pattern: c["rank_pattern"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
                .collect(),
            ..LoraConfig::default()
        };
        let specs = resolve_targets(&cfg, &lc).unwrap();
        assert_eq!(trainable_summary(&cfg, &specs), c["line"].as_str().unwrap(), "{c}");
    }
}
