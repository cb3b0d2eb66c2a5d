//! Per-call latency of the `small` preset's forward pieces (a profiling aid).
use burn::backend::Flex;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::{CausalLm, ForwardInput};
use std::time::Instant;

fn time<F: FnMut()>(name: &str, mut f: F) {
    f();
    let s = Instant::now();
    for _ in 0..5 {
        f();
    }
    println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 200.0);
}

fn main() {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    let cfg = preset_config("small", "llama", 32064, &tokens).unwrap();
    let dev = Default::default();
    let model = CausalLm::<Flex>::from_source(&cfg, &mut RandomInit::new(0, 0.02), &dev).unwrap();
    for t in [1usize, 32] {
        let ids = vec![vec![5u32; t]];
        time(&format!("hidden states T={t}"), || {
            let _ = model
                .hidden_states(ForwardInput::causal(&ids, &dev), None)
                .into_data();
        });
        let h = model.hidden_states(ForwardInput::causal(&ids, &dev), None);
        time(&format!("lm head T={t}"), || {
            let _ = model.logits(h.clone()).into_data();
        });
    }
}
