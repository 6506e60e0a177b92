// The skinny GEMM (kernels/skinny_gemm.h), and the head GEMM (kernels/head_gemm.h) through the same
// checks, against a double-precision CPU product. The skinny GEMM: every row count
// the mma fragments treat differently (1..32 activation rows), column counts that are not multiples
// of the 16-row fragments, K tails, forced and chosen cluster splits, bf16 and fp32 outputs, the last
// columns written to a separate fp32 tail, and the batched per-head products with interleaved strides. Inputs are fresh random values each run; the
// padding around every operand holds NaN, so a read outside the operands poisons a result, and the
// output buffer starts as NaN bytes that must survive wherever the product is not written. A chain of
// dependent products, eager and replayed from a CUDA graph, checks the programmatic-launch edges.
#include "kernels/skinny_gemm.h"
#include "kernels/head_gemm.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "tests/testing/gpu.h"

namespace cohort::kernels {
namespace {

using testing::DeviceVector;

constexpr uint16_t kNanBf16 = 0xffff;

// One product and its memory layout. Strides 0 mean dense: x_row_stride = w_row_stride = k, y's row
// stride n_out rounded up to 16 bytes, batch strides the whole matrix.
struct Case {
  int rows = 1;
  int n_out = 1;
  int k = 8;
  int batch = 1;
  bool y_fp32 = false;
  int k_splits = 0;
  int64_t x_row_stride = 0, x_batch_stride = 0;
  int64_t w_row_stride = 0, w_batch_stride = 0;
  int64_t y_row_stride = 0, y_batch_stride = 0;
  // With tail_from > 0, columns from it on go to an fp32 tail buffer of these strides (0: dense).
  int tail_from = 0;
  int64_t tail_row_stride = 0, tail_batch_stride = 0;
};

std::string Describe(const Case& c) {
  std::ostringstream s;
  s << "rows=" << c.rows << " n_out=" << c.n_out << " k=" << c.k << " batch=" << c.batch
    << (c.y_fp32 ? " fp32" : " bf16") << " k_splits=" << c.k_splits << " strides x=" << c.x_row_stride << "/"
    << c.x_batch_stride << " w=" << c.w_row_stride << "/" << c.w_batch_stride << " y=" << c.y_row_stride << "/"
    << c.y_batch_stride;
  if (c.tail_from > 0) {
    s << " tail from " << c.tail_from << " strides " << c.tail_row_stride << "/" << c.tail_batch_stride;
  }
  return s.str();
}

Case Dense(Case c) {
  const int64_t y_align = c.y_fp32 ? 4 : 8;
  if (c.x_row_stride == 0) c.x_row_stride = c.k;
  if (c.x_batch_stride == 0) c.x_batch_stride = c.rows * c.x_row_stride;
  if (c.w_row_stride == 0) c.w_row_stride = c.k;
  if (c.w_batch_stride == 0) c.w_batch_stride = c.n_out * c.w_row_stride;
  if (c.y_row_stride == 0) c.y_row_stride = (c.n_out + y_align - 1) / y_align * y_align;
  if (c.y_batch_stride == 0) c.y_batch_stride = c.rows * c.y_row_stride;
  if (c.tail_from > 0 && c.tail_row_stride == 0) c.tail_row_stride = (c.n_out - c.tail_from + 3) / 4 * 4;
  if (c.tail_from > 0 && c.tail_batch_stride == 0) c.tail_batch_stride = c.rows * c.tail_row_stride;
  return c;
}

// Elements from the first to one past the last of a [batch][rows, cols] operand.
int64_t Extent(int batch, int64_t batch_stride, int rows, int64_t row_stride, int cols) {
  return (batch - 1) * batch_stride + (rows - 1) * row_stride + cols;
}

// A [batch][rows, cols] bf16 operand inside a NaN-filled buffer; `values` gets the same elements densely.
std::vector<uint16_t> RandomOperand(const Case& c, int rows, int cols, int64_t row_stride, int64_t batch_stride,
                                    float scale, std::mt19937& rng, std::vector<float>* values) {
  std::vector<uint16_t> buffer(Extent(c.batch, batch_stride, rows, row_stride, cols), kNanBf16);
  std::uniform_real_distribution<float> uniform(-scale, scale);
  values->resize(static_cast<size_t>(c.batch) * rows * cols);
  for (int b = 0; b < c.batch; ++b) {
    for (int r = 0; r < rows; ++r) {
      for (int i = 0; i < cols; ++i) {
        const uint16_t bits = FloatToBF16(uniform(rng));
        buffer[b * batch_stride + r * row_stride + i] = bits;
        (*values)[(static_cast<size_t>(b) * rows + r) * cols + i] = BF16ToFloat(bits);
      }
    }
  }
  return buffer;
}

// ref[b][m][n] = sum_k x w in double, and sum_k |x w| (the scale fp32 summation errors grow with).
void Reference(const Case& c, const std::vector<float>& x, const std::vector<float>& w, std::vector<double>* ref,
               std::vector<double>* magnitude) {
  ref->assign(static_cast<size_t>(c.batch) * c.rows * c.n_out, 0.0);
  magnitude->assign(ref->size(), 0.0);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < c.batch; ++b) {
    for (int n = 0; n < c.n_out; ++n) {
      const float* wr = &w[(static_cast<size_t>(b) * c.n_out + n) * c.k];
      for (int m = 0; m < c.rows; ++m) {
        const float* xr = &x[(static_cast<size_t>(b) * c.rows + m) * c.k];
        double sum = 0.0, abs_sum = 0.0;
        for (int i = 0; i < c.k; ++i) {
          const double product = static_cast<double>(xr[i]) * wr[i];  // exact: two bf16 values
          sum += product;
          abs_sum += std::abs(product);
        }
        (*ref)[(static_cast<size_t>(b) * c.rows + m) * c.n_out + n] = sum;
        (*magnitude)[(static_cast<size_t>(b) * c.rows + m) * c.n_out + n] = abs_sum;
      }
    }
  }
}

// fp32 sums of K bf16 products drift from the exact sum by a few float roundings of sum |x w|; a bf16
// output adds its own rounding, half a bf16 step (2^-8 relative at most).
double Tolerance(bool y_fp32, double want, double magnitude) {
  return (y_fp32 ? 1e-6 : 1.01 * 0x1p-8) * std::abs(want) + 1e-5 * magnitude + 1e-7;
}

class Stream {
 public:
  Stream() { cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); }
  ~Stream() { cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// The same product by the head GEMM (bf16 y, no tail, no cluster splits).
cudaError_t LaunchAsHeadGemm(const SkinnyGemmParams& s, cudaStream_t stream) {
  if (s.y_fp32 || s.tail_from < s.n_out || s.k_splits != 0) return cudaErrorInvalidValue;
  HeadGemmParams p;
  p.x = s.x;
  p.x_row_stride = s.x_row_stride;
  p.x_batch_stride = s.x_batch_stride;
  p.w = s.w;
  p.w_row_stride = s.w_row_stride;
  p.w_batch_stride = s.w_batch_stride;
  p.y = static_cast<__nv_bfloat16*>(s.y);
  p.y_row_stride = s.y_row_stride;
  p.y_batch_stride = s.y_batch_stride;
  p.rows = s.rows;
  p.n_out = s.n_out;
  p.k = s.k;
  p.batch = s.batch;
  return LaunchHeadGemm(p, stream);
}

using Launcher = cudaError_t (*)(const SkinnyGemmParams&, cudaStream_t);

// Runs `c` on fresh inputs and checks every byte of y: the product where it belongs, poison elsewhere.
void Check(Case c, std::mt19937& rng, Launcher launch = LaunchSkinnyGemm) {
  c = Dense(c);
  SCOPED_TRACE(Describe(c));
  std::vector<float> x_values, w_values;
  const std::vector<uint16_t> x_host =
      RandomOperand(c, c.rows, c.k, c.x_row_stride, c.x_batch_stride, 1.0f, rng, &x_values);
  const std::vector<uint16_t> w_host =
      RandomOperand(c, c.n_out, c.k, c.w_row_stride, c.w_batch_stride, 1.0f, rng, &w_values);
  DeviceVector<uint16_t> x(x_host);
  DeviceVector<uint16_t> w(w_host);
  const int element_bytes = c.y_fp32 ? 4 : 2;
  const int64_t y_elements = Extent(c.batch, c.y_batch_stride, c.rows, c.y_row_stride, c.n_out) + 64;  // + a tail
  DeviceVector<uint8_t> y(static_cast<size_t>(y_elements) * element_bytes, 0xff);
  const int tail_columns = c.tail_from > 0 ? c.n_out - c.tail_from : 0;
  const int64_t tail_elements =
      c.tail_from > 0 ? Extent(c.batch, c.tail_batch_stride, c.rows, c.tail_row_stride, tail_columns) + 64 : 1;
  DeviceVector<float> tail(std::vector<float>(tail_elements, std::nanf("")));

  SkinnyGemmParams p;
  p.x = testing::Bf16(x);
  p.x_row_stride = c.x_row_stride;
  p.x_batch_stride = c.x_batch_stride;
  p.w = testing::Bf16(w);
  p.w_row_stride = c.w_row_stride;
  p.w_batch_stride = c.w_batch_stride;
  p.y = y.get();
  p.y_row_stride = c.y_row_stride;
  p.y_batch_stride = c.y_batch_stride;
  p.y_fp32 = c.y_fp32;
  p.rows = c.rows;
  p.n_out = c.n_out;
  p.k = c.k;
  p.batch = c.batch;
  p.k_splits = c.k_splits;
  if (c.tail_from > 0) {
    p.y_tail = tail.get();
    p.y_tail_row_stride = c.tail_row_stride;
    p.y_tail_batch_stride = c.tail_batch_stride;
    p.tail_from = c.tail_from;
  }
  Stream stream;
  ASSERT_CUDA_OK(launch(p, stream.get()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
  const std::vector<uint8_t> y_bytes = y.ToHost();
  const std::vector<float> tail_values = tail.ToHost();

  std::vector<double> ref, magnitude;
  Reference(c, x_values, w_values, &ref, &magnitude);
  std::vector<int64_t> expected(y_elements, -1);  // index into ref, or -1: must keep the poison
  for (int b = 0; b < c.batch; ++b) {
    for (int m = 0; m < c.rows; ++m) {
      for (int n = 0; n < (c.tail_from > 0 ? c.tail_from : c.n_out); ++n) {
        expected[b * c.y_batch_stride + m * c.y_row_stride + n] = (static_cast<int64_t>(b) * c.rows + m) * c.n_out + n;
      }
    }
  }
  int64_t bad = 0;
  for (int64_t i = 0; i < y_elements; ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, &y_bytes[i * element_bytes], element_bytes);
    const int64_t at = expected[i];
    if (at < 0) {
      const uint32_t poison = c.y_fp32 ? 0xffffffffu : 0xffffu;
      if (bits != poison && ++bad <= 5) ADD_FAILURE() << "element " << i << " outside the product was written";
      continue;
    }
    float got;
    if (c.y_fp32) {
      std::memcpy(&got, &bits, 4);
    } else {
      got = BF16ToFloat(static_cast<uint16_t>(bits));
    }
    const double tolerance = Tolerance(c.y_fp32, ref[at], magnitude[at]);
    if (!(std::abs(got - ref[at]) <= tolerance)) {
      const int64_t b = at / (static_cast<int64_t>(c.rows) * c.n_out);
      const int64_t m = at / c.n_out % c.rows;
      const int64_t n = at % c.n_out;
      if (++bad <= 5) {
        ADD_FAILURE() << "y[" << b << "][" << m << ", " << n << "] = " << got << ", want " << ref[at] << " +- "
                      << tolerance;
      }
    }
  }
  EXPECT_EQ(bad, 0) << bad << " bad elements of " << y_elements;
  if (c.tail_from == 0) return;
  // The tail: fp32 products of the columns from tail_from on, NaN everywhere else.
  int64_t bad_tail = 0;
  std::vector<int64_t> in_tail(tail_elements, -1);
  for (int b = 0; b < c.batch; ++b) {
    for (int m = 0; m < c.rows; ++m) {
      for (int n = c.tail_from; n < c.n_out; ++n) {
        in_tail[b * c.tail_batch_stride + m * c.tail_row_stride + n - c.tail_from] =
            (static_cast<int64_t>(b) * c.rows + m) * c.n_out + n;
      }
    }
  }
  for (int64_t i = 0; i < tail_elements; ++i) {
    const int64_t at = in_tail[i];
    const bool ok = at < 0 ? std::isnan(tail_values[i])
                           : std::abs(tail_values[i] - ref[at]) <= Tolerance(/*y_fp32=*/true, ref[at], magnitude[at]);
    if (!ok && ++bad_tail <= 5) ADD_FAILURE() << "tail element " << i << " = " << tail_values[i];
  }
  EXPECT_EQ(bad_tail, 0) << bad_tail << " bad elements of the tail's " << tail_elements;
}

// Runs `record` (a chain of dependent launches) eagerly and checks it, then captures it in a CUDA
// graph and checks three replays: the programmatic-launch edges must hold both ways.
void CheckEagerAndInAGraph(cudaStream_t stream, const std::function<cudaError_t()>& record,
                           const std::function<void(const char*)>& check) {
  ASSERT_CUDA_OK(record());
  check("eager");
  if (::testing::Test::HasFatalFailure()) return;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const cudaError_t recorded = record();
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  ASSERT_CUDA_OK(recorded);
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3 && !::testing::Test::HasFatalFailure(); ++replay) {
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream));
    check("graph replay");
  }
  ASSERT_CUDA_OK(cudaGraphExecDestroy(exec));
  ASSERT_CUDA_OK(cudaGraphDestroy(graph));
}

