/* A 32-bit (i386 ABI) getpid through int 0x80 from a 64-bit process: prints the raw return value.
   Under dorm's seccomp filter the non-native architecture is refused with -EPERM (-1). */
#include <stdio.h>

int main(void) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    printf("%ld\n", ret);
    return 0;
}
