// Client side of Generate streams, for tests that talk to a real worker or router.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/sync_stream.h>

#include <atomic>
#include <vector>

#include "cohort/v1/inference.pb.h"

namespace cohort::testing {

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;  // chunk text, then the final message's
  cohort::v1::Final final;
};

// A greedy request for `max_tokens` tokens that ignores end-of-sequence.
cohort::v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, uint32_t max_tokens);

// Reads a Generate stream to its end. `first_token` (optional) is incremented when the first token
// arrives, so a test can wait until streams are under way.
StreamResult ReadStream(grpc::ClientReaderInterface<cohort::v1::GenerateResponse>& reader,
                        std::atomic<int>* first_token = nullptr);

}  // namespace cohort::testing
