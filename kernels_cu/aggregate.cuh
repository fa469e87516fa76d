// Channels-last aggregation of bilinear samples: the device code that multi-scale deformable
// attention (ms_deform_attn.cu) uses and that DCNv3 / DCNv4 are meant to reuse.
//
// Included after common.cuh (deformarray/cuda/_loader.py inlines both). Conventions:
//  * Feature maps are channels-last: pixel (y, x) of an (H, W) plane is row r = y*W + x, and
//    channel c of row r sits at chan0[r*row_stride + c] (row_stride = the channels of a row
//    of the whole tensor, M*D for MSDA's value, G*D for DCNv3's input). The helpers take a
//    pointer `chan` to one channel of row 0 of the plane and step by row_stride.
//  * T is the element type, A = acc_t<T> the arithmetic type (double for double, float
//    otherwise), I the index type: int on the 32-bit path, i64 on the 64-bit one; the launch
//    code picks the path on the host (int only when every offset the kernel forms fits).
//  * A point is given in pixel coordinates (h, w), pixel centres at integers. Validity is the
//    caller's rule, lower < h < H and lower < w < W (point_used; MSDA: lower = -2, DCNv3 /
//    DCNv4: lower = -1); the helpers assume a valid point, i.e. finite and with floor(h),
//    floor(w) in [lower-1, H-1] x [lower-1, W-1] (so they fit in I).
//  * Corners, in this order: (h_low, w_low), (h_low, w_low+1), (h_low+1, w_low),
//    (h_low+1, w_low+1), h_low = floor(h), w_low = floor(w); with lh = h - h_low,
//    lw = w - w_low, hh = 1 - lh, hw = 1 - lw their weights are hh*hw, hh*lw, lh*hw, lh*lw.
//    A corner outside [0, H) x [0, W) has idx -1: its value is 0 and it receives nothing.
//  * Per channel: S = v1*w1 + v2*w2 + v3*w3 + v4*w4 (this order, absent corners 0),
//    dS/dh = hw*(v3 - v1) + lw*(v4 - v2), dS/dw = hh*(v2 - v1) + lh*(v4 - v3).
//  * A scatter adds (a * w_corner) * g to a corner's channel: atomically (scatter_atomic) or
//    by the element's only writer (scatter_owned, for the deterministic paths).
//  * Sums over channels are always taken channel 0 first, in one thread (point_backward):
//    their bits do not depend on the scheduling of threads.
//  * Rounding: only the coordinates are computed one rounding per operation (they choose
//    the corners). The sums of products above may be contracted into fused multiply-adds
//    (NVRTC's default --fmad=true, kept for speed), so on a GPU they can differ from the
//    CPU backend (which never fuses) in the last bits; the emulation's host build does not
//    fuse, and the tests compare with a tolerance where a GPU could.
#pragma once

