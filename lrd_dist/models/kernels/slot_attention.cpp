// Multi-head self-attention across the R relation slots of each candidate row, fused on the CPU.
//
// q, k, v, the output and the gradients are token-major [N, R, V] (V = heads * D), as the
// projections write them. For one row and head the whole problem is three R x D blocks (R about
// 13, D = 16): scores, softmax and the weighted sum stay in registers and L1 instead of running as
// a batch of tiny GEMMs, a softmax over a last dim of 13 and transposed copies (what torch does,
// several times slower here). The backward recomputes the attention weights instead of storing them.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // Vectorized<T>::exp (Sleef, inside libtorch) for the softmax

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kRowsPerTask = 8;

// One (row, head) of the attention: R slot rows of D values, `stride` apart (token-major layout:
// stride = V). Vector lanes run over query slots i: scores are kept transposed, s[j][i], so the
// softmax over key slots j is element-wise across R vectors (no horizontal reductions), and every
// product is a broadcast FMA; four independent accumulators hide the FMA latency.
template <typename T>
class HeadBlock {
 public:
  using Vec = at::vec::Vectorized<T>;
  static constexpr int64_t W = Vec::size();

  HeadBlock(int64_t slots, int64_t head_size, int64_t stride, T scale)
      : R(slots), D(head_size), P((slots + W - 1) / W * W), stride(stride), scale(scale),
        block_t(head_size * P, T(0)), weights_t(slots * P, T(0)), grad_t(slots * P, T(0)) {}

  // weights_t[j][i] = softmax_j(scale * <q_i, k_j>)
  void attention_weights(const T* q, const T* k) {
    transpose(q);
    products_t(k, weights_t.data());
    for (int64_t c = 0; c < P; c += W) {
      Vec top = Vec::loadu(&weights_t[c]) * Vec(scale);
      for (int64_t j = 1; j < R; ++j)
        top = at::vec::maximum(top, Vec::loadu(&weights_t[j * P + c]) * Vec(scale));
      Vec total(T(0));
      for (int64_t j = 0; j < R; ++j) {
        const Vec e = (Vec::loadu(&weights_t[j * P + c]) * Vec(scale) - top).exp();
        e.store(&weights_t[j * P + c]);
        total = total + e;
      }
      const Vec inverse = Vec(T(1)) / total;
      for (int64_t j = 0; j < R; ++j)
        (Vec::loadu(&weights_t[j * P + c]) * inverse).store(&weights_t[j * P + c]);
    }
  }

  // grad_t[j][i] = scale * d scores[i][j], from the output gradient g (after attention_weights)
  void score_gradients(const T* g, const T* v) {
    transpose(g);
    products_t(v, grad_t.data());  // d weights[i][j] = <g_i, v_j>
    for (int64_t c = 0; c < P; c += W) {
      Vec row(T(0));  // <w_i, dw_i>
      for (int64_t j = 0; j < R; ++j)
        row = at::vec::fmadd(Vec::loadu(&weights_t[j * P + c]), Vec::loadu(&grad_t[j * P + c]), row);
      for (int64_t j = 0; j < R; ++j) {
        const Vec w = Vec::loadu(&weights_t[j * P + c]), dw = Vec::loadu(&grad_t[j * P + c]);
        (w * (dw - row) * Vec(scale)).store(&grad_t[j * P + c]);
      }
    }
  }

  // out_a = sum_b m[a * step_a + b * step_b] * rows_b, for a < R (rows and out `stride` apart)
  void mix(const T* m, int64_t step_a, int64_t step_b, const T* rows, T* out) const {
    int64_t a = 0;
    for (; a + 4 <= R; a += 4) {
      for (int64_t d = 0; d < D; d += W) {
        const int64_t count = std::min(W, D - d);
        Vec o0(T(0)), o1(T(0)), o2(T(0)), o3(T(0));
        for (int64_t b = 0; b < R; ++b) {
          const Vec x = Vec::loadu(rows + b * stride + d, count);
          const T* mb = m + b * step_b + a * step_a;
          o0 = at::vec::fmadd(Vec(mb[0]), x, o0);
          o1 = at::vec::fmadd(Vec(mb[step_a]), x, o1);
          o2 = at::vec::fmadd(Vec(mb[2 * step_a]), x, o2);
          o3 = at::vec::fmadd(Vec(mb[3 * step_a]), x, o3);
        }
        o0.store(out + a * stride + d, count);
        o1.store(out + (a + 1) * stride + d, count);
        o2.store(out + (a + 2) * stride + d, count);
        o3.store(out + (a + 3) * stride + d, count);
      }
    }
    for (; a < R; ++a) {
      for (int64_t d = 0; d < D; d += W) {
        const int64_t count = std::min(W, D - d);
        Vec o(T(0));
        for (int64_t b = 0; b < R; ++b)
          o = at::vec::fmadd(Vec(m[a * step_a + b * step_b]), Vec::loadu(rows + b * stride + d, count), o);
        o.store(out + a * stride + d, count);
      }
    }
  }

