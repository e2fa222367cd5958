#pragma once
// Pose heatmap rendering (PoseC3D's GeneratePoseTarget), the math shared by the CPU and CUDA kernels.
//
// One "stamp" is what one person draws into one channel of one frame: a joint's Gaussian, or a limb's Gaussian
// of the squared distance to a segment, inside a window. The window rule is GeneratePoseTarget's: along x,
//   [max(int(lo - 3 sigma), 0), min(int(hi + 3 sigma) + 1, W))
// with lo = hi = the joint's x for a joint, and lo/hi = the smaller/larger x of the two end points for a limb;
// int() truncates toward zero (so a point up to 1 + 3 sigma left of the image still reaches column 0). The
// bounds are computed in double, as NumPy 1.x did for a float32 coordinate and a Python float sigma; every
// value inside the window is computed in float32 with the same operations, in the same order, as the NumPy
// original, so results agree to a few float32 rounding steps (exp is evaluated by exp_nonpositive below).
// A pixel's value is the max over persons of their stamps' values at that pixel, and 0 where no stamp reaches.
//
// The CPU kernel walks each stamp's window; the CUDA kernel gives each output pixel a thread that asks every
// person's stamp whether the pixel is inside. Both call channel_stamp and stamp_value below.
#include <cmath>
#include <cstdint>

#include "common/fast_math.h"
#include "common/macros.h"

