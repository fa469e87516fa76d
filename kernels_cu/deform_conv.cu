// Deformable convolution v1/v2 (deformarray.deform_conv2d) kernels.
//
// Launch code: deformarray/cuda/deform_conv.py. Every kernel is a template on the element
// type T (float, double, dfa::half, dfa::bfloat16) and computes in A = acc_t<T> (float for
// the 16-bit types). Kernels with an _i32 / _i64 suffix are the same code with 32-bit or
// 64-bit index arithmetic (I = int or i64, as aggregate.cuh); the launch code takes _i32
// when every array, buffer and work range of the launch has fewer than 2**31 elements.
// Every scalar parameter is an i64 on both paths (the kernels narrow them).
//
// Design (DCNv4-style sampling; docs/cuda.md, "deform_conv2d"):
//  * the input is read channels-last: deform_conv_to_channels_last copies the chunk's
//    images (nb, C, H, W) to xcl (nb, H*W, C) in T once per image;
//  * one thread per sample point (og, k, l) (offset group, kernel point, chunk pixel; l
//    fastest, so the reads of offset and mask coalesce) computes the point, its corners and
//    their weights once, then loops over the offset group's channels: contiguous loads of
//    xcl and contiguous stores of the columns, no division in the channel loop;
//  * the columns are stored transposed and in T: colsT (L, CK) with CK = C*K, row l, the
//    block of conv group g at g*K*Cg (Cg = C/groups), inside it column k*Cg + (c - g*Cg).
//    The weight is permuted to the same order, wp (C_out, K, Cg), so the products are
//      forward:  res (L, C_out)[:, g] = colsT[:, g] @ wp[g]^T          (cuBLAS GemmEx)
//      backward: gw[g] += goutT[:, g]^T @ colsT[:, g];  gcolsT[:, g] = goutT[:, g] @ wp[g]
//    with 16-bit inputs and float32 accumulation / results for float16 and bfloat16;
//  * the input gradient is accumulated channels-last, gacc (nb, H*W, C) in A, and written to
//    grad_input (N, C, H, W) by deform_conv_from_channels_last when an image is complete:
//      atomic mode: deform_conv_col2im_atomic, one thread per point as the forward, float
//        atomicAdd on the four corners of each channel (contiguous addresses);
//      deterministic mode: deform_conv_col2im_owned, one thread per (sub-chunk s, offset
//        group og, j < J) is the only writer of channels og*Cpo + j, + J, + 2J ... of partial
//        buffer s: it computes each point of its sub-chunk once, in the order (l, k), and
//        adds it to its channels, corners in order; deform_conv_sum_partials adds the partials to gacc in
//        order s = 0, 1, ... (no atomics, no sort: the same bits on every run);
//  * offset and mask gradients: deform_conv_coord_grad, one thread per point summing over
//    its offset group's channels from the first (a fixed order in both modes).
//
// Layouts (C-contiguous): input (N, C, H, W); offset (N, 2*OG*K, Ho, Wo), channel
// 2*(og*K + k) = dy, 2*(og*K + k) + 1 = dx; mask (N, OG*K, Ho, Wo), channel og*K + k.
// Input channel c belongs to offset group og = c / (C / OG). A chunk is the flattened
// (image, output pixel) range q = n*P + p (P = Ho*Wo) from q0 to q0 + L - 1; its images
// start at n_base (the xcl / gacc buffers hold images n_base .. n_base + nb - 1).
//
// Numbers (SPEC, the CPU backend's): h = (ho*sh - ph + i*dh) + dy, w likewise (the integer
// part exact in A, the offset added last); a point is used iff -1 < h < H and -1 < w < W
// (aggregate.cuh's point_used with lower = -1: at exactly -1 value and gradient are 0);
// corners and weights as aggregate.cuh's bilinear_point.
//   cols = m * S_c;  grad input corner += w_corner * (m * gcol);
//   grad dy = m * sum_c gcol_c * dS_c/dh, grad dx = m * sum_c gcol_c * dS_c/dw,
//   grad m = sum_c gcol_c * S_c (sums over the group's channels from the first).

#include "common.cuh"
#include "aggregate.cuh"

using dfa::acc_t;
using dfa::i64;

