// Deformable convolution v1/v2 (deformarray.deform_conv2d) kernels.
//
// Launch code: deformarray/cuda/deform_conv.py. Every kernel is a template on the element
// type T (float, double, dfa::half, dfa::bfloat16) and computes in acc_t<T> (float for the
// 16-bit types); the loader instantiates them by name, e.g. "deform_conv_im2col<float>".
//
// The launch code processes the flattened (image, output pixel) index q = n*P + p
// (P = H_out*W_out) in chunks q0 .. q0+L-1 that fit the workspace bound; a chunk is either
// whole images or part of one image. Column buffers are (C_in*K, L) matrices, row
// r = c*K + k (K = kh*kw, k = i*kw + j, the weight's own flattening), column l = q - q0:
//
//   forward:  cols = im2col(input, offset, mask); acc[g] = W[g] @ cols[g] (cuBLAS);
//             out = acc + bias (store_output)
//   backward: gout = gather_grad_output(grad_output); grad W[g] += gout[g] @ cols[g]^T;
//             gcols[g] = W[g]^T @ gout[g]; grad input = col2im(gcols) (atomic, or the
//             deterministic coo + gather pair); grad offset, grad mask = coord_grad(gcols)
//
// Layouts (all C-contiguous): input (N, C, H, W); offset (N, 2*OG*K, Ho, Wo), channel
// 2*(og*K + k) = dy, 2*(og*K + k) + 1 = dx; mask (N, OG*K, Ho, Wo), channel og*K + k.
// Input channel c belongs to offset group og = c / (C / OG).

#include "common.cuh"

using dfa::acc_t;
using dfa::i64;

namespace dfa {

// Geometry of one call: the fields of deformarray._validate.ConvParams the kernels need.
struct ConvGeom {
    i64 C, H, W;             // input channels and size
    i64 KW, K;               // kernel width, K = kh*kw
    i64 sh, sw, ph, pw, dh, dw;
    i64 Wo, P;               // output width, P = Ho*Wo
    i64 OG, Cpg;             // offset groups, input channels per offset group
};

// Every kernel takes the geometry as these scalars, in this order (the launch code's
// _geom_args builds the same tuple).
#define DFA_GEOM_PARAMS                                                                    \
    i64 C, i64 H, i64 W, i64 KH, i64 KW, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw,     \
        i64 Ho, i64 Wo, i64 OG
#define DFA_GEOM_ARGS C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, Ho, Wo, OG

__device__ __forceinline__ ConvGeom make_geom(DFA_GEOM_PARAMS) {
    ConvGeom g;
    g.C = C; g.H = H; g.W = W;
    g.KW = KW; g.K = KH * KW;
    g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw;
    g.Wo = Wo; g.P = Ho * Wo;
    g.OG = OG; g.Cpg = C / OG;
    return g;
}

// Sample point (h, w) and modulation m of kernel point k of offset group og for output
// pixel p of image n: h = ho*sh - ph + i*dh + dy, w = wo*sw - pw + j*dw + dx (SPEC).
// m = 1 without a mask (v1).
template <typename T> struct SamplePoint {
    acc_t<T> h, w, m;
};

template <typename T>
__device__ __forceinline__ SamplePoint<T> sample_point(const ConvGeom& g, const T* offset,
                                                       const T* mask, i64 n, i64 og, i64 k,
                                                       i64 p) {
    typedef acc_t<T> A;
    const i64 ho = p / g.Wo, wo = p - ho * g.Wo;
    const i64 i = k / g.KW, j = k - i * g.KW;
    const T* off = offset + (n * 2 * g.OG * g.K + 2 * (og * g.K + k)) * g.P + p;
    SamplePoint<T> s;
    // The integer part is exact in A; adding the offset last matches the CPU backend.
    s.h = static_cast<A>(ho * g.sh - g.ph + i * g.dh) + to_acc(off[0]);
    s.w = static_cast<A>(wo * g.sw - g.pw + j * g.dw) + to_acc(off[g.P]);
    s.m = mask != nullptr ? to_acc(mask[(n * g.OG * g.K + og * g.K + k) * g.P + p]) : A(1);
    return s;
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// Forward and backward: columns.
// cols[(c*K + k)*L + l] = m * X_c(h, w) for q = q0 + l. One thread per entry, l fastest,
// so that the writes and the reads of offset and mask are coalesced.
template <typename T>
__global__ void deform_conv_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                                   const T* __restrict__ mask, acc_t<T>* __restrict__ cols,
                                   DFA_GEOM_PARAMS, i64 q0, i64 L) {
    typedef acc_t<T> A;
    const dfa::ConvGeom g = dfa::make_geom(DFA_GEOM_ARGS);
    const i64 total = g.C * g.K * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 ck = idx / L;  // c*K + k
        const i64 k = ck % g.K;
        const i64 c = ck / g.K;
        const i64 q = q0 + l;
        const i64 n = q / g.P, p = q - n * g.P;
        const dfa::SamplePoint<T> s = dfa::sample_point(g, offset, mask, n, c / g.Cpg, k, p);
        A v = A(0);
        if (dfa::point_valid(s.h, s.w, g.H, g.W)) {
            v = s.m * dfa::bilinear_sample(input + (n * g.C + c) * g.H * g.W, g.H, g.W, s.h, s.w);
        }
        cols[idx] = v;
    }
}

