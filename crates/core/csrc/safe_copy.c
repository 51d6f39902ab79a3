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
 * The handler only claims a memory fault the kernel raised (si_code > 0, so
 * never a kill -BUS) inside a copy in progress on the faulting thread. Every
 * other SIGBUS is chained: first to handlers installed after ours (found and
 * put behind ours again by vfu_safe_copy_reassert), then to the one that was
 * there before ours, with its own disposition (a default one still kills).
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

/* Handlers installed after ours, in the order we found them; entries are
 * written before the count is published and never change after. */
#define MAX_LATER 8
static struct sigaction later[MAX_LATER];
static int later_count;
static pthread_mutex_t reassert_lock = PTHREAD_MUTEX_INITIALIZER;

/* Per thread: the copy in progress (Node workers copy concurrently). */
static __thread sigjmp_buf *armed;
static __thread uintptr_t armed_ranges[4];
/* How deep this thread is in the chain: a later handler that chains back
 * to us (its previous) re-enters here, and the next one down is called. */
static __thread int chain_depth;

static int in_range(uintptr_t addr) {
    return (addr >= armed_ranges[0] && addr < armed_ranges[1]) ||
           (addr >= armed_ranges[2] && addr < armed_ranges[3]);
}

static void call(const struct sigaction *handler, int sig, siginfo_t *info, void *context) {
    int fault = info->si_code > 0;
    if (handler->sa_flags & SA_SIGINFO) {
        handler->sa_sigaction(sig, info, context);
    } else if (handler->sa_handler == SIG_IGN && !fault) {
        /* An ignored signal someone sent: nothing to do. */
    } else if (handler->sa_handler == SIG_DFL || handler->sa_handler == SIG_IGN) {
        /* The default action (a fault cannot be ignored): restore it, then
         * let it happen, as it would have without us: a sent signal is
         * raised again, a faulting instruction runs again. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        if (!fault) raise(sig);
    } else {
        handler->sa_handler(sig);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = armed;
    if (info->si_code > 0 && jump != NULL && in_range((uintptr_t)info->si_addr)) {
        armed = NULL;
        siglongjmp(*jump, 1);
    }
    int depth = chain_depth;
    int count = __atomic_load_n(&later_count, __ATOMIC_ACQUIRE);
    chain_depth = depth + 1;
    call(depth < count ? &later[count - 1 - depth] : &previous, sig, info, context);
    chain_depth = depth;
}

static struct sigaction ours(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    sigemptyset(&action.sa_mask);
    /* SA_NODEFER: SIGBUS stays unblocked while the handler runs, so jumping
     * out of it leaves the signal mask as it was and sigsetjmp need not save
     * the mask (a syscall on every copy). */
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    return action;
}

static void install(void) {
    struct sigaction action = ours();
    install_error = sigaction(SIGBUS, &action, &previous);
}

/* 0 when installed; call before the first copy. */
int vfu_safe_copy_init(void) {
    pthread_once(&installed, install);
    return install_error;
}

/* Puts our handler back in front if something replaced it since, keeping
 * the replacement to chain to. 0 when ours is in front (or was put back),
 * -1 when too many replacements were seen to keep another. */
int vfu_safe_copy_reassert(void) {
    int status = 0;
    pthread_mutex_lock(&reassert_lock);
    struct sigaction current;
    sigaction(SIGBUS, NULL, &current);
    if (!(current.sa_flags & SA_SIGINFO) || current.sa_sigaction != on_sigbus) {
        if (later_count == MAX_LATER) {
            status = -1;
        } else {
            later[later_count] = current;
            __atomic_store_n(&later_count, later_count + 1, __ATOMIC_RELEASE);
            struct sigaction action = ours();
            sigaction(SIGBUS, &action, NULL);
        }
    }
    pthread_mutex_unlock(&reassert_lock);
    return status;
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
    chain_depth = 0;
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
