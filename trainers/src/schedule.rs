//! Learning-rate schedules with Hugging Face's formulas (`get_*_schedule_with_warmup`), so a
//! recipe ported from TRL/Axolotl gives the same lr at every step.

use crate::recipe::Schedule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: Schedule,
}

impl LrSchedule {
    /// Warmup steps: explicit, else `ratio` of the total (rounded up, as HF does).
    pub fn warmup_steps(steps: usize, ratio: f64, total: usize) -> usize {
        if steps > 0 {
            steps
        } else {
            (ratio * total as f64).ceil() as usize
        }
    }

    /// The lr of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let progress =
            (step - self.warmup) as f64 / self.total.saturating_sub(self.warmup).max(1) as f64;
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_schedules() {
        // transformers.get_{linear,cosine,constant}_schedule_with_warmup(warmup=2, total=10), lr=1.
        let s = |kind| LrSchedule {
            peak: 1.0,
            warmup: 2,
            total: 10,
            kind,
        };
        let linear: Vec<f64> = (0..10).map(|i| s(Schedule::Linear).lr(i)).collect();
        let expected = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (a, b) in linear.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{linear:?}");
        }
        let cosine: Vec<f64> = (0..10).map(|i| s(Schedule::Cosine).lr(i)).collect();
        let expected = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
        ];
        for (a, b) in cosine.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{cosine:?}");
        }
        assert_eq!(s(Schedule::Constant).lr(7), 1.0);
        assert_eq!(LrSchedule::warmup_steps(0, 0.1, 95), 10);
    }
}
