//! The decoder-only transformer of the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3,
//! Gemma 2/3, and the mixtures of experts Mixtral and Qwen3-MoE), with the exact computation
//! order of transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` /
//! `Phi3ForCausalLM` / `Gemma2ForCausalLM` / `MixtralForCausalLM` / ....

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, FloatDType};

use crate::config::ModelConfig;
use crate::layers::{Proj, RmsNorm, Rope, RopeTables};
use crate::mask::AttentionLayout;
use crate::moe::{Routing, SparseMoe};
use crate::nf4::{Nf4Weight, Quantization};

/// Separate projections (q/k/v, gate/up) or, in Phi-3, one fused projection each
/// (`qkv_proj`, `gate_up_proj`): one of the two is set. Fused layers stay fused so that LoRA
/// adapts them as PEFT does (one `lora_A` shared by q, k and v).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Option<Proj<B>>,
    pub k_proj: Option<Proj<B>>,
    pub v_proj: Option<Proj<B>>,
    /// Phi-3: `[q | k | v]` outputs.
    pub qkv_proj: Option<Proj<B>>,
    pub o_proj: Proj<B>,
    /// Qwen3's per-head RMSNorm of queries and keys, `[head_dim]` each.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Scores are scaled by this: `head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`.
    pub scale: f64,
    /// Gemma 2's `attn_logit_softcapping`: scores become `cap * tanh(scores / cap)`.
    pub softcap: Option<f64>,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<Proj<B>>,
    pub up_proj: Option<Proj<B>>,
    /// Phi-3: `[gate | up]` outputs.
    pub gate_up_proj: Option<Proj<B>>,
    pub down_proj: Proj<B>,
    /// SiLU (Llama), or Gemma's `gelu_pytorch_tanh`.
    pub gelu: bool,
}

/// Splits a fused projection's output `[B, T, sum(widths)]` into consecutive parts.
fn split_last<B: Backend>(y: Tensor<B, 3>, widths: &[usize]) -> Vec<Tensor<B, 3>> {
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let part = y.clone().narrow(2, at, w);
            at += w;
            part
        })
        .collect()
}

/// The projections of one input that are either separate or fused (`parts` of the fused
/// output, in order): exactly one form is present, as the loader builds them.
fn projected<B: Backend, const N: usize>(
    x: Tensor<B, 3>,
    separate: [&Option<Proj<B>>; N],
    fused: &Option<Proj<B>>,
    widths: [usize; N],
) -> [Tensor<B, 3>; N] {
    match fused {
        Some(f) => split_last(f.forward(x), &widths)
            .try_into()
            .unwrap_or_else(|_| unreachable!("one part per width")),
        None => separate.map(|p| match p {
            Some(p) => p.forward(x.clone()),
            None => unreachable!("a layer has its separate or its fused projections"),
        }),
    }
}

/// Llama: `x + attn(input_norm(x))`, then `x + mlp(post_attention_norm(x))`. Gemma 2 (with
/// the feed-forward norms): `x + post_attention_norm(attn(input_norm(x)))`, then
/// `x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))`. The feed-forward is the dense
/// MLP or, in a mixture of experts' sparse layers, routed experts: one of the two is set.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    pub mlp: Option<Mlp<B>>,
    pub moe: Option<SparseMoe<B>>,
}

#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`, HF `model.embed_tokens.weight`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when `tie_word_embeddings`: logits then use `embed_tokens`.
    pub lm_head: Option<Proj<B>>,
    /// Reward models (`*ForSequenceClassification`, one label): `[hidden, 1]`, HF `score.weight`.
    pub score: Option<Proj<B>>,
    /// PPO's value head `[hidden, 1]` on the policy's backbone; never part of an HF export.
    pub value_head: Option<Proj<B>>,
    #[module(skip)]
    pub rope: Rope,
    /// Gemma 3: the rotary embedding of the sliding-window layers (its own base).
    #[module(skip)]
    pub local_rope: Option<Rope>,
    /// Gemma scales the embeddings by sqrt(hidden) (as an f32 constant, as transformers).
    #[module(skip)]
    pub embed_scale: Option<f32>,
    /// Gemma 2's `final_logit_softcapping`: logits become `cap * tanh(logits / cap)`.
    #[module(skip)]
    pub final_softcap: Option<f64>,
    /// Sliding-window attention, when the config has it.
    #[module(skip)]
    pub sliding_window: Option<crate::config::SlidingWindow>,
    /// A mixture of experts trained with its load-balancing loss: that loss's weight (the
    /// config's `router_aux_loss_coef`, as TRL takes it; `[train] router_aux_loss_coef`
    /// overrides it, 0 turns it off).
    #[module(skip)]
    pub router_aux_loss_coef: Option<f64>,
}

/// One layer's cached keys and values, `[B, kv_heads, capacity, head_dim]` each.
pub type LayerKv<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Where one forward pass writes its keys and values into a cache.
#[derive(Clone, Copy)]
pub(crate) enum CacheWrite<'a> {
    /// Every row at the same slots `past..past + T` (one batch decoding in lockstep).
    From { past: usize },
    /// One new token per row at the row's own slot (`None`: the row writes nothing), then
    /// attention over rows `0..rows` and slots `0..view` only: the continuous batching of
    /// [`crate::slots`], where requests joined at different times.
    Rows {
        at: &'a [Option<usize>],
        rows: usize,
        view: usize,
    },
}