namespace dfa {

// ---------------------------------------------------------------------------------------
// Products and differences rounded on their own. NVRTC contracts a*b - c into one fused
// multiply-add by default (--fmad=true); pixel coordinates must be a product then a
// subtraction, as on the CPU, or a point within an ulp of a pixel boundary may land on the
// other side of it.
#ifndef DFA_HOST_EMULATION
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
// The host build (tests/cuda_emulation.py) is ISO C++ (-std=c++17): g++ does not contract.
__device__ __forceinline__ float mul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ double mul_rn(double a, double b) { return a * b; }
__device__ __forceinline__ float sub_rn(float a, float b) { return a - b; }
__device__ __forceinline__ double sub_rn(double a, double b) { return a - b; }
__device__ __forceinline__ float add_rn(float a, float b) { return a + b; }
__device__ __forceinline__ double add_rn(double a, double b) { return a + b; }
#endif

// Pixel coordinate of a normalised one (0 and 1 the outer edges of an axis of `size` pixels):
// t * size - 0.5, unfused.
template <typename A, typename I> __device__ __forceinline__ A pixel_coord(A t, I size) {
    return sub_rn(mul_rn(t, static_cast<A>(size)), A(0.5));
}

// The point rule: lower < h < H and lower < w < W (false for NaN; an infinity fails one
// side). MSDA's lower is -2 (grid_sample's zero padding), DCNv3 / DCNv4's -1.
template <typename A, typename I>
__device__ __forceinline__ bool point_used(A h, A w, I H, I W, A lower) {
    return h > lower && h < static_cast<A>(H) && w > lower && w < static_cast<A>(W);
}

// ---------------------------------------------------------------------------------------
// Corner setup of one valid point, computed once and used for every channel.
template <typename A, typename I> struct BilinearPoint {
    I idx[4];  // rows y*W + x of the corners, -1 outside the plane
    A wt[4];   // hh*hw, hh*lw, lh*hw, lh*lw
    A lh, lw, hh, hw;
};

template <typename A, typename I>
__device__ __forceinline__ BilinearPoint<A, I> bilinear_point(A h, A w, I H, I W) {
    BilinearPoint<A, I> p;
    const I h_low = static_cast<I>(floor_acc(h));
    const I w_low = static_cast<I>(floor_acc(w));
    const I h_high = h_low + 1, w_high = w_low + 1;
    p.lh = h - static_cast<A>(h_low);
    p.lw = w - static_cast<A>(w_low);
    p.hh = A(1) - p.lh;
    p.hw = A(1) - p.lw;
    const bool y0 = h_low >= 0 && h_low < H, y1 = h_high >= 0 && h_high < H;
    const bool x0 = w_low >= 0 && w_low < W, x1 = w_high >= 0 && w_high < W;
    p.idx[0] = (y0 && x0) ? h_low * W + w_low : I(-1);
    p.idx[1] = (y0 && x1) ? h_low * W + w_high : I(-1);
    p.idx[2] = (y1 && x0) ? h_high * W + w_low : I(-1);
    p.idx[3] = (y1 && x1) ? h_high * W + w_high : I(-1);
    p.wt[0] = p.hh * p.hw;
    p.wt[1] = p.hh * p.lw;
    p.wt[2] = p.lh * p.hw;
    p.wt[3] = p.lh * p.lw;
    return p;
}

// Corner values of one channel (0 for a corner outside the plane).
template <typename T, typename A, typename I>
__device__ __forceinline__ void corner_values(const BilinearPoint<A, I>& p, const T* chan, I row_stride,
                                              A v[4]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = p.idx[q] >= 0 ? to_acc(chan[p.idx[q] * row_stride]) : A(0);
}

template <typename A, typename I>
__device__ __forceinline__ A combine(const BilinearPoint<A, I>& p, const A v[4]) {
    return v[0] * p.wt[0] + v[1] * p.wt[1] + v[2] * p.wt[2] + v[3] * p.wt[3];
}

// S of one channel.
template <typename T, typename A, typename I>
__device__ __forceinline__ A sample_channel(const BilinearPoint<A, I>& p, const T* chan, I row_stride) {
    A v[4];
    corner_values(p, chan, row_stride, v);
    return combine(p, v);
}

// (a * w_corner) * g added to the corners of one channel of grad (float atomics: the order
// of the additions, so the last bits, is the scheduler's).
template <typename A, typename I>
__device__ __forceinline__ void scatter_atomic(const BilinearPoint<A, I>& p, A* grad_chan, I row_stride, A a,
                                               A g) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (p.idx[q] >= 0) atomicAdd(grad_chan + p.idx[q] * row_stride, (a * p.wt[q]) * g);
}

// The same, for a caller that is the only writer of those elements (a fixed order).
template <typename A, typename I>
__device__ __forceinline__ void scatter_owned(const BilinearPoint<A, I>& p, A* grad_chan, I row_stride, A a,
                                              A g) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (p.idx[q] >= 0) grad_chan[p.idx[q] * row_stride] += (a * p.wt[q]) * g;
}

// The three dot products of a point over its C channels, channel 0 first:
//   *gs = sum_c g_c * S_c,  *gdh = sum_c g_c * dS_c/dh,  *gdw = sum_c g_c * dS_c/dw,
// with chan0 / g pointing at channel 0 (channels contiguous). When grad_chan0 is not null
// the point's value gradient (a * w_corner) * g_c is also added to it with atomics.
template <typename T, typename A, typename I>
__device__ __forceinline__ void point_backward(const BilinearPoint<A, I>& p, const T* chan0, I row_stride,
                                               const T* g, I C, A a, A* grad_chan0, A* gs, A* gdh,
                                               A* gdw) {
    const T* rows[4];
    bool in[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        in[q] = p.idx[q] >= 0;
        rows[q] = chan0 + (in[q] ? p.idx[q] * row_stride : I(0));
    }
    A s_acc = A(0), h_acc = A(0), w_acc = A(0);
    for (I c = 0; c < C; ++c) {
        A v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = in[q] ? to_acc(rows[q][c]) : A(0);
        const A gc = to_acc(g[c]);
        const A s = combine(p, v);
        const A ds_dh = p.hw * (v[2] - v[0]) + p.lw * (v[3] - v[1]);
        const A ds_dw = p.hh * (v[1] - v[0]) + p.lh * (v[3] - v[2]);
        s_acc += gc * s;
        h_acc += gc * ds_dh;
        w_acc += gc * ds_dw;
        if (grad_chan0 != nullptr) scatter_atomic(p, grad_chan0 + c, row_stride, a, gc);
    }
    *gs = s_acc;
    *gdh = h_acc;
    *gdw = w_acc;
}

}  // namespace dfa
