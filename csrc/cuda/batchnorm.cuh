// Shared device code for the CUDA kernels of both ops: activation addressing in either memory format,
// deterministic per-channel reductions (BatchNorm statistics and the BatchNorm/activation backward
// sums), the normalise+activation elementwise pass and the BatchNorm input-gradient pass.
//
// Determinism: a reduction never uses float atomics. Each block reduces a fixed chunk of rows for its
// channels in a fixed tree order and writes one partial per (chunk, channel); a tiny finalize kernel
// combines the partials of a channel in chunk order. The chunking depends only on the tensor shape,
// so the same inputs give bit-identical statistics on any GPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "device.cuh"

namespace rla_ext {
namespace cuda {

// ---------------------------------------------------------------------------------------------------
// Addressing. Activations are (N, C, H, W) and either NCHW-contiguous or NHWC (channels_last). A "row"
// m = n * HW + p is one pixel of one image; reductions run over rows for each channel.
// ---------------------------------------------------------------------------------------------------

template <bool CL>
__host__ __device__ __forceinline__ int64_t act_offset(int64_t n, int64_t p, int64_t c, int64_t C, int64_t HW) {
  return CL ? (n * HW + p) * C + c : (n * C + c) * HW + p;
}

// Channel of the flat element index i of an activation tensor.
template <bool CL>
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t HW) {
  return CL ? i % C : (i / HW) % C;
}

// Walks rows with a fixed stride without dividing by HW for every element (64-bit division is slow).
struct RowCursor {
  int64_t n, p;
  __device__ __forceinline__ RowCursor(int64_t m, int64_t HW) : n(m / HW), p(m % HW) {}
  __device__ __forceinline__ void advance(int64_t step, int64_t HW) {
    p += step;
    if (p >= HW) {
      n += p / HW;
      p %= HW;
    }
  }
};

// channels_last iff the primary tensor is NHWC-dense and not also NCHW-contiguous (the contract's rule).
inline bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_format(const char* name, const at::Tensor& t, bool cl) {
  TORCH_CHECK(t.is_contiguous(format_of(cl)), name, ": expected a ", cl ? "channels_last" : "contiguous",
              " tensor (the memory format of the primary input), got strides ", t.strides());
}

// (N, C, H, W) activation in format `cl`, like `like` (dtype, device).
inline at::Tensor empty_act(const at::Tensor& like, int64_t n, int64_t c, int64_t h, int64_t w, bool cl) {
  return device_empty({n, c, h, w}, like.options().memory_format(format_of(cl)));
}

// A channels_last (N, C, H, W) tensor seen as the (N*H*W, C) row-major matrix it is in memory.
// view, not reshape: GEMMs write through these, and a silent copy would lose the result.
inline at::Tensor rows_view(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// An NCHW-contiguous (N, C, H, W) tensor seen as (N, C, H*W).
inline at::Tensor planes_view(const at::Tensor& t) {
  return t.view({t.size(0), t.size(1), t.size(2) * t.size(3)});
}

template <typename F>
inline void with_layout(bool cl, F&& f) {
  if (cl) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for grid-stride elementwise loops: enough blocks to fill the GPU, no more.
inline unsigned elementwise_blocks(int64_t total, int threads) {
  const int64_t sms = multiprocessor_count();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, threads), sms * 32)));
}

// ---------------------------------------------------------------------------------------------------
// Activations applied after BatchNorm. grad<T>() takes the BatchNorm output (recomputed from the pre-BN
// value, never from the activation output) and the gradient at the activation output; T is the stored
// dtype of the activation output, whose rounding decides masks exactly as the forward's stored output.
// ---------------------------------------------------------------------------------------------------

// tanh(v) = sign(v) * (1 - e^{-2|v|}) / (1 + e^{-2|v|}), written with expm1 so small |v| keeps full
// relative precision and large |v| saturates at 1 without overflow (and without relying on how
// --use_fast_math treats tanhf).
__device__ __forceinline__ float stable_tanh(float v) {
  const float e = expm1f(-2.0f * fabsf(v));
  return copysignf(-e / (2.0f + e), v);
}
__device__ __forceinline__ double stable_tanh(double v) {
  const double e = expm1(-2.0 * fabs(v));
  return copysign(-e / (2.0 + e), v);
}