// Every sampling kernel's geometry, in this order (the launch code's _geom_args).
#define DFA_GEOM_PARAMS                                                                    \
    i64 C_, i64 H_, i64 W_, i64 KH_, i64 KW_, i64 SH_, i64 SW_, i64 PH_, i64 PW_, i64 DH_,   \
        i64 DW_, i64 HO_, i64 WO_, i64 OG_, i64 GROUPS_
#define DFA_GEOM_ARGS C_, H_, W_, KH_, KW_, SH_, SW_, PH_, PW_, DH_, DW_, HO_, WO_, OG_, GROUPS_

namespace dfa {

// The geometry of one launch in the index type I.
template <typename I> struct ConvGeom {
    I C, H, W, HW, KW, K, sh, sw, ph, pw, dh, dw, Wo, P, OG, Cpo, Cg, CK, KCg;
};

template <typename I> __device__ __forceinline__ ConvGeom<I> conv_geom(DFA_GEOM_PARAMS) {
    ConvGeom<I> g;
    g.C = static_cast<I>(C_);
    g.H = static_cast<I>(H_);
    g.W = static_cast<I>(W_);
    g.HW = g.H * g.W;
    g.KW = static_cast<I>(KW_);
    g.K = static_cast<I>(KH_) * g.KW;
    g.sh = static_cast<I>(SH_);
    g.sw = static_cast<I>(SW_);
    g.ph = static_cast<I>(PH_);
    g.pw = static_cast<I>(PW_);
    g.dh = static_cast<I>(DH_);
    g.dw = static_cast<I>(DW_);
    g.Wo = static_cast<I>(WO_);
    g.P = static_cast<I>(HO_) * g.Wo;
    g.OG = static_cast<I>(OG_);
    g.Cpo = g.C / g.OG;                        // channels per offset group
    g.Cg = g.C / static_cast<I>(GROUPS_);      // channels per conv group
    g.CK = g.C * g.K;
    g.KCg = g.K * g.Cg;
    return g;
}

// Sample point of (offset group og, kernel point k, chunk pixel q = n*P + p). The tap
// position ho*sh - ph + i*dh is formed in 64-bit (it may be negative or exceed I's range only
// for absurd paddings; 64-bit costs nothing here, once per point).
template <typename T, typename I> struct ConvPoint {
    acc_t<T> h, w, m;
    I n;  // image
    bool used;
};

// The point of (og, k) at pixel p = ho*Wo + wo of image n, kernel tap k = i*KW + j.
template <typename T, typename I>
__device__ __forceinline__ ConvPoint<T, I> conv_point_at(const ConvGeom<I>& g, const T* offset, const T* mask, I og,
                                                         I k, I n, I p, I ho, I wo, I i, I j) {
    typedef acc_t<T> A;
    ConvPoint<T, I> s;
    s.n = n;
    const I ok = og * g.K + k;
    const T* off = offset + (n * 2 * g.OG * g.K + 2 * ok) * g.P + p;
    const i64 th = static_cast<i64>(ho) * g.sh - g.ph + static_cast<i64>(i) * g.dh;
    const i64 tw = static_cast<i64>(wo) * g.sw - g.pw + static_cast<i64>(j) * g.dw;
    // The integer part is exact in A; adding the offset last matches the CPU backend.
    s.h = static_cast<A>(th) + to_acc(off[0]);
    s.w = static_cast<A>(tw) + to_acc(off[g.P]);
    s.m = mask != nullptr ? to_acc(mask[(n * g.OG * g.K + ok) * g.P + p]) : A(1);
    s.used = point_used(s.h, s.w, g.H, g.W, A(-1));
    return s;
}

template <typename T, typename I>
__device__ __forceinline__ ConvPoint<T, I> conv_point(const ConvGeom<I>& g, const T* offset, const T* mask,
                                                      I og, I k, I q) {
    const I n = q / g.P;
    const I p = q - n * g.P;
    const I ho = p / g.Wo, wo = p - ho * g.Wo;
    const I i = k / g.KW, j = k - i * g.KW;
    return conv_point_at<T, I>(g, offset, mask, og, k, n, p, ho, wo, i, j);
}

// Corner rows of a used point in a channels-last image (row stride C): pointers to channel 0
// of each corner (a corner outside the image points at row 0 and is masked by in[q]).
template <typename T, typename A, typename I> struct CornerRows {
    const T* row[4];
    bool in[4];
};

template <typename T, typename A, typename I>
__device__ __forceinline__ CornerRows<T, A, I> corner_rows(const BilinearPoint<A, I>& bp, const T* img, I C) {
    CornerRows<T, A, I> r;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        r.in[q] = bp.idx[q] >= 0;
        r.row[q] = img + (r.in[q] ? bp.idx[q] * C : I(0));
    }
    return r;
}

