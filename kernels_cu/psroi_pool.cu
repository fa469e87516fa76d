// Deformable position-sensitive RoI pooling (deformarray.deform_psroi_pool) kernels,
// numbers of MXNet's DeformablePSROIPooling (R-FCN).
//
// Launch code: deformarray/cuda/psroi_pool.py. Every kernel is a template on the element
// type T (float, double, dfa::half, dfa::bfloat16) and computes in acc_t<T>.
//
// Layouts (all C-contiguous): input (N, C, H, W) with C = OD*GS*GS; rois (R, 5) =
// [batch, x1, y1, x2, y2]; offset (R, 2*NCLS, PS, PS), channel 2*cls = x, 2*cls + 1 = y;
// output and grad_output (R, OD, P, P). OD = output_dim, GS = group_size, P = pooled_size,
// PS = part_size, SPP = sample_per_part, NCLS = offset classes (1 without an offset).
//
// Output element (r, c, i, j) (SPEC, MXNet):
//   roi start = round(x1, y1) * spatial_scale - 0.5, end = (round(x2, y2) + 1) * scale - 0.5
//   (round half away from zero), roi_w = max(end_x - start_x, 0.1), likewise h;
//   bin = roi / P, sub-bin = bin / SPP;
//   part cell (pi, pj) = (floor(i*PS/P), floor(j*PS/P)), class cls = c / (OD / NCLS),
//   bin start = start + (j, i) * bin + trans_std * offset[r, cls, :, pi, pj] * (roi_w, roi_h);
//   group cell (gi, gj) = (floor(i*GS/P), floor(j*GS/P)), input channel (c*GS + gi)*GS + gj;
//   samples at bin start + (iw, ih) * sub-bin (sub-bin corners), iw, ih < SPP; a sample with
//   w < -0.5, w > W - 0.5, h < -0.5 or h > H - 0.5 is skipped, the others are clamped into
//   the image and interpolated (common.cuh clamped_point, margin 0.5);
//   out = mean of the valid samples, 0 (zero gradient) when none is valid or the batch
//   index is out of range (the public API rejects that before any kernel runs).
//   Derivatives: those of clamped_point (slope 0 along a clamped axis, the derivative from
//   above at an integer coordinate). MXNet interpolates between floor and ceil corners,
//   whose derivative is 0 at every integer coordinate; the values are the same.
//
//   forward:   psroi_pool_forward (one thread per output element)
//   backward:  psroi_pool_coord_grad (offset gradient, one thread per offset (r, cls, pi, pj)
//              pair, gathering: no atomics); input gradient either psroi_pool_backward_atomic
//              or the deterministic psroi_pool_coo + psroi_pool_gather pair.
//
// The part and group cells are computed in integer arithmetic, as the CPU backend does.
// MXNet computes floor(DType(i) / P * PS) in the element type, which rounds below the
// integer for a few sizes (P = PS = 22: i = 13 gives 12 in float32, i = 15 gives 14 in
// float64): for those sizes our cells, like the CPU backend's, are the exact ones.

#include "common.cuh"

using dfa::acc_t;
using dfa::i64;

#define DFA_PSROI_PARAMS                                                                   \
    i64 N, i64 C, i64 H, i64 W, i64 R, i64 OD, i64 GS, i64 P, i64 PS, i64 SPP,              \
        double trans_std, double spatial_scale, i64 NCLS
#define DFA_PSROI_ARGS N, C, H, W, R, OD, GS, P, PS, SPP, trans_std, spatial_scale, NCLS

