"""Golden forward, backward and merge of PEFT's DoRA (`LoraConfig(use_dora=True)`) on one Linear and
one Conv2d, for the Rust DoRA implementation. Writes tests/fixtures/golden/dora.safetensors (all F32).

    nice -n 19 /work/refenv/bin/python tools/reference/make_dora_golden.py

The model: `lin` = Linear(8 -> 6, bias) and `conv` = Conv2d(4 -> 5, kernel 3, padding 1, bias), seeded
weights, wrapped by `peft.get_peft_model` with LoraConfig(r=2, lora_alpha=4, target_modules=["lin",
"conv"], use_dora=True, init_lora_weights=True), so scaling s = alpha / r = 2. PEFT initializes A
(kaiming-uniform), B = 0 and the magnitude m from the base weight; the script then overwrites A and B
with seeded nonzero values and KEEPS m as initialized (m = ||W||, while the norm used in the forward
is now ||W + s B A|| != m, so the decomposition matters). The model is in training mode, lora_dropout
0. Loss = sum(out_lin * wl) + sum(out_conv * wc).

Tensors, per layer L in {lin, conv}:
  L.weight, L.bias              base weight and bias (lin [6, 8], [6]; conv [5, 4, 3, 3], [5])
  L.lora_A, L.lora_B            lin A [2, 8], B [6, 2]; conv A [2, 4, 3, 3], B [5, 2, 1, 1]
  L.magnitude                   PEFT's `lora_magnitude_vector.default.weight` as initialized, in
                                PEFT's own shape: lin [6], conv [1, 5, 1, 1] (see below)
  L.weight_norm                 ||W + s B A|| per output channel with the nonzero A, B (same shape as
                                magnitude): the denominator of the forward
  L.x, L.out, L.loss_weight     input (lin [3, 8], conv [2, 4, 5, 5]), PEFT's forward output, wl / wc
  L.grad.lora_A, L.grad.lora_B, L.grad.magnitude, L.grad.x   d loss / d ...
  L.merged_weight, L.merged_bias  the layer `merge_and_unload()` leaves (on a deep copy)
  loss                          [1]
Metadata: peft / torch versions, r, alpha, scaling, and PEFT's parameter names.

DoRA as PEFT 0.21.2 computes it (peft/tuners/lora/dora.py, variants.py, layer.py), with
s = lora_alpha / r (alpha / sqrt(r) with use_rslora), dW = s * B A (conv: B.view(out, r) @
A.view(r, -1), reshaped to W's shape, i.e. the 3x3 lives in A, B is 1x1):
  * weight norm. Linear: n = torch.linalg.norm(W + dW, dim=1), the L2 norm of each output ROW of the
    [out, in] weight (fan_in_fan_out False), shape [out]. Conv2d: n = (W + dW).norm(p=2, dim=(1, 2, 3),
    keepdim=True).transpose(1, 0): the L2 norm over in x kh x kw per output channel, shape
    [1, out, 1, 1]. The magnitude parameter has the same shape ([out] resp. [1, out, 1, 1]).
  * initialization: after A/B are initialized (B = 0), m = n computed with that A and B, i.e.
    m = ||W|| per output channel (with a nonzero-B init, e.g. PiSSA, it would be ||W + s B A||).
  * forward (train or eval, no dropout): result = base_layer(x) = W x + b, then
        n = norm(W + s B A).detach()          # DETACHED: no gradient flows through the norm (paper sec. 4.3;
                                              # dora.py: `weight_norm = weight_norm.detach()`, and the
                                              # lora weight is also passed in as lora_weight.detach())
        g = m / n                             # Linear: view(1, -1); conv: [1, out, 1, 1]
        base = result - b                     # bias removed from the base output (b viewed [1, out, 1, 1] for conv)
        result = result + (g - 1) * base + g * s * B(A(x))
    which equals g * (W x) + g * s * (B A x) + b: the bias is NOT scaled by g.
    Gradients: dL/dm = sum over batch/positions of dL/dy * (W x + s B A x) / n; A, B get gradient only
    through the g * s * B(A(x)) term (n treated as a constant).
  * with lora_dropout p > 0 in training mode: base = F.linear(drop(x), W) / conv(drop(x), W, bias=None)
    is recomputed from the DROPPED input and the LoRA branch uses drop(x) too, while `result` (W x + b)
    stays on the undropped x: result = W x + b + (g - 1) * W drop(x) + g * s * B A drop(x). In eval mode
    (or p = 0) the bias-subtraction path above is used.
  * merge (merge_and_unload): W' = (m / n) * (W + dW) with n = norm(W + dW) as above (m/n viewed
    [out, 1] for Linear, [out, 1, 1, 1] for conv); the bias is unchanged.
"""
import copy
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
R, ALPHA = 2, 4


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6, bias=True)
        self.conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=True)

    def forward(self, x_lin, x_conv):
        return self.lin(x_lin), self.conv(x_conv)


