#include "worker/model/config.h"

#include <initializer_list>
#include <string>

#include "gtest/gtest.h"
#include "tests/testing/status.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"

namespace cohort {
namespace {

using nlohmann::json;

using testing::MessageHas;

// config.json of deepseek-ai/DeepSeek-V3 as published (minus its fp8 quantization_config).
json DeepSeekV3() {
  return json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true,
    "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 129280
  })");
}

// deepseek-ai/DeepSeek-V2-Lite, with scoring_func left out to exercise the V2 default.
json DeepSeekV2Lite() {
  return json::parse(R"({
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": null,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "seq_aux": true, "tie_word_embeddings": false,
    "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400
  })");
}

absl::StatusOr<ModelConfig> Parse(const json& config) { return ParseModelConfig(config.dump(), "test/config.json"); }

// Expects ParseModelConfig to fail with InvalidArgument naming the source and every one of `parts`.
void ExpectInvalid(const json& config, std::initializer_list<std::string> parts) {
  auto result = Parse(config);
  ASSERT_FALSE(result.ok()) << config.dump();
  EXPECT_TRUE(absl::IsInvalidArgument(result.status())) << result.status();
  EXPECT_TRUE(MessageHas(result.status(), {"test/config.json"}));
  EXPECT_TRUE(MessageHas(result.status(), parts));
}

TEST(ModelConfigTest, ParsesPublishedDeepSeekV3) {
  auto parsed = Parse(DeepSeekV3());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const ModelConfig& c = *parsed;
  EXPECT_EQ(c.architecture, Architecture::kDeepseekV3);
  EXPECT_EQ(c.architecture_name, "DeepseekV3ForCausalLM");
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_layers, 61);
  EXPECT_EQ(c.num_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.kv_cache_width(), 576);
  EXPECT_EQ(c.max_position_embeddings, 163840);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_EQ(c.moe_layer_freq, 1);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.topk_method, TopkMethod::kNoAuxTc);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 1);

  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_TRUE(c.rope.yarn);
  EXPECT_DOUBLE_EQ(c.rope.factor, 40.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.rope.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c.rope.mscale, 1.0);
  EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, 1.0);
  EXPECT_FALSE(c.rope.attention_factor.has_value());

  EXPECT_FALSE(c.IsMoeLayer(0));
  EXPECT_FALSE(c.IsMoeLayer(1));
  EXPECT_FALSE(c.IsMoeLayer(2));
  EXPECT_TRUE(c.IsMoeLayer(3));
  EXPECT_TRUE(c.IsMoeLayer(60));
}

TEST(ModelConfigTest, ParsesDeepSeekV2Lite) {
  auto parsed = Parse(DeepSeekV2Lite());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const ModelConfig& c = *parsed;
  EXPECT_EQ(c.architecture, Architecture::kDeepseekV2);
  EXPECT_EQ(c.q_lora_rank, 0);  // null: plain q_proj
  EXPECT_EQ(c.num_layers, 27);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_heads, 16);
  EXPECT_EQ(c.vocab_size, 102400);
  EXPECT_EQ(c.intermediate_size, 10944);
  EXPECT_EQ(c.moe_intermediate_size, 1408);
  EXPECT_EQ(c.n_routed_experts, 64);
  EXPECT_EQ(c.num_experts_per_tok, 6);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.topk_group, 1);
  EXPECT_EQ(c.topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSoftmax);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(c.bos_token_id, 100000);
  EXPECT_EQ(c.eos_token_id, 100001);
  EXPECT_TRUE(c.rope.yarn);
  EXPECT_DOUBLE_EQ(c.rope.factor, 40.0);
  EXPECT_DOUBLE_EQ(c.rope.mscale, 0.707);
  EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, 0.707);
  EXPECT_FALSE(c.IsMoeLayer(0));
  EXPECT_TRUE(c.IsMoeLayer(1));
}

// The published headline numbers: V3 671B total / 37B activated, V2-Lite 15.7B / 2.4B. They are
// rounded; ours leave out V3's multi-token-prediction layer and, for activated, the embedding table.
TEST(ModelConfigTest, ParameterCountsMatchThePublishedModels) {
  auto v3 = Parse(DeepSeekV3());
  ASSERT_TRUE(v3.ok()) << v3.status();
  ParameterCounts c3 = CountParameters(*v3);
  EXPECT_NEAR(c3.total / 1e9, 671, 671 * 0.02);
  EXPECT_NEAR(c3.active_per_token / 1e9, 37, 37 * 0.02);
  auto lite = Parse(DeepSeekV2Lite());
  ASSERT_TRUE(lite.ok()) << lite.status();
  ParameterCounts c2 = CountParameters(*lite);
  EXPECT_NEAR(c2.total / 1e9, 15.7, 15.7 * 0.02);
  EXPECT_NEAR(c2.active_per_token / 1e9, 2.4, 2.4 * 0.05);
}

