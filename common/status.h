// Status plumbing shared by every module: absl::Status at boundaries, CHECK for broken invariants.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

// Returns early from the enclosing function when `expr` yields a non-OK status.
#define COHORT_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    if (absl::Status _st = (expr); !_st.ok()) {      \
      return _st;                                    \
    }                                                \
  } while (0)

#define COHORT_STATUS_CONCAT_INNER(a, b) a##b
#define COHORT_STATUS_CONCAT(a, b) COHORT_STATUS_CONCAT_INNER(a, b)

// `COHORT_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define COHORT_ASSIGN_OR_RETURN(lhs, expr) \
  COHORT_ASSIGN_OR_RETURN_IMPL(COHORT_STATUS_CONCAT(_statusor_, __LINE__), lhs, expr)
#define COHORT_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()

// Aborts with the failed condition and a message built from the remaining arguments (absl::StrCat).
// For invariants only; errors a user can cause are returned as absl::Status.
#define COHORT_CHECK(cond, ...)                                                             \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s %s\n", __FILE__, __LINE__, #cond,       \
                   absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__).c_str());                    \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)