  const int64_t R, D, P, stride;
  const T scale;
  std::vector<T> block_t, weights_t, grad_t;

 private:
  // block_t[d][i] = x_i[d]; lanes i >= R stay zero
  void transpose(const T* x) {
    for (int64_t i = 0; i < R; ++i)
      for (int64_t d = 0; d < D; ++d) block_t[d * P + i] = x[i * stride + d];
  }

  // out[j][i] = sum_d y_j[d] * block_t[d][i], for j < R
  void products_t(const T* y, T* out) const {
    for (int64_t c = 0; c < P; c += W) {
      int64_t j = 0;
      for (; j + 4 <= R; j += 4) {
        Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
        const T* y0 = y + j * stride;
        for (int64_t d = 0; d < D; ++d) {
          const Vec x = Vec::loadu(&block_t[d * P + c]);
          a0 = at::vec::fmadd(Vec(y0[d]), x, a0);
          a1 = at::vec::fmadd(Vec(y0[stride + d]), x, a1);
          a2 = at::vec::fmadd(Vec(y0[2 * stride + d]), x, a2);
          a3 = at::vec::fmadd(Vec(y0[3 * stride + d]), x, a3);
        }
        a0.store(out + j * P + c);
        a1.store(out + (j + 1) * P + c);
        a2.store(out + (j + 2) * P + c);
        a3.store(out + (j + 3) * P + c);
      }
      for (; j < R; ++j) {
        Vec acc(T(0));
        for (int64_t d = 0; d < D; ++d)
          acc = at::vec::fmadd(Vec(y[j * stride + d]), Vec::loadu(&block_t[d * P + c]), acc);
        acc.store(out + j * P + c);
      }
    }
  }
};

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, int64_t N, int64_t R, int64_t V,
                    int64_t heads, T scale) {
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    HeadBlock<T> block(R, V / heads, V, scale);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = n * R * V + h * block.D;
        block.attention_weights(q + base, k + base);
        block.mix(block.weights_t.data(), 1, block.P, v + base, out + base);  // out_i = sum_j w[i][j] v_j
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* grad, const T* q, const T* k, const T* v, T* dq, T* dk, T* dv, int64_t N,
                     int64_t R, int64_t V, int64_t heads, T scale) {
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    HeadBlock<T> block(R, V / heads, V, scale);
    const int64_t P = block.P;
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = n * R * V + h * block.D;
        block.attention_weights(q + base, k + base);  // recomputed, not stored
        block.score_gradients(grad + base, v + base);
        const T *ds_t = block.grad_t.data(), *w_t = block.weights_t.data();
        block.mix(ds_t, 1, P, k + base, dq + base);     // dq_i = sum_j ds[i][j] k_j
        block.mix(ds_t, P, 1, q + base, dk + base);     // dk_j = sum_i ds[i][j] q_i
        block.mix(w_t, P, 1, grad + base, dv + base);   // dv_j = sum_i w[i][j] g_i
      }
    }
  });
}

void check(const torch::Tensor& t, const torch::Tensor& like, const char* name, int64_t heads) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), name, " must be a contiguous [N, R, V] tensor");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), name,
              " must match q in shape and dtype");
  TORCH_CHECK(heads > 0 && t.size(2) % heads == 0, "V must be a multiple of the number of heads");
}

}  // namespace

torch::Tensor slot_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t heads,
                                     double scale) {
  for (auto [t, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}}) check(t, q, name, heads);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "slot_attention_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), q.size(0), q.size(1), q.size(2), heads,
                             static_cast<scalar_t>(scale));
  });
  return out;
}

std::vector<torch::Tensor> slot_attention_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k,
                                                   torch::Tensor v, int64_t heads, double scale) {
  for (auto [t, name] : {std::pair{grad, "grad"}, {q, "q"}, {k, "k"}, {v, "v"}}) check(t, q, name, heads);
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "slot_attention_backward", [&] {
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), q.size(0), q.size(1), q.size(2), heads,
                              static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &slot_attention_forward, "slot attention forward: q, k, v [N, R, V] -> out [N, R, V]");
  m.def("backward", &slot_attention_backward, "slot attention backward: grad, q, k, v -> dq, dk, dv");
}
