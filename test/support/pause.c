/* The one program of the test node's images (the sandbox "pause" image and the workload): prints
 * its arguments on one line, so that `kubectl logs` has something to show, then waits for a
 * signal and reaps children, as Kubernetes' pause does. Built with `gcc -static` at test time, so
 * the images need no download. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (int i = 1; i < argc; i++) printf("%s%s", argv[i], i + 1 < argc ? " " : "\n");
  fflush(stdout);
  for (;;) pause();
  return 0;
}
