//! Continuous batching for a server: a fixed number of sequence slots in one fixed-capacity
//! KV cache, each slot at its own position, so requests join the running batch between
//! decoding steps and leave it when they finish (vLLM's scheduling without paging).
//!
//! A prompt is prefilled alone, left-padded to its shape bucket exactly as
//! [`crate::generate`] does it, and its keys and values are copied into its slots; a step
//! then feeds one token to every busy slot at once. Shapes stay in a few buckets: prefill
//! `[1, bucket(prompt)]`, decoding `[rows, 1]` over the first `view` cache slots, with
//! `rows` a power of two up to the slot count and `view` a multiple of the shape multiple
//! (64 where kernels compile per shape, 1 on the CPU, as for generation).

use anyhow::{bail, Result};
use burn::prelude::*;

use crate::generate::{bucket, host_rows, left_padded};
use crate::llama::{CacheWrite, CausalLm, ForwardInput, KvCache};
use crate::mask::{positions_from_attention_mask, AttentionLayout};

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// First cache slot holding a prompt token (left padding sits before it).
    start: usize,
    /// Cache slots written so far: the next token goes to `len`.
    len: usize,
    /// Position id of the next token.
    next_pos: i64,
    /// Adapter of the model's LoRA bank this sequence uses (0 = the base).
    adapter: usize,
}

pub struct SlotBatch<B: Backend> {
    cache: KvCache<B>,
    slots: Vec<Option<Slot>>,
    pad_id: u32,
    shape_multiple: usize,
}

impl<B: Backend> SlotBatch<B> {
    /// `slots` sequences of up to `capacity` cache slots each (a prompt takes
    /// [`Self::prompt_width`] of them, then one per fed token).
    pub fn new(
        model: &CausalLm<B>,
        slots: usize,
        capacity: usize,
        pad_id: u32,
        shape_multiple: usize,
    ) -> Self {
        let attn = &model.layers[0].self_attn;
        let shape = [slots, attn.num_kv_heads, capacity, attn.head_dim];
        let device = model.device();
        let mut cache = model.new_cache(capacity);
        for layer in cache.layers.iter_mut() {
            *layer = Some((Tensor::zeros(shape, &device), Tensor::zeros(shape, &device)));
        }
        Self {
            cache,
            slots: vec![None; slots],
            pad_id,
            shape_multiple,
        }
    }

    /// Cache slots a prompt of `len` tokens takes: its shape bucket.
    pub fn prompt_width(&self, len: usize) -> usize {
        bucket(len, self.shape_multiple)
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity
    }