constexpr int kRowCounts[] = {1, 2, 3, 7, 8, 9, 16, 17, 31, 32};

TEST(SkinnyGemmTest, EveryRowCountOnSmallShapes) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : kRowCounts) {
    Check({.rows = rows, .n_out = 24, .k = 8}, rng);
    Check({.rows = rows, .n_out = 72, .k = 40, .y_fp32 = true}, rng);
    Check({.rows = rows, .n_out = 5, .k = 64}, rng);
  }
}

TEST(SkinnyGemmTest, EveryRowCountWithKTailsAndPaddedStrides) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : kRowCounts) {
    // K = 2048 + 24: the last 32-wide chunk is three quarters full. NaN padding after each row of x
    // and w, and y rows longer than n_out.
    Check({.rows = rows, .n_out = 1000, .k = 2072, .x_row_stride = 2072 + 40, .w_row_stride = 2072 + 8,
           .y_row_stride = 1000 + 24},
          rng);
    Check({.rows = rows, .n_out = 200, .k = 2072, .y_fp32 = true, .w_row_stride = 2080, .y_row_stride = 212}, rng);
  }
}

// A tail: o_proj with the folded router's rows after its own (DeviceLayer::router_folded) writes its
// columns in bf16 and the router's in fp32 to their own buffer, at every row count a tail takes, in
// the middle of a 16-row fragment or on its edge, with padded strides and a batch.
TEST(SkinnyGemmTest, ColumnsPastTailFromGoToAnFp32Tail) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : {1, 2, 7, 8, 9, 16}) {
    Check({.rows = rows, .n_out = 2048 + 64, .k = 2048, .tail_from = 2048}, rng);
    Check({.rows = rows, .n_out = 300, .k = 96, .y_row_stride = 264, .tail_from = 257, .tail_row_stride = 48}, rng);
    Check({.rows = rows, .n_out = 40, .k = 64, .batch = 3, .y_fp32 = true, .tail_from = 24}, rng);
  }
}

