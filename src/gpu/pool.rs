//! A resource pool keyed by descriptor: released resources wait, grouped by key, for the
//! next request with the same key, so repeated calls of one shape allocate nothing.
//! Generic over the resource so its bookkeeping is tested without a GPU.

use std::collections::HashMap;
use std::hash::Hash;

/// Rounds a byte size up to its size class: the next power of two, at least 256 bytes.
/// Shapes that differ a little share buffers; the waste is under 2×.
pub fn size_class(bytes: u64) -> u64 {
    bytes.max(256).next_power_of_two()
}

/// The descriptor a pooled buffer is found by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferKey {
    /// The size class in bytes ([`size_class`]).
    pub size: u64,
    /// `wgpu::BufferUsages` bits.
    pub usage: u32,
}

impl BufferKey {
    /// The key for a buffer of at least `bytes` bytes with the given usage bits.
    pub fn new(bytes: u64, usage: u32) -> Self {
        BufferKey {
            size: size_class(bytes),
            usage,
        }
    }
}

/// A pool of resources of type `R` keyed by `K`.
#[derive(Debug)]
pub struct Pool<K, R> {
    free: HashMap<K, Vec<R>>,
    created: u64,
    reused: u64,
}

impl<K: Hash + Eq + Clone, R> Default for Pool<K, R> {
    fn default() -> Self {
        Pool {
            free: HashMap::new(),
            created: 0,
            reused: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, R> Pool<K, R> {
    /// A resource for `key`: a released one if any waits, otherwise a new one from `create`.
    pub fn acquire(&mut self, key: &K, create: impl FnOnce(&K) -> R) -> R {
        if let Some(r) = self.free.get_mut(key).and_then(Vec::pop) {
            self.reused += 1;
            return r;
        }
        self.created += 1;
        create(key)
    }

    /// Gives a resource back for reuse under `key`.
    pub fn release(&mut self, key: K, resource: R) {
        self.free.entry(key).or_default().push(resource);
    }

    /// Resources created so far.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Requests served from released resources.
    pub fn reused(&self) -> u64 {
        self.reused
    }

    /// Resources waiting for reuse.
    pub fn idle(&self) -> usize {
        self.free.values().map(Vec::len).sum()
    }

    /// Drops every idle resource (for example after a shape change that will not recur).
    pub fn clear(&mut self) {
        self.free.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_to_powers_of_two() {
        assert_eq!(size_class(0), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 512);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(BufferKey::new(1000, 3), BufferKey::new(1024, 3));
        assert_ne!(BufferKey::new(1000, 3), BufferKey::new(1000, 5));
    }

    #[test]
    fn released_resources_are_reused_by_key() {
        let mut pool: Pool<BufferKey, u32> = Pool::default();
        let mut next = 0;
        let mut make = |_: &BufferKey| {
            next += 1;
            next
        };
        let a = BufferKey::new(1000, 1);
        let x = pool.acquire(&a, &mut make);
        let y = pool.acquire(&a, &mut make);
        assert_ne!(x, y);
        pool.release(a, x);
        // Same size class, same usage: the released resource comes back.
        assert_eq!(pool.acquire(&BufferKey::new(900, 1), &mut make), x);
        // Another usage never takes it.
        pool.release(a, y);
        let z = pool.acquire(&BufferKey::new(900, 2), &mut make);
        assert!(z != y && z != x);
        assert_eq!((pool.created(), pool.reused(), pool.idle()), (3, 1, 1));
        pool.clear();
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_steady_workload_allocates_nothing_after_warm_up() {
        let mut pool: Pool<BufferKey, usize> = Pool::default();
        let keys = [
            BufferKey::new(4096, 1),
            BufferKey::new(64, 2),
            BufferKey::new(1 << 20, 1),
        ];
        for round in 0..10 {
            let held: Vec<_> = keys
                .iter()
                .map(|k| (*k, pool.acquire(k, |_| round)))
                .collect();
            for (k, r) in held {
                pool.release(k, r);
            }
        }
        assert_eq!(pool.created(), 3);
        assert_eq!(pool.reused(), 27);
    }
}
