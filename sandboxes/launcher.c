/* dorm sandbox launcher: the per-start half of a pre-forked sandbox, for execve() starts.
 *
 * Why C: a pre-forked child used to be a fork of the (Python) fork server. Forking it costs the
 * fork server ~0.5 ms plus a write fault on every page it touches afterwards (the next start's
 * path), its execve() of the tenant had to tear the copied address space down again (0.7-1.0 ms
 * here), and the per-start steps cost ~0.6 ms of interpretation. An idle child that will exec
 * (not call preloaded code) is therefore this static binary, started with posix_spawn (vfork:
 * no copy of the fork server at all) as pid 1 of a fresh pid namespace. It runs the
 * instance-independent steps while idle and, at the request, the rest as plain syscalls.
 *
 * Idle: argv = {"dorm-launcher", "idle", cap_last, sock, mnt, net, ipc, uts, cgroup.procs...}
 * (fd numbers inherited from the fork server; sock is a SOCK_SEQPACKET socket to it). Steps, in
 * the order of docs/sandboxes.md: cgroup join, parent-death signal (+ race check), setns into the
 * pre-built net/ipc/uts/mnt namespaces (nspool.py: static root already pivoted, lo up), procfs of
 * our pid namespace, setsid, empty capability bounding set, default signals; then every other
 * fd is closed, the socket moves to fd 3 and "R" says ready.
 *
 * Per start: one message, the plan (format in launcher.py) plus its fds (SCM_RIGHTS). Steps:
 * stdio, namespaces (egress netns, cgroup ns), mount_instance, chdir, hostname, rlimits, ids,
 * parent_death, capabilities, no_new_privs, seccomp, fds, execve. A failure writes
 * "E<step>\0<errno>\0<message>" to the socket and exits 127; success is the socket closing on
 * exec. An empty message (the fork server closed the socket: pool drained) exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC 4
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x4
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define REPORT 3
#define MAX_MSG (1 << 20)
#define MAX_FDS 16
#define MAX_ITEMS (MAX_MSG / 5) /* a string costs >= 5 bytes: the message bounds any count */
#define OP_MKDIR 0
#define OP_FILE 2
#define OP_TMPFS 4

static unsigned char msg[MAX_MSG];
static const char *step = "plan";
static int report = REPORT;

static void fail(int err, const char *what) {
    char out[512];
    int n = snprintf(out, sizeof out, "E%s%c%d%c%s: %s", step, 0, err, 0, what,
                     err ? strerror(err) : "invalid plan");
    if (n > (int)sizeof out - 1) n = (int)sizeof out - 1;
    if (n > 0 && write(report, out, (size_t)n) < 0) { /* nobody to tell */ }
    _exit(127);
}

/* ---- plan decoding: little-endian integers; strings are u32 length + bytes + NUL ---------- */
static size_t pos, len;

static uint32_t u32(void) {
    if (len - pos < 4) fail(0, "truncated");
    uint32_t v;
    memcpy(&v, msg + pos, 4);
    pos += 4;
    return v;
}

static uint64_t u64(void) {
    if (len - pos < 8) fail(0, "truncated");
    uint64_t v;
    memcpy(&v, msg + pos, 8);
    pos += 8;
    return v;
}

/* A NUL-terminated string in place; *n gets its length. Paths must not contain NUL. */
static const char *str(size_t *n, int path) {
    uint32_t l = u32();
    if (len - pos < (size_t)l + 1 || msg[pos + l] != 0) fail(0, "bad string");
    const char *s = (const char *)msg + pos;
    if (path && strlen(s) != l) fail(0, "NUL in path");
    pos += (size_t)l + 1;
    if (n) *n = l;
    return s;
}

static int nfds;
static int fds[MAX_FDS];

static int fd_at(int32_t idx) {
    if (idx < 0) return -1;
    if (idx >= nfds) fail(0, "fd index out of range");
    return fds[idx];
}

