// Fused CPU kernels for the MoE-MAE fast path (fp32, contiguous row-major tensors).
//
// Built on first use by models/native.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes. Vectors are GCC vector types of 16 floats (one AVX-512 register; the compiler splits
// them on narrower CPUs). Every kernel is deterministic: work is split over independent tasks
// and each output element is reduced in a fixed order, whatever the number of threads.
//
// Grouped attention. qkv (B, N, C) with C = (H + 2G) * hd holds, per token, the H query heads,
// then the G key heads, then the G value heads. Query head h uses k/v group h % G, as in the
// published model (its k/v were repeated with unsqueeze/repeat, which interleaves groups);
// scores are scaled by `scale`. out and grad_out are (B, N, H * hd); out_t, when given,
// receives out transposed (H * hd, B * N) for the weight gradient of the output projection.
// One task is one (sample, group g) pair; its R * N query rows (R = H / G; row = r * N + i:
// token i, head g + r * G) share the group's keys and values. probs (B * G, M, NP) keeps the
// forward softmax for the backward pass, rows padded to M (a multiple of 4) and keys to NP (a
// multiple of 16); padded keys have probability 0, padded rows finite values that the
// backward pass never uses.
//
// Expert mixing. pre (T, E + 1, dh) holds W_e x for the E experts followed by V x; idx and
// gates (T, k) the routed experts and their gates. hidden = V x * sum_j gates_j silu(W_j x).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

using idx_t = int64_t;

namespace {

constexpr int L = 16;                   // floats per vector
constexpr int RB = 4;                   // query rows processed together
constexpr int kMaxHeadVectors = 8;      // head dim <= 128
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }
// The first n < L floats (the rest zero) / stores only those. With AVX-512, one masked
// instruction; the element loop would go through the stack (a store-forwarding stall).
#ifdef __AVX512F__
inline __mmask16 first_lanes(idx_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline vf load_tail(const float* p, idx_t n) {
  return reinterpret_cast<vf>(_mm512_maskz_loadu_ps(first_lanes(n), p));
}
inline void store_tail(float* p, vf v, idx_t n) {
  _mm512_mask_storeu_ps(p, first_lanes(n), reinterpret_cast<__m512>(v));
}
#else
inline vf load_tail(const float* p, idx_t n) {
  vf v = {};
  for (idx_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
inline void store_tail(float* p, vf v, idx_t n) {
  for (idx_t l = 0; l < n; ++l) p[l] = v[l];
}
#endif
// Horizontal reductions in log2(L) halving steps (a fixed order: deterministic).
#ifdef __AVX512F__
inline float hsum(vf v) { return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v)); }
inline float hmax(vf v) { return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v)); }
#else
inline vf swap_halves(vf v, int width) {
  vi perm;
  for (int l = 0; l < L; ++l) perm[l] = l ^ width;
  return __builtin_shuffle(v, perm);
}
inline float hsum(vf v) {
  for (int width = L / 2; width > 0; width /= 2) v += swap_halves(v, width);
  return v[0];
}
inline float hmax(vf v) {
  for (int width = L / 2; width > 0; width /= 2) {
    const vf w = swap_halves(v, width);
    v = v > w ? v : w;
  }
  return v[0];
}
#endif
// Transposes a 16 x 16 tile held as 16 row vectors, in four rounds of two-input shuffles:
// round w swaps element (r, c) with (r ^ w, c ^ w) where bit w of r and of c differ.
inline void transpose_tile(vf rows[L]) {
  for (int w = 1; w < L; w *= 2) {
    vi low, high;
    for (int l = 0; l < L; ++l) {
      low[l] = (l & w) ? L + l - w : l;
      high[l] = (l & w) ? L + l : l + w;
    }
    for (int i = 0; i < L; ++i) {
      if (i & w) continue;
      const vf a = rows[i], b = rows[i + w];
      rows[i] = __builtin_shuffle(a, b, low);
      rows[i + w] = __builtin_shuffle(a, b, high);
    }
  }
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) with relative error ~2e-7 for x in [-87, 88] (clamped outside).
inline vf vexp(vf x) {
  x = vmax(x, splat(-87.0f));
  x = x < splat(88.0f) ? x : splat(88.0f);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (((vi)t - (vi)magic) + 127) << 23;  // 2^n
  return p * (vf)bits;
}

inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

inline idx_t round_up(idx_t x, idx_t m) { return (x + m - 1) / m * m; }

// Attention splits a head's dims into HV full vectors ("lane" dims: one dim per lane, a
// multiply-add per key) and TD <= kMaxTailDims tail dims computed with keys in lanes (one
// multiply-add per 16 keys, then a horizontal sum). At head dim 18, padding the last 2 dims
// to a second vector would double the work of the products with V and K; a longer tail is
// padded. Rows are stored padded to W = ceil(hd / L) * L floats either way.
constexpr int kMaxTailDims = 4;
inline idx_t lane_vectors(idx_t hd) {
  return hd >= L && hd % L <= kMaxTailDims ? hd / L : (hd + L - 1) / L;
}

// Copies rows of width hd from a strided source into (rows, HV * L) zero-padded vectors.
inline void gather_rows(const float* src, idx_t stride, idx_t rows, idx_t hd, idx_t HV,
                        float* dst) {
  for (idx_t j = 0; j < rows; ++j) {
    const float* s = src + j * stride;
    float* d = dst + j * HV * L;
    for (idx_t h = 0; h < HV; ++h) {
      const idx_t n = std::min<idx_t>(L, hd - h * L);
      store(d + h * L, n == L ? load(s + h * L) : load_tail(s + h * L, n));
    }
  }
}

// Copies `cols` columns of `rows` rows from a strided source transposed into dst (cols, NP),
// NP >= rows a multiple of L; columns of dst beyond `rows` are zeroed. In 16 x 16 tiles.
inline void gather_transposed(const float* src, idx_t stride, idx_t rows, idx_t cols, idx_t NP,
                              float* dst) {
  vf tile[L];
  for (idx_t j0 = 0; j0 < NP; j0 += L) {
    for (idx_t c0 = 0; c0 < cols; c0 += L) {
      const idx_t n = std::min<idx_t>(L, cols - c0);
      for (idx_t l = 0; l < L; ++l) {
        const float* s = src + (j0 + l) * stride + c0;
        tile[l] = j0 + l >= rows ? vf{} : n == L ? load(s) : load_tail(s, n);
      }
      transpose_tile(tile);
      for (idx_t c = 0; c < n; ++c) store(dst + (c0 + c) * NP + j0, tile[c]);
    }
  }
}

