pub mod builtin;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod objective;
pub mod sources;
pub mod trainer;
