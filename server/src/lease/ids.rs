//! Lease ids.

use std::sync::atomic::{AtomicU64, Ordering};

/// Generates lease ids unique across members: etcd's scheme of the low
/// 16 bits of the member id, then a counter seeded from the clock.
pub struct LeaseIdGen {
    prefix: u64,
    counter: AtomicU64,
}

impl LeaseIdGen {
    pub fn new(member_id: u64) -> Self {
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self { prefix: (member_id & 0xffff) << 48, counter: AtomicU64::new(millis << 8) }
    }

    pub fn next(&self) -> i64 {
        loop {
            let suffix = self.counter.fetch_add(1, Ordering::Relaxed) & ((1 << 48) - 1);
            let id = ((self.prefix | suffix) & (i64::MAX as u64)) as i64;
            if id != 0 {
                return id;
            }
        }
    }
}