/// A layer's view of the cache during one forward pass.
pub struct CacheSlot<'a, B: Backend> {
    kv: &'a mut LayerKv<B>,
    write: CacheWrite<'a>,
    capacity: usize,
}

/// Keys and values of every layer, preallocated to a fixed capacity so each decoding
/// step writes one slot instead of re-running or re-concatenating the prefix.
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerKv<B>>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity,
        }
    }

    /// Repeat every cached row `copies` times in place (row r becomes rows r*copies ..
    /// (r+1)*copies): a prompt prefilled once serves a whole group of samples.
    pub fn repeat_rows(&mut self, copies: usize) {
        if copies == 1 {
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let rows = k.dims()[0];
            let idx: Vec<i64> = (0..rows as i64)
                .flat_map(|r| std::iter::repeat_n(r, copies))
                .collect();
            let idx =
                Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows * copies]), &k.device());
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx);
        }
    }
}

/// transformers' `gelu_pytorch_tanh`: `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
        .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    (x.clone() + x * inner.tanh()).mul_scalar(0.5)
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let i = self.down_proj.dims()[0];
        let [gate, up] = projected(
            x,
            [&self.gate_proj, &self.up_proj],
            &self.gate_up_proj,
            [i, i],
        );
        let gate = match self.gelu {
            true => gelu_tanh(gate),
            false => silu(gate),
        };
        self.down_proj.forward(gate * up)
    }
}

impl<B: Backend> SelfAttention<B> {
    /// A `[B, 1, T, S]` mask with its rows repeated for the `group` query heads of each KV
    /// head: `[B, KVH, group * T, S]`, the layout `forward` attends in.
    pub(crate) fn grouped_mask(&self, mask: Tensor<B, 4, Bool>) -> Tensor<B, 4, Bool> {
        let [b, _, tq, tk] = mask.dims();
        let kvh = self.num_kv_heads;
        let group = self.num_heads / kvh;
        mask.reshape([b, 1, 1, tq, tk])
            .expand([b, kvh, group, tq, tk])
            .reshape([b, kvh, group * tq, tk])
    }

    /// Whether a pass over `tokens` without a cache takes the fused causal attention (which
    /// has no soft-capping).
    pub(crate) fn fused(&self, tokens: usize) -> bool {
        self.softcap.is_none() && crate::causal_attention::fused::<B>(tokens)
    }

    fn split_heads(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// `mask` is grouped (`grouped_mask`): `[B, KVH, group * T, S]`, true = blocked; or,
    /// without a cache where `causal_attention::fused` holds, `[B, 1, T, T]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (kvh, d) = (self.num_kv_heads, self.head_dim);
        let group = self.num_heads / kvh;
        let [q, k, v] = projected(
            x,
            [&self.q_proj, &self.k_proj, &self.v_proj],
            &self.qkv_proj,
            [self.num_heads * d, kvh * d, kvh * d],
        );
        let q = rope.apply(head_norm(&self.q_norm, self.split_heads(q, self.num_heads)));
        let k = rope.apply(head_norm(&self.k_norm, self.split_heads(k, kvh)));
        let v = self.split_heads(v, kvh);
        let cache_less = cache.is_none();
        let (k, v) = match cache {
            None => (k, v),
            Some(CacheSlot {
                kv: slot,
                write,
                capacity,
            }) => {
                let (mut ck, mut cv) = slot.take().unwrap_or_else(|| {
                    let shape = [b, kvh, capacity, d];
                    let device = k.device();
                    (Tensor::zeros(shape, &device), Tensor::zeros(shape, &device))
                });
                let out = match write {
                    CacheWrite::From { past } => {
                        let range = s![.., .., past..past + t, ..];
                        ck = ck.slice_assign(range, k);
                        cv = cv.slice_assign(range, v);
                        // Attend over the whole capacity, unwritten slots masked: no copy
                        // of the used prefix, and one key shape for a whole generation.
                        (ck.clone(), cv.clone())
                    }
                    CacheWrite::Rows { at, rows, view } => {
                        for (r, col) in at.iter().enumerate() {
                            if let Some(c) = *col {
                                let range = s![r..r + 1, .., c..c + 1, ..];
                                ck = ck.slice_assign(range, k.clone().slice(s![r..r + 1]));
                                cv = cv.slice_assign(range, v.clone().slice(s![r..r + 1]));
                            }
                        }
                        let used = s![0..rows, .., 0..view, ..];
                        (ck.clone().slice(used), cv.clone().slice(used))
                    }
                };
                *slot = Some((ck, cv));
                out
            }
        };
        if cache_less && self.fused(t) {
            let o = crate::causal_attention::forward(q, k, v, mask, self.scale);
            let o = o.swap_dims(1, 2).reshape([b, t, self.num_heads * d]);
            return self.o_proj.forward(o);
        }
        // Grouped-query attention without repeating keys and values for every query head:
        // the `group` query heads that share a KV head become `group * t` query rows of it
        // (`[B, H, T, D]` and `[B, KVH, group * T, D]` are the same memory); the mask came
        // grouped to match (`grouped_mask`).
        let q = q.reshape([b, kvh, group * t, d]);
        crate::shape_audit::record("attention", &[&q.dims(), &k.dims()]);
        let o = attention(
            q,
            k,
            v,
            Some(mask),
            None,
            AttentionModuleOptions {
                scale: Some(self.scale),
                softcap: self.softcap,
                is_causal: false,
            },
        );
        let o = o
            .reshape([b, self.num_heads, t, d])
            .swap_dims(1, 2)
            .reshape([b, t, self.num_heads * d]);
        self.o_proj.forward(o)
    }
}

