//! The autoencoder's module tree, named as BFL's `modules/autoencoder.py` names it (so a key of
//! `ae.safetensors` maps to a field by reading), with each module's forward in the order of
//! docs/flux-model.md §8.3. Activations are NCHW f32 buffers; every forward takes
//! the batch and spatial size explicitly and returns a new buffer.

use super::VaeConfig;
use crate::ops::activation::silu;
use crate::ops::conv::{
    conv2d_forward, conv_out_size, group_norm_forward, spatial_attention_forward, upsample_nearest2x_forward, Pad2d,
};
use crate::ops::matmul::linear_forward;
use anyhow::Result;
use rayon::prelude::*;

/// GroupNorm's eps everywhere in the FLUX autoencoder (BFL `Normalize`; diffusers `resnet_eps`).
pub const GN_EPS: f32 = 1e-6;

/// Yields one parameter by its BFL name, checked against the shape given (the loader's job).
pub type ParamSource<'a> = dyn Fn(&str, &[usize]) -> Result<Vec<f32>> + 'a;

pub struct Conv2d {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl Conv2d {
    fn load(get: &ParamSource, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
        let weight = get(&format!("{name}.weight"), &[cout, cin, k, k])?;
        let bias = get(&format!("{name}.bias"), &[cout])?;
        Ok(Conv2d { weight, bias, cin, cout, k })
    }

    /// x [b, cin, h, w] → [b, cout, h', w'].
    fn forward(&self, x: &[f32], b: usize, h: usize, w: usize, stride: usize, pad: Pad2d) -> Vec<f32> {
        let ho = conv_out_size(h, self.k, stride, pad.top, pad.bottom);
        let wo = conv_out_size(w, self.k, stride, pad.left, pad.right);
        let mut out = vec![0f32; b * self.cout * ho * wo];
        conv2d_forward(&mut out, x, &self.weight, Some(&self.bias), b, self.cin, h, w, self.cout, self.k, stride, pad);
        out
    }

    /// The "same" convolution: 3×3 with padding 1, or 1×1 without.
    fn same(&self, x: &[f32], b: usize, h: usize, w: usize) -> Vec<f32> {
        self.forward(x, b, h, w, 1, Pad2d::uniform(self.k / 2))
    }
}

pub struct GroupNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub c: usize,
    pub groups: usize,
}

impl GroupNorm {
    fn load(get: &ParamSource, name: &str, c: usize, groups: usize) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: get(&format!("{name}.weight"), &[c])?,
            bias: get(&format!("{name}.bias"), &[c])?,
            c,
            groups,
        })
    }

    fn forward(&self, x: &[f32], b: usize, hw: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        group_norm_forward(&mut out, x, &self.weight, &self.bias, b, self.c, hw, self.groups, GN_EPS);
        out
    }

    /// GroupNorm then swish, the pre-activation of every conv in the autoencoder.
    fn forward_silu(&self, x: &[f32], b: usize, hw: usize) -> Vec<f32> {
        let mut out = self.forward(x, b, hw);
        out.par_iter_mut().for_each(|v| *v = silu(*v));
        out
    }
}

/// BFL `ResnetBlock`: GN → swish → conv3×3 → GN → swish → conv3×3, plus x (through the 1×1
/// `nin_shortcut` when the channel count changes). Dropout is 0 and there is no time embedding.
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(get: &ParamSource, name: &str, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(get, &format!("{name}.norm1"), cin, groups)?,
            conv1: Conv2d::load(get, &format!("{name}.conv1"), cin, cout, 3)?,
            norm2: GroupNorm::load(get, &format!("{name}.norm2"), cout, groups)?,
            conv2: Conv2d::load(get, &format!("{name}.conv2"), cout, cout, 3)?,
            nin_shortcut: (cin != cout)
                .then(|| Conv2d::load(get, &format!("{name}.nin_shortcut"), cin, cout, 1))
                .transpose()?,
        })
    }

    fn forward(&self, x: &[f32], b: usize, h: usize, w: usize) -> Vec<f32> {
        let t = self.norm1.forward_silu(x, b, h * w);
        let t = self.conv1.same(&t, b, h, w);
        let t = self.norm2.forward_silu(&t, b, h * w);
        let mut out = self.conv2.same(&t, b, h, w);
        match &self.nin_shortcut {
            Some(sc) => out.par_iter_mut().zip(sc.same(x, b, h, w)).for_each(|(o, s)| *o += s),
            None => out.par_iter_mut().zip(x).for_each(|(o, &s)| *o += s),
        }
        out
    }
}

