/* TIOCSTI on the given fd (default 0), once plain and once with garbage in the upper 32 bits of
   the command (the kernel truncates it to 32 bits). Prints "plain_errno high_errno". */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fd = argc > 1 ? atoi(argv[1]) : 0;
    char c = 'x';
    errno = 0;
    long r1 = syscall(SYS_ioctl, fd, (unsigned long)TIOCSTI, &c);
    int e1 = r1 < 0 ? errno : 0;
    errno = 0;
    long r2 = syscall(SYS_ioctl, fd, 0xdeadbeef00000000UL | TIOCSTI, &c);
    int e2 = r2 < 0 ? errno : 0;
    printf("%d %d\n", e1, e2);
    return 0;
}
