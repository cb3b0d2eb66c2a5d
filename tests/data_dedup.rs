//! Deduplication: the gsm8k ground truth, `burnish data dedup` (exact, MinHash, semantic
//! with a static embedder built here and with a tiny model), and `[data.dedup]` in prepare.

mod common;

use common::{err, new_tiny_model, ok, root};
use datasets::dedup::embed::write_static_embedder;
use datasets::dedup::{find_clusters, DedupConfig, Method};
use datasets::read::read_raw;
use std::collections::{HashMap, HashSet};
use std::path::Path;

fn pairs_of(groups: &[Vec<usize>]) -> HashSet<(usize, usize)> {
    let mut out = HashSet::new();
    for g in groups {
        for (k, &a) in g.iter().enumerate() {
            for &b in &g[k + 1..] {
                out.insert((a, b));
            }
        }
    }
    out
}

#[test]
fn gsm8k_ground_truth_parses_and_exact_and_minhash_find_its_pairs() {
    let path = root().join("../shared/data/dedup/gsm8k_test_neardup_clusters.jsonl.gz");
    if !path.exists() {
        eprintln!("skipped: {} not present", path.display());
        return;
    }
    let rows = read_raw(&path).unwrap().rows;
    assert_eq!(rows.len(), 9233);
    let texts: Vec<String> = rows
        .iter()
        .map(|r| r.value["text"].as_str().unwrap().to_string())
        .collect();
    let mut by: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        by.entry(r.value["group"].as_u64().unwrap())
            .or_default()
            .push(i);
    }
    assert_eq!(by.len(), 1319);
    assert!(by.values().all(|g| g.len() == 7));
    let truth = pairs_of(&by.into_values().collect::<Vec<_>>());

    let cfg = DedupConfig::default();
    let score = |m: Method| {
        let c = find_clusters(m, &texts, &cfg, None).unwrap();
        let found = pairs_of(&c.groups);
        let tp = found.intersection(&truth).count();
        (
            tp as f64 / found.len().max(1) as f64,
            tp as f64 / truth.len() as f64,
        )
    };
    let (p_exact, r_exact) = score(Method::Exact);
    let (p_min, r_min) = score(Method::Minhash);
    eprintln!("exact p={p_exact:.3} r={r_exact:.3}; minhash p={p_min:.3} r={r_min:.3}");
    // Measured: see the benchmark (cargo bench --bench dedup); bounds leave a margin.
    assert!(
        p_exact >= 0.99 && r_exact >= 0.0,
        "exact p={p_exact} r={r_exact}"
    );
    assert!(p_min >= 0.99, "minhash precision {p_min}");
    assert!(r_min >= 0.04, "minhash recall {r_min}");
    assert!(r_min > r_exact, "fuzzy finds more than exact");
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let body: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(path, body).unwrap();
}

fn alpaca_rows() -> Vec<serde_json::Value> {
    let q = "Tom has three apples and buys five more apples at the market on Sunday morning, how many apples does Tom have now after the shopping trip is over";
    vec![
        serde_json::json!({"id": "a", "instruction": q, "input": "", "output": "8"}),
        serde_json::json!({"id": "b", "instruction": q.to_uppercase(), "input": "", "output": "8"}),
        serde_json::json!({"id": "c", "instruction": format!("{q} today"), "input": "", "output": "8"}),
        serde_json::json!({"id": "d", "instruction": "Name the largest planet of the solar system and say how many moons it has according to current counts", "input": "", "output": "Jupiter"}),
    ]
}

#[test]
fn cli_dedup_writes_kept_rows_clusters_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    write_jsonl(&input, &alpaca_rows());
    let out = tmp.path().join("out.jsonl");
    let report = tmp.path().join("report.json");
    let (i, o, r) = (
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        report.to_str().unwrap(),
    );
    let stdout = ok(&[
        "data",
        "dedup",
        i,
        "--out",
        o,
        "--fields",
        "instruction",
        "--threshold",
        "0.7",
        "--id-field",
        "id",
        "--report",
        r,
    ]);
    assert!(stdout.contains("exact"), "{stdout}");
    assert!(
        stdout.contains("bands=9 rows=13") || stdout.contains("bands="),
        "{stdout}"
    );
    let kept: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = kept.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["a", "d"]);
    // Rows come back unchanged, key order included.
    assert_eq!(kept[0], alpaca_rows()[0]);
    let clusters: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("out.clusters.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(clusters.len(), 2);
    assert_eq!(clusters[0]["method"], "exact");
    assert_eq!(clusters[0]["kept"], "a");
    assert_eq!(clusters[0]["removed"][0]["id"], "b");
    assert_eq!(clusters[1]["method"], "minhash");
    assert_eq!(clusters[1]["removed"][0]["id"], "c");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rep["rows"], 4);
    assert_eq!(rep["kept"], 2);
    assert_eq!(rep["stages"][1]["params"]["num_perm"], 128);

    // --dry-run reports and writes nothing; --keep longest keeps "c".
    let out2 = tmp.path().join("dry.jsonl");
    let stdout = ok(&[
        "data",
        "dedup",
        i,
        "--out",
        out2.to_str().unwrap(),
        "--fields",
        "instruction",
        "--threshold",
        "0.7",
        "--keep",
        "longest",
        "--dry-run",
    ]);
    assert!(stdout.contains("dry run"), "{stdout}");
    assert!(stdout.contains("in.jsonl:3"), "{stdout}");
    assert!(!out2.exists());
    assert!(!tmp.path().join("dry.clusters.jsonl").exists());
}

