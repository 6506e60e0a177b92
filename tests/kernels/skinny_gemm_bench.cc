// Times the skinny GEMM (kernels/skinny_gemm.h) on the dense products of a DeepSeek-V2-Lite and a
// DeepSeek-V3 decode step, for 1..32 activation rows, against the device's measured copy bandwidth
// (a 1 GiB cudaMemcpyAsync, bytes read + written) and against cuBLAS (cublasGemmStridedBatchedEx, bf16
// in, fp32 compute) on the same operands; then the head GEMM (kernels/head_gemm.h) on the per-head
// products for 8..512 rows against cuBLAS.
//
// Each measurement replays a CUDA graph of back-to-back launches, each on its own weight matrix, so
// that no launch finds its weights in L2 from an earlier one: at least kMinLaunches launches and at
// least kMinGraphBytes of weights a replay (small products get many launches; a product bigger than
// L2 alternates between two matrices). Time per product = median replay / launches; "GB/s" counts
// weight bytes only, the traffic a decode step cannot avoid.
//
//   build/bin/skinny_gemm_bench [--only SUBSTRING] [--k-splits N]
//
// --only times the products whose name contains SUBSTRING; --k-splits forces the cluster split
// (SkinnyGemmParams::k_splits, 1..8) instead of the kernel's choice, for tuning that choice.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/head_gemm.h"
#include "kernels/skinny_gemm.h"
#include "tests/testing/gpu_bench.h"
#include "worker/model/cuda/cublas_api.h"