namespace dfa {

struct PsGeom {
    i64 N, C, H, W, R, OD, GS, P, PS, SPP, NCLS;
    i64 PP;    // P*P, output elements per (RoI, output channel)
    i64 CEC;   // output channels per offset class, OD / NCLS
    double trans_std, scale;
};

__device__ __forceinline__ PsGeom make_ps_geom(DFA_PSROI_PARAMS) {
    PsGeom g;
    g.N = N; g.C = C; g.H = H; g.W = W; g.R = R; g.OD = OD; g.GS = GS; g.P = P; g.PS = PS;
    g.SPP = SPP; g.NCLS = NCLS; g.PP = P * P; g.CEC = OD / NCLS;
    g.trans_std = trans_std; g.scale = spatial_scale;
    return g;
}

// Geometry of output element (r, c, i, j).
template <typename T> struct PsBin {
    i64 n;                 // image, -1 when the batch index is out of range
    i64 cin;               // input channel read
    i64 off_x;             // index of the offset x value used (y is at off_x + PS*PS), -1: none
    acc_t<T> h0, w0;       // first sample
    acc_t<T> sub_h, sub_w; // sample spacing
    acc_t<T> roi_h, roi_w;
};

template <typename T>
__device__ __forceinline__ PsBin<T> ps_bin(const PsGeom& g, const T* rois, const T* offset,
                                           i64 r, i64 c, i64 i, i64 j) {
    typedef acc_t<T> A;
    const T* roi = rois + r * 5;
    const A scale = static_cast<A>(g.scale);
    const A half = A(0.5);
    const A start_w = round_acc(to_acc(roi[1])) * scale - half;
    const A start_h = round_acc(to_acc(roi[2])) * scale - half;
    const A end_w = (round_acc(to_acc(roi[3])) + A(1)) * scale - half;
    const A end_h = (round_acc(to_acc(roi[4])) + A(1)) * scale - half;
    PsBin<T> b;
    {
        const A bf = to_acc(roi[0]);
        b.n = (bf > A(-1) && bf < static_cast<A>(g.N)) ? static_cast<i64>(bf) : -1;
    }
    b.roi_w = end_w - start_w;
    b.roi_h = end_h - start_h;
    if (!(b.roi_w > A(0.1))) b.roi_w = A(0.1);  // too small RoIs: 0.1 (MXNet)
    if (!(b.roi_h > A(0.1))) b.roi_h = A(0.1);
    const A bin_w = b.roi_w / static_cast<A>(g.P);
    const A bin_h = b.roi_h / static_cast<A>(g.P);
    b.sub_w = bin_w / static_cast<A>(g.SPP);
    b.sub_h = bin_h / static_cast<A>(g.SPP);
    A w0 = static_cast<A>(j) * bin_w + start_w;
    A h0 = static_cast<A>(i) * bin_h + start_h;
    b.off_x = -1;
    if (offset != nullptr) {
        const i64 pi = i * g.PS / g.P, pj = j * g.PS / g.P;
        const i64 cls = c / g.CEC;
        b.off_x = ((r * g.NCLS + cls) * 2 * g.PS + pi) * g.PS + pj;
        const A ts = static_cast<A>(g.trans_std);
        const A tx = to_acc(offset[b.off_x]) * ts;
        const A ty = to_acc(offset[b.off_x + g.PS * g.PS]) * ts;
        w0 += tx * b.roi_w;
        h0 += ty * b.roi_h;
    }
    b.w0 = w0;
    b.h0 = h0;
    i64 gi = i * g.GS / g.P, gj = j * g.GS / g.P;
    gi = gi < 0 ? 0 : (gi > g.GS - 1 ? g.GS - 1 : gi);
    gj = gj < 0 ? 0 : (gj > g.GS - 1 ? g.GS - 1 : gj);
    b.cin = (c * g.GS + gi) * g.GS + gj;
    return b;
}

template <typename T>
__device__ __forceinline__ ClampedPoint<acc_t<T>> ps_sample(const PsGeom& g, const PsBin<T>& b, i64 ih,
                                                       i64 iw) {
    typedef acc_t<T> A;
    const A w = b.w0 + static_cast<A>(iw) * b.sub_w;
    const A h = b.h0 + static_cast<A>(ih) * b.sub_h;
    return clamped_point(h, w, g.H, g.W, A(0.5));  // MXNet: margin 0.5
}

// Number of valid samples of a bin.
template <typename T>
__device__ __forceinline__ i64 ps_count(const PsGeom& g, const PsBin<T>& b) {
    i64 n = 0;
    for (i64 ih = 0; ih < g.SPP; ++ih)
        for (i64 iw = 0; iw < g.SPP; ++iw) n += ps_sample(g, b, ih, iw).valid ? 1 : 0;
    return n;
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// Forward: out[r, c, i, j] = mean of the valid samples of input channel cin.
template <typename T>
__global__ void psroi_pool_forward(const T* __restrict__ input, const T* __restrict__ rois,
                                   const T* __restrict__ offset, T* __restrict__ out,
                                   DFA_PSROI_PARAMS) {
    typedef acc_t<T> A;
    const dfa::PsGeom g = dfa::make_ps_geom(DFA_PSROI_ARGS);
    const i64 total = g.R * g.OD * g.PP;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 bin = idx % g.PP;
        const i64 rc = idx / g.PP;
        const i64 c = rc % g.OD;
        const i64 r = rc / g.OD;
        const i64 i = bin / g.P, j = bin - i * g.P;
        const dfa::PsBin<T> b = dfa::ps_bin(g, rois, offset, r, c, i, j);
        A sum = A(0);
        i64 count = 0;
        if (b.n >= 0) {
            const T* plane = input + (b.n * g.C + b.cin) * g.H * g.W;
            for (i64 ih = 0; ih < g.SPP; ++ih) {
                for (i64 iw = 0; iw < g.SPP; ++iw) {
                    const dfa::ClampedPoint<A> p = dfa::ps_sample(g, b, ih, iw);
                    if (!p.valid) continue;
                    sum += p.wt[0] * dfa::to_acc(plane[p.idx[0]]) + p.wt[1] * dfa::to_acc(plane[p.idx[1]]) +
                           p.wt[2] * dfa::to_acc(plane[p.idx[2]]) + p.wt[3] * dfa::to_acc(plane[p.idx[3]]);
                    ++count;
                }
            }
        }
        out[idx] = dfa::from_acc<T>(count > 0 ? sum / static_cast<A>(count) : A(0));
    }
}

// ---------------------------------------------------------------------------------------
// Backward: offset gradient. One thread per (r, cls, pi, pj) sums, over the output channels
// of class cls and the bins (i, j) of part cell (pi, pj):
//   grad x = trans_std * roi_w * g / count * sum_s d value / d w,  y likewise (roi_h, d/dh).
// No atomics, so deterministic in both modes.
template <typename T>
__global__ void psroi_pool_coord_grad(const T* __restrict__ input, const T* __restrict__ grad_out,
                                      const T* __restrict__ rois, const T* __restrict__ offset,
                                      T* __restrict__ grad_offset, DFA_PSROI_PARAMS) {
    typedef acc_t<T> A;
    const dfa::PsGeom g = dfa::make_ps_geom(DFA_PSROI_ARGS);
    const i64 parts = g.PS * g.PS;
    const i64 total = g.R * g.NCLS * parts;
    const A ts = static_cast<A>(g.trans_std);
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 part = idx % parts;
        const i64 rk = idx / parts;  // r*NCLS + cls
        const i64 cls = rk % g.NCLS;
        const i64 r = rk / g.NCLS;
        const i64 pi = part / g.PS, pj = part - pi * g.PS;
        A gx = A(0), gy = A(0);
        for (i64 c = cls * g.CEC; c < (cls + 1) * g.CEC; ++c) {
            for (i64 i = 0; i < g.P; ++i) {
                if (i * g.PS / g.P != pi) continue;
                for (i64 j = 0; j < g.P; ++j) {
                    if (j * g.PS / g.P != pj) continue;
                    const dfa::PsBin<T> b = dfa::ps_bin(g, rois, offset, r, c, i, j);
                    if (b.n < 0) continue;
                    const T* plane = input + (b.n * g.C + b.cin) * g.H * g.W;
                    A s_w = A(0), s_h = A(0);
                    i64 count = 0;
                    for (i64 ih = 0; ih < g.SPP; ++ih) {
                        for (i64 iw = 0; iw < g.SPP; ++iw) {
                            const dfa::ClampedPoint<A> p = dfa::ps_sample(g, b, ih, iw);
                            if (!p.valid) continue;
                            ++count;
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
                                const A v = dfa::to_acc(plane[p.idx[q]]);
                                s_w += p.d_x[q] * v;
                                s_h += p.d_y[q] * v;
                            }
                        }
                    }
                    if (count == 0) continue;
                    const A gv = dfa::to_acc(grad_out[((r * g.OD + c) * g.P + i) * g.P + j]) /
                                 static_cast<A>(count);
                    gx += gv * s_w * b.roi_w;
                    gy += gv * s_h * b.roi_h;
                }
            }
        }
        T* go = grad_offset + (rk * 2 * g.PS + pi) * g.PS + pj;
        go[0] = dfa::from_acc<T>(ts * gx);
        go[parts] = dfa::from_acc<T>(ts * gy);
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient, fast path. One thread per output element adds g / count *
// weight to the corners of each valid sample with atomicAdd on the accumulator type.
// grad_in points at image n0, (nb, C, H, W); RoIs of other images are skipped.
template <typename T>
__global__ void psroi_pool_backward_atomic(const T* __restrict__ grad_out,
                                           const T* __restrict__ rois,
                                           const T* __restrict__ offset,
                                           acc_t<T>* __restrict__ grad_in, DFA_PSROI_PARAMS,
                                           i64 n0, i64 nb) {
    typedef acc_t<T> A;
    const dfa::PsGeom g = dfa::make_ps_geom(DFA_PSROI_ARGS);
    const i64 total = g.R * g.OD * g.PP;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 bin = idx % g.PP;
        const i64 rc = idx / g.PP;
        const i64 c = rc % g.OD;
        const i64 r = rc / g.OD;
        const i64 i = bin / g.P, j = bin - i * g.P;
        const dfa::PsBin<T> b = dfa::ps_bin(g, rois, offset, r, c, i, j);
        if (b.n < n0 || b.n >= n0 + nb) continue;  // also b.n == -1
        const i64 count = dfa::ps_count(g, b);
        if (count == 0) continue;
        const A gv = dfa::to_acc(grad_out[idx]) / static_cast<A>(count);
        A* plane = grad_in + ((b.n - n0) * g.C + b.cin) * g.H * g.W;
        for (i64 ih = 0; ih < g.SPP; ++ih) {
            for (i64 iw = 0; iw < g.SPP; ++iw) {
                const dfa::ClampedPoint<A> p = dfa::ps_sample(g, b, ih, iw);
                if (!p.valid) continue;
#pragma unroll
                for (int q = 0; q < 4; ++q) atomicAdd(plane + p.idx[q], p.wt[q] * gv);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient, deterministic path: grad_in = S @ g with S's rows = input
// elements (n, cin, y, x) and columns = output elements; every output element has exactly
// E = 4*SPP*SPP entries (one per sample and corner), so no count has to be read back.
//
// Step 1 of 3: work item t (output element q = q0 + t of the flattened (R, OD, P, P) range)
// owns entries e = t*E + s*4 + corner:
//   keys[e] = row ((n - n0)*C + cin)*H*W + y*W + x, or rows = nb*C*H*W (sorts last) for a
//             skipped sample, an empty bin or a RoI outside images n0 .. n0+nb-1,
//   vals[e] = bilinear weight / count,
// and counts each row's entries with integer atomics (order-independent).
template <typename T>
__global__ void psroi_pool_coo(const T* __restrict__ rois, const T* __restrict__ offset,
                               i64* __restrict__ keys, acc_t<T>* __restrict__ vals,
                               unsigned long long* __restrict__ counts, DFA_PSROI_PARAMS,
                               i64 n0, i64 nb, i64 q0, i64 L) {
    typedef acc_t<T> A;
    const dfa::PsGeom g = dfa::make_ps_geom(DFA_PSROI_ARGS);
    const i64 plane = g.H * g.W;
    const i64 rows = nb * g.C * plane;
    const i64 E = 4 * g.SPP * g.SPP;
    DFA_GRID_STRIDE_LOOP(t, L) {
        const i64 q = q0 + t;
        const i64 bin = q % g.PP;
        const i64 rc = q / g.PP;
        const i64 c = rc % g.OD;
        const i64 r = rc / g.OD;
        const i64 i = bin / g.P, j = bin - i * g.P;
        const dfa::PsBin<T> b = dfa::ps_bin(g, rois, offset, r, c, i, j);
        const bool inside = b.n >= n0 && b.n < n0 + nb;
        const i64 count = inside ? dfa::ps_count(g, b) : 0;
        const A inv = count > 0 ? A(1) / static_cast<A>(count) : A(0);
        const i64 row0 = ((b.n - n0) * g.C + b.cin) * plane;
        i64 e = t * E;
        for (i64 ih = 0; ih < g.SPP; ++ih) {
            for (i64 iw = 0; iw < g.SPP; ++iw) {
                const dfa::ClampedPoint<A> p = dfa::ps_sample(g, b, ih, iw);
#pragma unroll
                for (int k = 0; k < 4; ++k, ++e) {
                    if (count > 0 && p.valid) {
                        const i64 row = row0 + p.idx[k];
                        keys[e] = row;
                        vals[e] = p.wt[k] * inv;
                        atomicAdd(counts + row, 1ull);
                    } else {
                        keys[e] = rows;
                        vals[e] = A(0);
                    }
                }
            }
        }
    }
}

// Step 3 of 3 (step 2 is the stable sort): one thread per input element (n, cin, y, x) of
// images n0 .. n0+nb-1 (grad_in points at image n0; the element's index is its row) sums
// its row's entries in sorted, i.e. increasing entry, order. One writer per element.
template <typename T>
__global__ void psroi_pool_gather(const i64* __restrict__ order, const i64* __restrict__ row_start,
                                  const acc_t<T>* __restrict__ vals, const T* __restrict__ grad_out,
                                  acc_t<T>* __restrict__ grad_in, DFA_PSROI_PARAMS, i64 nb,
                                  i64 q0) {
    typedef acc_t<T> A;
    const dfa::PsGeom g = dfa::make_ps_geom(DFA_PSROI_ARGS);
    const i64 total = nb * g.C * g.H * g.W;
    const unsigned int E = static_cast<unsigned int>(4 * g.SPP * g.SPP);
    const T* go = grad_out + q0;
    DFA_GRID_STRIDE_LOOP(row, total) {
        const i64 r0 = row_start[row], r1 = row_start[row + 1];
        if (r0 == r1) continue;
        A acc = A(0);
        for (i64 k = r0; k < r1; ++k) {
            // 32-bit division: the launch code keeps a chunk's entries below 2**31
            const unsigned int e = static_cast<unsigned int>(order[k]);
            acc += vals[e] * dfa::to_acc(go[e / E]);
        }
        grad_in[row] += acc;
    }
}

// ---------------------------------------------------------------------------------------
// Accumulator -> element type (the float32 input-gradient buffer of the 16-bit types).
template <typename T>
__global__ void psroi_pool_from_acc(const acc_t<T>* __restrict__ src, T* __restrict__ dst, i64 n) {
    DFA_GRID_STRIDE_LOOP(i, n) { dst[i] = dfa::from_acc<T>(src[i]); }
}