def main():
    import peft
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(20240602)
    base = Tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    torch.manual_seed(0)  # PEFT's kaiming init of A (overwritten below)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin", "conv"], use_dora=True, init_lora_weights=True)
    model = get_peft_model(base, cfg)
    model.train()
    s = ALPHA / R
    layers = {"lin": model.base_model.model.lin, "conv": model.base_model.model.conv}
    for layer in layers.values():
        assert float(layer.scaling["default"]) == s

    out = {}
    names = {}
    with torch.no_grad():
        for name, layer in layers.items():
            W = layer.base_layer.weight
            m = layer.lora_magnitude_vector["default"].weight
            # The magnitude PEFT initialized is ||W|| per output channel (B = 0 at init).
            ref = torch.linalg.norm(W.reshape(W.shape[0], -1), dim=1)
            assert torch.allclose(m.reshape(-1), ref, rtol=1e-6, atol=0), name
            out[f"{name}.weight"] = W.clone()
            out[f"{name}.bias"] = layer.base_layer.bias.clone()
            out[f"{name}.magnitude"] = m.clone()
            # Seeded nonzero A and B.
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=g) * 0.5)
            B.copy_(torch.randn(B.shape, generator=g) * 0.5)
            out[f"{name}.lora_A"] = A.clone()
            out[f"{name}.lora_B"] = B.clone()
            dW = s * (B.reshape(B.shape[0], R) @ A.reshape(R, -1)).reshape(W.shape)
            n = torch.linalg.norm((W + dW).reshape(W.shape[0], -1), dim=1)
            out[f"{name}.weight_norm"] = n.reshape(m.shape).clone()
            names[name] = {
                "lora_A": f"base_model.model.{name}.lora_A.default.weight",
                "lora_B": f"base_model.model.{name}.lora_B.default.weight",
                "magnitude": f"base_model.model.{name}.lora_magnitude_vector.default.weight",
            }
    pnames = dict(model.named_parameters())
    for nm in names.values():
        for v in nm.values():
            assert v in pnames and pnames[v].requires_grad, v

    x_lin = torch.randn(3, 8, generator=g).requires_grad_(True)
    x_conv = torch.randn(2, 4, 5, 5, generator=g).requires_grad_(True)
    y_lin, y_conv = model(x_lin, x_conv)
    wl = torch.randn(y_lin.shape, generator=g)
    wc = torch.randn(y_conv.shape, generator=g)
    loss = (y_lin * wl).sum() + (y_conv * wc).sum()
    loss.backward()
    for name, layer, x, y, w in (("lin", layers["lin"], x_lin, y_lin, wl), ("conv", layers["conv"], x_conv, y_conv, wc)):
        out[f"{name}.x"] = x.detach().clone()
        out[f"{name}.out"] = y.detach().clone()
        out[f"{name}.loss_weight"] = w.clone()
        out[f"{name}.grad.lora_A"] = layer.lora_A["default"].weight.grad.clone()
        out[f"{name}.grad.lora_B"] = layer.lora_B["default"].weight.grad.clone()
        out[f"{name}.grad.magnitude"] = layer.lora_magnitude_vector["default"].weight.grad.clone()
        out[f"{name}.grad.x"] = x.grad.clone()
    out["loss"] = loss.detach().reshape(1)

    # Merge on a copy.
    merged = copy.deepcopy(model).merge_and_unload()
    for name in layers:
        mod = getattr(merged, name)
        assert type(mod) in (torch.nn.Linear, torch.nn.Conv2d)
        out[f"{name}.merged_weight"] = mod.weight.detach().clone()
        out[f"{name}.merged_bias"] = mod.bias.detach().clone()

    check_formulas(out, s)
    for k, v in out.items():
        assert v.dtype == torch.float32, k
    path = os.path.join(ROOT, "tests/fixtures/golden/dora.safetensors")
    meta = {
        "peft": peft.__version__, "torch": torch.__version__, "r": str(R), "lora_alpha": str(ALPHA), "scaling": str(s),
        "config": "LoraConfig(r=2, lora_alpha=4, target_modules=['lin','conv'], use_dora=True, init_lora_weights=True), lora_dropout 0, train mode",
        "peft_names": repr(names),
        "magnitude_note": "magnitude as PEFT initialized it (||W|| per output channel); lin [6], conv [1,5,1,1] as PEFT stores it",
    }
    save_file({k: v.contiguous() for k, v in sorted(out.items())}, path, metadata=meta)
    os.chmod(path, 0o644)
    print(f"wrote {path} ({len(out)} tensors), loss {loss.item():.6f}")
    for k, v in sorted(out.items()):
        print(f"  {k} {list(v.shape)}")


