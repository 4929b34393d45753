//! The one run-time AVX2 dispatch of the codecs: [`avx2_dispatch!`] compiles a row function twice
//! (baseline x86-64 and AVX2) and picks the AVX2 build when [`use_avx2`] says the CPU has it.
//!
//! Same bits either way: only the vector width the compiler picks changes, never the order of
//! operations, and Rust never fuses a multiply and an add. Tests pin this by running both builds on
//! one CPU through [`portable_only`].

/// Whether code compiled for AVX2 may run: the CPU has AVX2 and the running test did not ask for the
/// portable build.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn use_avx2() -> bool {
    #[cfg(test)]
    if PORTABLE_ONLY.with(std::cell::Cell::get) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(all(test, target_arch = "x86_64"))]
thread_local! {
    /// Per thread, so that tests running side by side do not switch each other's builds.
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on this thread with the AVX2 builds switched off, so a test can compare the portable
/// build with the dispatched one on a CPU that has AVX2.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn portable_only<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PORTABLE_ONLY.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PORTABLE_ONLY.with(|p| p.replace(true)));
    f()
}

/// Defines the function it is given, compiled for AVX2 as well and dispatched to it at run time when
/// the CPU has it. The body goes into an `#[inline(always)]` inner function, so everything it inlines
/// (block codecs, lane searches) is compiled once per build. Any signature without a return value.
macro_rules! avx2_dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn run($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    run($($arg),*)
                }
                if $crate::quant::simd::use_avx2() {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            run($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;