struct ActNone {
  template <typename A>
  __device__ static A f(A v) { return v; }
  template <typename T, typename A>
  __device__ static A grad(A /*bn*/, A g) { return g; }
};

struct ActRelu {
  // `v < 0 ? 0 : v` (not `v > 0 ? v : 0`) so a NaN propagates as in torch.relu.
  template <typename A>
  __device__ static A f(A v) { return v < A(0) ? A(0) : v; }
  // torch.relu's backward zeroes the gradient where the stored output is <= 0 and passes it everywhere
  // else, NaN included; the stored output is <= 0 exactly where the BatchNorm output rounds to <= 0.
  template <typename T, typename A>
  __device__ static A grad(A bn, A g) { return static_cast<A>(static_cast<T>(bn)) <= A(0) ? A(0) : g; }
};

struct ActTanh {
  template <typename A>
  __device__ static A f(A v) { return stable_tanh(v); }
  // 1 - a^2 as (1 - a)(1 + a): no cancellation when |a| is close to 1.
  template <typename T, typename A>
  __device__ static A grad(A bn, A g) {
    const A a = stable_tanh(bn);
    return g * (A(1) - a) * (A(1) + a);
  }
};

// ---------------------------------------------------------------------------------------------------
// BatchNorm parameters, precomputed once per channel so elementwise passes do no rsqrt:
//   params[0*C + c] = mean, [1*C + c] = rstd, [2*C + c] = gamma * rstd, [3*C + c] = beta.
// bn(v) = (v - mean) * scale + beta keeps the centring before the scaling (no mean*scale cancellation).
// ---------------------------------------------------------------------------------------------------

template <typename acc_t>
struct BnParams {
  const acc_t* p;
  int64_t C;
  __device__ __forceinline__ acc_t mean(int64_t c) const { return p[c]; }
  __device__ __forceinline__ acc_t rstd(int64_t c) const { return p[C + c]; }
  __device__ __forceinline__ acc_t scale(int64_t c) const { return p[2 * C + c]; }
  __device__ __forceinline__ acc_t beta(int64_t c) const { return p[3 * C + c]; }
  __device__ __forceinline__ acc_t xhat(acc_t v, int64_t c) const { return (v - mean(c)) * rstd(c); }
  __device__ __forceinline__ acc_t bn(acc_t v, int64_t c) const { return (v - mean(c)) * scale(c) + beta(c); }
};

// Forward (from the batch statistics) and backward (from the saved ones) both derive the parameters
// from the stat-dtype mean/var through this one function, so they agree bit for bit.
template <typename acc_t>
__device__ __forceinline__ void write_bn_params(acc_t* params, int64_t C, int64_t c, acc_t mean, acc_t var,
                                                acc_t gamma, acc_t beta, double eps) {
  const acc_t rstd = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  params[c] = mean;
  params[C + c] = rstd;
  params[2 * C + c] = gamma * rstd;
  params[3 * C + c] = beta;
}

template <typename acc_t>
__global__ void bn_params_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                 const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                 acc_t* __restrict__ params, int64_t C, double eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) write_bn_params(params, C, c, mean[c], var[c], gamma[c], beta[c], eps);
}

// params (4, C) in the stat dtype from given mean/var (eval forward, and every backward).
inline at::Tensor bn_params_from_stats(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
                                       const at::Tensor& beta, double eps) {
  const int64_t C = gamma.numel();
  at::Tensor params = device_empty({4, C}, gamma.options());
  const int threads = 128;
  AT_DISPATCH_FLOATING_TYPES(gamma.scalar_type(), "rla_ext_bn_params", [&] {
    launch<bn_params_kernel<scalar_t>>(static_cast<unsigned>(ceil_div(C, threads)), threads, 0,
                                       mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                       gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
                                       params.data_ptr<scalar_t>(), C, eps);
  });
  return params;
}

