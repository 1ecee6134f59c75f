// The host functions of the CUDA kernels (schemas in csrc/ops.cpp, contract in docs/ARCHITECTURE.md).
// register.cpp binds them to the CUDA dispatch key; the CPU emulator (emulate/module.cpp) binds the same
// functions, compiled as host C++, to a Python module working on CPU tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace rla_ext {
namespace cuda {

// -> (out, z, mean, var)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv_bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    bool relu);

// -> (dx, dh, dweight, dgamma, dbeta)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv_bn_act_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, double eps, bool relu, bool training);

// -> (out, z, mean, var) of the basic-block entry (3x3 conv over cat(x, h), stride, padding 1)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv3x3_bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
    int64_t stride, double eps, bool relu);

// -> (dx, dh, dweight, dgamma, dbeta)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv3x3_bn_act_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, double eps, bool relu, bool training);

// -> (out, s, mean, var)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_update_fwd_cuda(
    const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
    const at::Tensor& rec_weight, bool pool, double eps);

// -> (dh, dy, dout_weight, drec_weight, dgamma, dbeta)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_update_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s,
    const at::Tensor& mean, const at::Tensor& var, bool pool, double eps, bool training);

// The block boundary (op C): rla_update then the 1x1 entry on (y, h_next), one GEMM over y each way.
// -> (h_next, s, mean, var, out, z, entry_mean, entry_var)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rla_update_and_entry_fwd_cuda(const at::Tensor& h, const at::Tensor& y, const at::Tensor& out_weight,
                              const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& var, const at::Tensor& rec_weight,
                              const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
                              const at::Tensor& entry_beta, const std::optional<at::Tensor>& entry_mean,
                              const std::optional<at::Tensor>& entry_var, bool pool, double eps, double entry_eps,
                              bool relu);

// -> (dh, dy, dout_weight, drec_weight, dgamma, dbeta, dentry_weight, dentry_gamma, dentry_beta)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rla_update_and_entry_bwd_cuda(const at::Tensor& grad_h_next, const at::Tensor& grad_out, const at::Tensor& h,
                              const at::Tensor& y, const at::Tensor& out_weight, const at::Tensor& gamma,
                              const at::Tensor& beta, const at::Tensor& rec_weight, const at::Tensor& s,
                              const at::Tensor& mean, const at::Tensor& var, const at::Tensor& h_next,
                              const at::Tensor& entry_weight, const at::Tensor& entry_gamma,
                              const at::Tensor& entry_beta, const at::Tensor& z, const at::Tensor& entry_mean,
                              const at::Tensor& entry_var, bool pool, double eps, double entry_eps, bool relu,
                              bool training);

}  // namespace cuda
}  // namespace rla_ext