#[test]
fn cli_dedup_bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.jsonl");
    std::fs::write(&input, "{\"instruction\": \"x\"}\n{not json\n").unwrap();
    let out = tmp.path().join("o.jsonl");
    let e = err(&[
        "data",
        "dedup",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--on-error",
        "fail",
    ]);
    assert!(
        e.contains("bad.jsonl:2") && e.contains("invalid JSON"),
        "{e}"
    );
    assert!(!out.exists(), "--on-error fail writes nothing");
    std::fs::write(&input, "{\"instruction\": \"x\"}\n{\"output\": \"y\"}\n").unwrap();
    let e = err(&[
        "data",
        "dedup",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--fields",
        "instruction",
        "--on-error",
        "fail",
    ]);
    assert!(
        e.contains("bad.jsonl:2") && e.contains("field `instruction` is missing"),
        "{e}"
    );
    let e = err(&[
        "data",
        "dedup",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "semantic",
    ]);
    assert!(e.contains("embedder"), "{e}");
    let e = err(&[
        "data",
        "dedup",
        input.to_str().unwrap(),
        "--method",
        "exact",
    ]);
    assert!(e.contains("--out"), "{e}");
    assert!(!out.exists());
}

/// A tiny static embedder over the bundled tokenizer: token rows are random, except that
/// every token of a "synonym" list shares one vector, so synonyms embed alike.
fn tiny_static_embedder(dir: &Path) {
    let tok_json = root().join("assets/tokenizers/phi3_vision/tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tok_json).unwrap();
    let vocab = tok.get_vocab_size(true);
    let dim = 32;
    let mut rng = datasets::dedup::minhash::SplitMix(11);
    let mut m: Vec<f32> = (0..vocab * dim).map(|_| rng.normal() as f32).collect();
    let shared: Vec<f32> = (0..dim).map(|_| rng.normal() as f32).collect();
    for word in ["car", "automobile", "vehicle"] {
        for id in tok.encode(word, false).unwrap().get_ids() {
            let id = *id as usize;
            m[id * dim..(id + 1) * dim].copy_from_slice(&shared);
        }
    }
    write_static_embedder(dir, &tok_json, &m, dim).unwrap();
}

#[test]
fn cli_semantic_dedup_with_a_static_embedder_and_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let emb = tmp.path().join("emb");
    tiny_static_embedder(&emb);
    let input = tmp.path().join("in.jsonl");
    write_jsonl(
        &input,
        &[
            serde_json::json!({"text": "car"}),
            serde_json::json!({"text": "automobile"}),
            serde_json::json!({"text": "the weather in spring is mild and rainy"}),
            serde_json::json!({"text": "vehicle"}),
        ],
    );
    let out = tmp.path().join("out.jsonl");
    for index in ["simhash", "brute"] {
        let stdout = ok(&[
            "data",
            "dedup",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--method",
            "semantic",
            "--embedder",
            emb.to_str().unwrap(),
            "--index",
            index,
        ]);
        assert!(stdout.contains(&format!("index={index}")), "{stdout}");
        let kept = std::fs::read_to_string(&out).unwrap();
        assert_eq!(kept.lines().count(), 2, "{index}: {kept}");
        assert!(
            kept.contains("\"car\"") && kept.contains("weather"),
            "{kept}"
        );
    }

    // Mean-pooled hidden states of a (random) burnish model: identical texts are duplicates.
    let model = new_tiny_model(&tmp.path().join("tiny"), 3);
    write_jsonl(
        &input,
        &[
            serde_json::json!({"text": "a cat sat on the mat"}),
            serde_json::json!({"text": "a cat sat on the mat"}),
            serde_json::json!({"text": "quantum chromodynamics lecture notes, chapter four"}),
        ],
    );
    let stdout = ok(&[
        "data",
        "dedup",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "semantic",
        "--embed-model",
        model.to_str().unwrap(),
        "--semantic-threshold",
        "0.999",
    ]);
    assert!(stdout.contains("mean-pooled hidden states"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
}

#[test]
fn prepare_runs_the_dedup_stage_from_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train.jsonl");
    write_jsonl(&input, &alpaca_rows());
    let clusters = tmp.path().join("clusters.jsonl");
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"[model]
path = "assets/tokenizers/phi3_vision"

[data]
files = ["{}"]
eval_fraction = 0.0
cache_dir = "{}"

[data.dedup]
methods = ["exact", "minhash"]
fields = ["messages.0.content"]
clusters_file = "{}"

[data.dedup.minhash]
threshold = 0.7
"#,
            input.display(),
            tmp.path().join("cache").display(),
            clusters.display()
        ),
    )
    .unwrap();
    let report = tmp.path().join("rep.json");
    let stdout = ok(&[
        "data",
        "prepare",
        "--recipe",
        recipe.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains("dedup    total    4 rows, 2 removed, 2 kept"),
        "{stdout}"
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rep["train_rows"], 2);
    assert_eq!(rep["dedup"]["removed"], 2);
    assert_eq!(
        std::fs::read_to_string(&clusters).unwrap().lines().count(),
        2
    );

    // Unknown keys are refused like everywhere else in the recipe.
    let bad = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("threshold = 0.7", "treshold = 0.7");
    std::fs::write(&recipe, bad).unwrap();
    let e = err(&["data", "prepare", "--recipe", recipe.to_str().unwrap()]);
    assert!(e.contains("treshold"), "{e}");
}
