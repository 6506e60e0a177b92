// The small kernels around a layer's matrix products against CPU references on fresh random
// inputs: embedding gather, fused residual add + RMSNorm, query rope (the CPU engine's Rope, YaRN
// and both layouts), the normalise-rotate-write of new latents into the paged cache (with the
// queries rotated and absorbed into the latent space in the same launch).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/elementwise.h"
#include "tests/testing/gpu.h"
#include "worker/model/config.h"
#include "worker/model/rope.h"

namespace cohort {
namespace {

using testing::Bf16;
using testing::DeviceVector;
using testing::RandomBf16;

std::vector<float> RandomFloats(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// A bf16 result within bf16 rounding (8 bits of mantissa) of a float64 reference.
void ExpectBf16Near(uint16_t got, double want, const std::string& where) {
  ASSERT_NEAR(BF16ToFloat(got), want, std::abs(want) * 8e-3 + 1e-5) << where;
}

ModelConfig RopeConfig(bool yarn, bool interleave) {
  ModelConfig c;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rope_interleave = interleave;
  c.max_position_embeddings = 163840;
  if (yarn) {
    c.rope.yarn = true;
    c.rope.factor = 40;
    c.rope.original_max_position_embeddings = 4096;
    c.rope.mscale = 0.707;
    c.rope.mscale_all_dim = 0.707;
  }
  return c;
}

TEST(ElementwiseTest, AddRmsNormUpdatesResidualAndNormalises) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (int dim : {64, 2048, 7168}) {
    for (bool with_delta : {false, true}) {
      const int rows = 1 + static_cast<int>(rng() % 37);
      std::vector<float> residual = RandomFloats(static_cast<size_t>(rows) * dim, rng, 4.0f);
      const std::vector<uint16_t> delta = RandomBf16(residual.size(), rng), weight = RandomBf16(dim, rng);
      DeviceVector<float> d_residual(residual);
      DeviceVector<uint16_t> d_delta(delta), d_weight(weight), d_out(residual.size());
      DeviceVector<float> d_inv_rms(std::vector<float>(rows, -1.0f));
      ASSERT_CUDA_OK(kernels::LaunchAddRmsNorm(d_residual.get(), with_delta ? Bf16(d_delta) : nullptr, Bf16(d_weight),
                                               rows, dim, 1e-6f, Bf16(d_out), nullptr, d_inv_rms.get()));
      const std::vector<float> new_residual = d_residual.ToHost();
      const std::vector<uint16_t> out = d_out.ToHost();
      const std::vector<float> inv_rms = d_inv_rms.ToHost();
      for (int r = 0; r < rows; ++r) {
        double sum_sq = 0;
        std::vector<double> h(dim);
        for (int i = 0; i < dim; ++i) {
          h[i] = residual[r * dim + i] + (with_delta ? BF16ToFloat(delta[r * dim + i]) : 0.0);
          sum_sq += h[i] * h[i];
          ASSERT_NEAR(new_residual[r * dim + i], h[i], 1e-5 * std::abs(h[i]) + 1e-6);
        }
        const double inv = 1.0 / std::sqrt(sum_sq / dim + 1e-6);
        ASSERT_NEAR(inv_rms[r], inv, 1e-5 * inv) << "row " << r << "'s scale, dim " << dim;
        for (int i = 0; i < dim; ++i) {
          ExpectBf16Near(out[r * dim + i], h[i] * inv * BF16ToFloat(weight[i]), "dim " + std::to_string(dim));
        }
      }
    }
  }
}

// An fp32 delta (the sum of the GPUs' combines under expert parallelism) changes the residual and the
// output exactly as the same delta rounded to bf16 does.
TEST(ElementwiseTest, AddRmsNormRoundsAnFp32DeltaAsABf16One) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (int dim : {2048, 7168}) {
    const int rows = 1 + static_cast<int>(rng() % 37);
    const std::vector<float> residual = RandomFloats(static_cast<size_t>(rows) * dim, rng, 4.0f);
    const std::vector<float> delta = RandomFloats(residual.size(), rng, 3.0f);
    std::vector<uint16_t> rounded(delta.size());
    for (size_t i = 0; i < delta.size(); ++i) rounded[i] = FloatToBF16(delta[i]);
    const std::vector<uint16_t> weight = RandomBf16(dim, rng);
    DeviceVector<float> d_residual_f32(residual), d_residual_bf16(residual), d_delta(delta);
    DeviceVector<uint16_t> d_rounded(rounded), d_weight(weight), d_out_f32(residual.size()),
        d_out_bf16(residual.size());
    ASSERT_CUDA_OK(kernels::LaunchAddRmsNorm(d_residual_f32.get(), d_delta.get(), Bf16(d_weight), rows, dim, 1e-6f,
                                             Bf16(d_out_f32), nullptr));
    ASSERT_CUDA_OK(kernels::LaunchAddRmsNorm(d_residual_bf16.get(), Bf16(d_rounded), Bf16(d_weight), rows, dim, 1e-6f,
                                             Bf16(d_out_bf16), nullptr));
    EXPECT_EQ(d_residual_f32.ToHost(), d_residual_bf16.ToHost()) << "dim " << dim;
    EXPECT_EQ(d_out_f32.ToHost(), d_out_bf16.ToHost()) << "dim " << dim;
    EXPECT_NE(d_residual_f32.ToHost(), residual) << "the delta was added";
  }
}

TEST(ElementwiseTest, RopeQueriesMatchTheCpuRope) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  for (bool yarn : {false, true}) {
    for (bool interleave : {false, true}) {
      const ModelConfig config = RopeConfig(yarn, interleave);
      const Rope rope(config);
      const int rows = 9, heads = 3, qk = 192;
      const std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(rows) * heads * qk, rng);
      std::vector<int32_t> positions = {0, 1, 2, 17, 4095, 4096, 50000, 163839, 12};
      DeviceVector<uint16_t> d_q(q);
      DeviceVector<int32_t> d_positions(positions);
      DeviceVector<float> d_inv_freq(rope.inv_freq());
      const kernels::RopeParams params{d_inv_freq.get(), 64, rope.attention_factor(), interleave};
      ASSERT_CUDA_OK(kernels::LaunchRopeQueries(Bf16(d_q), rows, heads, qk, d_positions.get(), params, nullptr));
      const std::vector<uint16_t> out = d_q.ToHost();
      for (int r = 0; r < rows; ++r) {
        for (int h = 0; h < heads; ++h) {
          const size_t base = (static_cast<size_t>(r) * heads + h) * qk;
          for (int i = 0; i < 128; ++i) ASSERT_EQ(out[base + i], q[base + i]) << "the nope part must not move";
          std::vector<float> want(64);
          for (int i = 0; i < 64; ++i) want[i] = BF16ToFloat(q[base + 128 + i]);
          rope.Apply(want, positions[r]);
          for (int i = 0; i < 64; ++i) {
            ASSERT_NEAR(BF16ToFloat(out[base + 128 + i]), want[i], 8e-3 * std::abs(want[i]) + 2e-3)
                << "yarn " << yarn << " interleave " << interleave << " position " << positions[r] << " i " << i;
          }
        }
      }
    }
  }
}