TEST(ModelConfigTest, V2AlwaysRotatesInterleavedPairs) {
  json config = DeepSeekV2Lite();
  config["rope_interleave"] = false;
  auto parsed = Parse(config);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->rope_interleave);

  json v3 = DeepSeekV3();
  v3["rope_interleave"] = false;
  parsed = Parse(v3);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_FALSE(parsed->rope_interleave);
}

TEST(ModelConfigTest, ReadsTransformers5RopeParameters) {
  json config = DeepSeekV3();
  config.erase("rope_theta");
  config.erase("rope_scaling");
  config["rope_parameters"] = {
      {"rope_type", "yarn"}, {"rope_theta", 50000}, {"factor", 4}, {"original_max_position_embeddings", 64}};
  auto parsed = Parse(config);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_DOUBLE_EQ(parsed->rope.theta, 50000.0);
  EXPECT_TRUE(parsed->rope.yarn);
  EXPECT_DOUBLE_EQ(parsed->rope.factor, 4.0);
  EXPECT_EQ(parsed->rope.original_max_position_embeddings, 64);

  config["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 50000}};
  parsed = Parse(config);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_DOUBLE_EQ(parsed->rope.theta, 50000.0);
  EXPECT_FALSE(parsed->rope.yarn);
}

TEST(ModelConfigTest, NoRopeScalingMeansPlainRope) {
  json config = DeepSeekV3();
  config.erase("rope_scaling");
  config["rope_theta"] = 20000;
  auto parsed = Parse(config);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_FALSE(parsed->rope.yarn);
  EXPECT_DOUBLE_EQ(parsed->rope.theta, 20000.0);
}

TEST(ModelConfigTest, YarnFactorDefaultsToContextRatio) {
  json config = DeepSeekV3();
  config["rope_scaling"].erase("factor");
  auto parsed = Parse(config);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->rope.yarn);
  EXPECT_DOUBLE_EQ(parsed->rope.factor, 163840.0 / 4096.0);
}

TEST(ModelConfigTest, UnknownArchitectureListsSupportedOnes) {
  json config = DeepSeekV3();
  config["architectures"] = {"LlamaForCausalLM"};
  ExpectInvalid(config, {"LlamaForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"});
}

TEST(ModelConfigTest, MissingOrMistypedKeysAreNamed) {
  json config = DeepSeekV3();
  config.erase("hidden_size");
  ExpectInvalid(config, {"hidden_size", "missing"});
  config["hidden_size"] = "7168";
  ExpectInvalid(config, {"hidden_size", "integer"});
  config = DeepSeekV3();
  config.erase("architectures");
  ExpectInvalid(config, {"architectures"});
}