TEST(SkinnyGemmTest, LongK) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : {1, 4, 9, 32}) {
    Check({.rows = rows, .n_out = 2056, .k = 10944}, rng);  // a dense MLP's down projection, 8 more columns
    Check({.rows = rows, .n_out = 136, .k = 18432, .y_fp32 = true, .x_row_stride = 18432 + 16}, rng);
  }
}

// Every cluster size, also ones that leave warps without K (k = 8) or split unevenly.
TEST(SkinnyGemmTest, ForcedKSplitsGiveTheSameProduct) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (int k_splits = 1; k_splits <= kSkinnyMaxKSplits; ++k_splits) {
    for (const int rows : {1, 8, 17, 32}) {
      Check({.rows = rows, .n_out = 264, .k = 2072, .k_splits = k_splits, .w_row_stride = 2088, .y_row_stride = 280},
            rng);
      Check({.rows = rows, .n_out = 40, .k = 8, .y_fp32 = true, .k_splits = k_splits}, rng);
      Check({.rows = rows, .n_out = 100, .k = 520, .k_splits = k_splits}, rng);
    }
    // More tiles than clusters fit on the device at once: each cluster takes several in turn.
    for (const int rows : {3, 24}) {
      Check({.rows = rows, .n_out = 3000, .k = 1032, .y_fp32 = true, .k_splits = k_splits}, rng);
    }
  }
}

