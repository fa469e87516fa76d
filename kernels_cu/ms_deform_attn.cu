// Multi-scale deformable attention (deformarray.ms_deform_attn, Deformable DETR) kernels,
// the numbers of the grid_sample composition (align_corners=False, zero padding).
//
// Launch code: deformarray/cuda/ms_deform_attn.py. Every kernel is a template on the element
// type T (float, double, dfa::half, dfa::bfloat16) and computes in A = acc_t<T>. The kernels
// with an _i32 / _i64 suffix are the same code with 32-bit or 64-bit index arithmetic
// (aggregate.cuh: I); the launch code takes _i32 when every array and work range of the
// launch has fewer than 2**31 elements.
//
// Layouts (all C-contiguous): value (N, S, M, D), level l in rows start_l .. start_l +
// H_l*W_l of S, row y*W_l + x; loc (N, Lq, M, L, P, 2), [..., 0] = x, [..., 1] = y, 0 and 1
// the outer edges of the level; attn (N, Lq, M, L, P); out / grad_out (N, Lq, M*D), head m
// at channels m*D .. m*D + D - 1; levels (L, 3) int64 rows (H_l, W_l, start_l).
//
// Numbers (the CPU backend's, deformarray/cpu/ms_deform_attn.py):
//   w = x * W_l - 0.5, h = y * H_l - 0.5 (product then subtraction, unfused); a point is used
//   iff -2 < h < H_l and -2 < w < W_l (NaN and inf are not), others contribute 0 and get zero
//   gradient; corners, weights, S_d and its derivatives as aggregate.cuh;
//   out[n, q, m*D + d] = sum over l (outer), p (inner) of a * S_d, in that order;
//   grad_value[corner row, m, d] += (a * w_corner) * g_d; grad_attn = sum_d g_d * S_d;
//   grad_loc x = (W_l * a) * sum_d g_d * dS_d/dw, y = (H_l * a) * sum_d g_d * dS_d/dh
//   (sums over d from d = 0, in one thread).
//
//   forward:   msda_forward (one thread per output element (n, q, m, d), d fastest)
//   backward:  msda_backward_point (one thread per point (n, q, m, l, p): the location and
//              attention gradients, and, unless grad_value is null, grad_value by atomics);
//              deterministic grad_value: msda_grad_value_owned (one thread per (query chunk,
//              image, m, d), the only writer of its column of a per-chunk partial buffer)
//              then msda_sum_chunks (partials added in chunk order, cast to T).

#include "common.cuh"
#include "aggregate.cuh"

using dfa::acc_t;
using dfa::i64;

#define DFA_MSDA_PARAMS i64 N_, i64 S_, i64 M_, i64 D_, i64 Lq_, i64 L_, i64 P_

namespace dfa {

// Sizes of one launch in the index type I.
template <typename I> struct MsdaDims {
    I N, S, M, D, Lq, L, P, MD;
};

template <typename I>
__device__ __forceinline__ MsdaDims<I> msda_dims(i64 N, i64 S, i64 M, i64 D, i64 Lq, i64 L, i64 P) {
    MsdaDims<I> g;
    g.N = static_cast<I>(N); g.S = static_cast<I>(S); g.M = static_cast<I>(M); g.D = static_cast<I>(D);
    g.Lq = static_cast<I>(Lq); g.L = static_cast<I>(L); g.P = static_cast<I>(P);
    g.MD = g.M * g.D;
    return g;
}

// The point rule: -2 < h < H and -2 < w < W (false for NaN).
template <typename A, typename I> __device__ __forceinline__ bool msda_used(A h, A w, I H, I W) {
    return h > A(-2) && h < static_cast<A>(H) && w > A(-2) && w < static_cast<A>(W);
}

// ---------------------------------------------------------------------------------------
// Forward. Thread t = ((n*Lq + q)*M + m)*D + d, the flat output index.
template <typename T, typename I>
__device__ __forceinline__ void msda_forward_impl(const T* __restrict__ value, const T* __restrict__ loc,
                                                  const T* __restrict__ attn, const i64* __restrict__ levels,
                                                  T* __restrict__ out, DFA_MSDA_PARAMS) {
    typedef acc_t<T> A;
    const MsdaDims<I> g = msda_dims<I>(N_, S_, M_, D_, Lq_, L_, P_);
    const i64 total = N_ * Lq_ * M_ * D_;
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I t = static_cast<I>(t64);
        const I nqm = t / g.D;
        const I d = t - nqm * g.D;
        const I nq = nqm / g.M;
        const I m = nqm - nq * g.M;
        const I n = nq / g.Lq;
        A acc = A(0);
        for (I l = 0; l < g.L; ++l) {
            const I H = static_cast<I>(levels[3 * l]), W = static_cast<I>(levels[3 * l + 1]);
            const I start = static_cast<I>(levels[3 * l + 2]);
            const T* chan = value + ((n * g.S + start) * g.M + m) * g.D + d;
            const I pt0 = (nqm * g.L + l) * g.P;
            for (I k = 0; k < g.P; ++k) {
                const I pt = pt0 + k;
                const A h = pixel_coord(to_acc(loc[2 * pt + 1]), H);
                const A w = pixel_coord(to_acc(loc[2 * pt]), W);
                if (!msda_used(h, w, H, W)) continue;
                const BilinearPoint<A, I> bp = bilinear_point(h, w, H, W);
                acc += to_acc(attn[pt]) * sample_channel(bp, chan, g.MD);
            }
        }
        out[t] = from_acc<T>(acc);
    }
}

