//! `burnish eval`: every task kind end to end on a tiny model, checked against the commands
//! that compute the same numbers another way (`generate`, `score`, `score --reward-model`),
//! with rejects, the results/rows files and the model hash; the judge against a loopback
//! endpoint that always gives the same verdict.

mod common;

use common::{burnish, new_tiny_model, ok};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn write_lines(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn task<'a>(results: &'a Value, name: &str) -> &'a Value {
    results["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == name)
        .unwrap_or_else(|| panic!("no {name} in {results}"))
}

fn eval(model: &Path, out: &Path, tasks: &[String], extra: &[&str]) -> Value {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for t in tasks {
        args.extend(["--task", t.as_str()]);
    }
    args.extend_from_slice(extra);
    ok(&args);
    read_json(out)
}

#[test]
fn exact_match_choice_and_loss_agree_with_generate_and_score() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = new_tiny_model(&dir.join("tiny"), 11);
    let m = model.to_str().unwrap();

    // Exact match: the model's own answer is right, another answer is wrong. Batches of one
    // row are seeded --seed + row, so row i samples as `generate --seed 5+i` does.
    let questions = ["Name a colour.", "Count to three."];
    let own: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let seed = (5 + i).to_string();
            let args = [
                "generate",
                "--model",
                m,
                "--chat",
                q,
                "--max-new-tokens",
                "8",
                "--temperature",
                "1",
                "--seed",
                &seed,
            ];
            ok(&args).strip_suffix('\n').unwrap().to_string()
        })
        .collect();
    assert!(own.iter().all(|a| !a.trim().is_empty()), "{own:?}");
    let gsm = dir.join("gsm.jsonl");
    write_lines(
        &gsm,
        &[
            json!({"question": questions[0], "answer": own[0]}),
            json!({"question": questions[1], "answer": format!("{} and more", own[1])}),
        ],
    );

    // Multiple choice, with one malformed row.
    let mc = dir.join("mc.jsonl");
    write_lines(
        &mc,
        &[
            json!({"question": "The sky is", "choices": ["blue", "green", "a very long purple answer"], "answer": 0}),
            json!({"question": "Two plus two is", "choices": ["four", "five"], "answer": "B"}),
            json!({"question": "Broken", "choices": ["only one"], "answer": 0}),
        ],
    );
    let loss_data = dir.join("chat.jsonl");
    write_lines(
        &loss_data,
        &[
            json!({"prompt": "Say hi.", "completion": "Hi there!"}),
            json!({"prompt": "Say bye.", "completion": "Goodbye."}),
        ],
    );
    let out = dir.join("res.json");
    let tasks = [
        format!("gsm8k:{}", gsm.display()),
        format!("choice:{}", mc.display()),
        format!("loss:{}", loss_data.display()),
    ];
    let settings = [
        "--max-new-tokens",
        "8",
        "--batch-size",
        "1",
        "--temperature",
        "1",
        "--seed",
        "5",
    ];
    let r = eval(&model, &out, &tasks, &settings);
    let g = task(&r, "gsm8k");
    assert_eq!(g["metrics"]["exact_match"], 0.5, "{g}");
    let ci = g["metrics"]["exact_match_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < 0.5 && ci[1].as_f64().unwrap() > 0.5);
    let c = task(&r, "choice");
    assert_eq!(
        (c["n"].as_u64(), c["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(dir.join("res.rejects.jsonl").exists());

    // Every row is in the rows file, tagged with its task.
    let rows = read_rows(&dir.join("res.rows.jsonl"));
    assert_eq!(rows.len(), 2 + 2 + 2);
    let gsm_rows: Vec<&Value> = rows.iter().filter(|r| r["task"] == "gsm8k").collect();
    assert_eq!(gsm_rows[0]["completion"], own[0].as_str());
    assert_eq!(gsm_rows[0]["correct"], true);

    // The choice picks are the argmax of what `burnish score` says of each continuation.
    let scored = dir.join("choices.jsonl");
    let mut pairs = vec![];
    for (q, choices) in [
        (
            "The sky is",
            vec!["blue", "green", "a very long purple answer"],
        ),
        ("Two plus two is", vec!["four", "five"]),
    ] {
        for c in choices {
            pairs.push(json!({"prompt": q, "completion": format!(" {c}")}));
        }
    }
    write_lines(&scored, &pairs);
    let lp: Vec<f64> = ok(&["score", "--model", m, "--data", scored.to_str().unwrap()])
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["logprob"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let choice_rows: Vec<&Value> = rows.iter().filter(|r| r["task"] == "choice").collect();
    for (row, range) in choice_rows.iter().zip([0..3, 3..5]) {
        let got: Vec<f64> = row["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let want = &lp[range];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
        let argmax = (0..want.len())
            .max_by(|&a, &b| want[a].total_cmp(&want[b]))
            .unwrap();
        assert_eq!(row["pick"], argmax);
    }
    let acc = task(&r, "choice")["metrics"]["acc"].as_f64().unwrap();
    let hits = choice_rows
        .iter()
        .filter(|r| r["pick"] == r["answer"])
        .count();
    assert_eq!(acc, hits as f64 / 2.0);

    // The loss is the token-weighted mean NLL of the rows; perplexity its exponential.
    let l = &task(&r, "loss")["metrics"];
    let loss_rows: Vec<&Value> = rows.iter().filter(|r| r["task"] == "loss").collect();
    let (nll, tokens) = loss_rows.iter().fold((0.0, 0.0), |(s, n), r| {
        let k = r["num_tokens"].as_f64().unwrap();
        (s + r["loss"].as_f64().unwrap() * k, n + k)
    });
    assert!((l["loss"].as_f64().unwrap() - nll / tokens).abs() < 1e-9);
    assert!((l["perplexity"].as_f64().unwrap() - (nll / tokens).exp()).abs() < 1e-9);
    assert!(tokens > 0.0 && l["loss"].as_f64().unwrap() > 0.0);

    // The hash names the weights: the same model twice gives the same hash, another model not.
    let again = eval(&model, &dir.join("again.json"), &tasks[2..], &[]);
    assert_eq!(again["model"]["hash"], r["model"]["hash"]);
    let other = new_tiny_model(&dir.join("other"), 12);
    let third = eval(&other, &dir.join("third.json"), &tasks[2..], &[]);
    assert_ne!(third["model"]["hash"], r["model"]["hash"]);

    // Few-shot examples go before the question as earlier turns.
    let shots = eval(
        &model,
        &dir.join("shots.json"),
        &tasks[..1],
        &[
            "--fewshot",
            gsm.to_str().unwrap(),
            "--num-fewshot",
            "1",
            "--max-new-tokens",
            "4",
        ],
    );
    assert_eq!(task(&shots, "gsm8k")["metrics"]["num_fewshot"], 1);

    // --on-error fail stops on the malformed row before writing anything.
    let failed = dir.join("failed.json");
    let out = burnish(&[
        "eval",
        "--model",
        m,
        "--task",
        &tasks[1],
        "--out",
        failed.to_str().unwrap(),
        "--on-error",
        "fail",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mc.jsonl:3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!failed.exists());
}

#[test]
fn reward_scores_equal_score_reward_model_and_the_judge_undoes_position_bias() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = new_tiny_model(&dir.join("tiny"), 13);
    // A reward model: the tiny model with a seeded score head, saved as transformers does.
    let dev = Default::default();
    let (cfg, base) = models::checkpoint::load_model::<models::backend::Cpu>(&model, &dev).unwrap();
    let rm_dir: PathBuf = dir.join("rm");
    let rm = base.with_reward_head(0.5, 3);
    models::checkpoint::save_model(
        &rm,
        &cfg.as_reward_model(0),
        &rm_dir,
        Some(&model),
        &Default::default(),
    )
    .unwrap();

    let prompts = dir.join("prompts.jsonl");
    write_lines(
        &prompts,
        &[
            json!({"prompt": "Tell me a joke."}),
            json!({"prompt": "Write a haiku."}),
            json!({"prompt": "Hello?"}),
        ],
    );
    let (url, requests) = common::fixed_openai_endpoint(|_| "Both are fine, but [[A]]".to_string());
    let other = new_tiny_model(&dir.join("other"), 14);
    let out = dir.join("res.json");
    let r = eval(
        &model,
        &out,
        &[
            format!("reward:{}", prompts.display()),
            format!("judge:{}", prompts.display()),
        ],
        &[
            "--reward-model",
            rm_dir.to_str().unwrap(),
            "--against",
            other.to_str().unwrap(),
            "--judge-url",
            &url,
            "--judge-model",
            "judge-1",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1",
            "--seed",
            "4",
        ],
    );
    let rows = read_rows(&dir.join("res.rows.jsonl"));

    // Reward: what `score --reward-model` gives the same prompt + answer conversations.
    let reward_rows: Vec<&Value> = rows.iter().filter(|r| r["task"] == "reward").collect();
    let convs = dir.join("convs.jsonl");
    write_lines(
        &convs,
        &reward_rows
            .iter()
            .map(|r| json!({"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}))
            .collect::<Vec<_>>(),
    );
    let want: Vec<f64> = ok(&[
        "score",
        "--reward-model",
        rm_dir.to_str().unwrap(),
        "--data",
        convs.to_str().unwrap(),
    ])
    .lines()
    .map(|l| {
        serde_json::from_str::<Value>(l).unwrap()["reward"]
            .as_f64()
            .unwrap()
    })
    .collect();
    let got: Vec<f64> = reward_rows
        .iter()
        .map(|r| r["reward"].as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
    }
    let mean = task(&r, "reward")["metrics"]["reward_mean"]
        .as_f64()
        .unwrap();
    assert!((mean - got.iter().sum::<f64>() / 3.0).abs() < 1e-9);

    // Judge: a judge that always picks the first answer gives each model one win per prompt,
    // so the win rate is exactly 0.5 and the two orders never agree.
    let j = &task(&r, "judge")["metrics"];
    assert_eq!(j["win_rate"], 0.5, "{j}");
    assert_eq!(
        (j["wins"].as_u64(), j["losses"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(j["position_consistency"], 0.0);
    let asked: Vec<Value> = requests
        .try_iter()
        .map(|b| serde_json::from_str(&b).unwrap())
        .collect();
    assert_eq!(asked.len(), 6, "both orders of 3 prompts");
    assert!(asked.iter().all(|b| b["model"] == "judge-1"));
    let judge_rows: Vec<&Value> = rows.iter().filter(|r| r["task"] == "judge").collect();
    for row in judge_rows {
        let (ours, theirs) = (
            row["model_answer"].as_str().unwrap(),
            row["against_answer"].as_str().unwrap(),
        );
        let first = asked.iter().find(|b| {
            let text = b["messages"][1]["content"].as_str().unwrap();
            text.contains(row["prompt"].as_str().unwrap())
                && text
                    .find(&format!("Assistant A's Answer]\n{ours}\n"))
                    .is_some()
                && text
                    .find(&format!("Assistant B's Answer]\n{theirs}\n"))
                    .is_some()
        });
        assert!(
            first.is_some(),
            "the model's answer is shown first once: {row}"
        );
    }
}

#[test]
fn a_recipes_eval_tasks_are_logged_and_match_burnish_eval_on_the_saved_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mc = dir.join("mc.jsonl");
    write_lines(
        &mc,
        &[
            json!({"question": "Who are you?", "choices": ["I am Vicuna, a language model.", "A cat."], "answer": 0}),
            json!({"question": "What can you do?", "choices": ["Nothing at all.", "I can answer questions."], "answer": 1}),
        ],
    );
    let p = |s: &str| dir.join(s).display().to_string();
    let task = format!("choice:{}", mc.display());
    let sets = [
        format!("model.path=\"{}\"", p("model")),
        format!("data.cache_dir=\"{}\"", p("cache")),
        format!("train.output_dir=\"{}\"", p("run")),
        "train.max_steps=4".into(),
        "train.eval_steps=2".into(),
        "train.sample_prompts=[]".into(),
        format!("eval.tasks=[\"{task}\"]"),
    ];
    let mut args = vec!["train", "--recipe", "recipes/quickstart.toml"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    ok(&args);
    let records = read_rows(&dir.join("run/metrics.jsonl"));
    let logged: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_choice_acc")?.as_f64()?)))
        .collect();
    assert_eq!(
        logged.iter().map(|x| x.0).collect::<Vec<_>>(),
        [0, 2, 4],
        "{records:?}"
    );
    let last = records.last().unwrap();
    let out = dir.join("res.json");
    let r = eval(&dir.join("run"), &out, &[task], &[]);
    let m = &task_metrics(&r, "choice");
    for k in ["acc", "acc_norm"] {
        assert_eq!(last[format!("eval_choice_{k}")], m[k], "{k}");
    }
}

fn task_metrics(results: &Value, name: &str) -> Value {
    task(results, name)["metrics"].clone()
}

/// `scripts/parity/make_eval_fixtures.py`: transformers' log-likelihoods of each choice and
/// lm-evaluation-harness's acc / acc_norm on the committed task, for the seeded tiny model
/// the script and this test both write with `new-model`.
#[test]
fn multiple_choice_matches_transformers_and_lm_eval_formulas() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = read_json(&common::root().join("tests/fixtures/eval/expected.json"));
    let seed = expected["model"]["seed"].as_u64().unwrap();
    let model = new_tiny_model(&tmp.path().join("tiny"), seed);
    let out = tmp.path().join("res.json");
    let task = format!(
        "choice:{}",
        common::root()
            .join("tests/fixtures/eval/mc.jsonl")
            .display()
    );
    let r = eval(&model, &out, &[task], &["--batch-size", "3"]);
    let m = task_metrics(&r, "choice");
    assert_eq!(m["acc"], expected["acc"]);
    assert_eq!(m["acc_norm"], expected["acc_norm"]);
    let rows = read_rows(&tmp.path().join("res.rows.jsonl"));
    let want = expected["logprobs"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    for (row, want) in rows.iter().zip(want) {
        for (g, w) in row["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want.as_array().unwrap())
        {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-4, "{g} vs transformers {w}");
        }
    }
}
