//! The one lock helper every module shares.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks a std mutex that guards plain data; a panic elsewhere cannot leave
/// it half-updated, so a poisoned lock is still good.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