template <int HV_T>
void attention_forward_impl(const float* qkv, float* out, float* out_t, float* probs, idx_t B,
                            idx_t N, idx_t H, idx_t G, idx_t hd, float scale, int threads) {
  const idx_t SV = (hd + L - 1) / L, W = SV * L;
  const idx_t HV = HV_T ? HV_T : lane_vectors(hd);
  const idx_t LD = std::min<idx_t>(HV * L, hd), TD = hd - LD;  // lane dims, tail dims
  const idx_t R = H / G, C = (H + 2 * G) * hd, NP = round_up(N, L), NB = NP / L;
  const idx_t M = round_up(R * N, RB), out_stride = H * hd;
#pragma omp parallel num_threads(threads)
  {
    // zero-initialised once: tasks overwrite the same rows and columns and never the padding
    std::vector<float> kt(hd * NP), v(NP * W), vt_tail(TD * NP), q(M * W), key_bias(NP),
        key_mask(NP), scratch(RB * NP);
    for (idx_t j = 0; j < NP; ++j) {  // padded keys: out of the max, and probability exactly 0
      key_bias[j] = j < N ? 0.0f : -1e30f;  // (exp would leave ~1e-38, which is denormal and
      key_mask[j] = j < N ? 1.0f : 0.0f;    // makes the backward pass's arithmetic slow)
    }
#pragma omp for schedule(static)
    for (idx_t task = 0; task < B * G; ++task) {
      const idx_t b = task / G, g = task % G;
      const float* base = qkv + b * N * C;
      gather_transposed(base + (H + g) * hd, C, N, hd, NP, kt.data());
      gather_transposed(base + (H + G + g) * hd + LD, C, N, TD, NP, vt_tail.data());
      gather_rows(base + (H + G + g) * hd, C, N, hd, SV, v.data());
      for (idx_t r = 0; r < R; ++r)
        gather_rows(base + (g + r * G) * hd, C, N, hd, SV, q.data() + r * N * W);
      float* task_probs = probs ? probs + task * M * NP : nullptr;

      for (idx_t row0 = 0; row0 < M; row0 += RB) {
        float* p = task_probs ? task_probs + row0 * NP : scratch.data();
        // scores and softmax, keys in vector lanes
        for (idx_t jb = 0; jb < NB; ++jb) {
          vf acc[RB] = {};
          for (idx_t d = 0; d < hd; ++d) {
            const vf k = load(kt.data() + d * NP + jb * L);
            for (int r = 0; r < RB; ++r) acc[r] += q[(row0 + r) * W + d] * k;
          }
          const vf bias = load(key_bias.data() + jb * L);
          for (int r = 0; r < RB; ++r) store(p + r * NP + jb * L, acc[r] * scale + bias);
        }
        for (int r = 0; r < RB; ++r) {
          float* pr = p + r * NP;
          vf m = load(pr);
          for (idx_t jb = 1; jb < NB; ++jb) m = vmax(m, load(pr + jb * L));
          const float row_max = hmax(m);
          vf sum = {};
          for (idx_t jb = 0; jb < NB; ++jb) {
            const vf e = vexp(load(pr + jb * L) - row_max) * load(key_mask.data() + jb * L);
            store(pr + jb * L, e);
            sum += e;
          }
          const float inv = 1.0f / hsum(sum);
          for (idx_t jb = 0; jb < NB; ++jb) store(pr + jb * L, load(pr + jb * L) * inv);
        }
        // out = p V: lane dims, then the tail dims with keys in lanes
        vf acc[RB][HV_T ? HV_T : kMaxHeadVectors] = {};
        for (idx_t j = 0; j < N; ++j) {
          for (idx_t h = 0; h < HV; ++h) {
            const vf vv = load(v.data() + j * W + h * L);
            for (int r = 0; r < RB; ++r) acc[r][h] += p[r * NP + j] * vv;
          }
        }
        float tail[RB][kMaxTailDims];
        for (idx_t d = 0; d < TD; ++d) {
          vf sum[RB] = {};
          for (idx_t jb = 0; jb < NB; ++jb) {
            const vf vv = load(vt_tail.data() + d * NP + jb * L);
            for (int r = 0; r < RB; ++r) sum[r] += load(p + r * NP + jb * L) * vv;
          }
          for (int r = 0; r < RB; ++r) tail[r][d] = hsum(sum[r]);
        }
        for (int r = 0; r < RB && row0 + r < R * N; ++r) {
          const idx_t row = row0 + r, head = g + row / N * G, i = row % N;
          float* o = out + (b * N + i) * out_stride + head * hd;
          for (idx_t h = 0; h < HV; ++h) {
            const idx_t n = std::min<idx_t>(L, hd - h * L);
            if (n == L) store(o + h * L, acc[r][h]); else store_tail(o + h * L, acc[r][h], n);
          }
          for (idx_t d = 0; d < TD; ++d) o[LD + d] = tail[r][d];
          if (out_t)  // column b * N + i of out transposed (H * hd, B * N)
            for (idx_t d = 0; d < hd; ++d)
              out_t[(head * hd + d) * B * N + b * N + i] =
                  d < LD ? acc[r][d / L][d % L] : tail[r][d - LD];
        }
      }
    }
  }
}

