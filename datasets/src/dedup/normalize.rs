//! Text normalisation before hashing: Unicode NFKC, case folding, whitespace collapsing and
//! punctuation stripping, each switchable.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    /// Unicode NFKC (compatibility composition: full-width forms, ligatures, ...).
    #[serde(default = "yes")]
    pub nfkc: bool,
    /// Lower-case (Unicode-aware).
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// Collapse runs of whitespace to one space and trim the ends.
    #[serde(default = "yes")]
    pub whitespace: bool,
    /// Drop punctuation characters (Unicode general category P*, and ASCII symbols).
    #[serde(default)]
    pub punctuation: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Self {
            nfkc: true,
            lowercase: true,
            whitespace: true,
            punctuation: false,
        }
    }
}

impl Normalize {
    /// No normalisation at all (byte-exact comparison).
    pub fn none() -> Self {
        Self {
            nfkc: false,
            lowercase: false,
            whitespace: false,
            punctuation: false,
        }
    }

    /// Parses a comma list such as `nfkc,lower,space,punct` (or `none`).
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut n = Self::none();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part {
                "none" => {}
                "nfkc" => n.nfkc = true,
                "lower" | "lowercase" | "case" => n.lowercase = true,
                "space" | "whitespace" => n.whitespace = true,
                "punct" | "punctuation" => n.punctuation = true,
                other => anyhow::bail!(
                    "unknown normalisation `{other}`; expected a comma list of nfkc, lower, space, punct (or none)"
                ),
            }
        }
        Ok(n)
    }

    pub fn apply(&self, text: &str) -> String {
        let s: String = if self.nfkc {
            text.nfkc().collect()
        } else {
            text.to_string()
        };
        let s = if self.lowercase { s.to_lowercase() } else { s };
        let s: String = if self.punctuation {
            s.chars()
                .map(|c| if is_punctuation(c) { ' ' } else { c })
                .collect()
        } else {
            s
        };
        if self.whitespace {
            let mut out = String::with_capacity(s.len());
            for w in s.split_whitespace() {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(w);
            }
            out
        } else {
            s
        }
    }
}

/// ASCII punctuation and symbols plus the common Unicode punctuation blocks.
pub fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1..=0x00BF | 0x2010..=0x2027 | 0x2030..=0x205E | 0x3000..=0x303F
            | 0xFE30..=0xFE4F | 0xFF01..=0xFF0F | 0xFF1A..=0xFF20 | 0xFF3B..=0xFF40
            | 0xFF5B..=0xFF65)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fold_width_case_and_space() {
        let n = Normalize::default();
        assert_eq!(n.apply("  Ｈｅｌｌｏ\t\nWORLD  "), "hello world");
        assert_eq!(n.apply("ﬁne"), "fine");
    }

    #[test]
    fn punctuation_is_optional() {
        let mut n = Normalize::default();
        assert_eq!(n.apply("Hi, there!"), "hi, there!");
        n.punctuation = true;
        assert_eq!(n.apply("Hi, there!"), "hi there");
        assert_eq!(n.apply("«Bonjour» — ça va?"), "bonjour ça va");
    }

    #[test]
    fn parse_lists() {
        assert_eq!(Normalize::parse("none").unwrap(), Normalize::none());
        let n = Normalize::parse("lower,punct").unwrap();
        assert!(n.lowercase && n.punctuation && !n.nfkc && !n.whitespace);
        assert!(Normalize::parse("bogus")
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }
}
