//! Instance addresses kept for the life of the process, so that an endpoint's authority and
//! `Host` value live on static bytes.
//!
//! A request routed to an endpoint carries a copy of its authority, and an HTTP client
//! copies it again for its connection pool's key (hyper-util takes several copies per
//! request). Copies of shared `Bytes` count references with atomic instructions, on a count
//! that every copy of the endpoint on every core writes; copies of static bytes count
//! nothing. Endpoints are made when instances are discovered, not per request, so interning
//! costs a lock there only. Each distinct address is kept once, up to [`MAX_INTERNED`] of
//! them (for `ip:port` addresses, about half a megabyte in all; a process meets that many
//! only over a long life of instances coming and going); endpoints made after that share
//! counted bytes, as any `Authority` does.

use std::collections::HashSet;
use std::sync::Mutex;

/// Distinct addresses kept at most.
pub(crate) const MAX_INTERNED: usize = 10_000;

static INTERNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// `text` as a string that lives as long as the process, the same one for every equal
/// `text`; `None` once [`MAX_INTERNED`] distinct strings are kept.
pub(crate) fn intern(text: &str) -> Option<&'static str> {
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    intern_in(
        interned.get_or_insert_with(HashSet::new),
        text,
        MAX_INTERNED,
    )
}

fn intern_in(set: &mut HashSet<&'static str>, text: &str, max: usize) -> Option<&'static str> {
    if let Some(&kept) = set.get(text) {
        return Some(kept);
    }
    if set.len() >= max {
        return None;
    }
    let kept: &'static str = Box::leak(text.into());
    set.insert(kept);
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_addresses_are_kept_once() {
        let mut set = HashSet::new();
        let first = intern_in(&mut set, "10.0.0.7:8080", 4).unwrap();
        let again = intern_in(&mut set, &String::from("10.0.0.7:8080"), 4).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr());
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn no_more_than_the_limit_are_kept() {
        let mut set = HashSet::new();
        assert!(intern_in(&mut set, "10.0.0.1:80", 2).is_some());
        assert!(intern_in(&mut set, "10.0.0.2:80", 2).is_some());
        assert_eq!(intern_in(&mut set, "10.0.0.3:80", 2), None);
        // Those already kept are still found.
        assert!(intern_in(&mut set, "10.0.0.1:80", 2).is_some());
        assert_eq!(set.len(), 2);
    }
}
