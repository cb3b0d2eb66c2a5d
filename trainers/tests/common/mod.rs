//! What the trainers' integration tests share: the repository root and one tiny model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use models::backend::{Cpu, CpuTrain};
use models::presets::{write_new_model, NewModelSpec};
use models::weights::DiskDtype;
use models::CausalLm;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One tiny random-init model (bundled tokenizer, seed 1) shared by every test of a binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("tiny");
        write_new_model(&NewModelSpec {
            preset: "tiny",
            arch: "llama",
            tokenizer_dir: &root().join("assets/tokenizers/phi3_vision"),
            out: &out,
            seed: 1,
            chat_template: "chatml",
            dtype: DiskDtype::F32,
        })
        .unwrap();
        (tmp, out)
    })
    .1
}

/// The largest difference between two gradients of `model`'s trainable parameters, and the
/// largest gradient entry of `a`.
pub fn grad_diff(
    model: &CausalLm<CpuTrain>,
    a: &GradientsParams,
    b: &GradientsParams,
) -> (f32, f32) {
    struct Diff<'a> {
        a: &'a GradientsParams,
        b: &'a GradientsParams,
        diff: f32,
        max: f32,
        count: usize,
    }
    impl ModuleVisitor<CpuTrain> for Diff<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<CpuTrain, D>>) {
            let (Some(x), Some(y)) = (self.a.get::<Cpu, D>(p.id), self.b.get::<Cpu, D>(p.id))
            else {
                panic!("a trainable parameter has no gradient");
            };
            self.count += 1;
            self.diff = self.diff.max((x.clone() - y).abs().max().into_scalar());
            self.max = self.max.max(x.abs().max().into_scalar());
        }
    }
    let mut v = Diff {
        a,
        b,
        diff: 0.0,
        max: 0.0,
        count: 0,
    };
    model.visit(&mut v);
    assert!(v.count > 10);
    (v.diff, v.max)
}