static uint32_t count(void) {
    uint32_t n = u32();
    if (n > MAX_ITEMS) fail(0, "too many items");
    return n;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            fail(errno, "write");
        }
        p += w;
        n -= (size_t)w;
    }
}

static int arg_fd(const char *a) {
    char *end;
    long v = strtol(a, &end, 10);
    if (*a == 0 || *end != 0 || v < 0 || v > 1 << 20) fail(EBADF, "bad fd argument");
    return (int)v;
}

/* The instance-independent steps, before the request (see the header). */
static void idle_steps(int argc, char **argv) {
    step = "namespaces";
    int cap_last = atoi(argv[2]);
    report = arg_fd(argv[3]);
    int ns[4];
    for (int i = 0; i < 4; i++) ns[i] = arg_fd(argv[4 + i]);

    step = "cgroup_join"; /* the slow part of a cgroup move (an RCU grace period) happens here */
    for (int i = 8; i < argc; i++) {
        int fd = arg_fd(argv[i]);
        if (write(fd, "0", 1) != 1) fail(errno, "cgroup.procs");
        close(fd);
    }
    step = "parent_death"; /* the fork server holds the only other end of the socket */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) fail(errno, "PR_SET_PDEATHSIG");
    struct pollfd pfd = {report, POLLOUT, 0};
    if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLERR | POLLHUP))) _exit(0);

    step = "namespaces";
    static const int types[4] = {CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS};
    for (int i = 1; i <= 4; i++) { /* net, ipc, uts, then mnt (it also moves root and cwd) */
        int k = i % 4;
        if (setns(ns[k], types[k]) < 0) fail(errno, "setns");
        close(ns[k]);
    }
    step = "mount_proc"; /* we are pid 1 of our pid namespace: its procfs */
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible") < 0)
        fail(errno, "/proc");

    step = "session";
    if (setsid() < 0) fail(errno, "setsid");
    step = "bounding_set"; /* CAP_SETPCAP needed: before the uid change; effective caps stay */
    for (int cap = 0; cap <= cap_last; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) fail(errno, "PR_CAPBSET_DROP");

    /* Ignored dispositions survive execve: Python's SIGPIPE/SIGXFSZ, and glibc's posix_spawn
     * ignores its internal signals (32, 33) in the child. Every signal back to default, through
     * the raw syscall (glibc's sigaction refuses its internal ones), and none blocked. */
    struct { void *handler; unsigned long flags; void *restorer; unsigned long mask; } dfl = {0};
    for (int sig = 1; sig < 65; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    step = "namespaces"; /* hold nothing of the fork server's but stdio and the socket */
    if (report != REPORT) {
        if (dup2(report, REPORT) < 0) fail(errno, "dup2");
        close(report);
        report = REPORT;
    }
    if (syscall(SYS_close_range, REPORT + 1, ~0U, 0) < 0) {
        for (int fd = REPORT + 1; fd < 1024; fd++) close(fd);
    }
    if (write(REPORT, "R", 1) != 1) _exit(0);
}

/* The environment from an EnvFile memfd ("NAME=value\0" entries), after the n entries the plan
 * carried: read here, in the launcher, so it never passes through the fork server's memory. */