// Shapes with more tiles than the device holds blocks, so each block loops over several tiles (and
// loads the next one's first weights while it reduces the last).
TEST(SkinnyGemmTest, ManyTilesPerBlock) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : {1, 9, 32}) {
    Check({.rows = rows, .n_out = 40000, .k = 72, .y_row_stride = 40008}, rng);
    Check({.rows = rows, .n_out = 20008, .k = 2072, .y_fp32 = true}, rng);
    Check({.rows = rows, .n_out = 512, .k = 128, .batch = 128, .x_row_stride = 128 * 192, .x_batch_stride = 192,
           .y_row_stride = 128 * 512, .y_batch_stride = 512},
          rng);
  }
}

// The absorbed-MLA products of DeepSeek-V2-Lite, 16 heads: q_nope [tokens, 16, 192 (nope | rope)] times
// W_uk [512, 128] per head into [tokens, 16, 512], and the attention output [tokens, 16, 512] times
// W_uv (rows 128..255 of each head's 256 rows of kv_b_proj [16 * 256, 512]) into [tokens, 16 * 128].
TEST(SkinnyGemmTest, BatchedPerHeadProductsWithInterleavedStrides) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  constexpr int kHeads = 16;
  for (const int rows : {1, 5, 8, 17, 32}) {
    Check({.rows = rows, .n_out = 512, .k = 128, .batch = kHeads, .x_row_stride = kHeads * 192, .x_batch_stride = 192,
           .w_row_stride = 128, .w_batch_stride = 512 * 128 + 64, .y_row_stride = kHeads * 512, .y_batch_stride = 512},
          rng);
    Check({.rows = rows, .n_out = 128, .k = 512, .batch = kHeads, .y_fp32 = rows % 2 == 1,
           .x_row_stride = kHeads * 512, .x_batch_stride = 512, .w_row_stride = 512, .w_batch_stride = 256 * 512,
           .y_row_stride = kHeads * 128, .y_batch_stride = 128},
          rng);
  }
}

TEST(SkinnyGemmTest, V2LiteShapes) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : {1, 4, 12, 32}) {
    Check({.rows = rows, .n_out = 3072, .k = 2048}, rng);                  // q_proj
    Check({.rows = rows, .n_out = 576, .k = 2048, .y_fp32 = true}, rng);   // kv_a_proj_with_mqa
    Check({.rows = rows, .n_out = 2048, .k = 2048}, rng);                  // o_proj
    Check({.rows = rows, .n_out = 64, .k = 2048, .y_fp32 = true}, rng);    // router
    Check({.rows = rows, .n_out = 5632, .k = 2048}, rng);                  // shared experts' gate_up
    Check({.rows = rows, .n_out = 2048, .k = 2816}, rng);                  // shared experts' down
  }
}