// One row of a cache write against the CPU: `kv` (fp32 latent, then rope key) normalised with `norm`
// into the row's cache slot and its key rotated; the row's queries (`want`, fp32, heads * qk values
// before the write; empty for none) rounded to bf16 in `rotated`, their rope part rotated.
void ExpectRowWritten(const Rope& rope, int rank, int rope_dim, const std::vector<uint16_t>& norm, const float* kv,
                      int position, const uint16_t* slot, int qk, const std::vector<float>& want,
                      const uint16_t* rotated) {
  double sum_sq = 0;
  for (int i = 0; i < rank; ++i) sum_sq += static_cast<double>(kv[i]) * kv[i];
  const double inv = 1.0 / std::sqrt(sum_sq / rank + 1e-6);
  for (int i = 0; i < rank; ++i) ExpectBf16Near(slot[i], kv[i] * inv * BF16ToFloat(norm[i]), "latent");
  std::vector<float> key(kv + rank, kv + rank + rope_dim);
  rope.Apply(key, position);
  for (int i = 0; i < rope_dim; ++i) ExpectBf16Near(slot[rank + i], key[i], "rope key");
  const int nope = qk - rope_dim;
  for (size_t base = 0; base < want.size(); base += qk) {
    for (int i = 0; i < nope; ++i) {
      ASSERT_EQ(BF16ToFloat(rotated[base + i]), BF16ToFloat(FloatToBF16(want[base + i])))
          << "the nope part is not rotated (head " << base / qk << ")";
    }
    std::vector<float> rope_part(want.begin() + base + nope, want.begin() + base + qk);
    rope.Apply(rope_part, position);
    for (int i = 0; i < rope_dim; ++i) {
      ASSERT_NEAR(BF16ToFloat(rotated[base + nope + i]), rope_part[i], 8e-3 * std::abs(rope_part[i]) + 2e-3)
          << "query rope (head " << base / qk << ")";
    }
  }
}

