// bindings.cpp -- Python module prefopt._C (CPU row ops, segment sums, pair-loss table).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefopt C++ CPU kernels (row ops, segment sums); see docs/design.md";
  m.def("row_forward", &prefopt::cpu::row_forward, "log_softmax row statistics in one pass",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("temperature"), py::arg("want_entropy"), py::arg("want_sqsum"));
  m.def("row_backward", &prefopt::cpu::row_backward, "gradient wrt raw logits in one pass (out may alias logits)",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"),
        py::arg("temperature"), py::arg("out"));
  m.def("kept_blocks", &prefopt::cpu::kept_blocks, "blocks of a gradient tile holding a non-negligible entry",
        py::arg("grad"), py::arg("threshold"), py::arg("block_rows"), py::arg("block_cols"),
        py::arg("zero_skipped") = false);
  m.def("zero_blocks", &prefopt::cpu::zero_blocks, "zero the masked blocks of a gradient tile in place",
        py::arg("grad"), py::arg("mask"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("segment_forward", &prefopt::cpu::segment_forward, py::arg("values"), py::arg("weights"),
        py::arg("cu_seqlens"), py::arg("average"));
  m.def("segment_backward", &prefopt::cpu::segment_backward, py::arg("grad_out"), py::arg("weights"),
        py::arg("cu_seqlens"), py::arg("counts"), py::arg("average"), py::arg("N"));
  m.def("pair_loss_names", &prefopt::cpu::pair_loss_names, "loss names in id order (= prefopt.losses.table.ENTRIES)");
  m.def("pair_loss_forward", &prefopt::cpu::pair_loss_forward, "per-pair loss f(a[, b]) of table entry loss_id",
        py::arg("loss_id"), py::arg("a"), py::arg("b"), py::arg("params"));
  m.def("pair_loss_backward", &prefopt::cpu::pair_loss_backward,
        "(df/da, df/db | empty) of table entry loss_id, times grad_out when given", py::arg("loss_id"), py::arg("a"),
        py::arg("b"), py::arg("params"), py::arg("grad_out"));
  m.def("row_isa", &prefopt::cpu::row_isa, "ISA clone the row kernels use (default/avx2/avx512)");
}
