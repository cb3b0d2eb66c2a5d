//! What dedup did: counts per stage, and each cluster for audit (JSONL).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedRow {
    pub id: String,
    /// The highest similarity of this row to another member of its cluster (1 for exact).
    pub similarity: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub method: String,
    pub kept: String,
    pub removed: Vec<RemovedRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageReport {
    pub method: String,
    pub rows_in: usize,
    pub clusters: usize,
    pub removed: usize,
    pub rows_out: usize,
    /// Method parameters and search counts (threshold, num_perm, bands, rows, candidates...).
    pub params: serde_json::Map<String, serde_json::Value>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DedupReport {
    pub rows: usize,
    /// Rows whose compared fields hold no text: kept as they are, never clustered.
    #[serde(default)]
    pub no_text: usize,
    pub stages: Vec<StageReport>,
    pub kept: usize,
    pub removed: usize,
    pub seconds: f64,
}

impl DedupReport {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for st in &self.stages {
            let params: Vec<String> = st
                .params
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(x) => format!("{k}={x}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            s += &format!(
                "dedup    {:<8} {} rows -> {} clusters, {} removed, {} kept ({:.2}s) [{}]\n",
                st.method,
                st.rows_in,
                st.clusters,
                st.removed,
                st.rows_out,
                st.seconds,
                params.join(" ")
            );
        }
        if self.no_text > 0 {
            s += &format!(
                "dedup    {} rows with no text to compare: kept as they are, not clustered\n",
                self.no_text
            );
        }
        s += &format!(
            "dedup    total    {} rows, {} removed, {} kept\n",
            self.rows, self.removed, self.kept
        );
        s
    }
}
