// The CUDA kernels' registration, in its own host-compiled translation unit: the kernel sources stay free
// of torch/library.h, and the CPU emulator (emulate/module.cpp) binds the same host functions instead.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(rla_ext, CUDA, m) {
  m.impl("concat_conv_bn_act_kernel_fwd", &rla_ext::cuda::concat_conv_bn_act_fwd_cuda);
  m.impl("concat_conv_bn_act_kernel_bwd", &rla_ext::cuda::concat_conv_bn_act_bwd_cuda);
  m.impl("concat_conv3x3_bn_act_kernel_fwd", &rla_ext::cuda::concat_conv3x3_bn_act_fwd_cuda);
  m.impl("concat_conv3x3_bn_act_kernel_bwd", &rla_ext::cuda::concat_conv3x3_bn_act_bwd_cuda);
  m.impl("rla_update_kernel_fwd", &rla_ext::cuda::rla_update_fwd_cuda);
  m.impl("rla_update_kernel_bwd", &rla_ext::cuda::rla_update_bwd_cuda);
  m.impl("rla_update_and_entry_kernel_fwd", &rla_ext::cuda::rla_update_and_entry_fwd_cuda);
  m.impl("rla_update_and_entry_kernel_bwd", &rla_ext::cuda::rla_update_and_entry_bwd_cuda);
}
