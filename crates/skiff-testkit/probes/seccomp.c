/* A probe for the container's seccomp filter: makes each system call that Docker's
 * default profile denies, and a few that every workload needs, and prints one line per
 * call: "<name> ok" or "<name> errno <n>". Built static by the tests (gcc -static), run
 * inside a container of a busybox image. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long r) {
    if (r < 0)
        printf("%s errno %d\n", name, errno);
    else
        printf("%s ok\n", name);
    fflush(stdout);
}

int main(void) {
    unsigned char params[120];
    memset(params, 0, sizeof params);
    /* Denied by the profile. */
    report("io_uring_setup", syscall(__NR_io_uring_setup, 1, params));
    report("socket_af_vsock", socket(40, SOCK_STREAM, 0));
    report("socket_af_alg", socket(38, SOCK_SEQPACKET, 0));
    report("personality_read_implies_exec", personality(0x0400000));
    report("fanotify_init", syscall(__NR_fanotify_init, 0x00000200 /* FAN_REPORT_FID */, 0));
    /* lsm_list_modules (Linux 6.8, number 461 on x86-64 and arm64): newer than the
     * profile's list, as every call added to future kernels. */
    unsigned long long ids[64];
    unsigned int size = sizeof ids;
    report("lsm_list_modules", syscall(461, ids, &size, 0));
    report("unshare_user", syscall(__NR_unshare, 0x10000000 /* CLONE_NEWUSER */));
    /* Allowed: what every workload does. */
    report("getpid", getpid());
    report("socket_af_inet", socket(AF_INET, SOCK_STREAM, 0));
    report("personality_query", personality(0xffffffff));
    pid_t child = fork();
    if (child == 0)
        _exit(7);
    int status = 0;
    report("fork_wait", child > 0 && waitpid(child, &status, 0) == child && WEXITSTATUS(status) == 7 ? 0 : -1);
    FILE *f = fopen("/tmp/probe.out", "w");
    report("write_tmp", f && fputs("x", f) >= 0 && fclose(f) == 0 ? 0 : -1);
    return 0;
}
