// A library loaded at run time (dlopen) and the functions bound from it, for the CUDA libraries
// the backend loads only when it needs them (cublas_api.h, nccl_api.h).
//
//   COHORT_ASSIGN_OR_RETURN(SharedLibrary library, SharedLibrary::Open("libfoo.so.1", "cannot load foo"));
//   library.Bind(api.create, "fooCreate");
//   COHORT_RETURN_IF_ERROR(library.missing());  // the first function it lacked, if any
//
// LoadOnce keeps the table of functions so bound for the life of the process.
#pragma once

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace cohort::cuda {

class SharedLibrary {
 public:
  // FailedPrecondition starting with `what` when the library cannot be loaded. The library stays
  // loaded for the life of the process.
  static absl::StatusOr<SharedLibrary> Open(const char* name, const std::string& what) {
    void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) return absl::FailedPreconditionError(absl::StrCat(what, " (", name, "): ", dlerror()));
    return SharedLibrary(name, handle);
  }

  // Sets `function` to the library's `symbol`; if it has none, leaves it null and remembers the
  // first such symbol for missing().
  template <typename Function>
  void Bind(Function& function, const char* symbol) {
    function = reinterpret_cast<Function>(dlsym(handle_, symbol));
    if (function == nullptr && missing_.ok()) {
      missing_ = absl::FailedPreconditionError(absl::StrCat(name_, " has no function ", symbol));
    }
  }
  // Like Bind, for a function that only newer versions of the library have: null when absent.
  template <typename Function>
  void BindOptional(Function& function, const char* symbol) {
    function = reinterpret_cast<Function>(dlsym(handle_, symbol));
  }
  const absl::Status& missing() const { return missing_; }

 private:
  SharedLibrary(const char* name, void* handle) : name_(name), handle_(handle) {}

  const char* name_;
  void* handle_;
  absl::Status missing_;
};

// The process's one Api, made by `open` on first use; every later call returns the same one, or
// the error `open` gave.
template <typename Api>
absl::StatusOr<const Api*> LoadOnce(absl::StatusOr<Api> (*open)()) {
  static std::once_flag once;
  static const Api* api = nullptr;
  static absl::Status error;
  std::call_once(once, [open] {
    absl::StatusOr<Api> opened = open();
    if (opened.ok()) {
      api = new Api(*opened);
    } else {
      error = opened.status();
    }
  });
  if (api == nullptr) return error;
  return api;
}

}  // namespace cohort::cuda
