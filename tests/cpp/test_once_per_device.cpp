// OncePerDevice (csrc/ops/once_per_device.h), the per-device cache of kernel attributes: once
// per device on success, again after a failure, independently per device.
#include <gtest/gtest.h>

#include "ops/once_per_device.h"

namespace {

using mage::cuda::OncePerDevice;

TEST(OncePerDevice, RunsOncePerDeviceAfterSuccess) {
  OncePerDevice once;
  int calls = 0;
  auto ok = [&] { ++calls; return 0; };
  EXPECT_EQ(once.run(0, ok), 0);
  EXPECT_EQ(once.run(0, ok), 0);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(once.done(0));
  EXPECT_FALSE(once.done(1));
  EXPECT_EQ(once.run(1, ok), 0);  // a second device is set up on its own
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(once.run(1, ok), 0);
  EXPECT_EQ(calls, 2);
}

TEST(OncePerDevice, AFailureIsNotCached) {
  OncePerDevice once;
  int calls = 0;
  int result = 7;  // an error code first, then success
  auto fn = [&] { ++calls; return result; };
  EXPECT_EQ(once.run(0, fn), 7);
  EXPECT_FALSE(once.done(0));
  EXPECT_EQ(once.run(0, fn), 7);
  result = 0;
  EXPECT_EQ(once.run(0, fn), 0);
  EXPECT_EQ(once.run(0, fn), 0);
  EXPECT_EQ(calls, 3);
  EXPECT_TRUE(once.done(0));
}

TEST(OncePerDevice, DevicesOutsideTheTableRunEveryTime) {
  OncePerDevice once;
  int calls = 0;
  auto ok = [&] { ++calls; return 0; };
  once.run(OncePerDevice::kMaxDevices, ok);
  once.run(OncePerDevice::kMaxDevices, ok);
  once.run(-1, ok);
  EXPECT_EQ(calls, 3);
  once.run(OncePerDevice::kMaxDevices - 1, ok);
  once.run(OncePerDevice::kMaxDevices - 1, ok);
  EXPECT_EQ(calls, 4);
}

}  // namespace
