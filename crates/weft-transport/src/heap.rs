//! Handing freed heap memory back to the kernel.

/// Returns the allocator's free pages to the kernel. glibc's allocator keeps memory freed in the middle
/// of its heaps (most of what connections free) for reuse and never gives it back by itself; the
/// process's resident size would otherwise stay at its peak. Takes about a millisecond for tens of
/// megabytes of heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn shrink() {
    // SAFETY: `malloc_trim` takes the allocator's own locks and only releases pages no allocation uses;
    // it has no preconditions on the caller.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Other allocators (musl's) return memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn shrink() {}

/// Hands freed heap memory back to the kernel after a large transient allocation (an admin dump).
pub fn release_free_memory() {
    shrink();
}
