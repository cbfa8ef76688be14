/* A static probe the containment tests run inside containers (busybox has no
 * keyctl, no bpf, no open_by_handle_at). Each command prints NAME=RESULT lines,
 * RESULT being "ok" or the errno's name, and exits 0. Mounts target a path that
 * does not exist, so that a probe run on the host by mistake changes nothing.
 *
 *   probe syscalls [PID]  the calls a container must not make (PID: a host process to ptrace)
 *   probe keyread SERIAL  read a key by serial number (a key of the caller's host session)
 *   probe session         the serial of this process's session keyring
 *   probe ids             real and effective uid and the effective capabilities
 *   probe tiocsti FD TEXT push TEXT into the input of the terminal on FD (TIOCSTI)
 *   probe writexec PATH PROGRAM...  open PATH O_WRONLY|O_CLOEXEC, write, exec PROGRAM
 *                         (the close-on-exec flush reaches the filesystem mid-exec)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOWHERE "/nonexistent-strata-probe"

static void report(const char *name, long result) {
    if (result < 0)
        printf("%s=%s\n", name, strerrorname_np(errno));
    else
        printf("%s=ok\n", name);
}

static long unshare_then_mount(void) {
    pid_t pid = fork();
    if (pid == 0) {
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0)
            _exit(errno);
        if (mount("none", NOWHERE, "tmpfs", 0, NULL) < 0)
            _exit(errno);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    errno = WEXITSTATUS(status);
    return errno ? -1 : 0;
}

static long file_handle_open(void) {
    struct { struct file_handle h; unsigned char bytes[128]; } handle;
    int mount_id, root = open("/", O_RDONLY | O_DIRECTORY);
    handle.h.handle_bytes = sizeof handle.bytes;
    if (syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &handle.h, &mount_id, 0) < 0)
        return -1;
    return syscall(SYS_open_by_handle_at, root, &handle.h, O_RDONLY);
}

static int syscalls(pid_t outside) {
    char zeros[256] = {0};
    report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* @s */, 0));
    report("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, -3));
    report("request_key", syscall(SYS_request_key, "user", "probe-missing", NULL, 0));
    report("mount", mount("none", NOWHERE, "tmpfs", 0, NULL));
    report("unshare_user_mount", unshare_then_mount());
    report("bpf", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, zeros, 72));
    report("perf_event_open", syscall(SYS_perf_event_open, zeros, 0, -1, -1, 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("open_by_handle_at", file_handle_open());
    if (outside > 0)
        report("ptrace_outside", ptrace(PTRACE_ATTACH, outside, NULL, NULL));
    return 0;
}

static int keyread(long serial) {
    char buf[256];
    long n = syscall(SYS_keyctl, 11 /* KEYCTL_READ */, serial, buf, sizeof buf - 1);
    if (n < 0) {
        report("keyread", -1);
    } else {
        buf[n < (long)sizeof buf - 1 ? n : (long)sizeof buf - 1] = 0;
        printf("keyread=ok %s\n", buf);
    }
    return 0;
}

static int ids(void) {
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("uid=%d euid=%d\n", getuid(), geteuid());
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7))
            fputs(line, stdout);
    return 0;
}

static int tiocsti(int fd, const char *text) {
    long result = 0;
    for (; *text && result == 0; text++)
        result = ioctl(fd, TIOCSTI, text);
    report("tiocsti", result);
    return 0;
}

static int writexec(const char *path, char **program) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "x", 1) != 1) {
        report("writexec", -1);
        return 1;
    }
    execv(program[0], program);
    report("writexec", -1);
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && !strcmp(argv[1], "syscalls"))
        return syscalls(argc >= 3 ? atoi(argv[2]) : 0);
    if (argc == 3 && !strcmp(argv[1], "keyread"))
        return keyread(atol(argv[2]));
    if (argc == 2 && !strcmp(argv[1], "session")) {
        printf("session=%ld\n", syscall(SYS_keyctl, 0, -3, 0));
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "ids"))
        return ids();
    if (argc >= 4 && !strcmp(argv[1], "writexec"))
        return writexec(argv[2], argv + 3);
    if (argc == 4 && !strcmp(argv[1], "tiocsti"))
        return tiocsti(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: probe syscalls [PID] | keyread SERIAL | session | ids | tiocsti FD TEXT | writexec PATH PROGRAM...\n");
    return 2;
}