// ---------------------------------------------------------------------------------------------------
// Reduction states. Plain aggregates (no constructors) so they can live in __shared__ arrays.
// ---------------------------------------------------------------------------------------------------

// Welford (count, mean, M2): no E[x^2] - E[x]^2 cancellation.
template <typename A>
struct WelfordState {
  A count, mean, m2;
  static constexpr int kFields = 3;
  __host__ __device__ static WelfordState identity() { return {A(0), A(0), A(0)}; }
  __device__ __forceinline__ void push(A v) {
    count += A(1);
    const A d = v - mean;
    mean += d / count;
    m2 += d * (v - mean);
  }
  // Chan et al. pairwise combination; order-dependent in rounding, hence the fixed orders below.
  __device__ __forceinline__ static WelfordState combine(const WelfordState& a, const WelfordState& b) {
    const A n = a.count + b.count;
    if (n == A(0)) return a;
    const A d = b.mean - a.mean;
    const A wb = b.count / n;
    return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.count * wb};
  }
  template <typename B>
  __device__ __forceinline__ WelfordState<B> widen() const {
    return {static_cast<B>(count), static_cast<B>(mean), static_cast<B>(m2)};
  }
};

// Two plain sums: (sum g, sum g * xhat) for the BatchNorm backward.
template <typename A>
struct SumPairState {
  A a, b;
  static constexpr int kFields = 2;
  __host__ __device__ static SumPairState identity() { return {A(0), A(0)}; }
  __device__ __forceinline__ static SumPairState combine(const SumPairState& x, const SumPairState& y) {
    return {x.a + y.a, x.b + y.b};
  }
  template <typename B>
  __device__ __forceinline__ SumPairState<B> widen() const {
    return {static_cast<B>(a), static_cast<B>(b)};
  }
};

// ---------------------------------------------------------------------------------------------------
// Per-channel partial reduction. Block = TX channels x TY rows. NHWC uses 32 x 8 (a warp reads 32
// adjacent channels of one pixel); NCHW uses 1 x 256 (a warp reads 32 adjacent pixels of one plane).
// Block (bx, chunk) reduces rows [chunk * rows_per_chunk, ...) of channels [bx * TX, bx * TX + TX).
// `Producer::operator()(State&, n, p, c)` loads one element, may write one, and pushes into the state.
// ---------------------------------------------------------------------------------------------------

template <bool CL>
struct ReduceShape {
  static constexpr int TX = CL ? 32 : 1;
  static constexpr int TY = CL ? 8 : 256;
};

struct ReducePlan {
  int64_t chunks;
  int64_t rows_per_chunk;
  int64_t channel_blocks;
};

// Depends on shapes only (not on the GPU), which keeps the statistics reproducible across devices.
// M = 0 (an empty batch) gives one chunk of no rows: the finalize step still writes every channel.
template <bool CL>
inline ReducePlan make_reduce_plan(int64_t C, int64_t M) {
  using S = ReduceShape<CL>;
  constexpr int64_t kTargetBlocks = 1024;  // ~8 resident blocks on each of ~132 SMs
  constexpr int64_t kMinRowsPerThread = 4;
  constexpr int64_t kMaxChunks = 1024;
  ReducePlan plan;
  plan.channel_blocks = ceil_div(C, S::TX);
  int64_t chunks = ceil_div(kTargetBlocks, plan.channel_blocks);
  chunks = std::min(chunks, ceil_div(M, S::TY * kMinRowsPerThread));
  chunks = std::max<int64_t>(1, std::min(chunks, kMaxChunks));
  plan.rows_per_chunk = std::max<int64_t>(1, ceil_div(M, chunks));
  plan.chunks = std::max<int64_t>(1, ceil_div(M, plan.rows_per_chunk));
  return plan;
}

