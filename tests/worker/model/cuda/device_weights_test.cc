// Which experts each GPU holds when a worker spreads a model over several (device_weights.h's
// ExpertShard): every expert on exactly one GPU, the routed ones in runs as even as they go.
#include "worker/model/cuda/device_weights.h"

#include <vector>

#include "gtest/gtest.h"

namespace cohort::cuda {
namespace {

ModelConfig Experts(int64_t routed, int64_t shared) {
  ModelConfig c;
  c.n_routed_experts = routed;
  c.n_shared_experts = shared;
  return c;
}

TEST(ExpertShardTest, EveryExpertLivesOnExactlyOneGpuInEvenRuns) {
  for (const auto& [routed, shared] : std::vector<std::pair<int64_t, int64_t>>{{256, 1}, {64, 2}, {160, 2}, {8, 2}}) {
    for (int world : {1, 2, 3, 4, 8}) {
      SCOPED_TRACE(::testing::Message() << routed << " routed, " << shared << " shared, " << world << " GPUs");
      std::vector<int> routed_on(routed, 0), shared_on(shared, 0);
      int32_t next_first = 0;
      for (int rank = 0; rank < world; ++rank) {
        const ExpertShard shard = ExpertShard::Of(Experts(routed, shared), rank, world);
        EXPECT_EQ(shard.first_routed, next_first) << "GPU " << rank << "'s run follows the one before";
        EXPECT_GE(shard.num_routed, routed / world);
        EXPECT_LE(shard.num_routed, routed / world + 1);
        next_first = shard.first_routed + shard.num_routed;
        for (int32_t e = shard.first_routed; e < next_first; ++e) ++routed_on[e];
        for (int32_t s : shard.shared) {
          EXPECT_EQ(s % world, rank) << "shared expert " << s << " is dealt round-robin";
          ++shared_on[s];
        }
        EXPECT_EQ(shard.num_experts(), shard.num_routed + shard.num_shared());
      }
      EXPECT_EQ(next_first, routed);
      for (int e = 0; e < routed; ++e) EXPECT_EQ(routed_on[e], 1) << "routed expert " << e;
      for (int s = 0; s < shared; ++s) EXPECT_EQ(shared_on[s], 1) << "shared expert " << s;
    }
  }
}

TEST(ExpertShardTest, OneGpuHoldsEverything) {
  const ExpertShard shard = ExpertShard::Of(Experts(64, 2), 0, 1);
  EXPECT_EQ(shard.first_routed, 0);
  EXPECT_EQ(shard.num_routed, 64);
  EXPECT_EQ(shard.shared, (std::vector<int32_t>{0, 1}));
}

}  // namespace
}  // namespace cohort::cuda
