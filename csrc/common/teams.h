#pragma once
// Teams: `width` consecutive lanes of a warp (a power of two, at most 32) that share one position's channels in
// channels-last memory. Lane l takes channels l, l + width, l + 2 * width, ..., so a team's loads are consecutive
// addresses (the teams of a warp cover consecutive positions when C < 32), and the lanes' results are then combined
// by a butterfly of warp shuffles (cuda_utils.cuh, EPAMX_TEAM_LOOP): at offsets width / 2, ..., 1 every lane l takes
// combine(its value, lane l ^ offset's). The order of the combines depends on C alone: the same results every run.
// team_butterfly is the CPU twin the thread-body hooks combine lanes with, in the same order.
#include <cstdint>

#include "common/macros.h"

namespace epamx {

constexpr int kWarpLanes = 32;

// The team width for C channels: the smallest power of two >= C, at most a warp.
HOST_DEVICE_INLINE int team_width(int64_t channels) {
  int width = 1;
  while (width < channels && width < kWarpLanes) width *= 2;
  return width;
}

// The lanes' values v[0..width) after the GPU's butterfly: at each offset every lane l at once takes
// combine(v[l], v[l ^ offset]). v[0] is then what lane 0 holds on the GPU (every lane's, for a commutative combine).
template <typename T, typename Combine>
void team_butterfly(T* v, int width, const Combine& combine) {
  T next[kWarpLanes];
  for (int offset = width / 2; offset > 0; offset /= 2) {
    for (int l = 0; l < width; ++l) next[l] = combine(v[l], v[l ^ offset]);
    for (int l = 0; l < width; ++l) v[l] = next[l];
  }
}

}  // namespace epamx
