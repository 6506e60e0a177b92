// The MLA attention kernels against float64 CPU references on fresh random inputs: the absorbed
// decode kernel (every supported latent shape, head counts that do and do not fill a 16-head
// group, contexts from 1 token to several thousand, one split and many, scattered block tables,
// the value weights applied in the merge of the splits, this step's cache rows written by the kernel
// just before), and the prefill kernels (cache gather, flash attention over the expanded keys and
// values).
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <queue>
#include <random>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/mla_decode.h"
#include "kernels/skinny_gemm.h"
#include "tests/testing/gpu.h"

namespace cohort {
namespace {

using testing::Bf16;
using testing::DeviceVector;
using testing::RandomBf16;

double RelativeError(const std::vector<double>& ref, const std::vector<float>& got) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    diff += (got[i] - ref[i]) * (got[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

struct MlaCase {
  int rank, rope, heads, block_size, splits;  // splits: the launch's default cut (MlaDecodeShape::splits)
  std::vector<int> positions;  // one query each, of its own sequence
  int v_head_dim = 0;          // > 0: a second launch applies value weights in the merge
  // > 0: the last step_tokens positions of each query's context are this step's rows, and the
  // attention is told so (MlaDecodeParams::step_tokens_bound): it copies older rows of its first
  // tile before it waits for the kernel before it, which writes query 0's newest rows (those in its
  // last block) as the engine's cache write does. They hold NaN until then.
  int step_tokens = 0;
  // > 0: plan for a GPU that holds this many attention blocks at once, and with this many partial
  // rows, instead of this one's and queries x (splits + 1): small waves make the plans of big ones.
  int64_t resident = 0;
  int64_t max_partials = 0;
};

void RunMlaCase(const MlaCase& c) {
  std::mt19937 rng = testing::FreshRng();
  const int width = c.rank + c.rope, queries = static_cast<int>(c.positions.size());
  // Each query's sequence gets its own shuffled blocks out of a shared pool.
  std::vector<int32_t> tables, offsets;
  int total_blocks = 0;
  for (int pos : c.positions) total_blocks += pos / c.block_size + 1;
  std::vector<int32_t> pool(total_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  for (int pos : c.positions) {
    offsets.push_back(static_cast<int32_t>(tables.size()));
    for (int b = 0; b <= pos / c.block_size; ++b) tables.push_back(pool[tables.size()]);
  }
  std::vector<uint16_t> cache = RandomBf16(static_cast<size_t>(total_blocks) * c.block_size * width, rng);
  // Query 0's rows of this step in its last block: slots [first_step_slot, + step_slots), NaN before
  // the writer runs.
  const int last = c.positions[0];
  const int step_slots = std::min(c.step_tokens, last % c.block_size + 1);
  const int64_t first_step_slot =
      static_cast<int64_t>(tables[offsets[0] + last / c.block_size]) * c.block_size + last % c.block_size + 1 - step_slots;
  std::vector<uint16_t> cache_before = cache;
  std::fill_n(cache_before.begin() + first_step_slot * width, static_cast<int64_t>(step_slots) * width, uint16_t{0x7fc1});
  const std::vector<uint16_t> q_latent = RandomBf16(static_cast<size_t>(queries) * c.heads * c.rank, rng, 0.2f);
  const int q_row = c.heads * (16 + c.rope);  // q rope parts interleaved with other values, as in the engine
  const std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(queries) * q_row, rng, 0.2f);
  const std::vector<int32_t> position(c.positions.begin(), c.positions.end());
  const float scale = 1.0f / std::sqrt(192.0f);

  DeviceVector<uint16_t> d_cache(cache_before), d_q_latent(q_latent), d_q(q);
  DeviceVector<int32_t> d_tables(tables);
  DeviceVector<uint16_t> d_out(static_cast<size_t>(queries) * c.heads * c.rank);
  // The launch as the engine sizes and plans it on this GPU (with room for uneven cuts, kept where
  // the plan takes them), uploaded as the engine uploads it with the step inputs; the workspace
  // holds a partial row per work slot.
  int sms = 0, blocks_per_sm = 0;
  ASSERT_CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  ASSERT_CUDA_OK(kernels::MlaDecodeResidentBlocks(c.rank, c.rope, &blocks_per_sm));
  const int64_t resident = c.resident > 0 ? c.resident : int64_t{sms} * blocks_per_sm;
  const int64_t max_partials = c.max_partials > 0 ? c.max_partials : int64_t{queries} * (c.splits + 1);
  const auto shape_for = [&](bool uneven) {
    return kernels::MlaDecodeShapeFor(queries, c.heads, c.splits, resident, max_partials, uneven);
  };
  DeviceVector<float> d_work(kernels::MlaSplitWorkspaceFloats(shape_for(true).max_partials, c.heads, c.rank));
  struct DevicePlan {
    kernels::MlaDecodeShape shape;
    DeviceVector<kernels::MlaWorkItem> work;
    DeviceVector<kernels::MlaMergeRow> merges;
  };
  kernels::MlaDecodePlanner planner;
  auto plan = [&](bool every_query_merged) {
    const kernels::MlaDecodeShape shape = shape_for(planner.Choose(shape_for(true), position.data(), every_query_merged));
    std::vector<kernels::MlaWorkItem> work(shape.work_slots);
    std::vector<kernels::MlaMergeRow> merges(shape.merge_rows);
    EXPECT_TRUE(planner.Write(shape, position.data(), offsets.data(), work.data(), merges.data()));
    return DevicePlan{shape, DeviceVector<kernels::MlaWorkItem>(work), DeviceVector<kernels::MlaMergeRow>(merges)};
  };
  DevicePlan d_plan = plan(false);
  kernels::MlaDecodeParams p;
  p.q_latent = Bf16(d_q_latent);
  p.q_rope = Bf16(d_q) + 16;
  p.q_rope_row_stride = q_row;
  p.q_rope_head_stride = 16 + c.rope;
  p.cache = Bf16(d_cache);
  p.block_tables = d_tables.get();
  p.block_size = c.block_size;
  p.heads = c.heads;
  p.kv_lora_rank = c.rank;
  p.rope_dim = c.rope;
  p.softmax_scale = scale;
  p.shape = d_plan.shape;
  p.work = d_plan.work.get();
  p.merges = d_plan.merges.get();
  p.out = Bf16(d_out);
  p.partial_out = d_work.get();
  p.partial_lse = d_work.get() + p.shape.max_partials * c.heads * c.rank;
  ASSERT_CUDA_OK(cudaMemset(d_out.get(), 0xff, static_cast<size_t>(queries) * c.heads * c.rank * sizeof(uint16_t)));
  if (c.step_tokens > 0) {
    // The writer: a product of k = 2^16 into those rows, on few enough blocks (one a 16 columns)
    // to leave most SMs to the attention, which starts as soon as the product's blocks have. It runs
    // for microseconds after that, so an attention that copied these rows early would read NaN. A
    // test double for the engine's cache write (whose inputs need the whole layer); the reference
    // below reads whatever it wrote.
    constexpr int kWriterK = 1 << 16;
    DeviceVector<uint16_t> d_x(static_cast<size_t>(step_slots) * kWriterK), d_w(static_cast<size_t>(width) * kWriterK);
    ASSERT_CUDA_OK(kernels::LaunchFillRandom(Bf16(d_x), static_cast<int64_t>(step_slots) * kWriterK, testing::FreshSeed(),
                                             0.01f, nullptr));
    ASSERT_CUDA_OK(kernels::LaunchFillRandom(Bf16(d_w), static_cast<int64_t>(width) * kWriterK, testing::FreshSeed(),
                                             1.0f, nullptr));
    kernels::SkinnyGemmParams writer;
    writer.x = Bf16(d_x);
    writer.x_row_stride = kWriterK;
    writer.w = Bf16(d_w);
    writer.w_row_stride = kWriterK;
    writer.y = Bf16(d_cache) + first_step_slot * width;
    writer.y_row_stride = width;
    writer.rows = step_slots;
    writer.n_out = width;
    writer.k = kWriterK;
    writer.k_splits = 1;
    cudaStream_t stream;  // a blocking stream: ordered after the fills and the poisoning memset
    ASSERT_CUDA_OK(cudaStreamCreate(&stream));
    p.step_tokens_bound = c.step_tokens;
    ASSERT_CUDA_OK(kernels::LaunchSkinnyGemm(writer, stream));
    ASSERT_CUDA_OK(kernels::LaunchMlaDecode(p, stream));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
    ASSERT_CUDA_OK(cudaStreamDestroy(stream));
    cache = d_cache.ToHost();
  } else {
    ASSERT_CUDA_OK(kernels::LaunchMlaDecode(p, nullptr));  // NaN poison: an unwritten output fails
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
  }
  const std::vector<uint16_t> out = d_out.ToHost();

  // The same attention with the value weights applied in the merge: W_uv[h] is [v, rank] with a
  // gap after it, like kv_b_proj's value rows between its key rows.
  const int v = c.v_head_dim;
  const int64_t value_head_stride = static_cast<int64_t>(v + 8) * c.rank;
  const std::vector<uint16_t> values = RandomBf16(static_cast<size_t>(c.heads) * value_head_stride, rng);
  std::vector<uint16_t> attn;
  if (v > 0) {
    DeviceVector<uint16_t> d_values(values), d_attn(static_cast<size_t>(queries) * c.heads * v);
    ASSERT_CUDA_OK(cudaMemset(d_attn.get(), 0xff, static_cast<size_t>(queries) * c.heads * v * sizeof(uint16_t)));
    DevicePlan d_merged_plan = plan(true);
    kernels::MlaDecodeParams pv = p;
    pv.shape = d_merged_plan.shape;
    pv.work = d_merged_plan.work.get();
    pv.merges = d_merged_plan.merges.get();
    pv.out = nullptr;  // not written when the values are applied
    pv.value_weights = Bf16(d_values);
    pv.value_head_stride = value_head_stride;
    pv.v_head_dim = v;
    pv.attn = Bf16(d_attn);
    ASSERT_CUDA_OK(kernels::LaunchMlaDecode(pv, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    attn = d_attn.ToHost();
  }

  auto value = [&](const std::vector<uint16_t>& v, size_t i) { return static_cast<double>(BF16ToFloat(v[i])); };
  for (int qi = 0; qi < queries; ++qi) {
    std::vector<double> ref;
    std::vector<float> got;
    for (int h = 0; h < c.heads; ++h) {
      const int len = c.positions[qi] + 1;
      std::vector<double> w(len);
      double max = -INFINITY;
      for (int t = 0; t < len; ++t) {
        const size_t slot = (static_cast<size_t>(tables[offsets[qi] + t / c.block_size]) * c.block_size + t % c.block_size) * width;
        double s = 0;
        for (int i = 0; i < c.rank; ++i) s += value(q_latent, (static_cast<size_t>(qi) * c.heads + h) * c.rank + i) * value(cache, slot + i);
        for (int i = 0; i < c.rope; ++i) s += value(q, static_cast<size_t>(qi) * q_row + h * (16 + c.rope) + 16 + i) * value(cache, slot + c.rank + i);
        w[t] = s * scale;
        max = std::max(max, w[t]);
      }
      double sum = 0;
      for (double& x : w) sum += (x = std::exp(x - max));
      for (int i = 0; i < c.rank; ++i) {
        double o = 0;
        for (int t = 0; t < len; ++t) {
          const size_t slot = (static_cast<size_t>(tables[offsets[qi] + t / c.block_size]) * c.block_size + t % c.block_size) * width;
          o += w[t] / sum * value(cache, slot + i);
        }
        ref.push_back(o);
        got.push_back(BF16ToFloat(out[(static_cast<size_t>(qi) * c.heads + h) * c.rank + i]));
      }
    }
    EXPECT_LT(RelativeError(ref, got), 1e-2) << "rank " << c.rank << " heads " << c.heads << " query " << qi
                                             << " at position " << c.positions[qi] << " splits " << c.splits;
    if (v == 0) continue;
    std::vector<double> attn_ref;
    std::vector<float> attn_got;
    for (int h = 0; h < c.heads; ++h) {
      for (int i = 0; i < v; ++i) {
        double a = 0;
        for (int j = 0; j < c.rank; ++j) {
          a += ref[static_cast<size_t>(h) * c.rank + j] * value(values, h * value_head_stride + static_cast<int64_t>(i) * c.rank + j);
        }
        attn_ref.push_back(a);
        attn_got.push_back(BF16ToFloat(attn[(static_cast<size_t>(qi) * c.heads + h) * v + i]));
      }
    }
    EXPECT_LT(RelativeError(attn_ref, attn_got), 1e-2) << "values applied in the merge: rank " << c.rank << " heads "
                                                       << c.heads << " query " << qi << " splits " << c.splits;
  }
}

// The kernel runs in blocks of eight warps when the grid has at most one block an SM, of four warps
// otherwise (kernels/mla_decode.cu); the cases below take both on an H200 (132 SMs).
TEST(MlaDecodeTest, DeepseekShapesOneSplit) {
  COHORT_SKIP_WITHOUT_GPU();
  RunMlaCase({512, 64, 16, 16, 1, {0, 1, 31, 32, 33, 100, 517}});
  std::vector<int> many;  // 200 queries, 200 blocks
  for (int i = 0; i < 200; ++i) many.push_back(i * 37 % 700);
  RunMlaCase({512, 64, 16, 16, 1, many});
}

TEST(MlaDecodeTest, DeepseekShapesManySplitsAndPartialHeadGroups) {
  COHORT_SKIP_WITHOUT_GPU();
  RunMlaCase({512, 64, 20, 16, 7, {0, 5, 64, 1000, 4100}});
  RunMlaCase({512, 64, 128, 64, 3, {2047, 3}});
  RunMlaCase({512, 64, 20, 16, 12, {3000, 1, 400}});  // the merge's 16-split size
  // The most splits, and splits left without a tile.
  RunMlaCase({512, 64, 16, 64, 64, {4095, 2100, 40}});
}

// More queries than one wave of blocks holds, split (as MlaDecodeSplits now splits such batches):
// several waves of blocks, then a merge of every query.
TEST(MlaDecodeTest, ManyQueriesSplitOverSeveralWaves) {
  COHORT_SKIP_WITHOUT_GPU();
  std::vector<int> many;  // 320 queries, 960 blocks
  for (int i = 0; i < 320; ++i) many.push_back(i * 53 % 1500);
  RunMlaCase({512, 64, 16, 64, 3, many});
}

// Host only: one wave of blocks gets as many splits as it holds; past one wave (past half of one at
// long contexts), the splits that make the last wave fuller at the least merge cost (the cases of
// an H200: 132 SMs of two blocks).
TEST(MlaDecodeTest, SplitsFillOneWaveOrTheLastOne) {
  constexpr int64_t kResident = 264, kPairs = 1024;
  EXPECT_EQ(kernels::MlaDecodeSplits(1, 16, 1024, kResident, kPairs), 16);  // a tile a split up to 16
  EXPECT_EQ(kernels::MlaDecodeSplits(1, 16, 4096, kResident, kPairs), 64);  // two past that
  EXPECT_EQ(kernels::MlaDecodeSplits(64, 16, 4096, kResident, kPairs), 4);
  EXPECT_EQ(kernels::MlaDecodeSplits(256, 16, 1024, kResident, kPairs), 1);
  // 192 blocks leave a quarter of the wave empty: split four ways at long contexts only (three full
  // waves of a quarter of the tiles), where the tiles outweigh the merge.
  EXPECT_EQ(kernels::MlaDecodeSplits(192, 16, 2048, kResident, kPairs), 1);
  EXPECT_EQ(kernels::MlaDecodeSplits(192, 16, 4096, kResident, kPairs), 4);
  EXPECT_EQ(kernels::MlaDecodeSplits(192, 16, 0, kResident, kPairs), 4);
  // 320 blocks: two waves unsplit, the second of 56 blocks; three splits make 960 blocks, four
  // waves of 22 tiles instead of two of 64.
  EXPECT_EQ(kernels::MlaDecodeSplits(320, 16, 2048, kResident, kPairs), 3);
  EXPECT_EQ(kernels::MlaDecodeSplits(320, 16, 0, kResident, kPairs), 3);
  EXPECT_EQ(kernels::MlaDecodeSplits(384, 16, 2048, kResident, kPairs), 2);
  // 512 blocks are nearly two full waves: a merge would cost more than it saves.
  EXPECT_EQ(kernels::MlaDecodeSplits(512, 16, 2048, kResident, kPairs), 1);
  // The workspace caps the splits; V3's 128 heads make eight blocks a query.
  EXPECT_EQ(kernels::MlaDecodeSplits(320, 16, 2048, kResident, 320), 1);
  EXPECT_EQ(kernels::MlaDecodeSplits(40, 128, 2048, kResident, kPairs), 4);
}

// One long context among short ones: the even plan would leave the long query on one block (or a
// few) while the rest of the GPU idles, so the plan cuts it into many items of the short ones' size
// and merges only it (MlaDecodePlanner). Head groups of 16, 20 (a partial group) and 128 (eight).
TEST(MlaDecodeTest, OneLongContextAmongShortOnesIsCutUnevenly) {
  COHORT_SKIP_WITHOUT_GPU();
  std::vector<int> mixed = {7999};
  for (int i = 0; i < 40; ++i) mixed.push_back(100 + i * 29 % 200);
  RunMlaCase({512, 64, 16, 64, 1, mixed});
  RunMlaCase({512, 64, 20, 16, 1, mixed});
  RunMlaCase({512, 64, 128, 64, 1, {40, 6000, 90, 3}});
  // Two queries with the values applied in the merge: 4096 tokens against 18.
  RunMlaCase({512, 64, 16, 64, 2, {17, 4095}, 128});
}

// A batch of contexts spread wide, as a server's are, with one far longer: the plan cuts the longer
// queries unevenly and merges them in a launch with room for a wave's worth of merge rows, the
// longest in more partials than the merge sums in one round.
TEST(MlaDecodeTest, ContextsSpreadWideAreCutUnevenlyAndMergedInRounds) {
  COHORT_SKIP_WITHOUT_GPU();
  std::vector<int> spread;
  for (int q = 0; q < 160; ++q) spread.push_back(15 + q * 2485 / 159);
  std::mt19937 shuffle(160);
  std::shuffle(spread.begin(), spread.end(), shuffle);
  spread[70] = 39999;
  // The plan RunMlaCase makes on this GPU: uneven, its longest query in more partials than a round.
  int sms = 0, blocks_per_sm = 0;
  ASSERT_CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  ASSERT_CUDA_OK(kernels::MlaDecodeResidentBlocks(512, 64, &blocks_per_sm));
  const std::vector<int32_t> positions(spread.begin(), spread.end()), offsets(spread.size(), 0);
  const auto shape = [&](bool room) {
    return kernels::MlaDecodeShapeFor(160, 16, 1, int64_t{sms} * blocks_per_sm, 160 * 2, room);
  };
  kernels::MlaDecodePlanner planner;
  ASSERT_TRUE(planner.Choose(shape(true), positions.data(), false));
  std::vector<kernels::MlaWorkItem> work(shape(true).work_slots);
  std::vector<kernels::MlaMergeRow> merges(shape(true).merge_rows);
  ASSERT_TRUE(planner.Write(shape(true), positions.data(), offsets.data(), work.data(), merges.data()));
  EXPECT_EQ(merges[0].query, 70);
  EXPECT_GT(merges[0].splits, shape(true).max_splits);
  const auto cut = [](const kernels::MlaMergeRow& r) { return r.query >= 0; };
  EXPECT_GT(std::count_if(merges.begin(), merges.end(), cut), 16);
  RunMlaCase({512, 64, 16, 64, 1, spread});
}

// A packed plan (blocks that take several items one after another), planned as for a GPU of 32
// resident blocks: 31 queries of about 1024 tokens and one of 8192. Items of one size would take a
// second wave; packed, the long query's pieces fill blocks of their own and the short queries share
// the rest, most cut between two blocks. Again with this step's rows of query 0 written by the
// kernel before (copied after the wait, in whichever item of a block they fall).
TEST(MlaDecodeTest, PackedPlansTakeSeveralItemsABlock) {
  COHORT_SKIP_WITHOUT_GPU();
  std::vector<int> mixed = {8191};
  for (int i = 0; i < 31; ++i) mixed.push_back(1023 - i % 3);
  const std::vector<int32_t> positions(mixed.begin(), mixed.end()), offsets(mixed.size(), 0);
  const auto shape = [&](bool room) { return kernels::MlaDecodeShapeFor(32, 16, 1, 32, 1024, room); };
  kernels::MlaDecodePlanner planner;
  ASSERT_TRUE(planner.Choose(shape(true), positions.data(), false));
  std::vector<kernels::MlaWorkItem> work(shape(true).work_slots);
  std::vector<kernels::MlaMergeRow> merges(shape(true).merge_rows);
  ASSERT_TRUE(planner.Write(shape(true), positions.data(), offsets.data(), work.data(), merges.data()));
  const int taken = static_cast<int>(std::count_if(work.begin(), work.end(), [](const kernels::MlaWorkItem& w) {
    return w.query >= 0 && w.taken;
  }));
  EXPECT_GT(taken, 16);
  MlaCase c{512, 64, 16, 64, 1, mixed};
  c.resident = 32;
  c.max_partials = 1024;
  RunMlaCase(c);
  c.step_tokens = 1;
  RunMlaCase(c);
}

// Host only: what MlaDecodePlanner hands the blocks. Every plan covers each query's tiles exactly
// once, in items of consecutive partial rows with one merge row for each query cut into several;
// equal contexts get the even cut of MlaDecodeSplits; one long context among short ones gets items
// of about the short ones' size, longest query first; unused slots and rows say so.
TEST(MlaDecodeTest, PlanCoversEveryTileOnceAndCutsALongContextIntoShortItems) {
  constexpr int64_t kResident = 264;
  struct Plan {
    kernels::MlaDecodeShape shape;
    std::vector<kernels::MlaWorkItem> work;
    std::vector<kernels::MlaMergeRow> merges;
    bool uneven = false;
  };
  // As the engine plans: chosen for the launch with room for uneven cuts, written into it where the
  // plan takes them, else into the launch without.
  kernels::MlaDecodePlanner planner;  // one for every plan below, as the engine keeps one
  auto make = [&](int heads, int splits, const std::vector<int32_t>& positions, bool merged) {
    const int queries = static_cast<int>(positions.size());
    std::vector<int32_t> tables(queries);
    std::iota(tables.begin(), tables.end(), 1000);
    const auto shape = [&](bool room) {
      return kernels::MlaDecodeShapeFor(queries, heads, splits, kResident, 1024, room);
    };
    Plan plan;
    plan.uneven = planner.Choose(shape(true), positions.data(), merged);
    plan.shape = shape(plan.uneven);
    plan.work.resize(plan.shape.work_slots);
    plan.merges.resize(plan.shape.merge_rows);
    EXPECT_TRUE(planner.Write(plan.shape, positions.data(), tables.data(), plan.work.data(), plan.merges.data()));
    return plan;
  };
  auto check = [](const std::vector<int32_t>& positions, bool merged, const Plan& plan) {
    const kernels::MlaDecodeShape& shape = plan.shape;
    const int queries = static_cast<int>(positions.size());
    std::vector<int> next_tile(queries, 0), items(queries, 0), first_partial(queries, -1);
    int partials = 0;
    bool unused = false;
    for (const kernels::MlaWorkItem& item : plan.work) {
      if (item.query < 0) {
        unused = true;
        continue;
      }
      ASSERT_FALSE(unused) << "a work item after an unused slot";
      ASSERT_LT(item.query, queries);
      EXPECT_EQ(item.context, positions[item.query] + 1);
      EXPECT_EQ(item.table_offset, 1000 + item.query);
      EXPECT_EQ(item.tile_begin, next_tile[item.query]) << "query " << item.query;
      EXPECT_GT(item.tile_end, item.tile_begin);
      next_tile[item.query] = item.tile_end;
      if (item.partial >= 0) {
        if (first_partial[item.query] < 0) first_partial[item.query] = item.partial;
        EXPECT_EQ(item.partial, first_partial[item.query] + items[item.query]) << "consecutive partial rows";
        EXPECT_EQ(item.partial, partials++) << "partial rows in item order";
      }
      ++items[item.query];
    }
    EXPECT_LE(partials, shape.max_partials);
    int rows = 0;
    for (const kernels::MlaMergeRow& row : plan.merges) {
      if (row.query < 0) continue;
      ++rows;
      EXPECT_EQ(row.first_partial, first_partial[row.query]);
      EXPECT_EQ(row.splits, items[row.query]);
    }
    for (int q = 0; q < queries; ++q) {
      EXPECT_EQ(next_tile[q], positions[q] / 32 + 1) << "query " << q << " covered to its last tile";
      EXPECT_EQ(first_partial[q] >= 0, items[q] > 1 || merged) << "query " << q;
    }
    EXPECT_EQ(rows, std::count_if(first_partial.begin(), first_partial.end(), [](int f) { return f >= 0; }));
    // Longest queries first: each item starts on the first block to come free.
    int last_started = -1;
    for (const kernels::MlaWorkItem& item : plan.work) {
      if (item.query < 0 || item.tile_begin > 0) continue;
      if (last_started >= 0) {
        EXPECT_LE(positions[item.query] / 32, positions[last_started] / 32) << "query " << item.query;
      }
      last_started = item.query;
    }
    // A packed plan's blocks: each item a block takes after its own says so, and only those do; a
    // wave holds them all.
    int blocks = 0;
    for (size_t i = 0; i < plan.work.size() && plan.work[i].query >= 0;) {
      const kernels::MlaWorkItem& leader = plan.work[i];
      EXPECT_EQ(leader.taken, 0) << "item " << i;
      ASSERT_LE(i + leader.more, plan.work.size());
      for (size_t k = i + 1; k <= i + leader.more; ++k) EXPECT_EQ(plan.work[k].taken, 1) << "item " << k;
      EXPECT_TRUE(leader.more == 0 || plan.uneven) << "only launches with room take packed plans";
      i += 1 + leader.more;
      ++blocks;
    }
    EXPECT_GT(blocks, 0);
  };
  // Tile times until the plan's last block ends, each block (in order: an item, with the `more` after
  // it in a packed plan) on the first of a wave's blocks to come free, against a wave's share of the
  // tiles, which no plan beats.
  auto makespan_over_share = [](const std::vector<int32_t>& positions, int heads, const Plan& plan) {
    const int64_t wave = kResident / ((heads + 15) / 16);
    std::priority_queue<int64_t, std::vector<int64_t>, std::greater<>> ends;
    int64_t last = 0, tiles = 0;
    for (size_t i = 0; i < plan.work.size() && plan.work[i].query >= 0; ++i) {
      if (plan.work[i].taken) continue;
      int64_t start = 0;
      if (static_cast<int64_t>(ends.size()) == wave) {
        start = ends.top();
        ends.pop();
      }
      int64_t end = start;
      for (size_t k = i; k <= i + plan.work[i].more; ++k) end += plan.work[k].tile_end - plan.work[k].tile_begin;
      ends.push(end);
      last = std::max(last, end);
    }
    for (const int32_t p : positions) tiles += p / 32 + 1;
    return static_cast<double>(last) / std::ceil(static_cast<double>(tiles) / static_cast<double>(wave));
  };

  // Equal contexts within a wave: MlaDecodeSplits' cut, in query order, in a launch of exactly its
  // items.
  for (auto [queries, context] : {std::pair{1, 1024}, {4, 4096}, {64, 4096}, {256, 1024}}) {
    const int splits = kernels::MlaDecodeSplits(queries, 16, context, kResident, 1024);
    const std::vector<int32_t> positions(queries, context - 1);
    const Plan plan = make(16, splits, positions, false);
    check(positions, false, plan);
    EXPECT_FALSE(plan.uneven);
    EXPECT_EQ(plan.shape.work_slots, queries * splits);
    EXPECT_EQ(plan.shape.max_splits, splits);
    EXPECT_EQ(plan.shape.merge_rows, splits > 1 ? queries : 0);
    const int tiles = context / 32, chunk = (tiles + splits - 1) / splits;
    for (int q = 0; q < queries; ++q) {
      for (int i = 0; i < splits; ++i) {
        const kernels::MlaWorkItem& item = plan.work[q * splits + i];
        EXPECT_EQ(item.query, q);
        EXPECT_EQ(item.tile_begin, i * chunk);
        EXPECT_EQ(item.partial, splits > 1 ? q * splits + i : -1) << queries << " x " << context;
      }
    }
  }

  // Equal contexts past a wave: 320 x 2048, cut three ways (MlaDecodeSplits), is 960 items of 22
  // tiles in four waves (88 tile times); packed, each of 263 blocks takes a wave's share, 78 tiles
  // of one or two queries, and ends with it.
  const std::vector<int32_t> equal_past_a_wave(320, 2047);
  const Plan packed = make(16, 3, equal_past_a_wave, false);
  check(equal_past_a_wave, false, packed);
  ASSERT_TRUE(packed.uneven);
  EXPECT_GT(packed.work[0].more + packed.work[1].more, 0);
  EXPECT_LE(makespan_over_share(equal_past_a_wave, 16, packed), 1.01);

  // Even items that leave part of a wave idle: 96 x 4096, cut in two (MlaDecodeSplits), is 192
  // items of 64 tiles on a wave of 264 blocks, against a share of 47; one query of 32768 tokens, in
  // 64 splits (the most), is 64 blocks of 16 tiles against a share of 4. Packed, both end with it.
  for (auto [queries, context] : {std::pair{96, 4096}, {1, 32768}}) {
    const std::vector<int32_t> below_a_wave(queries, context - 1);
    const Plan plan = make(16, kernels::MlaDecodeSplits(queries, 16, context, kResident, 1024), below_a_wave, false);
    SCOPED_TRACE(::testing::Message() << queries << " x " << context);
    check(below_a_wave, false, plan);
    ASSERT_TRUE(plan.uneven);
    EXPECT_LE(makespan_over_share(below_a_wave, 16, plan), 1.01);
  }

  // 255 queries of 1024 tokens and one of 32768 (cohort bench step --long-context): the even plan
  // is one item a query, 1024 tiles on one block, against a wave's share of 35. Items of one size
  // cannot end before 64 (the 264 blocks of a wave take 248 short items beside the long query's, and
  // the last start when the first end); packed, the long query's pieces fill blocks of their own
  // and the short queries share the rest, ending within 5% of the share. V3's 128 heads: eight
  // head groups, so a wave is 33 items and the merge takes 33 queries.
  std::vector<int32_t> positions(256, 1023);
  positions[200] = 32767;
  for (const int heads : {16, 128}) {
    const Plan plan = make(heads, 1, positions, false);
    SCOPED_TRACE(::testing::Message() << heads << " heads, one long query");
    check(positions, false, plan);
    ASSERT_TRUE(plan.uneven);
    EXPECT_EQ(plan.shape.max_splits, 16);
    EXPECT_EQ(plan.shape.merge_rows, heads == 16 ? 256 : 33);
    EXPECT_EQ(plan.shape.work_slots, 256 + (heads == 16 ? 264 : 33));
    EXPECT_EQ(plan.work[0].query, 200);
    EXPECT_EQ(plan.merges[0].query, 200);
    EXPECT_LE(makespan_over_share(positions, heads, plan), 1.05);
  }

  // 319 queries of 4096 tokens and one of 32768: the even plan cuts each query in three (960 items
  // in four waves) and ends with the long query's 342-tile items, against a share of 159. Packed, in
  // a launch whose merge takes every query (as the even plan's does), it ends with the share.
  std::vector<int32_t> past_a_wave(320, 4095);
  past_a_wave[0] = 32767;
  const Plan cut_all = make(16, 3, past_a_wave, false);
  check(past_a_wave, false, cut_all);
  ASSERT_TRUE(cut_all.uneven);
  EXPECT_EQ(cut_all.shape.merge_rows, 320);
  EXPECT_EQ(cut_all.merges[0].query, 0);
  EXPECT_LE(makespan_over_share(past_a_wave, 16, cut_all), 1.02);

  // A batch of contexts spread wide, as a server's are: 256 queries of 256 to 8192 tokens, in no
  // order. The even plan (one item a query) ends with the longest, 256 tile times, against a wave's
  // share of 131; an uneven cut cuts the longer half of the queries and ends within 5% of the share.
  // 512 such queries fill a wave twice unsplit: the even plan, longest first, ends within 5%.
  for (const int queries : {256, 512}) {
    std::vector<int32_t> spread(queries);
    for (int q = 0; q < queries; ++q) spread[q] = 256 + static_cast<int>(int64_t{q} * (8192 - 256) / (queries - 1)) - 1;
    std::mt19937 shuffle(queries);
    std::shuffle(spread.begin(), spread.end(), shuffle);
    const Plan wide = make(16, kernels::MlaDecodeSplits(queries, 16, 8192, kResident, 1024), spread, false);
    SCOPED_TRACE(::testing::Message() << queries << " spread queries");
    check(spread, false, wide);
    EXPECT_EQ(wide.uneven, queries == 256);
    EXPECT_LE(makespan_over_share(spread, 16, wide), 1.05);
  }

  // Random batches, some with a long context: every plan is whole, with and without every query
  // merged.
  std::mt19937 rng = testing::FreshRng();
  for (int round = 0; round < 200; ++round) {
    const int queries = std::uniform_int_distribution<int>(1, 300)(rng);
    const int heads = round % 3 == 0 ? 128 : 16;
    std::vector<int32_t> positions(queries);
    for (int32_t& p : positions) p = std::uniform_int_distribution<int>(0, 3000)(rng);
    if (round % 2 == 0) positions[rng() % queries] = std::uniform_int_distribution<int>(3000, 100000)(rng);
    const int splits = kernels::MlaDecodeSplits(queries, heads, 0, kResident, 1024);
    const bool merged = queries <= 2 && splits > 1;
    SCOPED_TRACE(::testing::Message() << queries << " queries, " << heads << " heads, round " << round);
    check(positions, merged, make(heads, splits, positions, merged));
  }
  // A step with no absorbed queries (a prefill through the expanded path), after all of those: an
  // empty plan that fits its empty launch.
  const kernels::MlaDecodeShape empty = kernels::MlaDecodeShapeFor(0, 16, 1, kResident, 1024, false);
  EXPECT_FALSE(planner.Choose(empty, nullptr, false));
  EXPECT_TRUE(planner.Write(empty, nullptr, nullptr, nullptr, nullptr));
}

TEST(MlaDecodeTest, ValueWeightsAppliedInTheMerge) {
  COHORT_SKIP_WITHOUT_GPU();
  RunMlaCase({512, 64, 16, 64, 32, {1023, 0, 300}, 128});
  RunMlaCase({512, 64, 20, 16, 64, {4095, 17}, 40});  // a partial last block of outputs
  RunMlaCase({64, 16, 4, 5, 4, {1, 77, 300}, 16});
  RunMlaCase({64, 16, 4, 5, 16, {1, 77, 300}, 16});
  RunMlaCase({32, 8, 4, 3, 3, {0, 2, 95}, 8});
}

// The engine's order: the cache write, then the attention, which copies the rows of earlier steps
// before it waits for the write. One token a sequence (decode steps) and several (a chunk of a
// prompt attended in the absorbed form), with one split and many.
TEST(MlaDecodeTest, RowsOfThisStepAreCopiedAfterTheKernelThatWritesThem) {
  COHORT_SKIP_WITHOUT_GPU();
  // Query 0's newest rows are in the first tile (32 tokens) of a split, the one copied early.
  RunMlaCase({512, 64, 16, 64, 1, {20, 1024, 0}, 0, /*step_tokens=*/1});
  RunMlaCase({512, 64, 16, 64, 32, {1024, 4095, 63, 0}, 128, /*step_tokens=*/1});
  RunMlaCase({512, 64, 16, 16, 64, {2052, 4095, 40, 3}, 0, /*step_tokens=*/5});
  RunMlaCase({64, 16, 4, 5, 4, {77, 1, 300}, 16, /*step_tokens=*/3});
}

TEST(MlaDecodeTest, SmallTestShapesWithOddBlocks) {
  COHORT_SKIP_WITHOUT_GPU();
  RunMlaCase({32, 8, 4, 3, 1, {0, 2, 3, 40, 95}});
  RunMlaCase({64, 16, 4, 5, 4, {1, 77, 300}});
  RunMlaCase({64, 16, 4, 5, 64, {1, 77, 300}});  // 192 blocks
}

TEST(MlaDecodeTest, UnsupportedShapeIsRefused) {
  COHORT_SKIP_WITHOUT_GPU();
  kernels::MlaDecodeParams p;
  p.shape = kernels::MlaDecodeShapeFor(1, 16, 1, 264, 0, /*uneven=*/false);  // no merge: only the latent shape is wrong
  DeviceVector<kernels::MlaWorkItem> work(std::vector<kernels::MlaWorkItem>(p.shape.work_slots));
  p.work = work.get();
  p.block_size = 16;
  p.kv_lora_rank = 256;
  p.rope_dim = 64;
  EXPECT_EQ(kernels::LaunchMlaDecode(p, nullptr), cudaErrorInvalidValue);
}

TEST(PrefillAttentionTest, GatherCacheFollowsTheBlockTable) {
  COHORT_SKIP_WITHOUT_GPU();
  std::mt19937 rng = testing::FreshRng();
  const int width = 576, block_size = 16, length = 70, blocks = 9;
  const std::vector<uint16_t> cache = RandomBf16(static_cast<size_t>(blocks) * block_size * width, rng);
  std::vector<int32_t> table = {7, 2, 8, 0, 5};
  DeviceVector<uint16_t> d_cache(cache), d_out(static_cast<size_t>(length) * width);
  DeviceVector<int32_t> d_table(table);
  ASSERT_CUDA_OK(kernels::LaunchGatherCache(Bf16(d_cache), d_table.get(), block_size, width, length, Bf16(d_out), nullptr));
  const std::vector<uint16_t> out = d_out.ToHost();
  for (int pos = 0; pos < length; ++pos) {
    const size_t slot = static_cast<size_t>(table[pos / block_size]) * block_size + pos % block_size;
    ASSERT_TRUE(std::equal(out.begin() + pos * width, out.begin() + (pos + 1) * width, cache.begin() + slot * width))
        << "position " << pos;
  }
}

struct FlashChunkShape {
  int queries, first_position;
  int extra_keys = 0;  // keys past the chunk's last position (masked by causality)
};

struct FlashCase {
  int heads, nope, rope, v;
  std::vector<FlashChunkShape> chunks;  // in one launch
  int check_every = 1;                  // query rows compared with the reference (each chunk's first)
};

// The chunks of one launch against a float64 reference, with the engine's layouts: queries [rows,
// heads, nope + rope] with a gap after each row, every chunk's rows after the last one's; expanded
// keys [keys, heads, nope] and rope keys at column `rank` of the gathered [keys, rank + rope] latent
// rows, every chunk's context from the first multiple of 8 rows after the last one's; values
// transposed [heads, v, ld] with NaN in each row's columns past the last chunk's keys (the kernel
// must not read them). The output has a gap after each head, which must keep its poison.
void RunFlashCase(const FlashCase& c) {
  std::mt19937 rng = testing::FreshRng();
  std::vector<kernels::FlashChunk> chunks;
  int rows = 0, keys = 0;
  for (const FlashChunkShape& s : c.chunks) {
    const int context = s.first_position + s.queries + s.extra_keys;
    keys = (keys + 7) / 8 * 8;  // each chunk's keys from a multiple of 8 rows
    chunks.push_back({rows, s.queries, s.first_position, keys, context});
    rows += s.queries;
    keys += context;
  }
  const int qk = c.nope + c.rope, rank = 32;
  const int64_t q_row = c.heads * qk + 8, k_row = c.heads * c.nope, width = rank + c.rope;
  const int64_t ld = (keys + 7) / 8 * 8 + 8, out_head = c.v + 8, out_row = c.heads * out_head;
  const std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(rows) * q_row, rng);
  const std::vector<uint16_t> k = RandomBf16(static_cast<size_t>(keys) * k_row, rng);
  const std::vector<uint16_t> latent = RandomBf16(static_cast<size_t>(keys) * width, rng);
  std::vector<uint16_t> v_t = RandomBf16(static_cast<size_t>(c.heads) * c.v * ld, rng);
  for (size_t row = 0; row < static_cast<size_t>(c.heads) * c.v; ++row) {
    std::fill(v_t.begin() + row * ld + keys, v_t.begin() + (row + 1) * ld, uint16_t{0x7fc0});  // NaN
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(qk)) * 2.0f;  // peaked enough that masking matters
  DeviceVector<uint16_t> d_q(q), d_k(k), d_latent(latent), d_v_t(v_t);
  DeviceVector<uint16_t> d_out(static_cast<size_t>(rows) * out_row);

  kernels::FlashPrefillParams p;
  p.q = Bf16(d_q);
  p.q_row_stride = q_row;
  p.q_head_stride = qk;
  p.k = Bf16(d_k);
  p.k_row_stride = k_row;
  p.k_head_stride = c.nope;
  p.k_rope = Bf16(d_latent) + rank;
  p.k_rope_row_stride = width;
  p.v_t = Bf16(d_v_t);
  p.v_t_head_stride = c.v * ld;
  p.v_t_row_stride = ld;
  p.out = Bf16(d_out);
  p.out_row_stride = out_row;
  p.out_head_stride = out_head;
  p.chunks = chunks.data();
  p.num_chunks = static_cast<int>(chunks.size());
  p.heads = c.heads;
  p.nope = c.nope;
  p.rope = c.rope;
  p.v_dim = c.v;
  p.softmax_scale = scale;
  ASSERT_TRUE(kernels::FlashPrefillSupports(c.nope, c.rope, c.v));
  ASSERT_CUDA_OK(kernels::LaunchFlashPrefill(p, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  const std::vector<uint16_t> out = d_out.ToHost();

  auto value = [](const std::vector<uint16_t>& v, size_t i) { return static_cast<double>(BF16ToFloat(v[i])); };
  for (const kernels::FlashChunk& chunk : chunks) {
    for (int r = 0; r < chunk.queries; r += c.check_every) {
      const int64_t row = chunk.first_query + r;
      const int visible = std::min(chunk.keys, chunk.first_position + r + 1);
      std::vector<double> ref;
      std::vector<float> got;
      for (int h = 0; h < c.heads; ++h) {
        std::vector<double> w(visible);
        double max = -INFINITY, sum = 0;
        for (int j = 0; j < visible; ++j) {
          const int64_t key = chunk.first_key + j;
          double s = 0;
          for (int i = 0; i < c.nope; ++i) {
            s += value(q, row * q_row + h * qk + i) * value(k, key * k_row + h * c.nope + i);
          }
          for (int i = 0; i < c.rope; ++i) {
            s += value(q, row * q_row + h * qk + c.nope + i) * value(latent, key * width + rank + i);
          }
          w[j] = s * scale;
          max = std::max(max, w[j]);
        }
        for (double& x : w) sum += (x = std::exp(x - max));
        for (int i = 0; i < c.v; ++i) {
          double o = 0;
          for (int j = 0; j < visible; ++j) {
            o += w[j] / sum * value(v_t, (static_cast<int64_t>(h) * c.v + i) * ld + chunk.first_key + j);
          }
          ref.push_back(o);
          got.push_back(BF16ToFloat(out[row * out_row + h * out_head + i]));
        }
        for (int i = c.v; i < out_head; ++i) {
          ASSERT_EQ(out[row * out_row + h * out_head + i], 0xffff) << "the gap after head " << h << " was written";
        }
      }
      ASSERT_LT(RelativeError(ref, got), 1e-2) << "heads " << c.heads << " nope " << c.nope << " rope " << c.rope
                                               << " v " << c.v << ": query " << r << " at position "
                                               << chunk.first_position + r << " of the chunk at row "
                                               << chunk.first_query;
    }
  }
}

// Heads of 192 query values in whole blocks of 64 (DeepSeek's): the producer-warp kernel, whose
// copies (TMA) fill what lies past the last chunk's keys and v_dim with zeros.
TEST(PrefillAttentionTest, FlashMatchesCpuOnDeepseekHeads) {
  COHORT_SKIP_WITHOUT_GPU();
  RunFlashCase({3, 128, 64, 128, {{100, 0}}});    // a first chunk: the diagonal tiles
  RunFlashCase({2, 128, 64, 128, {{70, 200}}});   // a chunk at the end of a longer context
  RunFlashCase({2, 128, 64, 128, {{1, 517}}});    // one query
  RunFlashCase({2, 128, 64, 128, {{129, 63, 40}}});  // keys past the chunk, tiles that straddle it
  RunFlashCase({2, 128, 64, 128, {{300, 900}}});  // 19 key tiles: the ring of stages wraps four times
  RunFlashCase({2, 192, 0, 128, {{70, 10}}});     // no rope part
  RunFlashCase({2, 128, 64, 72, {{90, 30}}});     // values narrower than 128
}

// Several chunks in one launch, as a prefill step of several sequences runs them: each attends only
// to its own keys, though its last key tile reaches into the next chunk's.
TEST(PrefillAttentionTest, FlashTakesSeveralChunksInOneLaunch) {
  COHORT_SKIP_WITHOUT_GPU();
  RunFlashCase({2, 128, 64, 128, {{100, 0}, {70, 200}, {1, 517}, {129, 63, 40}, {0, 5}, {64, 0}}});
  FlashCase many{2, 128, 64, 128, {}};  // more chunks than one launch takes
  for (int i = 0; i < 40; ++i) many.chunks.push_back({1 + 7 * i % 150, 11 * i % 90});
  RunFlashCase(many);
  // More query tiles than one launch takes (every 257th row checked): the longest first in each.
  RunFlashCase({1, 128, 64, 128, {{30000, 0}, {20000, 4000}, {16000, 100}}, 257});
}

// Any other head: the kernel that copies with cp.async, one launch a chunk.
TEST(PrefillAttentionTest, FlashMatchesCpuOnSmallAndPaddedHeads) {
  COHORT_SKIP_WITHOUT_GPU();
  RunFlashCase({4, 16, 8, 16, {{37, 5}}});    // the test fixtures' heads: one block of 64 query values
  RunFlashCase({4, 16, 8, 16, {{200, 0}}});
  RunFlashCase({3, 32, 16, 32, {{65, 10}}});  // 48 query values padded to 64
  RunFlashCase({2, 64, 16, 64, {{130, 7}, {20, 40, 3}}});  // 80 query values padded to 192; two chunks
  RunFlashCase({2, 120, 0, 8, {{64, 64}}});   // no rope part, the narrowest values
}

TEST(PrefillAttentionTest, FlashRefusesHeadsItCannotTake) {
  COHORT_SKIP_WITHOUT_GPU();
  EXPECT_FALSE(kernels::FlashPrefillSupports(12, 8, 16));   // not whole 16-byte chunks
  EXPECT_FALSE(kernels::FlashPrefillSupports(192, 64, 128));  // more than 192 query values a head
  EXPECT_FALSE(kernels::FlashPrefillSupports(128, 64, 136));
  kernels::FlashChunk chunk{0, 1, 0, 0, 1};
  kernels::FlashPrefillParams p;
  p.chunks = &chunk;
  p.num_chunks = 1;
  p.heads = 1;
  p.nope = 12;
  p.rope = 8;
  p.v_dim = 16;
  EXPECT_EQ(kernels::LaunchFlashPrefill(p, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace cohort
