// CUDA kernels of the basic-block entry, concat_conv3x3_bn_act: act(batch_norm(conv3x3(cat(x, h), stride,
// padding 1))) without building cat(x, h). See docs/ARCHITECTURE.md for the contract.
//
// The design of the CPU kernel's segment route (csrc/cpu/concat_conv3x3_bn_act.cpp, which on the CPU
// takes one convolution over a transient cat(x, h) instead while that is at most 1 MiB: measured there,
// not on a GPU): the conv is two ATen (cuDNN) convolutions with the weight's column segments, x's [0, C)
// and h's [C, C + k), summed into one pre-BN output z; after it, the shared BatchNorm machinery of batchnorm.cuh, as op A uses it: batch statistics
// (one deterministic reduction), one normalise+activation pass forward; one fused activation+BatchNorm
// reduction and one elementwise pass backward, then cuDNN's convolution backward per segment.
#include <ATen/ATen.h>

#include "batchnorm.cuh"
#include "ops.h"

namespace rla_ext {
namespace cuda {
namespace {

// The statistics producer: reads the pre-BN tensor as it is stored.
template <typename T, bool CL, typename acc_t>
struct ReadPre {
  const T* __restrict__ v;
  int64_t C, HW;
  __device__ __forceinline__ void operator()(WelfordState<acc_t>& st, int64_t n, int64_t p, int64_t c) const {
    st.push(static_cast<acc_t>(v[act_offset<CL>(n, p, c, C, HW)]));
  }
};

int64_t out_side(int64_t side, int64_t stride) { return (side - 1) / stride + 1; }

void check_common(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
                  const at::Tensor& beta, int64_t stride, bool cl) {
  TORCH_CHECK(is_device_tensor(x), "x: expected a CUDA tensor");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, "x: expected a non-empty 4-D tensor, got ", x.sizes());
  check_format("x", x, cl);
  check_act("h", h, x, cl);
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(2) == x.size(2) && h.size(3) == x.size(3),
              "h: expected shape (N, k, H, W) matching x ", x.sizes(), ", got ", h.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) + h.size(1) && weight.size(2) == 3 &&
                  weight.size(3) == 3 && weight.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
                  weight.device() == x.device(),
              "weight: expected a contiguous (C_out, C + k, 3, 3) tensor of x's dtype and device, got ",
              weight.sizes());
  TORCH_CHECK(stride >= 1, "stride: expected a positive value, got ", stride);
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  check_stat_vector("gamma", gamma, weight.size(0), sd, x);
  check_stat_vector("beta", beta, weight.size(0), sd, x);
}

// The x and h column segments of the weight, each contiguous (cuDNN takes them as they are).
std::pair<at::Tensor, at::Tensor> segments(const at::Tensor& weight, int64_t C) {
  return {weight.narrow(1, 0, C).contiguous(), weight.narrow(1, C, weight.size(1) - C).contiguous()};
}

// (d input, d weight) of conv3x3(in, w, stride, padding 1) given dz, the input gradient in format `cl`.
std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& dz, const at::Tensor& in, const at::Tensor& w,
                                                int64_t stride, bool cl) {
  auto r = at::convolution_backward(dz, in, w, c10::nullopt, {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                    {true, true, false});
  return {std::get<0>(r).contiguous(format_of(cl)), std::get<1>(r)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv3x3_bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
    int64_t stride, double eps, bool relu) {
  const bool cl = is_channels_last(x);
  check_common(x, h, weight, gamma, beta, stride, cl);
  TORCH_CHECK(mean.has_value() == var.has_value(), "mean, var: give both or neither");
  const DeviceGuard guard(x.device());
  const int64_t Co = weight.size(0);
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  const bool training = !mean.has_value();
  if (!training) {
    check_stat_vector("mean", *mean, Co, sd, x);
    check_stat_vector("var", *var, Co, sd, x);
  }

  const auto [wx, wh] = segments(weight, x.size(1));
  at::Tensor z = at::conv2d(x, wx, c10::nullopt, stride, 1).contiguous(format_of(cl));
  z.add_(at::conv2d(h, wh, c10::nullopt, stride, 1));
  at::Tensor out = device_empty_like(z);
  at::Tensor mean_out, var_out, params;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_conv3x3_bn_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      const int64_t HW = z.size(2) * z.size(3);
      // z is already stored (the convolutions wrote it): the producer only reads it.
      ReadPre<scalar_t, CL, acc_t> prod{z.data_ptr<scalar_t>(), Co, HW};
      std::tie(mean_out, var_out, params) =
          batch_or_given_stats<CL, acc_t, false>(prod, z.size(0), Co, HW, mean, var, gamma, beta, eps);
      with_act(relu, [&](auto act) { launch_bn_act<scalar_t, CL, decltype(act)>(z, out, params); });
    });
  });
  return {out, z, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_conv3x3_bn_act_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, double eps, bool relu, bool training) {
  const bool cl = is_channels_last(x);
  check_common(x, h, weight, gamma, beta, stride, cl);
  const int64_t Co = weight.size(0);
  const int64_t Ho = out_side(x.size(2), stride), Wo = out_side(x.size(3), stride);
  const DeviceGuard guard(x.device());
  auto [dz, dgamma, dbeta] =
      entry_bn_act_backward(grad_out, z, x, mean, var, gamma, beta, Co, Ho, Wo, eps, relu, training, cl);

  const auto [wx, wh] = segments(weight, x.size(1));
  auto [dx, dwx] = conv_backward(dz, x, wx, stride, cl);
  auto [dh, dwh] = conv_backward(dz, h, wh, stride, cl);
  return {dx, dh, at::cat({dwx, dwh}, 1).contiguous(), dgamma, dbeta};
}

}  // namespace cuda
}  // namespace rla_ext