static void load_env(int fd, uint32_t n, char **envs) {
    struct stat st;
    if (fstat(fd, &st) < 0) fail(errno, "env fstat");
    if (st.st_size < 0 || st.st_size > (1 << 24)) fail(E2BIG, "env too large");
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) fail(ENOMEM, "env");
    size_t got = 0;
    while (got < size) {
        ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fail(r < 0 ? errno : EIO, "env read");
        got += (size_t)r;
    }
    buf[size] = 0;
    close(fd);
    for (size_t at = 0; at < size;) {
        size_t entry = strlen(buf + at);
        if (entry && strchr(buf + at, '=')) {
            if (n >= MAX_ITEMS) fail(E2BIG, "env has too many entries");
            envs[n++] = buf + at;
        }
        at += entry + 1;
    }
    envs[n] = NULL;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--check") == 0) {
        puts("dorm-launcher ok");
        return 0;
    }
    if (argc < 8 || strcmp(argv[1], "idle") != 0) return 2;
    idle_steps(argc, argv);

    /* ---- wait for the plan --------------------------------------------------------------- */
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctrl;
    struct iovec iov = {msg, sizeof msg};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctrl.buf;
    mh.msg_controllen = sizeof ctrl.buf;
    ssize_t got;
    do got = recvmsg(REPORT, &mh, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got <= 0) _exit(0); /* pool drained (or the fork server is gone) */
    step = "plan";
    if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) fail(EMSGSIZE, "plan truncated");
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n && nfds < MAX_FDS; i++) memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    }
    len = (size_t)got;
    pos = 0;
    if (u32() != 0x314c5344u) fail(0, "bad magic"); /* "DSL1" */
    int devnull = fd_at((int32_t)u32());
    int out = fd_at((int32_t)u32());
    int err = fd_at((int32_t)u32());
    int netns = fd_at((int32_t)u32());
    const char *root_data = str(NULL, 0);
    const char *cwd = str(NULL, 1);
    size_t hostname_len;
    const char *hostname = str(&hostname_len, 0);
    uid_t uid = u32();
    gid_t gid = u32();
    uint32_t n_ops = count();
    size_t ops_at = pos;
    for (uint32_t i = 0; i < n_ops; i++) { /* validate now, apply in the mount step */
        u32(); str(NULL, 1); u32(); str(NULL, 0);
    }
    uint32_t n_binds = count();
    size_t binds_at = pos;
    for (uint32_t i = 0; i < n_binds; i++) { fd_at((int32_t)u32()); str(NULL, 1); }
    uint32_t n_rl = count();
    size_t rl_at = pos;
    for (uint32_t i = 0; i < n_rl; i++) { u32(); u64(); }
    static char *args[MAX_ITEMS + 1], *envs[MAX_ITEMS + 1];
    static const char *paths[MAX_ITEMS];
    uint32_t n_argv = count();
    if (n_argv == 0) fail(0, "empty argv");
    for (uint32_t i = 0; i < n_argv; i++) args[i] = (char *)str(NULL, 1);
    uint32_t n_env = count();
    for (uint32_t i = 0; i < n_env; i++) envs[i] = (char *)str(NULL, 1);
    int env_fd = fd_at((int32_t)u32());
    uint32_t n_path = count();
    for (uint32_t i = 0; i < n_path; i++) paths[i] = str(NULL, 1);
    size_t filter_len;
    const char *filter = str(&filter_len, 0);
    if (filter_len == 0 || filter_len % sizeof(struct sock_filter) || filter_len / sizeof(struct sock_filter) > 4096)
        fail(0, "bad seccomp program");
    if (pos != len) fail(0, "trailing bytes");
    if (env_fd >= 0) load_env(env_fd, n_env, envs);

    /* ---- stdio ---------------------------------------------------------------------------- */
    step = "stdio";
    if (out <= 2 && (out = fcntl(out, F_DUPFD_CLOEXEC, 3)) < 0) fail(errno, "dup stdout");
    if (err <= 2 && (err = fcntl(err, F_DUPFD_CLOEXEC, 3)) < 0) fail(errno, "dup stderr");
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) fail(errno, "dup2");

    /* ---- namespaces: the egress netns if any, then a cgroup namespace rooted at ours ------- */
    step = "namespaces";
    if (netns >= 0 && setns(netns, CLONE_NEWNET) < 0) fail(errno, "setns net");
    if (unshare(CLONE_NEWCGROUP) < 0) fail(errno, "unshare cgroup");

    /* ---- mount_instance ------------------------------------------------------------------- */
    step = "mount_instance";
    mode_t old_umask = umask(0);
    pos = ops_at;
    for (uint32_t i = 0; i < n_ops; i++) {
        uint32_t kind = u32();
        const char *path = str(NULL, 1);
        uint32_t arg = u32();
        size_t data_len;
        const char *data = str(&data_len, 0);
        if (kind == OP_MKDIR) {
            if (mkdir(path, arg) < 0) fail(errno, path);
        } else if (kind == OP_FILE) {
            int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, arg);
            if (fd < 0) fail(errno, path);
            write_all(fd, data, data_len);
            close(fd);
        } else if (kind == OP_TMPFS) {
            if (mount("tmpfs", path, "tmpfs", arg, data) < 0) fail(errno, path);
        } else {
            fail(EINVAL, "unknown mount operation");
        }
    }
    umask(old_umask);
    pos = binds_at;
    for (uint32_t i = 0; i < n_binds; i++) {
        int fd = fd_at((int32_t)u32());
        const char *target = str(NULL, 1);
        if (syscall(SYS_move_mount, fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0) fail(errno, target);
        close(fd);
    }
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, root_data) < 0)
        fail(errno, "remount / read-only");

    step = "chdir";
    if (chdir(cwd) < 0) fail(errno, cwd);

    step = "hostname";
    if (sethostname(hostname, hostname_len) < 0) fail(errno, "sethostname");

    step = "rlimits";
    pos = rl_at;
    for (uint32_t i = 0; i < n_rl; i++) {
        int res = (int)u32();
        uint64_t v = u64();
        struct rlimit rl = {(rlim_t)v, (rlim_t)v};
        if (setrlimit(res, &rl) < 0) fail(errno, "setrlimit");
    }

    step = "ids"; /* gid before uid: after setresuid we could not change it */
    if (setgroups(0, NULL) < 0) fail(errno, "setgroups");
    if (setresgid(gid, gid, gid) < 0) fail(errno, "setresgid");
    if (setresuid(uid, uid, uid) < 0) fail(errno, "setresuid");

    /* A credential change resets the parent-death signal: re-arm it, then close the race (the
     * fork server holds the only other end of fd 3, so POLLHUP/POLLERR means it is gone). */
    step = "parent_death";
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) fail(errno, "PR_SET_PDEATHSIG");
    struct pollfd pfd = {REPORT, POLLOUT, 0};
    if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLERR | POLLHUP))) _exit(137);

    step = "capabilities";
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) < 0) fail(errno, "capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) fail(errno, "PR_CAP_AMBIENT");

    step = "no_new_privs";
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail(errno, "PR_SET_NO_NEW_PRIVS");

    step = "seccomp";
    static struct sock_filter prog_buf[4096];
    memcpy(prog_buf, filter, filter_len);
    struct sock_fprog prog = {(unsigned short)(filter_len / sizeof(struct sock_filter)), prog_buf};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) fail(errno, "seccomp");

    step = "fds"; /* only 0, 1, 2 survive exec; fd 3 closing tells the fork server we exec'd */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        if (errno != ENOSYS) fail(errno, "close_range");
        struct rlimit rl;
        long top = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (long)rl.rlim_cur : 65536;
        for (long fd = 3; fd < top; fd++) fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    }

    step = "execve"; /* PATH search inside the sandbox, the same rules as child.step_execve */
    int last = ENOENT;
    if (strchr(args[0], '/')) {
        execve(args[0], args, envs);
        last = errno;
    } else {
        static char cand[4096];
        for (uint32_t i = 0; i < n_path; i++) {
            if (!*paths[i]) continue;
            if ((size_t)snprintf(cand, sizeof cand, "%s/%s", paths[i], args[0]) >= sizeof cand)
                errno = ENAMETOOLONG;
            else
                execve(cand, args, envs);
            if ((errno != ENOENT && errno != ENOTDIR) || last == ENOENT) last = errno;
        }
    }
    fail(last, args[0]);
}
