//! Dedup quality and speed on `../shared/data/dedup/gsm8k_test_neardup_clusters.jsonl.gz`
//! (1319 ground-truth groups of 7 near-duplicate GSM8K solutions, 9233 rows): precision,
//! recall and F1 of the pairs each method puts in one cluster, at its default threshold;
//! rows/s on the corpus and on a 10x corpus made here from perturbed copies; and, when
//! Python's `datasketch` is installed, its MinHash-LSH on the same corpus for comparison.
//!
//! Run: `cargo bench --bench dedup`

use datasets::dedup::embed::write_random_static_embedder;
use datasets::dedup::minhash::SplitMix;
use datasets::dedup::{find_clusters, DedupConfig, Embedder, Method, StaticEmbedder};
use datasets::read::read_raw;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn pairs_of(groups: &[Vec<usize>]) -> HashSet<(usize, usize)> {
    let mut out = HashSet::new();
    for g in groups {
        for (k, &a) in g.iter().enumerate() {
            for &b in &g[k + 1..] {
                out.insert((a.min(b), a.max(b)));
            }
        }
    }
    out
}

/// A copy with a few word-level edits: drops, duplicates and number changes.
fn perturb(text: &str, rng: &mut SplitMix) -> String {
    let mut words: Vec<String> = text.split(' ').map(String::from).collect();
    let edits = 1 + (rng.next() % 3) as usize;
    for _ in 0..edits {
        if words.len() < 3 {
            break;
        }
        let i = (rng.next() % words.len() as u64) as usize;
        match rng.next() % 3 {
            0 => {
                words.remove(i);
            }
            1 => {
                let w = words[i].clone();
                words.insert(i, w);
            }
            _ => {
                words[i] = format!("{}", rng.next() % 100);
            }
        }
    }
    words.join(" ")
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("../shared/data/dedup/gsm8k_test_neardup_clusters.jsonl.gz");
    if !corpus.exists() {
        println!("{}: missing (needs ../shared/data)", corpus.display());
        return;
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("threads: {threads}");
    let rows = read_raw(&corpus).unwrap().rows;
    let texts: Vec<String> = rows
        .iter()
        .map(|r| r.value["text"].as_str().unwrap().to_string())
        .collect();
    let groups: Vec<u64> = rows
        .iter()
        .map(|r| r.value["group"].as_u64().unwrap())
        .collect();
    let mut truth = HashSet::new();
    {
        let mut by: std::collections::HashMap<u64, Vec<usize>> = Default::default();
        for (i, g) in groups.iter().enumerate() {
            by.entry(*g).or_default().push(i);
        }
        let gs: Vec<Vec<usize>> = by.into_values().collect();
        truth.extend(pairs_of(&gs));
    }
    println!(
        "corpus: {} rows, {} ground-truth groups, {} true pairs",
        texts.len(),
        groups.iter().collect::<HashSet<_>>().len(),
        truth.len()
    );

    // The semantic stage needs an embedder; none is available offline, so the bench builds
    // a static one with a seeded random vector per token of the bundled tokenizer, scaled
    // by SIF weights from the corpus' token frequencies (mean pooling then measures
    // weighted token overlap). A trained model2vec folder can be passed with
    // BURNISH_BENCH_EMBEDDER=DIR.
    let tmp = tempfile::tempdir().unwrap();
    let emb_dir = match std::env::var("BURNISH_BENCH_EMBEDDER") {
        Ok(d) => PathBuf::from(d),
        Err(_) => {
            let d = tmp.path().join("static");
            write_random_static_embedder(
                &d,
                &root.join("assets/tokenizers/phi3_vision/tokenizer.json"),
                256,
                7,
                Some(&texts),
            )
            .unwrap();
            d
        }
    };
    let embedder = StaticEmbedder::load(&emb_dir).unwrap();
    let cfg = DedupConfig::default();

    let mut rng = SplitMix(2024);
    let mut big = Vec::with_capacity(texts.len() * 10);
    for t in &texts {
        big.push(t.clone());
        for _ in 0..9 {
            big.push(perturb(t, &mut rng));
        }
    }

    println!("\nmethod    threshold  pairs found  precision  recall    F1      rows/s (1x)  rows/s (10x, {} rows)", big.len());
    let mut minhash_secs = 0.0;
    for method in [Method::Exact, Method::Minhash, Method::Semantic] {
        let emb = (method == Method::Semantic).then_some(&embedder as &dyn Embedder);
        let t0 = Instant::now();
        let c = find_clusters(method, &texts, &cfg, emb).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        if method == Method::Minhash {
            minhash_secs = secs;
        }
        let found = pairs_of(&c.groups);
        let tp = found.intersection(&truth).count();
        let p = if found.is_empty() {
            1.0
        } else {
            tp as f64 / found.len() as f64
        };
        let r = tp as f64 / truth.len() as f64;
        let f1 = if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        };
        let t1 = Instant::now();
        let cb = find_clusters(method, &big, &cfg, emb).unwrap();
        let big_secs = t1.elapsed().as_secs_f64();
        let threshold = match method {
            Method::Exact => "equal".to_string(),
            Method::Minhash => format!("{}", cfg.minhash.threshold),
            Method::Semantic => format!("{}", cfg.semantic.threshold),
        };
        println!(
            "{:<9} {:<10} {:>11}  {:>9.3}  {:>6.3}  {:>6.3}  {:>11.0}  {:>11.0}",
            method.name(),
            threshold,
            found.len(),
            p,
            r,
            f1,
            texts.len() as f64 / secs,
            big.len() as f64 / big_secs
        );
        println!(
            "          params (1x): {}",
            serde_json::Value::Object(c.params)
        );
        if method == Method::Semantic {
            // How much of the exact (brute-force) answer the SimHash index finds.
            let mut brute = cfg.clone();
            brute.semantic.index = datasets::dedup::semantic::IndexKind::Brute;
            let t2 = Instant::now();
            let b = find_clusters(method, &texts, &brute, emb).unwrap();
            let bsecs = t2.elapsed().as_secs_f64();
            let exact_pairs = pairs_of(&b.groups);
            let bt = exact_pairs.intersection(&truth).count();
            println!(
                "          brute force (1x): {} pairs, precision {:.3}, recall {:.3}, {:.0} rows/s; index finds {:.1}% of its pairs",
                exact_pairs.len(),
                bt as f64 / exact_pairs.len().max(1) as f64,
                bt as f64 / truth.len() as f64,
                texts.len() as f64 / bsecs,
                100.0 * found.intersection(&exact_pairs).count() as f64 / exact_pairs.len().max(1) as f64
            );
        }
        if method == Method::Minhash {
            for t in [0.5, 0.3] {
                let mut low = cfg.clone();
                low.minhash.threshold = t;
                let l = find_clusters(method, &texts, &low, None).unwrap();
                let lf = pairs_of(&l.groups);
                let lt = lf.intersection(&truth).count();
                println!(
                    "          at threshold {t}: {} pairs, precision {:.3}, recall {:.3} (bands x rows {:?})",
                    lf.len(),
                    lt as f64 / lf.len().max(1) as f64,
                    lt as f64 / truth.len() as f64,
                    low.minhash.banding()
                );
            }
        }
        println!(
            "          10x: {} clusters, params: {}",
            cb.groups.len(),
            serde_json::Value::Object(cb.params)
        );
    }

    // datasketch, same shingles (lower-cased word 5-grams), num_perm 128, threshold 0.8.
    let has_ds = Command::new("python3")
        .args(["-c", "import datasketch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_ds {
        println!("\ndatasketch: not installed (pip install datasketch), comparison skipped");
        return;
    }
    let input = tmp.path().join("texts.json");
    std::fs::write(&input, serde_json::to_string(&texts).unwrap()).unwrap();
    let script = r#"
import json, re, sys, time
from datasketch import MinHash, MinHashLSH
texts = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
lsh = MinHashLSH(threshold=0.8, num_perm=128)
sigs = []
for i, t in enumerate(texts):
    words = [w for w in re.split(r'[^0-9A-Za-z]+', t.lower()) if w]
    sh = {' '.join(words[k:k+5]) for k in range(max(1, len(words) - 4))}
    m = MinHash(num_perm=128)
    m.update_batch([s.encode() for s in sh])
    lsh.insert(str(i), m)
    sigs.append(m)
pairs = 0
for i, m in enumerate(sigs):
    for j in lsh.query(m):
        j = int(j)
        if j > i and m.jaccard(sigs[j]) >= 0.8:
            pairs += 1
secs = time.perf_counter() - t0
print(json.dumps({"rows": len(texts), "seconds": secs, "verified_pairs": pairs}))
"#;
    let out = Command::new("python3")
        .args(["-c", script, input.to_str().unwrap()])
        .output()
        .unwrap();
    if !out.status.success() {
        println!(
            "\ndatasketch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let v: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .find(|l| l.starts_with(b"{"))
            .unwrap(),
    )
    .unwrap();
    let ds_secs = v["seconds"].as_f64().unwrap();
    println!(
        "\ndatasketch MinHashLSH (1x, single process): {:.2}s = {:.0} rows/s, {} verified pairs; burnish minhash {:.2}s = {:.0} rows/s -> {:.1}x faster",
        ds_secs,
        texts.len() as f64 / ds_secs,
        v["verified_pairs"],
        minhash_secs,
        texts.len() as f64 / minhash_secs,
        ds_secs / minhash_secs
    );
}
