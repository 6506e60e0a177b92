#include "router/pool/worker_pool.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netdb.h>

#include <fstream>
#include <sstream>

#include "common/block_hash.h"
#include "spdlog/spdlog.h"

namespace cohort {

using cohort::worker::v1::LoadReport;
using cohort::worker::v1::Worker;
using ProtoEvent = cohort::worker::v1::PrefixCacheEvent;
using Clock = std::chrono::steady_clock;

struct WorkerPool::Member {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::shared_ptr<Worker::Stub> stub;
  std::thread thread;
  std::atomic<bool> stop{false};
  std::mutex context_mu;                  // guards `context` (cancelled from Stop)
  grpc::ClientContext* context = nullptr;

  // Guarded by the pool's mu_.
  bool connected = false;
  LoadReport report;
  std::unordered_set<uint64_t> cached_hashes;
  uint64_t last_event_id = 0;
  uint32_t dispatched_since_report = 0;
  int consecutive_failures = 0;
  Clock::time_point ejected_until{};
};

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Start() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& address : options_.addresses) AddMember(address);
  }
  if (!options_.dns_target.empty()) discovery_ = std::thread([this] { Discover(); });
}

void WorkerPool::Stop() {
  stopping_.store(true);
  changed_.notify_all();
  if (discovery_.joinable()) discovery_.join();
  std::map<std::string, std::shared_ptr<Member>> members;
  {
    std::lock_guard<std::mutex> lock(mu_);
    members.swap(members_);
  }
  for (auto& [address, m] : members) m->stop.store(true);
  changed_.notify_all();  // wakes members sleeping out a reconnection backoff
  for (auto& [address, m] : members) {
    {
      std::lock_guard<std::mutex> lock(m->context_mu);
      if (m->context != nullptr) m->context->TryCancel();
    }
    if (m->thread.joinable()) m->thread.join();
  }
}

void WorkerPool::AddMember(const std::string& address) {
  if (members_.count(address) != 0) return;
  auto m = std::make_shared<Member>();
  m->address = address;
  m->channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  m->stub = std::shared_ptr<Worker::Stub>(Worker::NewStub(m->channel));
  Member* raw = m.get();
  members_.emplace(address, m);
  m->thread = std::thread([this, raw] { Subscribe(raw); });
  spdlog::info("worker {} added", address);
}

void WorkerPool::Changed() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++generation_;
  }
  changed_.notify_all();
}

// Keeps the worker's load stream open. Each (re)connection asks for a full snapshot of the prefix
// cache, so nothing from before (or from a previous run of the worker) can linger.
void WorkerPool::Subscribe(Member* m) {
  auto backoff = std::chrono::milliseconds(100);
  while (!m->stop.load()) {
    grpc::ClientContext context;
    {
      std::lock_guard<std::mutex> lock(m->context_mu);
      if (m->stop.load()) break;
      m->context = &context;
    }
    auto reader = m->stub->StreamLoad(&context, {});
    LoadReport report;
    bool resync = false;
    while (!resync && reader->Read(&report)) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!m->connected) spdlog::info("worker {} connected: model '{}'", m->address, report.model());
        m->connected = true;
        for (const ProtoEvent& e : report.prefix_cache_events()) {
          if (e.kind() == ProtoEvent::KIND_CLEARED) {
            m->cached_hashes.clear();
          } else if (e.event_id() != m->last_event_id + 1 && e.event_id() != m->last_event_id) {
            resync = true;  // a gap: reconnect for a fresh snapshot
            break;
          } else if (e.kind() == ProtoEvent::KIND_ADDED) {
            m->cached_hashes.insert(e.block_hashes().begin(), e.block_hashes().end());
          } else {
            for (uint64_t h : e.block_hashes()) m->cached_hashes.erase(h);
          }
          m->last_event_id = e.event_id();
        }
        report.clear_prefix_cache_events();
        m->report = std::move(report);
        m->dispatched_since_report = 0;
        ++generation_;
      }
      changed_.notify_all();
      backoff = std::chrono::milliseconds(100);
    }
    if (resync) context.TryCancel();
    const grpc::Status status = reader->Finish();
    {
      std::lock_guard<std::mutex> lock(m->context_mu);
      m->context = nullptr;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (m->connected) spdlog::warn("worker {} load stream lost: {}", m->address, status.error_message());
      m->connected = false;
      m->cached_hashes.clear();
      m->last_event_id = 0;
    }
    Changed();
    if (resync) continue;
    // Sleep for the backoff, waking early on Stop.
    std::unique_lock<std::mutex> lock(mu_);
    changed_.wait_for(lock, backoff, [&] { return m->stop.load() || stopping_.load(); });
    backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
  }
}

