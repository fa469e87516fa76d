// DCNv3 (InternImage) and DCNv4 (FlashInternImage) kernels: one file for both, through the
// generic offset / mask indexing of deformarray._validate_dcn.DcnParams.
//
// Launch code: deformarray/cuda/dcn.py. Every kernel is a template on the element type T
// (float, double, dfa::half, dfa::bfloat16) and computes in A = acc_t<T>. The kernels with
// an _i32 / _i64 suffix are the same code with 32-bit or 64-bit index arithmetic
// (aggregate.cuh: I); the launch code takes _i32 when every array, buffer and work range of
// the launch has fewer than 2**31 elements. The tap geometry (i*dw, wo*sw - pw + e_w, ...)
// is always 64-bit.
//
// Layouts (all C-contiguous, channels-last): input (N, H, W, G*D), channel g*D + d;
// offset (N, Ho, Wo, OFFC), mask (N, Ho, Wo, MASKC); for output pixel q = ho*Wo + wo of
// image n, group g and point k:
//   off_x = offset[(n*Q + q)*OFFC + g*OFFG + 2*k], off_y = the next entry,
//   m     = mask[(n*Q + q)*MASKC + MASKB + g*MASKG + k]
// (DCNv3: OFFG = 2P, MASKB = 0, MASKG = P; DCNv4: offset and mask are the same buffer,
// offset_mask, OFFG = MASKG = 3P, MASKB = 2P). out / grad_out (N, Ho, Wo, G*D).
//
// Numbers (the CPU backend's, deformarray/cpu/dcn.py): tap (i, j), i = 0..kw-1 along the
// width (outer), j = 0..kh-1 along the height (inner), point k counting the kept taps (the
// tap (kw/2, kh/2) skipped when remove_center); with e_w = (dw*(kw-1))/2, s = A(scale):
//   base_x = A(wo*sw - pw + e_w) - A(e_w)*s,  x = base_x + (A(i*dw) + off_x)*s
// (and y alike with ho, sh, ph, e_h, j, dh), each operation rounded on its own (mul_rn,
// add_rn, sub_rn: NVRTC would fuse them); a point is used iff -1 < y < H and -1 < x < W
// (point_used, lower = -1; NaN and inf are not); others contribute 0 and get zero
// gradients. Corners, weights, S_d and its derivatives as aggregate.cuh.
//   out[n, ho, wo, g*D + d] = sum over k (in order) of m * S_d;
//   grad_input[corner, g*D + d] += (m * w_corner) * g_d;  grad_mask = sum_d g_d * S_d;
//   grad_off_x = (m * s) * sum_d g_d * dS_d/dx, grad_off_y = (m * s) * sum_d g_d * dS_d/dy
//   (sums over d from d = 0, in one thread).
//
//   forward:   dcn_forward (one thread per output element (n, q, g, d), d fastest)
//   backward:  dcn_backward_point (one thread per point (n, q, g, k): the offset and mask
//              gradients, and, unless grad_input is null, grad_input by atomics);
//              deterministic grad_input: dcn_grad_input_owned (one thread per (query chunk,
//              image, g, d), the only writer of its column of a per-chunk partial buffer)
//              then dcn_sum_chunks (partials added in chunk order, cast to T).

#include "common.cuh"
#include "aggregate.cuh"

using dfa::acc_t;
using dfa::i64;

// Every kernel's geometry, in this order (the launch code's _dims).
#define DFA_DCN_PARAMS                                                                          \
    i64 N_, i64 H_, i64 W_, i64 G_, i64 D_, i64 HO_, i64 WO_, i64 KH_, i64 KW_, i64 SH_, i64 SW_, \
        i64 PH_, i64 PW_, i64 DH_, i64 DW_, i64 RC_, i64 P_, i64 OFFC_, i64 OFFG_, i64 MASKC_,  \
        i64 MASKB_, i64 MASKG_, double SCALE_
#define DFA_DCN_ARGS                                                                                 \
    N_, H_, W_, G_, D_, HO_, WO_, KH_, KW_, SH_, SW_, PH_, PW_, DH_, DW_, RC_, P_, OFFC_, OFFG_, MASKC_, \
        MASKB_, MASKG_, SCALE_

