#include "router/http/client_socket.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cstdlib>

namespace cohort {
namespace {

// The port of `address`, and its numeric host when `ip` is given; -1 for other families.
int PortOf(const sockaddr_storage& address, socklen_t length, std::string* ip) {
  int port = -1;
  if (address.ss_family == AF_INET) {
    port = ntohs(reinterpret_cast<const sockaddr_in&>(address).sin_port);
  } else if (address.ss_family == AF_INET6) {
    port = ntohs(reinterpret_cast<const sockaddr_in6&>(address).sin6_port);
  } else {
    return -1;
  }
  if (ip != nullptr) {
    char host[NI_MAXHOST];
    if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), length, host, sizeof(host), nullptr, 0,
                    NI_NUMERICHOST) != 0) {
      return -1;
    }
    *ip = host;
  }
  return port;
}

}  // namespace

ClientSocket ClientSocket::Find(const std::string& peer_ip, int peer_port, int local_port) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return ClientSocket(-1);
  int found = -1;
  while (const dirent* entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const int fd = std::atoi(entry->d_name);
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISSOCK(info.st_mode)) continue;
    sockaddr_storage address;
    socklen_t length = sizeof(address);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0 ||
        PortOf(address, length, nullptr) != local_port) {
      continue;
    }
    length = sizeof(address);
    std::string ip;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0 ||  // the listening socket
        PortOf(address, length, &ip) != peer_port || ip != peer_ip) {
      continue;
    }
    found = fd;
    break;
  }
  closedir(dir);
  return ClientSocket(found);
}

bool ClientSocket::HungUp() const {
  if (fd_ < 0) return false;
  // POLLRDHUP: the client sent FIN. A client never half-closes while it waits for its answer.
  pollfd p{.fd = fd_, .events = POLLRDHUP, .revents = 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

}  // namespace cohort
