//! Fused vs unfused LoRA linear (being written).
fn main() {}
