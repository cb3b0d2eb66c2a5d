//! Canonical records to token ids with loss masks, using the model's chat template.
//!
//! Masks come from rendering: the prompt before each assistant turn is rendered with
//! `add_generation_prompt`, the conversation through that turn without it, and each
//! rendering must tokenize to a prefix of the full conversation's ids (checked). Nothing
//! searches for marker strings, so any HF template works, and a template that breaks the
//! prefix property is an error rather than a silently wrong mask.

use anyhow::{bail, Result};
use models::chat_template::{ChatTemplate, SpecialTokens};
use models::{Message, TextTokenizer};
use serde::{Deserialize, Serialize};

use crate::formats::tools::tool_name;
use crate::records::{Conversation, Preference, PromptTask, Record, Unpaired, ASSISTANT, TOOL};

/// Which tokens the loss trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaskPolicy {
    /// Every assistant turn (with the end-of-turn / EOS token that closes it).
    #[default]
    Assistant,
    /// Only the last assistant turn.
    LastAssistant,
    /// Every token.
    All,
}

impl MaskPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "assistant" => Ok(Self::Assistant),
            "last_assistant" | "last" => Ok(Self::LastAssistant),
            "all" => Ok(Self::All),
            other => {
                bail!("unknown mask policy `{other}`; expected assistant, last_assistant or all")
            }
        }
    }
}

/// What to do with a row longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Reject the row (counted in the report).
    #[default]
    Drop,
    /// Cut tokens from the left (the start of the prompt); rows whose trained tokens would
    /// be cut are still rejected.
    Left,
}

/// A tokenized SFT sequence: ids and, per id, whether the loss trains on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedSeq {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl TokenizedSeq {
    pub fn num_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// A tokenized preference pair: shared prompt ids, then each completion's ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// The row's optional `margin` (reward models subtract it inside the loss).
    #[serde(default)]
    pub margin: Option<f64>,
}

/// A tokenized unpaired row (KTO): prompt ids, the completion's ids, desirable or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedUnpaired {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub label: bool,
}

/// A tokenized prompt for online methods, with its reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPrompt {
    pub prompt: Vec<u32>,
    pub answer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tokenized {
    Seq(TokenizedSeq),
    Pair(TokenizedPair),
    Prompt(TokenizedPrompt),
    Unpaired(TokenizedUnpaired),
}

impl Tokenized {
    pub fn len(&self) -> usize {
        match self {
            Tokenized::Seq(s) => s.ids.len(),
            Tokenized::Pair(p) => p.prompt.len() + p.chosen.len().max(p.rejected.len()),
            Tokenized::Prompt(p) => p.prompt.len(),
            Tokenized::Unpaired(u) => u.prompt.len() + u.completion.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a row could not be tokenized (becomes a reject with this reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizeError {
    Template(String),
    PrefixBroken { message: usize },
    NoTrainedTokens,
    TooLong { len: usize, max: usize },
}

impl std::fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Template(e) => write!(f, "{e}"),
            Self::PrefixBroken { message } => write!(
                f,
                "the chat template breaks the prefix property at message {message}: rendering the conversation up to it does not tokenize to a prefix of the whole conversation, so its loss mask cannot be derived"
            ),
            Self::NoTrainedTokens => write!(f, "no trained tokens (nothing for the loss to learn from under this mask policy)"),
            Self::TooLong { len, max } => write!(f, "{len} tokens, longer than max_seq_len {max}"),
        }
    }
}

/// Prompt ids, each completion's ids, and whether the prompt was cut to fit.
type Completions = (Vec<u32>, Vec<Vec<u32>>, bool);

pub struct Templater<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: ChatTemplate,
    pub tokens: SpecialTokens,
    pub mask: MaskPolicy,
    pub max_seq_len: usize,
    pub truncation: Truncation,
}

fn is_prefix(p: &[u32], of: &[u32]) -> bool {
    p.len() <= of.len() && &of[..p.len()] == p
}

