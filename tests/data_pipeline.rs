//! The data pipeline end to end: loss masks from chat templates, packing that leaves the
//! loss unchanged on a real model, the Parquet cache, and `burnish data` commands.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use datasets::batch::{collate_sft, Padding};
use datasets::config::DataConfig;
use datasets::pack::{pack_best_fit, PackedRow};
use datasets::prepare::prepare;
use datasets::records::{Conversation, Preference, Record};
use datasets::tokenize::{MaskPolicy, Templater, TokenizeError, TokenizedSeq, Truncation};
use models::backend::Cpu;
use models::chat_template::ChatTemplate;
use models::{ForwardInput, Message, TextTokenizer};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&root().join("assets/tokenizers/phi3_vision")).unwrap()
}

fn templater(tok: &TextTokenizer, mask: MaskPolicy) -> Templater<'_> {
    Templater {
        tokenizer: tok,
        template: tok.template(None).unwrap(),
        tokens: tok.template_tokens(),
        mask,
        max_seq_len: 4096,
        truncation: Truncation::Drop,
    }
}

fn chat() -> Conversation {
    Conversation {
        system: Some("Be brief.".into()),
        messages: vec![
            Message::new("user", "What is 2+2?"),
            Message::new("assistant", "4"),
            Message::new("user", "And 3+3?"),
            Message::new("assistant", "6, of course."),
        ],
        tools: Vec::new(),
    }
}

fn trained_text(tok: &TextTokenizer, s: &TokenizedSeq) -> Vec<String> {
    let mut runs = vec![];
    let mut i = 0;
    while i < s.ids.len() {
        let j = (i..s.ids.len())
            .find(|&j| s.trained[j] != s.trained[i])
            .unwrap_or(s.ids.len());
        if s.trained[i] {
            runs.push(tok.decode(&s.ids[i..j], false).unwrap());
        }
        i = j;
    }
    runs
}

#[test]
fn assistant_turns_and_their_end_token_train_prompt_does_not() {
    let tok = tokenizer();
    let end = tok.token_to_id("<|end|>").unwrap();
    let (s, cut) = templater(&tok, MaskPolicy::Assistant)
        .conversation(&chat())
        .unwrap();
    assert!(!cut);
    assert_eq!(
        trained_text(&tok, &s),
        vec!["4<|end|>\n", "6, of course.<|end|>\n"]
    );
    // The end-of-turn token of each assistant turn is trained, the user's is not.
    let end_positions: Vec<bool> = s
        .ids
        .iter()
        .zip(&s.trained)
        .filter(|(&i, _)| i == end)
        .map(|(_, &t)| t)
        .collect();
    assert_eq!(end_positions, vec![false, false, true, false, true]);

    let (last, _) = templater(&tok, MaskPolicy::LastAssistant)
        .conversation(&chat())
        .unwrap();
    assert_eq!(trained_text(&tok, &last), vec!["6, of course.<|end|>\n"]);
    let (all, _) = templater(&tok, MaskPolicy::All)
        .conversation(&chat())
        .unwrap();
    assert!(all.trained.iter().all(|&t| t));
    assert_eq!(all.ids, s.ids);
}

#[test]
fn rows_without_trained_tokens_and_broken_templates_are_errors() {
    let tok = tokenizer();
    let no_answer = Conversation {
        system: None,
        messages: vec![Message::new("user", "hi")],
        tools: Vec::new(),
    };
    assert_eq!(
        templater(&tok, MaskPolicy::Assistant)
            .conversation(&no_answer)
            .unwrap_err(),
        TokenizeError::NoTrainedTokens
    );
    // A template that renders the newest message first cannot give prefix-consistent masks.
    let mut t = templater(&tok, MaskPolicy::Assistant);
    t.template = ChatTemplate::new(
        "reversed",
        "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}".into(),
    );
    assert!(matches!(
        t.conversation(&chat()).unwrap_err(),
        TokenizeError::PrefixBroken { .. }
    ));
}