// Forward: out[n, o, p] = acc[o, l] + bias[o] for q = q0 + l = n*P + p (acc is the (C_out, L)
// product of the matmuls). bias may be null.
template <typename T>
__global__ void deform_conv_store_output(const acc_t<T>* __restrict__ acc,
                                         const T* __restrict__ bias, T* __restrict__ out,
                                         i64 C_out, i64 P, i64 q0, i64 L) {
    typedef acc_t<T> A;
    const i64 total = C_out * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 o = idx / L;
        const i64 q = q0 + l;
        const i64 n = q / P, p = q - n * P;
        A v = acc[idx];
        if (bias != nullptr) v += dfa::to_acc(bias[o]);
        out[(n * C_out + o) * P + p] = dfa::from_acc<T>(v);
    }
}

// Backward: the chunk's grad_output as a (C_out, L) matrix in the accumulator type,
// gout[o, l] = grad_output[n, o, p] for q = q0 + l = n*P + p (the inverse of store_output).
template <typename T>
__global__ void deform_conv_gather_grad_output(const T* __restrict__ grad_output,
                                               acc_t<T>* __restrict__ gout, i64 C_out, i64 P,
                                               i64 q0, i64 L) {
    const i64 total = C_out * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 o = idx / L;
        const i64 q = q0 + l;
        const i64 n = q / P, p = q - n * P;
        gout[idx] = dfa::to_acc(grad_output[(n * C_out + o) * P + p]);
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient (col2im), fast path. Each column entry scatters
// m * gcols[c*K + k, l] times the four bilinear weights into the input planes with atomicAdd
// on the accumulator type (float or double). grad_in points at image n_base, (nb, C, H, W).
// Floating-point atomics make the summation order, so the last bits, vary from run to run.
template <typename T>
__global__ void deform_conv_col2im_atomic(const T* __restrict__ offset,
                                          const T* __restrict__ mask,
                                          const acc_t<T>* __restrict__ gcols,
                                          acc_t<T>* __restrict__ grad_in, DFA_GEOM_PARAMS,
                                          i64 q0, i64 L, i64 n_base) {
    typedef acc_t<T> A;
    const dfa::ConvGeom g = dfa::make_geom(DFA_GEOM_ARGS);
    const i64 total = g.C * g.K * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 ck = idx / L;
        const i64 k = ck % g.K;
        const i64 c = ck / g.K;
        const i64 q = q0 + l;
        const i64 n = q / g.P, p = q - n * g.P;
        const dfa::SamplePoint<T> s = dfa::sample_point(g, offset, mask, n, c / g.Cpg, k, p);
        if (!dfa::point_valid(s.h, s.w, g.H, g.W)) continue;  // zero value, zero gradient
        const A gv = s.m * gcols[idx];
        const dfa::Corners<A> cr = dfa::bilinear_corners(s.h, s.w, g.H, g.W);
        A* plane = grad_in + ((n - n_base) * g.C + c) * g.H * g.W;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            if (cr.idx[t] >= 0) atomicAdd(plane + cr.idx[t], cr.wt[t] * gv);
        }
    }
}

