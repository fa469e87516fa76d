// Deformable RoI pooling (deformarray.deform_roi_pool) kernels, mmcv DeformRoIPool numbers.
//
// Launch code: deformarray/cuda/roi_pool.py. Every kernel is a template on the element type
// T (float, double, dfa::half, dfa::bfloat16) and computes in acc_t<T> (float for the
// 16-bit types); the loader instantiates them by name, e.g. "roi_pool_forward<float>".
//
// Layouts (all C-contiguous): input (N, C, H, W); rois (R, 5) = [batch, x1, y1, x2, y2];
// offset (R, 2, PH, PW), channel 0 = x, 1 = y; mask (R, 1, PH, PW); output and grad_output
// (R, C, PH, PW). "Bin" b = r*PB + i*PW + j (PB = PH*PW) is bin (i, j) of RoI r.
//
// Per bin (SPEC, mmcv):
//   roi start = (x1, y1) * spatial_scale - 0.5, end = (x2, y2) * spatial_scale - 0.5,
//   roi_w = end_x - start_x, bin_w = roi_w / PW (no minimum size), likewise h;
//   start += gamma * (roi_w, roi_h) * (offset x, offset y)        (deformation)
//   gy = sampling_ratio > 0 ? sampling_ratio : ceil(roi_h / PH), gx likewise;
//   sample (iy, ix): y = start_y + i*bin_h + (iy + 0.5)*bin_h/gy, x likewise;
//   out = m * (sum of the gy*gx RoIAlign samples, common.cuh clamped_point, margin 1) / (gy*gx),
//   0 with zero gradient when gy or gx is <= 0 (no sample) or the batch index is out of
//   range (the public API rejects the latter before any kernel runs; the guard only makes
//   sure no kernel can read outside the input).
//
//   forward:   roi_pool_forward (one thread per output element)
//   backward:  roi_pool_coord_grad (offset and mask gradients, one thread per bin, gathering
//              over channels and samples: no atomics);
//              input gradient either roi_pool_backward_atomic (float atomicAdd) or the
//              deterministic roi_pool_roi_info + roi_pool_coo + roi_pool_gather triple.

#include "common.cuh"

using dfa::acc_t;
using dfa::i64;

// Every kernel takes the geometry as these scalars, in this order (the launch code's
// _geom_args builds the same tuple). The two doubles are converted to acc_t<T> on entry.
#define DFA_ROI_PARAMS                                                                     \
    i64 N, i64 C, i64 H, i64 W, i64 R, i64 PH, i64 PW, double spatial_scale,                \
        i64 sampling_ratio, double gamma
#define DFA_ROI_ARGS N, C, H, W, R, PH, PW, spatial_scale, sampling_ratio, gamma