namespace cohort {
namespace {

using kernels::SkinnyGemmParams;
using testing::DeviceAlloc;

constexpr int kMinLaunches = 20;
constexpr int kMaxLaunches = 1024;
constexpr int64_t kMinGraphBytes = int64_t{256} << 20;
constexpr int kReps = 15;

struct Product {
  const char* name;
  int n_out;
  int k;
  int batch = 1;  // heads: x [rows, batch, k], w [batch][n_out, k], y [rows, batch, n_out]
  bool y_fp32 = false;
  int64_t weight_bytes() const { return int64_t{2} * batch * n_out * k; }
};

const Product kProducts[] = {
    {"V2-Lite q_proj", 3072, 2048},
    {"V2-Lite kv_a_proj", 576, 2048, 1, true},
    {"V2-Lite q_nope.W_uk", 512, 128, 16},
    {"V2-Lite o.W_uv", 128, 512, 16},
    {"V2-Lite o_proj", 2048, 2048},
    {"V2-Lite router", 64, 2048, 1, true},
    {"V2-Lite mlp gate_up", 21888, 2048},
    {"V2-Lite mlp down", 2048, 10944},
    {"V2-Lite shared gate_up", 5632, 2048},
    {"V2-Lite shared down", 2048, 2816},
    {"V2-Lite lm_head", 102400, 2048, 1, true},
    {"V3 q_a_proj", 1536, 7168},
    {"V3 kv_a_proj", 576, 7168, 1, true},
    {"V3 q_b_proj", 24576, 1536},
    {"V3 q_nope.W_uk", 512, 128, 128},
    {"V3 o.W_uv", 128, 512, 128},
    {"V3 o_proj", 7168, 16384},
    {"V3 router", 256, 7168, 1, true},
    {"V3 mlp gate_up", 36864, 7168},
    {"V3 mlp down", 7168, 18432},
    {"V3 shared gate_up", 4096, 7168},
    {"V3 shared down", 7168, 2048},
    {"V3 lm_head", 129280, 7168, 1, true},
};

constexpr int kRowCounts[] = {1, 2, 4, 8, 16, 32};
constexpr int kHeadRowCounts[] = {8, 16, 32, 64, 128, 256, 512};
constexpr int kMaxRows = 512;

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Random bf16 values in [-1, 1) (never zeros: zeros can run faster): one random 64 MiB block, then
// device copies of what is already filled.
void FillRandomBf16(__nv_bfloat16* device, int64_t count, std::mt19937& rng) {
  std::vector<uint16_t> block(std::min<int64_t>(count, int64_t{32} << 20));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (uint16_t& v : block) v = FloatToBf16(dist(rng));
  BENCH_CHECK(cudaMemcpy(device, block.data(), block.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  for (int64_t done = static_cast<int64_t>(block.size()); done < count;) {
    const int64_t n = std::min(count - done, done);
    BENCH_CHECK(cudaMemcpy(device + done, device, n * sizeof(uint16_t), cudaMemcpyDeviceToDevice));
    done += n;
  }
}

// `launch(l)` for l < launches, captured on `stream`, then timed; microseconds per launch.
double TimeLaunches(cudaStream_t stream, int launches, const std::function<void(int)>& launch) {
  const cudaGraphExec_t exec = testing::CaptureGraph(stream, [&] {
    for (int l = 0; l < launches; ++l) launch(l);
  });
  const double us =
      testing::MedianMicros(stream, 2, kReps, [&] { BENCH_CHECK(cudaGraphLaunch(exec, stream)); }) / launches;
  BENCH_CHECK(cudaGraphExecDestroy(exec));
  return us;
}

int Run(const std::string& only, int k_splits) {
  const testing::BenchDevice bench = testing::OpenBenchDevice("skinny_gemm_bench");
  const cudaStream_t stream = bench.stream;
  const double copy_gbs = bench.copy_gbs;

  // cuBLAS for comparison; the table goes on without it when it cannot be loaded.
  const absl::StatusOr<const cuda::CublasApi*> cublas_or = cuda::CublasApi::Load();
  const cuda::CublasApi* cublas = cublas_or.ok() ? *cublas_or : nullptr;
  cublasHandle_t handle = nullptr;
  if (cublas != nullptr && cublas->create(&handle) == CUBLAS_STATUS_SUCCESS) {
    constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // set up front: capture cannot allocate
    BENCH_CHECK(cudaDeviceSynchronize());
    void* workspace = DeviceAlloc<char>(kWorkspaceBytes);
    if (cublas->set_stream(handle, stream) != CUBLAS_STATUS_SUCCESS ||
        cublas->set_workspace(handle, workspace, kWorkspaceBytes) != CUBLAS_STATUS_SUCCESS) {
      handle = nullptr;
    }
  } else {
    std::printf("cuBLAS not available (%s): its columns stay empty\n",
                cublas_or.ok() ? "cublasCreate failed" : std::string(cublas_or.status().message()).c_str());
  }

  int64_t largest = 0;
  for (const Product& product : kProducts) largest = std::max(largest, product.weight_bytes());
  const int64_t pool_bytes = std::max<int64_t>(int64_t{1} << 30, 2 * largest);
  std::mt19937 rng(std::random_device{}());
  __nv_bfloat16* pool = DeviceAlloc<__nv_bfloat16>(pool_bytes / 2);
  FillRandomBf16(pool, pool_bytes / 2, rng);
  int64_t x_row = 0, y_row = 0;  // the longest rows of x and y (all heads)
  for (const Product& product : kProducts) {
    x_row = std::max(x_row, int64_t{product.batch} * product.k);
    y_row = std::max(y_row, int64_t{product.batch} * product.n_out);
  }
  __nv_bfloat16* x = DeviceAlloc<__nv_bfloat16>(kMaxRows * x_row);
  FillRandomBf16(x, kMaxRows * x_row, rng);
  float* y = DeviceAlloc<float>(kMaxRows * y_row);
  BENCH_CHECK(cudaDeviceSynchronize());

  // cuBLAS on the same operands, us a product (0 without cuBLAS).
  const auto time_cublas = [&](const Product& product, int rows, int launches, int64_t matrices) -> double {
    if (handle == nullptr) return 0.0;
    const float alpha = 1.0f, beta = 0.0f;
    const int64_t matrix_elements = product.weight_bytes() / 2;
    // Column-major: y^T [n_out, rows] = w^T' (w stored [n_out, k] row-major is k x n_out, op T) x^T.
    return TimeLaunches(stream, launches, [&](int l) {
      const cublasStatus_t status = cublas->gemm_strided_batched_ex(
          handle, CUBLAS_OP_T, CUBLAS_OP_N, product.n_out, rows, product.k, &alpha,
          pool + (l % matrices) * matrix_elements, CUDA_R_16BF, product.k, int64_t{product.n_out} * product.k, x,
          CUDA_R_16BF, product.batch * product.k, product.k, &beta, y, product.y_fp32 ? CUDA_R_32F : CUDA_R_16BF,
          product.batch * product.n_out, product.n_out, product.batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (status != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublasGemmStridedBatchedEx: %s\n", cublas->status_name(status));
        std::exit(1);
      }
    });
  };

  std::printf("\n%-24s %6s %6s %5s %4s %4s %8s %9s %7s %9s %11s %8s\n", "product", "N", "K", "batch", "out", "rows",
              "us", "GB/s", "of copy", "cuBLAS us", "cuBLAS GB/s", "speed-up");
  for (const Product& product : kProducts) {
    if (std::string(product.name).find(only) == std::string::npos) continue;
    const int64_t bytes = product.weight_bytes();
    const int launches = static_cast<int>(
        std::clamp<int64_t>((kMinGraphBytes + bytes - 1) / bytes, kMinLaunches, kMaxLaunches));
    const int64_t matrices = std::max<int64_t>(1, std::min<int64_t>(launches, pool_bytes / bytes));
    const int64_t matrix_elements = bytes / 2;
    for (const int rows : kRowCounts) {
      SkinnyGemmParams p;
      p.x = x;
      p.x_row_stride = int64_t{product.batch} * product.k;
      p.x_batch_stride = product.k;
      p.w_row_stride = product.k;
      p.w_batch_stride = int64_t{product.n_out} * product.k;
      p.y = y;
      p.y_row_stride = int64_t{product.batch} * product.n_out;
      p.y_batch_stride = product.n_out;
      p.y_fp32 = product.y_fp32;
      p.rows = rows;
      p.n_out = product.n_out;
      p.k = product.k;
      p.batch = product.batch;
      p.k_splits = k_splits;
      const double us = TimeLaunches(stream, launches, [&](int l) {
        p.w = pool + (l % matrices) * matrix_elements;
        BENCH_CHECK(kernels::LaunchSkinnyGemm(p, stream));
      });
      const double gbs = bytes / us / 1e3;
      std::printf("%-24s %6d %6d %5d %4s %4d %8.1f %9.0f %6.0f%%", product.name, product.n_out, product.k,
                  product.batch, product.y_fp32 ? "f32" : "bf16", rows, us, gbs, 100.0 * gbs / copy_gbs);
      if (handle != nullptr) {
        const double cublas_us = time_cublas(product, rows, launches, matrices);
        std::printf(" %9.1f %11.0f %7.2fx", cublas_us, bytes / cublas_us / 1e3, cublas_us / us);
      }
      std::printf("\n");
    }
  }

  // The per-head products past the skinny rows: the head GEMM against cuBLAS. Back-to-back launches
  // overlap under programmatic dependent launch as in a step: each copies its weights while the one
  // before it runs.
  std::printf("\n%-24s %6s %6s %5s %4s %8s %9s %8s\n", "head product", "N", "K", "batch", "rows", "us", "cuBLAS us",
              "speed-up");
  for (const Product& product : kProducts) {
    if (product.batch == 1 || product.y_fp32 || std::string(product.name).find(only) == std::string::npos) continue;
    const int64_t bytes = product.weight_bytes();
    const int launches = static_cast<int>(
        std::clamp<int64_t>((kMinGraphBytes + bytes - 1) / bytes, kMinLaunches, kMaxLaunches));
    const int64_t matrices = std::max<int64_t>(1, std::min<int64_t>(launches, pool_bytes / bytes));
    for (const int rows : kHeadRowCounts) {
      kernels::HeadGemmParams p;
      p.x = x;
      p.x_row_stride = int64_t{product.batch} * product.k;
      p.x_batch_stride = product.k;
      p.w_row_stride = product.k;
      p.w_batch_stride = int64_t{product.n_out} * product.k;
      p.y = reinterpret_cast<__nv_bfloat16*>(y);
      p.y_row_stride = int64_t{product.batch} * product.n_out;
      p.y_batch_stride = product.n_out;
      p.rows = rows;
      p.n_out = product.n_out;
      p.k = product.k;
      p.batch = product.batch;
      const double us = TimeLaunches(stream, launches, [&](int l) {
        p.w = pool + (l % matrices) * (bytes / 2);
        BENCH_CHECK(kernels::LaunchHeadGemm(p, stream));
      });
      std::printf("%-24s %6d %6d %5d %4d %8.1f", product.name, product.n_out, product.k, product.batch, rows, us);
      if (handle != nullptr) {
        const double cublas_us = time_cublas(product, rows, launches, matrices);
        std::printf(" %9.1f %7.2fx", cublas_us, cublas_us / us);
      }
      std::printf("\n");
    }
  }
  BENCH_CHECK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  std::string only;
  int k_splits = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (arg == "--k-splits" && i + 1 < argc) {
      k_splits = std::atoi(argv[++i]);
      if (k_splits < 1 || k_splits > cohort::kernels::kSkinnyMaxKSplits) {
        std::fprintf(stderr, "skinny_gemm_bench: --k-splits takes 1..%d, not %s\n", cohort::kernels::kSkinnyMaxKSplits,
                     argv[i]);
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: skinny_gemm_bench [--only SUBSTRING] [--k-splits N]\n");
      return 2;
    }
  }
  return cohort::Run(only, k_splits);
}
