"""How long OSFT's start-up SVDs take per matrix kind, and how accurate each method's frozen
subspace is (issue #27: 176 s for the 224 matrices of the 8B shape with torch.linalg.svd).

    python3 tools/gpu/svd_startup.py            # one H200

For a random bfloat16 matrix of each Llama-3.1-8B kind, each method gives the top-k right
singular vectors V_hi (k = 0.75 rank); its split error, with U_hi = W V_hi orthonormalised, is
|U_hi^T W V_lo| / |W| (0 for an exact split), and the angle
to the first method's subspace, |V_ref_lo^T V_hi|_2 (0 when both split the same way).
"""

from __future__ import annotations

import time

import torch


def svd_default(w):
    _, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return s.double(), vh.T.double()


def svd_driver(name):
    def run(w):
        _, s, vh = torch.linalg.svd(w.float(), full_matrices=False, driver=name)
        return s.double(), vh.T.double()

    return run


def qr_then_svd(w):
    q, r = torch.linalg.qr(w.float())
    _, s, vh = torch.linalg.svd(r, full_matrices=False)
    return s.double(), vh.T.double()


def gram_eigh(dtype):
    def run(w):
        x = w.to(dtype)
        values, vectors = torch.linalg.eigh(x.T @ x)
        order = torch.argsort(values, descending=True)
        return values[order].clamp_min(0).sqrt().double(), vectors[:, order].double()

    return run


METHODS = {  # the first is the reference of the angles
    "gram + eigh (fp64)": gram_eigh(torch.float64),
    "svd default (fp32)": svd_default,
    "svd gesvdj (fp32)": svd_driver("gesvdj"),
    "svd gesvd (fp32)": svd_driver("gesvd"),
    "qr, then svd of R (fp32)": qr_then_svd,
    "gram + eigh (fp32)": gram_eigh(torch.float32),
}


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    shapes = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096),
              "gate/up 14336x4096": (14336, 4096)}  # fmt: skip
    print("| matrix | method | seconds | split error | angle to the first |")
    print("|---|---|---|---|---|")
    for label, (out, inn) in shapes.items():
        # a weight with a decaying spectrum, as trained ones have, in bfloat16
        w = torch.randn(out, inn, device=device)
        w = (w * torch.logspace(0, -1, inn, device=device)).to(torch.bfloat16)
        w = w.T.contiguous() if out < inn else w  # tall: V is the small side
        k = int(0.75 * min(out, inn))
        reference = None
        for name, method in METHODS.items():
            method(w[:256, :128])  # warm-up of the solver
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                s, v = method(w)
            except Exception as error:  # a driver this build lacks
                print(f"| {label} | {name} | failed: {type(error).__name__} | | |")
                continue
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            w64 = w.double()
            basis = torch.linalg.qr(v)[0]
            v_hi, v_lo = basis[:, :k], basis[:, k:]
            u_hi = torch.linalg.qr(w64 @ v_hi)[0]
            # an exact split maps the trainable directions away from the frozen ones
            error = float((u_hi.T @ w64 @ v_lo).norm() / w64.norm())
            reference = v_lo if reference is None else reference
            angle = f"{float(torch.linalg.matrix_norm(reference.T @ v_hi, 2)):.1e}"
            print(f"| {label} | {name} | {seconds:.3f} | {error:.1e} | {angle} |", flush=True)


if __name__ == "__main__":
    main()
