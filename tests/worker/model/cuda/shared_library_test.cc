// How the CUDA backend loads cuBLAS and NCCL at run time (shared_library.h), shown on the C library
// that every machine has: what a missing library or function turns into.
#include "worker/model/cuda/shared_library.h"

#include <cstring>

#include "gtest/gtest.h"

namespace cohort::cuda {
namespace {

TEST(SharedLibraryTest, AMissingLibraryIsOneErrorThatSaysWhatCouldNotLoad) {
  const absl::StatusOr<SharedLibrary> library = SharedLibrary::Open("libcohort-no-such.so.1", "cannot load Foo");
  ASSERT_FALSE(library.ok());
  EXPECT_EQ(library.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(library.status().message().find("cannot load Foo (libcohort-no-such.so.1): "), std::string::npos)
      << library.status();
}

TEST(SharedLibraryTest, BindsFunctionsAndNamesTheFirstOneMissing) {
  absl::StatusOr<SharedLibrary> library = SharedLibrary::Open("libc.so.6", "cannot load the C library");
  ASSERT_TRUE(library.ok()) << library.status();
  decltype(&std::strlen) length = nullptr;
  size_t (*absent)(const char*) = &std::strlen;
  size_t (*optional)(const char*) = &std::strlen;
  library->Bind(length, "strlen");
  ASSERT_NE(length, nullptr);
  EXPECT_EQ(length("cohort"), 6u);
  EXPECT_TRUE(library->missing().ok());
  library->BindOptional(optional, "cohort_no_such_function");
  EXPECT_EQ(optional, nullptr);
  EXPECT_TRUE(library->missing().ok()) << "an optional function may be absent";
  library->Bind(absent, "cohort_no_such_function");
  library->Bind(absent, "cohort_another_missing_one");
  EXPECT_EQ(absent, nullptr);
  EXPECT_EQ(library->missing().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(library->missing().message().find("libc.so.6 has no function cohort_no_such_function"), std::string::npos)
      << library->missing();
}

}  // namespace
}  // namespace cohort::cuda