template <bool CL, typename State, typename Producer>
__global__ void channel_partials_kernel(Producer prod, State* __restrict__ partials, int64_t C, int64_t HW,
                                        int64_t M, int64_t rows_per_chunk) {
  constexpr int TX = ReduceShape<CL>::TX;
  constexpr int TY = ReduceShape<CL>::TY;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TX + tx;
  const int64_t chunk = blockIdx.y;
  const int64_t m0 = chunk * rows_per_chunk;
  const int64_t m1 = std::min(M, m0 + rows_per_chunk);

  State st = State::identity();
  if (c < C && m0 + ty < m1) {
    RowCursor cur(m0 + ty, HW);
    for (int64_t m = m0 + ty; m < m1; m += TY) {
      prod(st, cur.n, cur.p, c);
      cur.advance(TY, HW);
    }
  }

  RLA_SHARED(static, State, sh, [TY][TX]);
  sh[ty][tx] = st;
  __syncthreads();
#pragma unroll
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) sh[ty][tx] = State::combine(sh[ty][tx], sh[ty + s][tx]);
    __syncthreads();
  }
  if (ty == 0 && c < C) partials[chunk * C + c] = sh[0][tx];
}

// One block per channel combines that channel's partials: thread t takes chunks t, t + 256, ... in
// order, then a fixed shared-memory tree joins the threads, so the result does not depend on timing.
// Combination runs in double: the partial counts can exceed 2^24, where float stops counting exactly.
constexpr int kFinalizeThreads = 256;

template <typename State, typename Epilogue>
__global__ void channel_finalize_kernel(const State* __restrict__ partials, int64_t chunks, int64_t C,
                                        Epilogue epi) {
  using Wide = decltype(partials[0].template widen<double>());
  const int64_t c = blockIdx.x;
  const int tid = threadIdx.x;
  Wide acc = Wide::identity();
  for (int64_t j = tid; j < chunks; j += kFinalizeThreads) {
    acc = Wide::combine(acc, partials[j * C + c].template widen<double>());
  }
  RLA_SHARED(static, Wide, sh, [kFinalizeThreads]);
  sh[tid] = acc;
  __syncthreads();
#pragma unroll
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sh[tid] = Wide::combine(sh[tid], sh[tid + s]);
    __syncthreads();
  }
  if (tid == 0) epi(c, sh[0]);
}

// Runs partials + finalize. State is templated on its accumulator; `acc_opts` allocates the partials.
template <bool CL, template <typename> class StateT, typename acc_t, typename Producer, typename Epilogue>
inline void reduce_channels(const Producer& prod, const Epilogue& epi, int64_t C, int64_t HW, int64_t M,
                            const at::TensorOptions& acc_opts) {
  using State = StateT<acc_t>;
  static_assert(sizeof(State) == State::kFields * sizeof(acc_t), "state must be a packed array of acc_t");
  const ReducePlan plan = make_reduce_plan<CL>(C, M);
  TORCH_CHECK(C <= INT32_MAX, "rla_ext: too many channels for one reduction grid");
  at::Tensor partials = device_empty({plan.chunks, C, State::kFields}, acc_opts);
  State* part = reinterpret_cast<State*>(partials.data_ptr<acc_t>());
  const dim3 block(ReduceShape<CL>::TX, ReduceShape<CL>::TY);
  const dim3 grid(static_cast<unsigned>(plan.channel_blocks), static_cast<unsigned>(plan.chunks));
  launch<channel_partials_kernel<CL, State, Producer>>(grid, block, 0, prod, part, C, HW, M, plan.rows_per_chunk);
  launch<channel_finalize_kernel<State, Epilogue>>(static_cast<unsigned>(C), kFinalizeThreads, 0, part, plan.chunks,
                                                   C, epi);
}

// ---------------------------------------------------------------------------------------------------
// Producers and epilogues shared by both ops.
// ---------------------------------------------------------------------------------------------------

