/* Static "hello" for the rootfs-mode test: the bundle has no libc, so this must be static. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("hello from the bundle, uid %d\n", (int)getuid());
    return access("/usr/bin/env", F_OK) == 0 ? 1 : 0; /* the host's /usr must not be visible */
}
