//! `data prepare` throughput on the largest training file in ../shared/data
//! (hh-rlhf harmless-base, 1000 preference rows), and on an SFT file with packing.
//!
//! Run: `cargo bench --bench data_prepare`

use datasets::config::DataConfig;
use datasets::prepare::prepare;
use models::TextTokenizer;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/data");
    let tok = TextTokenizer::from_dir(&root.join("assets/tokenizers/phi3_vision")).unwrap();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("threads: {threads}");
    for (file, packing) in [
        ("hh_rlhf/harmless_base_test_first1000.jsonl", false),
        ("alpaca/llamafactory_alpaca_en_demo.json", true),
        ("bedrock/uber10k_prompt_completion.jsonl", true),
    ] {
        let path = shared.join(file);
        if !path.exists() {
            println!("{file}: missing (needs ../shared/data)");
            continue;
        }
        let cache = tempfile::tempdir().unwrap();
        let mut cfg = DataConfig::new(vec![path]);
        cfg.cache_dir = cache.path().to_path_buf();
        cfg.packing = packing;
        cfg.max_seq_len = 2048;
        let start = Instant::now();
        let p = prepare(&cfg, &tok).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let r = &p.report;
        let rows: usize = r.files.iter().map(|f| f.rows_read).sum();
        println!(
            "{file}: {rows} rows, {} tokens in {secs:.2}s -> {:.0} rows/s, {:.0} tokens/s{}",
            r.tokens,
            rows as f64 / secs,
            r.tokens as f64 / secs,
            r.packing
                .map(|s| format!(", packing efficiency {:.1}%", 100.0 * s.efficiency))
                .unwrap_or_default()
        );
        let start = Instant::now();
        let again = prepare(&cfg, &tok).unwrap();
        assert!(again.report.cache_hit);
        println!("  cached reload: {:.3}s", start.elapsed().as_secs_f64());
    }
}
