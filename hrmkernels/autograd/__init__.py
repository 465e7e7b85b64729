"""The autograd Functions of every loss, between the public API and the kernels' launchers:
hrm_loss (dense and top-k teachers), linear_hrm_loss (from hidden states: chunked and fused),
vocab_parallel (logits sharded over the vocabulary)."""
