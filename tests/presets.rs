//! `train --preset style|character|concept` (issue 16 §4): each preset picks rank, alpha,
//! targets and learning rate within the seed's guidance, the run prints what it chose, and a
//! flag or a TOML key given explicitly wins over the preset.

mod common;
use common::*;
use flux_kernels::cli::args::AdapterArgs;
use flux_kernels::cli::train::Args as TrainArgs;
use flux_kernels::train::config::{preset, PRESETS};

fn resolve(args: TrainArgs) -> flux_kernels::train::config::TrainConfig {
    TrainArgs { data: Some("d".into()), model: Some("m".into()), ..args }.resolve().unwrap()
}

#[test]
fn each_preset_picks_values_within_the_seed_guidance() {
    // Seed: rank 8–16 for a style, 32 for a character or subject, 64 for a complex concept;
    // learning rates 1e-4 to 5e-4.
    let ranks = [("style", 8..=16), ("character", 32..=32), ("concept", 64..=64)];
    assert_eq!(PRESETS.len(), ranks.len());
    for (name, want) in ranks {
        let c = resolve(TrainArgs { preset: Some(name.into()), ..TrainArgs::default() });
        let p = preset(name).unwrap();
        assert!(want.contains(&c.rank), "{name}: rank {}", c.rank);
        assert!((1e-4..=5e-4).contains(&c.lr), "{name}: lr {}", c.lr);
        assert_eq!((c.rank, c.alpha, c.targets.as_str(), c.lr), (p.rank, p.alpha, p.targets, p.lr), "{name}");
        assert_eq!(c.preset, name);
        c.validate().unwrap();
        let line = c.preset_summary().unwrap();
        assert!(line.starts_with(&format!("preset {name}: rank {}", p.rank)), "{line}");
        assert!(!line.contains("given explicitly"), "{line}");
    }
    // The built-in demo keeps a preset's choices (concept's lr equals the default 1e-4, style's
    // targets the default attn-mlp; the demo would otherwise raise the one and widen the other).
    for name in ["concept", "style"] {
        let c = TrainArgs { preset: Some(name.into()), ..TrainArgs::default() }.resolve().unwrap();
        let p = preset(name).unwrap();
        assert_eq!((c.lr, c.targets.as_str(), c.steps), (p.lr, p.targets, 600), "{name} in the demo");
    }
    // The presets differ from the defaults and from each other where the guidance says so.
    let d = resolve(TrainArgs::default());
    assert!(d.preset.is_empty() && d.preset_summary().is_none());
    assert!(PRESETS.windows(2).all(|w| w[0].rank < w[1].rank));
}

#[test]
fn flags_and_toml_keys_win_over_the_preset() {
    let dir = tmpdir("presets");
    // A flag wins; the preset's other keys stay.
    let adapter = AdapterArgs { rank: Some(8), ..AdapterArgs::default() };
    let c = resolve(TrainArgs { preset: Some("character".into()), adapter, ..TrainArgs::default() });
    let p = preset("character").unwrap();
    assert_eq!((c.rank, c.alpha, c.targets.as_str(), c.lr), (8, p.alpha, p.targets, p.lr));
    let line = c.preset_summary().unwrap();
    assert!(line.contains("given explicitly: rank 8 (preset: 32)"), "{line}");
    let c = resolve(TrainArgs { preset: Some("style".into()), lr: Some(1e-3), ..TrainArgs::default() });
    assert_eq!((c.lr, c.rank), (1e-3, preset("style").unwrap().rank));

    // A TOML key wins over a --preset flag, and over the file's own `preset` key.
    let toml = dir.join("c.toml");
    std::fs::write(&toml, "targets = \"attn\"\n").unwrap();
    let c = resolve(TrainArgs { preset: Some("concept".into()), config: Some(toml.clone()), ..TrainArgs::default() });
    assert_eq!((c.rank, c.targets.as_str()), (64, "attn"));
    std::fs::write(&toml, "preset = \"concept\"\nlr = 3e-4\n").unwrap();
    let c = resolve(TrainArgs { config: Some(toml.clone()), ..TrainArgs::default() });
    assert_eq!((c.rank, c.alpha, c.lr, c.preset.as_str()), (64, 64.0, 3e-4, "concept"));
    // The flag's preset wins over the file's.
    let c = resolve(TrainArgs { preset: Some("style".into()), config: Some(toml.clone()), ..TrainArgs::default() });
    assert_eq!((c.rank, c.lr), (preset("style").unwrap().rank, 3e-4));

    // An unknown preset names itself and the choices, from a flag or from the file.
    let e = err_string(TrainArgs { preset: Some("portrait".into()), ..TrainArgs::default() }.resolve());
    assert!(e.contains("--preset") && e.contains("portrait") && e.contains("style, character, concept"), "{e}");
    std::fs::write(&toml, "preset = \"portrait\"\n").unwrap();
    let e = err_string(TrainArgs { config: Some(toml.clone()), ..TrainArgs::default() }.resolve());
    assert!(e.contains("c.toml") && e.contains("portrait"), "{e}");
}

#[test]
fn train_prints_what_the_preset_chose() {
    let dir = tmpdir("presets-cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-kernels"))
        .args(["train", "--data", "builtin", "--preset", "style", "--rank", "4", "--steps", "1", "--device", "cpu"])
        .arg("--out")
        .arg(dir.join("lora.safetensors"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}{}", String::from_utf8_lossy(&out.stderr));
    let p = preset("style").unwrap();
    let want = format!("preset style: alpha {}, targets {}, lr {:e}", p.alpha, p.targets, p.lr);
    assert!(s.contains(&want) && s.contains("given explicitly: rank 4 (preset: 16)"), "{s}");
}
