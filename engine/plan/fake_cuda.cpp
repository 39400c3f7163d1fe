// meshtron-plan --simulate on a CPU-only build of torch: make fake `cuda` tensors usable.
//
// FakeTensorMode can create tensors on a `cuda` device without a GPU, but a CPU-only torch has
// no CUDA device guard (Tensor.copy_, .contiguous(), indexing and every autograd node on a
// `cuda` tensor construct one: "PyTorch is not linked with support for cuda devices") and its
// CUDA hooks say CUDA is not built, so autograd finds no accelerator for `cuda` nodes
// ("Cannot access accelerator device when none is available"). This shim, loaded into the
// simulating process only, registers torch's own no-op FakeGuardImpl<CUDA> as the CUDA device
// guard and turns the CPU build's stub CUDA hooks (already constructed by torch) into hooks of
// a CUDA build without devices: built, not available, no primary context. No tensor is ever
// allocated on a device: every `cuda` tensor of the simulation is a FakeTensor.
#include <new>

#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
struct SimulatedCUDAHooks final : at::CUDAHooksInterface {
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return c10::impl::kFakeGuardImplMaxDevices; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  int getNumGPUs() const override { return c10::impl::kFakeGuardImplMaxDevices; }
};
// the stub object is overwritten in place: same size, only the virtual table changes
static_assert(sizeof(SimulatedCUDAHooks) == sizeof(at::CUDAHooksInterface), "CUDA hooks layout changed");
}  // namespace

// Returns a bit set: 1 = device guard installed, 2 = hooks turned into a device-less CUDA build.
extern "C" int meshtron_simulate_cuda() {
  static c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> guard;
  int done = 0;
  if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) {
    c10::impl::registerDeviceGuard(c10::DeviceType::CUDA, &guard);
    done |= 1;
  }
  const at::CUDAHooksInterface& hooks = at::detail::getCUDAHooks();
  if (!hooks.isBuilt()) {
    new (const_cast<at::CUDAHooksInterface*>(&hooks)) SimulatedCUDAHooks();
    done |= 2;
  }
  return done;
}