/// A 1×1 convolution used as a Linear over channels: weight [c_out, c_in] (BFL stores it as
/// [c, c, 1, 1], diffusers as a Linear [c, c]; the memory layout is the same).
pub struct Pointwise {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Pointwise {
    fn load(get: &ParamSource, name: &str, c: usize) -> Result<Pointwise> {
        Ok(Pointwise {
            weight: get(&format!("{name}.weight"), &[c, c, 1, 1])?,
            bias: get(&format!("{name}.bias"), &[c])?,
        })
    }

    /// Token-major x [rows, c] → [rows, c].
    fn forward(&self, x: &[f32], rows: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * c];
        linear_forward(&mut out, x, &self.weight, Some(&self.bias), rows, c, c);
        out
    }
}

/// BFL `AttnBlock`: x + proj_out(attention(q, k, v)) with q, k, v 1×1 convs of GN(x), one head of all
/// c channels over the h·w positions, scale 1/√c (diffusers: `Attention(heads=1, dim_head=c)`).
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub q: Pointwise,
    pub k: Pointwise,
    pub v: Pointwise,
    pub proj_out: Pointwise,
}

impl AttnBlock {
    fn load(get: &ParamSource, name: &str, c: usize, groups: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: GroupNorm::load(get, &format!("{name}.norm"), c, groups)?,
            q: Pointwise::load(get, &format!("{name}.q"), c)?,
            k: Pointwise::load(get, &format!("{name}.k"), c)?,
            v: Pointwise::load(get, &format!("{name}.v"), c)?,
            proj_out: Pointwise::load(get, &format!("{name}.proj_out"), c)?,
        })
    }

    fn forward(&self, x: &[f32], b: usize, c: usize, hw: usize) -> Vec<f32> {
        // "b c h w -> b (h w) c", as BFL rearranges before the attention.
        let tokens = transpose_planes(&self.norm.forward(x, b, hw), c, hw);
        let (q, k, v) = (
            self.q.forward(&tokens, b * hw, c),
            self.k.forward(&tokens, b * hw, c),
            self.v.forward(&tokens, b * hw, c),
        );
        let mut o = vec![0f32; b * hw * c];
        spatial_attention_forward(&mut o, &q, &k, &v, b, hw, c);
        let p = transpose_planes(&self.proj_out.forward(&o, b * hw, c), hw, c);
        p.par_iter().zip(x).map(|(&p, &x)| x + p).collect()
    }
}

/// Spatial size after a `downsample` (pad (0,1,0,1), 3×3 stride 2): ⌊n/2⌋.
pub fn downsampled(n: usize) -> usize {
    conv_out_size(n, 3, 2, Pad2d::DOWNSAMPLE.top, Pad2d::DOWNSAMPLE.bottom)
}

/// [b, r, s] → [b, s, r].
fn transpose_planes(x: &[f32], r: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    out.par_chunks_mut(r * s).zip(x.par_chunks(r * s)).for_each(|(o, x)| {
        for (i, row) in x.chunks(s).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                o[j * r + i] = v;
            }
        }
    });
    out
}

/// `mid`: block_1, attn_1, block_2 at the top channel count.
pub struct Mid {
    pub block_1: ResnetBlock,
    pub attn_1: AttnBlock,
    pub block_2: ResnetBlock,
}