// Backward: input gradient, deterministic path, step 1 of 2.
// col2im is a sparse matrix product: for offset group og, the input plane of channel c is
// S_og @ gcols[c], where S_og has one row per input pixel of the chunk's images and one
// column per (k, l). This kernel lists S_og's entries, four per (og, k, l), as
//   e = ((og*K + k)*L + l)*4 + t        (t = corner)
//   keys[e] = row ((og*nb + n - n_base)*H + y)*W + x, or `rows` = OG*nb*H*W (sorts after
//             every real row) for an invalid point or a corner outside the image,
//   vals[e] = m * bilinear weight,
// and counts the entries of each row with integer atomics (whose result does not depend on
// the order). The launch code then sorts e by key with a stable sort (cupy.argsort) and
// takes the exclusive prefix sum of the counts as each row's start.
template <typename T>
__global__ void deform_conv_col2im_coo(const T* __restrict__ offset, const T* __restrict__ mask,
                                       i64* __restrict__ keys, acc_t<T>* __restrict__ vals,
                                       unsigned long long* __restrict__ counts, DFA_GEOM_PARAMS,
                                       i64 q0, i64 L, i64 n_base, i64 nb) {
    typedef acc_t<T> A;
    const dfa::ConvGeom g = dfa::make_geom(DFA_GEOM_ARGS);
    const i64 plane = g.H * g.W;
    const i64 rows = g.OG * nb * plane;
    const i64 total = g.OG * g.K * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 ok = idx / L;  // og*K + k
        const i64 k = ok % g.K;
        const i64 og = ok / g.K;
        const i64 q = q0 + l;
        const i64 n = q / g.P, p = q - n * g.P;
        const dfa::SamplePoint<T> s = dfa::sample_point(g, offset, mask, n, og, k, p);
        if (!dfa::point_valid(s.h, s.w, g.H, g.W)) {  // zero gradient: no entries
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                keys[idx * 4 + t] = rows;
                vals[idx * 4 + t] = A(0);
            }
            continue;
        }
        const dfa::Corners<A> cr = dfa::bilinear_corners(s.h, s.w, g.H, g.W);
        const i64 row0 = (og * nb + (n - n_base)) * plane;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const i64 e = idx * 4 + t;
            if (cr.idx[t] >= 0) {
                const i64 row = row0 + cr.idx[t];
                keys[e] = row;
                vals[e] = s.m * cr.wt[t];
                atomicAdd(counts + row, 1ull);
            } else {
                keys[e] = rows;
                vals[e] = A(0);
            }
        }
    }
}

// Backward: input gradient, deterministic path, step 2 of 2. One thread per input element
// (n, c, y, x) of the chunk's images (grad_in points at image n_base, (nb, C, H, W)) sums
// its row's entries in sorted order, which is increasing e (the sort is stable): the same
// order, hence the same bits, on every run. Each element has exactly one writer, and
// chunks run one after another, so adding to grad_in needs no atomics.
//   order: entry numbers e sorted by key; row_start: (rows + 1) row starts into order.
template <typename T>
__global__ void deform_conv_col2im_gather(const i64* __restrict__ order,
                                          const i64* __restrict__ row_start,
                                          const acc_t<T>* __restrict__ vals,
                                          const acc_t<T>* __restrict__ gcols,
                                          acc_t<T>* __restrict__ grad_in, DFA_GEOM_PARAMS,
                                          i64 L, i64 nb) {
    typedef acc_t<T> A;
    const dfa::ConvGeom g = dfa::make_geom(DFA_GEOM_ARGS);
    const i64 plane = g.H * g.W;
    const i64 total = nb * g.C * plane;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 yx = idx % plane;
        const i64 nc = idx / plane;  // (n - n_base)*C + c
        const i64 c = nc % g.C;
        const i64 n_local = nc / g.C;
        const i64 og = c / g.Cpg;
        const i64 row = (og * nb + n_local) * plane + yx;
        const i64 r0 = row_start[row], r1 = row_start[row + 1];
        if (r0 == r1) continue;  // untouched by this chunk (common when it is part of an image)
        const A* gcol_c = gcols + c * g.K * L;
        const i64 first_col = og * g.K * L;  // e/4 - first_col = k*L + l
        A acc = A(0);
        for (i64 r = r0; r < r1; ++r) {
            const i64 e = order[r];
            acc += vals[e] * gcol_c[e / 4 - first_col];
        }
        grad_in[idx] += acc;
    }
}

