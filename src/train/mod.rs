pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod objective;
pub mod optim;
pub mod trainer;
