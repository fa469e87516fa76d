// Shared device helpers for the deformarray CUDA kernels.
//
// Compiled at run time by NVRTC (deformarray/cuda/_loader.py inlines this file where a
// kernel file says #include "common.cuh"). It deliberately includes no header at all:
// NVRTC does not ship cuda_fp16.h / cuda_bf16.h, and where CuPy finds them depends on how
// the CUDA toolkit was installed, so the 16-bit types below are our own storage types
// with explicit conversions (PTX cvt for float16, bit arithmetic for bfloat16).
//
// Conventions used by every kernel:
//  * i64 (64-bit) for every index, size and loop counter, so that no tensor dimension or
//    product of dimensions can overflow at 2**31 elements;
//  * T is the element type of the arrays (float, double, dfa::half, dfa::bfloat16);
//    acc_t<T> is the type arithmetic is done in (float for the 16-bit types);
//  * grid-stride loops, so the launch grid size never limits the problem size.
#pragma once

namespace dfa {

typedef long long i64;

// ---------------------------------------------------------------------------------------
// 16-bit storage types: same size and bit layout as IEEE binary16 / bfloat16, which is
// all a kernel needs from them (every arithmetic operation happens in float).
struct alignas(2) half {
    unsigned short bits;
};
struct alignas(2) bfloat16 {
    unsigned short bits;
};

// acc_t<T>: the accumulator type of element type T.
template <typename T> struct acc_type { typedef T type; };
template <> struct acc_type<half> { typedef float type; };
template <> struct acc_type<bfloat16> { typedef float type; };
template <typename T> using acc_t = typename acc_type<T>::type;

// to_acc: element -> accumulator type.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
#ifndef DFA_HOST_EMULATION
__device__ __forceinline__ float to_acc(half v) {
    float f;
    // Exact widening conversion (the same instruction cuda_fp16.h's __half2float uses).
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
#else
// Test-only host build (tests/cuda_emulation.py compiles these kernels with g++ to run the
// launch code without a GPU): _Float16 converts exactly as the PTX instructions do.
__device__ __forceinline__ float to_acc(half v) {
    _Float16 h;
    __builtin_memcpy(&h, &v.bits, 2);
    return static_cast<float>(h);
}
#endif
__device__ __forceinline__ float to_acc(bfloat16 v) {
    // bfloat16 is the top half of a float32: widening is a shift.
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

// from_acc<T>: accumulator -> element type, round to nearest even.
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ half from_acc<half>(float v) {
    half r;
#ifndef DFA_HOST_EMULATION
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#else
    const _Float16 h = static_cast<_Float16>(v);  // round to nearest even, as cvt.rn
    __builtin_memcpy(&r.bits, &h, 2);
#endif
    return r;
}
template <> __device__ __forceinline__ bfloat16 from_acc<bfloat16>(float v) {
    // Round to nearest even on the 16 dropped bits (what cuda_bf16.h and ml_dtypes do);
    // NaN is kept a (quiet) NaN instead of being rounded into infinity.
    unsigned int u = __float_as_uint(v);
    bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = static_cast<unsigned short>((u >> 16) | 0x0040u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = static_cast<unsigned short>(u >> 16);
    }
    return r;
}

__device__ __forceinline__ float floor_acc(float v) { return floorf(v); }
__device__ __forceinline__ double floor_acc(double v) { return floor(v); }

// ---------------------------------------------------------------------------------------
// Grid-stride loop over [0, n) with a 64-bit counter. The host emulation of the tests
// (tests/cuda_emulation.py) defines its own, which can visit the indices in reverse.
#ifndef DFA_GRID_STRIDE_LOOP
#define DFA_GRID_STRIDE_LOOP(i, n)                                                         \
    for (::dfa::i64 i = static_cast<::dfa::i64>(blockIdx.x) * blockDim.x + threadIdx.x;  \
         i < (n); i += static_cast<::dfa::i64>(blockDim.x) * gridDim.x)
#endif

// ---------------------------------------------------------------------------------------
// Bilinear sampling of one (H, W) plane at a fractional point (h, w), with the rules of
// the SPEC (torchvision's numbers):
//  * a point is "valid" iff -1 < h < H and -1 < w < W; an invalid point samples 0 and has
//    zero gradient (also at exactly h == -1 or w == -1, where torchvision differs);
//  * the four corners are (h_low, w_low), (h_low, w_low+1), (h_low+1, w_low),
//    (h_low+1, w_low+1) with h_low = floor(h); a corner outside the image contributes 0.

template <typename A> __device__ __forceinline__ bool point_valid(A h, A w, i64 H, i64 W) {
    return h > A(-1) && w > A(-1) && h < A(H) && w < A(W);
}

// The four corners of a valid point: flat plane index (y*W + x, or -1 when the corner
// lies outside the image) and bilinear weight, in the order v1, v2, v3, v4 above.
template <typename A> struct Corners {
    i64 idx[4];
    A wt[4];
};

template <typename A>
__device__ __forceinline__ Corners<A> bilinear_corners(A h, A w, i64 H, i64 W) {
    const i64 h_low = static_cast<i64>(floor_acc(h));
    const i64 w_low = static_cast<i64>(floor_acc(w));
    const i64 h_high = h_low + 1;
    const i64 w_high = w_low + 1;
    const A lh = h - static_cast<A>(h_low);
    const A lw = w - static_cast<A>(w_low);
    const A hh = A(1) - lh;
    const A hw = A(1) - lw;
    const bool y0 = h_low >= 0, y1 = h_high <= H - 1;
    const bool x0 = w_low >= 0, x1 = w_high <= W - 1;
    Corners<A> c;
    c.idx[0] = (y0 && x0) ? h_low * W + w_low : -1;
    c.idx[1] = (y0 && x1) ? h_low * W + w_high : -1;
    c.idx[2] = (y1 && x0) ? h_high * W + w_low : -1;
    c.idx[3] = (y1 && x1) ? h_high * W + w_high : -1;
    c.wt[0] = hh * hw;
    c.wt[1] = hh * lw;
    c.wt[2] = lh * hw;
    c.wt[3] = lh * lw;
    return c;
}

// Value at a valid point: sum over the corners inside the image of weight * x[corner].
template <typename T>
__device__ __forceinline__ acc_t<T> bilinear_sample(const T* plane, i64 H, i64 W, acc_t<T> h,
                                                    acc_t<T> w) {
    typedef acc_t<T> A;
    const Corners<A> c = bilinear_corners(h, w, H, W);
    A v = A(0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (c.idx[q] >= 0) v += c.wt[q] * to_acc(plane[c.idx[q]]);
    }
    return v;
}

// Value and its derivatives with respect to h and w at a valid point:
//   d/dh = (1 - lw) * (v3 - v1) + lw * (v4 - v2)
//   d/dw = (1 - lh) * (v2 - v1) + lh * (v4 - v3)
// with lh = h - floor(h), lw = w - floor(w) and v_q = 0 for a corner outside the image.
template <typename T>
__device__ __forceinline__ void bilinear_sample_grad(const T* plane, i64 H, i64 W, acc_t<T> h,
                                                     acc_t<T> w, acc_t<T>* val,
                                                     acc_t<T>* d_h, acc_t<T>* d_w) {
    typedef acc_t<T> A;
    const Corners<A> c = bilinear_corners(h, w, H, W);
    A v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = c.idx[q] >= 0 ? to_acc(plane[c.idx[q]]) : A(0);
    const A lh = h - floor_acc(h);
    const A lw = w - floor_acc(w);
    *val = c.wt[0] * v[0] + c.wt[1] * v[1] + c.wt[2] * v[2] + c.wt[3] * v[3];
    *d_h = (A(1) - lw) * (v[2] - v[0]) + lw * (v[3] - v[1]);
    *d_w = (A(1) - lh) * (v[1] - v[0]) + lh * (v[3] - v[2]);
}

}  // namespace dfa

// ---------------------------------------------------------------------------------------
// Clamped bilinear sampling, the rule of the RoI pooling operators (roi_pool.cu with
// margin 1: RoIAlign / mmcv's bilinear_interpolate; psroi_pool.cu with margin 0.5: MXNet's
// DeformablePSROIPooling). Same numbers as the CPU backend's _bilinear.clamped_axis.
// Unlike the convolution's rule above, a point is clamped into the image instead of losing
// its outside corners. Per axis, for a coordinate t on an axis of `size` pixels:
//  * the point is used ("ok") iff -margin <= t <= size - 1 + margin (not for NaN); a
//    point unused on either axis samples 0 (roi_pool) or is skipped (psroi_pool), with
//    zero gradient;
//  * tc = t clamped into [0, size-1], low = floor(tc), high = min(low + 1, size - 1),
//    frac = tc - low: weights 1 - frac on low, frac on high;
//  * slope = 1 where the sample moves with t (0 <= t < size - 1), else 0 (a clamped point
//    does not move). The derivative of the value along the axis is slope * (v[high] -
//    v[low]) weighted by the other axis: at an integer t the derivative from above, as for
//    deformable convolution. (mmcv and MXNet differ at a few boundary points; see
//    docs/deform_roi_pool.md and docs/deform_psroi_pool.md.)
// namespace dfa is reopened so that this block stays separate from the helpers above.
namespace dfa {

template <typename A> struct ClampedAxis {
    bool ok;
    i64 low, high;
    A frac, slope;
};

template <typename A>
__device__ __forceinline__ ClampedAxis<A> clamped_axis(A t, i64 size, A margin) {
    ClampedAxis<A> a;
    const A top = static_cast<A>(size - 1);
    a.ok = t >= -margin && t <= top + margin;
    const A tc = !a.ok ? A(0) : (t < A(0) ? A(0) : (t > top ? top : t));
    a.low = static_cast<i64>(floor_acc(tc));
    a.high = a.low + 1 < size - 1 ? a.low + 1 : size - 1;
    a.frac = tc - static_cast<A>(a.low);
    a.slope = (a.ok && t >= A(0) && t < top) ? A(1) : A(0);
    return a;
}

// A point (y, x) of a (H, W) plane: its four corners, weights and derivative coefficients.
template <typename A> struct ClampedPoint {
    bool valid;  // used on both axes
    i64 idx[4];  // flat y*W + x of (low_y, low_x), (low_y, high_x), (high_y, low_x), (high_y, high_x)
    A wt[4];     // bilinear weights
    A d_y[4];    // d value / d y = sum_q d_y[q] * v_q
    A d_x[4];    // d value / d x = sum_q d_x[q] * v_q
};

template <typename A>
__device__ __forceinline__ ClampedPoint<A> clamped_point(A y, A x, i64 H, i64 W, A margin) {
    const ClampedAxis<A> ay = clamped_axis(y, H, margin);
    const ClampedAxis<A> ax = clamped_axis(x, W, margin);
    ClampedPoint<A> c;
    c.valid = ay.ok && ax.ok;
    const A fy = ay.frac, fx = ax.frac;
    const A gy = A(1) - fy, gx = A(1) - fx;
    c.idx[0] = ay.low * W + ax.low;
    c.idx[1] = ay.low * W + ax.high;
    c.idx[2] = ay.high * W + ax.low;
    c.idx[3] = ay.high * W + ax.high;
    c.wt[0] = gy * gx;
    c.wt[1] = gy * fx;
    c.wt[2] = fy * gx;
    c.wt[3] = fy * fx;
    //   d/dy = (1-fx)*(v3 - v1) + fx*(v4 - v2),   d/dx = (1-fy)*(v2 - v1) + fy*(v4 - v3)
    c.d_y[0] = -gx * ay.slope; c.d_y[1] = -fx * ay.slope;
    c.d_y[2] = gx * ay.slope;  c.d_y[3] = fx * ay.slope;
    c.d_x[0] = -gy * ax.slope; c.d_x[1] = gy * ax.slope;
    c.d_x[2] = -fy * ax.slope; c.d_x[3] = fy * ax.slope;
    return c;
}

// Value of a (H, W) plane at a point described by clamped_point (0 when not valid).
template <typename T>
__device__ __forceinline__ acc_t<T> clamped_value(const T* plane, const ClampedPoint<acc_t<T>>& c) {
    typedef acc_t<T> A;
    if (!c.valid) return A(0);
    return c.wt[0] * to_acc(plane[c.idx[0]]) + c.wt[1] * to_acc(plane[c.idx[1]]) +
           c.wt[2] * to_acc(plane[c.idx[2]]) + c.wt[3] * to_acc(plane[c.idx[3]]);
}

// Value and derivatives with respect to y and x (all 0 when not valid).
template <typename T>
__device__ __forceinline__ void clamped_value_grad(const T* plane,
                                                   const ClampedPoint<acc_t<T>>& c,
                                                   acc_t<T>* val, acc_t<T>* d_y,
                                                   acc_t<T>* d_x) {
    typedef acc_t<T> A;
    A v = A(0), gy = A(0), gx = A(0);
    if (c.valid) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const A p = to_acc(plane[c.idx[q]]);
            v += c.wt[q] * p;
            gy += c.d_y[q] * p;
            gx += c.d_x[q] * p;
        }
    }
    *val = v;
    *d_y = gy;
    *d_x = gx;
}

__device__ __forceinline__ float ceil_acc(float v) { return ceilf(v); }
__device__ __forceinline__ double ceil_acc(double v) { return ceil(v); }
__device__ __forceinline__ float round_acc(float v) { return roundf(v); }  // half away from 0
__device__ __forceinline__ double round_acc(double v) { return round(v); }

}  // namespace dfa