// Split a point index t = (og*K + k)*L + l (l fastest).
template <typename I>
__device__ __forceinline__ void split_point(const ConvGeom<I>& g, I t, I L, I* og, I* k, I* l) {
    const I ok = t / L;
    *l = t - ok * L;
    *og = ok / g.K;
    *k = ok - *og * g.K;
}

// ---------------------------------------------------------------------------------------
// Channels-last copy of images n_base .. n_base + nb - 1: xcl[(nl*HW + r)*C + c] =
// input[((n_base + nl)*C + c)*HW + r]. Thread t = nl*HW + r (one row of xcl; the reads of
// neighbouring threads coalesce) loops over the channels: one division per row, none in the
// channel loop.
template <typename T, typename I>
__device__ __forceinline__ void to_channels_last_impl(const T* __restrict__ input, T* __restrict__ xcl, i64 C_,
                                                      i64 HW_, i64 n_base, i64 nb) {
    const I C = static_cast<I>(C_), HW = static_cast<I>(HW_);
    const T* src = input + n_base * C_ * HW_;
    DFA_GRID_STRIDE_LOOP(t64, nb * HW_) {
        const I nr = static_cast<I>(t64);
        const I nl = nr / HW;
        const T* s = src + (nl * (C - 1) * HW + nr);  // channel 0 of (nl, r); channel c at + c*HW
        T* d = xcl + nr * C;
        for (I c = 0; c < C; ++c) d[c] = s[c * HW];
    }
}

// The inverse, with the conversion to T: out[((n_base + nl)*C + c)*HW + r] =
// from_acc(gacc[(nl*HW + r)*C + c]). Thread t = nl*HW + r (the writes of neighbouring threads
// coalesce) loops over the channels.
template <typename T, typename I>
__device__ __forceinline__ void from_channels_last_impl(const acc_t<T>* __restrict__ gacc, T* __restrict__ out,
                                                        i64 C_, i64 HW_, i64 n_base, i64 nb) {
    const I C = static_cast<I>(C_), HW = static_cast<I>(HW_);
    T* dst = out + n_base * C_ * HW_;
    DFA_GRID_STRIDE_LOOP(t64, nb * HW_) {
        const I nr = static_cast<I>(t64);
        const I nl = nr / HW;
        T* d = dst + (nl * (C - 1) * HW + nr);
        const acc_t<T>* s = gacc + nr * C;
        for (I c = 0; c < C; ++c) d[c * HW] = from_acc<T>(s[c]);
    }
}

