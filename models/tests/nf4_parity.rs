//! NF4 quantisation against bitsandbytes: `tests/fixtures/quant/nf4.json`, written by
//! `scripts/parity/nf4_reference.py` (bitsandbytes 0.50 on CPU).

use models::backend::Cpu;
use models::nf4::{dynamic_map, quantize, Absmax, Nf4Settings, Nf4Weight, NF4_CODE};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/quant/nf4.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn codes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn code_books_are_bitsandbytes_own() {
    let f = fixture();
    assert_eq!(NF4_CODE.to_vec(), floats(&f["nf4_code"]));
    assert_eq!(dynamic_map(), floats(&f["dynamic_map"]));
}

#[test]
fn quantise_and_dequantise_match_bitsandbytes() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let settings = Nf4Settings {
            block_size: case["block_size"].as_u64().unwrap() as usize,
            double_quant: case["double_quant"].as_bool().unwrap(),
        };
        let input = floats(&case["input"]);
        let q = quantize(&input, &settings);
        assert_eq!(q.codes, codes(&case["codes"]), "{name}: 4-bit codes");
        match &q.absmax {
            Absmax::Plain(a) => assert_eq!(*a, floats(&case["absmax"]), "{name}: absmax"),
            Absmax::Nested {
                codes: c,
                absmax2,
                offset,
            } => {
                assert_eq!(*c, codes(&case["absmax_codes"]), "{name}: nested codes");
                assert_eq!(*absmax2, floats(&case["absmax2"]), "{name}: absmax2");
                assert_eq!(*offset, case["offset"].as_f64().unwrap() as f32, "{name}");
                let want = floats(&case["absmax_dequantized"]);
                for (a, b) in q.absmax.values().iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{name}: {a} vs {b}"
                    );
                }
            }
        }
        // Host and device dequantisation both give bitsandbytes' values.
        let want = floats(&case["dequantized"]);
        let shape = case["shape"].as_array().unwrap();
        let (d_out, d_in) = (
            shape[0].as_u64().unwrap() as usize,
            shape[1].as_u64().unwrap() as usize,
        );
        let device = Nf4Weight::<Cpu>::from_host(&q, d_out, d_in, &Default::default());
        let on_device: Vec<f32> = device.dequantize().to_data().iter::<f32>().collect();
        for (got, label) in [(q.dequantize(), "host"), (on_device, "device")] {
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6, "{name} {label} [{i}]: {a} vs {b}");
            }
        }
    }
}
