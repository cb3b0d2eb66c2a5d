//! Evol-Instruct operations and their prompt templates (defaults bundled from
//! `assets/evol_instruct/`, each overridable by a file of the same name in a folder).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    AddConstraints,
    Deepen,
    Concretize,
    Reasoning,
    ComplicateInput,
    Breadth,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Operation::AddConstraints,
        Operation::Deepen,
        Operation::Concretize,
        Operation::Reasoning,
        Operation::ComplicateInput,
        Operation::Breadth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::AddConstraints => "add_constraints",
            Operation::Deepen => "deepen",
            Operation::Concretize => "concretize",
            Operation::Reasoning => "reasoning",
            Operation::ComplicateInput => "complicate_input",
            Operation::Breadth => "breadth",
        }
    }

    pub fn is_in_depth(self) -> bool {
        self != Operation::Breadth
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .with_context(|| {
                format!(
                    "unknown evolve operation `{s}`; expected one of {}",
                    Self::ALL.map(|o| o.name()).join(", ")
                )
            })
    }

    fn file(self) -> String {
        format!("{}.txt", self.name())
    }
}

const DEFAULTS: [(&str, &str); 7] = [
    (
        "add_constraints.txt",
        include_str!("../../../assets/evol_instruct/add_constraints.txt"),
    ),
    (
        "deepen.txt",
        include_str!("../../../assets/evol_instruct/deepen.txt"),
    ),
    (
        "concretize.txt",
        include_str!("../../../assets/evol_instruct/concretize.txt"),
    ),
    (
        "reasoning.txt",
        include_str!("../../../assets/evol_instruct/reasoning.txt"),
    ),
    (
        "complicate_input.txt",
        include_str!("../../../assets/evol_instruct/complicate_input.txt"),
    ),
    (
        "breadth.txt",
        include_str!("../../../assets/evol_instruct/breadth.txt"),
    ),
    (
        "judge_equal.txt",
        include_str!("../../../assets/evol_instruct/judge_equal.txt"),
    ),
];

/// Phrases of the rewriting prompts that must not show up in an evolved instruction: the
/// paper's list and the markers of the bundled templates (compared case-insensitively).
pub const DEFAULT_LEAK_PHRASES: &[&str] = &[
    "#given prompt#",
    "#the given prompt#",
    "#rewritten prompt#",
    "#created prompt#",
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "#original instruction#",
    "#evolved instruction#",
    "original instruction",
    "evolved instruction",
];

#[derive(Debug, Clone)]
pub struct Templates {
    ops: Vec<(Operation, String)>,
    pub judge: String,
}

impl Templates {
    /// The bundled templates, with any same-named file in `dir` taking precedence.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let read = |name: &str, default: &str| -> Result<String> {
            if let Some(dir) = dir {
                let p = dir.join(name);
                if p.exists() {
                    return std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read template {}", p.display()));
                }
            }
            Ok(default.to_string())
        };
        if let Some(dir) = dir {
            if !dir.is_dir() {
                bail!("templates folder {} does not exist", dir.display());
            }
        }
        let default_of = |name: &str| {
            DEFAULTS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| *t)
                .expect("bundled template")
        };
        let mut ops = Vec::new();
        for op in Operation::ALL {
            let file = op.file();
            let t = read(&file, default_of(&file))?;
            if !t.contains("{instruction}") {
                bail!("template {file} has no {{instruction}} placeholder");
            }
            ops.push((op, t));
        }
        let judge = read("judge_equal.txt", default_of("judge_equal.txt"))?;
        if !(judge.contains("{first}") && judge.contains("{second}")) {
            bail!("template judge_equal.txt needs both {{first}} and {{second}} placeholders");
        }
        Ok(Self { ops, judge })
    }

    pub fn evolve_prompt(&self, op: Operation, instruction: &str) -> String {
        let t = &self
            .ops
            .iter()
            .find(|(o, _)| *o == op)
            .expect("all ops loaded")
            .1;
        t.replace("{instruction}", instruction.trim())
    }

    pub fn judge_prompt(&self, first: &str, second: &str) -> String {
        self.judge
            .replace("{first}", first.trim())
            .replace("{second}", second.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_fill() {
        let t = Templates::load(None).unwrap();
        for op in Operation::ALL {
            let p = t.evolve_prompt(op, "  Sort a list.  ");
            assert!(p.contains("\nSort a list.\n"), "{op:?}: {p}");
            assert!(!p.contains("{instruction}"));
        }
        assert!(t.judge_prompt("a", "b").contains("Not Equal"));
        assert_eq!(Operation::parse("deepen").unwrap(), Operation::Deepen);
        assert!(Operation::parse("shorten").is_err());
    }

    #[test]
    fn a_folder_overrides_one_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("deepen.txt"), "DEEPER: {instruction}").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert_eq!(t.evolve_prompt(Operation::Deepen, "x"), "DEEPER: x");
        assert!(t
            .evolve_prompt(Operation::Breadth, "x")
            .contains("inspiration"));
        std::fs::write(dir.path().join("breadth.txt"), "no placeholder").unwrap();
        assert!(Templates::load(Some(dir.path())).is_err());
    }
}
