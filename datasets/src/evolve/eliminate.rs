//! Elimination of failed evolutions, as in the WizardLM paper: no information gain, an
//! answer that is an apology/refusal or too short, output made only of punctuation and stop
//! words, and output that copies the rewriting prompt's own phrases.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use super::prompts::DEFAULT_LEAK_PHRASES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The evolved instruction is empty.
    EmptyInstruction,
    /// The evolved instruction copies phrases of the rewriting prompt.
    CopiedPrompt,
    /// Instruction or answer is only punctuation and stop words.
    OnlyStopWords,
    /// No information gain over the original (judge said "Equal", or too similar).
    NoInformationGain,
    /// The answer apologises or refuses (and is short).
    Refusal,
    /// The answer has fewer words than required.
    TooShort,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::EmptyInstruction => "empty_instruction",
            Reason::CopiedPrompt => "copied_prompt",
            Reason::OnlyStopWords => "only_stop_words",
            Reason::NoInformationGain => "no_information_gain",
            Reason::Refusal => "refusal",
            Reason::TooShort => "too_short",
        }
    }
}

/// How "no information gain" is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InfoGain {
    /// Ask the backend the paper's "Equal / Not Equal" question.
    #[default]
    Judge,
    /// Word-set Jaccard of original and evolved at or above `similarity_threshold`.
    Similarity,
    /// Do not test.
    None,
}

fn default_similarity() -> f64 {
    0.9
}
fn default_min_answer_words() -> usize {
    3
}
fn default_refusal_max_words() -> usize {
    80
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EliminationConfig {
    #[serde(default)]
    pub info_gain: InfoGain,
    #[serde(default = "default_similarity")]
    pub similarity_threshold: f64,
    #[serde(default = "default_min_answer_words")]
    pub min_answer_words: usize,
    /// An answer with an apology/refusal phrase is dropped when shorter than this (paper: 80).
    #[serde(default = "default_refusal_max_words")]
    pub refusal_max_words: usize,
    /// More phrases that must not leak into an evolved instruction.
    #[serde(default)]
    pub leak_phrases: Vec<String>,
}

impl Default for EliminationConfig {
    fn default() -> Self {
        Self {
            info_gain: InfoGain::Judge,
            similarity_threshold: default_similarity(),
            min_answer_words: default_min_answer_words(),
            refusal_max_words: default_refusal_max_words(),
            leak_phrases: vec![],
        }
    }
}

const REFUSALS: &[&str] = &[
    "sorry",
    "i apologize",
    "i apologise",
    "as an ai",
    "i cannot",
    "i can't",
    "i can not",
    "i am unable",
    "i'm unable",
    "i won't be able",
    "cannot assist",
    "can't help with",
];

/// English stop words (short list: function words that carry no content).
const STOP_WORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can",
    "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how",
    "i", "if", "in", "into", "is", "it", "its", "just", "me", "more", "most", "my", "no", "nor",
    "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "out", "over", "own",
    "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "them", "then",
    "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up",
    "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why",
    "will", "with", "would", "you", "your", "yes", "ok", "okay",
];

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// True when nothing but punctuation, whitespace and stop words is left.
pub fn only_stop_words(text: &str) -> bool {
    words(text)
        .iter()
        .all(|w| STOP_WORDS.contains(&w.trim_matches('\'')))
}

/// Jaccard similarity of the lower-cased word sets.
pub fn word_jaccard(a: &str, b: &str) -> f64 {
    let sa: HashSet<String> = words(a).into_iter().collect();
    let sb: HashSet<String> = words(b).into_iter().collect();
    if sa.is_empty() && sb.is_empty() {
        return 1.0;
    }
    sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
}

/// The judge's reply read as "equal" (true) or "not equal" (false); `None` if neither.
pub fn parse_judgement(reply: &str) -> Option<bool> {
    let r = reply.trim().to_lowercase();
    if r.contains("not equal") || r.contains("not_equal") || r.contains("unequal") {
        Some(false)
    } else if r.contains("equal") {
        Some(true)
    } else {
        None
    }
}