namespace dfa {

struct RoiGeom {
    i64 N, C, H, W, R, PH, PW, PB;
    double scale, gamma;
    i64 sampling_ratio;
};

__device__ __forceinline__ RoiGeom make_roi_geom(DFA_ROI_PARAMS) {
    RoiGeom g;
    g.N = N; g.C = C; g.H = H; g.W = W; g.R = R; g.PH = PH; g.PW = PW; g.PB = PH * PW;
    g.scale = spatial_scale; g.gamma = gamma; g.sampling_ratio = sampling_ratio;
    return g;
}

// Image of RoI r: the batch index truncated to an integer (as mmcv's int conversion), or
// -1 when it is not in [0, N) (or not a number).
template <typename T>
__device__ __forceinline__ i64 roi_batch(const T* rois, i64 r, i64 N) {
    typedef acc_t<T> A;
    const A b = to_acc(rois[r * 5]);
    if (!(b > A(-1) && b < static_cast<A>(N))) return -1;
    return static_cast<i64>(b);  // truncation toward zero: (-1, 0) -> 0
}

// Samples per bin side, sampling_ratio or ceil(size / pooled) (0 when that is not positive).
template <typename A>
__device__ __forceinline__ i64 roi_grid(A size, i64 pooled, i64 sampling_ratio) {
    if (sampling_ratio > 0) return sampling_ratio;
    const A g = ceil_acc(size / static_cast<A>(pooled));
    return g > A(0) ? static_cast<i64>(g) : 0;
}

// Geometry of bin (i, j) of RoI r.
template <typename T> struct RoiBin {
    i64 n;                    // image, -1 when the batch index is out of range
    i64 gy, gx;               // samples per bin side
    acc_t<T> y0, x0;          // start of the bin, deformation included
    acc_t<T> bin_h, bin_w;    // bin size
    acc_t<T> roi_h, roi_w;    // RoI size (the offset's unit)
    acc_t<T> m;               // mask value (1 without a mask)
    bool empty() const { return n < 0 || gy <= 0 || gx <= 0; }
};

template <typename T>
__device__ __forceinline__ RoiBin<T> roi_bin(const RoiGeom& g, const T* rois, const T* offset,
                                             const T* mask, i64 r, i64 i, i64 j) {
    typedef acc_t<T> A;
    const T* roi = rois + r * 5;
    const A scale = static_cast<A>(g.scale);
    const A half = A(0.5);
    // No rounding of the corners (mmcv: "this implementation detail is critical").
    A start_w = to_acc(roi[1]) * scale - half;
    A start_h = to_acc(roi[2]) * scale - half;
    const A end_w = to_acc(roi[3]) * scale - half;
    const A end_h = to_acc(roi[4]) * scale - half;
    RoiBin<T> b;
    b.n = roi_batch(rois, r, g.N);
    b.roi_w = end_w - start_w;
    b.roi_h = end_h - start_h;
    b.bin_h = b.roi_h / static_cast<A>(g.PH);
    b.bin_w = b.roi_w / static_cast<A>(g.PW);
    b.gy = roi_grid(b.roi_h, g.PH, g.sampling_ratio);
    b.gx = roi_grid(b.roi_w, g.PW, g.sampling_ratio);
    const i64 bin = i * g.PW + j;
    if (offset != nullptr) {
        const A gamma = static_cast<A>(g.gamma);
        const T* off = offset + r * 2 * g.PB + bin;
        start_w += gamma * b.roi_w * to_acc(off[0]);
        start_h += gamma * b.roi_h * to_acc(off[g.PB]);
    }
    b.y0 = start_h + static_cast<A>(i) * b.bin_h;
    b.x0 = start_w + static_cast<A>(j) * b.bin_w;
    b.m = mask != nullptr ? to_acc(mask[r * g.PB + bin]) : A(1);
    return b;
}

// Sample point (iy, ix) of a bin (sub-bin centre).
template <typename T>
__device__ __forceinline__ ClampedPoint<acc_t<T>> roi_sample(const RoiGeom& g, const RoiBin<T>& b,
                                                             i64 iy, i64 ix) {
    typedef acc_t<T> A;
    const A y = b.y0 + (static_cast<A>(iy) + A(0.5)) * b.bin_h / static_cast<A>(b.gy);
    const A x = b.x0 + (static_cast<A>(ix) + A(0.5)) * b.bin_w / static_cast<A>(b.gx);
    return clamped_point(y, x, g.H, g.W, A(1));  // RoIAlign: margin 1
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// Forward: out[r, c, i, j] = m * mean of the bin's samples of channel c (0 for an empty bin).
template <typename T>
__global__ void roi_pool_forward(const T* __restrict__ input, const T* __restrict__ rois,
                                 const T* __restrict__ offset, const T* __restrict__ mask,
                                 T* __restrict__ out, DFA_ROI_PARAMS) {
    typedef acc_t<T> A;
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    const i64 total = g.R * g.C * g.PB;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 bin = idx % g.PB;
        const i64 rc = idx / g.PB;  // r*C + c
        const i64 c = rc % g.C;
        const i64 r = rc / g.C;
        const i64 i = bin / g.PW, j = bin - i * g.PW;
        const dfa::RoiBin<T> b = dfa::roi_bin(g, rois, offset, mask, r, i, j);
        A v = A(0);
        if (!b.empty()) {
            const T* plane = input + (b.n * g.C + c) * g.H * g.W;
            for (i64 iy = 0; iy < b.gy; ++iy) {
                for (i64 ix = 0; ix < b.gx; ++ix) {
                    v += dfa::clamped_value(plane, dfa::roi_sample(g, b, iy, ix));
                }
            }
            v = v / static_cast<A>(b.gy * b.gx) * b.m;
        }
        out[idx] = dfa::from_acc<T>(v);
    }
}

// ---------------------------------------------------------------------------------------
// Backward: offset and mask gradients, one thread per bin (r, i, j), summing over channels
// and samples (no atomics, so deterministic in both modes):
//   grad m        = sum_c g_c * mean_s X_c(s)
//   grad offset x = gamma * roi_w * m * sum_c g_c * mean_s dX_c/dx(s), y likewise with roi_h
// (the offset moves every sample of the bin by gamma * roi size * offset). Either output may
// be null (no offset / no mask).
template <typename T>
__global__ void roi_pool_coord_grad(const T* __restrict__ input, const T* __restrict__ grad_out,
                                    const T* __restrict__ rois, const T* __restrict__ offset,
                                    const T* __restrict__ mask, T* __restrict__ grad_offset,
                                    T* __restrict__ grad_mask, DFA_ROI_PARAMS) {
    typedef acc_t<T> A;
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    const i64 plane = g.H * g.W;
    const i64 total = g.R * g.PB;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 bin = idx % g.PB;
        const i64 r = idx / g.PB;
        const i64 i = bin / g.PW, j = bin - i * g.PW;
        const dfa::RoiBin<T> b = dfa::roi_bin(g, rois, offset, mask, r, i, j);
        A s_val = A(0), s_y = A(0), s_x = A(0);
        if (!b.empty()) {
            const T* in_n = input + b.n * g.C * plane;
            const T* go = grad_out + r * g.C * g.PB + bin;
            for (i64 iy = 0; iy < b.gy; ++iy) {
                for (i64 ix = 0; ix < b.gx; ++ix) {
                    const dfa::ClampedPoint<A> cr = dfa::roi_sample(g, b, iy, ix);
                    if (!cr.valid) continue;
                    for (i64 c = 0; c < g.C; ++c) {
                        const A gv = dfa::to_acc(go[c * g.PB]);
                        A v, d_y, d_x;
                        dfa::clamped_value_grad(in_n + c * plane, cr, &v, &d_y, &d_x);
                        s_val += gv * v;
                        s_y += gv * d_y;
                        s_x += gv * d_x;
                    }
                }
            }
            const A count = static_cast<A>(b.gy * b.gx);
            s_val = s_val / count;
            const A gamma = static_cast<A>(g.gamma);
            s_x = gamma * b.roi_w * b.m * (s_x / count);
            s_y = gamma * b.roi_h * b.m * (s_y / count);
        }
        if (grad_offset != nullptr) {
            grad_offset[r * 2 * g.PB + bin] = dfa::from_acc<T>(s_x);
            grad_offset[(r * 2 + 1) * g.PB + bin] = dfa::from_acc<T>(s_y);
        }
        if (grad_mask != nullptr) grad_mask[idx] = dfa::from_acc<T>(s_val);
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient, fast path. One thread per output element adds
// g * m / (gy*gx) * weight to the four corners of each valid sample with atomicAdd on the
// accumulator type. grad_in points at image n0, (nb, C, H, W); RoIs of other images are
// skipped (the launch code runs images in chunks only for the 16-bit types, whose float32
// accumulator must fit the workspace bound). The order of the additions, so the last
// bits, varies from run to run.
template <typename T>
__global__ void roi_pool_backward_atomic(const T* __restrict__ grad_out, const T* __restrict__ rois,
                                         const T* __restrict__ offset, const T* __restrict__ mask,
                                         acc_t<T>* __restrict__ grad_in, DFA_ROI_PARAMS, i64 n0,
                                         i64 nb) {
    typedef acc_t<T> A;
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    const i64 total = g.R * g.C * g.PB;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 bin = idx % g.PB;
        const i64 rc = idx / g.PB;
        const i64 c = rc % g.C;
        const i64 r = rc / g.C;
        const i64 i = bin / g.PW, j = bin - i * g.PW;
        const dfa::RoiBin<T> b = dfa::roi_bin(g, rois, offset, mask, r, i, j);
        if (b.empty() || b.n < n0 || b.n >= n0 + nb) continue;
        const A gv = dfa::to_acc(grad_out[idx]) * b.m / static_cast<A>(b.gy * b.gx);
        A* plane = grad_in + ((b.n - n0) * g.C + c) * g.H * g.W;
        for (i64 iy = 0; iy < b.gy; ++iy) {
            for (i64 ix = 0; ix < b.gx; ++ix) {
                const dfa::ClampedPoint<A> cr = dfa::roi_sample(g, b, iy, ix);
                if (!cr.valid) continue;
#pragma unroll
                for (int q = 0; q < 4; ++q) atomicAdd(plane + cr.idx[q], cr.wt[q] * gv);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward: input gradient, deterministic path. Every channel samples the same points, so
// the input gradient is grad_in[n, c] = S @ (g[:, c, :] as a column per bin), with one
// sparse matrix S for all channels: rows = input pixels (n, y, x), columns = bins. The
// number of samples per bin depends on the RoI size (sampling_ratio = 0), so the launch
// code first reads it back from roi_pool_roi_info.

// info[2r] = image of RoI r (-1 out of range), info[2r + 1] = samples per bin (gy*gx, 0 when
// gy or gx is <= 0), the number of samples roi_pool_coo lists for each bin of the RoI.
template <typename T>
__global__ void roi_pool_roi_info(const T* __restrict__ rois, i64* __restrict__ info,
                                  DFA_ROI_PARAMS) {
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    DFA_GRID_STRIDE_LOOP(r, g.R) {
        const dfa::RoiBin<T> b = dfa::roi_bin<T>(g, rois, nullptr, nullptr, r, 0, 0);
        info[2 * r] = b.n;
        info[2 * r + 1] = (b.gy > 0 && b.gx > 0) ? b.gy * b.gx : 0;
    }
}

// Step 1 of 3: list S's entries for a chunk of bins. items[t] is the bin b = r*PB + bin of
// work item t, item_entry[t] its first entry; it owns the 4*gy*gx entries
// item_entry[t] + s*4 + q for sample s = iy*gx + ix and corner q (none when gy or gx <= 0):
//   keys[e] = row (n - n0)*H*W + y*W + x, or rows = nb*H*W (sorts after every real row) for
//             an invalid sample or a RoI outside images n0 .. n0+nb-1,
//   vals[e] = m / (gy*gx) * bilinear weight,
//   cols[e] = r*C*PB + bin (grad_out's offset of (r, channel 0, bin): the gather adds c*PB),
// and counts each row's entries with integer atomics (order-independent). The launch code
// then sorts the entries by key with a stable sort and takes the prefix sum of counts.
template <typename T>
__global__ void roi_pool_coo(const T* __restrict__ rois, const T* __restrict__ offset,
                             const T* __restrict__ mask, const i64* __restrict__ items,
                             const i64* __restrict__ item_entry, i64* __restrict__ keys,
                             acc_t<T>* __restrict__ vals, i64* __restrict__ cols,
                             unsigned long long* __restrict__ counts, DFA_ROI_PARAMS, i64 n0,
                             i64 nb, i64 L) {
    typedef acc_t<T> A;
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    const i64 plane = g.H * g.W;
    const i64 rows = nb * plane;
    DFA_GRID_STRIDE_LOOP(t, L) {
        const i64 bb = items[t];
        const i64 bin = bb % g.PB;
        const i64 r = bb / g.PB;
        const i64 i = bin / g.PW, j = bin - i * g.PW;
        const dfa::RoiBin<T> b = dfa::roi_bin(g, rois, offset, mask, r, i, j);
        if (b.gy <= 0 || b.gx <= 0) continue;  // no samples: the launch code gave it no entries
        const i64 col = r * g.C * g.PB + bin;
        const bool inside = b.n >= n0 && b.n < n0 + nb;  // false for b.n == -1
        const A v = b.m / static_cast<A>(b.gy * b.gx);
        i64 e = item_entry[t];
        for (i64 iy = 0; iy < b.gy; ++iy) {
            for (i64 ix = 0; ix < b.gx; ++ix) {
                const dfa::ClampedPoint<A> cr = dfa::roi_sample(g, b, iy, ix);
#pragma unroll
                for (int q = 0; q < 4; ++q, ++e) {
                    cols[e] = col;
                    if (inside && cr.valid) {
                        const i64 row = (b.n - n0) * plane + cr.idx[q];
                        keys[e] = row;
                        vals[e] = v * cr.wt[q];
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

// Step 3 of 3 (step 2 is the sort): one thread per input element (n, c, y, x) of images
// n0 .. n0+nb-1 (grad_in points at image n0) sums its row's entries in sorted order, which
// is increasing entry number (the sort is stable): the same order, hence the same bits, on
// every run. One writer per element, chunks one after another: no atomics.
//   order: entry numbers sorted by key; row_start: (nb*H*W + 1) row starts into order.
template <typename T>
__global__ void roi_pool_gather(const i64* __restrict__ order, const i64* __restrict__ row_start,
                                const acc_t<T>* __restrict__ vals, const i64* __restrict__ cols,
                                const T* __restrict__ grad_out, acc_t<T>* __restrict__ grad_in,
                                DFA_ROI_PARAMS, i64 nb) {
    typedef acc_t<T> A;
    const dfa::RoiGeom g = dfa::make_roi_geom(DFA_ROI_ARGS);
    const i64 plane = g.H * g.W;
    const i64 total = nb * g.C * plane;
    DFA_GRID_STRIDE_LOOP(idx, total) {
        const i64 yx = idx % plane;
        const i64 nc = idx / plane;  // (n - n0)*C + c
        const i64 c = nc % g.C;
        const i64 row = (nc / g.C) * plane + yx;
        const i64 r0 = row_start[row], r1 = row_start[row + 1];
        if (r0 == r1) continue;
        const T* go = grad_out + c * g.PB;  // cols[e] is the offset of (r, 0, bin): no division here
        A acc = A(0);
        for (i64 k = r0; k < r1; ++k) {
            const i64 e = order[k];
            acc += vals[e] * dfa::to_acc(go[cols[e]]);
        }
        grad_in[idx] += acc;
    }
}

// ---------------------------------------------------------------------------------------
// Accumulator -> element type (the float32 input-gradient buffer of the 16-bit types),
// written here so that no CuPy elementwise kernel has to handle a 16-bit type.
template <typename T>
__global__ void roi_pool_from_acc(const acc_t<T>* __restrict__ src, T* __restrict__ dst, i64 n) {
    DFA_GRID_STRIDE_LOOP(i, n) { dst[i] = dfa::from_acc<T>(src[i]); }
}