template <int HV_T>
void attention_backward_impl(const float* qkv, const float* probs, const float* grad_out,
                             float* grad_qkv, idx_t B, idx_t N, idx_t H, idx_t G, idx_t hd,
                             float scale, int threads) {
  const idx_t SV = (hd + L - 1) / L, W = SV * L;
  const idx_t HV = HV_T ? HV_T : lane_vectors(hd);
  const idx_t LD = std::min<idx_t>(HV * L, hd), TD = hd - LD;  // lane dims, tail dims
  const idx_t R = H / G, C = (H + 2 * G) * hd, NP = round_up(N, L), NB = NP / L;
  const idx_t M = round_up(R * N, RB), out_stride = H * hd;
#pragma omp parallel num_threads(threads)
  {
    // zero-initialised once: tasks overwrite the same rows and columns and never the padding
    std::vector<float> k(NP * W), vt(hd * NP), q(M * W), go(M * W), dk(NP * W), dv(NP * W),
        ds(RB * NP), kt_tail(TD * NP), dk_tail(TD * NP), dv_tail(TD * NP);
#pragma omp for schedule(static)
    for (idx_t task = 0; task < B * G; ++task) {
      const idx_t b = task / G, g = task % G;
      const float* base = qkv + b * N * C;
      gather_rows(base + (H + g) * hd, C, N, hd, SV, k.data());
      gather_transposed(base + (H + G + g) * hd, C, N, hd, NP, vt.data());
      gather_transposed(base + (H + g) * hd + LD, C, N, TD, NP, kt_tail.data());
      for (idx_t r = 0; r < R; ++r) {
        gather_rows(base + (g + r * G) * hd, C, N, hd, SV, q.data() + r * N * W);
        gather_rows(grad_out + b * N * out_stride + (g + r * G) * hd, out_stride, N, hd, SV,
                    go.data() + r * N * W);
      }
      std::fill(dk.begin(), dk.begin() + N * W, 0.0f);
      std::fill(dv.begin(), dv.begin() + N * W, 0.0f);
      std::fill(dk_tail.begin(), dk_tail.end(), 0.0f);
      std::fill(dv_tail.begin(), dv_tail.end(), 0.0f);
      const float* task_probs = probs + task * M * NP;

      for (idx_t row0 = 0; row0 < M; row0 += RB) {
        const float* p = task_probs + row0 * NP;
        // dp = dO V^T; ds = p * (dp - <p, dp>), keys in vector lanes
        vf delta[RB] = {};
        for (idx_t jb = 0; jb < NB; ++jb) {
          vf acc[RB] = {};
          for (idx_t d = 0; d < hd; ++d) {
            const vf vv = load(vt.data() + d * NP + jb * L);
            for (int r = 0; r < RB; ++r) acc[r] += go[(row0 + r) * W + d] * vv;
          }
          for (int r = 0; r < RB; ++r) {
            store(ds.data() + r * NP + jb * L, acc[r]);
            delta[r] += load(p + r * NP + jb * L) * acc[r];
          }
        }
        for (int r = 0; r < RB; ++r) {
          const float dr = hsum(delta[r]);
          for (idx_t jb = 0; jb < NB; ++jb) {
            const idx_t o = r * NP + jb * L;
            store(ds.data() + o, load(p + o) * (load(ds.data() + o) - dr) * scale);
          }
        }
        // dV += p^T dO; dK += ds^T Q; dQ = ds K: lane dims, then the tail dims
        constexpr int HVM = HV_T ? HV_T : kMaxHeadVectors;
        vf qr[RB][HVM], gr[RB][HVM], dq[RB][HVM] = {};
        for (int r = 0; r < RB; ++r)
          for (idx_t h = 0; h < HV; ++h) {
            qr[r][h] = load(q.data() + (row0 + r) * W + h * L);
            gr[r][h] = load(go.data() + (row0 + r) * W + h * L);
          }
        for (idx_t j = 0; j < N; ++j) {
          for (idx_t h = 0; h < HV; ++h) {
            const vf kk = load(k.data() + j * W + h * L);
            vf dvj = load(dv.data() + j * W + h * L), dkj = load(dk.data() + j * W + h * L);
            for (int r = 0; r < RB; ++r) {
              const float pj = p[r * NP + j], sj = ds[r * NP + j];
              dvj += pj * gr[r][h];
              dkj += sj * qr[r][h];
              dq[r][h] += sj * kk;
            }
            store(dv.data() + j * W + h * L, dvj);
            store(dk.data() + j * W + h * L, dkj);
          }
        }
        float dq_tail[RB][kMaxTailDims];
        for (idx_t d = 0; d < TD; ++d) {
          const idx_t col = LD + d;
          vf sum[RB] = {};
          for (idx_t jb = 0; jb < NB; ++jb) {
            const idx_t o = d * NP + jb * L;
            const vf kk = load(kt_tail.data() + o);
            vf dvt = load(dv_tail.data() + o), dkt = load(dk_tail.data() + o);
            for (int r = 0; r < RB; ++r) {
              const vf pr = load(p + r * NP + jb * L), sr = load(ds.data() + r * NP + jb * L);
              dvt += go[(row0 + r) * W + col] * pr;
              dkt += q[(row0 + r) * W + col] * sr;
              sum[r] += sr * kk;
            }
            store(dv_tail.data() + o, dvt);
            store(dk_tail.data() + o, dkt);
          }
          for (int r = 0; r < RB; ++r) dq_tail[r][d] = hsum(sum[r]);
        }
        for (int r = 0; r < RB && row0 + r < R * N; ++r) {
          const idx_t row = row0 + r, head = g + row / N * G, i = row % N;
          float* o = grad_qkv + (b * N + i) * C + head * hd;
          for (idx_t h = 0; h < HV; ++h) {
            const idx_t n = std::min<idx_t>(L, hd - h * L);
            if (n == L) store(o + h * L, dq[r][h]); else store_tail(o + h * L, dq[r][h], n);
          }
          for (idx_t d = 0; d < TD; ++d) o[LD + d] = dq_tail[r][d];
        }
      }
      for (idx_t j = 0; j < N; ++j) {
        float* row = grad_qkv + (b * N + j) * C;
        for (idx_t d = 0; d < LD; ++d) {
          row[(H + g) * hd + d] = dk[j * W + d];
          row[(H + G + g) * hd + d] = dv[j * W + d];
        }
        for (idx_t d = 0; d < TD; ++d) {
          row[(H + g) * hd + LD + d] = dk_tail[d * NP + j];
          row[(H + G + g) * hd + LD + d] = dv_tail[d * NP + j];
        }
      }
    }
  }
}

}  // namespace

