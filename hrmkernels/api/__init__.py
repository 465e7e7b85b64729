"""The public API: a function and an nn.Module for each loss (hrm_loss: dense and top-k
teachers, vocabulary-parallel; linear_hrm_loss: from hidden states, dense and top-k teachers),
the producer of top-k and sampled teachers (teacher_topk), and the result type and denominator
of their reductions (reduction). Re-exported by hrmkernels/__init__.py."""
