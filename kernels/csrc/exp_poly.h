// e^x in plain arithmetic that `omp simd` vectorises, shared by the native ops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace slotmesh {

// For x in [-87, 88]: x = n·ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor
// polynomial (relative error under 2e-7), 2^n put into the exponent bits. Callers clamp.
inline float exp_in_range(float x) {
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace slotmesh
