//! End-to-end: `burnish train` (quickstart recipe, shortened), `--dry-run`, recipe errors,
//! and `burnish export --merge`.

mod common;

use common::{burnish, ok, root};
use std::path::Path;

/// `train --recipe recipes/NAME.toml` with its model, data cache and run directory
/// (`out`) moved under `dir`, plus `extra` `--set` overrides.
fn train_args(name: &str, dir: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    let mut sets = vec![format!("model.path=\"{}\"", p("model"))];
    let text = std::fs::read_to_string(root().join(format!("recipes/{name}.toml"))).unwrap();
    if text.contains("init_recipe") {
        // Recipes that start from the quickstart model get a fresh tiny one instead.
        sets.extend([
            "model.init_recipe=\"\"".to_string(),
            "model.init_preset=\"tiny\"".into(),
            "model.init_tokenizer=\"assets/tokenizers/phi3_vision\"".into(),
        ]);
    }
    sets.extend([
        format!("data.cache_dir=\"{}\"", p("cache")),
        format!("train.output_dir=\"{}\"", p(out)),
    ]);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args = vec![
        "train".to_string(),
        "--recipe".into(),
        format!("recipes/{name}.toml"),
    ];
    for s in sets {
        args.extend(["--set".to_string(), s]);
    }
    args
}

