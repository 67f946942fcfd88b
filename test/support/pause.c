/* The one program of the test node's images (the sandbox "pause" image and the workload): prints
 * its arguments on one line, so that `kubectl logs` has something to show, then waits for a
 * signal and reaps children, as Kubernetes' pause does. With LISTEN_PORT set in its environment it
 * also answers every TCP connection on that port (all addresses) with the same line, then closes
 * it: a Pod's network (Pod IP, hostPort, Service) can be checked without any other program.
 * Built with `gcc -static` at test time, so the images need no download. */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  static char line[4096];
  size_t used = 0;
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (int i = 1; i < argc; i++) {
    int n = snprintf(line + used, sizeof line - used, "%s%s", argv[i], i + 1 < argc ? " " : "\n");
    if (n > 0 && (size_t)n < sizeof line - used) used += (size_t)n;
  }
  fputs(line, stdout);
  fflush(stdout);
  const char *port = getenv("LISTEN_PORT");
  if (port != NULL && *port != '\0') {
    int server = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(port));
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (server < 0 || bind(server, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(server, 16) != 0) {
      perror("listen");
      return 1;
    }
    for (;;) {
      int client = accept(server, NULL, NULL);
      if (client < 0) continue;
      ssize_t written = write(client, line, used);
      (void)written;
      close(client);
    }
  }
  for (;;) pause();
  return 0;
}