/// Qwen3's RMSNorm over each head's vectors (`[B, H, T, head_dim]`), or nothing.
fn head_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match norm {
        None => x,
        Some(n) => {
            let [b, h, t, d] = x.dims();
            n.forward(x.reshape([b * h, t, d])).reshape([b, h, t, d])
        }
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's linear projections with their HF names, in the order of
    /// `lora::LINEAR_MODULES` (separate or fused, as the layer has them). A sparse layer's
    /// router and experts are not among them: LoRA adapts the attention there.
    pub fn projections(&self) -> Vec<(&'static str, &Proj<B>)> {
        let a = &self.self_attn;
        let m = self.mlp.as_ref();
        let all = [
            ("q_proj", a.q_proj.as_ref()),
            ("k_proj", a.k_proj.as_ref()),
            ("v_proj", a.v_proj.as_ref()),
            ("qkv_proj", a.qkv_proj.as_ref()),
            ("o_proj", Some(&a.o_proj)),
            ("gate_proj", m.and_then(|m| m.gate_proj.as_ref())),
            ("up_proj", m.and_then(|m| m.up_proj.as_ref())),
            ("gate_up_proj", m.and_then(|m| m.gate_up_proj.as_ref())),
            ("down_proj", m.map(|m| &m.down_proj)),
        ];
        all.into_iter()
            .filter_map(|(name, p)| Some((name, p?)))
            .collect()
    }

    /// [`Self::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj<B>)> {
        let a = &mut self.self_attn;
        let (gate, up, gate_up, down) = match self.mlp.as_mut() {
            Some(m) => (
                m.gate_proj.as_mut(),
                m.up_proj.as_mut(),
                m.gate_up_proj.as_mut(),
                Some(&mut m.down_proj),
            ),
            None => (None, None, None, None),
        };
        let all = [
            ("q_proj", a.q_proj.as_mut()),
            ("k_proj", a.k_proj.as_mut()),
            ("v_proj", a.v_proj.as_mut()),
            ("qkv_proj", a.qkv_proj.as_mut()),
            ("o_proj", Some(&mut a.o_proj)),
            ("gate_proj", gate),
            ("up_proj", up),
            ("gate_up_proj", gate_up),
            ("down_proj", down),
        ];
        all.into_iter()
            .filter_map(|(name, p)| Some((name, p?)))
            .collect()
    }

    /// The layer's output, and its routing when it is a sparse layer.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        let h = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(h);
                let (h, routing) = self.feed_forward(pre.forward(x.clone()));
                (x + post.forward(h), routing)
            }
            _ => {
                let x = x + h;
                let (h, routing) =
                    self.feed_forward(self.post_attention_layernorm.forward(x.clone()));
                (x + h, routing)
            }
        }
    }

    fn feed_forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Option<Routing<B>>) {
        match (&self.mlp, &self.moe) {
            (Some(mlp), _) => (mlp.forward(x), None),
            (None, Some(moe)) => {
                let (y, routing) = moe.forward(x);
                (y, Some(routing))
            }
            (None, None) => unreachable!("a layer has its MLP or its experts"),
        }
    }
}

/// Inputs of one forward pass: token ids, their position ids and who may attend to whom.
pub struct ForwardInput<B: Backend> {
    pub ids: Tensor<B, 2, Int>,
    pub positions: Tensor<B, 2, Int>,
    pub mask: Tensor<B, 4, Bool>,
    /// Per flattened `[B * T]` token: real (true) or padding; what a mixture of experts'
    /// load-balancing loss counts.
    pub real: Vec<bool>,
}

impl<B: Backend> ForwardInput<B> {
    /// Build from host data: ids and positions `[B][T]` and an attention layout.
    pub fn from_host(
        ids: &[Vec<u32>],
        positions: &[Vec<i64>],
        layout: &AttentionLayout,
        device: &B::Device,
    ) -> Self {
        let b = ids.len();
        let t = ids.first().map_or(0, |r| r.len());
        let flat_ids: Vec<i64> = ids.iter().flatten().map(|&x| x as i64).collect();
        let flat_pos: Vec<i64> = positions.iter().flatten().copied().collect();
        // The queries' own slots of the layout's keys (past a KV cache's prefix).
        let at = layout.q_offset;
        let real = layout
            .key_valid
            .iter()
            .flat_map(|row| (0..t).map(move |i| row.get(at + i).copied().unwrap_or(true)))
            .collect();
        Self {
            ids: Tensor::from_data(TensorData::new(flat_ids, [b, t]), device),
            positions: Tensor::from_data(TensorData::new(flat_pos, [b, t]), device),
            mask: layout.to_tensor(device),
            real,
        }
    }

    /// A batch of equal-length unpadded rows with positions `0..T`.
    pub fn causal(ids: &[Vec<u32>], device: &B::Device) -> Self {
        let t = ids.first().map_or(0, |r| r.len());
        let positions: Vec<Vec<i64>> = ids.iter().map(|_| (0..t as i64).collect()).collect();
        Self::from_host(
            ids,
            &positions,
            &AttentionLayout::causal(ids.len(), t),
            device,
        )
    }
}