// The cache write with the queries of the same rows: rotated in place (bf16 queries), or written
// from fp32 queries that share their rows with the latent (one product's output: [q | kv] per row);
// absorbed through W_uk for the first rows, a few (a block a row and head) or more (head GEMM tiles,
// the last one partial), the rows past them left unwritten.
struct CacheWriteCase {
  int rows, absorb_rows, nope;
};
class WriteKvCacheTest : public ::testing::TestWithParam<CacheWriteCase> {};

TEST_P(WriteKvCacheTest, NormalisesRotatesPlacesAndAbsorbs) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  const ModelConfig config = RopeConfig(true, true);
  const Rope rope(config);
  const auto [rows, absorb_rows, nope] = GetParam();
  const int rank = 512, width = 576, block_size = 16, blocks = 12, heads = 3, qk = nope + 64;
  const std::vector<uint16_t> norm = RandomBf16(rank, rng);
  const std::vector<uint16_t> absorbed_keys = RandomBf16(static_cast<size_t>(heads) * rank * nope, rng);
  DeviceVector<uint16_t> d_absorbed_keys(absorbed_keys);
  // Two sequences with scattered blocks of 16 tokens (48 positions each); row r of sequence r % 2 at
  // position 3 (r / 2) + r % 2 (past 32 rows 3 (r / 2) / 2 + r % 2, within the 48), or for 5 rows
  // the positions below.
  const std::vector<int32_t> tables = {9, 4, 0, 11, 3, 7};
  const std::vector<int32_t> offsets = {0, 3};
  std::vector<int32_t> sequence = {0, 0, 1, 1, 1}, positions = {15, 16, 0, 33, 47};
  if (rows != 5) {
    sequence.resize(rows);
    positions.resize(rows);
    const int spread = rows > 32 ? 2 : 1;
    for (int r = 0; r < rows; ++r) sequence[r] = r % 2, positions[r] = 3 * (r / 2) / spread + r % 2;
  }
  DeviceVector<float> d_inv_freq(rope.inv_freq());
  DeviceVector<uint16_t> d_norm(norm);
  DeviceVector<int32_t> d_tables(tables), d_offsets(offsets), d_sequence(sequence), d_positions(positions);
  const kernels::RopeParams rope_params{d_inv_freq.get(), 64, rope.attention_factor(), true};
  const kernels::CacheWriteParams where{d_positions.get(), d_sequence.get(), d_tables.get(), d_offsets.get(), block_size};
  for (bool from_source : {false, true}) {
    SCOPED_TRACE(from_source ? "queries from fp32 rows" : "queries rotated in place");
    // Row r: [fp32 queries (from_source only) | latent | rope key | unused padding].
    const int q_width = from_source ? heads * qk : 0, stride = q_width + width + 8;
    const std::vector<float> projected = RandomFloats(static_cast<size_t>(rows) * stride, rng, 3.0f);
    const std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(rows) * heads * qk, rng);
    DeviceVector<float> d_projected(projected);
    DeviceVector<uint16_t> d_q(q), d_cache(static_cast<size_t>(blocks) * block_size * width);
    constexpr uint16_t kPoison = 0x7fc1;  // a NaN no result equals
    DeviceVector<uint16_t> d_q_latent(std::vector<uint16_t>(static_cast<size_t>(rows) * heads * rank, kPoison));
    kernels::QueryRopeParams queries{Bf16(d_q), heads, qk};
    if (from_source) queries.source = d_projected.get(), queries.source_row_stride = stride;
    const kernels::QueryAbsorbParams absorb{Bf16(d_absorbed_keys), Bf16(d_q_latent), absorb_rows, rank};
    ASSERT_CUDA_OK(kernels::LaunchWriteKvCache(d_projected.get() + q_width, stride, rows, rank, Bf16(d_norm), 1e-6f,
                                               rope_params, where, Bf16(d_cache), nullptr, queries, absorb));
    const std::vector<uint16_t> cache = d_cache.ToHost(), rotated = d_q.ToHost(), q_latent = d_q_latent.ToHost();
    for (int r = 0; r < rows; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      const float* kv = projected.data() + static_cast<size_t>(r) * stride + q_width;
      const int block = tables[offsets[sequence[r]] + positions[r] / block_size];
      const size_t slot = (static_cast<size_t>(block) * block_size + positions[r] % block_size) * width;
      const size_t row_queries = static_cast<size_t>(r) * heads * qk;
      std::vector<float> want(heads * qk);
      for (int i = 0; i < heads * qk; ++i) {
        want[i] = from_source ? projected[static_cast<size_t>(r) * stride + i] : BF16ToFloat(q[row_queries + i]);
      }
      ASSERT_NO_FATAL_FAILURE(
          ExpectRowWritten(rope, rank, 64, norm, kv, positions[r], &cache[slot], qk, want, &rotated[row_queries]));
      for (int h = 0; h < heads; ++h) {
        // Absorbed queries: bf16(q_nope) . absorbed_keys[h, j] in float64, against an fp32 sum
        // rounded to bf16.
        const size_t latent = (static_cast<size_t>(r) * heads + h) * rank;
        for (int j = 0; j < rank; ++j) {
          if (r >= absorb_rows) {
            ASSERT_EQ(q_latent[latent + j], kPoison) << "row " << r << " is past the absorb rows";
            continue;
          }
          double sum = 0, scale = 0;
          for (int d = 0; d < nope; ++d) {
            const double term = static_cast<double>(BF16ToFloat(FloatToBF16(want[h * qk + d]))) *
                                BF16ToFloat(absorbed_keys[(static_cast<size_t>(h) * rank + j) * nope + d]);
            sum += term;
            scale += term * term;
          }
          ASSERT_NEAR(BF16ToFloat(q_latent[latent + j]), sum, 8e-3 * std::abs(sum) + 1e-5 * std::sqrt(scale) + 1e-6)
              << "absorbed query row " << r << " head " << h << " value " << j;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Rows, WriteKvCacheTest,
                         ::testing::Values(CacheWriteCase{5, 4, 128}, CacheWriteCase{24, 20, 128},
                                           CacheWriteCase{32, 32, 128}, CacheWriteCase{64, 64, 128},
                                           CacheWriteCase{9, 9, 128}, CacheWriteCase{5, 5, 16},
                                           CacheWriteCase{20, 17, 16}, CacheWriteCase{50, 49, 16},
                                           CacheWriteCase{12, 12, 32}),
                         [](const auto& info) {
                           return std::to_string(info.param.rows) + "_rows_" + std::to_string(info.param.absorb_rows) +
                                  "_absorbed_nope_" + std::to_string(info.param.nope);
                         });

// Launches of many rows: a decode batch's 300 (each row spread over blocks) and a prefill's 800 (a
// warp for each piece of a row) give the same results, for DeepSeek's shapes and the fixtures' small
// ones, several sequences' rows in one launch, queries from fp32 rows, rotated in place, or none. A
// shape too large for a warp's piece (latent 1024, nope 256) stays on the spread kernel.
TEST(ElementwiseTest, WriteKvCacheOfManyRows) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  struct Shape {
    int rank, rope_dim, heads, qk;
  };
  // Three sequences of `lengths` tokens at the end of contexts of `contexts` tokens, each sequence's
  // blocks a shuffled range of the cache.
  struct Batch {
    std::vector<int> lengths, contexts;
  };
  const Batch decode{{70, 1, 229}, {70, 5000, 260}}, prefill{{270, 1, 529}, {270, 5000, 560}};
  for (const Shape& shape :
       {Shape{512, 64, 16, 192}, Shape{32, 8, 4, 24}, Shape{40, 8, 3, 12}, Shape{1024, 64, 2, 320}}) {
    for (const auto& [batch, interleave] : {std::pair{&decode, false}, std::pair{&decode, true},
                                            std::pair{&prefill, false}, std::pair{&prefill, true}}) {
      ModelConfig config = RopeConfig(true, interleave);
      config.qk_rope_head_dim = shape.rope_dim;
      config.qk_nope_head_dim = shape.qk - shape.rope_dim;
      const Rope rope(config);
      const int rank = shape.rank, rope_dim = shape.rope_dim, heads = shape.heads, qk = shape.qk;
      const int width = rank + rope_dim, block_size = 16;
      const std::vector<int>& lengths = batch->lengths;
      const std::vector<int>& contexts = batch->contexts;
      std::vector<int32_t> tables, offsets, sequence, positions;
      for (size_t s = 0; s < lengths.size(); ++s) {
        offsets.push_back(static_cast<int32_t>(tables.size()));
        const int blocks = (contexts[s] + block_size - 1) / block_size;
        std::vector<int32_t> table(blocks);
        std::iota(table.begin(), table.end(), static_cast<int32_t>(tables.size()));
        std::shuffle(table.begin(), table.end(), rng);
        tables.insert(tables.end(), table.begin(), table.end());
        for (int t = contexts[s] - lengths[s]; t < contexts[s]; ++t) {
          sequence.push_back(static_cast<int32_t>(s));
          positions.push_back(t);
        }
      }
      const int rows = static_cast<int>(positions.size());
      ASSERT_EQ(rows > kernels::kCacheWriteSpreadMaxRows, batch == &prefill);
      const std::vector<uint16_t> norm = RandomBf16(rank, rng);
      DeviceVector<float> d_inv_freq(rope.inv_freq());
      DeviceVector<uint16_t> d_norm(norm);
      DeviceVector<int32_t> d_tables(tables), d_offsets(offsets), d_sequence(sequence), d_positions(positions);
      const kernels::RopeParams rope_params{d_inv_freq.get(), rope_dim, rope.attention_factor(), interleave};
      const kernels::CacheWriteParams where{d_positions.get(), d_sequence.get(), d_tables.get(), d_offsets.get(),
                                            block_size};
      enum class Queries { kNone, kInPlace, kFromSource };
      for (Queries mode : {Queries::kNone, Queries::kInPlace, Queries::kFromSource}) {
        SCOPED_TRACE("rows " + std::to_string(rows) + " rank " + std::to_string(rank) + " heads " +
                     std::to_string(heads) + " interleave " + std::to_string(interleave) + " queries " +
                     std::to_string(static_cast<int>(mode)));
        const int q_width = mode == Queries::kFromSource ? heads * qk : 0, stride = q_width + width + 4;
        const std::vector<float> projected = RandomFloats(static_cast<size_t>(rows) * stride, rng, 3.0f);
        const std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(rows) * heads * qk, rng);
        constexpr uint16_t kPoison = 0x7fc1;  // a NaN no result equals
        DeviceVector<float> d_projected(projected);
        DeviceVector<uint16_t> d_q(mode == Queries::kFromSource ? std::vector<uint16_t>(q.size(), kPoison) : q);
        DeviceVector<uint16_t> d_cache(std::vector<uint16_t>(tables.size() * block_size * width, kPoison));
        kernels::QueryRopeParams queries;
        if (mode != Queries::kNone) queries = {Bf16(d_q), heads, qk};
        if (mode == Queries::kFromSource) queries.source = d_projected.get(), queries.source_row_stride = stride;
        ASSERT_CUDA_OK(kernels::LaunchWriteKvCache(d_projected.get() + q_width, stride, rows, rank, Bf16(d_norm),
                                                   1e-6f, rope_params, where, Bf16(d_cache), nullptr, queries));
        const std::vector<uint16_t> cache = d_cache.ToHost(), rotated = d_q.ToHost();
        for (int r = 0; r < rows; ++r) {
          SCOPED_TRACE("row " + std::to_string(r));
          const int block = tables[offsets[sequence[r]] + positions[r] / block_size];
          const size_t slot = (static_cast<size_t>(block) * block_size + positions[r] % block_size) * width;
          const size_t row_queries = static_cast<size_t>(r) * heads * qk;
          std::vector<float> want;
          if (mode == Queries::kFromSource) {
            want.assign(projected.begin() + static_cast<size_t>(r) * stride,
                        projected.begin() + static_cast<size_t>(r) * stride + heads * qk);
          } else if (mode == Queries::kInPlace) {
            for (int i = 0; i < heads * qk; ++i) want.push_back(BF16ToFloat(q[row_queries + i]));
          }
          ASSERT_NO_FATAL_FAILURE(ExpectRowWritten(rope, rank, rope_dim, norm,
                                                   projected.data() + static_cast<size_t>(r) * stride + q_width,
                                                   positions[r], &cache[slot], qk, want, &rotated[row_queries]));
        }
        if (mode == Queries::kNone) {
          EXPECT_EQ(rotated, q) << "no queries were passed";
        }
        // Slots no row of the launch owns keep their poison.
        size_t untouched = 0;
        for (size_t i = 0; i < cache.size(); i += width) untouched += cache[i] == kPoison;
        EXPECT_EQ(untouched, tables.size() * block_size - rows);
      }
    }
  }
}

