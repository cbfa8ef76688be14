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
 *   probe forkexec PATH PROGRAM...  open PATH O_WRONLY|O_CLOEXEC, write, fork; the child
 *                         writes too and execs PROGRAM while the parent holds the file open;
 *                         the parent writes again after
 *   probe installexec TARGET ARGS...  dpkg's unpack: this binary written to TARGET.dpkg-new,
 *                         fsynced, closed, renamed over TARGET, and TARGET exec'd with ARGS at once
 *   probe threadexec PATH PROGRAM...  a thread writes PATH in a tight loop while the main
 *                         thread execs PROGRAM
 *   probe holdexec PATH ARGS...  open PATH O_WRONLY|O_CLOEXEC, write, print "holding", and on
 *                         SIGUSR1 exec this binary with ARGS from a memfd copy: the exec needs
 *                         nothing from the mount before its close-on-exec flush
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
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

static int forkexec(const char *path, char **program) {
    int fd = open(path, O_WRONLY | O_CLOEXEC), status;
    if (fd < 0 || write(fd, "x", 1) != 1) {
        report("forkexec", -1);
        return 1;
    }
    pid_t child = fork();
    if (child == 0) {
        if (write(fd, "c", 1) != 1)
            _exit(126);
        execv(program[0], program);
        _exit(127);
    }
    if (child < 0 || waitpid(child, &status, 0) < 0 || write(fd, "y", 1) != 1 || close(fd) < 0) {
        report("forkexec", -1);
        return 1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* this binary's bytes copied to fd `out` */
static int copy_self(int out) {
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (in < 0 || fstat(in, &st) < 0)
        return -1;
    for (off_t done = 0; done < st.st_size;) {
        ssize_t n = sendfile(out, in, NULL, st.st_size - done);
        if (n <= 0)
            return -1;
        done += n;
    }
    return close(in);
}

static int installexec(const char *target, char **args, int nargs) {
    char temp[4096], *argv[nargs + 2];
    snprintf(temp, sizeof temp, "%s.dpkg-new", target);
    int fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0755);
    if (fd < 0 || copy_self(fd) < 0 || fsync(fd) < 0 || close(fd) < 0 || rename(temp, target) < 0) {
        report("installexec", -1);
        return 1;
    }
    argv[0] = (char *)target;
    memcpy(argv + 1, args, nargs * sizeof *args);
    argv[nargs + 1] = NULL;
    execv(target, argv);
    report("installexec", -1);
    return 1;
}

static volatile long writes_done;

static void *write_forever(void *fd) {
    char block[4096] = {0};
    for (;;) {
        if (pwrite((int)(long)fd, block, sizeof block, (writes_done % 256) * sizeof block) < 0)
            return NULL;
        __atomic_add_fetch(&writes_done, 1, __ATOMIC_RELAXED);
    }
}

static int threadexec(const char *path, char **program) {
    pthread_t writer;
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || pthread_create(&writer, NULL, write_forever, (void *)(long)fd) != 0) {
        report("threadexec", -1);
        return 1;
    }
    while (__atomic_load_n(&writes_done, __ATOMIC_RELAXED) < 100)  /* the writer is in its stride */
        sched_yield();
    execv(program[0], program);
    report("threadexec", -1);
    return 1;
}

static int holdexec(const char *path, char **args, int nargs) {
    char *argv[nargs + 2];
    sigset_t usr1;
    int sig, fd = open(path, O_WRONLY | O_CLOEXEC), copy = memfd_create("probe", MFD_CLOEXEC);
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    if (fd < 0 || write(fd, "x", 1) != 1 || copy < 0 || copy_self(copy) < 0 ||
            sigprocmask(SIG_BLOCK, &usr1, NULL) < 0) {
        report("holdexec", -1);
        return 1;
    }
    puts("holding");
    sigwait(&usr1, &sig);
    argv[0] = "probe";
    memcpy(argv + 1, args, nargs * sizeof *args);
    argv[nargs + 1] = NULL;
    sigprocmask(SIG_UNBLOCK, &usr1, NULL);
    fexecve(copy, argv, environ);
    report("holdexec", -1);
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
    if (argc >= 4 && !strcmp(argv[1], "forkexec"))
        return forkexec(argv[2], argv + 3);
    if (argc >= 3 && !strcmp(argv[1], "installexec"))
        return installexec(argv[2], argv + 3, argc - 3);
    if (argc >= 4 && !strcmp(argv[1], "threadexec"))
        return threadexec(argv[2], argv + 3);
    if (argc >= 3 && !strcmp(argv[1], "holdexec"))
        return holdexec(argv[2], argv + 3, argc - 3);
    if (argc == 4 && !strcmp(argv[1], "tiocsti"))
        return tiocsti(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: probe syscalls [PID] | keyread SERIAL | session | ids | tiocsti FD TEXT | writexec PATH PROGRAM...\n"
            "       | forkexec PATH PROGRAM... | installexec TARGET ARGS... | threadexec PATH PROGRAM...\n"
            "       | holdexec PATH ARGS...\n");
    return 2;
}