impl<B: Backend> CausalLm<B> {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.dims()[1]
    }

    pub fn device(&self) -> B::Device {
        self.embed_tokens.device()
    }

    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        crate::shape_audit::record("embedding", &[&[b, t]]);
        let d = self.hidden_size();
        let rows = self.embed_tokens.val().select(0, ids.reshape([b * t]));
        let x = crate::half::as_f32(rows).reshape([b, t, d]);
        match self.embed_scale {
            Some(s) => x.mul_scalar(s),
            None => x,
        }
    }

    /// Final hidden states `[B, T, hidden]` after the last norm.
    pub fn hidden_states(
        &self,
        input: ForwardInput<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [_, t] = input.ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let windowed = self.sliding_window.as_ref().map(|w| {
            let dims = input.mask.dims();
            let band =
                crate::mask::outside_window(w.size, past, dims[2], dims[3], &input.mask.device());
            input.mask.clone().bool_or(band.expand(dims))
        });
        let write = CacheWrite::From { past };
        let cache_write = cache.as_deref_mut().map(|c| (c, write));
        let (x, routings) = self.decoder(
            input.ids,
            input.positions,
            input.mask,
            windowed,
            cache_write,
        );
        crate::router_loss::record(routings, &input.real);
        if let Some(c) = cache {
            c.len = past + t;
        }
        x
    }

    /// The decoder stack after the embedding, with the last norm; `windowed` is the mask of
    /// the sliding-window layers, when the model has any. The sparse layers' routings come
    /// back while a load-balancing loss is being collected (`router_loss`), else none.
    pub(crate) fn decoder(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        mask: Tensor<B, 4, Bool>,
        windowed: Option<Tensor<B, 4, Bool>>,
        mut cache: Option<(&mut KvCache<B>, CacheWrite<'_>)>,
    ) -> (Tensor<B, 3>, Vec<Routing<B>>) {
        let keep_routings = crate::router_loss::recording::<B>();
        let mut routings = Vec::new();
        let local = self
            .local_rope
            .as_ref()
            .map(|r| r.tables(positions.clone()));
        let rope = self.rope.tables(positions);
        // The fused causal attention takes the `[B, 1, T, T]` mask as it is. Otherwise it is
        // grouped once for every layer: one buffer, which the training attention keeps for
        // its backward when it recomputes the probabilities.
        let attn = &self.layers.first().expect("a decoder has layers").self_attn;
        let fused = cache.is_none() && attn.fused(ids.dims()[1]);
        let (mask, windowed) = match fused {
            true => (mask, windowed),
            false => (
                attn.grouped_mask(mask),
                windowed.map(|m| attn.grouped_mask(m)),
            ),
        };
        let mut x = self.embed(ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|(c, write)| CacheSlot {
                kv: &mut c.layers[i],
                write: *write,
                capacity: c.capacity,
            });
            let sliding = self.sliding_window.as_ref().is_some_and(|w| w.layers[i]);
            let mask = match &windowed {
                Some(m) if sliding => m.clone(),
                _ => mask.clone(),
            };
            let rope = match &local {
                Some(local) if sliding => local,
                _ => &rope,
            };
            let (y, routing) = match slot {
                Some(slot) => layer.forward(x, rope, mask, Some(slot)),
                None => crate::layer_checkpoint::layer_forward(layer, x, rope, mask),
            };
            x = y;
            routings.extend(routing.filter(|_| keep_routings));
        }
        (self.norm.forward(x), routings)
    }

    /// Logits `[B, T, vocab]` for the given hidden states.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = self.head_logits(hidden);
        match self.final_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    fn head_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::shape_audit::record("lm_head", &[&hidden.dims()]);
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let embed = self.embed_tokens.val();
                if crate::half::is_half(embed.dtype()) {
                    let [b, t, d] = hidden.dims();
                    let w = embed.transpose();
                    let v = w.dims()[1];
                    return crate::half::half_matmul(hidden.reshape([b * t, d]), &w)
                        .reshape([b, t, v]);
                }
                crate::layers::matmul_2d(hidden, embed.transpose())
            }
        }
    }

    /// Whether the LM head is a plain weight: no bias, adapter or adapter bank, and no
    /// soft-capping of its logits (users of [`CausalLm::plain_head`] multiply by the
    /// weight alone).
    pub fn has_plain_head(&self) -> bool {
        self.final_softcap.is_none() && self.head_is_a_matrix()
    }

    /// No bias, adapter or adapter bank on the LM head: its logits are `h W` (then
    /// soft-capped, if the model caps them).
    fn head_is_a_matrix(&self) -> bool {
        self.lm_head
            .as_ref()
            .is_none_or(|h| h.bias.is_none() && h.lora.is_none() && h.bank.is_none())
    }

    /// The LM head as a plain `[hidden, vocab]` weight (in its stored dtype; dequantised if
    /// NF4), when it is one (see [`CausalLm::has_plain_head`]).
    pub fn plain_head(&self) -> Option<Tensor<B, 2>> {
        self.final_softcap.is_none().then(|| self.head_matrix())?
    }

    /// The LM head's `[hidden, vocab]` weight when [`Self::head_is_a_matrix`].
    fn head_matrix(&self) -> Option<Tensor<B, 2>> {
        if !self.head_is_a_matrix() {
            return None;
        }
        Some(match &self.lm_head {
            Some(head) => head.stored_weight(),
            None => self.embed_tokens.val().transpose(),
        })
    }

    /// A per-row `objective` of the logits (divided by `scale`) at each row of `hidden`
    /// (`[n, d]`), through the LM head in chunks of positions (see `chunked_head`): no
    /// `[n, vocab]` tensor is kept for the backward. A head with a bias or an adapter goes
    /// through `logits`.
    pub fn head_rows<O: crate::chunked_head::RowObjective>(
        &self,
        hidden: Tensor<B, 2>,
        aux: crate::chunked_head::Aux<B>,
        objective: &O,
        scale: f64,
    ) -> crate::chunked_head::RowOutputs<B> {
        crate::shape_audit::record("lm_head", &[&hidden.dims()]);
        let chunk = crate::chunked_head::chunk_positions(self.vocab_size());
        match self.head_matrix() {
            Some(w) => crate::chunked_head::head_rows_capped(
                hidden,
                w,
                aux,
                objective,
                scale,
                self.final_softcap,
                chunk,
            ),
            None => {
                let [n, d] = hidden.dims();
                let logits = self
                    .logits(hidden.reshape([1, n, d]))
                    .reshape([n, self.vocab_size()]);
                crate::chunked_head::logits_rows(logits, &aux, objective, scale)
            }
        }
    }

    /// `log softmax(logits / scale)[target]` at each row of `hidden` (`[n, d]`), and the
    /// entropy when asked for, through [`CausalLm::head_rows`].
    pub fn head_logps(
        &self,
        hidden: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
        scale: f64,
        with_entropy: bool,
    ) -> crate::chunked_head::HeadLogps<B> {
        let objective = crate::chunked_head::TargetLogps {
            entropy: with_entropy,
        };
        let aux = crate::chunked_head::TargetLogps::aux(targets);
        self.head_rows(hidden, aux, &objective, scale).into()
    }

    pub fn forward(&self, input: ForwardInput<B>) -> Tensor<B, 3> {
        let h = self.hidden_states(input, None);
        self.logits(h)
    }

    /// Scalar rewards `[B]`: the `score` head on the hidden state at `last[b]` of each row
    /// (the last non-padding token, as `LlamaForSequenceClassification` picks it).
    pub fn rewards(&self, input: ForwardInput<B>, last: &[usize]) -> Tensor<B, 1> {
        let score = self
            .score
            .as_ref()
            .expect("rewards() needs a reward head (with_reward_head or a *ForSequenceClassification model)");
        let [b, t] = input.ids.dims();
        let device = input.ids.device();
        let hidden = self.hidden_states(input, None);
        let d = hidden.dims()[2];
        let idx: Vec<i64> = last
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * t + l) as i64)
            .collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b]), &device);
        let picked = hidden.reshape([b * t, d]).select(0, idx);
        score.forward(picked).reshape([b])
    }

    /// Turn a causal LM into a reward model: drop the LM head, add a `score` head drawn
    /// from normal(0, `std`) (transformers' init with `initializer_range`), seeded.
    pub fn with_reward_head(mut self, std: f64, seed: u64) -> Self {
        let d = self.hidden_size();
        let w = crate::presets::RandomInit::new(seed, std as f32)
            .take("score.weight", &[1, d])
            .expect("random init does not fail");
        let device = self.device();
        self.lm_head = None;
        self.score = Some(Proj::from_tensors(
            Tensor::from_data(TensorData::new(w, [d, 1]), &device),
            None,
        ));
        self
    }

    /// Add PPO's value head, drawn like a fresh classification head (normal(0, `std`),
    /// seeded). It trains in full, with or without adapters.
    pub fn with_value_head(mut self, std: f64, seed: u64) -> Self {
        let d = self.hidden_size();
        let w = crate::presets::RandomInit::new(seed, std as f32)
            .take("value_head.weight", &[1, d])
            .expect("random init does not fail");
        let device = self.device();
        self.value_head = Some(Proj::from_tensors(
            Tensor::from_data(TensorData::new(w, [d, 1]), &device),
            None,
        ));
        self
    }

    /// Values `[n]` of hidden states `[n, hidden]` from the value head.
    pub fn values(&self, hidden: Tensor<B, 2>) -> Tensor<B, 1> {
        let head = self
            .value_head
            .as_ref()
            .expect("values() needs a value head (with_value_head)");
        let n = hidden.dims()[0];
        head.forward(hidden).reshape([n])
    }

    pub fn new_cache(&self, capacity: usize) -> KvCache<B> {
        KvCache::new(self.num_layers(), capacity)
    }
}

