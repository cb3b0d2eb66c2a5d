#!/usr/bin/env python3
"""NF4 reference: bitsandbytes (0.50, CPU) quantises fixed tensors to 4-bit NormalFloat with
block-wise absmax, with and without double quantisation of the absmax constants
(`compress_statistics=True`: offset = mean(absmax), then 8-bit dynamic-map blockwise
quantisation with block 256), and dequantises them again.

Writes tests/fixtures/quant/nf4.json (codes as 0..15 per value, HF order, i.e. the unpacked
nibbles, high nibble first as bitsandbytes packs them), checked by models/tests/nf4_parity.rs.

The nested 8-bit codes follow bitsandbytes' pure-PyTorch kernel
(bitsandbytes/backends/default/ops.py `quantize_blockwise`: nearest code by midpoints, the
rule of its 4-bit kernels too). Its compiled CPU kernel (csrc/cpu_ops.cpp, BinSearch) picks
the farther neighbour at rare near-ties (1 of 264 constants below, 7e-6 apart in distance);
the script counts those and dequantises with the reference codes.
    pip install torch bitsandbytes
    python3 scripts/parity/nf4_reference.py
"""
import json
import pathlib

import torch
import bitsandbytes.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
torch.manual_seed(1234)



def absmax_of(w, block):
    flat = w.reshape(-1).float()
    return torch.stack([flat[i : i + block].abs().max() for i in range(0, flat.numel(), block)])


def reference_blockwise_codes(a, code, absmax2, block):
    """bitsandbytes/backends/default/ops.py quantize_blockwise, with the given absmax."""
    out = []
    for b, i in enumerate(range(0, a.numel(), block)):
        scaled = torch.clamp(a[i : i + block] * (1.0 / absmax2[b].clamp(min=1e-38)), -1, 1)
        out.append(torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8))
    return torch.cat(out)


cases = []
# (name, shape, block size, double quant): the last shapes leave a partial block and an odd
# number of values; one row of zeros checks the zero-block rule; the large case gives the
# nested statistics more than one 256-block.
specs = [
    ("randn_8x192_b64", (8, 192), 64, False),
    ("randn_8x192_b64_dq", (8, 192), 64, True),
    ("randn_33x65_b64_dq", (33, 65), 64, True),
    ("heavy_tail_16x128_b128", (16, 128), 128, False),
    ("randn_24x704_b64_dq", (24, 704), 64, True),
]
for name, shape, block, dq in specs:
    w = torch.randn(*shape)
    if name.startswith("heavy_tail"):
        w = w ** 3
        w[3] = 0.0
    q, st = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=dq)
    if dq:
        # Re-quantise the centred absmax with the pure-PyTorch reference rule.
        centred = absmax_of(w, block) - st.offset
        ref_codes = reference_blockwise_codes(centred, st.state2.code, st.state2.absmax, 256)
        near_ties = int((ref_codes != st.absmax).sum())
        assert near_ties <= 2, near_ties
        st.absmax = ref_codes
    packed = q.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: w.numel()]
    deq = F.dequantize_4bit(q, st)
    case = {
        "name": name,
        "shape": list(shape),
        "block_size": block,
        "double_quant": dq,
        "input": w.reshape(-1).tolist(),
        "codes": codes.tolist(),
        "dequantized": deq.reshape(-1).tolist(),
    }
    if dq:
        case["absmax_codes"] = st.absmax.reshape(-1).tolist()
        case["absmax2"] = st.state2.absmax.reshape(-1).tolist()
        case["offset"] = float(st.offset)
        case["cpu_kernel_near_ties"] = near_ties
        case["absmax_dequantized"] = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).tolist()
    else:
        case["absmax"] = st.absmax.reshape(-1).tolist()
    cases.append(case)

out = {
    "source": "bitsandbytes %s functional.quantize_4bit / dequantize_4bit on CPU" % __import__("bitsandbytes").__version__,
    "nf4_code": F.get_4bit_type("nf4", device="cpu").tolist(),
    "dynamic_map": F.create_dynamic_map(signed=True).tolist(),
    "cases": cases,
}
path = ROOT / "tests/fixtures/quant/nf4.json"
path.write_text(json.dumps(out) + "\n")
print("wrote", path, [(c["name"], len(c["input"])) for c in cases])
