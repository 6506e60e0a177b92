// Notices an HTTP client that hung up while its request is still generating, so that the request
// can be cancelled and the worker frees its KV blocks. cpp-httplib 0.11 neither tells handlers
// about it nor hands them the socket, so the socket is found among the process's descriptors by
// its addresses (a TCP connection's local and peer address pair is unique while it is open).
//
// Only valid while the handler of that connection runs (cpp-httplib closes the socket after it):
// use it from the handler or its content provider, never from a later callback. Nothing is read
// from or written to the socket.
#pragma once

#include <string>

namespace cohort {

class ClientSocket {
 public:
  // The connected socket whose local port is `local_port` and whose peer is `peer_ip`:`peer_port`
  // (numeric host, as cpp-httplib reports it). Not found (no socket watched) when it is not open.
  static ClientSocket Find(const std::string& peer_ip, int peer_port, int local_port);

  bool found() const { return fd_ >= 0; }
  // True once the client closed its side or reset the connection. False when not found.
  bool HungUp() const;

 private:
  explicit ClientSocket(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace cohort