namespace dfa {

// The geometry of one launch: sizes in the index type I, taps in 64-bit.
template <typename A, typename I> struct DcnGeo {
    I H, W, G, D, GD, HW, Q, WO, P, offc, offg, maskc, maskb, maskg;
    I kc;       // the point index the centre tap would have (P when nothing is skipped)
    int kh, kw;
    int ci, cj;  // the skipped tap (i, j), (-1, -1) without remove_center
    i64 sh, sw, ph, pw, dh, dw, eh, ew;
    A s;
};

template <typename A, typename I> __device__ __forceinline__ DcnGeo<A, I> dcn_geo(DFA_DCN_PARAMS) {
    DcnGeo<A, I> g;
    g.H = static_cast<I>(H_);
    g.W = static_cast<I>(W_);
    g.G = static_cast<I>(G_);
    g.D = static_cast<I>(D_);
    g.GD = g.G * g.D;
    g.HW = g.H * g.W;
    g.Q = static_cast<I>(HO_) * static_cast<I>(WO_);
    g.WO = static_cast<I>(WO_);
    g.P = static_cast<I>(P_);
    g.offc = static_cast<I>(OFFC_);
    g.offg = static_cast<I>(OFFG_);
    g.maskc = static_cast<I>(MASKC_);
    g.maskb = static_cast<I>(MASKB_);
    g.maskg = static_cast<I>(MASKG_);
    g.kh = static_cast<int>(KH_);
    g.kw = static_cast<int>(KW_);
    g.ci = RC_ ? g.kw / 2 : -1;
    g.cj = RC_ ? g.kh / 2 : -1;
    g.kc = RC_ ? static_cast<I>((KW_ / 2) * KH_ + KH_ / 2) : g.P;
    g.sh = SH_;
    g.sw = SW_;
    g.ph = PH_;
    g.pw = PW_;
    g.dh = DH_;
    g.dw = DW_;
    g.eh = (DH_ * (KH_ - 1)) / 2;
    g.ew = (DW_ * (KW_ - 1)) / 2;
    g.s = static_cast<A>(SCALE_);
    (void)N_;
    return g;
}

// A(pos) - A(e)*s: where the kernel's first tap samples without offset.
template <typename A> __device__ __forceinline__ A dcn_base(i64 pos, i64 e, A s) {
    return sub_rn(static_cast<A>(pos), mul_rn(static_cast<A>(e), s));
}

// base + (A(tap) + off)*s: a sum, a product, a sum, in that order.
template <typename A> __device__ __forceinline__ A dcn_coord(A base, i64 tap, A off, A s) {
    return add_rn(base, mul_rn(add_rn(static_cast<A>(tap), off), s));
}

template <typename A, typename I> __device__ __forceinline__ A dcn_base_x(const DcnGeo<A, I>& g, I wo) {
    return dcn_base(static_cast<i64>(wo) * g.sw - g.pw + g.ew, g.ew, g.s);
}

template <typename A, typename I> __device__ __forceinline__ A dcn_base_y(const DcnGeo<A, I>& g, I ho) {
    return dcn_base(static_cast<i64>(ho) * g.sh - g.ph + g.eh, g.eh, g.s);
}

// ---------------------------------------------------------------------------------------
// Forward. Thread t = ((n*Q + q)*G + g)*D + d, the flat output index; the points in order.
template <typename T, typename I>
__device__ __forceinline__ void dcn_forward_impl(const T* __restrict__ input, const T* offset, const T* mask,
                                                 T* __restrict__ out, DFA_DCN_PARAMS) {
    typedef acc_t<T> A;
    const DcnGeo<A, I> g = dcn_geo<A, I>(DFA_DCN_ARGS);
    const i64 total = N_ * HO_ * WO_ * G_ * D_;
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I t = static_cast<I>(t64);
        const I nqg = t / g.D;
        const I d = t - nqg * g.D;
        const I nq = nqg / g.G;
        const I gr = nqg - nq * g.G;
        const I n = nq / g.Q;
        const I q = nq - n * g.Q;
        const I ho = q / g.WO;
        const I wo = q - ho * g.WO;
        const T* chan = input + n * g.HW * g.GD + gr * g.D + d;
        const T* off = offset + nq * g.offc + gr * g.offg;
        const T* msk = mask + nq * g.maskc + g.maskb + gr * g.maskg;
        const A base_x = dcn_base_x(g, wo), base_y = dcn_base_y(g, ho);
        A acc = A(0);
        I k = 0;
        i64 tx = 0;
        for (int i = 0; i < g.kw; ++i, tx += g.dw) {
            i64 ty = 0;
            for (int j = 0; j < g.kh; ++j, ty += g.dh) {
                if (i == g.ci && j == g.cj) continue;
                const A x = dcn_coord(base_x, tx, to_acc(off[2 * k]), g.s);
                const A y = dcn_coord(base_y, ty, to_acc(off[2 * k + 1]), g.s);
                if (point_used(y, x, g.H, g.W, A(-1))) {
                    const BilinearPoint<A, I> bp = bilinear_point(y, x, g.H, g.W);
                    acc += to_acc(msk[k]) * sample_channel(bp, chan, g.GD);
                }
                ++k;
            }
        }
        out[t] = from_acc<T>(acc);
    }
}