def dora_manual(t, name, s, detach=True):
    """The docstring's DoRA forward for layer `name`, written out independently of PEFT: (output,
    norm, merged weight, {grad of lora_A, lora_B, magnitude, x} of sum(out * loss_weight))."""
    W, b, A, B, m = (t[f"{name}.{k}"].clone() for k in ("weight", "bias", "lora_A", "lora_B", "magnitude"))
    x, wt = t[f"{name}.x"].clone(), t[f"{name}.loss_weight"]
    for v in (A, B, m, x):
        v.requires_grad_(True)
    out_c = W.shape[0]
    dW = s * (B.reshape(out_c, R) @ A.reshape(R, -1)).reshape(W.shape)
    n = torch.linalg.norm((W + dW).reshape(out_c, -1), dim=1)
    if detach:
        n = n.detach()
    view = (1, -1) if name == "lin" else (1, -1, 1, 1)
    gsc = (m.reshape(-1) / n).reshape(view)
    if name == "lin":
        wx, lora = F.linear(x, W), F.linear(F.linear(x, A), B)
    else:
        wx, lora = F.conv2d(x, W, padding=1), F.conv2d(F.conv2d(x, A, padding=1), B)
    y = gsc * wx + gsc * s * lora + b.reshape(view)
    merged = (m.reshape(-1) / n).reshape((-1,) + (1,) * (W.dim() - 1)) * (W + dW)
    (y * wt).sum().backward()
    grads = {"lora_A": A.grad, "lora_B": B.grad, "magnitude": m.grad, "x": x.grad}
    return y.detach(), n.detach(), merged.detach(), grads


def check_formulas(t, s):
    """The docstring's DoRA formulas must reproduce PEFT's numbers."""
    tol = dict(rtol=1e-5, atol=1e-5)
    for name in ("lin", "conv"):
        y, n, merged, grads = dora_manual(t, name, s)
        assert torch.allclose(y, t[f"{name}.out"], **tol), name
        assert torch.allclose(n.reshape(t[f"{name}.weight_norm"].shape), t[f"{name}.weight_norm"], **tol), name
        assert torch.allclose(merged, t[f"{name}.merged_weight"], **tol), name
        assert torch.equal(t[f"{name}.bias"], t[f"{name}.merged_bias"]), name
        for k, v in grads.items():
            assert torch.allclose(v, t[f"{name}.grad.{k}"], **tol), (name, k, float((v - t[f"{name}.grad.{k}"]).abs().max()))
        # Without the detach of the norm the gradients of A and B differ: the golden pins the detach.
        _, _, _, undetached = dora_manual(t, name, s, detach=False)
        for k in ("lora_A", "lora_B", "magnitude"):
            diff = float((undetached[k] - t[f"{name}.grad.{k}"]).abs().max())
            assert diff > 1e-3 if k != "magnitude" else True, (name, k, diff)
            print(f"  {name}: max |grad {k} without detach - golden| = {diff:.4g}")
    # The merged layers reproduce the forward.
    y = F.linear(t["lin.x"], t["lin.merged_weight"], t["lin.merged_bias"])
    assert torch.allclose(y, t["lin.out"], **tol)
    y = F.conv2d(t["conv.x"], t["conv.merged_weight"], t["conv.merged_bias"], padding=1)
    assert torch.allclose(y, t["conv.out"], **tol)
    print("formula check: PEFT's output, norm, merge and gradients match the docstring's DoRA math")


if __name__ == "__main__":
    main()