// Host only: which absorbed-query launches the cache write takes (the engine asks before it passes
// them, and falls back to a separate product).
TEST(ElementwiseTest, AbsorbedQueriesOnlyInTheShapesTheKernelHandles) {
  auto address = [](uintptr_t a) { return reinterpret_cast<__nv_bfloat16*>(a); };
  alignas(16) static float source[16];
  const kernels::QueryRopeParams from_source{address(0x1000), 16, 192, source, 16 * 192 + 576};
  const kernels::QueryAbsorbParams absorb{address(0x2000), address(0x3000), 1, 512};
  EXPECT_TRUE(kernels::CanAbsorbQueries(from_source, 64, absorb));
  kernels::QueryAbsorbParams rows = absorb;
  rows.rows = kernels::kMaxAbsorbRows;
  EXPECT_TRUE(kernels::CanAbsorbQueries(from_source, 64, rows));
  rows.rows = kernels::kMaxAbsorbRows + 1;
  EXPECT_FALSE(kernels::CanAbsorbQueries(from_source, 64, rows)) << "too many rows";
  rows.rows = 0;
  EXPECT_FALSE(kernels::CanAbsorbQueries(from_source, 64, rows)) << "no rows";
  EXPECT_FALSE(kernels::CanAbsorbQueries({address(0x1000), 16, 160, source, 16 * 160 + 576}, 64, absorb))
      << "nope 96 is not a power of two";
  EXPECT_FALSE(kernels::CanAbsorbQueries({address(0x1000), 16, 320, source, 16 * 320 + 576}, 64, absorb))
      << "nope 256 is past the lanes of a warp";
  EXPECT_FALSE(kernels::CanAbsorbQueries({address(0x1000), 16, 192, source, 16 * 192 + 578}, 64, absorb))
      << "source rows not 16-byte aligned";
  kernels::QueryAbsorbParams keys = absorb;
  keys.absorbed_keys = address(0x2008);
  EXPECT_FALSE(kernels::CanAbsorbQueries(from_source, 64, keys)) << "weights not 16-byte aligned";
  const kernels::QueryRopeParams in_place{address(0x1000), 16, 36};  // q LoRA models: q rotated in place
  EXPECT_FALSE(kernels::CanAbsorbQueries(in_place, 4, absorb)) << "bf16 query rows (36 values) not 16-byte aligned";
  EXPECT_TRUE(kernels::CanAbsorbQueries({address(0x1000), 16, 48}, 16, absorb));
  // Past kMaxRowAbsorbRows rows the head GEMM's tiles: nope any multiple of 16 up to 256.
  kernels::QueryAbsorbParams tiled = absorb;
  tiled.rows = kernels::kMaxRowAbsorbRows + 1;
  EXPECT_TRUE(kernels::CanAbsorbQueries(from_source, 64, tiled));
  EXPECT_TRUE(kernels::CanAbsorbQueries({address(0x1000), 16, 160, source, 16 * 160 + 576}, 64, tiled))
      << "nope 96 in tiles";
  EXPECT_TRUE(kernels::CanAbsorbQueries({address(0x1000), 16, 320, source, 16 * 320 + 576}, 64, tiled))
      << "nope 256 in tiles";
  EXPECT_FALSE(kernels::CanAbsorbQueries({address(0x1000), 16, 328, source, 16 * 328 + 576}, 64, tiled))
      << "nope 264 is past the tile's shared memory";
  EXPECT_FALSE(kernels::CanAbsorbQueries({address(0x1000), 16, 72}, 64, tiled)) << "nope 8 is not a multiple of 16";
  kernels::QueryAbsorbParams odd_rank = tiled;
  odd_rank.rank = 500;
  EXPECT_FALSE(kernels::CanAbsorbQueries(from_source, 64, odd_rank)) << "latent rows not 16-byte aligned";
}