extern "C" {

int max_head_dim() { return kMaxHeadVectors * L; }

// Padded probability shape of attention_forward: (rows M, keys NP) per (sample, group).
void attention_probs_shape(idx_t N, idx_t H, idx_t G, idx_t* rows, idx_t* keys) {
  *rows = round_up(H / G * N, RB);
  *keys = round_up(N, L);
}

void attention_forward(const float* qkv, float* out, float* out_t, float* probs, idx_t B,
                       idx_t N, idx_t H, idx_t G, idx_t hd, float scale, int threads) {
  const idx_t HV = lane_vectors(hd);
  if (HV == 1)
    return attention_forward_impl<1>(qkv, out, out_t, probs, B, N, H, G, hd, scale, threads);
  if (HV == 2)
    return attention_forward_impl<2>(qkv, out, out_t, probs, B, N, H, G, hd, scale, threads);
  attention_forward_impl<0>(qkv, out, out_t, probs, B, N, H, G, hd, scale, threads);
}

void attention_backward(const float* qkv, const float* probs, const float* grad_out,
                        float* grad_qkv, idx_t B, idx_t N, idx_t H, idx_t G, idx_t hd,
                        float scale, int threads) {
  const idx_t HV = lane_vectors(hd);
  if (HV == 1)
    return attention_backward_impl<1>(qkv, probs, grad_out, grad_qkv, B, N, H, G, hd, scale,
                                      threads);
  if (HV == 2)
    return attention_backward_impl<2>(qkv, probs, grad_out, grad_qkv, B, N, H, G, hd, scale,
                                      threads);
  attention_backward_impl<0>(qkv, probs, grad_out, grad_qkv, B, N, H, G, hd, scale, threads);
}

// hidden (T, dh) = V x * sum_j gates_j silu(W_{idx_j} x)
void expert_mix_forward(const float* pre, const int64_t* idx, const float* gates, float* hidden,
                        idx_t T, idx_t E, idx_t K, idx_t dh, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t t = 0; t < T; ++t) {
    const float* row = pre + t * (E + 1) * dh;
    for (idx_t d0 = 0; d0 < dh; d0 += L) {
      const idx_t n = std::min<idx_t>(L, dh - d0);
      auto ld = [n](const float* p) { return n == L ? load(p) : load_tail(p, n); };
      vf mixed = {};
      for (idx_t j = 0; j < K; ++j) {
        const vf w = ld(row + idx[t * K + j] * dh + d0);
        mixed += gates[t * K + j] * w * vsigmoid(w);
      }
      const vf h = mixed * ld(row + E * dh + d0);
      if (n == L) store(hidden + t * dh + d0, h); else store_tail(hidden + t * dh + d0, h, n);
    }
  }
}