impl EliminationConfig {
    /// Checks an evolved instruction that need no backend call.
    pub fn check_instruction(&self, original: &str, evolved: &str) -> Option<Reason> {
        let e = evolved.trim();
        if e.is_empty() {
            return Some(Reason::EmptyInstruction);
        }
        let lower = e.to_lowercase();
        let leaked = DEFAULT_LEAK_PHRASES
            .iter()
            .map(|s| s.to_string())
            .chain(self.leak_phrases.iter().map(|s| s.to_lowercase()))
            .any(|p| lower.contains(&p));
        if leaked {
            return Some(Reason::CopiedPrompt);
        }
        if only_stop_words(e) {
            return Some(Reason::OnlyStopWords);
        }
        if e == original.trim() {
            return Some(Reason::NoInformationGain);
        }
        if self.info_gain == InfoGain::Similarity
            && word_jaccard(original, e) >= self.similarity_threshold
        {
            return Some(Reason::NoInformationGain);
        }
        None
    }

    /// Checks an answer to an evolved instruction.
    pub fn check_answer(&self, answer: &str) -> Option<Reason> {
        let n = words(answer).len();
        let lower = answer.to_lowercase();
        if n < self.refusal_max_words && REFUSALS.iter().any(|r| lower.contains(r)) {
            return Some(Reason::Refusal);
        }
        if only_stop_words(answer) {
            return Some(Reason::OnlyStopWords);
        }
        if n < self.min_answer_words {
            return Some(Reason::TooShort);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_rules() {
        let c = EliminationConfig::default();
        let orig = "Write a poem about the sea.";
        assert_eq!(
            c.check_instruction(orig, "  "),
            Some(Reason::EmptyInstruction)
        );
        assert_eq!(
            c.check_instruction(orig, "#Rewritten Prompt#: Write a sonnet"),
            Some(Reason::CopiedPrompt)
        );
        assert_eq!(
            c.check_instruction(orig, "Here is the evolved instruction: write"),
            Some(Reason::CopiedPrompt)
        );
        assert_eq!(
            c.check_instruction(orig, "... the, of and!"),
            Some(Reason::OnlyStopWords)
        );
        assert_eq!(
            c.check_instruction(orig, orig),
            Some(Reason::NoInformationGain)
        );
        assert_eq!(
            c.check_instruction(
                orig,
                "Write a sonnet about the sea at night, in iambic pentameter."
            ),
            None
        );
        let sim = EliminationConfig {
            info_gain: InfoGain::Similarity,
            similarity_threshold: 0.8,
            ..Default::default()
        };
        assert_eq!(
            sim.check_instruction(orig, "Write a poem about the sea!"),
            Some(Reason::NoInformationGain)
        );
    }

    #[test]
    fn answer_rules() {
        let c = EliminationConfig::default();
        assert_eq!(
            c.check_answer("I'm sorry, I cannot help."),
            Some(Reason::Refusal)
        );
        assert_eq!(
            c.check_answer("As an AI, I have no opinions."),
            Some(Reason::Refusal)
        );
        assert_eq!(c.check_answer("It is."), Some(Reason::OnlyStopWords));
        assert_eq!(c.check_answer("Paris."), Some(Reason::TooShort));
        assert_eq!(c.check_answer("The capital of France is Paris."), None);
        // A long answer that apologises once is kept (the paper's 80-word rule).
        let long = format!(
            "Sorry for the delay. {}",
            "Here is more detail. ".repeat(30)
        );
        assert_eq!(c.check_answer(&long), None);
    }

    #[test]
    fn judgements() {
        assert_eq!(parse_judgement("Equal"), Some(true));
        assert_eq!(parse_judgement(" Not Equal."), Some(false));
        assert_eq!(parse_judgement("maybe"), None);
    }
}
