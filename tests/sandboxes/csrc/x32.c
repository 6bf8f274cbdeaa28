/* getpid through the x32 ABI (syscall number | 0x40000000): prints "ret errno". */
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    errno = 0;
    long ret = syscall(0x40000000L | SYS_getpid);
    printf("%ld %d\n", ret, errno);
    return 0;
}
