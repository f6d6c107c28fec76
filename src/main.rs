use anyhow::Result;
use clap::Parser;
use flux_kernels::cli::{self, Cli, Cmd};

fn main() -> Result<()> {
    flux_kernels::util::keep_freed_memory();
    match Cli::parse().cmd {
        Cmd::Info(a) => cli::info::main(a),
        Cmd::Train(a) => cli::train::main(*a),
        Cmd::Sample(a) => cli::sample::main(*a),
        Cmd::Serve(a) => cli::serve::main(*a),
        Cmd::Cache(a) => cli::cache::main(a),
        Cmd::SynthData(a) => cli::synth_data::main(a),
        Cmd::Lora(a) => cli::lora_cmd::main(a),
        Cmd::Forward(a) => cli::forward::main(a),
        Cmd::Quantize(a) => cli::quantize::main(a),
        Cmd::BenchStep(a) => cli::bench_step::main(a),
        Cmd::BenchCpu(a) => cli::bench_cpu::main(a),
        Cmd::Plan(a) => cli::plan::main(a),
        Cmd::Grad(a) => cli::grad::main(a),
    }
}