#[test]
fn truncation_policies() {
    let tok = tokenizer();
    let mut t = templater(&tok, MaskPolicy::LastAssistant);
    let (full, _) = t.conversation(&chat()).unwrap();
    t.max_seq_len = full.ids.len() - 3;
    assert!(matches!(
        t.conversation(&chat()).unwrap_err(),
        TokenizeError::TooLong { .. }
    ));
    t.truncation = Truncation::Left;
    let (cut, truncated) = t.conversation(&chat()).unwrap();
    assert!(truncated);
    assert_eq!(cut.ids, full.ids[3..].to_vec());
    assert_eq!(cut.num_trained(), full.num_trained());
}

#[test]
fn preference_rows_share_the_prompt() {
    let tok = tokenizer();
    let p = Preference {
        prompt: Conversation {
            system: None,
            messages: vec![Message::new("user", "Pick a colour.")],
            tools: Vec::new(),
        },
        chosen: vec![Message::new("assistant", "Blue.")],
        rejected: vec![Message::new("assistant", "No.")],
        margin: None,
    };
    let (pair, _) = templater(&tok, MaskPolicy::Assistant)
        .preference(&p)
        .unwrap();
    // transformers tokenizes this to the same ids: `<|assistant|>` strips the newline after it.
    let hf_chosen = [
        32010, 13, 29925, 860, 263, 12384, 29889, 32007, 13, 32001, 21319, 29889, 32007, 13,
    ];
    assert_eq!(
        [pair.prompt.as_slice(), pair.chosen.as_slice()].concat(),
        hf_chosen
    );
    assert_eq!(pair.prompt, hf_chosen[..10].to_vec());
    assert_eq!(tok.decode(&pair.rejected, false).unwrap(), "No.<|end|>\n");
}

/// Mean next-token loss over trained targets, as the trainer normalises it.
fn loss(model: &models::CausalLm<Cpu>, rows: &[PackedRow]) -> f64 {
    let b = collate_sft(rows, Padding::exact(0), rows.len());
    let device = model.device();
    let input = ForwardInput::<Cpu>::from_host(&b.ids, &b.positions, &b.layout, &device);
    let logp = log_softmax(model.forward(input), 2);
    let [bs, t, _] = logp.dims();
    let targets: Vec<i64> = b.targets.iter().flatten().map(|&x| x as i64).collect();
    let targets = Tensor::<Cpu, 3, Int>::from_data(TensorData::new(targets, [bs, t, 1]), &device);
    let picked: Vec<f32> = logp.gather(2, targets).into_data().iter::<f32>().collect();
    let weights: Vec<bool> = b.weights.iter().flatten().copied().collect();
    let total: f64 = picked
        .iter()
        .zip(&weights)
        .filter(|(_, &w)| w)
        .map(|(&p, _)| -(p as f64))
        .sum();
    total / b.num_trained() as f64
}

#[test]
fn packing_leaves_the_loss_unchanged() {
    let dir = root().join("tests/fixtures/models/tiny-llama");
    let (_, model) = models::checkpoint::load_model::<Cpu>(&dir, &Default::default()).unwrap();
    let mut x = 11u64;
    let mut rnd = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let seqs: Vec<TokenizedSeq> = [9usize, 5, 13, 3, 7, 11, 4, 6]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| 3 + rnd(250) as u32).collect();
            let trained: Vec<bool> = (0..n).map(|i| i >= n / 3).collect();
            TokenizedSeq { ids, trained }
        })
        .collect();
    let unpacked: Vec<PackedRow> = seqs.iter().map(PackedRow::single).collect();
    let (packed, stats) = pack_best_fit(&seqs, 16);
    assert!(stats.rows < seqs.len());
    let (a, b) = (loss(&model, &unpacked), loss(&model, &packed));
    assert!((a - b).abs() < 1e-5, "unpacked {a} vs packed {b}");
}

fn write_alpaca(path: &std::path::Path, n: usize, salt: &str) {
    let rows: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"instruction": format!("Add {i} and {salt}."), "input": "", "output": format!("The sum is {i}{salt}.")}).to_string())
        .collect();
    std::fs::write(path, rows.join("\n") + "\n").unwrap();
}