TEST(ModelConfigTest, UnsupportedFeaturesAreRejected) {
  json config = DeepSeekV3();
  config["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  ExpectInvalid(config, {"quantization_config"});

  config = DeepSeekV3();
  config["hidden_act"] = "gelu";
  ExpectInvalid(config, {"hidden_act", "gelu"});

  config = DeepSeekV3();
  config["num_key_value_heads"] = 8;
  ExpectInvalid(config, {"num_key_value_heads", "8", "128"});

  config = DeepSeekV3();
  config["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectInvalid(config, {"rope_scaling", "linear"});
}

TEST(ModelConfigTest, InconsistentExpertGroupsAreRejected) {
  json config = DeepSeekV3();
  config["topk_group"] = 9;
  ExpectInvalid(config, {"topk_group", "9", "n_group", "8"});

  config = DeepSeekV3();
  config["n_routed_experts"] = 250;
  ExpectInvalid(config, {"n_routed_experts", "250", "n_group"});
}

TEST(ModelConfigTest, NotJsonIsRejected) {
  auto parsed = ParseModelConfig("this is not json {", "broken/config.json");
  ASSERT_FALSE(parsed.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(parsed.status())) << parsed.status();
  EXPECT_TRUE(MessageHas(parsed.status(), {"broken/config.json"}));
  EXPECT_FALSE(ParseModelConfig("[1, 2]", "list.json").ok());
}

TEST(LoadModelConfigTest, FolderWithoutConfigIsNotFound) {
  testing::TempDir dir;
  auto loaded = LoadModelConfig(dir.path());
  ASSERT_FALSE(loaded.ok());
  EXPECT_TRUE(absl::IsNotFound(loaded.status())) << loaded.status();
  EXPECT_TRUE(MessageHas(loaded.status(), {dir.path(), "config.json"}));
}

TEST(LoadModelConfigTest, ErrorsNameTheConfigPath) {
  testing::TempDir dir;
  json config = DeepSeekV3();
  config["hidden_act"] = "relu";
  testing::WriteFile(dir.Join("config.json"), config.dump());
  auto loaded = LoadModelConfig(dir.path());
  ASSERT_FALSE(loaded.ok());
  EXPECT_TRUE(MessageHas(loaded.status(), {dir.Join("config.json"), "relu"}));
}

TEST(LoadModelConfigTest, LoadsEveryFixtureAndMatchesItsConfigJson) {
  for (const char* name : {"v3_qlora_yarn", "v3_plain", "v2_lite_like", "v2_group_limited"}) {
    SCOPED_TRACE(name);
    const std::string dir = testing::SourcePath(std::string("tests/fixtures/models/") + name);
    auto loaded = LoadModelConfig(dir);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    const json raw = json::parse(testing::ReadFile(dir + "/config.json"));
    const ModelConfig& c = *loaded;
    EXPECT_EQ(c.architecture_name, raw["architectures"][0].get<std::string>());
    EXPECT_EQ(c.vocab_size, raw["vocab_size"].get<int64_t>());
    EXPECT_EQ(c.hidden_size, raw["hidden_size"].get<int64_t>());
    EXPECT_EQ(c.intermediate_size, raw["intermediate_size"].get<int64_t>());
    EXPECT_EQ(c.moe_intermediate_size, raw["moe_intermediate_size"].get<int64_t>());
    EXPECT_EQ(c.num_layers, raw["num_hidden_layers"].get<int64_t>());
    EXPECT_EQ(c.num_heads, raw["num_attention_heads"].get<int64_t>());
    EXPECT_EQ(c.q_lora_rank, raw["q_lora_rank"].is_null() ? 0 : raw["q_lora_rank"].get<int64_t>());
    EXPECT_EQ(c.kv_lora_rank, raw["kv_lora_rank"].get<int64_t>());
    EXPECT_EQ(c.qk_rope_head_dim, raw["qk_rope_head_dim"].get<int64_t>());
    EXPECT_EQ(c.n_routed_experts, raw["n_routed_experts"].get<int64_t>());
    EXPECT_EQ(c.n_shared_experts, raw["n_shared_experts"].get<int64_t>());
    EXPECT_EQ(c.num_experts_per_tok, raw["num_experts_per_tok"].get<int64_t>());
    EXPECT_EQ(c.first_k_dense_replace, raw["first_k_dense_replace"].get<int64_t>());
    EXPECT_EQ(c.norm_topk_prob, raw["norm_topk_prob"].get<bool>());
    EXPECT_DOUBLE_EQ(c.routed_scaling_factor, raw["routed_scaling_factor"].get<double>());
    EXPECT_EQ(c.rope.yarn, raw.contains("rope_scaling"));
  }
}

TEST(LoadModelConfigTest, FixtureSpotChecks) {
  auto qlora = LoadModelConfig(testing::SourcePath("tests/fixtures/models/v3_qlora_yarn"));
  ASSERT_TRUE(qlora.ok()) << qlora.status();
  EXPECT_EQ(qlora->q_lora_rank, 24);
  EXPECT_TRUE(qlora->rope.yarn);
  EXPECT_DOUBLE_EQ(qlora->rope.mscale_all_dim, 0.8);
  EXPECT_EQ(qlora->n_group, 4);
  EXPECT_EQ(qlora->topk_method, TopkMethod::kNoAuxTc);

  auto plain = LoadModelConfig(testing::SourcePath("tests/fixtures/models/v3_plain"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->rope_interleave);
  EXPECT_DOUBLE_EQ(plain->rope.theta, 50000.0);
  EXPECT_FALSE(plain->rope.yarn);
  EXPECT_EQ(plain->q_lora_rank, 0);

  auto grouped = LoadModelConfig(testing::SourcePath("tests/fixtures/models/v2_group_limited"));
  ASSERT_TRUE(grouped.ok()) << grouped.status();
  EXPECT_EQ(grouped->topk_method, TopkMethod::kGroupLimitedGreedy);
  EXPECT_EQ(grouped->topk_group, 2);
  EXPECT_EQ(grouped->scoring_func, ScoringFunc::kSoftmax);
}

}  // namespace
}  // namespace cohort
