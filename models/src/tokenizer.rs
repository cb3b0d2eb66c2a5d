//! `tokenizer.json` through the `tokenizers` crate, with the special tokens and chat template
//! of `tokenizer_config.json` and the stop tokens of `generation_config.json`.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::chat_template::ChatTemplate;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub dir: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Every id that ends generation: `eos_token` plus `generation_config.eos_token_id`.
    pub stop_ids: Vec<u32>,
    /// The model's own Jinja chat template, if it carries one.
    pub chat_template: Option<String>,
}

/// A token in tokenizer_config.json is either a string or an AddedToken object.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

fn template_from_config(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default", else the first.
        Value::Array(items) => {
            let named = |n: &str| {
                items
                    .iter()
                    .find(|i| i.get("name").and_then(|x| x.as_str()) == Some(n))
            };
            named("default")
                .or(items.first())
                .and_then(|i| i.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        }
        _ => None,
    }
}

/// transformers (v5) rebuilds Llama tokenizers instead of trusting tokenizer.json's
/// normaliser: a Metaspace pre-tokenizer that prepends `▁` only to the first word when
/// `legacy` is false. Without this, " leading space" gains an extra `▁` token.
fn llama_pipeline(tok: &mut tokenizers::Tokenizer, config: &Value) -> Result<()> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip, DecoderWrapper,
    };
    use tokenizers::normalizers::{replace::Replace, NormalizerWrapper};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let legacy = config
        .get("legacy")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let add_prefix_space = config
        .get("add_prefix_space")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let scheme = match (add_prefix_space, legacy) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    tok.with_normalizer(None::<NormalizerWrapper>)
        .map_err(|e| anyhow::anyhow!("cannot reset the tokenizer normaliser: {e}"))?;
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    let replace = Replace::new("▁", " ").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut steps: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_prefix_space {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(Sequence::new(steps)));
    Ok(())
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!(
                "no tokenizer in {}: expected tokenizer.json (a Hugging Face fast tokenizer)",
                dir.display()
            );
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        if matches!(
            config.get("tokenizer_class").and_then(|c| c.as_str()),
            Some("LlamaTokenizer" | "LlamaTokenizerFast")
        ) {
            llama_pipeline(&mut inner, &config)?;
        }
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut chat_template = template_from_config(&config);
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
            );
        }
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let pad_token = token_string(config.get("pad_token"));
        let id = |t: &Option<String>| t.as_ref().and_then(|s| inner.token_to_id(s));
        let (bos_id, eos_id, pad_id) = (id(&bos_token), id(&eos_token), id(&pad_token));
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        match gen.get("eos_token_id") {
            Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => {
                stop_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            _ => {}
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            inner,
            dir: dir.to_path_buf(),
            bos_token,
            eos_token,
            pad_token,
            bos_id,
            eos_id,
            pad_id,
            stop_ids,
            chat_template,
        })
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuse a tokenizer whose ids do not fit the model's embedding matrix.
    pub fn check_fits(&self, model_vocab: usize, config_path: &Path) -> Result<()> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= model_vocab {
            bail!(
                "tokenizer {} produces ids up to {max_id}, but {} has vocab_size {model_vocab}; \
                 the tokenizer does not belong to this model (or vocab_size must be at least {})",
                self.dir.join("tokenizer.json").display(),
                config_path.display(),
                max_id + 1
            );
        }
        Ok(())
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The model's own template, or the named built-in `fallback` when it has none.
    pub fn template(&self, name: Option<&str>) -> Result<ChatTemplate> {
        match name {
            Some(n) if n != "auto" => ChatTemplate::named(n),
            _ => match &self.chat_template {
                Some(t) => Ok(ChatTemplate::new("model", t.clone())),
                None => bail!(
                    "{} has no chat_template; name one of the built-in templates: {}",
                    self.dir.display(),
                    ChatTemplate::builtin_names().join(", ")
                ),
            },
        }
    }

    /// Special tokens passed to templates as `bos_token`, `eos_token`, `pad_token`.
    pub fn template_tokens(&self) -> crate::chat_template::SpecialTokens {
        crate::chat_template::SpecialTokens {
            bos_token: self.bos_token.clone().unwrap_or_default(),
            eos_token: self.eos_token.clone().unwrap_or_default(),
            pad_token: self.pad_token.clone(),
        }
    }
}
