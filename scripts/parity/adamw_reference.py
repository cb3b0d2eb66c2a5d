"""Reference values for trainers/src/optim.rs `adamw_matches_torch`: torch.optim.AdamW with
decay on the matrix and none on the vector, three steps. Prints Rust constants."""
import torch

w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
b = torch.tensor([0.25, -0.75], requires_grad=True)
c = torch.tensor([[0.3, -1.0], [2.0, 0.1]])
d = torch.tensor([-0.5, 4.0])
opt = torch.optim.AdamW(
    [{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}],
    lr=0.1, betas=(0.9, 0.99), eps=1e-8,
)
for step in range(3):
    opt.zero_grad()
    loss = (w * c * (step + 1)).sum() + ((b * d) ** 2).sum()
    loss.backward()
    opt.step()
fmt = lambda t: ", ".join(f"{x:.9}" for x in t.detach().flatten().tolist())
print(f"const REFERENCE_W: [f32; 4] = [{fmt(w)}];")
print(f"const REFERENCE_B: [f32; 2] = [{fmt(b)}];")