impl Templater<'_> {
    /// `tools` go to the template as transformers' `tools=`.
    fn render(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        self.template
            .render_with_tools(messages, tools, add_generation_prompt, &self.tokens)
            .map_err(|e| TokenizeError::Template(format!("{e:#}")))
    }

    /// A template that ignores `tools`, `tool_calls` or `tool` messages renders a tool
    /// conversation as empty turns, and training on that teaches the model to say nothing:
    /// every tool name and result must appear in the rendering.
    fn check_tool_use(
        &self,
        text: &str,
        messages: &[Message],
        tools: &[serde_json::Value],
    ) -> Result<(), TokenizeError> {
        let defined = tools.iter().filter_map(tool_name);
        let called = messages
            .iter()
            .flat_map(|m| &m.tool_calls)
            .map(|c| c.function.name.as_str());
        let results = messages
            .iter()
            .filter(|m| m.role == TOOL)
            .map(|m| m.content.as_str());
        match defined
            .chain(called)
            .chain(results)
            .find(|s| !text.contains(s))
        {
            None => Ok(()),
            Some(missing) => Err(TokenizeError::Template(format!(
                "the chat template `{}` does not render tool use (`{missing}` is missing from \
                 its output); use a tools-aware template: the model's own if it has one, or \
                 `template = \"chatml\"`",
                self.template.name
            ))),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        // As transformers' apply_chat_template: the template writes special tokens itself.
        self.tokenizer
            .encode(text, false)
            .map_err(|e| TokenizeError::Template(format!("{e:#}")))
    }

    /// Tokenize a record; the flag says whether it was truncated to fit `max_seq_len`.
    pub fn tokenize(&self, record: &Record) -> Result<(Tokenized, bool), TokenizeError> {
        match record {
            Record::Conversation(c) => self
                .conversation(c)
                .map(|(s, cut)| (Tokenized::Seq(s), cut)),
            Record::Preference(p) => self.preference(p).map(|(s, cut)| (Tokenized::Pair(s), cut)),
            Record::PromptTask(t) => self.prompt(t).map(|s| (Tokenized::Prompt(s), false)),
            Record::Unpaired(u) => self
                .unpaired(u)
                .map(|(s, cut)| (Tokenized::Unpaired(s), cut)),
        }
    }

    pub fn conversation(&self, conv: &Conversation) -> Result<(TokenizedSeq, bool), TokenizeError> {
        let messages = conv.to_messages();
        let text = self.render(&messages, &conv.tools, false)?;
        self.check_tool_use(&text, &messages, &conv.tools)?;
        let ids = self.encode(&text)?;
        let mut trained = vec![self.mask == MaskPolicy::All; ids.len()];
        let assistant_turns: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == ASSISTANT)
            .map(|(i, _)| i)
            .collect();
        let chosen: &[usize] = match self.mask {
            MaskPolicy::All => &[],
            MaskPolicy::Assistant => &assistant_turns,
            MaskPolicy::LastAssistant => {
                assistant_turns.last().map_or(&[][..], std::slice::from_ref)
            }
        };
        for &k in chosen {
            let (start, end) = self.turn_span(&messages, &conv.tools, k, &ids)?;
            trained[start..end].iter_mut().for_each(|t| *t = true);
        }
        self.fit(TokenizedSeq { ids, trained })
    }

    /// Token span of assistant message `k` inside the full conversation's `ids`.
    fn turn_span(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        k: usize,
        ids: &[u32],
    ) -> Result<(usize, usize), TokenizeError> {
        let prompt = self.encode(&self.render(&messages[..k], tools, true)?)?;
        if !is_prefix(&prompt, ids) {
            return Err(TokenizeError::PrefixBroken { message: k });
        }
        let through = self.encode(&self.render(&messages[..=k], tools, false)?)?;
        // A template may close the *whole* conversation with extra text (e.g. EOS after the
        // last turn); the turn ends where its own rendering stops agreeing with the full one.
        let end = if k + 1 == messages.len() {
            ids.len()
        } else {
            through.iter().zip(ids).take_while(|(a, b)| a == b).count()
        };
        if end <= prompt.len() {
            return Err(TokenizeError::PrefixBroken { message: k });
        }
        Ok((prompt.len(), end))
    }

    fn fit(&self, seq: TokenizedSeq) -> Result<(TokenizedSeq, bool), TokenizeError> {
        if seq.num_trained() == 0 {
            return Err(TokenizeError::NoTrainedTokens);
        }
        let len = seq.ids.len();
        if len <= self.max_seq_len {
            return Ok((seq, false));
        }
        let cut = len - self.max_seq_len;
        match self.truncation {
            Truncation::Left
                if !seq.trained[..cut].iter().any(|&t| t) || self.mask == MaskPolicy::All =>
            {
                let kept = TokenizedSeq {
                    ids: seq.ids[cut..].to_vec(),
                    trained: seq.trained[cut..].to_vec(),
                };
                if kept.num_trained() == 0 {
                    return Err(TokenizeError::NoTrainedTokens);
                }
                Ok((kept, true))
            }
            _ => Err(TokenizeError::TooLong {
                len,
                max: self.max_seq_len,
            }),
        }
    }

    /// The prompt's ids (with the generation prompt) and each completion's ids after them,
    /// the prompt cut from the left when the longest does not fit (the flag says so).
    fn completions(
        &self,
        prompt: &Conversation,
        completions: &[&[Message]],
    ) -> Result<Completions, TokenizeError> {
        let prompt_msgs = prompt.to_messages();
        let tools = &prompt.tools;
        let prompt = self.encode(&self.render(&prompt_msgs, tools, true)?)?;
        let side = |completion: &[Message]| -> Result<Vec<u32>, TokenizeError> {
            let all: Vec<Message> = prompt_msgs.iter().chain(completion).cloned().collect();
            let text = self.render(&all, tools, false)?;
            self.check_tool_use(&text, &all, tools)?;
            let ids = self.encode(&text)?;
            if !is_prefix(&prompt, &ids) {
                return Err(TokenizeError::PrefixBroken {
                    message: prompt_msgs.len(),
                });
            }
            Ok(ids[prompt.len()..].to_vec())
        };
        let sides = completions
            .iter()
            .map(|c| side(c))
            .collect::<Result<Vec<_>, _>>()?;
        if sides.iter().any(Vec::is_empty) {
            return Err(TokenizeError::NoTrainedTokens);
        }
        let len = prompt.len() + sides.iter().map(Vec::len).max().unwrap_or(0);
        if len <= self.max_seq_len {
            return Ok((prompt, sides, false));
        }
        let cut = len - self.max_seq_len;
        match self.truncation {
            Truncation::Left if cut < prompt.len() => Ok((prompt[cut..].to_vec(), sides, true)),
            _ => Err(TokenizeError::TooLong {
                len,
                max: self.max_seq_len,
            }),
        }
    }

    pub fn preference(&self, p: &Preference) -> Result<(TokenizedPair, bool), TokenizeError> {
        let (prompt, mut sides, cut) = self.completions(&p.prompt, &[&p.chosen, &p.rejected])?;
        let rejected = sides.pop().unwrap_or_default();
        let chosen = sides.pop().unwrap_or_default();
        Ok((
            TokenizedPair {
                prompt,
                chosen,
                rejected,
                margin: p.margin,
            },
            cut,
        ))
    }

    pub fn unpaired(&self, u: &Unpaired) -> Result<(TokenizedUnpaired, bool), TokenizeError> {
        let (prompt, mut sides, cut) = self.completions(&u.prompt, &[&u.completion])?;
        Ok((
            TokenizedUnpaired {
                prompt,
                completion: sides.pop().unwrap_or_default(),
                label: u.label,
            },
            cut,
        ))
    }

    pub fn prompt(&self, t: &PromptTask) -> Result<TokenizedPrompt, TokenizeError> {
        let messages = t.prompt.to_messages();
        let text = self.render(&messages, &t.prompt.tools, true)?;
        self.check_tool_use(&text, &messages, &t.prompt.tools)?;
        let prompt = self.encode(&text)?;
        if prompt.len() > self.max_seq_len {
            return Err(TokenizeError::TooLong {
                len: prompt.len(),
                max: self.max_seq_len,
            });
        }
        Ok(TokenizedPrompt {
            prompt,
            answer: t.answer.clone(),
        })
    }
}