TEST(ElementwiseTest, TransposeEachMatrixOfABatch) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  // Head slices of a kv_b_proj-like matrix (rows of 3 heads x (nope + v), nope rows each taken),
  // and shapes that leave partial 32 x 32 tiles.
  for (const auto& [rows, cols, stride, batch] :
       std::vector<std::tuple<int, int, int, int>>{{128, 512, 256 * 512, 3}, {5, 37, 5 * 37, 2}, {33, 1, 40, 4}}) {
    const std::vector<uint16_t> in = RandomBf16(static_cast<size_t>(stride) * (batch - 1) + rows * cols, rng);
    DeviceVector<uint16_t> d_in(in), d_out(static_cast<size_t>(batch) * rows * cols);
    ASSERT_CUDA_OK(kernels::LaunchTranspose(Bf16(d_in), rows, cols, stride, batch, Bf16(d_out), nullptr));
    const std::vector<uint16_t> out = d_out.ToHost();
    for (int b = 0; b < batch; ++b) {
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
          ASSERT_EQ(out[(static_cast<size_t>(b) * cols + c) * rows + r], in[static_cast<size_t>(b) * stride + r * cols + c])
              << rows << "x" << cols << " batch " << b << " (" << r << ", " << c << ")";
        }
      }
    }
  }
}

