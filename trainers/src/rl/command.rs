//! The external-command reward: any verifier, without recompiling. The program reads one
//! JSON object per completion on stdin (`{"prompt", "completion", "answer"}`) and writes
//! one reward per line on stdout: a number, or `null` for no verdict.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One completion as reward functions see it.
#[derive(Debug, Clone)]
pub struct Scored<'a> {
    pub prompt_ids: &'a [u32],
    pub completion_ids: &'a [u32],
    pub prompt: &'a str,
    pub completion: &'a str,
    pub answer: Option<&'a str>,
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Run `argv` once over a batch of completions, killing it after `timeout_s`.
pub fn run_reward_command(
    argv: &[String],
    timeout_s: f64,
    items: &[Scored<'_>],
) -> Result<Vec<f64>> {
    let shown = argv.join(" ");
    let mut input = String::new();
    for s in items {
        let row = serde_json::json!({
            "prompt": s.prompt,
            "completion": s.completion,
            "answer": s.answer,
        });
        input.push_str(&row.to_string());
        input.push('\n');
    }
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("reward command `{shown}` could not start"))?;
    // Separate threads feed and drain the pipes: a program that writes before it has read
    // everything would otherwise deadlock against us.
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        // A program that exits without reading closes the pipe: that is its business, and
        // its exit status or output says what went wrong.
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let limit = Duration::from_secs_f64(timeout_s);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "reward command `{shown}` did not finish within {timeout_s} s for {} completions (killed); \
                 raise [[rewards]] timeout_s or make it faster",
                items.len()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "reward command `{shown}` failed ({status}); its last output:\n{}",
            tail(&err, 10)
        );
    }
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != items.len() {
        bail!(
            "reward command `{shown}` wrote {} reward lines for {} completions; it must write exactly one per input line",
            lines.len(),
            items.len()
        );
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let l = l.trim();
            if l == "null" {
                return Ok(f64::NAN);
            }
            l.parse::<f64>().ok().filter(|x| x.is_finite()).with_context(|| {
                format!(
                    "reward command `{shown}`: output line {} is `{l}`, expected a finite number or null",
                    i + 1
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Scored<'static>> {
        ["a", "bb", "ccc"]
            .iter()
            .map(|c| Scored {
                prompt_ids: &[],
                completion_ids: &[],
                prompt: "p",
                completion: c,
                answer: Some("1"),
            })
            .collect()
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn reads_one_reward_per_line_and_null_as_no_verdict() {
        // Reward = length of the JSON line, proving the program saw its input.
        let r = run_reward_command(
            &sh("while read -r l; do if [ ${#l} -gt 55 ]; then echo null; else echo ${#l}; fi; done"),
            10.0,
            &items(),
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[0] > 40.0 && r[1] == r[0] + 1.0, "{r:?}");
    }

    #[test]
    fn failures_timeouts_and_bad_output_are_explained() {
        let e = run_reward_command(&sh("echo boom >&2; exit 3"), 10.0, &items()).unwrap_err();
        assert!(
            e.to_string().contains("failed") && e.to_string().contains("boom"),
            "{e}"
        );
        let started = Instant::now();
        let e = run_reward_command(&sh("sleep 30"), 0.3, &items()).unwrap_err();
        assert!(e.to_string().contains("did not finish within 0.3 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let e = run_reward_command(&sh("cat >/dev/null; echo 1"), 10.0, &items()).unwrap_err();
        assert!(e.to_string().contains("1 reward lines for 3"), "{e}");
        let e = run_reward_command(&sh("cat >/dev/null; printf '1\\nx\\n2\\n'"), 10.0, &items())
            .unwrap_err();
        assert!(e.to_string().contains("line 2 is `x`"), "{e}");
        let e = run_reward_command(&["/no/such/verifier".into()], 10.0, &items()).unwrap_err();
        assert!(e.to_string().contains("could not start"), "{e}");
    }
}