// Batch statistics -> mean, BIASED var (stat dtype) and the BatchNorm parameters. No values (an empty
// batch) give NaN, as torch's mean and var of an empty tensor do.
template <typename acc_t>
struct StatsEpilogue {
  acc_t* mean_out;
  acc_t* var_out;
  acc_t* params;
  const acc_t* gamma;
  const acc_t* beta;
  int64_t C;
  double eps;
  __device__ __forceinline__ void operator()(int64_t c, const WelfordState<double>& w) const {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const acc_t mean = static_cast<acc_t>(w.count > 0 ? w.mean : nan);
    const acc_t var = static_cast<acc_t>(w.count > 0 ? w.m2 / w.count : nan);
    mean_out[c] = mean;
    var_out[c] = var;
    write_bn_params(params, C, c, mean, var, gamma[c], beta[c], eps);
  }
};

// (sum g, sum g * xhat) where g is the gradient at the BatchNorm output: the gradient at the
// activation output times the activation derivative, recomputed from the pre-BN tensor.
template <typename T, bool CL, typename Act, typename acc_t>
struct BnBackwardProducer {
  const T* __restrict__ gact;  // gradient at the activation output
  const T* __restrict__ pre;   // pre-BN tensor (z or s)
  BnParams<acc_t> bp;
  int64_t C, HW;
  __device__ __forceinline__ void operator()(SumPairState<acc_t>& st, int64_t n, int64_t p, int64_t c) const {
    const int64_t off = act_offset<CL>(n, p, c, C, HW);
    const acc_t v = static_cast<acc_t>(pre[off]);
    const acc_t g = Act::template grad<T>(bp.bn(v, c), static_cast<acc_t>(gact[off]));
    st.a += g;
    st.b += g * bp.xhat(v, c);
  }
};

template <typename acc_t>
struct BnBackwardEpilogue {
  acc_t* dgamma;
  acc_t* dbeta;
  __device__ __forceinline__ void operator()(int64_t c, const SumPairState<double>& s) const {
    dbeta[c] = static_cast<acc_t>(s.a);
    dgamma[c] = static_cast<acc_t>(s.b);
  }
};

// ---------------------------------------------------------------------------------------------------
// Elementwise passes.
// ---------------------------------------------------------------------------------------------------

// fn.store(n, p, c, i) for every element i of an (N, C, H, W) activation in format CL.
template <bool CL, typename Fn>
__global__ void pointwise_kernel(Fn fn, int64_t total, int64_t C, int64_t HW) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    int64_t n, p, c;
    if (CL) {
      c = i % C;
      const int64_t m = i / C;
      n = m / HW;
      p = m - n * HW;
    } else {
      p = i % HW;
      const int64_t r = i / HW;
      c = r % C;
      n = r / C;
    }
    fn.store(n, p, c, i);
  }
}

template <bool CL, typename Fn>
inline void launch_pointwise(const Fn& fn, int64_t total, int64_t C, int64_t HW) {
  const int threads = 256;
  launch<pointwise_kernel<CL, Fn>>(elementwise_blocks(total, threads), threads, 0, fn, total, C, HW);
}

// The BatchNorm statistics of the values `prod` yields for an (N, C, H, W) activation (HW = H * W):
// training (no `mean`): one Welford reduction over them into a fresh mean, BIASED var and the (4, C)
// parameters; eval: copies of the given statistics (returned stats must not alias the inputs: the
// custom-op rule) and their parameters, with `prod` run as an elementwise pass first when it is what
// stores the values (`Stores`). -> (mean, var, params).
template <bool CL, typename acc_t, bool Stores, typename Producer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_or_given_stats(
    const Producer& prod, int64_t N, int64_t C, int64_t HW, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& var, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  if (!mean.has_value()) {
    at::Tensor mean_out = device_empty({C}, gamma.options());
    at::Tensor var_out = device_empty({C}, gamma.options());
    at::Tensor params = device_empty({4, C}, gamma.options());
    StatsEpilogue<acc_t> epi{mean_out.data_ptr<acc_t>(), var_out.data_ptr<acc_t>(), params.data_ptr<acc_t>(),
                             gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>(), C, eps};
    reduce_channels<CL, WelfordState, acc_t>(prod, epi, C, HW, N * HW, gamma.options());
    return {mean_out, var_out, params};
  }
  if constexpr (Stores) {
    launch_pointwise<CL>(prod, N * C * HW, C, HW);
  }
  at::Tensor mean_out = mean->clone();
  at::Tensor var_out = var->clone();
  return {mean_out, var_out, bn_params_from_stats(mean_out, var_out, gamma, beta, eps)};
}

