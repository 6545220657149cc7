//! CLIP's text transformer (Radford et al. 2021), sized by the folder's
//! `text_encoder*/config.json`.
//!
//! Our own rather than candle's preset-only one because the SD family needs
//! three views of it: the final layer-normed states (SD 1.x/2.x), the
//! penultimate layer's raw states (SDXL), and the projected pooled embedding
//! at the end-of-text token (SDXL's second encoder).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// `CLIPTextModelWithProjection` also has the pooled-output projection.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Clone, Copy, Debug)]
enum Act {
    QuickGelu,
    Gelu,
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What one forward pass yields.
pub struct ClipOutput {
    /// After the final layer norm: [B, L, D].
    pub last: Tensor,
    /// The penultimate layer's output, no final norm: [B, L, D].
    pub penultimate: Tensor,
    /// `text_projection(last[eos])` when the encoder has a projection: [B, P].
    pub pooled_projected: Option<Tensor>,
}

pub struct ClipTextModel {
    token: Embedding,
    position: Embedding,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    heads: usize,
    act: Act,
    eos: Option<u32>,
}

impl ClipTextModel {
    /// `vb` is the component root (holding `text_model.*`); `with_projection`
    /// loads `text_projection` (CLIPTextModelWithProjection).
    pub fn new(cfg: &ClipConfig, with_projection: bool, vb: VarBuilder) -> anyhow::Result<Self> {
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            other => anyhow::bail!("text encoder: unsupported hidden_act '{other}'"),
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            anyhow::bail!("text encoder: hidden_size is not a multiple of num_attention_heads");
        }
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token = embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position = embedding(cfg.max_position_embeddings, cfg.hidden_size, emb.pp("position_embedding"))?;
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = tm.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(Layer {
                ln1: layer_norm(d, eps, l.pp("layer_norm1"))?,
                q: linear(d, d, a.pp("q_proj"))?,
                k: linear(d, d, a.pp("k_proj"))?,
                v: linear(d, d, a.pp("v_proj"))?,
                out: linear(d, d, a.pp("out_proj"))?,
                ln2: layer_norm(d, eps, l.pp("layer_norm2"))?,
                fc1: linear(d, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                fc2: linear(cfg.intermediate_size, d, l.pp("mlp.fc2"))?,
            });
        }
        let final_ln = layer_norm(d, eps, tm.pp("final_layer_norm"))?;
        let projection = if with_projection {
            let p = cfg.projection_dim.unwrap_or(d);
            Some(linear_no_bias(d, p, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(ClipTextModel {
            token,
            position,
            layers,
            final_ln,
            projection,
            heads: cfg.num_attention_heads,
            act,
            eos: cfg.eos_token_id,
        })
    }

    /// Encodes a batch of id rows ([B, L], u32).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (b, l) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let mut xs = self.token.forward(ids)?.broadcast_add(&self.position.forward(&positions)?)?;
        let mask = causal_mask(l, device, xs.dtype())?;
        let mut penultimate = xs.clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = self.layer_forward(layer, &xs, &mask)?;
            if i + 2 == n {
                penultimate = xs.clone();
            }
        }
        if n == 1 {
            // hidden_states[-2] of a one-layer encoder is the embedding output.
            penultimate = self.token.forward(ids)?.broadcast_add(&self.position.forward(&positions)?)?;
        }
        let last = self.final_ln.forward(&xs)?;
        let pooled_projected = match &self.projection {
            None => None,
            Some(p) => {
                let rows = ids.to_vec2::<u32>()?;
                let picks: Vec<Tensor> = rows
                    .iter()
                    .enumerate()
                    .map(|(r, row)| last.get(r)?.get(self.eos_position(row)))
                    .collect::<Result<_>>()?;
                Some(p.forward(&Tensor::stack(&picks, 0)?)?)
            }
        };
        debug_assert_eq!(last.dims(), &[b, l, last.dim(2)?]);
        Ok(ClipOutput { last, penultimate, pooled_projected })
    }

    /// Where transformers pools: the first end-of-text token, or the highest
    /// id for configs that still carry the legacy `eos_token_id` 2.
    fn eos_position(&self, row: &[u32]) -> usize {
        let argmax = || row.iter().enumerate().max_by_key(|(i, &v)| (v, std::cmp::Reverse(*i))).map_or(0, |(i, _)| i);
        match self.eos {
            Some(eos) if eos != 2 => row.iter().position(|&v| v == eos).unwrap_or_else(argmax),
            _ => argmax(),
        }
    }

    fn layer_forward(&self, layer: &Layer, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let residual = xs;
        let x = layer.ln1.forward(xs)?;
        let shape = |t: Tensor| t.reshape((b, l, h, hd))?.transpose(1, 2)?.contiguous();
        let q = (shape(layer.q.forward(&x)?)? * (hd as f64).powf(-0.5))?;
        let k = shape(layer.k.forward(&x)?)?;
        let v = shape(layer.v.forward(&x)?)?;
        let att = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (residual + layer.out.forward(&o)?)?;
        let residual = &x;
        let y = layer.fc1.forward(&layer.ln2.forward(&x)?)?;
        let y = match self.act {
            Act::QuickGelu => (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?,
            Act::Gelu => y.gelu_erf()?,
        };
        residual + layer.fc2.forward(&y)?
    }
}

fn causal_mask(l: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let v: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(v, (l, l), device)?.to_dtype(dtype)
}
