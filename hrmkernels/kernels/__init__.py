"""The kernels of each backend and their launchers, below the autograd Functions.

    triton/    backend="triton": the dense loss (hrm_loss), top-k teachers (topk) and the
               fused linear loss (linear), as torch.library.triton_op custom ops
    pytorch    backend="torch": chunked pure PyTorch, any device
    native     the compiled extension built from csrc/ (backend="cuda")

Every launcher module exposes the same functions (hrm_loss_fwd, hrm_loss_bwd, and for top-k
teachers hrm_loss_topk_fwd, hrm_loss_topk_bwd); hrmkernels.backends chooses one. Nothing here
imports the layers above (autograd Functions, functional API, modules).
"""