// out = Act(bn(v)).
template <typename T, typename acc_t, bool CL, typename Act>
__global__ void bn_act_kernel(const T* __restrict__ v, T* __restrict__ out, BnParams<acc_t> bp, int64_t total,
                              int64_t C, int64_t HW) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t c = channel_of<CL>(i, C, HW);
    out[i] = static_cast<T>(Act::f(bp.bn(static_cast<acc_t>(v[i]), c)));
  }
}

// BatchNorm input gradient, with g recomputed as in BnBackwardProducer:
//   training: dv = gamma * rstd / M * (M * g - dbeta - xhat * dgamma)
//   eval:     dv = gamma * rstd * g
template <typename T, typename acc_t, bool CL, typename Act>
__global__ void bn_backward_elementwise_kernel(const T* __restrict__ gact, const T* __restrict__ pre,
                                               BnParams<acc_t> bp, const acc_t* __restrict__ dgamma,
                                               const acc_t* __restrict__ dbeta, T* __restrict__ dv, int64_t total,
                                               int64_t C, int64_t HW, acc_t inv_count, bool training) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t c = channel_of<CL>(i, C, HW);
    const acc_t v = static_cast<acc_t>(pre[i]);
    acc_t g = Act::template grad<T>(bp.bn(v, c), static_cast<acc_t>(gact[i]));
    if (training) g -= (dbeta[c] + bp.xhat(v, c) * dgamma[c]) * inv_count;
    dv[i] = static_cast<T>(bp.scale(c) * g);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host wrappers. All take dtype-typed pointers; callers dispatch on dtype and layout.
// ---------------------------------------------------------------------------------------------------

template <typename T, bool CL, typename Act>
inline void launch_bn_act(const at::Tensor& v, at::Tensor& out, const at::Tensor& params) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = v.numel();
  const int64_t C = v.size(1);
  const int64_t HW = v.size(2) * v.size(3);
  const int threads = 256;
  launch<bn_act_kernel<T, acc_t, CL, Act>>(elementwise_blocks(total, threads), threads, 0, v.data_ptr<T>(),
                                           out.data_ptr<T>(), BnParams<acc_t>{params.data_ptr<acc_t>(), C}, total, C,
                                           HW);
}

// Full BatchNorm(+activation) backward from the gradient at the activation output `gact` and the
// pre-BN tensor `pre`: returns dpre (format of pre) and writes dgamma, dbeta (stat dtype).
template <typename T, bool CL, typename Act>
inline at::Tensor bn_act_backward(const at::Tensor& gact, const at::Tensor& pre, const at::Tensor& params,
                                  at::Tensor& dgamma, at::Tensor& dbeta, bool training) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = pre.size(1);
  const int64_t HW = pre.size(2) * pre.size(3);
  const int64_t M = pre.size(0) * HW;
  const BnParams<acc_t> bp{params.data_ptr<acc_t>(), C};
  BnBackwardProducer<T, CL, Act, acc_t> prod{gact.data_ptr<T>(), pre.data_ptr<T>(), bp, C, HW};
  BnBackwardEpilogue<acc_t> epi{dgamma.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>()};
  reduce_channels<CL, SumPairState, acc_t>(prod, epi, C, HW, M, params.options());

  at::Tensor dpre = device_empty_like(pre);
  const int64_t total = pre.numel();
  const int threads = 256;
  // An empty batch has no elements, so 1/M is never applied.
  const acc_t inv_count = M > 0 ? static_cast<acc_t>(1.0 / static_cast<double>(M)) : acc_t(0);
  launch<bn_backward_elementwise_kernel<T, acc_t, CL, Act>>(
      elementwise_blocks(total, threads), threads, 0, gact.data_ptr<T>(), pre.data_ptr<T>(), bp,
      dgamma.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>(), dpre.data_ptr<T>(), total, C, HW, inv_count, training);
  return dpre;
}

