#include "tests/testing/generate_client.h"

namespace cohort::testing {

cohort::v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, uint32_t max_tokens) {
  cohort::v1::GenerateRequest request;
  for (int32_t t : prompt) request.mutable_token_ids()->add_ids(static_cast<uint32_t>(t));
  request.mutable_sampling()->set_temperature(0.0f);
  request.mutable_stopping()->set_max_tokens(max_tokens);
  request.mutable_stopping()->set_ignore_eos(true);
  return request;
}

StreamResult ReadStream(grpc::ClientReaderInterface<cohort::v1::GenerateResponse>& reader,
                        std::atomic<int>* first_token) {
  StreamResult result;
  cohort::v1::GenerateResponse response;
  while (reader.Read(&response)) {
    if (response.has_chunk()) {
      for (uint32_t t : response.chunk().token_ids()) result.tokens.push_back(static_cast<int32_t>(t));
      result.text += response.chunk().text();
      if (first_token != nullptr && !result.tokens.empty() &&
          result.tokens.size() == static_cast<size_t>(response.chunk().token_ids_size())) {
        ++*first_token;
      }
    } else if (response.has_final()) {
      result.final = response.final();
      result.text += response.final().text();
    }
  }
  result.status = reader.Finish();
  return result;
}

}  // namespace cohort::testing
