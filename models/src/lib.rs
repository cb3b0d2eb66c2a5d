//! Transformer architectures of the Llama family on burn, Hugging Face checkpoints,
//! tokenizers, chat templates and KV-cache generation.

pub mod atomic;
pub mod backend;
pub mod causal_attention;
pub mod chat_template;
pub mod checkpoint;
pub mod chunked_head;
pub mod config;
pub mod generate;
pub mod half;
pub mod kernel_cache;
pub mod layer_checkpoint;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod lora_bank;
pub mod mask;
pub mod moe;
pub mod nf4;
pub mod presets;
pub mod py_json;
pub mod router_loss;
pub mod scoring;
pub mod shape_audit;
pub mod slots;
#[cfg(test)]
mod test_values;
pub mod tokenizer;
pub mod weights;

pub use chat_template::{ChatTemplate, FunctionCall, Message, ToolCall};
pub use config::ModelConfig;
pub use llama::{CausalLm, ForwardInput, KvCache};
pub use tokenizer::TextTokenizer;