TEST(SkinnyGemmTest, RejectsArgumentsOutsideTheContract) {
  // Checked before any CUDA call: runs without a GPU too. The pointers are never dereferenced.
  SkinnyGemmParams valid;
  valid.x = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{0x10000});
  valid.w = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{0x20000});
  valid.y = reinterpret_cast<void*>(uintptr_t{0x30000});
  valid.rows = 4;
  valid.n_out = 64;
  valid.k = 128;
  valid.x_row_stride = 128;
  valid.w_row_stride = 128;
  valid.y_row_stride = 64;
  std::vector<std::pair<const char*, SkinnyGemmParams>> invalid;
  auto with = [&](const char* what, auto change) {
    SkinnyGemmParams p = valid;
    change(p);
    invalid.emplace_back(what, p);
  };
  with("rows 0", [](SkinnyGemmParams& p) { p.rows = 0; });
  with("rows 33", [](SkinnyGemmParams& p) { p.rows = kSkinnyMaxRows + 1; });
  with("n_out 0", [](SkinnyGemmParams& p) { p.n_out = 0; });
  with("k 0", [](SkinnyGemmParams& p) { p.k = 0; });
  with("k 12", [](SkinnyGemmParams& p) { p.k = 12; });
  with("batch 0", [](SkinnyGemmParams& p) { p.batch = 0; });
  with("batch 65536", [](SkinnyGemmParams& p) { p.batch = 65536; });
  with("k_splits -1", [](SkinnyGemmParams& p) { p.k_splits = -1; });
  with("k_splits 9", [](SkinnyGemmParams& p) { p.k_splits = kSkinnyMaxKSplits + 1; });
  with("null x", [](SkinnyGemmParams& p) { p.x = nullptr; });
  with("null w", [](SkinnyGemmParams& p) { p.w = nullptr; });
  with("null y", [](SkinnyGemmParams& p) { p.y = nullptr; });
  with("x off 16 bytes", [](SkinnyGemmParams& p) { p.x += 1; });
  with("w off 16 bytes", [](SkinnyGemmParams& p) { p.w += 4; });
  with("y off 16 bytes", [](SkinnyGemmParams& p) { p.y = static_cast<char*>(p.y) + 8; });
  with("x row stride not 16 bytes", [](SkinnyGemmParams& p) { p.x_row_stride = 132; });
  with("x batch stride", [](SkinnyGemmParams& p) { p.x_batch_stride = 4; });
  with("w row stride", [](SkinnyGemmParams& p) { p.w_row_stride = 130; });
  with("w batch stride", [](SkinnyGemmParams& p) { p.w_batch_stride = -8; });
  with("y row stride (bf16)", [](SkinnyGemmParams& p) { p.y_row_stride = 68; });
  with("y row stride (fp32)", [](SkinnyGemmParams& p) {
    p.y_fp32 = true;
    p.y_row_stride = 66;
  });
  with("y batch stride", [](SkinnyGemmParams& p) { p.y_batch_stride = 4; });
  with("y rows overlap", [](SkinnyGemmParams& p) { p.y_row_stride = 56; });
  auto with_tail = [&](const char* what, auto change) {
    with(what, [&](SkinnyGemmParams& p) {
      p.y_tail = reinterpret_cast<float*>(uintptr_t{0x40000});
      p.y_tail_row_stride = 16;
      p.tail_from = 48;
      change(p);
    });
  };
  with_tail("tail from 0", [](SkinnyGemmParams& p) { p.tail_from = 0; });
  with_tail("null tail", [](SkinnyGemmParams& p) { p.y_tail = nullptr; });
  with_tail("tail off 16 bytes", [](SkinnyGemmParams& p) { p.y_tail += 2; });
  with_tail("tail row stride not 16 bytes", [](SkinnyGemmParams& p) { p.y_tail_row_stride = 18; });
  with_tail("tail rows overlap", [](SkinnyGemmParams& p) { p.y_tail_row_stride = 12; });
  with_tail("tail with 17 rows", [](SkinnyGemmParams& p) { p.rows = kSkinnyMaxTailRows + 1; });
  for (const auto& [what, p] : invalid) {
    EXPECT_EQ(LaunchSkinnyGemm(p, nullptr), cudaErrorInvalidValue) << what;
  }
  (void)cudaGetLastError();
  // The smallest change that makes it valid again: one row, whose y row stride does not matter.
  SkinnyGemmParams p = valid;
  p.rows = 1;
  p.y_row_stride = 0;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
    // Real buffers for the valid one.
    DeviceVector<uint16_t> x(static_cast<size_t>(valid.rows * valid.k), 0);
    DeviceVector<uint16_t> w(static_cast<size_t>(valid.n_out * valid.k), 0);
    DeviceVector<float> y(static_cast<size_t>(valid.rows * valid.n_out), 0);
    p.x = testing::Bf16(x);
    p.w = testing::Bf16(w);
    p.y = y.get();
    p.y_fp32 = true;
    Stream stream;
    EXPECT_EQ(LaunchSkinnyGemm(p, stream.get()), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
  }
}

