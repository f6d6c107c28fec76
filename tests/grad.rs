//! `grad` against PyTorch autograd through diffusers + PEFT (tools/make_fixtures.py): the
//! gradient of every LoRA factor, per tensor, relative L2 < 1e-4.

mod common;
use common::*;
use flux_kernels::io::safetensors::SafeTensors;
use flux_kernels::util::rel_l2;

#[test]
fn grad_matches_pytorch_for_every_dialect() {
    let dir = tmpdir("grad");
    for name in ["peft", "kohya", "onetrainer"] {
        let out = dir.join(format!("{name}.safetensors"));
        let loss = tiny_grad(&fixture(&format!("lora-{name}.safetensors")), &out).unwrap();
        let got = SafeTensors::open(&out).unwrap();
        let want = SafeTensors::open(&fixture(&format!("tiny-grad-{name}.safetensors"))).unwrap();
        let want_loss = want.read_f32("loss").unwrap().1[0] as f64;
        assert!((loss - want_loss).abs() < 1e-5 * want_loss, "{name}: loss {loss} vs {want_loss}");
        let mut worst = 0f64;
        let mut n = 0;
        for key in want.tensors().keys().filter(|k| *k != "loss") {
            let g = got.read_f32(key).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let w = want.read_f32(key).unwrap();
            assert_eq!(g.0, w.0, "{name}: {key} shape");
            let err = rel_l2(&g.1, &w.1);
            assert!(err < 1e-4, "{name}: {key}: rel L2 {err:e}");
            worst = worst.max(err);
            n += 1;
        }
        assert_eq!(n * 2, got.tensors().len() * 2, "{name}: every factor and nothing else");
        println!("{name}: {n} tensors, worst rel L2 {worst:.2e}, loss {loss:.6}");
    }
}
