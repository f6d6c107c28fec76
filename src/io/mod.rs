//! Everything that touches files: safetensors, the two checkpoint layouts, LoRA dialects.

pub mod checkpoint;
pub mod images;
pub mod layout;
pub mod lora_formats;
pub mod safetensors;