namespace epamx {

// What the kernels need to know about one render call. Keypoints are (N, M, T, V, 2) and scores (N, M, T, V),
// both contiguous float32; the output is (N, C, T, H, W) with C = (with_joints ? V : 0) + L.
template <typename index_t>
struct RenderGeometry {
  index_t N, M, T, V, C, H, W;
  index_t joint_channels;  // V when joints are rendered, else 0: channels [joint_channels, C) are limbs
  double three_sigma;      // window half-width, in double like the original's Python arithmetic
  float two_sigma2;        // 2 * float32(sigma^2): exp(-d2 / two_sigma2) rounds like exp(-d2 / 2 / sigma**2)
  double eps;              // persons (limbs) whose score (min of both end scores) is below eps draw nothing
};

// A window [x0, x1) x [y0, y1) and how to evaluate the stamp inside it. Empty windows (x0 >= x1 or y0 >= y1)
// mean the person draws nothing.
struct Stamp {
  int32_t x0, x1, y0, y1;
  float ax, ay;    // the joint, or the limb's start
  float bx, by;    // the limb's end (segment stamps only)
  float d2ab;      // squared segment length, rounded to float32 (segment stamps only)
  float peak;      // the value at distance 0: the score, or min(start score, end score) for a limb
  bool segment;    // distance to the segment a-b rather than to the point a
};

// The window along one axis for coordinates in [lo, hi], clipped to [0, size), with Python int() truncation.
// Computed in double and clamped before converting, so far-away coordinates cannot overflow the integer.
HOST_DEVICE_INLINE void axis_window(float lo, float hi, double three_sigma, int32_t size, int32_t& begin,
                                    int32_t& end) {
  double b = std::trunc(static_cast<double>(lo) - three_sigma);
  double e = std::trunc(static_cast<double>(hi) + three_sigma) + 1.0;
  b = b < 0.0 ? 0.0 : (b > size ? static_cast<double>(size) : b);
  e = e < 0.0 ? 0.0 : (e > size ? static_cast<double>(size) : e);
  begin = static_cast<int32_t>(b);
  end = static_cast<int32_t>(e);
}

HOST_DEVICE_INLINE bool finite_point(float x, float y) { return std::isfinite(x) && std::isfinite(y); }

// Whether a score lets its person draw: finite and at least eps. A NaN or infinite score means "missing", like a
// NaN coordinate: an infinite peak would draw infinite pixels (and NaN where the Gaussian underflows to 0).
HOST_DEVICE_INLINE bool score_draws(float score, double eps) {
  return std::isfinite(score) && static_cast<double>(score) >= eps;
}

HOST_DEVICE_INLINE Stamp empty_stamp() {
  Stamp s{};
  s.x0 = s.x1 = s.y0 = s.y1 = 0;
  return s;
}

// A joint's Gaussian at (x, y) with peak `score`. A missing joint (NaN or infinite coordinate), a missing score
// (NaN or infinite) or a score below eps draws nothing.
template <typename index_t>
HOST_DEVICE_INLINE Stamp joint_stamp(float x, float y, float score, const RenderGeometry<index_t>& g) {
  if (!score_draws(score, g.eps) || !finite_point(x, y)) return empty_stamp();
  Stamp s = empty_stamp();
  axis_window(x, x, g.three_sigma, static_cast<int32_t>(g.W), s.x0, s.x1);
  axis_window(y, y, g.three_sigma, static_cast<int32_t>(g.H), s.y0, s.y1);
  s.ax = x;
  s.ay = y;
  s.peak = score;
  s.segment = false;
  return s;
}

// A limb from joint a to joint b. Its window is the bounding box of both end points, widened by 3 sigma. A limb
// shorter than 1 pixel (squared length < 1) is drawn as joint a's Gaussian with a's own score and window,
// exactly as the original does; its score check still uses min(score_a, score_b). A missing score (NaN or
// infinite) at either end means no limb. The squared length is summed in double from the float32 differences, as
// NumPy 1.x evaluates the original's scalar (dx**2 + dy**2), and rounded to float32 where the original mixes it
// into float32 arrays.
template <typename index_t>
HOST_DEVICE_INLINE Stamp limb_stamp(float ax, float ay, float sa, float bx, float by, float sb,
                                    const RenderGeometry<index_t>& g) {
  const float peak = sa < sb ? sa : sb;
  if (!score_draws(sa, g.eps) || !score_draws(sb, g.eps) || !finite_point(ax, ay) || !finite_point(bx, by)) {
    return empty_stamp();
  }
  const auto dx = static_cast<double>(ax - bx);
  const auto dy = static_cast<double>(ay - by);
  const double d2ab = dx * dx + dy * dy;
  if (d2ab < 1.0) return joint_stamp(ax, ay, sa, g);
  Stamp s = empty_stamp();
  axis_window(ax < bx ? ax : bx, ax < bx ? bx : ax, g.three_sigma, static_cast<int32_t>(g.W), s.x0, s.x1);
  axis_window(ay < by ? ay : by, ay < by ? by : ay, g.three_sigma, static_cast<int32_t>(g.H), s.y0, s.y1);
  s.ax = ax;
  s.ay = ay;
  s.bx = bx;
  s.by = by;
  s.d2ab = static_cast<float>(d2ab);
  s.peak = peak;
  s.segment = true;
  return s;
}

HOST_DEVICE_INLINE bool stamp_is_empty(const Stamp& s) { return s.x0 >= s.x1 || s.y0 >= s.y1; }

HOST_DEVICE_INLINE bool stamp_contains(const Stamp& s, int32_t x, int32_t y) {
  return x >= s.x0 && x < s.x1 && y >= s.y0 && y < s.y1;
}

// The stamp's value at pixel (x, y), which must lie inside its window; `segment` must equal s.segment (a
// template argument so that each loop over a window row has no branch). Written with selects, not branches.
template <bool segment>
HOST_DEVICE_INLINE float stamp_value(const Stamp& s, float two_sigma2, int32_t xi, int32_t yi) {
  const float x = static_cast<float>(xi);
  const float y = static_cast<float>(yi);
  const float dxa = x - s.ax;
  const float dya = y - s.ay;
  const float d2a = dxa * dxa + dya * dya;
  float d2 = d2a;
  if constexpr (segment) {
    const float dxb = x - s.bx;
    const float dyb = y - s.by;
    const float d2b = dxb * dxb + dyb * dyb;
    // The projection of the pixel onto the line, as a fraction of the segment; beyond an end point the
    // distance is to that end point. (* 0.5f rounds exactly like the original's / 2.)
    const float coeff = (d2a - d2b + s.d2ab) * 0.5f / s.d2ab;
    const float px = s.ax + coeff * (s.bx - s.ax);
    const float py = s.ay + coeff * (s.by - s.ay);
    const float dxl = x - px;
    const float dyl = y - py;
    const float d2l = dxl * dxl + dyl * dyl;
    d2 = coeff >= 1.0f ? d2b : d2l;
    d2 = coeff > 0.0f ? d2 : d2a;
  }
  return exp_nonpositive(-d2 / two_sigma2) * s.peak;
}

// The stamp person m draws into channel c of frame t of clip n. `kp` is (N, M, T, V, 2), `scores` (N, M, T, V)
// or null (every score 1), `limbs` the (L, 2) joint pairs.
template <typename index_t>
HOST_DEVICE_INLINE Stamp channel_stamp(index_t n, index_t m, index_t t, index_t c, const RenderGeometry<index_t>& g,
                                       const float* kp, const float* scores, const int32_t* limbs) {
  const index_t frame = ((n * g.M + m) * g.T + t) * g.V;
  if (c < g.joint_channels) {
    const index_t j = frame + c;
    return joint_stamp(kp[2 * j], kp[2 * j + 1], scores ? scores[j] : 1.0f, g);
  }
  const index_t l = c - g.joint_channels;
  const index_t a = frame + limbs[2 * l];
  const index_t b = frame + limbs[2 * l + 1];
  return limb_stamp(kp[2 * a], kp[2 * a + 1], scores ? scores[a] : 1.0f, kp[2 * b], kp[2 * b + 1],
                    scores ? scores[b] : 1.0f, g);
}

// Output pixels one GPU thread writes: a run along a row, so that the persons' stamps, which cost more than a
// pixel's value, are worked out once for several pixels.
constexpr int32_t kPixelsPerThread = 4;

// GPU threads for a render: one per run of kPixelsPerThread pixels (fewer at a row's end) of every output row.
template <typename index_t>
HOST_DEVICE_INLINE index_t render_threads(const RenderGeometry<index_t>& g) {
  return g.N * g.C * g.T * g.H * ((g.W + kPixelsPerThread - 1) / kPixelsPerThread);
}

// One GPU thread: run i of the contiguous (N, C, T, H, W) output, each pixel the max over persons of the stamps
// that reach it (0 where none does). Each thread writes its own pixels once and reads only inputs, so threads
// are independent of each other whatever their order.
template <typename out_t, typename index_t>
HOST_DEVICE_INLINE void render_run_thread(index_t i, const RenderGeometry<index_t>& g, const float* kp,
                                          const float* scores, const int32_t* limbs, out_t* out) {
  const index_t runs_per_row = (g.W + kPixelsPerThread - 1) / kPixelsPerThread;
  const auto x0 = static_cast<int32_t>((i % runs_per_row) * kPixelsPerThread);
  const index_t row = i / runs_per_row;  // (n, c, t, y)
  const auto y = static_cast<int32_t>(row % g.H);
  const index_t plane = row / g.H;
  const index_t t = plane % g.T;
  const index_t c = (plane / g.T) % g.C;
  const index_t n = plane / (g.T * g.C);
  const int32_t left = static_cast<int32_t>(g.W) - x0;
  const int32_t count = left < kPixelsPerThread ? left : kPixelsPerThread;
  float best[kPixelsPerThread];
  for (int32_t k = 0; k < kPixelsPerThread; ++k) best[k] = 0.0f;
  for (index_t m = 0; m < g.M; ++m) {
    const Stamp s = channel_stamp(n, m, t, c, g, kp, scores, limbs);
    if (y < s.y0 || y >= s.y1) continue;
    for (int32_t k = 0; k < count; ++k) {
      const int32_t x = x0 + k;
      if (x < s.x0 || x >= s.x1) continue;
      const float v =
          s.segment ? stamp_value<true>(s, g.two_sigma2, x, y) : stamp_value<false>(s, g.two_sigma2, x, y);
      // A select, as on the CPU (scores are finite here, so v is never NaN).
      best[k] = v > best[k] ? v : best[k];
    }
  }
  out_t* dst = out + row * g.W + x0;
  for (int32_t k = 0; k < count; ++k) dst[k] = static_cast<out_t>(best[k]);
}

}  // namespace epamx