// ---------------------------------------------------------------------------------------
// Forward and backward: the transposed columns colsT (L, CK) in T (layout above). One thread
// per point; an unused point writes zeros.
template <typename T, typename I>
__device__ __forceinline__ void im2col_impl(const T* __restrict__ xcl, const T* __restrict__ offset,
                                            const T* __restrict__ mask, T* __restrict__ colsT, DFA_GEOM_PARAMS,
                                            i64 q0, i64 L_, i64 n_base) {
    typedef acc_t<T> A;
    const ConvGeom<I> g = conv_geom<I>(DFA_GEOM_ARGS);
    const I L = static_cast<I>(L_), Q0 = static_cast<I>(q0), NB = static_cast<I>(n_base);
    DFA_GRID_STRIDE_LOOP(t64, OG_ * KH_ * KW_ * L_) {
        I og, k, l;
        split_point(g, static_cast<I>(t64), L, &og, &k, &l);
        const ConvPoint<T, I> s = conv_point(g, offset, mask, og, k, Q0 + l);
        T* row = colsT + l * g.CK;
        I c = og * g.Cpo;
        const I c_end = c + g.Cpo;
        if (!s.used) {
            while (c < c_end) {  // one conv group's run of channels at a time
                const I gr = c / g.Cg;
                const I seg_end = c_end < (gr + 1) * g.Cg ? c_end : (gr + 1) * g.Cg;
                T* dst = row + gr * g.KCg + k * g.Cg - gr * g.Cg;
                for (; c < seg_end; ++c) dst[c] = from_acc<T>(A(0));
            }
            continue;
        }
        const BilinearPoint<A, I> bp = bilinear_point(s.h, s.w, g.H, g.W);
        const CornerRows<T, A, I> cr = corner_rows<T, A, I>(bp, xcl + (s.n - NB) * g.HW * g.C, g.C);
        while (c < c_end) {
            const I gr = c / g.Cg;
            const I seg_end = c_end < (gr + 1) * g.Cg ? c_end : (gr + 1) * g.Cg;
            // 32-bit steps from pointers at c: the same loop in the _i32 and _i64 kernels (a
            // 64-bit channel index made ptxas redo 64-bit address sums per access).
            T* dst = row + gr * g.KCg + k * g.Cg - gr * g.Cg + c;
            const T* src[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) src[q] = cr.row[q] + c;
            const int len = static_cast<int>(seg_end - c);
            for (int e = 0; e < len; ++e) {
                A v[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = cr.in[q] ? to_acc(src[q][e]) : A(0);
                dst[e] = from_acc<T>(s.m * combine(bp, v));
            }
            c = seg_end;
        }
    }
}

// Forward: out[n, o, p] = res[l, o] + bias[o] for q = q0 + l = n*P + p (res (L, C_out) in A,
// the product). Thread t = l (the writes of neighbouring threads coalesce) loops over o: one
// division per pixel, none in the loop. bias may be null.
template <typename T, typename I>
__device__ __forceinline__ void store_output_impl(const acc_t<T>* __restrict__ res, const T* __restrict__ bias,
                                                  T* __restrict__ out, i64 C_out_, i64 P_, i64 q0, i64 L_) {
    typedef acc_t<T> A;
    const I C_out = static_cast<I>(C_out_), P = static_cast<I>(P_);
    const I Q0 = static_cast<I>(q0);
    DFA_GRID_STRIDE_LOOP(t64, L_) {
        const I l = static_cast<I>(t64);
        const I q = Q0 + l;
        const I n = q / P;
        T* d = out + (n * (C_out - 1) * P + q);  // channel 0 of (n, p); channel o at + o*P
        const A* s = res + l * C_out;
        for (I o = 0; o < C_out; ++o) {
            A v = s[o];
            if (bias != nullptr) v += to_acc(bias[o]);
            d[o * P] = from_acc<T>(v);
        }
    }
}

// Backward: goutT[l, o] = grad_output[n, o, p] for q = q0 + l = n*P + p, in T (the inverse
// of store_output). Thread t = l (the reads coalesce) loops over o.
template <typename T, typename I>
__device__ __forceinline__ void gather_grad_output_impl(const T* __restrict__ grad_output, T* __restrict__ goutT,
                                                        i64 C_out_, i64 P_, i64 q0, i64 L_) {
    const I C_out = static_cast<I>(C_out_), P = static_cast<I>(P_);
    const I Q0 = static_cast<I>(q0);
    DFA_GRID_STRIDE_LOOP(t64, L_) {
        const I l = static_cast<I>(t64);
        const I q = Q0 + l;
        const I n = q / P;
        const T* s = grad_output + (n * (C_out - 1) * P + q);
        T* d = goutT + l * C_out;
        for (I o = 0; o < C_out; ++o) d[o] = s[o * P];
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient, atomic mode. One thread per point adds w_corner * (m * gcol_c)
// to channel c of each corner inside the image in gacc (nb, HW, C) (float atomics: the order
// of the additions, so the last bits, is the scheduler's).
template <typename T, typename I>
__device__ __forceinline__ void col2im_atomic_impl(const T* __restrict__ offset, const T* __restrict__ mask,
                                                   const acc_t<T>* __restrict__ gcolsT, acc_t<T>* __restrict__ gacc,
                                                   DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base) {
    typedef acc_t<T> A;
    const ConvGeom<I> g = conv_geom<I>(DFA_GEOM_ARGS);
    const I L = static_cast<I>(L_), Q0 = static_cast<I>(q0), NB = static_cast<I>(n_base);
    DFA_GRID_STRIDE_LOOP(t64, OG_ * KH_ * KW_ * L_) {
        I og, k, l;
        split_point(g, static_cast<I>(t64), L, &og, &k, &l);
        const ConvPoint<T, I> s = conv_point(g, offset, mask, og, k, Q0 + l);
        if (!s.used) continue;  // zero value, zero gradient
        const BilinearPoint<A, I> bp = bilinear_point(s.h, s.w, g.H, g.W);
        A* img = gacc + (s.n - NB) * g.HW * g.C;
        const A* row = gcolsT + l * g.CK;
        I c = og * g.Cpo;
        const I c_end = c + g.Cpo;
        while (c < c_end) {
            const I gr = c / g.Cg;
            const I seg_end = c_end < (gr + 1) * g.Cg ? c_end : (gr + 1) * g.Cg;
            const A* src = row + gr * g.KCg + k * g.Cg - gr * g.Cg;
            for (; c < seg_end; ++c) {
                const A gv = s.m * src[c];
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    if (bp.idx[q] >= 0) atomicAdd(img + bp.idx[q] * g.C + c, bp.wt[q] * gv);
            }
        }
    }
}

// Backward: input gradient, deterministic mode. The chunk's L pixels are cut into S
// sub-chunks of LS pixels (the last may be shorter). Thread t = (s*OG + og)*J + j (j
// fastest: neighbouring threads own neighbouring channels, so the reads of gcolsT and the
// writes of partial coalesce) owns the channels c = og*Cpo + j + i*J (i = 0, 1, ...) of
// offset group og in partial buffer s, partial (S, nb, HW, C) in A (1 <= J <= Cpo). For each
// point of its sub-chunk, in the order (l, k), it computes the sample point and its corners
// once (pixel and kernel tap stepped without division) and adds, for each of its channels
// and corner in order, w_corner * (m * gcol) to that channel of the corner: every element
// of a buffer has one writer and receives its terms in the order (l, k, corner), whatever
// the order of the threads. With S = 1 the launch code passes gacc itself.
template <typename T, typename I>
__device__ __forceinline__ void col2im_owned_impl(const T* __restrict__ offset, const T* __restrict__ mask,
                                                  const acc_t<T>* __restrict__ gcolsT,
                                                  acc_t<T>* __restrict__ partial, DFA_GEOM_PARAMS, i64 q0, i64 L_,
                                                  i64 n_base, i64 nb, i64 J_, i64 S_, i64 LS_) {
    typedef acc_t<T> A;
    const ConvGeom<I> g = conv_geom<I>(DFA_GEOM_ARGS);
    const I L = static_cast<I>(L_), Q0 = static_cast<I>(q0), NB = static_cast<I>(n_base);
    const I J = static_cast<I>(J_), LS = static_cast<I>(LS_), per_buffer = static_cast<I>(nb) * g.HW * g.C;
    // Channel c of conv group gr sits in column gr*KCg + k*Cg + (c - gr*Cg) = c + gr*skip + k*Cg
    // of a gcolsT row: within one conv group the column is c plus a constant, so the channel
    // loops below walk one conv group's segment at a time with 32-bit steps (J < 2^31 and a
    // segment is shorter than Cg), the same loop in the _i32 and _i64 kernels.
    const I skip = g.KCg - g.Cg;
    const int step = static_cast<int>(J_);
    DFA_GRID_STRIDE_LOOP(t64, S_ * OG_ * J_) {
        const I t = static_cast<I>(t64);
        const I so = t / J;
        const I j = t - so * J;
        const I sc = so / g.OG;
        const I og = so - sc * g.OG;
        const I c_first = og * g.Cpo + j, c_end = og * g.Cpo + g.Cpo;
        const I gr0 = c_first / g.Cg;
        A* buf = partial + sc * per_buffer;
        const I l0 = sc * LS;
        const I l_end = LS < L - l0 ? l0 + LS : L;
        if (l0 >= l_end) continue;
        // pixel of l0: image n, flat p = ho*Wo + wo
        I n = (Q0 + l0) / g.P;
        I p = Q0 + l0 - n * g.P;
        I ho = p / g.Wo;
        I wo = p - ho * g.Wo;
        for (I l = l0; l < l_end; ++l) {
            const A* row = gcolsT + l * g.CK;
            I ki = 0, kj = 0;
            for (I k = 0; k < g.K; ++k) {
                const ConvPoint<T, I> s = conv_point_at<T, I>(g, offset, mask, og, k, n, p, ho, wo, ki, kj);
                if (++kj == g.KW) {
                    kj = 0;
                    ++ki;
                }
                if (!s.used) continue;
                const BilinearPoint<A, I> bp = bilinear_point(s.h, s.w, g.H, g.W);
                A* img = buf + (n - NB) * g.HW * g.C;
                const bool all_in = bp.idx[0] >= 0 && bp.idx[1] >= 0 && bp.idx[2] >= 0 && bp.idx[3] >= 0;
                I c = c_first, gr = gr0, g_end = (gr0 + 1) * g.Cg;
                while (c < c_end) {
                    const int len = static_cast<int>((g_end < c_end ? g_end : c_end) - c);
                    const A* src = row + k * g.Cg + gr * skip + c;
                    int e = 0;
                    if (all_in) {
                        // The hot loop: an interior point, its four corner rows in the image.
                        A* d0 = img + bp.idx[0] * g.C + c;
                        A* d1 = img + bp.idx[1] * g.C + c;
                        A* d2 = img + bp.idx[2] * g.C + c;
                        A* d3 = img + bp.idx[3] * g.C + c;
                        // Pointers stepped in place: one IMAD.WIDE each (indexing from the
                        // chunk's base made ptxas redo 64-bit address sums per access).
                        const A* sp = src;
                        for (; e < len; e += step) {
                            const A gv = s.m * *sp;
                            *d0 += bp.wt[0] * gv;
                            *d1 += bp.wt[1] * gv;
                            *d2 += bp.wt[2] * gv;
                            *d3 += bp.wt[3] * gv;
                            sp += step;
                            d0 += step;
                            d1 += step;
                            d2 += step;
                            d3 += step;
                        }
                    } else {
                        // A border point: a corner outside the image is skipped.
                        A* d[4];
#pragma unroll
                        for (int q = 0; q < 4; ++q) d[q] = img + (bp.idx[q] >= 0 ? bp.idx[q] * g.C : I(0)) + c;
                        for (; e < len; e += step) {
                            const A gv = s.m * src[e];
#pragma unroll
                            for (int q = 0; q < 4; ++q)
                                if (bp.idx[q] >= 0) d[q][e] += bp.wt[q] * gv;
                        }
                    }
                    c += e;
                    while (c >= g_end) {  // more than once only when J > Cg
                        ++gr;
                        g_end += g.Cg;
                    }
                }
            }
            ++p;
            if (++wo == g.Wo) {
                wo = 0;
                ++ho;
            }
            if (p == g.P) {
                p = 0;
                ho = 0;
                ++n;
            }
        }
    }
}

// gacc[i] += partial[0*count + i] + partial[1*count + i] + ... (left to right, S >= 2).
template <typename T, typename I>
__device__ __forceinline__ void sum_partials_impl(const acc_t<T>* __restrict__ partial,
                                                  acc_t<T>* __restrict__ gacc, i64 count, i64 S) {
    typedef acc_t<T> A;
    const I n = static_cast<I>(count), s_n = static_cast<I>(S);
    DFA_GRID_STRIDE_LOOP(t64, count) {
        const I i = static_cast<I>(t64);
        A v = partial[i];
        for (I s = 1; s < s_n; ++s) v += partial[s * n + i];
        gacc[i] += v;
    }
}

// ---------------------------------------------------------------------------------------
// Backward: offset and mask gradients. One thread per point sums over the channels of its
// offset group from the first (a fixed order, no atomics: deterministic in both modes); all
// zero for an unused point. grad_mask may be null (no mask).
template <typename T, typename I>
__device__ __forceinline__ void coord_grad_impl(const T* __restrict__ xcl, const T* __restrict__ offset,
                                                const T* __restrict__ mask, const acc_t<T>* __restrict__ gcolsT,
                                                T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                                DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base) {
    typedef acc_t<T> A;
    const ConvGeom<I> g = conv_geom<I>(DFA_GEOM_ARGS);
    const I L = static_cast<I>(L_), Q0 = static_cast<I>(q0), NB = static_cast<I>(n_base);
    DFA_GRID_STRIDE_LOOP(t64, OG_ * KH_ * KW_ * L_) {
        I og, k, l;
        split_point(g, static_cast<I>(t64), L, &og, &k, &l);
        const ConvPoint<T, I> s = conv_point(g, offset, mask, og, k, Q0 + l);
        A g_h = A(0), g_w = A(0), g_m = A(0);
        if (s.used) {
            const BilinearPoint<A, I> bp = bilinear_point(s.h, s.w, g.H, g.W);
            const CornerRows<T, A, I> cr = corner_rows<T, A, I>(bp, xcl + (s.n - NB) * g.HW * g.C, g.C);
            const A* row = gcolsT + l * g.CK;
            I c = og * g.Cpo;
            const I c_end = c + g.Cpo;
            while (c < c_end) {
                const I gr = c / g.Cg;
                const I seg_end = c_end < (gr + 1) * g.Cg ? c_end : (gr + 1) * g.Cg;
                const A* src = row + gr * g.KCg + k * g.Cg - gr * g.Cg;
                for (; c < seg_end; ++c) {
                    A v[4];
#pragma unroll
                    for (int q = 0; q < 4; ++q) v[q] = cr.in[q] ? to_acc(cr.row[q][c]) : A(0);
                    const A gv = src[c];
                    g_h += gv * (bp.hw * (v[2] - v[0]) + bp.lw * (v[3] - v[1]));
                    g_w += gv * (bp.hh * (v[1] - v[0]) + bp.lh * (v[3] - v[2]));
                    g_m += gv * combine(bp, v);
                }
            }
            g_h *= s.m;
            g_w *= s.m;
        }
        const I p = Q0 + l - s.n * g.P;
        const I ok = og * g.K + k;
        T* go = grad_offset + (s.n * 2 * g.OG * g.K + 2 * ok) * g.P + p;
        go[0] = from_acc<T>(g_h);
        go[g.P] = from_acc<T>(g_w);
        if (grad_mask != nullptr) grad_mask[(s.n * g.OG * g.K + ok) * g.P + p] = from_acc<T>(g_m);
    }
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// The kernels: thin entry points, the 32-bit and 64-bit instantiations of the code above.

#define DFA_TWO_PATHS(name, impl, PARAMS, ARGS)                                                       \
    template <typename T> __global__ void name##_i32 PARAMS { dfa::impl<T, int> ARGS; }              \
    template <typename T> __global__ void name##_i64 PARAMS { dfa::impl<T, i64> ARGS; }

DFA_TWO_PATHS(deform_conv_to_channels_last, to_channels_last_impl,
              (const T* __restrict__ input, T* __restrict__ xcl, i64 C_, i64 HW_, i64 n_base, i64 nb),
              (input, xcl, C_, HW_, n_base, nb))

DFA_TWO_PATHS(deform_conv_from_channels_last, from_channels_last_impl,
              (const acc_t<T>* __restrict__ gacc, T* __restrict__ out, i64 C_, i64 HW_, i64 n_base, i64 nb),
              (gacc, out, C_, HW_, n_base, nb))

DFA_TWO_PATHS(deform_conv_im2col, im2col_impl,
              (const T* __restrict__ xcl, const T* __restrict__ offset, const T* __restrict__ mask,
               T* __restrict__ colsT, DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base),
              (xcl, offset, mask, colsT, DFA_GEOM_ARGS, q0, L_, n_base))

DFA_TWO_PATHS(deform_conv_store_output, store_output_impl,
              (const acc_t<T>* __restrict__ res, const T* __restrict__ bias, T* __restrict__ out, i64 C_out_,
               i64 P_, i64 q0, i64 L_),
              (res, bias, out, C_out_, P_, q0, L_))

DFA_TWO_PATHS(deform_conv_gather_grad_output, gather_grad_output_impl,
              (const T* __restrict__ grad_output, T* __restrict__ goutT, i64 C_out_, i64 P_, i64 q0, i64 L_),
              (grad_output, goutT, C_out_, P_, q0, L_))

DFA_TWO_PATHS(deform_conv_col2im_atomic, col2im_atomic_impl,
              (const T* __restrict__ offset, const T* __restrict__ mask, const acc_t<T>* __restrict__ gcolsT,
               acc_t<T>* __restrict__ gacc, DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base),
              (offset, mask, gcolsT, gacc, DFA_GEOM_ARGS, q0, L_, n_base))

DFA_TWO_PATHS(deform_conv_col2im_owned, col2im_owned_impl,
              (const T* __restrict__ offset, const T* __restrict__ mask, const acc_t<T>* __restrict__ gcolsT,
               acc_t<T>* __restrict__ partial, DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base, i64 nb, i64 J_,
               i64 S_, i64 LS_),
              (offset, mask, gcolsT, partial, DFA_GEOM_ARGS, q0, L_, n_base, nb, J_, S_, LS_))

DFA_TWO_PATHS(deform_conv_sum_partials, sum_partials_impl,
              (const acc_t<T>* __restrict__ partial, acc_t<T>* __restrict__ gacc, i64 count, i64 S),
              (partial, gacc, count, S))

DFA_TWO_PATHS(deform_conv_coord_grad, coord_grad_impl,
              (const T* __restrict__ xcl, const T* __restrict__ offset, const T* __restrict__ mask,
               const acc_t<T>* __restrict__ gcolsT, T* __restrict__ grad_offset, T* __restrict__ grad_mask,
               DFA_GEOM_PARAMS, i64 q0, i64 L_, i64 n_base),
              (xcl, offset, mask, gcolsT, grad_offset, grad_mask, DFA_GEOM_ARGS, q0, L_, n_base))

// ---------------------------------------------------------------------------------------
// Weight-sized conversions (64-bit indices: weight-sized work).
// wp[(o*K + k)*Cg + cg] = w[(o*Cg + cg)*K + k]: the weight in the columns' order, in T.
// Thread t = o*K + k (one row of wp) loops over cg: one division per row, none in the loop.
template <typename T>
__global__ void deform_conv_permute_weight(const T* __restrict__ w, T* __restrict__ wp, i64 C_out, i64 Cg, i64 K) {
    DFA_GRID_STRIDE_LOOP(ok, C_out * K) {
        const i64 o = ok / K;
        const T* s = w + (o * Cg * K + (ok - o * K));  // w[o, 0, k]; cg at + cg*K
        T* d = wp + ok * Cg;
        for (i64 cg = 0; cg < Cg; ++cg) d[cg] = s[cg * K];
    }
}

// grad_w[(o*Cg + cg)*K + k] = from_acc(gwp[(o*K + k)*Cg + cg]): the inverse, cast to T.
// Thread t = o*K + k loops over cg.
template <typename T>
__global__ void deform_conv_unpermute_weight(const acc_t<T>* __restrict__ gwp, T* __restrict__ grad_w, i64 C_out,
                                             i64 Cg, i64 K) {
    DFA_GRID_STRIDE_LOOP(ok, C_out * K) {
        const i64 o = ok / K;
        T* d = grad_w + (o * Cg * K + (ok - o * K));
        const acc_t<T>* s = gwp + ok * Cg;
        for (i64 cg = 0; cg < Cg; ++cg) d[cg * K] = dfa::from_acc<T>(s[cg]);
    }
}

// Elementwise conversion from the accumulator type (grad bias), written here so that no
// CuPy elementwise kernel ever has to handle a 16-bit type (CuPy's need cuda_fp16.h /
// cuda_bf16.h at run time).
template <typename T>
__global__ void deform_conv_from_acc(const acc_t<T>* __restrict__ src, T* __restrict__ dst, i64 n) {
    DFA_GRID_STRIDE_LOOP(i, n) { dst[i] = dfa::from_acc<T>(src[i]); }
}

// grad_bias[o] += sum over l of goutT[l, o], l = 0 first (one thread per o: a fixed order).
template <typename T>
__global__ void deform_conv_bias_grad(const T* __restrict__ goutT, acc_t<T>* __restrict__ gb, i64 C_out, i64 L) {
    typedef acc_t<T> A;
    DFA_GRID_STRIDE_LOOP(o, C_out) {
        A s = A(0);
        for (i64 l = 0; l < L; ++l) s += dfa::to_acc(goutT[l * C_out + o]);
        gb[o] += s;
    }
}
