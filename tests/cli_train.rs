//! End-to-end: `burnish train` (quickstart recipe, shortened), `--dry-run`, recipe errors,
//! and `burnish export --merge`.

mod common;

use common::{burnish, ok, root};

#[test]
fn quickstart_recipe_trains_exports_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    let sets = [
        format!("model.path=\"{}\"", p("model")),
        format!("data.cache_dir=\"{}\"", p("cache")),
        format!("train.output_dir=\"{}\"", p("run")),
        "train.max_steps=4".to_string(),
        "train.eval_steps=2".to_string(),
        "train.sample_max_new_tokens=4".to_string(),
    ];
    let mut args: Vec<&str> = vec!["train", "--recipe", "recipes/quickstart.toml"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }

    let mut dry = args.clone();
    dry.push("--dry-run");
    let plan = ok(&dry);
    for needle in [
        "# resolved recipe",
        "train rows",
        "4 steps",
        "optimizer",
        "activations",
    ] {
        assert!(plan.contains(needle), "dry run lacks {needle}:\n{plan}");
    }
    assert!(
        !tmp.path().join("model/model.safetensors").exists(),
        "dry run built weights"
    );

    let out = ok(&args);
    assert!(
        out.contains("[before] Who are you?") && out.contains("[after] Who are you?"),
        "{out}"
    );
    assert!(out.contains("eval loss"), "{out}");
    let fin = tmp.path().join("run/final");
    assert!(fin.join("model.safetensors").exists());
    let resolved = std::fs::read_to_string(tmp.path().join("run/recipe.toml")).unwrap();
    assert!(resolved.contains("max_steps = 4"), "{resolved}");

    // LoRA on the model just trained, then merge it.
    let mut lora: Vec<String> = sets.to_vec();
    lora[2] = format!("train.output_dir=\"{}\"", p("lora"));
    lora.push("adapter.r=4".into());
    lora.push("train.overwrite_output_dir=false".into());
    let mut args: Vec<&str> = vec!["train", "--recipe", "recipes/quickstart.toml"];
    for s in &lora {
        args.extend(["--set", s.as_str()]);
    }
    ok(&args);
    assert!(tmp
        .path()
        .join("lora/final/adapter_model.safetensors")
        .exists());
    let again = burnish(&args);
    let e = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && e.contains("--resume auto"),
        "{e}"
    );
    let merged = p("merged");
    ok(&[
        "export",
        &p("lora"),
        "--merge",
        "--out",
        &merged,
        "--dtype",
        "bfloat16",
    ]);
    let cfg = std::fs::read_to_string(tmp.path().join("merged/config.json")).unwrap();
    assert!(cfg.contains("bfloat16"));
    assert!(tmp.path().join("merged/tokenizer.json").exists());
    let text = ok(&[
        "generate",
        "--model",
        &merged,
        "--chat",
        "Who are you?",
        "--max-new-tokens",
        "3",
    ]);
    assert!(!text.is_empty());
}

#[test]
fn recipe_mistakes_are_named() {
    let out = burnish(&[
        "train",
        "--recipe",
        "recipes/quickstart.toml",
        "--set",
        "train.lerning_rate=1",
        "--dry-run",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("lerning_rate") && e.contains("did you mean `learning_rate`"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    for r in [
        "recipes/sft.toml",
        "recipes/lora.toml",
        "recipes/quickstart.toml",
    ] {
        trainers::Recipe::load(&root().join(r), &[]).unwrap();
    }
}
