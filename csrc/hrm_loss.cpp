// The hrmkernels custom ops: their TORCH_LIBRARY schemas, which every build has (a CPU-only
// torch included). Each device registers its implementations in its own file:
//
//   cpu/hrm_loss_cpu.cpp     CPU: hrm_loss_fwd, hrm_loss_bwd, hrm_loss_fwd_bwd (one sweep a
//                            row), hrm_loss_scale_grad
//   cuda/hrm_loss_cuda.cpp   CUDA: hrm_loss_fwd, hrm_loss_bwd (built only with a CUDA toolkit and a
//                            CUDA torch)
//
//   hrm_loss_fwd      forward: loss, ce, div, entropy (N,) and the stats (N, 5) the backward needs
//   hrm_loss_bwd      backward: writes dz (and du) from the stats and the rows' gradients
//   hrm_loss_fwd_bwd  both at once, for gradients known up front (one sweep a row on CPU)
//   hrm_loss_scale_grad   dz (and du) *= grad, a 0-d tensor; nothing when it is exactly 1
//
// beta selects the divergence: 0 forward KL(p || q), 1 reverse KL(q || p), in between the
// generalised JSD_beta (csrc/hrm_loss_math.h). Python (hrmkernels/kernels/native.py) registers
// the fake (meta) implementations, so the ops work under torch.compile and torch.export; the
// autograd formula lives in hrmkernels/autograd/hrm_loss.py.
#include <Python.h>

#include <torch/library.h>

// `import hrmkernels._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(hrmkernels, m) {
  m.set_python_module("hrmkernels.kernels.native");   // where the fake (meta) implementations live
  m.def(
      "hrm_loss_fwd(Tensor z, Tensor u, Tensor labels, float hrm, float temperature, "
      "float label_smoothing, int ignore_index, float beta) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "hrm_loss_bwd(Tensor z, Tensor u, Tensor labels, Tensor stats, Tensor grad, "
      "float hrm, float temperature, float label_smoothing, int ignore_index, float beta, "
      "Tensor(a!) dz, Tensor(b!)? du) -> ()");
  m.def(
      "hrm_loss_fwd_bwd(Tensor z, Tensor u, Tensor labels, Tensor grad, float hrm, "
      "float temperature, float label_smoothing, int ignore_index, float beta, "
      "Tensor(a!) dz, Tensor(b!)? du) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hrm_loss_scale_grad(Tensor grad, Tensor(a!) dz, Tensor(b!)? du) -> ()");
}