/// `--dry-run` (it must print a memory estimate), then the run itself; its metrics.jsonl.
fn dry_run_then_train(owned: &[String], run_dir: &Path) -> String {
    let args = strs(owned);
    let mut dry = args.clone();
    dry.push("--dry-run");
    assert!(ok(&dry).contains("# memory estimate"));
    ok(&args);
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn quickstart_recipe_trains_exports_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    let base = [
        "train.max_steps=4",
        "train.eval_steps=2",
        "train.sample_max_new_tokens=4",
    ];
    let owned = train_args("quickstart", tmp.path(), "run", &base);
    let args = strs(&owned);

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

    // Every run ends with its plots: one panel per metric, in SVG and PNG.
    let svg = std::fs::read_to_string(tmp.path().join("run/plots/metrics.svg")).unwrap();
    for panel in ["loss", "eval_loss", "lr", "grad_norm"] {
        assert!(svg.contains(&format!(">\n{panel}\n<")), "no {panel} panel");
    }
    let png = std::fs::read(tmp.path().join("run/plots/metrics.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 3 * 420, "three panels a row");

    // LoRA on the model just trained, then merge it.
    let mut lora = base.to_vec();
    lora.extend(["adapter.r=4", "train.overwrite_output_dir=false"]);
    let owned = train_args("quickstart", tmp.path(), "lora", &lora);
    let args = strs(&owned);
    ok(&args);
    assert!(tmp
        .path()
        .join("lora/final/adapter_model.safetensors")
        .exists());
    // Two runs side by side, one colour and one legend entry each.
    let both = p("both.svg");
    let said = ok(&["plot", &p("run"), &p("lora"), "--out", &both]);
    assert!(said.contains("loss, eval_loss"), "{said}");
    let svg = std::fs::read_to_string(&both).unwrap();
    assert!(
        svg.contains(">\nrun\n<") && svg.contains(">\nlora\n<"),
        "the legend names the runs"
    );
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
        "recipes/qlora.toml",
        "recipes/distill.toml",
        "recipes/grpo.toml",
        "recipes/ppo.toml",
    ] {
        trainers::Recipe::load(&root().join(r), &[]).unwrap();
    }
    // A 4-bit base cannot be trained in full: the recipe says what to add.
    let out = burnish(&[
        "train",
        "--recipe",
        "recipes/quickstart.toml",
        "--set",
        "model.quantize=\"nf4\"",
        "--dry-run",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("[adapter]"), "{e}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let owned = train_args(
        "quickstart",
        tmp.path(),
        "run",
        &[
            "train.max_steps=500",
            "train.sample_prompts=[]",
            "train.overwrite_output_dir=false",
            "train.report_to=[\"tensorboard\", \"csv\"]",
        ],
    );
    let args = strs(&owned);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(&args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("run/metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 300, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("Ctrl-C") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let (step, _) = checkpoints::latest_checkpoint(&tmp.path().join("run"))
        .unwrap()
        .unwrap();
    assert!((2..500).contains(&step), "{step}");

    let stop = (step + 2).to_string();
    let mut resume = args.clone();
    resume.extend(["--resume", "auto", "--stop-after-steps", &stop]);
    let out = burnish(&resume);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    let expected: Vec<u64> = (0..=step + 2).collect();
    assert_eq!(steps, expected, "one continuous curve");

    // report_to: TensorBoard and the CSV hold that same one curve, resumed steps not twice.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scalars = common::read_tensorboard(&tmp.path().join("run/tensorboard"));
    let losses: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "train/loss")
        .map(|(s, _, v)| (*s, *v))
        .collect();
    let want: Vec<(i64, f32)> = records
        .iter()
        .filter_map(|r| Some((r["step"].as_i64()?, r.get("loss")?.as_f64()? as f32)))
        .collect();
    assert_eq!(losses, want);
    assert!(
        scalars.iter().any(|(_, tag, _)| tag == "eval/loss"),
        "{scalars:?}"
    );
    let csv = std::fs::read_to_string(tmp.path().join("run/metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert!(
        header.contains(&"loss") && header.contains(&"eval_loss"),
        "{header:?}"
    );
    let step_col = header.iter().position(|h| *h == "step").unwrap();
    let csv_steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(step_col).unwrap().parse().unwrap())
        .collect();
    assert_eq!(csv_steps, expected);
}

#[test]
fn dpo_and_reward_recipes_run_and_the_reward_model_scores_rows() {
    let tmp = tempfile::tempdir().unwrap();
    for recipe in ["dpo", "reward"] {
        let owned = train_args(
            recipe,
            &tmp.path().join(recipe),
            "run",
            &[
                "train.max_steps=2",
                "train.eval_steps=0",
                "data.max_seq_len=256",
            ],
        );
        let metrics = dry_run_then_train(&owned, &tmp.path().join(recipe).join("run"));
        let key = if recipe == "dpo" {
            "eval_rewards/accuracies"
        } else {
            "eval_accuracy"
        };
        assert!(metrics.contains(key), "{metrics}");
    }
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}\n",
    )
    .unwrap();
    let convs = tmp.path().join("convs.jsonl");
    std::fs::write(&convs, "{\"prompt\": \"Hi\", \"completion\": \"Hello!\"}\n").unwrap();
    let run = tmp.path().join("reward/run").display().to_string();
    let score = |file: &std::path::Path| -> Vec<serde_json::Value> {
        let out = ok(&[
            "score",
            "--reward-model",
            &run,
            "--data",
            file.to_str().unwrap(),
        ]);
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let pairs = score(&data);
    assert_eq!(pairs.len(), 1);
    assert!(pairs[0]["reward_chosen"].is_f64() && pairs[0]["reward_rejected"].is_f64());
    let single = score(&convs);
    assert!(single[0]["reward"].is_f64());
    let policy = tmp.path().join("dpo/run").display().to_string();
    let e = burnish(&[
        "score",
        "--reward-model",
        &policy,
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("not a reward model"));
}

/// The GRPO recipe on the full GSM8K test split and on Bedrock RFT rows (../shared/data),
/// an external verifier command, and the PPO recipe with a reward model trained first.
#[test]
fn grpo_and_ppo_recipes_run_on_gsm8k_and_bedrock_rft_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = root().join("../shared/data");
    for (name, file) in [
        ("gsm8k", shared.join("gsm8k/test.jsonl")),
        ("rft", shared.join("bedrock/rft_gsm8k_train.jsonl")),
    ] {
        let owned = train_args(
            "grpo",
            &tmp.path().join(name),
            "run",
            &[
                &format!("data.files=[\"{}\"]", file.display()),
                "train.max_steps=2",
                "grpo.max_completion_length=8",
                "rewards=[{type=\"accuracy\"}]",
            ],
        );
        let metrics = dry_run_then_train(&owned, &tmp.path().join(name).join("run"));
        for key in [
            "rewards/accuracy/mean",
            "eval_reward",
            "completions/mean_length",
        ] {
            assert!(metrics.contains(key), "{name}: {key} missing in {metrics}");
        }
    }

    // A verifier program: 1 when the completion has any digit. Then one that is too slow.
    let verifier = "[{type=\"command\", command=[\"sh\", \"-c\", \"while read -r l; do case $l in *completion*[0-9]*answer*) echo 1;; *) echo 0;; esac; done\"]}]";
    let owned = train_args(
        "grpo",
        &tmp.path().join("cmd"),
        "run",
        &[
            "train.max_steps=1",
            "grpo.max_completion_length=4",
            &format!("rewards={verifier}"),
        ],
    );
    ok(&strs(&owned));
    let metrics = std::fs::read_to_string(tmp.path().join("cmd/run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("rewards/command/mean"), "{metrics}");
    let slow = "rewards=[{type=\"command\", command=[\"sleep\", \"30\"], timeout_s=0.5}]";
    let owned = train_args(
        "grpo",
        &tmp.path().join("slow"),
        "run",
        &["train.max_steps=1", "grpo.max_completion_length=4", slow],
    );
    let started = std::time::Instant::now();
    let e = common::err(&strs(&owned));
    assert!(e.contains("did not finish within 0.5 s"), "{e}");
    assert!(started.elapsed().as_secs() < 60);

    let rm = train_args(
        "reward",
        &tmp.path().join("rm"),
        "run",
        &["train.max_steps=2"],
    );
    ok(&strs(&rm));
    let rm_final = tmp.path().join("rm/run/final");
    let owned = train_args(
        "ppo",
        &tmp.path().join("ppo"),
        "run",
        &[
            "train.max_steps=2",
            "ppo.max_completion_length=6",
            "ppo.num_ppo_epochs=2",
            &format!(
                "rewards=[{{type=\"model\", path=\"{}\"}}]",
                rm_final.display()
            ),
        ],
    );
    ok(&strs(&owned));
    let metrics = std::fs::read_to_string(tmp.path().join("ppo/run/metrics.jsonl")).unwrap();
    for key in ["objective/scores", "loss/value", "eval_reward"] {
        assert!(metrics.contains(key), "{key} missing in {metrics}");
    }
    assert!(tmp
        .path()
        .join("ppo/run/final/value_head.safetensors")
        .exists());
}

/// Qwen3 (per-head q/k norm) learns through the same recipe: a fresh `new-model --arch
/// qwen3` fine-tuned on the quickstart data lowers its held-out loss, and its export loads.
#[test]
fn a_qwen3_model_learns_the_quickstart_data() {
    let tmp = an_arch_learns_the_quickstart_data("qwen3", "Qwen3ForCausalLM", &[]);
    let fin = tmp.path().join("run/final");
    let cfg = std::fs::read_to_string(fin.join("config.json")).unwrap();
    assert!(cfg.contains("Qwen3ForCausalLM"), "{cfg}");
    generates(&fin);
}

/// Phi-3 (fused qkv_proj and gate_up_proj) too, with LoRA on its fused layers as PEFT names
/// them.
#[test]
fn a_phi3_model_learns_the_quickstart_data_with_lora_on_its_fused_layers() {
    let tmp = an_arch_learns_the_quickstart_data(
        "phi3",
        "Phi3ForCausalLM",
        &[
            "adapter.target_modules=[\"qkv_proj\", \"gate_up_proj\"]",
            "adapter.r=16",
            "train.learning_rate=1e-2",
        ],
    );
    let fin = tmp.path().join("run/final");
    let adapter = std::fs::read_to_string(fin.join("adapter_config.json")).unwrap();
    assert!(
        adapter.contains("qkv_proj") && adapter.contains("gate_up_proj"),
        "{adapter}"
    );
    merges_and_generates(&fin, tmp.path(), "Phi3ForCausalLM");
}

/// Gemma 2 (1 + weight norms, GeGLU, soft-capping, alternating windows) too, in full.
#[test]
fn a_gemma2_model_learns_the_quickstart_data() {
    let tmp = an_arch_learns_the_quickstart_data("gemma2", "Gemma2ForCausalLM", &[]);
    let fin = tmp.path().join("run/final");
    let cfg = std::fs::read_to_string(fin.join("config.json")).unwrap();
    assert!(cfg.contains("Gemma2ForCausalLM"), "{cfg}");
    generates(&fin);
}

/// Gemma 3 text (q/k norms, a rotary base per layer type) too.
#[test]
fn a_gemma3_model_learns_the_quickstart_data() {
    let tmp = an_arch_learns_the_quickstart_data("gemma3", "Gemma3ForCausalLM", &[]);
    generates(&tmp.path().join("run/final"));
}

/// Mixtral (routed experts) learns in full, with the router's load-balancing loss in its
/// loss and its metrics, and the export loads with its experts.
#[test]
fn a_mixtral_model_learns_the_quickstart_data_with_its_load_balancing_loss() {
    let tmp = an_arch_learns_the_quickstart_data("mixtral", "MixtralForCausalLM", &[]);
    let aux: Vec<f64> = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok()?["router_aux_loss"].as_f64()
        })
        .collect();
    assert!(
        aux.len() >= 40,
        "router_aux_loss logged every step: {aux:?}"
    );
    // Two of eight experts per token: a balanced router scores 1 x top-k = 2.
    assert!(aux.iter().all(|&a| (1.9..4.0).contains(&a)), "{aux:?}");
    let fin = tmp.path().join("run/final");
    let cfg = std::fs::read_to_string(fin.join("config.json")).unwrap();
    assert!(cfg.contains("num_local_experts"), "{cfg}");
    generates(&fin);
}

/// Qwen3-MoE learns in full, and with LoRA on its attention (all it adapts: a random base's
/// attention alone learns less in 40 steps, 0.9 nat), whose merged export loads.
#[test]
fn a_qwen3_moe_model_learns_the_quickstart_data_in_full_and_with_lora() {
    an_arch_learns_the_quickstart_data("qwen3_moe", "Qwen3MoeForCausalLM", &[]);
    let tmp = an_arch_learns_by(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        &[
            "adapter.target_modules=\"all-linear\"",
            "adapter.r=16",
            "train.learning_rate=1e-2",
        ],
        0.5,
    );
    let fin = tmp.path().join("run/final");
    let adapter = std::fs::read_to_string(fin.join("adapter_config.json")).unwrap();
    assert!(!adapter.contains("up_proj"), "{adapter}");
    merges_and_generates(&fin, tmp.path(), "Qwen3MoeForCausalLM");
}

fn an_arch_learns_the_quickstart_data(arch: &str, class: &str, sets: &[&str]) -> tempfile::TempDir {
    an_arch_learns_by(arch, class, sets, 1.0)
}

/// A fresh tiny `arch` model fine-tuned on the quickstart data for 40 steps lowers its
/// held-out loss by more than `nats`.
fn an_arch_learns_by(arch: &str, class: &str, sets: &[&str], nats: f64) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(arch);
    ok(&[
        "new-model",
        "--preset",
        "tiny",
        "--arch",
        arch,
        "--tokenizer",
        "assets/tokenizers/phi3_vision",
        "--out",
        model.to_str().unwrap(),
    ]);
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    assert!(cfg.contains(class), "{cfg}");
    let mut extra = vec![
        "train.max_steps=40",
        "train.eval_steps=40",
        "train.sample_prompts=[]",
    ];
    extra.extend_from_slice(sets);
    let mut owned = train_args("quickstart", tmp.path(), "run", &extra);
    owned.extend([
        "--set".into(),
        format!("model.path=\"{}\"", model.display()),
    ]);
    ok(&strs(&owned));
    let losses: Vec<f64> = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["eval_loss"].as_f64())
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first - nats, "{arch}: eval loss {first} -> {last}");
    tmp
}

/// `export --merge` of the adapter run `fin` into `dir/merged` gives a `class` model that
/// generates.
fn merges_and_generates(fin: &Path, dir: &Path, class: &str) {
    let merged = dir.join("merged");
    ok(&[
        "export",
        fin.to_str().unwrap(),
        "--merge",
        "--out",
        merged.to_str().unwrap(),
    ]);
    let cfg = std::fs::read_to_string(merged.join("config.json")).unwrap();
    assert!(cfg.contains(class), "{cfg}");
    generates(&merged);
}

fn generates(model: &Path) {
    ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "Who are you?",
        "--max-new-tokens",
        "4",
    ]);
}