/// Shapes of every weight in HF layout and naming, in file order. Linear weights are
/// `[d_out, d_in]` here, as transformers stores them.
pub fn hf_tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        let attention: &[(&str, usize, usize, bool)] = if cfg.fused_projections {
            &[
                ("qkv_proj", q + 2 * kv, h, cfg.qkv_bias),
                ("o_proj", h, q, cfg.o_bias),
            ]
        } else {
            &[
                ("q_proj", q, h, cfg.qkv_bias),
                ("k_proj", kv, h, cfg.qkv_bias),
                ("v_proj", kv, h, cfg.qkv_bias),
                ("o_proj", h, q, cfg.o_bias),
            ]
        };
        for &(name, d_out, d_in, bias) in attention {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![d_out, d_in]));
            if bias {
                out.push((format!("{p}.self_attn.{name}.bias"), vec![d_out]));
            }
        }
        if cfg.qk_norm {
            for name in ["q_norm", "k_norm"] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![cfg.head_dim]));
            }
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if cfg.gemma.is_some() {
            for name in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                out.push((format!("{p}.{name}.weight"), vec![h]));
            }
        }
        if let Some(moe) = cfg.moe.as_ref().filter(|m| m.sparse[l]) {
            let block = format!("{p}.{}", moe.naming.block());
            let e = moe.intermediate_size;
            out.push((format!("{block}.gate.weight"), vec![moe.experts, h]));
            let [gate, up, down] = moe.naming.projections();
            for j in 0..moe.experts {
                let x = format!("{block}.experts.{j}");
                out.push((format!("{x}.{gate}.weight"), vec![e, h]));
                out.push((format!("{x}.{up}.weight"), vec![e, h]));
                out.push((format!("{x}.{down}.weight"), vec![h, e]));
            }
            continue;
        }
        let mlp: &[(&str, usize, usize)] = if cfg.fused_projections {
            &[("gate_up_proj", 2 * i, h), ("down_proj", h, i)]
        } else {
            &[("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
        };
        for &(name, d_out, d_in) in mlp {
            out.push((format!("{p}.mlp.{name}.weight"), vec![d_out, d_in]));
            if cfg.mlp_bias {
                out.push((format!("{p}.mlp.{name}.bias"), vec![d_out]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if cfg.reward_head {
        out.push(("score.weight".to_string(), vec![1, h]));
    } else if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Something that hands out HF-named tensors one at a time as f32 in HF layout, so a model
/// is built without ever holding two full copies of its weights.
pub trait WeightSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>>;
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

struct Builder<'a, B: Backend, S: WeightSource> {
    src: &'a mut S,
    shapes: std::collections::HashMap<String, Vec<usize>>,
    device: &'a B::Device,
    quantization: Option<&'a Quantization>,
    /// Half-precision storage of the frozen base (`crate::half`): the embedding, the LM head
    /// and the decoder's linear weights (the ones NF4 would quantise).
    half: Option<FloatDType>,
}

impl<B: Backend, S: WeightSource> Builder<'_, B, S> {
    fn vector(&mut self, name: &str) -> anyhow::Result<Tensor<B, 1>> {
        let shape = self.shapes[name].clone();
        let data = self.src.take(name, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(data, [shape[0]]),
            self.device,
        ))
    }

    /// A base matrix (embedding, LM head), in the base's storage dtype.
    fn matrix(&mut self, name: &str) -> anyhow::Result<Tensor<B, 2>> {
        let shape = self.shapes[name].clone();
        let data = self.src.take(name, &shape)?;
        Ok(self.stored(TensorData::new(data, [shape[0], shape[1]]), true))
    }

    /// A tensor on the device, converted to the half storage dtype when the base has one and
    /// `frozen_base` (the host f32 buffer is converted as it is uploaded).
    fn stored(&self, data: TensorData, frozen_base: bool) -> Tensor<B, 2> {
        match self.half.filter(|_| frozen_base) {
            Some(dtype) => Tensor::from_data(data, (self.device, DType::from(dtype))),
            None => Tensor::from_data(data, self.device),
        }
    }

    /// A projection; `quantize` makes it NF4 when the load asks for quantisation. The HF
    /// weight is quantised straight from the host buffer, so its f32 copy never reaches
    /// the device.
    /// An RMSNorm (Gemma's scales by `1 + weight`).
    fn norm(&mut self, prefix: &str, cfg: &ModelConfig) -> anyhow::Result<RmsNorm<B>> {
        let norm =
            RmsNorm::from_tensor(self.vector(&format!("{prefix}.weight"))?, cfg.rms_norm_eps);
        Ok(match cfg.gemma {
            Some(_) => norm.with_unit_offset(),
            None => norm,
        })
    }

    /// A quantisable decoder projection the architecture may not have.
    fn proj_if(
        &mut self,
        present: bool,
        prefix: &str,
        bias: bool,
    ) -> anyhow::Result<Option<Proj<B>>> {
        present.then(|| self.proj(prefix, bias, true)).transpose()
    }

    /// A sparse layer's router (dense, f32) and experts (quantisable like the MLP), read in
    /// [`hf_tensor_shapes`] order.
    fn experts(
        &mut self,
        layer: &str,
        moe: &crate::config::MoeOptions,
        gelu: bool,
    ) -> anyhow::Result<SparseMoe<B>> {
        let block = format!("{layer}.{}", moe.naming.block());
        let gate = self.proj(&format!("{block}.gate"), false, false)?;
        let [g, u, d] = moe.naming.projections();
        let experts = (0..moe.experts)
            .map(|j| {
                let x = format!("{block}.experts.{j}");
                Ok(Mlp {
                    gate_proj: Some(self.proj(&format!("{x}.{g}"), false, true)?),
                    up_proj: Some(self.proj(&format!("{x}.{u}"), false, true)?),
                    gate_up_proj: None,
                    down_proj: self.proj(&format!("{x}.{d}"), false, true)?,
                    gelu,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SparseMoe {
            gate,
            experts,
            top_k: moe.top_k,
            normalize_top_k: moe.normalize_top_k,
            naming: moe.naming,
        })
    }

    fn proj(&mut self, prefix: &str, bias: bool, quantize: bool) -> anyhow::Result<Proj<B>> {
        let name = format!("{prefix}.weight");
        let shape = self.shapes[&name].clone();
        let (d_out, d_in) = (shape[0], shape[1]);
        let hf = self.src.take(&name, &shape)?;
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        match self.quantization.filter(|_| quantize) {
            Some(q) => {
                let weight = Nf4Weight::quantize_hf(&hf, d_out, d_in, &q.nf4, self.device);
                Ok(Proj::from_nf4(weight, bias))
            }
            None => {
                let data = transpose(&hf, d_out, d_in);
                let weight = self.stored(TensorData::new(data, [d_in, d_out]), quantize);
                Ok(Proj::from_tensors(weight, bias))
            }
        }
    }
}

impl<B: Backend> CausalLm<B> {
    pub fn from_source<S: WeightSource>(
        cfg: &ModelConfig,
        src: &mut S,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        Self::from_source_quantized(cfg, src, device, None)
    }

    /// [`Self::from_source_quantized`] with the frozen base (what NF4 would quantise, and
    /// the embedding and LM head) stored in `half` precision when given.
    pub fn from_source_stored<S: WeightSource>(
        cfg: &ModelConfig,
        src: &mut S,
        device: &B::Device,
        quantization: Option<&Quantization>,
        half: Option<FloatDType>,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, src, device, quantization, half)
    }

    /// Build the model, quantising the decoder's linear layers (and the LM head when asked)
    /// to NF4 as each weight is read.
    pub fn from_source_quantized<S: WeightSource>(
        cfg: &ModelConfig,
        src: &mut S,
        device: &B::Device,
        quantization: Option<&Quantization>,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, src, device, quantization, None)
    }

    fn build<S: WeightSource>(
        cfg: &ModelConfig,
        src: &mut S,
        device: &B::Device,
        quantization: Option<&Quantization>,
        half: Option<FloatDType>,
    ) -> anyhow::Result<Self> {
        if let Some(q) = quantization {
            q.nf4.validate()?;
        }
        let shapes = hf_tensor_shapes(cfg).into_iter().collect();
        let mut b = Builder::<B, S> {
            src,
            shapes,
            device,
            quantization,
            half,
        };
        let embed_tokens = Param::from_tensor(b.matrix("model.embed_tokens.weight")?);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            // In file order (q, k, v, o, then the MLP): a seeded random init draws them so.
            let fused = cfg.fused_projections;
            let (q_proj, k_proj, v_proj, qkv_proj) = (
                b.proj_if(!fused, &format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
                b.proj_if(!fused, &format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
                b.proj_if(!fused, &format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
                b.proj_if(fused, &format!("{p}.self_attn.qkv_proj"), cfg.qkv_bias)?,
            );
            let self_attn = SelfAttention {
                q_proj,
                k_proj,
                v_proj,
                qkv_proj,
                o_proj: b.proj(&format!("{p}.self_attn.o_proj"), cfg.o_bias, true)?,
                q_norm: cfg
                    .qk_norm
                    .then(|| b.norm(&format!("{p}.self_attn.q_norm"), cfg))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| b.norm(&format!("{p}.self_attn.k_norm"), cfg))
                    .transpose()?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                scale: match &cfg.gemma {
                    Some(g) => g.query_pre_attn_scalar.powf(-0.5),
                    None => (cfg.head_dim as f64).powf(-0.5),
                },
                softcap: cfg.gemma.as_ref().and_then(|g| g.attn_logit_softcapping),
            };
            let gelu = cfg.activation == crate::config::Activation::GeluTanh;
            let (mlp, moe) = match cfg.moe.as_ref().filter(|m| m.sparse[l]) {
                Some(m) => (None, Some(b.experts(&p, m, gelu)?)),
                None => {
                    let (gate_proj, up_proj, gate_up_proj) = (
                        b.proj_if(!fused, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                        b.proj_if(!fused, &format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                        b.proj_if(fused, &format!("{p}.mlp.gate_up_proj"), cfg.mlp_bias)?,
                    );
                    let mlp = Mlp {
                        gate_proj,
                        up_proj,
                        gate_up_proj,
                        down_proj: b.proj(&format!("{p}.mlp.down_proj"), cfg.mlp_bias, true)?,
                        gelu,
                    };
                    (Some(mlp), None)
                }
            };
            let gemma = cfg.gemma.is_some();
            layers.push(DecoderLayer {
                input_layernorm: b.norm(&format!("{p}.input_layernorm"), cfg)?,
                self_attn,
                post_attention_layernorm: b.norm(&format!("{p}.post_attention_layernorm"), cfg)?,
                pre_feedforward_layernorm: gemma
                    .then(|| b.norm(&format!("{p}.pre_feedforward_layernorm"), cfg))
                    .transpose()?,
                post_feedforward_layernorm: gemma
                    .then(|| b.norm(&format!("{p}.post_feedforward_layernorm"), cfg))
                    .transpose()?,
                mlp,
                moe,
            });
        }
        let norm = b.norm("model.norm", cfg)?;
        let (lm_head, score) = if cfg.reward_head {
            (None, Some(b.proj("score", false, false)?))
        } else if cfg.tie_word_embeddings {
            (None, None)
        } else {
            let head = if quantization.is_some_and(|q| q.lm_head) {
                b.proj("lm_head", false, true)?
            } else {
                Proj::from_tensors(b.matrix("lm_head.weight")?.transpose(), None)
            };
            (Some(head), None)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            value_head: None,
            rope: Rope::new(cfg),
            local_rope: cfg.local_rope.as_ref().map(|(theta, scaling)| {
                let mut local = cfg.clone();
                local.rope_theta = *theta;
                local.rope_scaling = scaling.clone();
                Rope::new(&local)
            }),
            embed_scale: cfg.gemma.is_some().then(|| (cfg.hidden_size as f32).sqrt()),
            final_softcap: cfg.gemma.as_ref().and_then(|g| g.final_logit_softcapping),
            sliding_window: cfg.sliding_window.clone(),
            router_aux_loss_coef: cfg
                .moe
                .as_ref()
                .and_then(|m| (m.aux_loss_coef > 0.0).then_some(m.aux_loss_coef)),
        })
    }

    /// Every weight as `(HF name, HF shape, tensor)`, in the
    /// order of [`hf_tensor_shapes`].
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>, HfTensor<B>)> {
        let mut all: Vec<(String, Vec<usize>, HfTensor<B>)> = Vec::new();
        let e = self.embed_tokens.val();
        all.push((
            "model.embed_tokens.weight".into(),
            e.dims().to_vec(),
            HfTensor::Plain2(e),
        ));
        let proj =
            |all: &mut Vec<(String, Vec<usize>, HfTensor<B>)>, prefix: String, p: &Proj<B>| {
                let w = p.dense_weight();
                let [d_in, d_out] = w.dims();
                all.push((
                    format!("{prefix}.weight"),
                    vec![d_out, d_in],
                    HfTensor::Transposed(w),
                ));
                if let Some(b) = &p.bias {
                    let b = b.val();
                    all.push((
                        format!("{prefix}.bias"),
                        b.dims().to_vec(),
                        HfTensor::Plain1(b),
                    ));
                }
            };
        let norm = |all: &mut Vec<(String, Vec<usize>, HfTensor<B>)>,
                    prefix: String,
                    n: Option<&RmsNorm<B>>| {
            if let Some(n) = n {
                let w = n.weight.val();
                all.push((
                    format!("{prefix}.weight"),
                    w.dims().to_vec(),
                    HfTensor::Plain1(w),
                ));
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            norm(
                &mut all,
                format!("{p}.input_layernorm"),
                Some(&layer.input_layernorm),
            );
            let a = &layer.self_attn;
            let projections = layer.projections();
            let (attention, mlp) = projections.split_at(
                projections
                    .iter()
                    .position(|(name, _)| *name == "o_proj")
                    .map_or(0, |o| o + 1),
            );
            for (name, w) in attention {
                proj(&mut all, format!("{p}.self_attn.{name}"), w);
            }
            for (name, n) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                norm(&mut all, format!("{p}.self_attn.{name}"), n.as_ref());
            }
            let norms = [
                ("post_attention", Some(&layer.post_attention_layernorm)),
                ("pre_feedforward", layer.pre_feedforward_layernorm.as_ref()),
                (
                    "post_feedforward",
                    layer.post_feedforward_layernorm.as_ref(),
                ),
            ];
            for (name, n) in norms {
                norm(&mut all, format!("{p}.{name}_layernorm"), n);
            }
            for (name, w) in mlp {
                proj(&mut all, format!("{p}.mlp.{name}"), w);
            }
            if let Some(moe) = &layer.moe {
                let naming = moe.naming;
                let block = format!("{p}.{}", naming.block());
                proj(&mut all, format!("{block}.gate"), &moe.gate);
                let [g, u, d] = naming.projections();
                for (j, e) in moe.experts.iter().enumerate() {
                    let x = format!("{block}.experts.{j}");
                    for (name, w) in [(g, &e.gate_proj), (u, &e.up_proj)] {
                        let w = w.as_ref().expect("experts have separate projections");
                        proj(&mut all, format!("{x}.{name}"), w);
                    }
                    proj(&mut all, format!("{x}.{d}"), &e.down_proj);
                }
            }
        }
        norm(&mut all, "model.norm".into(), Some(&self.norm));
        if let Some(head) = &self.lm_head {
            proj(&mut all, "lm_head".into(), head);
        }
        if let Some(score) = &self.score {
            proj(&mut all, "score".into(), score);
        }
        all
    }
}

/// A weight ready to be written in HF layout.
pub enum HfTensor<B: Backend> {
    Plain1(Tensor<B, 1>),
    Plain2(Tensor<B, 2>),
    /// Stored `[d_in, d_out]`, written `[d_out, d_in]`.
    Transposed(Tensor<B, 2>),
}

impl<B: Backend> HfTensor<B> {
    pub fn to_f32(&self) -> Vec<f32> {
        let data = match self {
            HfTensor::Plain1(t) => t.to_data(),
            HfTensor::Plain2(t) => t.to_data(),
            HfTensor::Transposed(t) => t.clone().transpose().to_data(),
        };
        data.iter::<f32>().collect()
    }
}