// ---------------------------------------------------------------------------------------
// Backward per point, for the points of images n0 .. n0+nb-1: thread t is point
// pt = n0*Lq*M*L*P + t, pt = (((n*Lq + q)*M + m)*L + l)*P + p (the flat attn index).
// Writes grad_loc / grad_attn of the point (zero for an unused point); when grad_value is not
// null (it then points at image n0, (nb, S, M, D) in A) adds the point's value gradient to it
// with atomics.
template <typename T, typename I>
__device__ __forceinline__ void msda_backward_point_impl(
    const T* __restrict__ value, const T* __restrict__ grad_out, const T* __restrict__ loc,
    const T* __restrict__ attn, const i64* __restrict__ levels, T* __restrict__ grad_loc,
    T* __restrict__ grad_attn, acc_t<T>* __restrict__ grad_value, DFA_MSDA_PARAMS, i64 n0, i64 nb) {
    typedef acc_t<T> A;
    const MsdaDims<I> g = msda_dims<I>(N_, S_, M_, D_, Lq_, L_, P_);
    const i64 per_image = Lq_ * M_ * L_ * P_;
    const i64 total = nb * per_image;
    const I first = static_cast<I>(n0 * per_image);
    const I in0 = static_cast<I>(n0);
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I pt = first + static_cast<I>(t64);
        const I nql = pt / g.P;
        const I nqm = nql / g.L;
        const I l = nql - nqm * g.L;
        const I nq = nqm / g.M;
        const I m = nqm - nq * g.M;
        const I n = nq / g.Lq;
        const I H = static_cast<I>(levels[3 * l]), W = static_cast<I>(levels[3 * l + 1]);
        const I start = static_cast<I>(levels[3 * l + 2]);
        const A a = to_acc(attn[pt]);
        const A h = pixel_coord(to_acc(loc[2 * pt + 1]), H);
        const A w = pixel_coord(to_acc(loc[2 * pt]), W);
        A g_attn = A(0), g_x = A(0), g_y = A(0);  // an unused point: zero gradients (even for a NaN a)
        if (msda_used(h, w, H, W)) {
            const BilinearPoint<A, I> bp = bilinear_point(h, w, H, W);
            const I row0 = n * g.S + start;
            A* gv = grad_value == nullptr ? nullptr
                                          : grad_value + (((n - in0) * g.S + start) * g.M + m) * g.D;
            A gdh, gdw;
            point_backward(bp, value + (row0 * g.M + m) * g.D, g.MD, grad_out + nqm * g.D, g.D, a, gv, &g_attn,
                           &gdh, &gdw);
            g_x = (static_cast<A>(W) * a) * gdw;
            g_y = (static_cast<A>(H) * a) * gdh;
        }
        grad_attn[pt] = from_acc<T>(g_attn);
        grad_loc[2 * pt] = from_acc<T>(g_x);
        grad_loc[2 * pt + 1] = from_acc<T>(g_y);
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic value gradient. The queries are cut into K chunks of QC (the last may be
// shorter); thread t = ((c*nb + nl)*M + m)*D + d owns column (m, d) of image n0 + nl in
// partial buffer c, partial (K, nb, S, M, D) in A, and adds to it, in the order q (of chunk
// c), l, p, corner, (a * w_corner) * g_d of every used point. No other thread writes that
// column: the result does not depend on the order of the threads.
template <typename T, typename I>
__device__ __forceinline__ void msda_grad_value_owned_impl(
    const T* __restrict__ grad_out, const T* __restrict__ loc, const T* __restrict__ attn,
    const i64* __restrict__ levels, acc_t<T>* __restrict__ partial, DFA_MSDA_PARAMS, i64 n0, i64 nb,
    i64 K, i64 QC) {
    typedef acc_t<T> A;
    const MsdaDims<I> g = msda_dims<I>(N_, S_, M_, D_, Lq_, L_, P_);
    const I inb = static_cast<I>(nb), qc = static_cast<I>(QC);
    const i64 total = K * nb * M_ * D_;
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I t = static_cast<I>(t64);
        const I r0 = t / g.D;
        const I d = t - r0 * g.D;
        const I r1 = r0 / g.M;
        const I m = r0 - r1 * g.M;
        const I c = r1 / inb;
        const I nl = r1 - c * inb;
        const I n = static_cast<I>(n0) + nl;
        A* col = partial + (r1 * g.S) * g.MD + m * g.D + d;  // r1 = c*nb + nl
        const I q_end = (c + 1) * qc < g.Lq ? (c + 1) * qc : g.Lq;
        for (I q = c * qc; q < q_end; ++q) {
            const I nqm = (n * g.Lq + q) * g.M + m;
            const A gd = to_acc(grad_out[nqm * g.D + d]);
            for (I l = 0; l < g.L; ++l) {
                const I H = static_cast<I>(levels[3 * l]), W = static_cast<I>(levels[3 * l + 1]);
                A* lev = col + static_cast<I>(levels[3 * l + 2]) * g.MD;
                const I pt0 = (nqm * g.L + l) * g.P;
                for (I k = 0; k < g.P; ++k) {
                    const I pt = pt0 + k;
                    const A h = pixel_coord(to_acc(loc[2 * pt + 1]), H);
                    const A w = pixel_coord(to_acc(loc[2 * pt]), W);
                    if (!msda_used(h, w, H, W)) continue;
                    const BilinearPoint<A, I> bp = bilinear_point(h, w, H, W);
                    scatter_owned(bp, lev, g.MD, to_acc(attn[pt]), gd);
                }
            }
        }
    }
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// The kernels (thin entry points: the 32-bit and 64-bit instantiations of the code above).

template <typename T>
__global__ void msda_forward_i32(const T* __restrict__ value, const T* __restrict__ loc,
                                 const T* __restrict__ attn, const i64* __restrict__ levels,
                                 T* __restrict__ out, DFA_MSDA_PARAMS) {
    dfa::msda_forward_impl<T, int>(value, loc, attn, levels, out, N_, S_, M_, D_, Lq_, L_, P_);
}

template <typename T>
__global__ void msda_forward_i64(const T* __restrict__ value, const T* __restrict__ loc,
                                 const T* __restrict__ attn, const i64* __restrict__ levels,
                                 T* __restrict__ out, DFA_MSDA_PARAMS) {
    dfa::msda_forward_impl<T, i64>(value, loc, attn, levels, out, N_, S_, M_, D_, Lq_, L_, P_);
}

#define DFA_MSDA_POINT_ARGS                                                                 \
    const T* __restrict__ value, const T* __restrict__ grad_out, const T* __restrict__ loc,   \
        const T* __restrict__ attn, const i64* __restrict__ levels, T* __restrict__ grad_loc, \
        T* __restrict__ grad_attn, acc_t<T>* __restrict__ grad_value, DFA_MSDA_PARAMS, i64 n0, i64 nb

template <typename T> __global__ void msda_backward_point_i32(DFA_MSDA_POINT_ARGS) {
    dfa::msda_backward_point_impl<T, int>(value, grad_out, loc, attn, levels, grad_loc, grad_attn, grad_value,
                                          N_, S_, M_, D_, Lq_, L_, P_, n0, nb);
}

template <typename T> __global__ void msda_backward_point_i64(DFA_MSDA_POINT_ARGS) {
    dfa::msda_backward_point_impl<T, i64>(value, grad_out, loc, attn, levels, grad_loc, grad_attn, grad_value,
                                          N_, S_, M_, D_, Lq_, L_, P_, n0, nb);
}

#define DFA_MSDA_OWNED_ARGS                                                                 \
    const T* __restrict__ grad_out, const T* __restrict__ loc, const T* __restrict__ attn,    \
        const i64* __restrict__ levels, acc_t<T>* __restrict__ partial, DFA_MSDA_PARAMS, i64 n0, \
        i64 nb, i64 K, i64 QC

template <typename T> __global__ void msda_grad_value_owned_i32(DFA_MSDA_OWNED_ARGS) {
    dfa::msda_grad_value_owned_impl<T, int>(grad_out, loc, attn, levels, partial, N_, S_, M_, D_, Lq_, L_, P_,
                                            n0, nb, K, QC);
}

template <typename T> __global__ void msda_grad_value_owned_i64(DFA_MSDA_OWNED_ARGS) {
    dfa::msda_grad_value_owned_impl<T, i64>(grad_out, loc, attn, levels, partial, N_, S_, M_, D_, Lq_, L_, P_,
                                            n0, nb, K, QC);
}

// out[i] = sum_{k = 0 .. K-1} partial[k*count + i] in that order, cast to T (K = 1: the cast
// of the 16-bit types' float32 accumulator).
template <typename T>
__global__ void msda_sum_chunks(const acc_t<T>* __restrict__ partial, T* __restrict__ out, i64 count, i64 K) {
    typedef acc_t<T> A;
    DFA_GRID_STRIDE_LOOP(i, count) {
        A s = partial[i];
        for (i64 k = 1; k < K; ++k) s += partial[k * count + i];
        out[i] = dfa::from_acc<T>(s);
    }
}