std::vector<WorkerChoice> WorkerPool::Candidates(const std::string& model, std::span<const int32_t> prompt,
                                                 const std::set<std::string>& exclude) const {
  std::vector<WorkerChoice> out;
  std::map<uint32_t, std::vector<uint64_t>> hashes_by_block_size;
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [address, m] : members_) {
    const LoadReport& r = m->report;
    if (!m->connected || r.state() != cohort::worker::v1::WORKER_STATE_READY || m->ejected_until > now ||
        exclude.count(address) != 0 || (!model.empty() && r.model() != model)) {
      continue;
    }
    WorkerChoice c;
    c.address = address;
    c.stub = m->stub;
    c.block_size = std::max<uint32_t>(r.kv_block_size_tokens(), 1);
    c.load = {r.running_requests(), r.waiting_requests(), r.tokens_in_flight(), r.max_batch_tokens(),
              r.free_kv_blocks(), r.total_kv_blocks(), m->dispatched_since_report, 0};
    auto& hashes = hashes_by_block_size[c.block_size];
    if (hashes.empty()) ExtendBlockHashes(prompt, c.block_size, hashes);
    while (c.load.cached_prefix_blocks < static_cast<int64_t>(hashes.size()) &&
           m->cached_hashes.count(hashes[c.load.cached_prefix_blocks]) != 0) {
      ++c.load.cached_prefix_blocks;
    }
    out.push_back(std::move(c));
  }
  return out;
}

std::set<std::string> WorkerPool::Models() const {
  std::set<std::string> models;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [address, m] : members_) {
    if (m->connected && !m->report.model().empty()) models.insert(m->report.model());
  }
  return models;
}

std::vector<WorkerStatus> WorkerPool::Statuses() const {
  std::vector<WorkerStatus> out;
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [address, m] : members_) {
    out.push_back({address, m->report.model(), m->connected,
                   m->connected && m->report.state() == cohort::worker::v1::WORKER_STATE_READY,
                   m->ejected_until > now, m->report});
  }
  return out;
}

void WorkerPool::OnDispatched(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = members_.find(address); it != members_.end()) ++it->second->dispatched_since_report;
}

void WorkerPool::OnCallEnded(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = members_.find(address); it != members_.end() && it->second->dispatched_since_report > 0) {
    --it->second->dispatched_since_report;
  }
}

void WorkerPool::OnCallSucceeded(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = members_.find(address); it != members_.end()) it->second->consecutive_failures = 0;
}

bool WorkerPool::OnCallFailed(const std::string& address) {
  bool ejected = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = members_.find(address);
    if (it == members_.end()) return false;
    Member& m = *it->second;
    if (++m.consecutive_failures >= options_.eject_after_failures) {
      m.ejected_until = Clock::now() + options_.ejection;
      m.consecutive_failures = 0;
      ejected = true;
      spdlog::warn("worker {} ejected for {} ms after {} consecutive failures", address, options_.ejection.count(),
                   options_.eject_after_failures);
    }
    ++generation_;
  }
  changed_.notify_all();
  return ejected;
}

void WorkerPool::WaitForChange(Clock::time_point deadline) const {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t seen = generation_;
  changed_.wait_until(lock, deadline, [&] { return generation_ != seen || stopping_.load(); });
}

void WorkerPool::Discover() {
  while (!stopping_.load()) {
    std::vector<std::string> found = ResolveTarget(options_.dns_target, options_.hosts_file);
    std::vector<std::shared_ptr<Member>> removed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::set<std::string> wanted(found.begin(), found.end());
      wanted.insert(options_.addresses.begin(), options_.addresses.end());
      for (const std::string& address : found) AddMember(address);
      for (auto it = members_.begin(); it != members_.end();) {
        if (wanted.count(it->first) == 0) {
          spdlog::info("worker {} no longer resolves; removed", it->first);
          removed.push_back(it->second);
          it = members_.erase(it);
        } else {
          ++it;
        }
      }
      ++generation_;
    }
    for (auto& m : removed) {
      m->stop.store(true);
      {
        std::lock_guard<std::mutex> lock(m->context_mu);
        if (m->context != nullptr) m->context->TryCancel();
      }
      changed_.notify_all();
      if (m->thread.joinable()) m->thread.join();
    }
    std::unique_lock<std::mutex> lock(mu_);
    changed_.wait_for(lock, options_.dns_interval, [&] { return stopping_.load(); });
  }
}

std::vector<std::string> ResolveTarget(const std::string& target, const std::string& hosts_file) {
  const size_t colon = target.rfind(':');
  if (colon == std::string::npos) return {};
  const std::string name = target.substr(0, colon), port = target.substr(colon + 1);
  std::set<std::string> addresses;
  if (!hosts_file.empty()) {
    std::ifstream in(hosts_file);
    for (std::string line; std::getline(in, line);) {
      std::istringstream fields(line.substr(0, line.find('#')));
      std::string ip, host;
      fields >> ip;
      while (fields >> host) {
        if (host == name) addresses.insert(ip + ":" + port);
      }
    }
  } else {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* result = nullptr;
    if (getaddrinfo(name.c_str(), port.c_str(), &hints, &result) == 0) {
      for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, ip, sizeof(ip));
        addresses.insert(std::string(ip) + ":" + port);
      }
      freeaddrinfo(result);
    }
  }
  return {addresses.begin(), addresses.end()};
}

}  // namespace cohort