// ---------------------------------------------------------------------------------------
// Backward: offset and mask gradients. One thread per (og, k, l) gathers over the channels
// of offset group og (no atomics, so deterministic in both modes):
//   grad dy = m * sum_c gcols[c*K + k, l] * dX_c/dh,  grad dx likewise with dX_c/dw,
//   grad m  =     sum_c gcols[c*K + k, l] * X_c(h, w),
// all zero for an invalid point. grad_mask may be null (no mask).
template <typename T>
__global__ void deform_conv_coord_grad(const T* __restrict__ input, const T* __restrict__ offset,
                                       const T* __restrict__ mask,
                                       const acc_t<T>* __restrict__ gcols,
                                       T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                       DFA_GEOM_PARAMS, i64 q0, i64 L) {
    typedef acc_t<T> A;
    const dfa::ConvGeom g = dfa::make_geom(DFA_GEOM_ARGS);
    const i64 plane = g.H * g.W;
    const i64 total = g.OG * g.K * L;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 l = idx % L;
        const i64 ok = idx / L;  // og*K + k
        const i64 k = ok % g.K;
        const i64 og = ok / g.K;
        const i64 q = q0 + l;
        const i64 n = q / g.P, p = q - n * g.P;
        const dfa::SamplePoint<T> s = dfa::sample_point(g, offset, mask, n, og, k, p);
        A g_h = A(0), g_w = A(0), g_m = A(0);
        if (dfa::point_valid(s.h, s.w, g.H, g.W)) {
            for (i64 ci = 0; ci < g.Cpg; ++ci) {
                const i64 c = og * g.Cpg + ci;
                const A gv = gcols[(c * g.K + k) * L + l];
                A val, d_h, d_w;
                dfa::bilinear_sample_grad(input + (n * g.C + c) * plane, g.H, g.W, s.h, s.w,
                                          &val, &d_h, &d_w);
                g_h += gv * d_h;
                g_w += gv * d_w;
                g_m += gv * val;
            }
            g_h *= s.m;
            g_w *= s.m;
        }
        T* go = grad_offset + (n * 2 * g.OG * g.K + 2 * ok) * g.P + p;
        go[0] = dfa::from_acc<T>(g_h);
        go[g.P] = dfa::from_acc<T>(g_w);
        if (grad_mask != nullptr) grad_mask[(n * g.OG * g.K + ok) * g.P + p] = dfa::from_acc<T>(g_m);
    }
}

// ---------------------------------------------------------------------------------------
// Elementwise conversions between the element and the accumulator type (weight in,
// gradients out), written here so that no CuPy elementwise kernel ever has to handle a
// 16-bit type (CuPy's need cuda_fp16.h / cuda_bf16.h at run time).
template <typename T>
__global__ void deform_conv_to_acc(const T* __restrict__ src, acc_t<T>* __restrict__ dst, i64 n) {
    DFA_GRID_STRIDE_LOOP(i, n) { dst[i] = dfa::to_acc(src[i]); }
}

template <typename T>
__global__ void deform_conv_from_acc(const acc_t<T>* __restrict__ src, T* __restrict__ dst, i64 n) {
    DFA_GRID_STRIDE_LOOP(i, n) { dst[i] = dfa::from_acc<T>(src[i]); }
}