#[test]
fn cache_is_reused_and_invalidated_by_a_changed_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a.jsonl");
    write_alpaca(&data, 40, "1");
    let tok = tokenizer();
    let mut cfg = DataConfig::new(vec![data.clone()]);
    cfg.cache_dir = tmp.path().join("cache");
    cfg.eval_fraction = 0.2;
    cfg.packing = true;
    cfg.max_seq_len = 128;
    let first = prepare(&cfg, &tok).unwrap();
    assert!(!first.report.cache_hit);
    assert_eq!(first.report.train_rows + first.report.eval_rows, 40);
    assert!(first.report.eval_rows > 0 && first.report.train_rows > first.report.eval_rows);
    let second = prepare(&cfg, &tok).unwrap();
    assert!(second.report.cache_hit);
    assert_eq!(second.train, first.train);
    assert_eq!(second.eval, first.eval);
    write_alpaca(&data, 40, "2");
    let third = prepare(&cfg, &tok).unwrap();
    assert!(!third.report.cache_hit);
    assert_ne!(third.report.fingerprint, first.report.fingerprint);
    cfg.max_seq_len = 64;
    assert_ne!(
        prepare(&cfg, &tok).unwrap().report.fingerprint,
        third.report.fingerprint
    );
}

fn burnish(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn data_commands_inspect_convert_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a.jsonl");
    write_alpaca(&data, 12, "7");
    let model = "assets/tokenizers/phi3_vision";
    let (ok, out, err) = burnish(&["data", "inspect", data.to_str().unwrap(), "--model", model]);
    assert!(ok, "{err}");
    assert!(
        out.contains("format:   alpaca")
            && out.contains("12 read")
            && out.contains("[[The sum is 07.<|end|>"),
        "{out}"
    );

    let converted = tmp.path().join("b.jsonl");
    let (ok, _, err) = burnish(&[
        "data",
        "convert",
        data.to_str().unwrap(),
        "--to",
        "sharegpt",
        "--out",
        converted.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = burnish(&["data", "inspect", converted.to_str().unwrap()]);
    assert!(
        ok && out.contains("format:   sharegpt") && out.contains("12 kept"),
        "{out}"
    );

    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{model}\"\n\n[data]\nfiles = [\"{}\"]\nmax_seq_len = 256\npacking = true\neval_fraction = 0.25\ncache_dir = \"{}\"\n",
            data.display(),
            tmp.path().join("cache").display()
        ),
    )
    .unwrap();
    let report = tmp.path().join("report.json");
    let (ok, out, err) = burnish(&[
        "data",
        "prepare",
        "--recipe",
        recipe.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("efficiency") && out.contains("written"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        r["train_rows"].as_u64().unwrap() + r["eval_rows"].as_u64().unwrap(),
        12
    );
    let (ok, out, _) = burnish(&["data", "prepare", "--recipe", recipe.to_str().unwrap()]);
    assert!(ok && out.contains("reused"), "{out}");

    std::fs::write(
        &recipe,
        "[data]\nfiles = [\"x.jsonl\"]\nmax_seq_length = 5\n",
    )
    .unwrap();
    let (ok, _, err) = burnish(&[
        "data",
        "prepare",
        "--recipe",
        recipe.to_str().unwrap(),
        "--model",
        model,
    ]);
    assert!(
        !ok && err.contains("max_seq_length") && err.contains("max_seq_len"),
        "{err}"
    );
}

#[test]
fn records_split_deterministically() {
    let rec = |i: usize| {
        Record::Conversation(Conversation {
            system: None,
            messages: vec![
                Message::new("user", &format!("q{i}")),
                Message::new("assistant", "a"),
            ],
            tools: Vec::new(),
        })
    };
    let first: Vec<bool> = (0..200)
        .map(|i| datasets::split::is_eval(&rec(i), 0.1))
        .collect();
    let again: Vec<bool> = (0..200)
        .rev()
        .map(|i| datasets::split::is_eval(&rec(i), 0.1))
        .rev()
        .collect();
    assert_eq!(first, again);
    let n = first.iter().filter(|&&e| e).count();
    assert!((8..=35).contains(&n), "{n} of 200 held out at 10%");
}