// ---------------------------------------------------------------------------------------------------
// Checks and GEMM helpers shared by both ops.
// ---------------------------------------------------------------------------------------------------

inline at::ScalarType stat_dtype_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_stat_vector(const char* name, const at::Tensor& t, int64_t C, at::ScalarType sd,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, name, ": expected shape (", C, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == sd, name, ": expected dtype ", sd, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_act(const char* name, const at::Tensor& t, const at::Tensor& ref, bool cl) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor, got ", t.sizes());
  TORCH_CHECK(is_device_tensor(t) && t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
  check_format(name, t, cl);
}

// Runs `f` with Act = ActRelu or ActNone (the block entries' activation).
template <typename F>
void with_act(bool relu, F&& f) {
  if (relu) {
    f(ActRelu{});
  } else {
    f(ActNone{});
  }
}

// The backward of a block entry's act(bn(z)) (op A and the 3x3 entry): checks z and grad_out, both
// (N, Co, Ho, Wo) in x's format, device and dtype, and the statistics; returns (dz, dgamma, dbeta).
// The caller holds the device guard.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> entry_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta, int64_t Co, int64_t Ho, int64_t Wo,
    double eps, bool relu, bool training, bool cl) {
  const int64_t N = x.size(0);
  check_act("z", z, x, cl);
  check_act("grad_out", grad_out, x, cl);
  TORCH_CHECK(z.size(0) == N && z.size(1) == Co && z.size(2) == Ho && z.size(3) == Wo, "z: expected shape (", N,
              ", ", Co, ", ", Ho, ", ", Wo, "), got ", z.sizes());
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "grad_out: expected shape ", z.sizes(), ", got ", grad_out.sizes());
  const at::ScalarType sd = stat_dtype_for(x.scalar_type());
  check_stat_vector("mean", mean, Co, sd, x);
  check_stat_vector("var", var, Co, sd, x);

  const at::Tensor params = bn_params_from_stats(mean, var, gamma, beta, eps);
  at::Tensor dgamma = device_empty({Co}, gamma.options());
  at::Tensor dbeta = device_empty({Co}, gamma.options());
  at::Tensor dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entry_bn_act_backward_cuda", [&] {
    with_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      with_act(relu, [&](auto act) {
        dz = bn_act_backward<scalar_t, CL, decltype(act)>(grad_out, z, params, dgamma, dbeta, training);
      });
    });
  });
  return {dz, dgamma, dbeta};
}

// Weight gradient of a 1x1 conv for NCHW operands: sum_n a[n] @ b[n]^T with a (N, P, HW), b (N, Q, HW),
// returned as (P, Q) in the stat dtype. The reduction index (n, pixel) has no single stride in NCHW,
// so this is a batched GEMM (fp32 output for half types) summed over the batch in a fixed order,
// in batch chunks that bound the temporary to ~2^25 elements.
// An empty batch gives zeros.
inline at::Tensor nchw_weight_grad(const at::Tensor& a3, const at::Tensor& b3) {
  const int64_t N = a3.size(0), P = a3.size(1), Q = b3.size(1);
  const at::ScalarType sd = stat_dtype_for(a3.scalar_type());
  const int64_t per = std::max<int64_t>(1, P * Q);
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 25) / per));
  if (N == 0) return at::zeros({P, Q}, a3.options().dtype(sd));
  at::Tensor acc;
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t len = std::min(nb, N - n0);
    const at::Tensor a = a3.narrow(0, n0, len);
    const at::Tensor b = b3.narrow(0, n0, len).transpose(1, 2);
    at::Tensor part = device_empty({len, P, Q}, a.options().dtype(sd));
    bmm_into(part, a, b);
    at::Tensor s = part.sum(0);
    if (acc.defined()) {
      acc.add_(s);
    } else {
      acc = s;
    }
  }
  return acc;
}

}  // namespace cuda
}  // namespace rla_ext