// Gradients of expert_mix_forward: grad_pre (T, E + 1, dh), zero for the experts a token was
// not routed to, and grad_gates (T, K). A token's K experts must be distinct.
void expert_mix_backward(const float* grad_hidden, const float* pre, const int64_t* idx,
                         const float* gates, float* grad_pre, float* grad_gates, idx_t T,
                         idx_t E, idx_t K, idx_t dh, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t t = 0; t < T; ++t) {
    const float* row = pre + t * (E + 1) * dh;
    float* grow = grad_pre + t * (E + 1) * dh;
    std::fill(grow, grow + E * dh, 0.0f);
    vf grad_gate[8] = {};
    for (idx_t d0 = 0; d0 < dh; d0 += L) {
      const idx_t n = std::min<idx_t>(L, dh - d0);
      auto ld = [n](const float* p) { return n == L ? load(p) : load_tail(p, n); };
      auto st = [n](float* p, vf v) { if (n == L) store(p, v); else store_tail(p, v, n); };
      const vf gh = ld(grad_hidden + t * dh + d0);
      const vf grad_mixed = gh * ld(row + E * dh + d0);
      vf mixed = {};
      for (idx_t j = 0; j < K; ++j) {
        const float g = gates[t * K + j];
        const idx_t e = idx[t * K + j];
        const vf w = ld(row + e * dh + d0);
        const vf sig = vsigmoid(w);
        const vf act = w * sig;
        mixed += g * act;
        grad_gate[j] += grad_mixed * act;
        st(grow + e * dh + d0, grad_mixed * g * sig * (1.0f + w * (1.0f - sig)));
      }
      st(grow + E * dh + d0, gh * mixed);
    }
    for (idx_t j = 0; j < K; ++j) grad_gates[t * K + j] = hsum(grad_gate[j]);
  }
}

// Inverted dropout with a counter-based random stream: element i is kept when
// hash(seed, i) >= threshold (a 32-bit hash, so the drop probability is threshold / 2^32) and
// scaled by `scale`; dropped elements are zero. The same (seed, threshold) gives the same mask,
// so the backward pass recomputes it instead of storing it.
void dropout(const float* x, float* y, idx_t n, uint64_t seed, uint32_t threshold, float scale,
             int threads) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  vu lane;
  for (int l = 0; l < L; ++l) lane[l] = l;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t i0 = 0; i0 < n; i0 += 1024 * L) {
    const idx_t i1 = std::min<idx_t>(n, i0 + 1024 * L);
    for (idx_t i = i0; i < i1; i += L) {
      vu h = (static_cast<uint32_t>(i) + lane) * 0x9E3779B1u + seed_lo;  // Weyl sequence
      h ^= seed_hi;
      h ^= h >> 16; h *= 0x7FEB352Du;  // "lowbias32" integer hash
      h ^= h >> 15; h *= 0x846CA68Bu;
      h ^= h >> 16;
      const idx_t m = std::min<idx_t>(L, i1 - i);
      const vf v = m == L ? load(x + i) : load_tail(x + i, m);
      const vf out = h >= threshold ? v * scale : vf{};
      if (m == L) store(y + i, out); else store_tail(y + i, out, m);
    }
  }
}

// LayerNorm over the last dim C of x (T, C): y = (x - mean) * rstd * weight + bias. Tokens are
// processed 16 at a time; y_t (C, T), when given, receives y transposed (weight gradients of
// the linear layers that read y need it).
void layer_norm_forward(const float* x, const float* weight, const float* bias, float* y,
                        float* y_t, float* mean, float* rstd, idx_t T, idx_t C, float eps,
                        int threads) {
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (idx_t t0 = 0; t0 < T; t0 += L) {
      const idx_t rows = std::min<idx_t>(L, T - t0);
      for (idx_t r = 0; r < rows; ++r) {
        const idx_t t = t0 + r;
        const float* xr = x + t * C;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (idx_t c = 0; c < C; ++c) sum += xr[c];
        const float mu = sum / C;
#pragma omp simd reduction(+ : sq)
        for (idx_t c = 0; c < C; ++c) sq += (xr[c] - mu) * (xr[c] - mu);
        const float rs = 1.0f / std::sqrt(sq / C + eps);
        mean[t] = mu;
        rstd[t] = rs;
        float* yr = y + t * C;
#pragma omp simd
        for (idx_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * rs * weight[c] + bias[c];
      }
      if (y_t) {  // y_t[c, t0:t0 + 16] for 16 columns at a time, through register tiles
        for (idx_t c0 = 0; c0 < C; c0 += L) {
          const idx_t cols = std::min<idx_t>(L, C - c0);
          vf tile[L];
          for (idx_t r = 0; r < L; ++r) {
            const float* yr = y + (t0 + r) * C + c0;
            tile[r] = r >= rows ? vf{} : cols == L ? load(yr) : load_tail(yr, cols);
          }
          transpose_tile(tile);
          for (idx_t c = 0; c < cols; ++c) {
            if (rows == L) store(y_t + (c0 + c) * T + t0, tile[c]);
            else store_tail(y_t + (c0 + c) * T + t0, tile[c], rows);
          }
        }
      }
    }
  }
}