impl Mid {
    fn load(get: &ParamSource, name: &str, c: usize, groups: usize) -> Result<Mid> {
        Ok(Mid {
            block_1: ResnetBlock::load(get, &format!("{name}.block_1"), c, c, groups)?,
            attn_1: AttnBlock::load(get, &format!("{name}.attn_1"), c, groups)?,
            block_2: ResnetBlock::load(get, &format!("{name}.block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let t = self.block_1.forward(x, b, h, w);
        let t = self.attn_1.forward(&t, b, c, h * w);
        self.block_2.forward(&t, b, h, w)
    }
}

/// `encoder.down.{i}`: `num_res_blocks` ResnetBlocks, then a stride-2 `downsample` on all levels but the last.
pub struct DownLevel {
    pub block: Vec<ResnetBlock>,
    pub downsample: Option<Conv2d>,
}

/// `decoder.up.{i}`: `num_res_blocks + 1` ResnetBlocks, then a nearest-2× `upsample` on all levels but 0.
pub struct UpLevel {
    pub block: Vec<ResnetBlock>,
    pub upsample: Option<Conv2d>,
}

pub struct Encoder {
    pub conv_in: Conv2d,
    pub down: Vec<DownLevel>,
    pub mid: Mid,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid: Mid,
    /// Indexed by level as BFL stores it (`up.0` is the full-resolution level); run from the top.
    pub up: Vec<UpLevel>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn load(cfg: &VaeConfig, get: &ParamSource) -> Result<Encoder> {
        let (g, levels) = (cfg.groups, cfg.ch_mult.len());
        let mut down = Vec::with_capacity(levels);
        let mut cin = cfg.ch;
        for i in 0..levels {
            let c = cfg.channels(i);
            let mut block = Vec::with_capacity(cfg.num_res_blocks);
            for j in 0..cfg.num_res_blocks {
                block.push(ResnetBlock::load(get, &format!("encoder.down.{i}.block.{j}"), cin, c, g)?);
                cin = c;
            }
            let downsample = (i + 1 < levels)
                .then(|| Conv2d::load(get, &format!("encoder.down.{i}.downsample.conv"), c, c, 3))
                .transpose()?;
            down.push(DownLevel { block, downsample });
        }
        let top = cfg.channels(levels - 1);
        Ok(Encoder {
            conv_in: Conv2d::load(get, "encoder.conv_in", cfg.in_channels, cfg.ch, 3)?,
            down,
            mid: Mid::load(get, "encoder.mid", top, g)?,
            norm_out: GroupNorm::load(get, "encoder.norm_out", top, g)?,
            conv_out: Conv2d::load(get, "encoder.conv_out", top, 2 * cfg.z_channels, 3)?,
        })
    }

    /// img [b, in_channels, h, w] → moments [b, 2·z, h/f, w/f] (mean ‖ logvar), unscaled.
    pub fn forward(&self, img: &[f32], b: usize, mut h: usize, mut w: usize) -> Vec<f32> {
        let mut x = self.conv_in.same(img, b, h, w);
        for level in &self.down {
            for blk in &level.block {
                x = blk.forward(&x, b, h, w);
            }
            if let Some(ds) = &level.downsample {
                x = ds.forward(&x, b, h, w, 2, Pad2d::DOWNSAMPLE);
                (h, w) = (downsampled(h), downsampled(w));
            }
        }
        let c = self.mid.block_1.conv1.cin;
        x = self.mid.forward(&x, b, c, h, w);
        let t = self.norm_out.forward_silu(&x, b, h * w);
        self.conv_out.same(&t, b, h, w)
    }
}

impl Decoder {
    pub fn load(cfg: &VaeConfig, get: &ParamSource) -> Result<Decoder> {
        let (g, levels) = (cfg.groups, cfg.ch_mult.len());
        let top = cfg.channels(levels - 1);
        let mut up: Vec<UpLevel> = Vec::with_capacity(levels);
        // Built from the top, in the order the forward runs, so each level's input count is known.
        let mut cin = top;
        for i in (0..levels).rev() {
            let c = cfg.channels(i);
            let mut block = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..cfg.num_res_blocks + 1 {
                block.push(ResnetBlock::load(get, &format!("decoder.up.{i}.block.{j}"), cin, c, g)?);
                cin = c;
            }
            let upsample =
                (i > 0).then(|| Conv2d::load(get, &format!("decoder.up.{i}.upsample.conv"), c, c, 3)).transpose()?;
            up.push(UpLevel { block, upsample });
        }
        up.reverse();
        Ok(Decoder {
            conv_in: Conv2d::load(get, "decoder.conv_in", cfg.z_channels, top, 3)?,
            mid: Mid::load(get, "decoder.mid", top, g)?,
            up,
            norm_out: GroupNorm::load(get, "decoder.norm_out", cfg.channels(0), g)?,
            conv_out: Conv2d::load(get, "decoder.conv_out", cfg.channels(0), cfg.in_channels, 3)?,
        })
    }

    /// Unscaled latent [b, z, h, w] → image [b, in_channels, h·f, w·f].
    pub fn forward(&self, z: &[f32], b: usize, mut h: usize, mut w: usize) -> Vec<f32> {
        let mut x = self.conv_in.same(z, b, h, w);
        x = self.mid.forward(&x, b, self.conv_in.cout, h, w);
        for level in self.up.iter().rev() {
            for blk in &level.block {
                x = blk.forward(&x, b, h, w);
            }
            if let Some(us) = &level.upsample {
                let mut big = vec![0f32; x.len() * 4];
                upsample_nearest2x_forward(&mut big, &x, b, us.cin, h, w);
                (h, w) = (2 * h, 2 * w);
                x = us.same(&big, b, h, w);
            }
        }
        let t = self.norm_out.forward_silu(&x, b, h * w);
        self.conv_out.same(&t, b, h, w)
    }
}