// x -> h1 -> h2 -> ... -> out, each product reading the one before it, on one stream: each kernel may
// start (and prefetch its weights) while the one before it runs, and must still read its input only
// once that input is complete. The intermediates are poisoned at the start of each run, so a product
// that read its input early would see NaN. Eager, then captured in a graph and replayed.
TEST(SkinnyGemmTest, DependentProductsBackToBackEagerAndInAGraph) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  constexpr int kRows = 6;
  // (n_out, k): q_proj-like, a small n_out that the launcher splits over clusters, down, kv_a-like.
  const std::vector<std::pair<int, int>> layers = {{3072, 2048}, {576, 3072}, {2048, 576}, {4096, 2048}, {512, 4096}};
  const int n_layers = static_cast<int>(layers.size());
  std::vector<std::vector<float>> w_values(n_layers);
  std::vector<std::unique_ptr<DeviceVector<uint16_t>>> weights;
  for (int l = 0; l < n_layers; ++l) {
    const auto [n, k] = layers[l];
    ASSERT_EQ(l == 0 ? 2048 : layers[l - 1].first, k);
    Case c{.rows = n, .n_out = 1, .k = k};  // only for RandomOperand's batch
    std::vector<float> values;
    // Scaled by 2 / sqrt(k): activations stay of order one along the chain.
    const std::vector<uint16_t> host = RandomOperand(c, n, k, k, int64_t{n} * k, 2.0f / std::sqrt(k), rng, &values);
    w_values[l] = values;
    weights.push_back(std::make_unique<DeviceVector<uint16_t>>(host));
  }
  std::vector<float> x_values;
  Case x_case{.rows = kRows, .n_out = 1, .k = 2048};
  DeviceVector<uint16_t> x(RandomOperand(x_case, kRows, 2048, 2048, kRows * 2048, 1.0f, rng, &x_values));
  // Activations h[l] of layer l's output: bf16 except the last, fp32.
  std::vector<std::unique_ptr<DeviceVector<uint8_t>>> outs;
  for (int l = 0; l < n_layers; ++l) {
    outs.push_back(std::make_unique<DeviceVector<uint8_t>>(
        static_cast<size_t>(kRows) * layers[l].first * (l + 1 == n_layers ? 4 : 2), 0xff));
  }
  Stream stream;
  auto record = [&]() -> cudaError_t {
    for (int l = 0; l < n_layers; ++l) {
      const cudaError_t error =
          cudaMemsetAsync(outs[l]->get(), 0xff, static_cast<size_t>(kRows) * layers[l].first * (l + 1 == n_layers ? 4 : 2),
                          stream.get());
      if (error != cudaSuccess) return error;
    }
    for (int l = 0; l < n_layers; ++l) {
      SkinnyGemmParams p;
      p.x = l == 0 ? testing::Bf16(x) : reinterpret_cast<const __nv_bfloat16*>(outs[l - 1]->get());
      p.x_row_stride = layers[l].second;
      p.w = testing::Bf16(*weights[l]);
      p.w_row_stride = layers[l].second;
      p.y = outs[l]->get();
      p.y_row_stride = layers[l].first;
      p.y_fp32 = l + 1 == n_layers;
      p.rows = kRows;
      p.n_out = layers[l].first;
      p.k = layers[l].second;
      const cudaError_t error = LaunchSkinnyGemm(p, stream.get());
      if (error != cudaSuccess) return error;
    }
    return cudaSuccess;
  };
  // Each layer against the CPU product of the device's own input to it.
  auto check = [&](const char* what) {
    SCOPED_TRACE(what);
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
    std::vector<float> input = x_values;
    for (int l = 0; l < n_layers; ++l) {
      const auto [n, k] = layers[l];
      const bool fp32 = l + 1 == n_layers;
      const std::vector<uint8_t> bytes = outs[l]->ToHost();
      std::vector<float> got(static_cast<size_t>(kRows) * n);
      for (size_t i = 0; i < got.size(); ++i) {
        if (fp32) {
          std::memcpy(&got[i], &bytes[i * 4], 4);
        } else {
          uint16_t bits;
          std::memcpy(&bits, &bytes[i * 2], 2);
          got[i] = BF16ToFloat(bits);
        }
      }
      std::vector<double> ref, magnitude;
      Reference(Case{.rows = kRows, .n_out = n, .k = k}, input, w_values[l], &ref, &magnitude);
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double tolerance = Tolerance(fp32, ref[i], magnitude[i]);
        if (!(std::abs(got[i] - ref[i]) <= tolerance) && ++bad <= 5) {
          ADD_FAILURE() << "layer " << l << " element " << i << " = " << got[i] << ", want " << ref[i] << " +- "
                        << tolerance;
        }
      }
      ASSERT_EQ(bad, 0) << "layer " << l;
      input = got;
    }
  };

  CheckEagerAndInAGraph(stream.get(), record, check);
}

// ------------------------------------------------------------------------------------ head GEMM

constexpr int kHeadRowCounts[] = {1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130, 512};

// Every row tiling (16, 32 or 64 rows a block, the last one partial), column counts that leave a
// block's last warps or n8 tiles without columns, short and long K, batches, and padded strides.
TEST(HeadGemmTest, EveryRowCountAndTileEdge) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (const int rows : kHeadRowCounts) {
    Check({.rows = rows, .n_out = 8, .k = 16}, rng, LaunchAsHeadGemm);
    Check({.rows = rows, .n_out = 72, .k = 48, .batch = 3, .x_row_stride = 56, .y_row_stride = 80}, rng,
          LaunchAsHeadGemm);
    Check({.rows = rows, .n_out = 200, .k = 512, .batch = 2, .w_row_stride = 520, .w_batch_stride = 200 * 520 + 8},
          rng, LaunchAsHeadGemm);
  }
}

// The engine's two products of DeepSeek-V2-Lite's 16 heads past the skinny rows (see
// BatchedPerHeadProductsWithInterleavedStrides): W_uk from the rotated queries, W_uv into the
// attention's output.
TEST(HeadGemmTest, V2LitePerHeadProducts) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  constexpr int kHeads = 16;
  for (const int rows : {9, 16, 24, 100, 256, 512}) {
    Check({.rows = rows, .n_out = 512, .k = 128, .batch = kHeads, .x_row_stride = kHeads * 192, .x_batch_stride = 192,
           .w_row_stride = 128, .w_batch_stride = 512 * 128, .y_row_stride = kHeads * 512, .y_batch_stride = 512},
          rng, LaunchAsHeadGemm);
    Check({.rows = rows, .n_out = 128, .k = 512, .batch = kHeads, .x_row_stride = kHeads * 512, .x_batch_stride = 512,
           .w_row_stride = 512, .w_batch_stride = 256 * 512, .y_row_stride = kHeads * 128, .y_batch_stride = 128},
          rng, LaunchAsHeadGemm);
  }
}