// Gradients of layer_norm_forward. grad_weight and grad_bias (C) are summed over tokens in
// fixed chunks of 64, then over chunks in order: the result does not depend on the threads.
void layer_norm_backward(const float* x, const float* mean, const float* rstd,
                         const float* weight, const float* grad_y, float* grad_x,
                         float* grad_weight, float* grad_bias, idx_t T, idx_t C, int threads) {
  constexpr idx_t chunk = 64;
  const idx_t chunks = (T + chunk - 1) / chunk;
  std::vector<float> partial(chunks * 2 * C, 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t k = 0; k < chunks; ++k) {
    float* pw = partial.data() + k * 2 * C;
    float* pb = pw + C;
    for (idx_t t = k * chunk; t < std::min(T, (k + 1) * chunk); ++t) {
      const float* xr = x + t * C;
      const float* gy = grad_y + t * C;
      const float mu = mean[t], rs = rstd[t];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (idx_t c = 0; c < C; ++c) {
        const float xhat = (xr[c] - mu) * rs, g = gy[c] * weight[c];
        sum_g += g;
        sum_gx += g * xhat;
        pw[c] += gy[c] * xhat;
        pb[c] += gy[c];
      }
      const float a = sum_g / C, b = sum_gx / C;
      float* gx = grad_x + t * C;
#pragma omp simd
      for (idx_t c = 0; c < C; ++c) gx[c] = rs * (gy[c] * weight[c] - a - (xr[c] - mu) * rs * b);
    }
  }
  for (idx_t c = 0; c < C; ++c) grad_weight[c] = grad_bias[c] = 0.0f;
  for (idx_t k = 0; k < chunks; ++k)
    for (idx_t c = 0; c < C; ++c) {
      grad_weight[c] += partial[k * 2 * C + c];
      grad_bias[c] += partial[k * 2 * C + C + c];
    }
}

// Noisy top-k gate (Shazeer et al. 2017) for T tokens and E <= kMaxExperts experts. logits
// (T, 2E) holds [Wg x, Wnoise x]; eps (T, E) the standard normal noise, or null for none.
// Writes the routing (topk_idx, topk_gates (T, K): best first, softmax over the K noisy
// logits), noisy and noise_scale (T, E), and the balancing statistics importance (E) (sum of
// gates) and load (E) (sum of Phi((clean - threshold) / noise_scale), threshold the K-th largest
// noisy logit among the other experts), summed in fixed chunks of tokens as in LayerNorm.
constexpr int kMaxExperts = 8;
constexpr idx_t kGateChunk = 64;

struct TokenGate {
  float clean[kMaxExperts], nl[kMaxExperts], scale[kMaxExperts], noisy[kMaxExperts];
  int order[kMaxExperts];  // experts by decreasing noisy logit (lower index first on ties)
  int rank[kMaxExperts];

  void compute(const float* logits, const float* eps, idx_t E) {
    for (idx_t e = 0; e < E; ++e) {
      clean[e] = logits[e];
      nl[e] = logits[E + e];
      scale[e] = nl[e] > 20.0f ? nl[e] : std::log1p(std::exp(nl[e]));  // softplus, as torch
      noisy[e] = eps ? clean[e] + eps[e] * scale[e] : clean[e];
      order[e] = static_cast<int>(e);
    }
    for (idx_t i = 1; i < E; ++i)
      for (idx_t j = i; j > 0 && noisy[order[j - 1]] < noisy[order[j]]; --j)
        std::swap(order[j - 1], order[j]);
    for (idx_t i = 0; i < E; ++i) rank[order[i]] = static_cast<int>(i);
  }
  // the expert whose noisy logit is expert e's threshold
  int threshold_expert(int e, idx_t K) const { return rank[e] < K ? order[K] : order[K - 1]; }
  float z(int e, idx_t K) const {
    return (clean[e] - noisy[threshold_expert(e, K)]) / scale[e];
  }
};

