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
// Grid-stride loop over [0, n) with a 64-bit counter.
#define DFA_GRID_STRIDE_LOOP(i, n)                                                         \
    for (::dfa::i64 i = static_cast<::dfa::i64>(blockIdx.x) * blockDim.x + threadIdx.x;  \
         i < (n); i += static_cast<::dfa::i64>(blockDim.x) * gridDim.x)

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