// fp32 rows (x_fp32), as the cache write's tiles read the input projection's queries: each value
// rounded to bf16 as it is read, so the product is the bf16 rows' (row strides of 4-element steps).
TEST(HeadGemmTest, Fp32RowsAreRoundedAsRead) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  constexpr int kHeads = 4, kNope = 128, kRank = 512, kQk = 192;
  for (const int rows : {3, 17, 40}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const int64_t x_row_stride = kHeads * kQk + 4;  // fp32 elements: 16-byte steps, not 32
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    std::vector<float> x_host(rows * x_row_stride, std::nanf(""));
    std::vector<float> x_rounded(static_cast<size_t>(kHeads) * rows * kNope);  // [head][row][nope]
    for (int r = 0; r < rows; ++r) {
      for (int h = 0; h < kHeads; ++h) {
        for (int d = 0; d < kNope; ++d) {
          const float v = uniform(rng);
          x_host[r * x_row_stride + h * kQk + d] = v;
          x_rounded[(static_cast<size_t>(h) * rows + r) * kNope + d] = BF16ToFloat(FloatToBF16(v));
        }
      }
    }
    const Case c{.rows = rows, .n_out = kRank, .k = kNope, .batch = kHeads};
    std::vector<float> w_values;
    DeviceVector<uint16_t> w(RandomOperand(c, kRank, kNope, kNope, kRank * kNope, 1.0f, rng, &w_values));
    DeviceVector<float> x(x_host);
    DeviceVector<uint16_t> y(static_cast<size_t>(rows) * kHeads * kRank);  // NaN bytes
    HeadGemmParams p;
    p.x_fp32 = x.get();
    p.x_row_stride = x_row_stride;
    p.x_batch_stride = kQk;
    p.w = testing::Bf16(w);
    p.w_row_stride = kNope;
    p.w_batch_stride = kRank * kNope;
    p.y = reinterpret_cast<__nv_bfloat16*>(y.get());
    p.y_row_stride = kHeads * kRank;
    p.y_batch_stride = kRank;
    p.rows = rows;
    p.n_out = kRank;
    p.k = kNope;
    p.batch = kHeads;
    Stream stream;
    ASSERT_CUDA_OK(LaunchHeadGemm(p, stream.get()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
    const std::vector<uint16_t> got = y.ToHost();
    std::vector<double> ref, magnitude;
    Reference(c, x_rounded, w_values, &ref, &magnitude);
    int64_t bad = 0;
    for (int h = 0; h < kHeads; ++h) {
      for (int r = 0; r < rows; ++r) {
        for (int n = 0; n < kRank; ++n) {
          const size_t at = (static_cast<size_t>(h) * rows + r) * kRank + n;
          const float value = BF16ToFloat(got[(static_cast<size_t>(r) * kHeads + h) * kRank + n]);
          if (!(std::abs(value - ref[at]) <= Tolerance(/*y_fp32=*/false, ref[at], magnitude[at])) && ++bad <= 5) {
            ADD_FAILURE() << "y[" << h << "][" << r << ", " << n << "] = " << value << ", want " << ref[at];
          }
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

TEST(HeadGemmTest, RejectsArgumentsOutsideTheContract) {
  // Checked before any CUDA call: runs without a GPU too. The pointers are never dereferenced.
  HeadGemmParams valid;
  valid.x = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{0x10000});
  valid.w = reinterpret_cast<const __nv_bfloat16*>(uintptr_t{0x20000});
  valid.y = reinterpret_cast<__nv_bfloat16*>(uintptr_t{0x30000});
  valid.x_row_stride = 128;
  valid.w_row_stride = 128;
  valid.y_row_stride = 512;
  valid.rows = 40;
  valid.n_out = 512;
  valid.k = 128;
  EXPECT_TRUE(HeadGemmSupports(valid));
  const auto rejected = [&](const char* what, auto change) {
    HeadGemmParams p = valid;
    change(p);
    EXPECT_FALSE(HeadGemmSupports(p)) << what;
    EXPECT_EQ(LaunchHeadGemm(p, nullptr), cudaErrorInvalidValue) << what;
  };
  rejected("no rows", [](HeadGemmParams& p) { p.rows = 0; });
  rejected("rows past a grid of 16-row tiles", [](HeadGemmParams& p) { p.rows = kHeadGemmMaxRows + 1; });
  rejected("n_out not a multiple of 8", [](HeadGemmParams& p) { p.n_out = 500; });
  rejected("k not a multiple of 16", [](HeadGemmParams& p) { p.k = 120; });
  rejected("k past the limit", [](HeadGemmParams& p) { p.k = kHeadGemmMaxK + 16; });
  rejected("batch 0", [](HeadGemmParams& p) { p.batch = 0; });
  rejected("batch past a grid's y", [](HeadGemmParams& p) { p.batch = 65536; });
  rejected("null y", [](HeadGemmParams& p) { p.y = nullptr; });
  rejected("misaligned x", [](HeadGemmParams& p) { p.x += 1; });
  const float* fp32_rows = reinterpret_cast<const float*>(uintptr_t{0x40000});
  rejected("both x and x_fp32", [&](HeadGemmParams& p) { p.x_fp32 = fp32_rows; });
  rejected("neither x nor x_fp32", [](HeadGemmParams& p) { p.x = nullptr; });
  HeadGemmParams fp32 = valid;
  fp32.x = nullptr;
  fp32.x_fp32 = fp32_rows;
  fp32.x_row_stride = 132;  // 16-byte steps of fp32
  EXPECT_TRUE(HeadGemmSupports(fp32));
  fp32.x_row_stride = 130;
  EXPECT_FALSE(HeadGemmSupports(fp32)) << "fp32 rows not 16-byte apart";
  rejected("x rows not 16-byte apart", [](HeadGemmParams& p) { p.x_row_stride = 132; });
  rejected("negative batch stride", [](HeadGemmParams& p) { p.w_batch_stride = -8; });
  rejected("y rows overlapping", [](HeadGemmParams& p) { p.y_row_stride = 256; });
}

// Two dependent head products (W_uk-like then W_uv-like, 16 heads, 100 rows), each waiting for the
// one before it under programmatic dependent launch, eager and replayed from a CUDA graph: the
// second must read the first's finished output.
TEST(HeadGemmTest, DependentProductsBackToBackEagerAndInAGraph) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  constexpr int kHeads = 16, kRows = 100, kNope = 128, kRank = 512;
  std::vector<float> x_values, uk_values, uv_values;
  const Case x_case{.rows = kRows, .n_out = 1, .k = kNope, .batch = kHeads};
  const Case uk_case{.rows = kRank, .n_out = 1, .k = kNope, .batch = kHeads};
  const Case uv_case{.rows = kNope, .n_out = 1, .k = kRank, .batch = kHeads};
  // Batch-major on the host; the device reads them with the engine's strides below.
  DeviceVector<uint16_t> x(RandomOperand(x_case, kRows, kNope, kNope, kRows * kNope, 1.0f, rng, &x_values));
  DeviceVector<uint16_t> uk(
      RandomOperand(uk_case, kRank, kNope, kNope, kRank * kNope, 2.0f / std::sqrt(kNope), rng, &uk_values));
  DeviceVector<uint16_t> uv(
      RandomOperand(uv_case, kNope, kRank, kRank, kNope * kRank, 2.0f / std::sqrt(kRank), rng, &uv_values));
  constexpr size_t kLatentBytes = size_t{kHeads} * kRows * kRank * 2, kOutBytes = size_t{kHeads} * kRows * kNope * 2;
  DeviceVector<uint16_t> latent(kLatentBytes / 2);  // NaN bytes
  DeviceVector<uint16_t> out(kOutBytes / 2);
  Stream stream;
  auto record = [&]() -> cudaError_t {
    if (const cudaError_t e = cudaMemsetAsync(latent.get(), 0xff, kLatentBytes, stream.get()); e != cudaSuccess) {
      return e;
    }
    if (const cudaError_t e = cudaMemsetAsync(out.get(), 0xff, kOutBytes, stream.get()); e != cudaSuccess) {
      return e;
    }
    HeadGemmParams p;  // [head][row, nope] x [head][rank, nope]^T -> [head][row, rank]
    p.x = testing::Bf16(x);
    p.x_row_stride = kNope;
    p.x_batch_stride = kRows * kNope;
    p.w = testing::Bf16(uk);
    p.w_row_stride = kNope;
    p.w_batch_stride = kRank * kNope;
    p.y = reinterpret_cast<__nv_bfloat16*>(latent.get());
    p.y_row_stride = kRank;
    p.y_batch_stride = kRows * kRank;
    p.rows = kRows;
    p.n_out = kRank;
    p.k = kNope;
    p.batch = kHeads;
    if (const cudaError_t e = LaunchHeadGemm(p, stream.get()); e != cudaSuccess) return e;
    HeadGemmParams q = p;  // [head][row, rank] x [head][nope, rank]^T -> [head][row, nope]
    q.x = p.y;
    q.x_row_stride = kRank;
    q.x_batch_stride = kRows * kRank;
    q.w = testing::Bf16(uv);
    q.w_row_stride = kRank;
    q.w_batch_stride = kNope * kRank;
    q.y = reinterpret_cast<__nv_bfloat16*>(out.get());
    q.y_row_stride = kNope;
    q.y_batch_stride = kRows * kNope;
    q.n_out = kNope;
    q.k = kRank;
    return LaunchHeadGemm(q, stream.get());
  };
  // Each product against the CPU product of the device's own input to it.
  auto check = [&](const char* what) {
    SCOPED_TRACE(what);
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
    std::vector<float> input = x_values;
    const std::pair<const std::vector<float>*, DeviceVector<uint16_t>*> steps[] = {{&uk_values, &latent},
                                                                                   {&uv_values, &out}};
    for (int l = 0; l < 2; ++l) {
      const int n = l == 0 ? kRank : kNope, k = l == 0 ? kNope : kRank;
      std::vector<float> got;
      for (const uint16_t bits : steps[l].second->ToHost()) got.push_back(BF16ToFloat(bits));
      std::vector<double> ref, magnitude;
      Reference(Case{.rows = kRows, .n_out = n, .k = k, .batch = kHeads}, input, *steps[l].first, &ref, &magnitude);
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double tolerance = Tolerance(/*y_fp32=*/false, ref[i], magnitude[i]);
        if (!(std::abs(got[i] - ref[i]) <= tolerance) && ++bad <= 5) {
          ADD_FAILURE() << "product " << l << " element " << i << " = " << got[i] << ", want " << ref[i] << " +- "
                        << tolerance;
        }
      }
      ASSERT_EQ(bad, 0) << "product " << l;
      input = got;
    }
  };

  CheckEagerAndInAGraph(stream.get(), record, check);
}

}  // namespace
}  // namespace cohort::kernels