// ---------------------------------------------------------------------------------------
// Backward per point, for the points of images n0 .. n0+nb-1: thread t is point
// pt = n0*Q*G*P + t, pt = ((n*Q + q)*G + g)*P + k. Writes the point's offset and mask
// gradients (zero for an unused point; for DCNv4 grad_offset == grad_mask, the entries are
// disjoint); when grad_input is not null (it then points at image n0, (nb, H*W, G*D) in A)
// adds the point's input gradient to it with atomics.
template <typename T, typename I>
__device__ __forceinline__ void dcn_backward_point_impl(const T* __restrict__ input, const T* __restrict__ grad_out,
                                                        const T* offset, const T* mask, T* grad_offset,
                                                        T* grad_mask, acc_t<T>* __restrict__ grad_input,
                                                        DFA_DCN_PARAMS, i64 n0, i64 nb) {
    typedef acc_t<T> A;
    const DcnGeo<A, I> g = dcn_geo<A, I>(DFA_DCN_ARGS);
    const i64 per_image = HO_ * WO_ * G_ * P_;
    const i64 total = nb * per_image;
    const I first = static_cast<I>(n0 * per_image);
    const I in0 = static_cast<I>(n0);
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I pt = first + static_cast<I>(t64);
        const I nqg = pt / g.P;
        const I k = pt - nqg * g.P;
        const I nq = nqg / g.G;
        const I gr = nqg - nq * g.G;
        const I n = nq / g.Q;
        const I q = nq - n * g.Q;
        const I ho = q / g.WO;
        const I wo = q - ho * g.WO;
        const I tap = k + (k >= g.kc ? I(1) : I(0));  // the tap index i*kh + j
        const I i = tap / static_cast<I>(g.kh);
        const I j = tap - i * static_cast<I>(g.kh);
        const I oi = nq * g.offc + gr * g.offg + 2 * k;
        const I mi = nq * g.maskc + g.maskb + gr * g.maskg + k;
        const A x = dcn_coord(dcn_base_x(g, wo), static_cast<i64>(i) * g.dw, to_acc(offset[oi]), g.s);
        const A y = dcn_coord(dcn_base_y(g, ho), static_cast<i64>(j) * g.dh, to_acc(offset[oi + 1]), g.s);
        A g_mask = A(0), g_x = A(0), g_y = A(0);  // an unused point: zero gradients (even for a NaN m)
        if (point_used(y, x, g.H, g.W, A(-1))) {
            const A m = to_acc(mask[mi]);
            const BilinearPoint<A, I> bp = bilinear_point(y, x, g.H, g.W);
            A* gi = grad_input == nullptr ? nullptr : grad_input + (n - in0) * g.HW * g.GD + gr * g.D;
            A gdy, gdx;
            point_backward(bp, input + n * g.HW * g.GD + gr * g.D, g.GD, grad_out + nqg * g.D, g.D, m, gi,
                           &g_mask, &gdy, &gdx);
            const A ms = m * g.s;
            g_x = ms * gdx;
            g_y = ms * gdy;
        }
        grad_mask[mi] = from_acc<T>(g_mask);
        grad_offset[oi] = from_acc<T>(g_x);
        grad_offset[oi + 1] = from_acc<T>(g_y);
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic input gradient. The Q output pixels are cut into K chunks of QC (the last
// may be shorter); thread t = ((c*nb + nl)*G + g)*D + d owns column (g, d) of image n0 + nl
// in partial buffer c, partial (K, nb, H*W, G*D) in A, and adds to it, in the order q (of
// chunk c), k, corner, (m * w_corner) * g_d of every used point. No other thread writes
// that column: the result does not depend on the order of the threads.
template <typename T, typename I>
__device__ __forceinline__ void dcn_grad_input_owned_impl(const T* __restrict__ grad_out, const T* offset,
                                                          const T* mask, acc_t<T>* __restrict__ partial,
                                                          DFA_DCN_PARAMS, i64 n0, i64 nb, i64 K, i64 QC) {
    typedef acc_t<T> A;
    const DcnGeo<A, I> g = dcn_geo<A, I>(DFA_DCN_ARGS);
    const I inb = static_cast<I>(nb), qc = static_cast<I>(QC);
    const i64 total = K * nb * G_ * D_;
    DFA_GRID_STRIDE_LOOP(t64, total) {
        const I t = static_cast<I>(t64);
        const I r0 = t / g.D;
        const I d = t - r0 * g.D;
        const I r1 = r0 / g.G;
        const I gr = r0 - r1 * g.G;
        const I c = r1 / inb;
        const I nl = r1 - c * inb;
        const I n = static_cast<I>(n0) + nl;
        A* col = partial + r1 * g.HW * g.GD + gr * g.D + d;  // r1 = c*nb + nl
        const I q0 = c * qc;
        const I q_end = qc < g.Q - q0 ? q0 + qc : g.Q;  // no q0 + qc overflow
        I ho = q0 / g.WO;
        I wo = q0 - ho * g.WO;
        for (I q = q0; q < q_end; ++q) {
            const I nq = n * g.Q + q;
            const A gd = to_acc(grad_out[(nq * g.G + gr) * g.D + d]);
            const T* off = offset + nq * g.offc + gr * g.offg;
            const T* msk = mask + nq * g.maskc + g.maskb + gr * g.maskg;
            const A base_x = dcn_base_x(g, wo), base_y = dcn_base_y(g, ho);
            I k = 0;
            i64 tx = 0;
            for (int i = 0; i < g.kw; ++i, tx += g.dw) {
                i64 ty = 0;
                for (int j = 0; j < g.kh; ++j, ty += g.dh) {
                    if (i == g.ci && j == g.cj) continue;
                    const A x = dcn_coord(base_x, tx, to_acc(off[2 * k]), g.s);
                    const A y = dcn_coord(base_y, ty, to_acc(off[2 * k + 1]), g.s);
                    if (point_used(y, x, g.H, g.W, A(-1))) {
                        const BilinearPoint<A, I> bp = bilinear_point(y, x, g.H, g.W);
                        scatter_owned(bp, col, g.GD, to_acc(msk[k]), gd);
                    }
                    ++k;
                }
            }
            if (++wo == g.WO) {
                wo = 0;
                ++ho;
            }
        }
    }
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// The kernels (thin entry points: the 32-bit and 64-bit instantiations of the code above).

#define DFA_DCN_FORWARD_ARGS \
    const T* __restrict__ input, const T* offset, const T* mask, T* __restrict__ out, DFA_DCN_PARAMS

template <typename T> __global__ void dcn_forward_i32(DFA_DCN_FORWARD_ARGS) {
    dfa::dcn_forward_impl<T, int>(input, offset, mask, out, DFA_DCN_ARGS);
}

template <typename T> __global__ void dcn_forward_i64(DFA_DCN_FORWARD_ARGS) {
    dfa::dcn_forward_impl<T, i64>(input, offset, mask, out, DFA_DCN_ARGS);
}

#define DFA_DCN_POINT_ARGS                                                                              \
    const T* __restrict__ input, const T* __restrict__ grad_out, const T* offset, const T* mask,          \
        T* grad_offset, T* grad_mask, acc_t<T>* __restrict__ grad_input, DFA_DCN_PARAMS, i64 n0, i64 nb

template <typename T> __global__ void dcn_backward_point_i32(DFA_DCN_POINT_ARGS) {
    dfa::dcn_backward_point_impl<T, int>(input, grad_out, offset, mask, grad_offset, grad_mask, grad_input,
                                         DFA_DCN_ARGS, n0, nb);
}

template <typename T> __global__ void dcn_backward_point_i64(DFA_DCN_POINT_ARGS) {
    dfa::dcn_backward_point_impl<T, i64>(input, grad_out, offset, mask, grad_offset, grad_mask, grad_input,
                                         DFA_DCN_ARGS, n0, nb);
}

#define DFA_DCN_OWNED_ARGS                                                                        \
    const T* __restrict__ grad_out, const T* offset, const T* mask, acc_t<T>* __restrict__ partial, \
        DFA_DCN_PARAMS, i64 n0, i64 nb, i64 K, i64 QC

template <typename T> __global__ void dcn_grad_input_owned_i32(DFA_DCN_OWNED_ARGS) {
    dfa::dcn_grad_input_owned_impl<T, int>(grad_out, offset, mask, partial, DFA_DCN_ARGS, n0, nb, K, QC);
}

template <typename T> __global__ void dcn_grad_input_owned_i64(DFA_DCN_OWNED_ARGS) {
    dfa::dcn_grad_input_owned_impl<T, i64>(grad_out, offset, mask, partial, DFA_DCN_ARGS, n0, nb, K, QC);
}

// out[i] = sum_{k = 0 .. K-1} partial[k*count + i] in that order, cast to T (K = 1: the cast
// of the 16-bit types' float32 accumulator).
template <typename T>
__global__ void dcn_sum_chunks(const acc_t<T>* __restrict__ partial, T* __restrict__ out, i64 count, i64 K) {
    typedef acc_t<T> A;
    DFA_GRID_STRIDE_LOOP(i, count) {
        A s = partial[i];
        for (i64 k = 1; k < K; ++k) s += partial[k * count + i];
        out[i] = dfa::from_acc<T>(s);
    }
}
