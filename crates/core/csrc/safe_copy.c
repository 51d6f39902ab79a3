/*
 * A memmove that survives SIGBUS on the bytes it touches.
 *
 * Guest memory is a MAP_SHARED mapping of a file the client owns. If the
 * client shrinks that file, the next touch of a page past its new end raises
 * SIGBUS, which by default kills the whole server. No check done before the
 * copy (fstat, seals we cannot force on the client's file) closes that race;
 * recovering from the fault does. This is the only C in the package: Rust
 * has no sigsetjmp, and jumping out of a signal handler over Rust frames
 * would be undefined behaviour, so the copy and the jump live in one C frame.
 *
 * The handler is installed once per process and chains to whatever handler
 * was there before for any SIGBUS that is not ours (wrong thread, no copy
 * armed, or an address outside the armed copy).
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static struct sigaction previous;
static pthread_once_t installed = PTHREAD_ONCE_INIT;
static int install_error;

/* Per thread: the copy in progress (Node workers copy concurrently). */
static __thread sigjmp_buf *armed;
static __thread uintptr_t armed_ranges[4];

static int in_range(uintptr_t addr) {
    return (addr >= armed_ranges[0] && addr < armed_ranges[1]) ||
           (addr >= armed_ranges[2] && addr < armed_ranges[3]);
}

static void chain(int sig, siginfo_t *info, void *context) {
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* A fault cannot be ignored: restore the default and return, so the
         * faulting instruction runs again and dies as it would have. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
    } else {
        previous.sa_handler(sig);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = armed;
    if (jump != NULL && in_range((uintptr_t)info->si_addr)) {
        armed = NULL;
        siglongjmp(*jump, 1);
    }
    chain(sig, info, context);
}

static void install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    sigemptyset(&action.sa_mask);
    /* SA_NODEFER: SIGBUS stays unblocked while the handler runs, so jumping
     * out of it leaves the signal mask as it was and sigsetjmp need not save
     * the mask (a syscall on every copy). */
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    install_error = sigaction(SIGBUS, &action, &previous);
}

/* 0 when installed; call before the first copy. */
int vfu_safe_copy_init(void) {
    pthread_once(&installed, install);
    return install_error;
}

/* Copies len bytes (the ranges may overlap); 0 on success, -1 if either
 * range faulted with SIGBUS part-way (the destination is then partly written). */
int vfu_safe_copy(void *dst, const void *src, size_t len) {
    sigjmp_buf jump;
    /* Touching the thread-locals here, outside the handler, makes the C
     * runtime allocate them for this thread now (dlopen'd libraries get TLS
     * lazily), so the handler only reads storage that already exists. */
    armed_ranges[0] = (uintptr_t)src;
    armed_ranges[1] = (uintptr_t)src + len;
    armed_ranges[2] = (uintptr_t)dst;
    armed_ranges[3] = (uintptr_t)dst + len;
    if (sigsetjmp(jump, 0) != 0) {
        return -1; /* the handler disarmed before jumping */
    }
    armed = &jump;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memmove(dst, src, len);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    armed = NULL;
    return 0;
}