void gate_forward(const float* logits, const float* eps, int64_t* topk_idx, float* topk_gates,
                  float* noisy, float* noise_scale, float* importance, float* load, idx_t T,
                  idx_t E, idx_t K, int threads) {
  const idx_t chunks = (T + kGateChunk - 1) / kGateChunk;
  std::vector<float> partial(chunks * 2 * E, 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t c = 0; c < chunks; ++c) {
    float* p_importance = partial.data() + c * 2 * E;
    float* p_load = p_importance + E;
    for (idx_t t = c * kGateChunk; t < std::min(T, (c + 1) * kGateChunk); ++t) {
      TokenGate g{};
      g.compute(logits + t * 2 * E, eps ? eps + t * E : nullptr, E);
      const float top = g.noisy[g.order[0]];
      float sum = 0.0f, w[kMaxExperts];
      for (idx_t j = 0; j < K; ++j) sum += (w[j] = std::exp(g.noisy[g.order[j]] - top));
      for (idx_t j = 0; j < K; ++j) {
        topk_idx[t * K + j] = g.order[j];
        topk_gates[t * K + j] = w[j] / sum;
        p_importance[g.order[j]] += w[j] / sum;
      }
      for (idx_t e = 0; e < E; ++e) {
        noisy[t * E + e] = g.noisy[e];
        noise_scale[t * E + e] = g.scale[e];
        p_load[e] += 0.5f * std::erfc(-g.z(static_cast<int>(e), K) * 0.70710678118654752f);
      }
    }
  }
  for (idx_t e = 0; e < 2 * E; ++e) {
    float total = 0.0f;
    for (idx_t c = 0; c < chunks; ++c) total += partial[c * 2 * E + e];
    (e < E ? importance[e] : load[e - E]) = total;
  }
}

// Gradient of gate_forward with respect to logits (T, 2E), from the gradients of topk_gates
// (T, K), importance (E) and load (E); any of the three may be null (no gradient).
void gate_backward(const float* logits, const float* eps, const float* topk_gates,
                   const float* grad_gates, const float* grad_importance, const float* grad_load,
                   float* grad_logits, idx_t T, idx_t E, idx_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (idx_t t = 0; t < T; ++t) {
    TokenGate g{};
    g.compute(logits + t * 2 * E, eps ? eps + t * E : nullptr, E);
    float grad_noisy[kMaxExperts] = {}, grad_clean[kMaxExperts] = {}, grad_scale[kMaxExperts] = {};
    const float* gates = topk_gates + t * K;
    float grad_g[kMaxExperts], dot = 0.0f;
    for (idx_t j = 0; j < K; ++j) {
      grad_g[j] = (grad_gates ? grad_gates[t * K + j] : 0.0f) +
                  (grad_importance ? grad_importance[g.order[j]] : 0.0f);
      dot += gates[j] * grad_g[j];
    }
    for (idx_t j = 0; j < K; ++j) grad_noisy[g.order[j]] += gates[j] * (grad_g[j] - dot);
    if (grad_load) {
      for (int e = 0; e < E; ++e) {
        const float z = g.z(e, K);
        const float d = grad_load[e] * std::exp(-0.5f * z * z) * 0.39894228040143268f / g.scale[e];
        grad_clean[e] += d;
        grad_noisy[g.threshold_expert(e, K)] -= d;
        grad_scale[e] -= d * z;
      }
    }
    float* out = grad_logits + t * 2 * E;
    for (idx_t e = 0; e < E; ++e) {
      grad_clean[e] += grad_noisy[e];
      if (eps) grad_scale[e] += grad_noisy[e] * eps[t * E + e];
      const float softplus_grad = g.nl[e] > 20.0f ? 1.0f : 1.0f / (1.0f + std::exp(-g.nl[e]));
      out[e] = grad_clean[e];
      out[E + e] = grad_scale[e] * softplus_grad;
    }
  }
}

int max_experts() { return kMaxExperts; }

}  // extern "C"