    /// Free slots, lowest first (busy slots stay packed at the front, which keeps `rows`
    /// small).
    pub fn free_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&s| self.slots[s].is_none())
            .collect()
    }

    pub fn release(&mut self, slot: usize) {
        self.slots[slot] = None;
    }

    /// Prefill `prompt` once into every slot of `into` (free ones; several for `n`
    /// samples of one prompt) with adapter `adapter`; returns the logits of its last token.
    pub fn admit(
        &mut self,
        model: &mut CausalLm<B>,
        prompt: &[u32],
        into: &[usize],
        adapter: usize,
    ) -> Result<Vec<f32>> {
        if prompt.is_empty() {
            bail!("the prompt is empty: generation needs at least one prompt token");
        }
        let vocab = model.vocab_size() as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            bail!("prompt token id {bad} is outside the model's vocabulary (size {vocab})");
        }
        let width = self.prompt_width(prompt.len());
        if width > self.capacity() {
            bail!(
                "the prompt takes {width} cache slots, more than the {} each sequence has",
                self.capacity()
            );
        }
        if let Some(&s) = into
            .iter()
            .find(|&&s| self.slots.get(s).is_none_or(Option::is_some))
        {
            bail!("slot {s} is not free");
        }
        let pad = width - prompt.len();
        let (ids, attn) = left_padded(&[prompt.to_vec()], width, self.pad_id);
        let positions = positions_from_attention_mask(&attn);
        let layout = AttentionLayout::from_attention_mask(&attn);
        let device = model.device();
        model.route_adapters(&[adapter]);
        let mut prefill = model.new_cache(width);
        let input = ForwardInput::from_host(&ids, &positions, &layout, &device);
        let hidden = model.hidden_states(input, Some(&mut prefill));
        let last = hidden.slice(s![.., width - 1..width, ..]);
        let logits = host_rows(model.logits(last)).remove(0);
        for (layer, fresh) in self.cache.layers.iter_mut().zip(prefill.layers) {
            let (Some((mut k, mut v)), Some((fk, fv))) = (layer.take(), fresh) else {
                unreachable!("both caches hold every layer after a forward pass")
            };
            for &s in into {
                let range = s![s..s + 1, .., 0..width, ..];
                k = k.slice_assign(range, fk.clone());
                v = v.slice_assign(range, fv.clone());
            }
            *layer = Some((k, v));
        }
        for &s in into {
            self.slots[s] = Some(Slot {
                start: pad,
                len: width,
                next_pos: prompt.len() as i64,
                adapter,
            });
        }
        Ok(logits)
    }

    /// Feed one token to each listed (slot, token) at once; returns each one's logits for
    /// the token after it, in the order given.
    pub fn step(
        &mut self,
        model: &mut CausalLm<B>,
        feed: &[(usize, u32)],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(top) = feed.iter().map(|&(s, _)| s).max() else {
            return Ok(vec![]);
        };
        let rows = (top + 1).next_power_of_two().min(self.slots.len());
        let mut at = vec![None; rows];
        let mut ids = vec![vec![self.pad_id]; rows];
        let mut positions = vec![vec![0i64]; rows];
        let mut adapters = vec![0usize; rows];
        for &(s, tok) in feed {
            let Some(slot) = self.slots.get(s).copied().flatten() else {
                bail!("slot {s} holds no sequence");
            };
            if slot.len >= self.capacity() {
                bail!("slot {s} is full ({} cache slots)", self.capacity());
            }
            at[s] = Some(slot.len);
            ids[s] = vec![tok];
            positions[s] = vec![slot.next_pos];
            adapters[s] = slot.adapter;
        }
        let longest = feed
            .iter()
            .filter_map(|&(s, _)| self.slots[s].map(|x| x.len + 1))
            .max()
            .unwrap_or(1);
        let view = bucket(longest, self.shape_multiple).min(self.capacity());
        let device = model.device();
        let window = model.sliding_window.as_ref().map(|w| w.size);
        let (mask, windowed) = self.masks(&at, view, window, &device);
        let layout = AttentionLayout::causal(rows, 1);
        let input = ForwardInput::<B>::from_host(&ids, &positions, &layout, &device);
        model.route_adapters(&adapters);
        let write = CacheWrite::Rows {
            at: &at,
            rows,
            view,
        };
        let (hidden, _) = model.decoder(
            input.ids,
            input.positions,
            mask,
            windowed,
            Some((&mut self.cache, write)),
        );
        let logits = host_rows(model.logits(hidden));
        for &(s, _) in feed {
            if let Some(slot) = self.slots[s].as_mut() {
                slot.len += 1;
                slot.next_pos += 1;
            }
        }
        Ok(feed.iter().map(|&(s, _)| logits[s].clone()).collect())
    }

    /// `[rows, 1, 1, view]` masks (true = blocked): a fed row sees its own sequence up to
    /// and including the slot it writes now, the sliding-window mask also drops what lies
    /// `window` slots or more behind it. An idle row sees slot 0 only, so its softmax
    /// stays finite.
    fn masks(
        &self,
        at: &[Option<usize>],
        view: usize,
        window: Option<usize>,
        device: &B::Device,
    ) -> (Tensor<B, 4, Bool>, Option<Tensor<B, 4, Bool>>) {
        let rows = at.len();
        let build = |window: Option<usize>| {
            let mut blocked = Vec::with_capacity(rows * view);
            for (r, col) in at.iter().enumerate() {
                match (col, self.slots[r]) {
                    (&Some(q), Some(slot)) => blocked
                        .extend((0..view).map(|j| {
                            j < slot.start || j > q || window.is_some_and(|w| q >= j + w)
                        })),
                    _ => blocked.extend((0..view).map(|j| j != 0)),
                }
            }
            Tensor::<B, 4, Bool>::from_data(TensorData::new(blocked, [rows, 1, 1, view]), device)
        };
        (build(None), window.map(|w| build(Some(w))))
    }
}
