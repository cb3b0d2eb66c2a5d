//! The real Llama-2-style tokenizer (Phi-3-vision's, bundled in assets/) gives transformers'
//! ids, and chat templates render exactly as transformers renders them.

use models::chat_template::{ChatTemplate, Message};
use models::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&root().join("assets/tokenizers/phi3_vision")).unwrap()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/tokenizer/phi3_expected.json"))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn hello_world_ids_match_hf() {
    let tok = tokenizer();
    assert_eq!(
        tok.encode("Hello world!", true).unwrap(),
        vec![1, 15043, 3186, 29991]
    );
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_token.as_deref(), Some("<|endoftext|>"));
}

#[test]
fn encodings_match_hf() {
    let tok = tokenizer();
    for case in expected()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            u32s(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            u32s(&case["ids_no_special"]),
            "{text:?}"
        );
        let decoded = tok.decode(&u32s(&case["ids"]), true).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn own_chat_template_renders_like_transformers() {
    let tok = tokenizer();
    let template = tok.template(None).unwrap();
    for case in expected()["own_template"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render(&msgs, agp, &tok.template_tokens()).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap());
    }
}

#[test]
fn builtin_templates_render_like_jinja2() {
    let tokens = models::chat_template::SpecialTokens {
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
        pad_token: None,
    };
    let exp = expected();
    let builtin = exp["builtin"].as_object().unwrap();
    assert_eq!(builtin.len(), ChatTemplate::builtin_names().len());
    for (name, cases) in builtin {
        let template = ChatTemplate::named(name).unwrap();
        for case in cases.as_array().unwrap() {
            let msgs = messages(&case["messages"]);
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render(&msgs, agp, &tokens);
            match case.get("error") {
                Some(e) => {
                    let err = format!("{:#}", got.unwrap_err());
                    assert!(
                        err.contains(e.as_str().unwrap()),
                        "{name}: {err} should contain {e}"
                    );
                }
                None => assert_eq!(got.unwrap(), case["text"].as_str().unwrap(), "{name}"),
            }
        }
    }
}

#[test]
fn unknown_template_lists_the_builtins() {
    let err = ChatTemplate::named("vicuna").err().unwrap().to_string();
    for n in ChatTemplate::builtin_names() {
        assert!(err.contains(n), "{err}");
    }
}

#[test]
fn hf_style_templates_with_python_methods_and_loop_controls() {
    let src = "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\n  {{ m['content'].strip().upper() }}|{% endfor %}";
    let t = ChatTemplate::new("t", src.to_string());
    let msgs = vec![
        Message::new("system", "x"),
        Message::new("user", "  hi  "),
        Message::new("assistant", "yo"),
    ];
    // As jinja2 with trim_blocks + lstrip_blocks: the newline after a block tag goes, the
    // indentation before an expression stays.
    assert_eq!(
        t.render(&msgs, false, &Default::default()).unwrap(),
        "  HI|  YO|"
    );
}