TEST(ElementwiseTest, EmbeddingAndGatherRows) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  const int vocab = 1000, hidden = 96;
  const std::vector<uint16_t> table = RandomBf16(static_cast<size_t>(vocab) * hidden, rng);
  const std::vector<int32_t> tokens = {5, 999, 0, 5, 123};
  DeviceVector<uint16_t> d_table(table);
  DeviceVector<int32_t> d_tokens(tokens);
  DeviceVector<float> d_hidden(tokens.size() * hidden);
  ASSERT_CUDA_OK(kernels::LaunchEmbedding(Bf16(d_table), d_tokens.get(), 5, hidden, d_hidden.get(), nullptr));
  const std::vector<float> h = d_hidden.ToHost();
  for (size_t t = 0; t < tokens.size(); ++t) {
    for (int i = 0; i < hidden; ++i) ASSERT_EQ(h[t * hidden + i], BF16ToFloat(table[tokens[t] * hidden + i]));
  }

  const std::vector<int32_t> rows = {4, 0, 2};
  DeviceVector<uint16_t> d_gathered(rows.size() * hidden);
  DeviceVector<int32_t> d_rows(rows);
  ASSERT_CUDA_OK(kernels::LaunchGatherRows(Bf16(d_table), d_rows.get(), 3, hidden, Bf16(d_gathered), nullptr));
  const std::vector<uint16_t> gathered = d_gathered.ToHost();
  for (size_t r = 0; r < rows.size(); ++r) {
    for (int i = 0; i < hidden; ++i) ASSERT_EQ(gathered[r * hidden + i], table[rows[r] * hidden + i]);
  }
}

}  // namespace
}  // namespace cohort
